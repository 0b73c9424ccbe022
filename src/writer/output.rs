//! The output's files on disk: what kind of output a path asks for, the folder's
//! lifetime, free space, refusing to overwrite the input, and recognising a worker's
//! shards already written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::reader::Checkpoint;
use crate::writer::shard::{OutputFile, Worker};

/// How the output is split into files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// One safetensors file.
    File,
    /// A folder of `model-…-of-….safetensors` shards and `model.safetensors.index.json`.
    Shards(ShardOptions),
}

/// Options of sharded output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardOptions {
    /// Most bytes of tensor data per shard (a larger tensor gets a shard of its own).
    pub max_shard_bytes: u64,
    /// Write only this worker's shards (`--shard i/N`); `None` writes them all.
    pub worker: Option<Worker>,
}

impl OutputKind {
    /// The kind an output path asks for: a path ending in `.safetensors` is one file;
    /// any other path (or an existing folder, or a path ending in `/`) is a folder of
    /// shards of [`crate::writer::shard::DEFAULT_MAX_SHARD_BYTES`] each unless `max_shard_bytes`.
    /// A shard size or a worker with a one-file path is an error.
    pub fn for_path(
        path: &Path,
        max_shard_bytes: Option<u64>,
        worker: Option<Worker>,
    ) -> Result<OutputKind> {
        let text = path.as_os_str().to_string_lossy();
        let folder =
            path.is_dir() || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR);
        let file = !folder
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if !file {
            return Ok(OutputKind::Shards(ShardOptions {
                max_shard_bytes: max_shard_bytes
                    .unwrap_or(crate::writer::shard::DEFAULT_MAX_SHARD_BYTES),
                worker,
            }));
        }
        if max_shard_bytes.is_some() || worker.is_some() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "sharded output goes to a folder, and this path ends in .safetensors (name a folder, or drop the shard options)",
                ),
            ));
        }
        Ok(OutputKind::File)
    }
}

/// Refuses, before anything is written, a run whose files cannot fit in the free space
/// of `dir` (the nearest existing folder of it): "needs 7.4 GiB, 2.1 GiB free".
pub(crate) fn check_space(
    dir: &Path,
    files: &[(PathBuf, &OutputFile)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut needed = 0u64;
    for (_, f) in files {
        let header = crate::writer::header_bytes(&f.header, metadata)?.len() as u64;
        needed = needed.saturating_add(8 + header).saturating_add(f.bytes);
    }
    let existing = dir
        .ancestors()
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("."));
    match free_space(existing) {
        Some(available) if needed > available => Err(Error::NoSpace {
            path: existing.to_path_buf(),
            needed,
            available,
        }),
        // Unknown free space is not a reason to refuse; a full disk still fails cleanly.
        _ => Ok(()),
    }
}

/// Bytes an unprivileged process may still write on the file system holding `dir`.
#[cfg(all(unix, not(relayout_portable)))]
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statvfs only writes into `st`.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(any(not(unix), relayout_portable))]
fn free_space(_dir: &Path) -> Option<u64> {
    None
}

/// Whether `path` is already exactly the shard `file` would be: the same header bytes
/// (names, shapes, dtypes, offsets and the set's tag) and the full length. Shards appear
/// only complete, so this is how a re-run worker knows its work is done.
pub(crate) fn shard_is_complete(
    path: &Path,
    file: &OutputFile,
    metadata: &BTreeMap<String, String>,
) -> Result<bool> {
    use std::io::Read;
    let header = crate::writer::header_bytes(&file.header, metadata)?;
    let want_len = 8 + header.len() as u64 + file.bytes;
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.len() != want_len {
        return Ok(false);
    }
    let mut head = vec![0u8; 8 + header.len()];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::io(path, e))?;
    Ok(head[..8] == (header.len() as u64).to_le_bytes() && head[8..] == header[..])
}

/// The output folder: created when missing, and removed again on failure if this run
/// created it and it is still empty.
pub(crate) struct OutputFolder {
    created: Option<PathBuf>,
}

impl OutputFolder {
    pub(crate) fn open(dir: &Path, remove_on_failure: bool) -> Result<OutputFolder> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(OutputFolder { created: None }),
            Ok(_) => Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a folder (sharded output goes to a folder)",
                ),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                Ok(OutputFolder {
                    created: remove_on_failure.then(|| dir.to_path_buf()),
                })
            }
            Err(e) => Err(Error::io(dir, e)),
        }
    }

    pub(crate) fn keep(&mut self) {
        self.created = None;
    }
}

impl Drop for OutputFolder {
    fn drop(&mut self) {
        if let Some(dir) = &self.created {
            // Fails, as it should, when the folder is not empty.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Refuses to write over any file of the input checkpoint.
pub(crate) fn check_not_input(ckpt: &Checkpoint, out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let same = |p: &Path| same_file(p, out);
    if same(ckpt.path()) || ckpt.files().any(same) {
        return Err(Error::OutputIsInput {
            path: out.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(all(unix, not(relayout_portable)))]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(any(not(unix), relayout_portable))]
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
