//! Readers: every checkpoint format, opened through a memory map, exposed as tensors
//! that borrow their bytes from the map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::dtype::DType;

/// The formats relayout reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Format {
    Safetensors,
    ShardedSafetensors,
    PyTorchZip,
    /// `torch.save` before PyTorch 1.6 (a pickle stream followed by the storages).
    PyTorchLegacy,
    ShardedPyTorch,
}

/// One tensor of a checkpoint, as stored: a strided view into a storage.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TensorInfo {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    /// Element strides inside the storage (row-major contiguous for safetensors).
    pub(crate) strides: Vec<usize>,
    /// Element offset of the first element inside the storage.
    pub(crate) offset: usize,
    /// Index into the checkpoint's storages.
    pub(crate) storage: usize,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl TensorInfo {
    /// Tensor name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element strides inside the storage (row-major contiguous for safetensors).
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Element offset of the first element inside the storage.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Index into the checkpoint's storages.
    pub fn storage(&self) -> usize {
        self.storage
    }
}

impl TensorInfo {
    /// A contiguous tensor known by name, dtype and shape only: what rules need to plan
    /// a checkpoint from its metadata (e.g. a header fetched without the data).
    pub fn contiguous(name: impl Into<String>, dtype: DType, shape: Vec<usize>) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype,
            strides: layout::contiguous_strides(&shape),
            shape,
            offset: 0,
            storage: 0,
        }
    }

    /// Bytes of the tensor (contiguous); readers refuse shapes whose size overflows
    /// ([`layout::checked_bytes`]), so this is exact for every tensor of a checkpoint.
    pub fn bytes(&self) -> usize {
        layout::checked_bytes(&self.shape, self.dtype.size()).unwrap_or(usize::MAX)
    }
}

/// A byte range of one mapped file that tensors index into.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageRange {
    /// Index of the mapped file.
    pub(crate) file: usize,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl StorageRange {
    /// Index of the mapped file.
    pub fn file(&self) -> usize {
        self.file
    }

    /// First byte in the file.
    pub fn start(&self) -> usize {
        self.start
    }

    /// One past the last byte.
    pub fn end(&self) -> usize {
        self.end
    }
}

/// What a format parser returns for one file: storages as byte ranges of that file's
/// map (file index 0), the tensors over them and the header metadata.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub storages: Vec<std::ops::Range<usize>>,
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

pub(crate) mod expect;
mod guard;
mod msgpack;
pub(crate) mod pytorch;
pub(crate) mod safetensors;
pub(crate) mod sharded;

use std::fs::File;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::layout::{self, LayoutOp};

/// Largest `*.index.json` relayout reads; real ones are a few hundred KiB.
const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Bytes read to tell formats apart.
const SNIFF_BYTES: usize = 16;

/// How to open a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// For training checkpoints (`{"epoch": …, "model": state_dict, …}`): the top-level
    /// key that holds the state dict. Without it, the one entry that is a dict of tensors
    /// is used.
    pub key: Option<String>,
    /// Accept views that expand their storage more than [`MAX_EXPANSION`] times (and
    /// beyond [`EXPANSION_FLOOR`] bytes) through stride-0 axes (`--allow-expand`).
    pub allow_expand: bool,
}

/// A view with stride-0 axes (`tensor.expand`) reads storage bytes many times: a few
/// bytes of file can describe terabytes of tensor. Unless allowed, a tensor may hold at
/// most this many times the bytes of its storage…
pub const MAX_EXPANSION: u64 = 16;
/// …or this many bytes, whichever is larger.
pub const EXPANSION_FLOOR: u64 = 1 << 30;

/// One file of a checkpoint, mapped.
#[derive(Debug)]
pub(crate) struct MappedFile {
    pub path: PathBuf,
    /// Declared before `map`, so it stops watching before the map goes.
    watch: guard::Watch,
    pub map: Mmap,
    identity: guard::FileIdentity,
}

/// An open checkpoint: its files stay mapped, tensors borrow their bytes from the maps
/// and are only read when a backend needs them.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    files: Vec<MappedFile>,
    storages: Vec<StorageRange>,
    tensors: Vec<TensorInfo>,
    /// How many tensors read each storage.
    storage_users: Vec<u32>,
    metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens a checkpoint of any supported format: a safetensors file, a `torch.save`
    /// zip (`.pt`, `.pth`, `.bin`), a sharded checkpoint's `*.index.json`, or the folder
    /// holding one. The format is told by the bytes, not the file name.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        Checkpoint::open_with(path, &OpenOptions::default())
    }

    /// [`Checkpoint::open`] with options.
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Checkpoint> {
        let ckpt = Checkpoint::open_unchecked(path.as_ref(), opts)?;
        if !opts.allow_expand {
            ckpt.check_expansion()?;
        }
        Ok(ckpt)
    }

    /// Refuses a tensor whose bytes exceed its storage's by more than the size policy
    /// allows ([`MAX_EXPANSION`], [`EXPANSION_FLOOR`]).
    fn check_expansion(&self) -> Result<()> {
        for t in &self.tensors {
            let bytes = t.bytes() as u64;
            let storage = self.storages.get(t.storage).map_or(0, |s| s.end - s.start) as u64;
            let limit = storage.saturating_mul(MAX_EXPANSION).max(EXPANSION_FLOOR);
            if bytes > limit {
                return Err(Error::BadTensor {
                    path: self.file_of(t).to_path_buf(),
                    tensor: t.name.clone(),
                    detail: format!(
                        "a view of {bytes} bytes over a storage of {storage} bytes (repeated through stride-0 axes), more than {MAX_EXPANSION}× its storage and {EXPANSION_FLOOR} bytes; pass --allow-expand to convert it anyway"
                    ),
                });
            }
        }
        Ok(())
    }

    fn open_unchecked(path: &Path, opts: &OpenOptions) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            // An index, or the folder's one unsharded checkpoint file.
            let found = sharded::find_checkpoint(path)?;
            if found.is_dir() {
                return Err(Error::UnknownFormat {
                    path: found,
                    detail: "is a folder".to_string(),
                });
            }
            return Checkpoint::open_unchecked(&found, opts);
        }
        let file = map_file(path)?;
        if looks_like_index(path, &file.map) {
            drop(file);
            return sharded::open(path, opts);
        }
        let (format, parsed) = parse_single(&file, opts)?;
        Checkpoint::assemble(path.to_path_buf(), format, vec![(file, parsed)])
    }

    /// Joins parsed files into one checkpoint, checking every tensor against its storage.
    pub(crate) fn assemble(
        path: PathBuf,
        format: Format,
        parts: Vec<(MappedFile, Parsed)>,
    ) -> Result<Checkpoint> {
        let mut ckpt = Checkpoint {
            path,
            format,
            files: Vec::with_capacity(parts.len()),
            storages: Vec::new(),
            tensors: Vec::new(),
            storage_users: Vec::new(),
            metadata: BTreeMap::new(),
        };
        for (file_index, (file, parsed)) in parts.into_iter().enumerate() {
            let base = ckpt.storages.len();
            for range in parsed.storages {
                if range.start > range.end || range.end > file.map.len() {
                    return Err(Error::Truncated {
                        path: file.path.clone(),
                        detail: format!(
                            "storage bytes {}..{} lie beyond the end of the file ({} bytes)",
                            range.start,
                            range.end,
                            file.map.len()
                        ),
                    });
                }
                ckpt.storages.push(StorageRange {
                    file: file_index,
                    start: range.start,
                    end: range.end,
                });
            }
            for mut t in parsed.tensors {
                let storage = t
                    .storage
                    .checked_add(base)
                    .filter(|&s| s < ckpt.storages.len())
                    .ok_or_else(|| Error::BadTensor {
                        path: file.path.clone(),
                        tensor: t.name.clone(),
                        detail: "refers to a storage that does not exist".to_string(),
                    })?;
                t.storage = storage;
                check_tensor(&file.path, &t, &ckpt.storages[storage])?;
                ckpt.tensors.push(t);
            }
            for (k, v) in parsed.metadata {
                ckpt.metadata.entry(k).or_insert(v);
            }
            ckpt.files.push(file);
        }
        ckpt.storage_users = vec![0; ckpt.storages.len()];
        for t in &ckpt.tensors {
            if let Some(n) = ckpt.storage_users.get_mut(t.storage) {
                *n = n.saturating_add(1);
            }
        }
        Ok(ckpt)
    }

    /// The path the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format told from the bytes.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Header metadata (safetensors `__metadata__`), merged over shards.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Paths of the files the checkpoint is made of.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The file `t` is stored in.
    pub fn file_of(&self, t: &TensorInfo) -> &Path {
        self.storages
            .get(t.storage)
            .and_then(|s| self.files.get(s.file))
            .map_or(self.path.as_path(), |f| f.path.as_path())
    }

    /// The bytes of the storage `t` indexes into (its offset and strides are in elements
    /// of this slice). Reading them touches the map: only backends do that.
    pub fn storage_bytes(&self, t: &TensorInfo) -> &[u8] {
        self.storages
            .get(t.storage)
            .and_then(|s| {
                self.files
                    .get(s.file)
                    .and_then(|f| f.map.get(s.start..s.end))
            })
            .unwrap_or(&[])
    }

    /// Where `t`'s storage lies in its file.
    pub(crate) fn storage_range(&self, t: &TensorInfo) -> Option<&StorageRange> {
        self.storages.get(t.storage)
    }

    /// True when `t` is a plain row-major run of its storage.
    pub fn is_contiguous(&self, t: &TensorInfo) -> bool {
        let g = layout::Gather::from_parts(
            t.dtype.size(),
            t.shape.clone(),
            t.strides.clone(),
            t.offset,
        );
        g.is_copy()
    }

    /// True when another tensor reads the same storage (tied weights, views).
    pub fn shares_storage(&self, t: &TensorInfo) -> bool {
        self.storage_users.get(t.storage).is_some_and(|&n| n > 1)
    }

    /// The layout op that reads `t` and permutes its axes by `perm`.
    pub fn layout_op(&self, t: &TensorInfo, perm: &[usize]) -> Result<LayoutOp> {
        LayoutOp::new(
            t.dtype.size(),
            t.shape.clone(),
            t.strides.clone(),
            t.offset,
            perm.to_vec(),
        )
    }

    /// Fails when a read of one of the checkpoint's files faulted because the file
    /// shrank while mapped (the bytes read from there were zeros, not the file's).
    /// Cheap: no system call.
    pub fn check_reads(&self) -> Result<()> {
        for f in &self.files {
            if f.watch.faulted() {
                return Err(Error::InputChanged {
                    path: f.path.clone(),
                    detail: "it shrank while being read".to_string(),
                });
            }
        }
        Ok(())
    }

    /// Fails when any file of the checkpoint changed since it was opened: a read faulted
    /// ([`Checkpoint::check_reads`]), or its size, inode or modification time differ. The
    /// converter calls it before committing an output, so a mixed output never appears.
    pub fn check_unchanged(&self) -> Result<()> {
        self.check_reads()?;
        for f in &self.files {
            f.identity.check(&f.path)?;
        }
        Ok(())
    }

    /// Hints that the maps will be read front to back (unix; elsewhere a no-op).
    pub fn advise_sequential(&self) {
        #[cfg(all(unix, not(relayout_portable)))]
        for f in &self.files {
            // Advice is a hint; failing to give it changes nothing but speed.
            let _ = f.map.advise(memmap2::Advice::Sequential);
        }
    }

    /// Drops the pages of `t`'s storage from this process's resident set once a tensor is
    /// done, so memory does not grow with the checkpoint. The file is unchanged; pages
    /// are read again from the page cache if needed.
    /// Unix only: elsewhere the pages stay until the map is dropped (the OS still
    /// reclaims clean file pages under pressure).
    pub fn release(&self, t: &TensorInfo) {
        #[cfg(all(unix, not(relayout_portable)))]
        self.release_pages(t);
        #[cfg(any(not(unix), relayout_portable))]
        let _ = t;
    }

    #[cfg(all(unix, not(relayout_portable)))]
    fn release_pages(&self, t: &TensorInfo) {
        let Some(s) = self.storages.get(t.storage) else {
            return;
        };
        let Some(f) = self.files.get(s.file) else {
            return;
        };
        let page = page_size();
        let start = s.start / page * page;
        let len = s.end - start;
        if len == 0 {
            return;
        }
        // SAFETY: the map is read-only and private to this checkpoint; DONTNEED on a
        // read-only file mapping only discards clean pages, which are re-read from the
        // file on the next access, so no slice handed out observes different bytes.
        let _ = unsafe {
            f.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
        };
    }
}

#[cfg(all(unix, not(relayout_portable)))]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Checks that every element `t` reaches lies inside its storage.
fn check_tensor(path: &Path, t: &TensorInfo, s: &StorageRange) -> Result<()> {
    let bad = |detail: String| Error::BadTensor {
        path: path.to_path_buf(),
        tensor: t.name.clone(),
        detail,
    };
    if t.strides.len() != t.shape.len() {
        return Err(bad(format!(
            "{} strides for shape {:?}",
            t.strides.len(),
            t.shape
        )));
    }
    let extent = layout::src_extent(&t.shape, &t.strides, t.offset)
        .ok()
        .and_then(|e| e.checked_mul(t.dtype.size()))
        .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
    layout::checked_bytes(&t.shape, t.dtype.size()).ok_or_else(|| {
        bad(format!(
            "shape {:?} of {} overflows 2^63 bytes",
            t.shape, t.dtype
        ))
    })?;
    let have = s.end - s.start;
    if extent > have {
        return Err(bad(format!(
            "shape {:?}, strides {:?} and offset {} reach {extent} bytes but its storage holds {have}",
            t.shape, t.strides, t.offset
        )));
    }
    Ok(())
}

pub(crate) fn map_file(path: &Path) -> Result<MappedFile> {
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            detail: not_regular(&meta),
        });
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let opened = file.metadata().map_err(|e| Error::io(path, e))?;
    let len = opened.len();
    if len == 0 {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            detail: "the file is empty".to_string(),
        });
    }
    // SAFETY: the map is read-only. Another process truncating the file while it is
    // mapped faults reads past the new end (SIGBUS): the watch below turns that into
    // zeros and a mark the converter checks (`guard`); a file written in place is
    // caught by its identity before anything is committed.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(MappedFile {
        path: path.to_path_buf(),
        watch: guard::Watch::new(map.as_ptr(), map.len()),
        map,
        identity: guard::FileIdentity::of(&opened),
    })
}

/// Why a path that is not a regular file cannot be read as one.
pub(crate) fn not_regular(meta: &std::fs::Metadata) -> String {
    #[cfg(all(unix, not(relayout_portable)))]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        let kind = if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else if t.is_dir() {
            "a folder"
        } else {
            "not a regular file"
        };
        format!("{kind}, not a regular file; relayout reads only regular files")
    }
    #[cfg(any(not(unix), relayout_portable))]
    {
        let _ = meta;
        "not a regular file; relayout reads only regular files".to_string()
    }
}

fn looks_like_index(path: &Path, bytes: &[u8]) -> bool {
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".json"));
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    named && first == Some(&b'{')
}

/// Parses one mapped checkpoint file, telling its format from the first bytes.
pub(crate) fn parse_single(file: &MappedFile, opts: &OpenOptions) -> Result<(Format, Parsed)> {
    let head = file
        .map
        .get(..SNIFF_BYTES.min(file.map.len()))
        .unwrap_or(&[]);
    if pytorch::is_zip(head) {
        let parsed = pytorch::parse(&file.path, &file.map, opts.key.as_deref())?;
        return Ok((Format::PyTorchZip, parsed));
    }
    if pytorch::is_legacy(&file.map) {
        // One format for both torch.save layouts: past the parser, nothing reads them
        // differently.
        let parsed = pytorch::parse_legacy(&file.path, &file.map, opts.key.as_deref())?;
        return Ok((Format::PyTorchLegacy, parsed));
    }
    if safetensors::sniff(&file.map) {
        return Ok((
            Format::Safetensors,
            safetensors::parse(&file.path, &file.map)?,
        ));
    }
    Err(Error::UnknownFormat {
        path: file.path.clone(),
        detail: "neither safetensors (8-byte header length, then a JSON header) nor a torch.save zip archive".to_string(),
    })
}
