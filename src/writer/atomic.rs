//! A file that appears at its path only once it is complete: written to a temporary file
//! beside the target, fsynced, then renamed over it. Dropping it unfinished removes the
//! temporary file, so a failed run leaves nothing behind.
//!
//! On Linux the temporary file has no name at all (`O_TMPFILE`): it is linked into place
//! (`linkat`) only when committed, so even a process killed outright (SIGKILL, power
//! loss) leaves nothing visible. Where that is not available, it is named
//! `.NAME.relayout-PID@HOST.tmp`, and one a dead process of this host left is removed
//! by the next run to the same target.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An output file under construction.
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    direct: bool,
    /// The temporary file exists and is ours to remove: until it is renamed.
    pending: bool,
    /// An `O_TMPFILE` file without a name yet; `temp` is the name it gets if it must be
    /// named before its commit.
    unnamed: bool,
    /// Replace an existing target on commit.
    force: bool,
}

/// Unnamed temporary files open at once; past this, synced ones are given their
/// temporary name and closed, so thousands of shards do not exhaust descriptors.
#[cfg(all(target_os = "linux", not(relayout_portable)))]
const MAX_OPEN_UNNAMED: usize = 64;
#[cfg(all(target_os = "linux", not(relayout_portable)))]
static OPEN_UNNAMED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl AtomicFile {
    /// Creates the temporary file beside `target`. Refuses an existing target unless
    /// `force`, and never replaces a directory.
    pub fn create(target: &Path, force: bool) -> Result<AtomicFile> {
        AtomicFile::create_with(target, force, true)
    }

    /// [`AtomicFile::create`], with or without trying an unnamed file first.
    pub(crate) fn create_with(target: &Path, force: bool, unnamed: bool) -> Result<AtomicFile> {
        match std::fs::symlink_metadata(target) {
            Ok(meta) if meta.is_dir() => {
                return Err(Error::io(
                    target,
                    std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
                ))
            }
            Ok(_) if !force => {
                return Err(Error::OutputExists {
                    path: target.to_path_buf(),
                })
            }
            _ => {}
        }
        let name = target.file_name().ok_or_else(|| {
            Error::io(
                target,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            )
        })?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_stale_temps(&dir, name);
        // `.NAME.relayout-PID@HOST.tmp`: the host keeps processes of the same PID on
        // machines sharing the folder apart; a taken name still gets a counter.
        let host = host_name();
        let named =
            |attempt: u32| dir.join(temp_file_name(name, std::process::id(), attempt, &host));
        if let Some(file) = open_unnamed(&dir).filter(|_| unnamed) {
            return Ok(AtomicFile {
                target: target.to_path_buf(),
                temp: named(0),
                file: Some(file),
                direct: false,
                pending: true,
                unnamed: true,
                force,
            });
        }
        let mut attempt = 0u32;
        let (temp, file) = loop {
            let temp = named(attempt);
            match OpenOptions::new().write(true).create_new(true).open(&temp) {
                Ok(file) => break (temp, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 64 => {
                    attempt += 1;
                }
                Err(e) => return Err(Error::io(&temp, e)),
            }
        };
        Ok(AtomicFile {
            target: target.to_path_buf(),
            temp,
            file: Some(file),
            direct: false,
            pending: true,
            unnamed: false,
            force,
        })
    }

    /// The name process `pid` of this machine gives its temporary file for `target`
    /// where it cannot leave it unnamed: `.NAME.relayout-PID@HOST.tmp` beside it (a
    /// taken name gets `-N` after the PID). Such a file of a process that is gone is
    /// removed by the next [`AtomicFile::create`] for the same target.
    pub fn temp_name(target: &Path, pid: u32) -> PathBuf {
        let name = target.file_name().unwrap_or_default();
        target.with_file_name(temp_file_name(name, pid, 0, &host_name()))
    }

    /// Whether the temporary file has no name (`O_TMPFILE`).
    pub fn is_unnamed(&self) -> bool {
        self.unnamed
    }

    /// Switches the temporary file to direct I/O (`O_DIRECT`: writes bypass the page
    /// cache) where the platform and file system support it; returns whether it did.
    /// Every later write must then be aligned to the stream's block size.
    pub fn try_direct(&mut self) -> bool {
        #[cfg(all(target_os = "linux", not(relayout_portable)))]
        if let Some(file) = &self.file {
            use std::os::fd::AsRawFd;
            let fd = file.as_raw_fd();
            // SAFETY: fcntl on a descriptor we own, with integer arguments only.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            // SAFETY: as above; a file system without direct I/O answers EINVAL and the
            // descriptor stays as it was.
            self.direct = flags >= 0
                && unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } == 0;
        }
        self.direct
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The temporary file's path (for an unnamed file, the name it would get).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The open temporary file.
    pub fn file(&mut self) -> Result<&mut File> {
        self.file.as_mut().ok_or_else(|| {
            Error::io(
                &self.temp,
                std::io::Error::other("the output was already committed"),
            )
        })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let temp = self.temp.clone();
        self.file()?
            .write_all(bytes)
            .map_err(|e| Error::io(temp, e))
    }

    /// Makes the temporary file's contents durable and closes it; it stays temporary
    /// (and is removed on drop) until [`AtomicFile::commit`].
    pub fn sync(&mut self) -> Result<()> {
        if let Some(file) = &self.file {
            file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        }
        self.close_synced()?;
        if self.pending {
            Ok(())
        } else {
            Err(Error::io(
                &self.temp,
                std::io::Error::other("the output was already committed"),
            ))
        }
    }

    /// Closes the file without syncing it: for a file whose writes and sync were done
    /// through another descriptor of it (the block stream's thread).
    pub(crate) fn assume_synced(&mut self) -> Result<()> {
        self.close_synced()
    }

    /// Closes a synced file: a named one at once; an unnamed one keeps its descriptor
    /// (its only handle until it is linked) unless too many are open, then it is named.
    fn close_synced(&mut self) -> Result<()> {
        if !self.unnamed {
            drop(self.file.take());
            return Ok(());
        }
        #[cfg(all(target_os = "linux", not(relayout_portable)))]
        if OPEN_UNNAMED.load(std::sync::atomic::Ordering::Relaxed) > MAX_OPEN_UNNAMED {
            let temp = self.temp.clone();
            self.link_to(&temp)?;
            self.unnamed = false;
            self.forget_unnamed();
            drop(self.file.take());
        }
        Ok(())
    }

    /// Gives the unnamed file the name `path` (which must not exist).
    fn link_to(&self, path: &Path) -> Result<()> {
        #[cfg(all(target_os = "linux", not(relayout_portable)))]
        if let Some(file) = &self.file {
            use std::os::fd::AsRawFd;
            use std::os::unix::ffi::OsStrExt;
            let proc_path = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
            let to = std::ffi::CString::new(path.as_os_str().as_bytes())
                .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
            // SAFETY: both paths are NUL-terminated; linkat only adds a directory entry
            // for the open (unnamed) inode.
            let r = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            return if r == 0 {
                Ok(())
            } else {
                Err(Error::io(path, std::io::Error::last_os_error()))
            };
        }
        Err(Error::io(
            path,
            std::io::Error::other("the file has no descriptor left to link"),
        ))
    }

    fn forget_unnamed(&self) {
        #[cfg(all(target_os = "linux", not(relayout_portable)))]
        OPEN_UNNAMED.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes the file durable and moves it to its target path.
    pub fn commit(mut self) -> Result<()> {
        self.rename()?;
        sync_dir(&self.target);
        Ok(())
    }

    /// Moves synced files to their targets together: if one cannot be moved, the ones
    /// already moved are removed again, so either all appear or none does (a target
    /// they replaced with `force` is gone either way).
    pub fn commit_all(files: Vec<AtomicFile>) -> Result<()> {
        let mut moved: Vec<PathBuf> = Vec::with_capacity(files.len());
        for mut f in files {
            if let Err(e) = f.rename() {
                for path in &moved {
                    let _ = std::fs::remove_file(path);
                }
                // The rest are dropped unfinished: their temporary files go.
                return Err(e);
            }
            moved.push(f.target.clone());
        }
        for target in first_in_each_dir(&moved) {
            sync_dir(target);
        }
        Ok(())
    }

    /// Syncs (if not yet) and renames the temporary file onto the target.
    fn rename(&mut self) -> Result<()> {
        self.sync()?;
        if self.unnamed {
            // Straight into place when the target is free; over an existing target
            // (allowed by `force`) through a temporary name and a rename.
            let direct = self.link_to(&self.target);
            match direct {
                Ok(()) => {
                    self.unnamed = false;
                    self.pending = false;
                    self.forget_unnamed();
                    drop(self.file.take());
                    return Ok(());
                }
                Err(Error::Io { cause: source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists && self.force => {}
                Err(Error::Io { cause: source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    return Err(Error::OutputExists {
                        path: self.target.clone(),
                    })
                }
                Err(e) => return Err(e),
            }
            let temp = self.temp.clone();
            self.link_to(&temp)?;
            self.unnamed = false;
            self.forget_unnamed();
            drop(self.file.take());
        }
        if !self.force {
            // Never clobber a target that appeared while we wrote: a hard link fails if
            // it exists (where links are not supported, the rename below decides).
            match std::fs::hard_link(&self.temp, &self.target) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.temp);
                    self.pending = false;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let _ = std::fs::remove_file(&self.temp);
                    self.pending = false;
                    return Err(Error::OutputExists {
                        path: self.target.clone(),
                    });
                }
                Err(_) => {}
            }
        }
        let renamed = std::fs::rename(&self.temp, &self.target);
        if renamed.is_err() {
            let _ = std::fs::remove_file(&self.temp);
        }
        self.pending = false;
        renamed.map_err(|e| Error::io(&self.target, e))
    }
}

/// An unnamed file in `dir` (`O_TMPFILE`), where the kernel, the file system and
/// `/proc` (to link it later without privileges) allow it.
#[cfg(all(target_os = "linux", not(relayout_portable)))]
fn open_unnamed(dir: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    let file = OpenOptions::new()
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .ok()?;
    OPEN_UNNAMED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(file)
}

#[cfg(any(not(target_os = "linux"), relayout_portable))]
fn open_unnamed(_dir: &Path) -> Option<File> {
    None
}

/// `.NAME.relayout-PID[-ATTEMPT]@HOST.tmp`.
fn temp_file_name(
    name: &std::ffi::OsStr,
    pid: u32,
    attempt: u32,
    host: &str,
) -> std::ffi::OsString {
    let mut temp_name = temp_prefix(name);
    temp_name.push(pid.to_string());
    if attempt > 0 {
        temp_name.push(format!("-{attempt}"));
    }
    temp_name.push(format!("@{host}.tmp"));
    temp_name
}

/// `.NAME.relayout-`, how every temporary file for target NAME begins.
fn temp_prefix(name: &std::ffi::OsStr) -> std::ffi::OsString {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".relayout-");
    prefix
}

/// This machine's name as it may appear in a file name (letters, digits, `-`, `.`).
fn host_name() -> String {
    #[cfg(all(unix, not(relayout_portable)))]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname writes at most that.
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        if ok {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            let name: String = String::from_utf8_lossy(&buf[..end])
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(64)
                .collect();
            if !name.is_empty() {
                return name;
            }
        }
    }
    "localhost".to_string()
}

/// Removes the temporary files a killed run (SIGKILL, power loss) of this machine left
/// for target `name`: those whose process is gone. Files of live processes, and of
/// other machines sharing the folder, are left alone.
fn remove_stale_temps(dir: &Path, name: &std::ffi::OsStr) {
    #[cfg(all(unix, not(relayout_portable)))]
    {
        use std::os::unix::ffi::OsStrExt;
        let prefix = temp_prefix(name);
        let host = host_name();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(rest) = file_name.as_bytes().strip_prefix(prefix.as_bytes()) else {
                continue;
            };
            let Some(rest) = rest.strip_suffix(b".tmp") else {
                continue;
            };
            let Ok(rest) = std::str::from_utf8(rest) else {
                continue;
            };
            let Some((id, on)) = rest.split_once('@') else {
                continue;
            };
            let pid = id.split('-').next().and_then(|p| p.parse::<i32>().ok());
            if on != host {
                continue;
            }
            match pid {
                Some(pid) if pid > 0 && pid as u32 != std::process::id() && !process_alive(pid) => {
                    // Best effort: at worst the debris stays.
                    let _ = std::fs::remove_file(entry.path());
                }
                _ => {}
            }
        }
    }
    #[cfg(any(not(unix), relayout_portable))]
    let _ = (dir, name);
}

/// Whether a process of this PID runs on this machine.
#[cfg(all(unix, not(relayout_portable)))]
fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// One path per parent folder, for syncing each folder once.
fn first_in_each_dir(paths: &[PathBuf]) -> Vec<&Path> {
    let mut seen: Vec<&Path> = Vec::new();
    let mut out = Vec::new();
    for p in paths {
        let parent = p.parent().unwrap_or(Path::new(""));
        if !seen.contains(&parent) {
            seen.push(parent);
            out.push(p.as_path());
        }
    }
    out
}

/// Makes a rename of `target` durable by syncing its folder; failing that only weakens
/// crash safety, the output is already complete.
fn sync_dir(target: &Path) {
    if let Some(dir) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if self.unnamed {
            // Never named: closing it was all it took.
            self.forget_unnamed();
        } else if self.pending {
            // Best effort: the run already failed with the error that matters.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("relayout-atomic-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn unnamed_and_named_temporaries_commit_replace_and_vanish_alike() {
        for unnamed in [true, false] {
            let dir = scratch(&format!("one-{unnamed}"));
            let target = dir.join("out.bin");
            // Dropped unfinished: nothing.
            let mut f = AtomicFile::create_with(&target, false, unnamed).unwrap();
            f.write_all(b"half").unwrap();
            if cfg!(all(target_os = "linux", not(relayout_portable))) && unnamed {
                assert!(f.is_unnamed());
                assert!(names(&dir).is_empty(), "an unnamed file shows up");
            }
            drop(f);
            assert!(names(&dir).is_empty());
            // Committed: exactly its bytes, nothing else.
            let mut f = AtomicFile::create_with(&target, false, unnamed).unwrap();
            f.write_all(b"first").unwrap();
            f.commit().unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"first");
            assert_eq!(names(&dir), ["out.bin"]);
            // Refused without force, replaced with it.
            assert!(matches!(
                AtomicFile::create_with(&target, false, unnamed),
                Err(Error::OutputExists { .. })
            ));
            let mut f = AtomicFile::create_with(&target, true, unnamed).unwrap();
            f.write_all(b"second").unwrap();
            f.commit().unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"second");
            assert_eq!(names(&dir), ["out.bin"]);
            // A target that appears while writing is not clobbered without force.
            let late = dir.join("late.bin");
            let mut f = AtomicFile::create_with(&late, false, unnamed).unwrap();
            f.write_all(b"mine").unwrap();
            std::fs::write(&late, b"theirs").unwrap();
            let err = f.commit().unwrap_err();
            assert!(matches!(err, Error::OutputExists { .. }), "{err}");
            assert_eq!(std::fs::read(&late).unwrap(), b"theirs");
            assert_eq!(names(&dir), ["late.bin", "out.bin"]);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn many_files_commit_together_beyond_the_open_descriptor_budget() {
        for unnamed in [true, false] {
            let dir = scratch(&format!("many-{unnamed}"));
            let count = 150;
            let mut files = Vec::new();
            for i in 0..count {
                let mut f =
                    AtomicFile::create_with(&dir.join(format!("f{i:03}")), false, unnamed).unwrap();
                f.write_all(format!("file {i}").as_bytes()).unwrap();
                f.sync().unwrap();
                files.push(f);
            }
            // Past the budget, synced files were named to free their descriptors; none is
            // at its target yet.
            assert!(names(&dir).iter().all(|n| n.ends_with(".tmp")));
            AtomicFile::commit_all(files).unwrap();
            let got = names(&dir);
            assert_eq!(got.len(), count);
            for i in 0..count {
                let path = dir.join(format!("f{i:03}"));
                assert_eq!(std::fs::read(path).unwrap(), format!("file {i}").as_bytes());
            }
            // And dropped instead of committed, they all go.
            let mut files = Vec::new();
            for i in 0..count {
                let mut f =
                    AtomicFile::create_with(&dir.join(format!("g{i:03}")), false, unnamed).unwrap();
                f.sync().unwrap();
                files.push(f);
            }
            drop(files);
            assert_eq!(names(&dir).len(), count);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
