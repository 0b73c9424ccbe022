//! The output's files on disk: what kind of output a path asks for, the folder's
//! lifetime, free space, refusing to overwrite the input, and recognising a worker's
//! shards already written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::ModelFile;
use crate::reader::Checkpoint;
use crate::writer::shard::{
    merge_index_with, parse_dir_shards, shards_present, OutputFile, OutputLayout, Worker,
    INDEX_NAME,
};
use crate::writer::AtomicFile;

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
    copies: &[(PathBuf, &ModelFile)],
) -> Result<()> {
    let mut needed = copies
        .iter()
        .fold(0u64, |n, (_, f)| n.saturating_add(f.bytes()));
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

/// The files of one run, from the checks before any work to the commit after it: which
/// files this run writes, which a re-run worker keeps, the folder it may have created,
/// an older set's shards to clear, and the index.
pub(crate) struct Output<'l> {
    layout: &'l OutputLayout,
    /// Files to write, in order, each with its path.
    todo: Vec<(PathBuf, &'l OutputFile)>,
    /// Shards a worker found complete and kept.
    reused: Vec<PathBuf>,
    /// Written and synced, committed together at the end.
    pending: Vec<AtomicFile>,
    /// The model folder's files to write beside the shards, with their paths.
    copies: Vec<(PathBuf, &'l ModelFile)>,
    shards: Option<ShardSet>,
}

/// What a sharded output holds beyond its files.
struct ShardSet {
    dir: PathBuf,
    folder: OutputFolder,
    /// Shards of an earlier set with another count, removed once this set is complete.
    stale: Vec<PathBuf>,
    /// Each shard is committed as soon as it is complete (`--shard i/N`).
    worker: bool,
}

/// What [`Output::commit`] leaves on disk.
pub(crate) struct Committed {
    /// The files this run wrote.
    pub outputs: Vec<PathBuf>,
    pub reused: Vec<PathBuf>,
    /// The index, when this run wrote it (or a worker's merge did).
    pub index: Option<PathBuf>,
    /// The model folder's files written beside the shards.
    pub copied: Vec<PathBuf>,
    /// Shards in the whole set (0 for one file), and how many exist now.
    pub shards: usize,
    pub shards_present: usize,
}

impl<'l> Output<'l> {
    /// One file at `out`: refused when it is one of `ckpt`'s files or cannot fit in the
    /// free space (an existing file is replaced only with `force`, when it is written).
    pub(crate) fn file(
        out: &Path,
        layout: &'l OutputLayout,
        metadata: &BTreeMap<String, String>,
        ckpt: &Checkpoint,
    ) -> Result<Output<'l>> {
        check_not_input(ckpt, out)?;
        let file = layout.files.first().ok_or_else(|| Error::Layout {
            detail: "a one-file layout without its file".to_string(),
        })?;
        let todo = vec![(out.to_path_buf(), file)];
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        check_space(parent.unwrap_or(Path::new(".")), &todo, metadata, &[])?;
        Ok(Output {
            layout,
            todo,
            reused: Vec::new(),
            pending: Vec::new(),
            copies: Vec::new(),
            shards: None,
        })
    }

    /// The shards of `layout` in the folder `dir`, created if needed (and removed again
    /// if this run fails and it is still empty). Without a worker, every shard, the
    /// index and an older set's shards must be absent unless `force`. With one, only its
    /// shards are written: one already there with exactly the expected header and size
    /// is kept, any other is refused unless `force`.
    ///
    /// `files` (the model folder's config, tokenizer, …) are written with the index, in
    /// the same commit: by this run, or by the worker that completes the set. The same
    /// rules hold for them as for shards; a worker keeps one already there with the
    /// same bytes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn shards(
        dir: &Path,
        layout: &'l OutputLayout,
        metadata: &BTreeMap<String, String>,
        worker: Option<Worker>,
        force: bool,
        ckpt: &Checkpoint,
        files: &'l [ModelFile],
    ) -> Result<Output<'l>> {
        let index = dir.join(INDEX_NAME);
        let folder = OutputFolder::open(dir, worker.is_none())?;
        for path in layout
            .files
            .iter()
            .map(|f| dir.join(&f.name))
            .chain([index.clone()])
        {
            check_not_input(ckpt, &path)?;
        }
        let stale: Vec<PathBuf> = parse_dir_shards(dir)?
            .into_iter()
            .filter(|(_, n, _)| *n != layout.files.len())
            .map(|(_, _, name)| dir.join(name))
            .filter(|p| check_not_input(ckpt, p).is_ok())
            .collect();
        let mine = layout
            .files
            .iter()
            .enumerate()
            .filter(|(k, _)| worker.is_none_or(|w| w.owns(*k)))
            .map(|(_, f)| (dir.join(&f.name), f));
        let mut copies = Vec::with_capacity(files.len());
        for f in files {
            let path = dir.join(f.name());
            check_not_input(ckpt, &path)?;
            if same_file(&path, f.source()) {
                return Err(Error::OutputIsInput { path });
            }
            let exists = std::fs::symlink_metadata(&path).is_ok();
            if exists && worker.is_some() && !force && !same_bytes(&path, f)? {
                return Err(Error::Shard {
                    path,
                    detail: "exists but is not this conversion's copy of the model folder's file (pass --force to replace it)".to_string(),
                });
            }
            copies.push((path, f));
        }
        let mut reused = Vec::new();
        let mut todo = Vec::new();
        match worker {
            None => {
                todo = mine.collect();
                if !force {
                    let taken = todo
                        .iter()
                        .map(|(p, _)| p.clone())
                        .chain(copies.iter().map(|(p, _)| p.clone()))
                        .chain([index])
                        .chain(stale.iter().cloned())
                        .find(|p| std::fs::symlink_metadata(p).is_ok());
                    if let Some(path) = taken {
                        return Err(Error::OutputExists { path });
                    }
                }
            }
            Some(_) => {
                for (path, f) in mine {
                    if std::fs::symlink_metadata(&path).is_err() {
                        todo.push((path, f));
                    } else if shard_is_complete(&path, f, metadata)? {
                        reused.push(path);
                    } else if force {
                        todo.push((path, f));
                    } else {
                        return Err(Error::Shard {
                            path,
                            detail: "exists but is not this conversion's shard (pass --force to replace it)".to_string(),
                        });
                    }
                }
            }
        }
        check_space(dir, &todo, metadata, &copies)?;
        Ok(Output {
            layout,
            todo,
            reused,
            pending: Vec::new(),
            copies,
            shards: Some(ShardSet {
                dir: dir.to_path_buf(),
                folder,
                stale,
                worker: worker.is_some(),
            }),
        })
    }

    /// The files to write, in order, with their paths.
    pub(crate) fn todo(&self) -> &[(PathBuf, &'l OutputFile)] {
        &self.todo
    }

    /// Takes a written, synced file: a worker's shard appears at once, once `ready`
    /// passes; any other file waits for [`Output::commit`].
    pub(crate) fn durable(
        &mut self,
        file: AtomicFile,
        ready: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        if self.shards.as_ref().is_some_and(|s| s.worker) {
            ready()?;
            file.commit()
        } else {
            self.pending.push(file);
            Ok(())
        }
    }

    /// Makes the run's files appear, once `ready` passes: all at once, the index last so
    /// a loader that finds it finds every shard; a worker that completes the set checks
    /// it and writes the index.
    pub(crate) fn commit(mut self, ready: &dyn Fn() -> Result<()>) -> Result<Committed> {
        ready()?;
        let outputs: Vec<PathBuf> = self.todo.iter().map(|(p, _)| p.clone()).collect();
        let mut done = Committed {
            outputs,
            reused: std::mem::take(&mut self.reused),
            index: None,
            copied: Vec::new(),
            shards: 0,
            shards_present: 0,
        };
        let Some(mut set) = self.shards.take() else {
            AtomicFile::commit_all(self.pending)?;
            return Ok(done);
        };
        let count = self.layout.files.len();
        done.shards = count;
        if set.worker {
            // Shards appear only complete, and a merge writes nothing new but the index,
            // so one look at the folder serves both.
            done.shards_present = shards_present(&set.dir, self.layout);
            if done.shards_present == count {
                let staged = self.stage_copies()?;
                ready()?;
                done.index = Some(merge_index_with(&set.dir, staged)?.index);
                done.copied = self.copies.iter().map(|(p, _)| p.clone()).collect();
            }
        } else {
            let staged = self.stage_copies()?;
            self.pending.extend(staged);
            done.copied = self.copies.iter().map(|(p, _)| p.clone()).collect();
            let index = set.dir.join(INDEX_NAME);
            let mut idx = AtomicFile::create(&index, true)?;
            idx.write_all(&self.layout.index_bytes())?;
            idx.sync()?;
            self.pending.push(idx);
            ready()?;
            AtomicFile::commit_all(std::mem::take(&mut self.pending))?;
            for path in &set.stale {
                // Best effort: the new set is complete; an old file left is only clutter.
                let _ = std::fs::remove_file(path);
            }
            done.index = Some(index);
            done.shards_present = count;
        }
        set.folder.keep();
        Ok(done)
    }

    /// The model folder's files, each written and synced as a temporary file.
    fn stage_copies(&self) -> Result<Vec<AtomicFile>> {
        self.copies
            .iter()
            .map(|(path, f)| stage_copy(path, f))
            .collect()
    }
}

/// Writes `file` to a temporary file for `target`: its rewritten content, or the source's
/// bytes streamed, which must still be as many as when the folder was listed.
pub(crate) fn stage_copy(target: &Path, file: &ModelFile) -> Result<AtomicFile> {
    let mut out = AtomicFile::create(target, true)?;
    match file.content() {
        Some(bytes) => out.write_all(bytes)?,
        None => {
            use std::io::Read;
            let src = file.source();
            let input = open_regular(src)?;
            let mut limited = input.take(file.bytes().saturating_add(1));
            let mut buf = vec![0u8; 1 << 20];
            let mut copied = 0u64;
            loop {
                let n = limited.read(&mut buf).map_err(|e| Error::io(src, e))?;
                if n == 0 {
                    break;
                }
                copied += n as u64;
                out.write_all(&buf[..n])?;
            }
            if copied != file.bytes() {
                return Err(Error::InputChanged {
                    path: src.to_path_buf(),
                    detail: format!(
                        "was {} bytes when the folder was listed, now {copied}",
                        file.bytes()
                    ),
                });
            }
        }
    }
    out.sync()?;
    Ok(out)
}

/// Opens a file for reading, refusing anything but a regular file (a FIFO would block).
fn open_regular(path: &Path) -> Result<std::fs::File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::ModelFile {
            path: path.to_path_buf(),
            detail: "is not a regular file (a FIFO, socket or device); refusing to read it"
                .to_string(),
        });
    }
    std::fs::File::open(path).map_err(|e| Error::io(path, e))
}

/// Whether `path` already holds exactly what `file` would write.
pub(crate) fn same_bytes(path: &Path, file: &ModelFile) -> Result<bool> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.len() != file.bytes() {
        return Ok(false);
    }
    let have = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(match file.content() {
        Some(bytes) => have == bytes,
        None => {
            let src = open_regular(file.source())?;
            let mut want = Vec::new();
            use std::io::Read;
            src.take(file.bytes().saturating_add(1))
                .read_to_end(&mut want)
                .map_err(|e| Error::io(file.source(), e))?;
            have == want
        }
    })
}
