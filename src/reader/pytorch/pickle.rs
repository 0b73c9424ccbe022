//! A restricted pickle VM for the `data.pkl` of torch.save archives.
//!
//! It understands the opcodes torch.save emits (protocols 2 to 5) and resolves only an
//! allowlist of globals into values it implements itself (`OrderedDict`, the tensor
//! rebuild functions, the storage types). Any other global is an error the moment it is
//! loaded; nothing is ever imported or called. Containers live in arenas and refer to
//! each other by index, so hostile nesting can neither recurse nor leak.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Larger than the data.pkl of any real checkpoint (about 150 bytes per tensor).
pub(crate) const MAX_PICKLE_BYTES: usize = 256 << 20;
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
/// Elements in all containers together: keeps memory linear in a sane pickle.
const MAX_ITEMS: usize = 1 << 26;
/// Strings in torch pickles are names and keys; bytes objects are rare and small.
const MAX_STRING: usize = 64 << 20;
/// Module and attribute names of a GLOBAL.
const MAX_GLOBAL_NAME: usize = 256;
/// Tensor rank limit.
pub(crate) const MAX_RANK: usize = 32;

/// A pickled value. Containers are indices into the arenas of [`Unpickled`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64; its value is never needed.
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(usize),
    List(usize),
    Dict(usize),
    Global(Global),
    /// Index into [`Unpickled::storages`].
    Storage(usize),
    /// Index into [`Unpickled::tensors`].
    Tensor(usize),
}

impl Value {
    /// A short name of the value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
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

/// A storage a persistent id names: entry `<prefix>data/<key>` holding `numel` elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub key: String,
    pub dtype: DType,
    pub numel: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it, not yet validated against its storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawTensor {
    pub storage: usize,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
}

/// The result of unpickling: the root value and the arenas it refers into.
#[derive(Debug, Default)]
pub(crate) struct Unpickled {
    pub root: Option<Value>,
    pub tuples: Vec<Vec<Value>>,
    pub lists: Vec<Vec<Value>>,
    pub dicts: Vec<Vec<(Value, Value)>>,
    pub storages: Vec<StorageRef>,
    pub tensors: Vec<RawTensor>,
}

impl Unpickled {
    /// The items of a dict value, in insertion order.
    pub fn dict(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match v {
            Value::Dict(i) => self.dicts.get(*i).map(Vec::as_slice),
            _ => None,
        }
    }

    fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Tuple(i) => self.tuples.get(*i).map(Vec::as_slice),
            _ => None,
        }
    }
}

/// Runs the pickle `pkl` of the archive `path` and returns what it built.
pub(crate) fn load(path: &Path, pkl: &[u8]) -> Result<Unpickled> {
    if pkl.len() > MAX_PICKLE_BYTES {
        return Err(Error::Pickle {
            path: path.to_path_buf(),
            detail: format!(
                "data.pkl of {} bytes exceeds the limit of {MAX_PICKLE_BYTES} bytes",
                pkl.len()
            ),
        });
    }
    let mut vm = Vm {
        path,
        pkl,
        pos: 0,
        op_pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
        items: 0,
        storage_keys: HashMap::new(),
        out: Unpickled::default(),
    };
    vm.run()?;
    Ok(vm.out)
}

struct Vm<'a> {
    path: &'a Path,
    pkl: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for error messages.
    op_pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: Vec<Option<Value>>,
    items: usize,
    storage_keys: HashMap<String, usize>,
    out: Unpickled,
}

impl Vm<'_> {
    fn err(&self, detail: impl Into<String>) -> Error {
        Error::Pickle {
            path: self.path.to_path_buf(),
            detail: format!("at byte {}: {}", self.op_pos, detail.into()),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.pkl.len())
            .ok_or_else(|| self.err(format!("argument of {n} bytes runs past the end")))?;
        let b = &self.pkl[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
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

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("stack exceeds {MAX_STACK} values")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("pop from an empty stack"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err("pop from an empty stack"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("empty stack"));
        }
        let n = self.stack.len();
        Ok(&mut self.stack[n - 1])
    }

    /// Pops everything above the last MARK, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn count_items(&mut self, n: usize) -> Result<()> {
        self.items = self
            .items
            .checked_add(n)
            .filter(|&i| i <= MAX_ITEMS)
            .ok_or_else(|| self.err(format!("containers exceed {MAX_ITEMS} elements in all")))?;
        Ok(())
    }

    fn new_tuple(&mut self, items: Vec<Value>) -> Result<Value> {
        self.count_items(items.len())?;
        self.out.tuples.push(items);
        Ok(Value::Tuple(self.out.tuples.len() - 1))
    }

    fn new_dict(&mut self) -> Value {
        self.out.dicts.push(Vec::new());
        Value::Dict(self.out.dicts.len() - 1)
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = self.top()?.clone();
        let i = idx as usize;
        if i >= MAX_MEMO || i > self.memo.len().saturating_add(MEMO_SLACK) {
            return Err(self.err(format!(
                "memo index {idx} is beyond {} entries or the limit of {MAX_MEMO}",
                self.memo.len()
            )));
        }
        if i >= self.memo.len() {
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
            .cloned()
            .flatten()
            .ok_or_else(|| self.err(format!("memo entry {idx} is not set")))?;
        self.push(v)
    }

    fn string(&mut self, n: usize) -> Result<Rc<str>> {
        if n > MAX_STRING {
            return Err(self.err(format!("string of {n} bytes exceeds {MAX_STRING}")));
        }
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Rc::from(s)),
            Err(_) => Err(self.err("string is not valid UTF-8")),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<Value> {
        if n > MAX_STRING {
            return Err(self.err(format!("bytes of {n} exceed {MAX_STRING}")));
        }
        Ok(Value::Bytes(Rc::from(self.take(n)?)))
    }

    fn line(&mut self) -> Result<String> {
        let rest = self.pkl.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .take(MAX_GLOBAL_NAME + 1)
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("GLOBAL name is unterminated or too long"))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| self.err("GLOBAL name is not UTF-8"))?
            .to_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn long(&mut self, n: usize) -> Result<Value> {
        if n > MAX_STRING {
            return Err(self.err(format!("integer of {n} bytes is too long")));
        }
        let b = self.take(n)?;
        if n > 8 {
            return Ok(Value::BigInt);
        }
        // Little-endian two's complement, sign-extended from its last byte.
        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut a = [fill; 8];
        a[..n].copy_from_slice(b);
        Ok(Value::Int(i64::from_le_bytes(a)))
    }

    fn run(&mut self) -> Result<()> {
        loop {
            self.op_pos = self.pos;
            let op = self
                .pkl
                .get(self.pos)
                .copied()
                .ok_or_else(|| self.err("pickle ends without STOP"))?;
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
                b'.' => {
                    let root = self.pop()?;
                    self.out.root = Some(root);
                    return Ok(());
                }
                b'}' => {
                    let d = self.new_dict();
                    self.push(d)?;
                }
                b']' => {
                    self.out.lists.push(Vec::new());
                    let l = Value::List(self.out.lists.len() - 1);
                    self.push(l)?;
                }
                b')' => {
                    let t = self.new_tuple(Vec::new())?;
                    self.push(t)?;
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.err(format!("nesting exceeds {MAX_MARKS} MARKs")));
                    }
                    self.marks.push(self.stack.len());
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let t = self.new_tuple(items)?;
                    self.push(t)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let t = self.new_tuple(items)?;
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
                    self.push(Value::Str(s))?;
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let s = self.string(n)?;
                    self.push(Value::Str(s))?;
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let s = self.string(n)?;
                    self.push(Value::Str(s))?;
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
                    let v = self.top()?.clone();
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
                    self.pop_mark()?;
                }
                // GLOBAL
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.push(Value::Global(g))?;
                }
                // STACK_GLOBAL
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let g = self.global(&module, &name)?;
                    self.push(Value::Global(g))?;
                }
                // REDUCE, NEWOBJ
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(&callable, &args, op == 0x81)?;
                    self.push(v)?;
                }
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        // An OrderedDict state dict carries `_metadata` as an attribute; a
                        // tensor may carry Python attributes. Neither matters for the data.
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            let kind = other.kind();
                            return Err(self.err(format!("BUILD on a {kind}")));
                        }
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent_load(&pid)?;
                    self.push(s)?;
                }
                other => {
                    return Err(self.err(format!("unsupported opcode 0x{other:02x}")));
                }
            }
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if items.len() % 2 != 0 {
            return Err(self.err("SETITEMS with an odd number of values"));
        }
        self.count_items(items.len() / 2)?;
        let target = match self.top()? {
            Value::Dict(i) => *i,
            other => {
                let kind = other.kind();
                return Err(self.err(format!("SETITEM on a {kind}")));
            }
        };
        let mut it = items.into_iter();
        match self.out.dicts.get_mut(target) {
            Some(dict) => {
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.push((k, v));
                }
                Ok(())
            }
            None => Err(self.err("dangling dict")),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        self.count_items(items.len())?;
        let target = match self.top()? {
            Value::List(i) => *i,
            other => {
                let kind = other.kind();
                return Err(self.err(format!("APPEND on a {kind}")));
            }
        };
        match self.out.lists.get_mut(target) {
            Some(list) => {
                list.extend(items);
                Ok(())
            }
            None => Err(self.err("dangling list")),
        }
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
                Global::StorageType(storage_dtype(n).ok_or_else(|| Error::UnsupportedDType {
                    path: self.path.to_path_buf(),
                    dtype: format!("torch.{n}"),
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

    fn args<'v>(&'v self, args: &Value, what: &str) -> Result<&'v [Value]> {
        self.out.tuple(args).ok_or_else(|| {
            self.err(format!(
                "arguments of {what} are a {}, not a tuple",
                args.kind()
            ))
        })
    }

    /// Applies an allowlisted callable.
    fn call(&mut self, callable: &Value, args: &Value, newobj: bool) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Err(self.err(format!("cannot call a {}", callable.kind())));
        };
        if newobj && *g != Global::OrderedDict {
            return Err(self.err(format!("NEWOBJ of {}", g.name())));
        }
        match g {
            Global::OrderedDict => {
                let a = self.args(args, "OrderedDict")?;
                if !a.is_empty() {
                    return Err(self.err("OrderedDict with initial items"));
                }
                Ok(self.new_dict())
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                let a = self.args(args, "_rebuild_tensor_v2")?;
                let ok_len = match g {
                    Global::RebuildTensorV2 => (6..=7).contains(&a.len()),
                    _ => a.len() == 4,
                };
                let [storage, offset, size, stride, ..] = a else {
                    return Err(self.err(format!("{} with {} arguments", g.name(), a.len())));
                };
                if !ok_len {
                    return Err(self.err(format!("{} with {} arguments", g.name(), a.len())));
                }
                let Value::Storage(storage) = *storage else {
                    return Err(self.err(format!("tensor storage is a {}", storage.kind())));
                };
                let Value::Int(offset) = *offset else {
                    return Err(self.err(format!("storage offset is a {}", offset.kind())));
                };
                let shape = self.int_tuple(size, "size")?;
                let strides = self.int_tuple(stride, "stride")?;
                if shape.len() != strides.len() {
                    return Err(self.err(format!(
                        "tensor has {} sizes but {} strides",
                        shape.len(),
                        strides.len()
                    )));
                }
                self.count_items(shape.len())?;
                self.out.tensors.push(RawTensor {
                    storage,
                    offset,
                    shape,
                    strides,
                });
                Ok(Value::Tensor(self.out.tensors.len() - 1))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let a = self.args(args, "_rebuild_parameter")?;
                let want = if *g == Global::RebuildParameter { 3 } else { 4 };
                match a.first() {
                    Some(t @ Value::Tensor(_)) if a.len() == want => Ok(t.clone()),
                    _ => Err(self.err(format!(
                        "{} needs a tensor and {} more arguments",
                        g.name(),
                        want - 1
                    ))),
                }
            }
            Global::CodecsEncode => {
                let a = self.args(args, "_codecs.encode")?;
                let [Value::Str(s), Value::Str(enc)] = a else {
                    return Err(self.err("_codecs.encode needs a str and an encoding"));
                };
                if &**enc != "latin1" && &**enc != "latin-1" {
                    return Err(self.err(format!("_codecs.encode with encoding '{enc}'")));
                }
                let bytes: Option<Vec<u8>> = s.chars().map(|c| u8::try_from(c).ok()).collect();
                let bytes =
                    bytes.ok_or_else(|| self.err("latin1 string holds a character above 255"))?;
                Ok(Value::Bytes(Rc::from(bytes)))
            }
            Global::StorageType(_) => Err(self.err("cannot call a storage type")),
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<i64>> {
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
        items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                other => Err(self.err(format!("tensor {what} holds a {}", other.kind()))),
            })
            .collect()
    }

    /// `('storage', storage_type, key, location, numel)` → a storage, one per key.
    fn persistent_load(&mut self, pid: &Value) -> Result<Value> {
        let items = self
            .out
            .tuple(pid)
            .ok_or_else(|| self.err(format!("persistent id is a {}", pid.kind())))?;
        let [Value::Str(tag), ty, key, _location, numel] = items else {
            return Err(self.err("persistent id is not ('storage', type, key, location, numel)"));
        };
        if &**tag != "storage" {
            return Err(self.err(format!("persistent id of kind '{tag}'")));
        }
        let Value::Global(Global::StorageType(dtype)) = *ty else {
            return Err(self.err(format!("storage type is a {}", ty.kind())));
        };
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => return Err(self.err(format!("storage key is a {}", other.kind()))),
        };
        let numel = match numel {
            Value::Int(n) => usize::try_from(*n)
                .map_err(|_| self.err(format!("storage '{key}' has {n} elements")))?,
            other => return Err(self.err(format!("storage size is a {}", other.kind()))),
        };
        let r = StorageRef { key, dtype, numel };
        if let Some(&i) = self.storage_keys.get(&r.key) {
            if self.out.storages.get(i) != Some(&r) {
                return Err(self.err(format!(
                    "storage '{}' is referenced with different types or sizes",
                    r.key
                )));
            }
            return Ok(Value::Storage(i));
        }
        self.out.storages.push(r.clone());
        let i = self.out.storages.len() - 1;
        self.storage_keys.insert(r.key, i);
        Ok(Value::Storage(i))
    }
}

fn is_storage_type_name(n: &str) -> bool {
    n.strip_suffix("Storage")
        .is_some_and(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

/// DType of a `torch.<X>Storage` type.
fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        "Float8_e4m3fnStorage" => DType::F8E4M3,
        "Float8_e5m2Storage" => DType::F8E5M2,
        _ => return None,
    })
}
