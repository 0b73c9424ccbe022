//! Streaming safetensors writer: the header is computed from the plan before any tensor
//! is produced, then tensor bytes are appended in header order.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::{AtomicFile, BlockStream};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Alignment of the data section; the format requires the header padded to 8 bytes.
const HEADER_ALIGN: usize = 8;

/// One tensor of the output header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEntry {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl HeaderEntry {
    /// A tensor's header entry; its size is checked when it is written.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>) -> HeaderEntry {
        HeaderEntry {
            name: name.into(),
            dtype,
            shape,
        }
    }

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
}

impl HeaderEntry {
    /// Bytes of the tensor's data; saturates at `usize::MAX` for a shape that overflows,
    /// which the writer refuses ([`HeaderEntry::checked_bytes`]).
    pub fn bytes(&self) -> usize {
        self.checked_bytes().unwrap_or(usize::MAX)
    }

    /// Bytes of the tensor's data, `None` when its shape overflows
    /// ([`crate::layout::checked_bytes`]).
    pub fn checked_bytes(&self) -> Option<usize> {
        crate::layout::checked_bytes(&self.shape, self.dtype.size())
    }
}

/// Bytes the writer buffers per block when no capacity is given.
pub const DEFAULT_BLOCK_BYTES: usize = 8 << 20;

/// Writes a safetensors file tensor by tensor; nothing appears at the target path until
/// [`SafetensorsWriter::finish`] succeeds. Bytes go through a `BlockStream`: a
/// background thread writes full blocks (with `O_DIRECT` where possible) while the
/// caller fills the next one.
#[derive(Debug)]
pub struct SafetensorsWriter {
    out: AtomicFile,
    stream: BlockStream,
    /// Byte size of each tensor, in header order.
    sizes: Vec<usize>,
    /// Index of the tensor being written and bytes of it written so far.
    current: usize,
    written: usize,
    /// Earlier files of [`SafetensorsWriter::next_file`], with the stream's id for each,
    /// until the stream reports them durable.
    closing: Vec<(u64, AtomicFile)>,
}

impl SafetensorsWriter {
    /// Creates the output (refusing an existing path unless `force`) and writes the header.
    pub fn create(
        path: &Path,
        entries: &[HeaderEntry],
        metadata: &BTreeMap<String, String>,
        force: bool,
    ) -> Result<SafetensorsWriter> {
        SafetensorsWriter::with_capacity(path, entries, metadata, force, DEFAULT_BLOCK_BYTES)
    }

    /// [`SafetensorsWriter::create`] whose [`SafetensorsWriter::reserve`] hands out up to
    /// `capacity` bytes at a time.
    pub fn with_capacity(
        path: &Path,
        entries: &[HeaderEntry],
        metadata: &BTreeMap<String, String>,
        force: bool,
        capacity: usize,
    ) -> Result<SafetensorsWriter> {
        let header = header_bytes(entries, metadata)?;
        let mut out = AtomicFile::create(path, force)?;
        let direct = out.try_direct();
        let file = out.file()?.try_clone().map_err(|e| Error::io(path, e))?;
        let mut stream = BlockStream::new(out.temp_path(), file, direct, capacity)?;
        stream.write_all(&(header.len() as u64).to_le_bytes())?;
        stream.write_all(&header)?;
        let mut w = SafetensorsWriter {
            out,
            stream,
            sizes: entries.iter().map(HeaderEntry::bytes).collect(),
            current: 0,
            written: 0,
            closing: Vec::new(),
        };
        w.skip_finished();
        Ok(w)
    }

    /// Ends the current file (every tensor must be written) and starts the next one at
    /// `path`, without draining: the stream's thread completes and syncs the current file
    /// while the caller fills the next, so a set of files is written as fast as one.
    /// Finished files come back from [`SafetensorsWriter::take_durable`] and
    /// [`SafetensorsWriter::finish_all_uncommitted`], still uncommitted.
    pub fn next_file(
        &mut self,
        path: &Path,
        entries: &[HeaderEntry],
        metadata: &BTreeMap<String, String>,
        force: bool,
    ) -> Result<()> {
        self.check_complete()?;
        let header = header_bytes(entries, metadata)?;
        let mut out = AtomicFile::create(path, force)?;
        let direct = out.try_direct();
        let file = out.file()?.try_clone().map_err(|e| Error::io(path, e))?;
        let id = self.stream.switch(out.temp_path(), file, direct)?;
        let done = std::mem::replace(&mut self.out, out);
        self.closing.push((id, done));
        self.stream
            .write_all(&(header.len() as u64).to_le_bytes())?;
        self.stream.write_all(&header)?;
        self.sizes = entries.iter().map(HeaderEntry::bytes).collect();
        self.current = 0;
        self.written = 0;
        self.skip_finished();
        Ok(())
    }

    /// Files of earlier [`SafetensorsWriter::next_file`] calls that are now complete and
    /// synced, ready to commit (dropping one removes it).
    pub fn take_durable(&mut self) -> Result<Vec<AtomicFile>> {
        let closed = self.stream.take_closed()?;
        let mut ready = Vec::new();
        let mut still = Vec::with_capacity(self.closing.len());
        for (id, mut f) in self.closing.drain(..) {
            if closed.contains(&id) {
                f.assume_synced()?;
                ready.push(f);
            } else {
                still.push((id, f));
            }
        }
        self.closing = still;
        Ok(ready)
    }

    /// [`SafetensorsWriter::finish_uncommitted`] for a writer that went through several
    /// files: all of them not yet taken, complete and synced, in order.
    pub fn finish_all_uncommitted(mut self) -> Result<Vec<AtomicFile>> {
        self.check_complete()?;
        let closing = std::mem::take(&mut self.closing);
        let last = self.finish_uncommitted()?;
        // The stream finished: its thread closed every earlier file.
        let mut all = Vec::with_capacity(closing.len() + 1);
        for (_, mut f) in closing {
            f.assume_synced()?;
            all.push(f);
        }
        all.push(last);
        Ok(all)
    }

    /// Whether the output bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.out.is_direct()
    }

    /// The next `len` bytes of the current tensor, for the caller to fill in place before
    /// its next call (no copy); `len` is at most the writer's capacity.
    pub fn reserve(&mut self, len: usize) -> Result<&mut [u8]> {
        self.account(len)?;
        self.stream.reserve(len)
    }

    /// Appends the next bytes of the current tensor (a whole tensor or a piece of it).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.account(bytes.len())?;
        self.stream.write_all(bytes)
    }

    /// Checks every tensor was written in full, then commits the file.
    pub fn finish(self) -> Result<()> {
        self.finish_uncommitted()?.commit()
    }

    /// Checks every tensor was written in full and makes the file durable, but leaves it
    /// temporary: the caller commits it, alone or with others
    /// ([`AtomicFile::commit_all`]); dropping it removes it.
    pub fn finish_uncommitted(self) -> Result<AtomicFile> {
        self.check_complete()?;
        self.stream.finish()?;
        let mut out = self.out;
        out.sync()?;
        Ok(out)
    }

    /// Fails unless every tensor of the current file was written in full.
    fn check_complete(&self) -> Result<()> {
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
        Ok(())
    }

    /// Counts `len` more bytes against the tensors of the header.
    fn account(&mut self, mut len: usize) -> Result<()> {
        let left: usize = self
            .sizes
            .get(self.current..)
            .map_or(0, |rest| rest.iter().sum::<usize>() - self.written);
        if len > left {
            return Err(Error::io(
                self.out.target(),
                std::io::Error::other(format!(
                    "writer got {len} bytes with {left} bytes of tensor data left"
                )),
            ));
        }
        while len > 0 {
            let in_this = (self.sizes[self.current] - self.written).min(len);
            self.written += in_this;
            len -= in_this;
            self.skip_finished();
        }
        Ok(())
    }

    /// Moves past finished (and zero-byte) tensors.
    fn skip_finished(&mut self) {
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

/// The JSON header, padded with spaces to the data alignment. Refuses what no reader
/// could read back: a tensor named `__metadata__` or twice, a shape whose size
/// overflows, a data section over 2^63 bytes.
pub(crate) fn header_bytes(
    entries: &[HeaderEntry],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let bad = |name: &str, detail: &str| Error::Layout {
        detail: format!("output tensor '{name}': {detail}"),
    };
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
        if e.name == "__metadata__" {
            return Err(bad(
                &e.name,
                "the name is reserved for the header's metadata",
            ));
        }
        let end = e
            .checked_bytes()
            .and_then(|b| offset.checked_add(b))
            .filter(|&end| end as u64 <= crate::layout::MAX_TENSOR_BYTES)
            .ok_or_else(|| bad(&e.name, "the data section would exceed 2^63 bytes"))?;
        let previous = map.insert(
            e.name.clone(),
            json!({ "dtype": e.dtype.safetensors_name(), "shape": e.shape, "data_offsets": [offset, end] }),
        );
        if previous.is_some() {
            return Err(bad(&e.name, "the name is given twice"));
        }
        offset = end;
    }
    let mut bytes = Value::Object(map).to_string().into_bytes();
    let pad = (HEADER_ALIGN - bytes.len() % HEADER_ALIGN) % HEADER_ALIGN;
    bytes.extend(std::iter::repeat_n(b' ', pad));
    Ok(bytes)
}
