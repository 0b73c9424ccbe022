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
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".relayout-{}.tmp", std::process::id()));
        let temp = dir.join(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| Error::io(&temp, e))?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            temp,
            file: Some(file),
            direct: false,
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

    /// Makes the file durable and moves it to its target path.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().ok_or_else(|| {
            Error::io(
                &self.temp,
                std::io::Error::other("the output was already committed"),
            )
        })?;
        file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        drop(file);
        if let Err(e) = std::fs::rename(&self.temp, &self.target) {
            let _ = std::fs::remove_file(&self.temp);
            return Err(Error::io(&self.target, e));
        }
        // The rename is durable once the directory is; failing that only weakens
        // crash safety, the output is already complete.
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Best effort: the run already failed with the error that matters.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
