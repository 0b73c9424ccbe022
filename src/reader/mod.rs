//! Readers: every checkpoint format, opened through a memory map, exposed as tensors
//! that borrow their bytes from the map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::dtype::DType;

/// The formats relayout reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    ShardedSafetensors,
    PyTorchZip,
    ShardedPyTorch,
}

/// One tensor of a checkpoint, as stored: a strided view into a storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Element strides inside the storage (row-major contiguous for safetensors).
    pub strides: Vec<usize>,
    /// Element offset of the first element inside the storage.
    pub offset: usize,
    /// Index into the checkpoint's storages.
    pub storage: usize,
}

/// A byte range of one mapped file that tensors index into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRange {
    /// Index of the mapped file.
    pub file: usize,
    pub start: usize,
    pub end: usize,
}

/// What a format parser returns for one file: storages as byte ranges of that file's
/// map (file index 0), the tensors over them and the header metadata.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub storages: Vec<std::ops::Range<usize>>,
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

