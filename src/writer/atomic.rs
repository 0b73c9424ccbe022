//! A file that appears at its path only once it is complete: written to a temporary file
//! beside the target, fsynced, then renamed over it. Dropping it unfinished removes the
//! temporary file, so a failed run leaves nothing behind.

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
}

impl AtomicFile {
    /// Creates the temporary file beside `target`. Refuses an existing target unless
    /// `force`, and never replaces a directory.
    pub fn create(target: &Path, force: bool) -> Result<AtomicFile> {
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
        let mut attempt = 0u32;
        let (temp, file) = loop {
            let mut temp_name = temp_prefix(name);
            temp_name.push(std::process::id().to_string());
            if attempt > 0 {
                temp_name.push(format!("-{attempt}"));
            }
            temp_name.push(format!("@{host}.tmp"));
            let temp = dir.join(temp_name);
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
        })
    }

    /// Switches the temporary file to direct I/O (`O_DIRECT`: writes bypass the page
    /// cache) where the platform and file system support it; returns whether it did.
    /// Every later write must then be aligned to [`super::stream::BLOCK`].
    pub fn try_direct(&mut self) -> bool {
        #[cfg(target_os = "linux")]
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

    /// The temporary file's path.
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
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        }
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
    pub(crate) fn assume_synced(&mut self) {
        drop(self.file.take());
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
        let renamed = std::fs::rename(&self.temp, &self.target);
        if renamed.is_err() {
            let _ = std::fs::remove_file(&self.temp);
        }
        self.pending = false;
        renamed.map_err(|e| Error::io(&self.target, e))
    }
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
    #[cfg(unix)]
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
    #[cfg(unix)]
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
    #[cfg(not(unix))]
    let _ = (dir, name);
}

/// Whether a process of this PID runs on this machine.
#[cfg(unix)]
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
        if self.pending {
            // Best effort: the run already failed with the error that matters.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
