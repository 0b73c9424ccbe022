//! A restricted pickle VM for the pickles of torch.save files: the `data.pkl` of a zip
//! archive, or the stream of pickles of the legacy format.
//!
//! It understands the opcodes torch.save emits (protocols 2 to 5) and resolves only an
//! allowlist of globals into values it implements itself (`OrderedDict`, the tensor
//! rebuild functions, the storage types). Any other global is an error the moment it is
//! loaded; nothing is ever imported or called.
//!
//! Memory is bounded by what the pickle holds, not by what it makes the VM do:
//! - a [`Value`] is a 16-byte `Copy` handle; strings are spans of the pickle itself
//!   (checked once, never copied), bytes are not kept at all;
//! - tuples are spans of one shared item arena; dict and list items go to one arena
//!   each, tagged with their container, and are grouped when the pickle ends, so an
//!   empty container costs nothing;
//! - every arena, the stack, the memo and the marks grow only through [`Budget`], which
//!   counts the bytes of each allocation against [`VM_BYTES_FLOOR`] plus one byte per
//!   [`PICKLE_BYTES_PER_VM_BYTE`] bytes of pickle read, and never more than
//!   [`MAX_VM_BYTES`].
//!
//! Nothing refers to anything by pointer and nothing is freed before the end, so hostile
//! nesting can neither recurse nor leak.

use std::collections::HashMap;
use std::mem::size_of;
use std::ops::Range;
use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Larger than the data.pkl of any real checkpoint (about 150 bytes per tensor).
pub(crate) const MAX_PICKLE_BYTES: usize = 256 << 20;
/// Hard cap on all the VM allocates for one file, whatever its pickles: a backstop, as
/// the limits below stay under it for every file the size limits let through.
const MAX_VM_BYTES: usize = 1 << 30;
/// What any pickle may allocate: a torch state dict takes 6 to 7 bytes per byte of
/// pickle (about 110 bytes per tensor), so this covers ~20 MiB (~190 000 tensors).
const VM_BYTES_FLOOR: usize = 128 << 20;
/// Beyond the floor, the VM may allocate one byte per this many bytes of pickle read. The
/// largest data.pkl (256 MiB) then gets 192 MiB: with the pickle itself resident, the
/// process stays under twice the pickle's size.
const PICKLE_BYTES_PER_VM_BYTE: usize = 4;
/// Deeper than any torch stack (a state dict pushes a few values per tensor in batches
/// of 1000 SETITEMS).
const MAX_STACK: usize = 1 << 20;
/// Nested MARKs bound the nesting of containers being built.
const MAX_MARKS: usize = 256;
/// Memo entries: torch memoizes a handful of values per tensor.
const MAX_MEMO: usize = 1 << 24;
/// How far past the highest memo index a BINPUT may jump. Python's pickler numbers memo
/// entries consecutively; the slack tolerates other writers without letting one opcode
/// allocate a huge memo.
const MEMO_SLACK: usize = 1 << 10;
/// Strings in torch pickles are names and keys; bytes objects are rare and small.
const MAX_STRING: usize = 64 << 20;
/// Module and attribute names of a GLOBAL or STACK_GLOBAL.
const MAX_GLOBAL_NAME: usize = 256;
/// Storage and view keys: torch writes short decimal numbers. Every persistent id reads
/// and hashes its key, so this bounds that work however often the memo repeats one.
const MAX_STORAGE_KEY: usize = 256;
/// Tensor rank limit.
pub(crate) const MAX_RANK: usize = 32;
/// Slots a hash map's table holds per entry, at most (just after it doubles, at a load
/// of 7/8), rounded up: what each storage key costs its map.
const MAP_SLOTS_PER_ENTRY: usize = 3;
/// The smallest capacity an arena grows to, so tiny pickles do not reallocate per push.
const MIN_CAPACITY: usize = 4;

/// A run of `len` elements from `start`: of the pickle for strings, of the tuple items for
/// tuples, of the dims for tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> Range<usize> {
        let start = self.start as usize;
        start..start + self.len as usize
    }
}

/// A pickled value: a handle into the pickle or the arenas of [`Unpickled`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64; its value is never needed.
    BigInt,
    Float(f64),
    /// UTF-8 text, a span of the pickle.
    Str(Span),
    /// A bytes object; its content is never needed, so it is not kept.
    Bytes,
    /// A span of [`Unpickled`]'s tuple items.
    Tuple(Span),
    List(u32),
    Dict(u32),
    Global(Global),
    /// Index into [`Unpickled::views`].
    Storage(u32),
    /// Index into [`Unpickled::tensors`].
    Tensor(u32),
}

// Every stack slot, memo entry and tuple item is one Value: keep it two words.
const _: () = assert!(size_of::<Value>() == 16);

impl Value {
    /// A short name of the value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// The allowlisted globals, as values the VM implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    /// `_codecs.encode`: protocol 2 pickles `bytes` as `encode(str, "latin1")`.
    CodecsEncode,
    StorageType(DType),
}

impl Global {
    fn name(self) -> &'static str {
        match self {
            Global::OrderedDict => "collections.OrderedDict",
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::RebuildTensor => "torch._utils._rebuild_tensor",
            Global::RebuildParameter => "torch._utils._rebuild_parameter",
            Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Global::CodecsEncode => "_codecs.encode",
            Global::StorageType(_) => "a torch storage type",
        }
    }
}

/// The shape of the persistent ids that name storages, which differs between formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PersistentIds {
    /// `('storage', storage_type, key, location, numel)`.
    Zip,
    /// `('storage', storage_type, root_key, location, numel, view_metadata)`, where
    /// `view_metadata` is None or `(view_key, offset, numel)` in elements of the root.
    Legacy,
}

/// A storage a persistent id names: `numel` elements of `dtype` under `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StorageRef<'a> {
    /// A span of the pickle: torch writes keys as strings.
    pub key: &'a str,
    pub dtype: DType,
    pub numel: usize,
    /// The index in [`Unpickled::views`] of the view of the whole storage.
    whole: usize,
}

/// What a tensor's storage argument is: `numel` elements of the storage `root`
/// (an index into [`Unpickled::storages`]) from element `offset`. The zip format only
/// has whole storages; the legacy format also has views of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StorageView {
    pub root: usize,
    pub offset: usize,
    pub numel: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it, not yet validated against its storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawTensor {
    /// Index into [`Unpickled::views`].
    pub storage: usize,
    pub offset: i64,
    /// The sizes then the strides, in [`Unpickled`]'s dims.
    dims: Span,
}

/// One item of a dict: the dict it belongs to, its insertion order, the pair.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DictItem {
    owner: u32,
    seq: u32,
    pub key: Value,
    pub value: Value,
}

/// One item of a list.
#[derive(Clone, Copy, Debug)]
struct ListItem {
    owner: u32,
    seq: u32,
    value: Value,
}

/// What the pickles of one file built: the arenas the values refer into.
#[derive(Debug, Default)]
pub(crate) struct Unpickled<'a> {
    /// The bytes strings are spans of.
    data: &'a [u8],
    tuple_items: Vec<Value>,
    /// Grouped by owner, in insertion order, once a pickle has ended.
    dict_items: Vec<DictItem>,
    list_items: Vec<ListItem>,
    dims: Vec<i64>,
    pub storages: Vec<StorageRef<'a>>,
    pub views: Vec<StorageView>,
    pub tensors: Vec<RawTensor>,
    storage_by_key: HashMap<&'a str, usize>,
    /// Only the legacy format's views have keys of their own.
    view_by_key: HashMap<&'a str, usize>,
}

impl<'a> Unpickled<'a> {
    /// The text of a str value.
    pub fn str(&self, v: &Value) -> Option<&'a str> {
        let data: &'a [u8] = self.data;
        match v {
            Value::Str(s) => data
                .get(s.range())
                .and_then(|b| std::str::from_utf8(b).ok()),
            _ => None,
        }
    }

    /// Whether `v` is the str `s`: compares bytes, so a long string is not read to
    /// find it is not a short one.
    pub fn str_is(&self, v: &Value, s: &str) -> bool {
        match v {
            Value::Str(span) => self.data.get(span.range()) == Some(s.as_bytes()),
            _ => false,
        }
    }

    /// The items of a dict value, in insertion order.
    pub fn dict(&self, v: &Value) -> Option<&[DictItem]> {
        let Value::Dict(id) = *v else {
            return None;
        };
        let lo = self.dict_items.partition_point(|e| e.owner < id);
        let hi = self.dict_items.partition_point(|e| e.owner <= id);
        self.dict_items.get(lo..hi)
    }

    /// The items of a list value, in order.
    pub fn list(&self, v: &Value) -> Option<impl Iterator<Item = &Value>> {
        let Value::List(id) = *v else {
            return None;
        };
        let lo = self.list_items.partition_point(|e| e.owner < id);
        let hi = self.list_items.partition_point(|e| e.owner <= id);
        Some(self.list_items.get(lo..hi)?.iter().map(|e| &e.value))
    }

    fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Tuple(s) => self.tuple_items.get(s.range()),
            _ => None,
        }
    }

    /// The sizes of a tensor.
    pub fn shape(&self, t: &RawTensor) -> &[i64] {
        let dims = self.dims.get(t.dims.range()).unwrap_or_default();
        dims.get(..dims.len() / 2).unwrap_or_default()
    }

    /// The strides of a tensor, in elements.
    pub fn strides(&self, t: &RawTensor) -> &[i64] {
        let dims = self.dims.get(t.dims.range()).unwrap_or_default();
        dims.get(dims.len() / 2..).unwrap_or_default()
    }

    /// The index in [`Unpickled::storages`] of the storage named `key`.
    pub fn storage_index(&self, key: &str) -> Option<usize> {
        self.storage_by_key.get(key).copied()
    }
}

/// Runs the one pickle `pkl` (a zip archive's data.pkl) of the file `path`; returns
/// what it built and the object it holds.
pub(crate) fn load<'a>(path: &'a Path, pkl: &'a [u8]) -> Result<(Unpickled<'a>, Value)> {
    if pkl.len() > MAX_PICKLE_BYTES {
        return Err(Error::Pickle {
            path: path.to_path_buf(),
            detail: format!(
                "data.pkl of {} bytes exceeds the limit of {MAX_PICKLE_BYTES} bytes",
                pkl.len()
            ),
        });
    }
    let mut vm = Unpickler::new(path, pkl, PersistentIds::Zip);
    let root = vm.load_next()?;
    Ok((vm.finish(), root))
}

/// Why the budget refused an allocation.
#[derive(Debug)]
struct OverBudget {
    wanted: usize,
    limit: usize,
}

/// The bytes the VM has allocated, against a limit that grows with the pickle read.
#[derive(Debug, Default)]
struct Budget {
    used: usize,
    /// Pickle bytes read so far, over every pickle of the file.
    read: usize,
}

impl Budget {
    fn limit(&self) -> usize {
        VM_BYTES_FLOOR
            .saturating_add(self.read / PICKLE_BYTES_PER_VM_BYTE)
            .min(MAX_VM_BYTES)
    }

    fn charge(&mut self, bytes: usize) -> Result<(), OverBudget> {
        let limit = self.limit();
        match self.used.checked_add(bytes) {
            Some(used) if used <= limit => {
                self.used = used;
                Ok(())
            }
            _ => Err(OverBudget {
                wanted: bytes,
                limit,
            }),
        }
    }

    /// Makes room for `additional` more elements in `v`, charging the capacity it adds.
    /// Capacity doubles while the budget allows, then grows only to what is left of it.
    fn reserve<T>(&mut self, v: &mut Vec<T>, additional: usize) -> Result<(), OverBudget> {
        let need = v.len().saturating_add(additional);
        let cap = v.capacity();
        if need <= cap {
            return Ok(());
        }
        let size = size_of::<T>().max(1);
        let left = self.limit().saturating_sub(self.used) / size;
        let new_cap = need
            .max(cap.saturating_mul(2))
            .max(MIN_CAPACITY)
            .min(cap.saturating_add(left))
            .max(need);
        self.charge((new_cap - cap).saturating_mul(size))?;
        v.reserve_exact(new_cap - v.len());
        Ok(())
    }
}

/// The VM over the pickles of one file. One after another they share the arenas and
/// the budget; each has its own stack and memo, as each `pickle.load` does.
pub(crate) struct Unpickler<'a> {
    path: &'a Path,
    data: &'a [u8],
    ids: PersistentIds,
    pos: usize,
    /// Where the pickle being run must end: the data's end, or [`MAX_PICKLE_BYTES`]
    /// past its start.
    end: usize,
    /// Offset of the opcode being run, for error messages.
    op_pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: Vec<Option<Value>>,
    dicts: u32,
    lists: u32,
    budget: Budget,
    out: Unpickled<'a>,
}

impl<'a> Unpickler<'a> {
    /// A VM over the pickles of `data`, the first one at its start.
    pub fn new(path: &'a Path, data: &'a [u8], ids: PersistentIds) -> Unpickler<'a> {
        Unpickler {
            path,
            data,
            ids,
            pos: 0,
            end: 0,
            op_pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: Vec::new(),
            dicts: 0,
            lists: 0,
            budget: Budget::default(),
            out: Unpickled {
                data,
                ..Unpickled::default()
            },
        }
    }

    /// Where the next pickle would start: the end of the last one run.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// What the pickles run so far built (grouped, ready to read).
    pub fn built(&self) -> &Unpickled<'a> {
        &self.out
    }

    /// What the pickles built, once the VM is done.
    pub fn finish(self) -> Unpickled<'a> {
        self.out
    }

    /// Bytes the VM has allocated, as its budget counts them.
    #[cfg(test)]
    pub fn vm_bytes(&self) -> usize {
        self.budget.used
    }

    /// Runs the next pickle of the data and returns the object it holds.
    pub fn load_next(&mut self) -> Result<Value> {
        self.end = self
            .data
            .len()
            .min(self.pos.saturating_add(MAX_PICKLE_BYTES));
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        let dicts_before = self.out.dict_items.len();
        let lists_before = self.out.list_items.len();
        let root = self.run()?;
        // Containers of this pickle are newer than any before it, so only its own items
        // need grouping. Sorting in place keeps the budget's count exact.
        if let Some(items) = self.out.dict_items.get_mut(dicts_before..) {
            items.sort_unstable_by_key(|e| (e.owner, e.seq));
        }
        if let Some(items) = self.out.list_items.get_mut(lists_before..) {
            items.sort_unstable_by_key(|e| (e.owner, e.seq));
        }
        Ok(root)
    }

    fn err(&self, detail: impl Into<String>) -> Error {
        Error::Pickle {
            path: self.path.to_path_buf(),
            detail: format!("at byte {}: {}", self.op_pos, detail.into()),
        }
    }

    fn over(&self, e: OverBudget) -> Error {
        self.err(format!(
            "VM memory would exceed its limit of {} bytes ({} used, {} more wanted); the limit is {} MiB plus one byte per {PICKLE_BYTES_PER_VM_BYTE} bytes of pickle read, at most {} MiB",
            e.limit,
            self.budget.used,
            e.wanted,
            VM_BYTES_FLOOR >> 20,
            MAX_VM_BYTES >> 20
        ))
    }

    /// The error for reading past the pickle's end, or past its size limit.
    fn past_end(&self, what: String) -> Error {
        if self.end < self.data.len() {
            self.err(format!(
                "pickle runs past the limit of {MAX_PICKLE_BYTES} bytes"
            ))
        } else {
            self.err(what)
        }
    }

    fn take(&mut self, n: usize) -> Result<Range<usize>> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.end)
            .ok_or_else(|| self.past_end(format!("argument of {n} bytes runs past the end")))?;
        let r = self.pos..end;
        self.pos = end;
        Ok(r)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let r = self.take(N)?;
        self.data
            .get(r)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| self.err("argument runs past the end"))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len_u64(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.err(format!("length {n} overflows")))
    }

    /// A span whose end, too, fits in 32 bits.
    fn span(&self, start: usize, len: usize) -> Result<Span> {
        let end = start.checked_add(len).and_then(|e| u32::try_from(e).ok());
        match (u32::try_from(start), u32::try_from(len), end) {
            (Ok(start), Ok(len), Some(_)) => Ok(Span { start, len }),
            _ => Err(self.err("offset beyond 4 GiB")),
        }
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("stack exceeds {MAX_STACK} values")));
        }
        self.budget
            .reserve(&mut self.stack, 1)
            .map_err(|e| self.over(e))?;
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("pop from an empty stack"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err("pop from an empty stack"))
    }

    fn top(&self) -> Result<Value> {
        match self.stack.last() {
            Some(&v) if self.stack.len() > self.floor() => Ok(v),
            _ => Err(self.err("empty stack")),
        }
    }

    /// Where the values above the last MARK start; the mark is gone, the values stay.
    fn pop_mark(&mut self) -> Result<usize> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        Ok(mark.min(self.stack.len()))
    }

    /// Where the top `n` values start, all of them above the last MARK.
    fn top_n(&self, n: usize) -> Result<usize> {
        self.stack
            .len()
            .checked_sub(n)
            .filter(|&from| from >= self.floor())
            .ok_or_else(|| self.err("pop from an empty stack"))
    }

    /// The container below the values from `from`, which must be above the last MARK.
    fn target(&self, from: usize) -> Result<Value> {
        match from.checked_sub(1).and_then(|i| self.stack.get(i)) {
            Some(&v) if from > self.floor() => Ok(v),
            _ => Err(self.err("empty stack")),
        }
    }

    /// Moves the values from `from` into a new tuple.
    fn tuple_from(&mut self, from: usize) -> Result<Value> {
        let n = self.stack.len().saturating_sub(from);
        self.budget
            .reserve(&mut self.out.tuple_items, n)
            .map_err(|e| self.over(e))?;
        let start = self.out.tuple_items.len();
        let span = self.span(start, n)?;
        self.out.tuple_items.extend(self.stack.drain(from..));
        Ok(Value::Tuple(span))
    }

    fn new_dict(&mut self) -> Result<Value> {
        let id = self.dicts;
        self.dicts = id
            .checked_add(1)
            .ok_or_else(|| self.err("more than 2^32 dicts"))?;
        Ok(Value::Dict(id))
    }

    fn new_list(&mut self) -> Result<Value> {
        let id = self.lists;
        self.lists = id
            .checked_add(1)
            .ok_or_else(|| self.err("more than 2^32 lists"))?;
        Ok(Value::List(id))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = self.top()?;
        let i = idx as usize;
        if i >= MAX_MEMO || i > self.memo.len().saturating_add(MEMO_SLACK) {
            return Err(self.err(format!(
                "memo index {idx} is beyond {} entries or the limit of {MAX_MEMO}",
                self.memo.len()
            )));
        }
        if i >= self.memo.len() {
            let more = i + 1 - self.memo.len();
            self.budget
                .reserve(&mut self.memo, more)
                .map_err(|e| self.over(e))?;
            self.memo.resize(i + 1, None);
        }
        if let Some(slot) = self.memo.get_mut(i) {
            *slot = Some(v);
        }
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(idx as usize)
            .copied()
            .flatten()
            .ok_or_else(|| self.err(format!("memo entry {idx} is not set")))?;
        self.push(v)
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        if n > MAX_STRING {
            return Err(self.err(format!("string of {n} bytes exceeds {MAX_STRING}")));
        }
        let r = self.take(n)?;
        let text = self.data.get(r.clone()).unwrap_or_default();
        if std::str::from_utf8(text).is_err() {
            return Err(self.err("string is not valid UTF-8"));
        }
        Ok(Value::Str(self.span(r.start, n)?))
    }

    fn bytes(&mut self, n: usize) -> Result<Value> {
        if n > MAX_STRING {
            return Err(self.err(format!("bytes of {n} exceed {MAX_STRING}")));
        }
        self.take(n)?;
        Ok(Value::Bytes)
    }

    fn line(&mut self) -> Result<&'a str> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..self.end).unwrap_or_default();
        let n = rest
            .iter()
            .take(MAX_GLOBAL_NAME + 1)
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("GLOBAL name is unterminated or too long"))?;
        let s = std::str::from_utf8(rest.get(..n).unwrap_or_default())
            .map_err(|_| self.err("GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn long(&mut self, n: usize) -> Result<Value> {
        if n > MAX_STRING {
            return Err(self.err(format!("integer of {n} bytes is too long")));
        }
        let r = self.take(n)?;
        if n > 8 {
            return Ok(Value::BigInt);
        }
        let b = self.data.get(r).unwrap_or_default();
        // Little-endian two's complement, sign-extended from its last byte.
        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut a = [fill; 8];
        a[..b.len()].copy_from_slice(b);
        Ok(Value::Int(i64::from_le_bytes(a)))
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            self.op_pos = self.pos;
            // The pickles of a file come first and back to back, so this is every pickle
            // byte read so far.
            self.budget.read = self.pos;
            let op = self
                .data
                .get(self.pos)
                .copied()
                .filter(|_| self.pos < self.end)
                .ok_or_else(|| self.past_end("pickle ends without STOP".into()))?;
            self.pos += 1;
            match op {
                // PROTO
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                // FRAME: a hint for buffered readers; the data is inline.
                0x95 => {
                    self.len_u64()?;
                }
                b'.' => return self.pop(),
                b'}' => {
                    let d = self.new_dict()?;
                    self.push(d)?;
                }
                b']' => {
                    let l = self.new_list()?;
                    self.push(l)?;
                }
                b')' => self.push(Value::Tuple(Span { start: 0, len: 0 }))?,
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.err(format!("nesting exceeds {MAX_MARKS} MARKs")));
                    }
                    self.budget
                        .reserve(&mut self.marks, 1)
                        .map_err(|e| self.over(e))?;
                    self.marks.push(self.stack.len());
                }
                b't' => {
                    let from = self.pop_mark()?;
                    let t = self.tuple_from(from)?;
                    self.push(t)?;
                }
                0x85..=0x87 => {
                    let from = self.top_n(usize::from(op - 0x84))?;
                    let t = self.tuple_from(from)?;
                    self.push(t)?;
                }
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.err("memo index overflows"))?;
                    self.memo_put(i)?;
                }
                // BINGET, LONG_BINGET
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                // LONG1, LONG4
                0x8a => {
                    let n = usize::from(self.u8()?);
                    let v = self.long(n)?;
                    self.push(v)?;
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = usize::try_from(n).map_err(|_| self.err("negative LONG4 length"))?;
                    let v = self.long(n)?;
                    self.push(v)?;
                }
                // BINFLOAT is big-endian.
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v))?;
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                // SHORT_BINSTRING, BINSTRING: Python 2's str, which legacy files written
                // by Python 2 hold; torch.load decodes them as UTF-8, and so do we.
                b'U' => {
                    let n = usize::from(self.u8()?);
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n =
                        usize::try_from(n).map_err(|_| self.err("negative BINSTRING length"))?;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                b'C' => {
                    let n = usize::from(self.u8()?);
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                0x8e | 0x96 => {
                    let n = self.len_u64()?;
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                // DUP, POP, POP_MARK
                b'2' => {
                    let v = self.top()?;
                    self.push(v)?;
                }
                b'0' => {
                    if self.stack.len() == self.marks.last().copied().unwrap_or(usize::MAX) {
                        // POP on an empty frame discards the mark, as CPython does.
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    let from = self.pop_mark()?;
                    self.stack.truncate(from);
                }
                // GLOBAL
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                // STACK_GLOBAL
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (module, name) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    if m.len.max(n.len) as usize > MAX_GLOBAL_NAME {
                        return Err(
                            self.err(format!("STACK_GLOBAL name exceeds {MAX_GLOBAL_NAME} bytes"))
                        );
                    }
                    let (Some(module), Some(name)) = (self.out.str(&module), self.out.str(&name))
                    else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let g = self.global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                // REDUCE, NEWOBJ
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args, op == 0x81)?;
                    self.push(v)?;
                }
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        // An OrderedDict state dict carries `_metadata` as an attribute; a
                        // tensor may carry Python attributes. Neither matters for the data.
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            return Err(self.err(format!("BUILD on a {}", other.kind())));
                        }
                    }
                }
                b's' => {
                    let from = self.top_n(2)?;
                    self.set_items(from)?;
                }
                b'u' => {
                    let from = self.pop_mark()?;
                    self.set_items(from)?;
                }
                b'a' => {
                    let from = self.top_n(1)?;
                    self.append(from)?;
                }
                b'e' => {
                    let from = self.pop_mark()?;
                    self.append(from)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent_load(pid)?;
                    self.push(s)?;
                }
                other => {
                    return Err(self.err(format!("unsupported opcode 0x{other:02x}")));
                }
            }
        }
    }

    /// Adds the key/value pairs from `from` to the dict below them.
    fn set_items(&mut self, from: usize) -> Result<()> {
        let owner = match self.target(from)? {
            Value::Dict(i) => i,
            other => return Err(self.err(format!("SETITEM on a {}", other.kind()))),
        };
        let values = self.stack.get(from..).unwrap_or_default();
        if values.len() % 2 != 0 {
            return Err(self.err("SETITEMS with an odd number of values"));
        }
        let n = values.len() / 2;
        let first = self.out.dict_items.len();
        u32::try_from(first + n).map_err(|_| self.err("more than 2^32 dict items"))?;
        self.budget
            .reserve(&mut self.out.dict_items, n)
            .map_err(|e| self.over(e))?;
        let values = self.stack.get(from..).unwrap_or_default();
        for (i, pair) in values.chunks_exact(2).enumerate() {
            self.out.dict_items.push(DictItem {
                owner,
                // In range: checked above.
                seq: (first + i) as u32,
                key: pair[0],
                value: pair[1],
            });
        }
        self.stack.truncate(from);
        Ok(())
    }

    /// Appends the values from `from` to the list below them.
    fn append(&mut self, from: usize) -> Result<()> {
        let owner = match self.target(from)? {
            Value::List(i) => i,
            other => return Err(self.err(format!("APPEND on a {}", other.kind()))),
        };
        let n = self.stack.len().saturating_sub(from);
        let first = self.out.list_items.len();
        u32::try_from(first + n).map_err(|_| self.err("more than 2^32 list items"))?;
        self.budget
            .reserve(&mut self.out.list_items, n)
            .map_err(|e| self.over(e))?;
        for (i, &value) in self
            .stack
            .get(from..)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            self.out.list_items.push(ListItem {
                owner,
                // In range: checked above.
                seq: (first + i) as u32,
                value,
            });
        }
        self.stack.truncate(from);
        Ok(())
    }

    /// Resolves a global against the allowlist.
    fn global(&self, module: &str, name: &str) -> Result<Global> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("torch._utils", n) if n.starts_with("_rebuild_") => {
                return Err(Error::UnsupportedTensor {
                    path: self.path.to_path_buf(),
                    detail: format!(
                        "torch._utils.{n} rebuilds a sparse, quantized, nested or device-specific tensor, which relayout does not read"
                    ),
                });
            }
            ("torch", n) if is_storage_type_name(n) => {
                Global::StorageType(DType::from_torch_storage_name(n).ok_or_else(|| {
                    Error::UnsupportedDType {
                        path: self.path.to_path_buf(),
                        dtype: format!("torch.{n}"),
                    }
                })?)
            }
            _ => {
                return Err(Error::ForbiddenGlobal {
                    path: self.path.to_path_buf(),
                    module: module.to_owned(),
                    name: name.to_owned(),
                })
            }
        };
        Ok(g)
    }

    fn args(&self, args: &Value, what: &str) -> Result<&[Value]> {
        self.out.tuple(args).ok_or_else(|| {
            self.err(format!(
                "arguments of {what} are a {}, not a tuple",
                args.kind()
            ))
        })
    }

    /// Applies an allowlisted callable.
    fn call(&mut self, callable: Value, args: Value, newobj: bool) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Err(self.err(format!("cannot call a {}", callable.kind())));
        };
        if newobj && g != Global::OrderedDict {
            return Err(self.err(format!("NEWOBJ of {}", g.name())));
        }
        match g {
            Global::OrderedDict => {
                if !self.args(&args, "OrderedDict")?.is_empty() {
                    return Err(self.err("OrderedDict with initial items"));
                }
                self.new_dict()
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => self.rebuild_tensor(g, args),
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let a = self.args(&args, "_rebuild_parameter")?;
                let want = if g == Global::RebuildParameter { 3 } else { 4 };
                match a.first() {
                    Some(&t @ Value::Tensor(_)) if a.len() == want => Ok(t),
                    _ => Err(self.err(format!(
                        "{} needs a tensor and {} more arguments",
                        g.name(),
                        want - 1
                    ))),
                }
            }
            Global::CodecsEncode => {
                // The bytes are never read, so neither is the text they encode.
                let a = self.args(&args, "_codecs.encode")?;
                let &[Value::Str(_), enc @ Value::Str(_)] = a else {
                    return Err(self.err("_codecs.encode needs a str and an encoding"));
                };
                if !self.out.str_is(&enc, "latin1") && !self.out.str_is(&enc, "latin-1") {
                    return Err(self.err("_codecs.encode with an encoding other than latin1"));
                }
                Ok(Value::Bytes)
            }
            Global::StorageType(_) => Err(self.err("cannot call a storage type")),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
    /// or `_rebuild_tensor(storage, offset, size, stride)`.
    fn rebuild_tensor(&mut self, g: Global, args: Value) -> Result<Value> {
        let a = self.args(&args, g.name())?;
        let ok_len = match g {
            Global::RebuildTensorV2 => (6..=7).contains(&a.len()),
            _ => a.len() == 4,
        };
        let &[storage, offset, size, stride, ..] = a else {
            return Err(self.err(format!("{} with {} arguments", g.name(), a.len())));
        };
        if !ok_len {
            return Err(self.err(format!("{} with {} arguments", g.name(), a.len())));
        }
        let Value::Storage(storage) = storage else {
            return Err(self.err(format!("tensor storage is a {}", storage.kind())));
        };
        let Value::Int(offset) = offset else {
            return Err(self.err(format!("storage offset is a {}", offset.kind())));
        };
        let rank = self.int_tuple(&size, "size")?;
        if self.int_tuple(&stride, "stride")? != rank {
            return Err(self.err(format!(
                "tensor has {rank} sizes but {} strides",
                self.out.tuple(&stride).map_or(0, <[Value]>::len)
            )));
        }
        self.budget
            .reserve(&mut self.out.dims, 2 * rank)
            .map_err(|e| self.over(e))?;
        self.budget
            .reserve(&mut self.out.tensors, 1)
            .map_err(|e| self.over(e))?;
        let start = self.out.dims.len();
        let dims = self.span(start, 2 * rank)?;
        let ints = |v: Value| match v {
            Value::Int(i) => Some(i),
            _ => None,
        };
        if let (Value::Tuple(size), Value::Tuple(stride)) = (size, stride) {
            let items = &self.out.tuple_items;
            for span in [size, stride] {
                let values = items.get(span.range()).unwrap_or_default();
                self.out
                    .dims
                    .extend(values.iter().copied().filter_map(ints));
            }
        }
        let index = self.out.tensors.len();
        self.out.tensors.push(RawTensor {
            storage: storage as usize,
            offset,
            dims,
        });
        u32::try_from(index)
            .map(Value::Tensor)
            .map_err(|_| self.err("more than 2^32 tensors"))
    }

    /// Checks that `v` is a tuple of at most [`MAX_RANK`] ints; returns its length.
    fn int_tuple(&self, v: &Value, what: &str) -> Result<usize> {
        let items = self
            .out
            .tuple(v)
            .ok_or_else(|| self.err(format!("tensor {what} is a {}, not a tuple", v.kind())))?;
        if items.len() > MAX_RANK {
            return Err(self.err(format!(
                "tensor of rank {} exceeds the limit of {MAX_RANK}",
                items.len()
            )));
        }
        if let Some(other) = items.iter().find(|x| !matches!(x, Value::Int(_))) {
            return Err(self.err(format!("tensor {what} holds a {}", other.kind())));
        }
        Ok(items.len())
    }

    /// A storage or view key: a short string, as torch writes it.
    fn key(&self, v: &Value, what: &str) -> Result<&'a str> {
        if let Value::Str(s) = v {
            if s.len as usize > MAX_STORAGE_KEY {
                return Err(self.err(format!(
                    "{what} of {} bytes exceeds {MAX_STORAGE_KEY}",
                    s.len
                )));
            }
        }
        self.out
            .str(v)
            .ok_or_else(|| self.err(format!("{what} is a {}, not a str", v.kind())))
    }

    fn count(&self, v: &Value, what: &str) -> Result<usize> {
        match *v {
            Value::Int(n) => usize::try_from(n).map_err(|_| self.err(format!("{what} is {n}"))),
            other => Err(self.err(format!("{what} is a {}", other.kind()))),
        }
    }

    /// A storage from its persistent id (see [`PersistentIds`]): one per key.
    fn persistent_load(&mut self, pid: Value) -> Result<Value> {
        let items = self
            .out
            .tuple(&pid)
            .ok_or_else(|| self.err(format!("persistent id is a {}", pid.kind())))?;
        let (tag, ty, key, numel, view) = match (self.ids, items) {
            (PersistentIds::Zip, &[tag, ty, key, _location, numel]) => {
                (tag, ty, key, numel, Value::None)
            }
            (PersistentIds::Legacy, &[tag, ty, key, _location, numel, view]) => {
                (tag, ty, key, numel, view)
            }
            (PersistentIds::Zip, _) => {
                return Err(self.err("persistent id is not ('storage', type, key, location, numel)"))
            }
            (PersistentIds::Legacy, _) => {
                return Err(self.err(
                    "persistent id is not ('storage', type, key, location, numel, view_metadata)",
                ))
            }
        };
        match self.out.str(&tag) {
            Some("storage") => {}
            Some(other) => return Err(self.err(format!("persistent id of kind '{other}'"))),
            None => return Err(self.err(format!("persistent id tag is a {}", tag.kind()))),
        }
        let Value::Global(Global::StorageType(dtype)) = ty else {
            return Err(self.err(format!("storage type is a {}", ty.kind())));
        };
        let key = self.key(&key, "storage key")?;
        let numel = self.count(&numel, &format!("the size of storage '{key}'"))?;
        let (root, whole) = self.storage(key, dtype, numel)?;
        let view = match view {
            Value::None => whole,
            v => self.view(v, root, numel)?,
        };
        u32::try_from(view)
            .map(Value::Storage)
            .map_err(|_| self.err("more than 2^32 storages"))
    }

    /// The indices of the storage `key` and of its whole view, both added when the key
    /// is new.
    fn storage(&mut self, key: &'a str, dtype: DType, numel: usize) -> Result<(usize, usize)> {
        if let Some(&i) = self.out.storage_by_key.get(key) {
            return match self.out.storages.get(i) {
                Some(s) if s.dtype == dtype && s.numel == numel => Ok((i, s.whole)),
                _ => Err(self.err(format!(
                    "storage '{key}' is referenced with different types or sizes"
                ))),
            };
        }
        self.charge_map_entry()?;
        self.budget
            .reserve(&mut self.out.storages, 1)
            .map_err(|e| self.over(e))?;
        self.budget
            .reserve(&mut self.out.views, 1)
            .map_err(|e| self.over(e))?;
        let (root, whole) = (self.out.storages.len(), self.out.views.len());
        self.out.storage_by_key.insert(key, root);
        self.out.storages.push(StorageRef {
            key,
            dtype,
            numel,
            whole,
        });
        self.out.views.push(StorageView {
            root,
            offset: 0,
            numel,
        });
        Ok((root, whole))
    }

    /// The index of the view a legacy persistent id's `(view_key, offset, numel)`
    /// describes, checked against its root and added when its key is new.
    fn view(&mut self, metadata: Value, root: usize, root_numel: usize) -> Result<usize> {
        let Some(&[key, offset, numel]) = self.out.tuple(&metadata) else {
            return Err(self.err(format!(
                "view metadata is a {}, not (view_key, offset, size)",
                metadata.kind()
            )));
        };
        let key = self.key(&key, "view key")?;
        let offset = self.count(&offset, &format!("the offset of view '{key}'"))?;
        let numel = self.count(&numel, &format!("the size of view '{key}'"))?;
        if offset.checked_add(numel).is_none_or(|end| end > root_numel) {
            return Err(self.err(format!(
                "view '{key}' of {numel} elements at offset {offset} lies outside its storage of {root_numel} elements"
            )));
        }
        let view = StorageView {
            root,
            offset,
            numel,
        };
        if let Some(&i) = self.out.view_by_key.get(key) {
            if self.out.views.get(i) != Some(&view) {
                return Err(self.err(format!(
                    "storage view '{key}' is referenced with different storages, offsets or sizes"
                )));
            }
            return Ok(i);
        }
        self.charge_map_entry()?;
        self.budget
            .reserve(&mut self.out.views, 1)
            .map_err(|e| self.over(e))?;
        let i = self.out.views.len();
        self.out.view_by_key.insert(key, i);
        self.out.views.push(view);
        Ok(i)
    }

    /// Charges the slots a new key takes in its hash map (the key itself is a span).
    fn charge_map_entry(&mut self) -> Result<()> {
        let bytes = MAP_SLOTS_PER_ENTRY * (size_of::<(&str, usize)>() + 1);
        self.budget.charge(bytes).map_err(|e| self.over(e))
    }
}

fn is_storage_type_name(n: &str) -> bool {
    n.strip_suffix("Storage")
        .is_some_and(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}
