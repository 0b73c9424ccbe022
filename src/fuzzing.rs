//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, never on in a
//! release build): each hands raw bytes to one crate-private reader. They add nothing
//! but temp files where a reader needs a path, so a panic, hang or runaway allocation
//! below any of them is a bug in the reader it calls.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::reader::pytorch::{pickle, zip::Archive};
use crate::reader::{safetensors, sharded, Checkpoint, OpenOptions};

/// Name the index is written under: sharded checkpoints are found by this suffix.
const INDEX_NAME: &str = "model.safetensors.index.json";
/// Name a whole-file input is written under; not `.json`, so it is never taken for an index.
const CHECKPOINT_NAME: &str = "checkpoint.bin";

/// The safetensors header parser over a whole file's bytes.
pub fn safetensors_header(data: &[u8]) -> Result<()> {
    safetensors::parse(Path::new("fuzz.safetensors"), data).map(drop)
}

/// The zip reader: the central directory, then every entry's local header and data range.
pub fn zip(data: &[u8]) -> Result<()> {
    let archive = Archive::open(Path::new("fuzz.zip"), data)?;
    archive
        .entries()
        .iter()
        .try_for_each(|entry| archive.data(entry).map(drop))
}

/// The restricted pickle VM over a `data.pkl`.
pub fn pickle(data: &[u8]) -> Result<()> {
    pickle::load(Path::new("data.pkl"), data).map(drop)
}

/// Writes `index` and the `shards` (file name, bytes) into a fresh folder and opens the
/// index: JSON parsing, shard name checks, every shard's reader and the checks of the
/// weight map against what the shards hold.
pub fn sharded_index(index: &[u8], shards: &[(&str, &[u8])]) -> Result<Opened> {
    let dir = Scratch::new()?;
    for (name, bytes) in shards {
        dir.write(name, bytes)?;
    }
    let path = dir.write(INDEX_NAME, index)?;
    let checkpoint = sharded::open(&path, &OpenOptions::default())?;
    Ok(Opened {
        checkpoint,
        _dir: dir,
    })
}

/// [`Checkpoint::open`] on `data` written to a file.
pub fn checkpoint(data: &[u8]) -> Result<Opened> {
    let dir = Scratch::new()?;
    let path = dir.write(CHECKPOINT_NAME, data)?;
    let checkpoint = Checkpoint::open(path)?;
    Ok(Opened {
        checkpoint,
        _dir: dir,
    })
}

/// A checkpoint opened from temp files, which stay until it is dropped: the checkpoint
/// checks before committing that its files are still the ones it mapped.
pub struct Opened {
    // Dropped first: the maps go before their files.
    checkpoint: Checkpoint,
    _dir: Scratch,
}

impl std::ops::Deref for Opened {
    type Target = Checkpoint;

    fn deref(&self) -> &Checkpoint {
        &self.checkpoint
    }
}

/// A folder of its own under the temp dir, removed on drop. Each call gets a new one so
/// no file of an earlier input can change how a later one is read.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("relayout-fuzz-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Scratch(path))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // A leftover folder in the temp dir is harmless; failing to remove it is not an
        // input's fault.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
