//! Inputs that change under the map.
//!
//! Checkpoints are read through memory maps. If another process truncates a mapped file,
//! reading a page past its new end raises SIGBUS, which by default kills the process
//! mid-write. A process-wide SIGBUS handler turns that into an error instead: when the
//! faulting address lies in a map registered here, the handler maps a page of zeros over
//! it (so the interrupted read completes, with zeros) and marks the map as changed; the
//! converter checks the mark after every band and fails with "input changed while
//! reading" before anything is committed. Faults anywhere else are handed back to the
//! previous handler (by default: the process dies as it would have).
//!
//! A file overwritten in place (same size) raises no fault: [`FileIdentity`] (device,
//! inode, size, modification time) is taken when a file is mapped and compared again
//! before an output is committed.

use std::path::Path;
#[cfg(all(unix, not(relayout_portable)))]
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// What identifies a file's contents cheaply: a change to any of these means the file
/// was replaced, truncated or written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    len: u64,
    modified: Option<std::time::SystemTime>,
    #[cfg(all(unix, not(relayout_portable)))]
    dev: u64,
    #[cfg(all(unix, not(relayout_portable)))]
    ino: u64,
}

impl FileIdentity {
    pub(crate) fn of(meta: &std::fs::Metadata) -> FileIdentity {
        #[cfg(all(unix, not(relayout_portable)))]
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(all(unix, not(relayout_portable)))]
            dev: meta.dev(),
            #[cfg(all(unix, not(relayout_portable)))]
            ino: meta.ino(),
        }
    }

    /// Fails when the file at `path` is no longer the one this identity was taken of.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        let changed = |detail: String| Error::InputChanged {
            path: path.to_path_buf(),
            detail,
        };
        let now = std::fs::metadata(path)
            .map(|m| FileIdentity::of(&m))
            .map_err(|e| changed(format!("it can no longer be read: {e}")))?;
        if now.len != self.len {
            return Err(changed(format!(
                "its size went from {} to {} bytes",
                self.len, now.len
            )));
        }
        #[cfg(all(unix, not(relayout_portable)))]
        if (now.dev, now.ino) != (self.dev, self.ino) {
            return Err(changed("it was replaced by another file".to_string()));
        }
        if now.modified != self.modified {
            return Err(changed("it was written to".to_string()));
        }
        Ok(())
    }
}

/// Registered maps: start address and length (0 = free slot), and whether a read of it
/// faulted. A fixed table: the signal handler may not allocate or lock.
#[cfg(all(unix, not(relayout_portable)))]
const SLOTS: usize = 4096;
#[cfg(all(unix, not(relayout_portable)))]
#[allow(clippy::declare_interior_mutable_const)]
const FREE: AtomicUsize = AtomicUsize::new(0);
#[cfg(all(unix, not(relayout_portable)))]
#[allow(clippy::declare_interior_mutable_const)]
const CLEAN: AtomicBool = AtomicBool::new(false);
#[cfg(all(unix, not(relayout_portable)))]
static STARTS: [AtomicUsize; SLOTS] = [FREE; SLOTS];
#[cfg(all(unix, not(relayout_portable)))]
static LENS: [AtomicUsize; SLOTS] = [FREE; SLOTS];
#[cfg(all(unix, not(relayout_portable)))]
static FAULTED: [AtomicBool; SLOTS] = [CLEAN; SLOTS];

/// A map watched for faults while it lives; dropping it stops watching.
#[derive(Debug)]
pub(crate) struct Watch {
    #[cfg(all(unix, not(relayout_portable)))]
    slot: Option<usize>,
}

impl Watch {
    /// Watches `len` bytes at `start`. Without a free slot (thousands of maps open) or
    /// off unix, the map is simply not watched: a fault then ends the process as before.
    pub(crate) fn new(start: *const u8, len: usize) -> Watch {
        #[cfg(all(unix, not(relayout_portable)))]
        {
            install();
            for slot in 0..SLOTS {
                if LENS[slot]
                    .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    FAULTED[slot].store(false, Ordering::Release);
                    STARTS[slot].store(start as usize, Ordering::Release);
                    // Published last: the handler matches a slot only by its length.
                    LENS[slot].store(len, Ordering::Release);
                    return Watch { slot: Some(slot) };
                }
            }
            Watch { slot: None }
        }
        #[cfg(any(not(unix), relayout_portable))]
        {
            let _ = (start, len);
            Watch {}
        }
    }

    /// True when a read of the map faulted (its file shrank) since it was watched.
    pub(crate) fn faulted(&self) -> bool {
        #[cfg(all(unix, not(relayout_portable)))]
        {
            self.slot
                .is_some_and(|s| FAULTED[s].load(Ordering::Acquire))
        }
        #[cfg(any(not(unix), relayout_portable))]
        false
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        #[cfg(all(unix, not(relayout_portable)))]
        if let Some(slot) = self.slot {
            LENS[slot].store(usize::MAX, Ordering::Release);
            STARTS[slot].store(0, Ordering::Release);
            LENS[slot].store(0, Ordering::Release);
        }
    }
}

/// The SIGBUS action before ours, to hand foreign faults back to.
#[cfg(all(unix, not(relayout_portable)))]
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();
#[cfg(all(unix, not(relayout_portable)))]
static INSTALL: std::sync::Once = std::sync::Once::new();

#[cfg(all(unix, not(relayout_portable)))]
fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only touches atomics and
        // makes async-signal-safe system calls; PREVIOUS is written once, here, before
        // the handler can run.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let previous = std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>();
            libc::sigaction(libc::SIGBUS, &action, previous);
        }
    });
}

#[cfg(all(unix, not(relayout_portable)))]
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { fault_address(info) };
    for slot in 0..SLOTS {
        let len = LENS[slot].load(Ordering::Acquire);
        if len == 0 || len == usize::MAX {
            continue;
        }
        let start = STARTS[slot].load(Ordering::Acquire);
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: sysconf is async-signal-safe in practice (a constant on Linux).
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        let at = addr / page * page;
        // SAFETY: replaces one page of our own read-only file map (registered above, so
        // still mapped) with zeros; the map's owner unmaps the whole range later.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            FAULTED[slot].store(true, Ordering::Release);
            return;
        }
    }
    // Not ours: restore the previous action; returning re-runs the faulting access,
    // which then gets it (by default, the process ends with SIGBUS as before).
    // SAFETY: PREVIOUS was initialised by `install` before this handler was set.
    unsafe {
        let previous = std::ptr::addr_of!(PREVIOUS).cast::<libc::sigaction>();
        libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut());
    }
}

#[cfg(all(target_os = "linux", not(relayout_portable)))]
unsafe fn fault_address(info: *mut libc::siginfo_t) -> usize {
    (*info).si_addr() as usize
}

#[cfg(all(unix, not(target_os = "linux"), not(relayout_portable)))]
unsafe fn fault_address(info: *mut libc::siginfo_t) -> usize {
    (*info).si_addr as usize
}
