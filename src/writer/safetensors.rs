//! Streaming safetensors writer: the header is computed from the plan before any tensor
//! is produced, then tensor bytes are appended in header order.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::AtomicFile;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Alignment of the data section; the format requires the header padded to 8 bytes.
const HEADER_ALIGN: usize = 8;

/// One tensor of the output header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl HeaderEntry {
    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Writes a safetensors file tensor by tensor; nothing appears at the target path until
/// [`SafetensorsWriter::finish`] succeeds.
#[derive(Debug)]
pub struct SafetensorsWriter {
    out: AtomicFile,
    /// Byte size of each tensor, in header order.
    sizes: Vec<usize>,
    /// Index of the tensor being written and bytes of it written so far.
    current: usize,
    written: usize,
}

impl SafetensorsWriter {
    /// Creates the output (refusing an existing path unless `force`) and writes the header.
    pub fn create(
        path: &Path,
        entries: &[HeaderEntry],
        metadata: &BTreeMap<String, String>,
        force: bool,
    ) -> Result<SafetensorsWriter> {
        let header = header_bytes(entries, metadata);
        let mut out = AtomicFile::create(path, force)?;
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut w = SafetensorsWriter {
            out,
            sizes: entries.iter().map(HeaderEntry::bytes).collect(),
            current: 0,
            written: 0,
        };
        w.skip_empty();
        Ok(w)
    }

    /// Appends the next bytes of the current tensor (a whole tensor or a piece of it).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let left = self
            .sizes
            .get(self.current)
            .map_or(0, |&size| size - self.written);
        if bytes.len() > left {
            return Err(Error::io(
                self.out.target(),
                std::io::Error::other(format!(
                    "writer got {} bytes for tensor #{} with {left} bytes left",
                    bytes.len(),
                    self.current
                )),
            ));
        }
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        self.skip_empty();
        Ok(())
    }

    /// The open output file, for callers that write with their own calls (e.g. `pwrite`).
    pub fn atomic_file(&mut self) -> &mut AtomicFile {
        &mut self.out
    }

    /// Checks every tensor was written in full, then commits the file.
    pub fn finish(self) -> Result<()> {
        if self.current != self.sizes.len() {
            return Err(Error::io(
                self.out.target(),
                std::io::Error::other(format!(
                    "only {} of {} tensors were written",
                    self.current,
                    self.sizes.len()
                )),
            ));
        }
        self.out.commit()
    }

    /// Moves past finished (and zero-byte) tensors.
    fn skip_empty(&mut self) {
        while self
            .sizes
            .get(self.current)
            .is_some_and(|&s| s == self.written)
        {
            self.current += 1;
            self.written = 0;
        }
    }
}

/// The JSON header, padded with spaces to the data alignment.
pub(crate) fn header_bytes(
    entries: &[HeaderEntry],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        map.insert("__metadata__".to_string(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for e in entries {
        let end = offset + e.bytes();
        map.insert(
            e.name.clone(),
            json!({ "dtype": e.dtype.safetensors_name(), "shape": e.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut bytes = Value::Object(map).to_string().into_bytes();
    let pad = (HEADER_ALIGN - bytes.len() % HEADER_ALIGN) % HEADER_ALIGN;
    bytes.extend(std::iter::repeat_n(b' ', pad));
    bytes
}
