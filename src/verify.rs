//! Strict verification: the tensor names, shapes and dtypes a target model expects,
//! checked against a plan before anything is written, or against a written file.
//!
//! An expectation file is one of
//! - JSON: `{"params.fc.kernel": {"shape": [16, 10], "dtype": "float32"}, …}`; `dtype`
//!   is optional and takes numpy (`bfloat16`) or safetensors (`BF16`) names; nested
//!   objects are modules (`{"params": {"fc": {"kernel": {"shape": …}}}}`), and a bare
//!   list is a shape;
//! - safetensors: the header's names, dtypes and shapes (the data is never read);
//! - Flax msgpack (`flax.serialization.to_bytes`): a nested map whose array leaves are
//!   ext type 1 (3 for numpy scalars) holding the msgpack triple (shape, dtype name,
//!   raw bytes), arrays over 1 GiB split into `__msgpack_chunked_array__` maps; the map
//!   is walked in place and the raw bytes are skipped, never read.
//!
//! Nested keys are joined with '.', as `flax.traverse_util.flatten_dict(…, sep='.')`
//! joins them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::reader::{Checkpoint, Format};

/// Largest JSON expectation parsed: about a million tensors, far above any model.
const MAX_JSON_BYTES: u64 = 64 << 20;
/// Deepest msgpack nesting accepted; Flax trees are a dozen levels at most, and the
/// parser recurses once per level.
const MAX_DEPTH: usize = 64;
/// Most msgpack values (maps, keys, leaves) in one file: bounds the memory a file can
/// make us allocate, whatever counts it declares.
const MAX_VALUES: usize = 1 << 22;
/// Most tensors in an expectation; the largest models have tens of thousands.
const MAX_TENSORS: usize = 1 << 20;
/// Longest tensor name, joined; real names are a few hundred bytes.
const MAX_NAME_BYTES: usize = 4096;
/// Highest rank accepted, as in the safetensors reader.
const MAX_RANK: usize = 32;
/// A fully missing module whose tensors are all direct leaves is listed leaf by leaf up
/// to this many leaves, and summarised as `module.* (N tensors)` beyond.
const MAX_BRACE_LEAVES: usize = 8;
/// Report lines shown per kind (missing, unexpected, mismatched) before `… and N more`.
const MAX_REPORT_LINES: usize = 100;

/// The dtype an expectation asks for: one relayout knows, or a name it does not
/// (`uint32`, `complex64`), which no output can match.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Want {
    Known(DType),
    Other(String),
}

impl fmt::Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Want::Known(d) => write!(f, "{d}"),
            Want::Other(name) => f.write_str(name),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Expected {
    shape: Vec<usize>,
    dtype: Option<Want>,
}

/// What a target model expects: tensor name → shape and, optionally, dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectation {
    path: PathBuf,
    tensors: BTreeMap<String, Expected>,
}

impl Expectation {
    /// Reads an expectation file: JSON, safetensors or Flax msgpack, told by the
    /// extension (`.json`, `.safetensors`, `.msgpack`) or else by the first bytes.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Expectation> {
        let path = path.as_ref();
        let bad = |detail: String| Error::Expectation {
            path: path.to_path_buf(),
            detail,
        };
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".to_string()));
        }
        if meta.len() == 0 {
            return Err(bad("the file is empty".to_string()));
        }
        let file = crate::reader::map_file(path)?;
        let bytes: &[u8] = &file.map;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let kind = match ext.as_deref() {
            Some("json") => Kind::Json,
            Some("safetensors") => Kind::Safetensors,
            Some("msgpack") => Kind::Msgpack,
            _ => sniff(bytes).ok_or_else(|| {
                bad("neither JSON, safetensors nor Flax msgpack (give the file a .json, .safetensors or .msgpack extension to say which)".to_string())
            })?,
        };
        let tensors = match kind {
            Kind::Json => {
                if meta.len() > MAX_JSON_BYTES {
                    return Err(bad(format!(
                        "JSON file of {} bytes is larger than the limit of {MAX_JSON_BYTES} bytes",
                        meta.len()
                    )));
                }
                from_json(bytes).map_err(bad)?
            }
            Kind::Msgpack => from_msgpack(bytes).map_err(bad)?,
            Kind::Safetensors => {
                drop(file);
                let ckpt = Checkpoint::open(path)?;
                if !matches!(
                    ckpt.format(),
                    Format::Safetensors | Format::ShardedSafetensors
                ) {
                    return Err(bad(format!(
                        "a {:?} checkpoint, not safetensors",
                        ckpt.format()
                    )));
                }
                tensors_of(&ckpt)
            }
        };
        Ok(Expectation {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The file the expectation was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tensors expected.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Compares actual tensors, `(name, dtype, shape)`, with the expectation.
    pub fn check<'a, I>(&self, actual: I) -> VerifyReport
    where
        I: IntoIterator<Item = (&'a str, DType, &'a [usize])>,
    {
        let actual: BTreeMap<&str, (DType, &[usize])> = actual
            .into_iter()
            .map(|(name, dtype, shape)| (name, (dtype, shape)))
            .collect();
        let mut report = VerifyReport {
            file: self.path.clone(),
            expected: self.tensors.len(),
            ..VerifyReport::default()
        };
        for (name, want) in &self.tensors {
            let Some(&(dtype, shape)) = actual.get(name.as_str()) else {
                report.missing.push(name.clone());
                continue;
            };
            let dtype_ok = match &want.dtype {
                None => true,
                Some(Want::Known(d)) => *d == dtype,
                Some(Want::Other(_)) => false,
            };
            if dtype_ok && want.shape == shape {
                report.matched += 1;
            } else {
                report.mismatched.push(Mismatch {
                    name: name.clone(),
                    dtype,
                    shape: shape.to_vec(),
                    expected_dtype: want.dtype.as_ref().map(Want::to_string),
                    expected_shape: want.shape.clone(),
                });
            }
        }
        report.unexpected = actual
            .keys()
            .filter(|n| !self.tensors.contains_key(**n))
            .map(|n| n.to_string())
            .collect();
        let expected_names = || self.tensors.keys().map(String::as_str);
        report.missing_lines = group(expected_names(), &report.missing);
        report.unexpected_lines = group(actual.keys().copied(), &report.unexpected);
        // A shape mismatch is one line; tensors whose dtype alone differs, the same way,
        // are grouped like missing ones (a forgotten `--dtype` is then a line or two).
        let mut by_dtype: BTreeMap<(DType, Option<&str>), Vec<String>> = BTreeMap::new();
        for m in &report.mismatched {
            if m.shape == m.expected_shape {
                let key = (m.dtype, m.expected_dtype.as_deref());
                by_dtype.entry(key).or_default().push(m.name.clone());
            } else {
                report.mismatched_lines.push(m.to_string());
            }
        }
        let by_name: BTreeMap<&str, &Mismatch> = report
            .mismatched
            .iter()
            .map(|m| (m.name.as_str(), m))
            .collect();
        for ((dtype, want), names) in &by_dtype {
            for line in group(expected_names(), names) {
                // A line that is one tensor's name shows that tensor in full.
                report
                    .mismatched_lines
                    .push(match by_name.get(line.as_str()) {
                        Some(m) => m.to_string(),
                        None => format!("{line}: {dtype}, expected {}", want.unwrap_or("-")),
                    });
            }
        }
        report
    }

    /// Compares the output a plan would write (its entries' targets, dtypes and
    /// target shapes) with the expectation.
    pub fn check_plan(&self, plan: &Plan) -> VerifyReport {
        self.check(
            plan.entries
                .iter()
                .map(|e| (e.target.as_str(), e.dtype, e.target_shape.as_slice())),
        )
    }

    /// Compares the tensors of an open checkpoint with the expectation.
    pub fn check_checkpoint(&self, ckpt: &Checkpoint) -> VerifyReport {
        self.check(
            ckpt.tensors()
                .iter()
                .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice())),
        )
    }
}

/// Checks the tensors of an existing file (any checkpoint relayout reads, in practice
/// a converted safetensors file; only its header is read) against the expectation file
/// `expect`; returns the number of tensors that match, all of them.
pub fn verify_file(output: impl AsRef<Path>, expect: impl AsRef<Path>) -> Result<usize> {
    let expectation = Expectation::from_file(expect)?;
    let ckpt = Checkpoint::open(output)?;
    expectation.check_checkpoint(&ckpt).into_result()
}

/// A tensor present on both sides with a different shape or dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The expected dtype as the expectation names it; `None` when it gives none.
    pub expected_dtype: Option<String>,
    pub expected_shape: Vec<usize>,
}

/// `name: [16, 10] F32, expected [10, 16] F32`, with a hint when only the axis order
/// differs.
impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {:?} {}, expected {:?}",
            self.name, self.shape, self.dtype, self.expected_shape
        )?;
        if let Some(d) = &self.expected_dtype {
            write!(f, " {d}")?;
        }
        let mut got = self.shape.clone();
        let mut want = self.expected_shape.clone();
        got.sort_unstable();
        want.sort_unstable();
        if got == want && self.shape != self.expected_shape {
            f.write_str(" (same sizes, other axis order)")?;
        }
        Ok(())
    }
}

/// The outcome of a comparison: what is missing, unexpected and mismatched. Its
/// `Display` is the grouped report, one line per module where whole modules differ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    file: PathBuf,
    expected: usize,
    matched: usize,
    missing: Vec<String>,
    unexpected: Vec<String>,
    mismatched: Vec<Mismatch>,
    missing_lines: Vec<String>,
    unexpected_lines: Vec<String>,
    mismatched_lines: Vec<String>,
}

impl VerifyReport {
    /// True when every expected tensor is there with its shape and dtype, and no other.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// The expectation file compared against.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Expected tensors found with their shape and dtype.
    pub fn matched(&self) -> usize {
        self.matched
    }

    /// Number of tensors the expectation lists.
    pub fn expected(&self) -> usize {
        self.expected
    }

    /// Expected tensors that are not there, sorted.
    pub fn missing(&self) -> &[String] {
        &self.missing
    }

    /// Tensors there that the expectation does not list, sorted.
    pub fn unexpected(&self) -> &[String] {
        &self.unexpected
    }

    /// Tensors on both sides whose shape or dtype differ, sorted by name.
    pub fn mismatched(&self) -> &[Mismatch] {
        &self.mismatched
    }

    /// `Ok(matched)` when the comparison found nothing wrong, else [`Error::Verify`].
    pub fn into_result(self) -> Result<usize> {
        if self.is_ok() {
            Ok(self.matched)
        } else {
            Err(Error::Verify {
                file: self.file.clone(),
                report: Box::new(self),
            })
        }
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (label, lines) in [
            ("missing", &self.missing_lines),
            ("unexpected", &self.unexpected_lines),
            ("mismatched", &self.mismatched_lines),
        ] {
            for line in lines.iter().take(MAX_REPORT_LINES) {
                writeln!(f, "{label:<11} {line}")?;
            }
            if lines.len() > MAX_REPORT_LINES {
                writeln!(
                    f,
                    "{label:<11} … and {} more line(s)",
                    lines.len() - MAX_REPORT_LINES
                )?;
            }
        }
        Ok(())
    }
}

/// One node of the name tree of one side: `total` tensors at or below it, `flagged`
/// of them in the list being reported.
#[derive(Default)]
struct Node<'a> {
    children: BTreeMap<&'a str, Node<'a>>,
    /// `Some(flagged)` when a tensor has this node's exact name.
    tensor: Option<bool>,
    total: usize,
    flagged: usize,
}

/// Report lines for the `flagged` names among `all`: the flagged leaves of one module
/// on one line (`m.{a,b}`), a module whose tensors are all flagged on one line.
fn group<'a>(all: impl Iterator<Item = &'a str>, flagged: &[String]) -> Vec<String> {
    let flagged: BTreeSet<&str> = flagged.iter().map(String::as_str).collect();
    let mut root = Node::default();
    for name in all {
        let hit = flagged.contains(name);
        let mut node = &mut root;
        for part in name.split('.') {
            node.total += 1;
            node.flagged += usize::from(hit);
            node = node.children.entry(part).or_default();
        }
        node.total += 1;
        node.flagged += usize::from(hit);
        node.tensor = Some(hit);
    }
    let mut lines = Vec::new();
    emit(&root, "", &mut lines);
    lines
}

fn join(path: &str, part: &str) -> String {
    if path.is_empty() {
        part.to_string()
    } else {
        format!("{path}.{part}")
    }
}

/// Lines for the flagged tensors below `node` (named `path`), which is not wholly
/// flagged or is the root.
fn emit(node: &Node<'_>, path: &str, out: &mut Vec<String>) {
    let mut leaves = Vec::new();
    let mut below = Vec::new();
    for (&part, child) in &node.children {
        if child.flagged == 0 {
            continue;
        }
        if child.tensor == Some(true) {
            leaves.push(part);
        }
        // The tensors strictly below `child`, which may itself be a tensor too.
        let sub_total = child.total - usize::from(child.tensor.is_some());
        let sub_flagged = child.flagged - usize::from(child.tensor == Some(true));
        if sub_flagged == 0 {
            continue;
        }
        let name = join(path, part);
        if sub_flagged < sub_total {
            emit(child, &name, &mut below);
        } else {
            below.push(whole(child, name, sub_flagged));
        }
    }
    if !leaves.is_empty() {
        out.push(braced(path, &leaves));
    }
    out.append(&mut below);
}

/// The line for a module `name` whose `count` tensors below it are all flagged: down a
/// chain of single submodules, then its leaves by name if few, else a count.
fn whole(node: &Node<'_>, name: String, count: usize) -> String {
    if let [(part, only)] = node.children.iter().collect::<Vec<_>>().as_slice() {
        if only.tensor.is_none() {
            return whole(only, join(&name, part), count);
        }
    }
    if node.children.len() <= MAX_BRACE_LEAVES
        && node.children.values().all(|c| c.children.is_empty())
    {
        let parts: Vec<&str> = node.children.keys().copied().collect();
        braced(&name, &parts)
    } else {
        format!("{name}.* ({count} tensors)")
    }
}

/// `m.a`, `m.{a,b}`, or `a, b` at the top level.
fn braced(path: &str, parts: &[&str]) -> String {
    match parts {
        [one] => join(path, one),
        _ if path.is_empty() => parts.join(", "),
        _ => format!("{path}.{{{}}}", parts.join(",")),
    }
}

/// Expectation file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Json,
    Safetensors,
    Msgpack,
}

/// Tells the format from the first bytes, for files without a known extension.
fn sniff(bytes: &[u8]) -> Option<Kind> {
    // A safetensors length prefix that fits in the file; JSON text read as a u64 is
    // far larger than any file.
    let st_len = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes);
    if st_len.is_some_and(|n| n.saturating_add(8) <= bytes.len() as u64)
        && bytes.get(8) == Some(&b'{')
    {
        return Some(Kind::Safetensors);
    }
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Some(Kind::Json),
        Some(0x80..=0x8f | 0xde | 0xdf) => Some(Kind::Msgpack),
        _ => None,
    }
}

fn tensors_of(ckpt: &Checkpoint) -> BTreeMap<String, Expected> {
    ckpt.tensors()
        .iter()
        .map(|t| {
            let want = Expected {
                shape: t.shape.clone(),
                dtype: Some(Want::Known(t.dtype)),
            };
            (t.name.clone(), want)
        })
        .collect()
}

/// A dtype by its numpy, JAX, MLX (`mlx.core.float32`) or safetensors name.
fn parse_dtype(name: &str) -> Want {
    let short = name.rsplit('.').next().unwrap_or(name);
    let known = match short {
        "float64" | "F64" => Some(DType::F64),
        "float32" | "F32" => Some(DType::F32),
        "float16" | "F16" => Some(DType::F16),
        "bfloat16" | "BF16" => Some(DType::BF16),
        "int64" | "I64" => Some(DType::I64),
        "int32" | "I32" => Some(DType::I32),
        "int16" | "I16" => Some(DType::I16),
        "int8" | "I8" => Some(DType::I8),
        "uint8" | "U8" => Some(DType::U8),
        "bool" | "bool_" | "BOOL" => Some(DType::Bool),
        "float8_e4m3fn" | "F8_E4M3" => Some(DType::F8E4M3),
        "float8_e5m2" | "F8_E5M2" => Some(DType::F8E5M2),
        _ => None,
    };
    known.map_or_else(|| Want::Other(name.to_string()), Want::Known)
}

/// Adds one tensor, refusing duplicates and oversized names or counts.
fn insert(
    out: &mut BTreeMap<String, Expected>,
    name: String,
    want: Expected,
) -> std::result::Result<(), String> {
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "a tensor name of {} bytes exceeds the limit of {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if want.shape.len() > MAX_RANK {
        return Err(format!(
            "'{name}': rank {} exceeds the limit of {MAX_RANK}",
            want.shape.len()
        ));
    }
    if out.len() >= MAX_TENSORS {
        return Err(format!("more than {MAX_TENSORS} tensors"));
    }
    if out.contains_key(&name) {
        return Err(format!("'{name}' is given twice"));
    }
    out.insert(name, want);
    Ok(())
}

// ---------------------------------------------------------------------------------
// JSON

fn from_json(bytes: &[u8]) -> std::result::Result<BTreeMap<String, Expected>, String> {
    // serde_json bounds nesting at 128 levels, so the walk below is bounded too.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    let serde_json::Value::Object(top) = value else {
        return Err(
            "the top level is not a JSON object of {name: {\"shape\": [...], \"dtype\": ...}}"
                .to_string(),
        );
    };
    let mut out = BTreeMap::new();
    json_module(&top, "", &mut out)?;
    Ok(out)
}

fn json_module(
    obj: &serde_json::Map<String, serde_json::Value>,
    path: &str,
    out: &mut BTreeMap<String, Expected>,
) -> std::result::Result<(), String> {
    use serde_json::Value;
    for (key, value) in obj {
        let name = join(path, key);
        if name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "a tensor name of {} bytes exceeds the limit of {MAX_NAME_BYTES}",
                name.len()
            ));
        }
        match value {
            Value::Array(_) => {
                let shape = json_shape(value, &name)?;
                insert(out, name, Expected { shape, dtype: None })?;
            }
            Value::Object(fields) => match fields.get("shape") {
                // An object without a list under "shape" is a module.
                None | Some(Value::Object(_)) => json_module(fields, &name, out)?,
                Some(shape) => {
                    let shape = json_shape(shape, &name)?;
                    let dtype = match fields.get("dtype") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(d)) => Some(parse_dtype(d)),
                        Some(other) => {
                            return Err(format!(
                                "'{name}': 'dtype' is {}, not a string",
                                json_kind(other)
                            ))
                        }
                    };
                    insert(out, name, Expected { shape, dtype })?;
                }
            },
            other => {
                return Err(format!(
                    "'{name}' is {}, neither {{\"shape\": [...], \"dtype\": ...}} nor a module",
                    json_kind(other)
                ))
            }
        }
    }
    Ok(())
}

fn json_shape(v: &serde_json::Value, name: &str) -> std::result::Result<Vec<usize>, String> {
    let bad = || format!("'{name}': 'shape' is not a list of non-negative integers");
    let list = v.as_array().ok_or_else(bad)?;
    if list.len() > MAX_RANK {
        return Err(format!(
            "'{name}': rank {} exceeds the limit of {MAX_RANK}",
            list.len()
        ));
    }
    list.iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(bad)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------
// msgpack (https://github.com/msgpack/msgpack/blob/master/spec.md), the subset Flax
// writes, parsed in place: strings and binary payloads stay slices of the file.

/// Ext type codes of `flax.serialization`.
const EXT_NDARRAY: i8 = 1;
const EXT_NPSCALAR: i8 = 3;
/// The key that marks a chunked array map.
const CHUNKED: &str = "__msgpack_chunked_array__";

/// One decoded msgpack value; tensor payloads are reduced to shape and dtype name.
#[derive(Debug)]
enum Value<'a> {
    Map(Vec<(String, Value<'a>)>),
    Array(Vec<Value<'a>>),
    /// Non-negative integers only; a negative one is `Other`.
    UInt(u64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Tensor {
        shape: Vec<usize>,
        dtype: &'a [u8],
    },
    /// nil, booleans, floats, negative integers, other ext types: not tensors.
    Other,
}

struct Msgpack<'a> {
    bytes: &'a [u8],
    pos: usize,
    values: usize,
}

impl<'a> Msgpack<'a> {
    fn new(bytes: &'a [u8]) -> Msgpack<'a> {
        Msgpack {
            bytes,
            pos: 0,
            values: 0,
        }
    }

    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        let left = self.bytes.len() - self.pos.min(self.bytes.len());
        let slice = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .and_then(|end| self.bytes.get(self.pos..end))
            .ok_or_else(|| {
                format!(
                    "truncated msgpack: {n} bytes declared at byte {} but only {left} remain",
                    self.pos
                )
            })?;
        self.pos += slice.len();
        Ok(slice)
    }

    /// A big-endian unsigned integer of `n` bytes.
    fn uint(&mut self, n: u64) -> std::result::Result<u64, String> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn value(&mut self, depth: usize) -> std::result::Result<Value<'a>, String> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(format!("more than {MAX_VALUES} msgpack values"));
        }
        let at = self.pos;
        let marker = self.uint(1)?;
        let nested = |len: u64, this: &mut Self, map: bool| {
            if depth >= MAX_DEPTH {
                return Err(format!(
                    "msgpack nested deeper than {MAX_DEPTH} levels at byte {at}"
                ));
            }
            if map {
                this.map(len, depth + 1)
            } else {
                this.array(len, depth + 1)
            }
        };
        Ok(match marker {
            0x00..=0x7f => Value::UInt(marker),
            0x80..=0x8f => nested(marker & 0x0f, self, true)?,
            0x90..=0x9f => nested(marker & 0x0f, self, false)?,
            0xa0..=0xbf => Value::Str(self.take(marker & 0x1f)?),
            0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => Value::Other,
            0xc4..=0xc6 => {
                let n = self.uint(1 << (marker - 0xc4))?;
                Value::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.uint(1 << (marker - 0xc7))?;
                self.ext(n)?
            }
            0xca => {
                self.take(4)?;
                Value::Other
            }
            0xcb => {
                self.take(8)?;
                Value::Other
            }
            0xcc..=0xcf => Value::UInt(self.uint(1 << (marker - 0xcc))?),
            0xd0..=0xd3 => {
                let n = 1u64 << (marker - 0xd0);
                let v = self.uint(n)?;
                let negative = v >> (n * 8 - 1) != 0;
                if negative {
                    Value::Other
                } else {
                    Value::UInt(v)
                }
            }
            0xd4..=0xd8 => self.ext(1 << (marker - 0xd4))?,
            0xd9..=0xdb => {
                let n = self.uint(1 << (marker - 0xd9))?;
                Value::Str(self.take(n)?)
            }
            0xdc | 0xdd => {
                let n = self.uint(if marker == 0xdc { 2 } else { 4 })?;
                nested(n, self, false)?
            }
            0xde | 0xdf => {
                let n = self.uint(if marker == 0xde { 2 } else { 4 })?;
                nested(n, self, true)?
            }
            // 0xc1 is the one byte the spec never uses.
            _ => return Err(format!("invalid msgpack byte 0x{marker:02x} at byte {at}")),
        })
    }

    // Entries are pushed one by one, never reserved from the declared count: a count
    // larger than the bytes left fails on the first missing entry instead.
    fn map(&mut self, n: u64, depth: usize) -> std::result::Result<Value<'a>, String> {
        let mut entries = Vec::new();
        for _ in 0..n {
            let at = self.pos;
            let key = match self.value(depth)? {
                Value::Str(s) | Value::Bin(s) => std::str::from_utf8(s)
                    .map_err(|_| format!("map key at byte {at} is not UTF-8"))?
                    .to_string(),
                Value::UInt(i) => i.to_string(),
                other => return Err(format!("map key at byte {at} is {}", kind(&other))),
            };
            if key.len() > MAX_NAME_BYTES {
                return Err(format!(
                    "map key of {} bytes at byte {at} exceeds the limit of {MAX_NAME_BYTES}",
                    key.len()
                ));
            }
            entries.push((key, self.value(depth)?));
        }
        Ok(Value::Map(entries))
    }

    fn array(&mut self, n: u64, depth: usize) -> std::result::Result<Value<'a>, String> {
        let mut items = Vec::new();
        for _ in 0..n {
            items.push(self.value(depth)?);
        }
        Ok(Value::Array(items))
    }

    /// An ext value of `n` data bytes: an ndarray or numpy scalar becomes a tensor,
    /// anything else is skipped.
    fn ext(&mut self, n: u64) -> std::result::Result<Value<'a>, String> {
        let code = self.uint(1)? as u8 as i8;
        let at = self.pos;
        let data = self.take(n)?;
        if code != EXT_NDARRAY && code != EXT_NPSCALAR {
            return Ok(Value::Other);
        }
        let bad = |detail: &str| format!("array at byte {at}: {detail}");
        // The payload is its own msgpack document: (shape, dtype name, raw bytes).
        let mut inner = Msgpack::new(data);
        inner.values = self.values;
        let payload = inner.value(MAX_DEPTH - 2);
        self.values = inner.values;
        let Value::Array(items) = payload? else {
            return Err(bad("payload is not a (shape, dtype, bytes) triple"));
        };
        let [Value::Array(dims), dtype, _data] = items.as_slice() else {
            return Err(bad("payload is not a (shape, dtype, bytes) triple"));
        };
        let (Value::Str(dtype) | Value::Bin(dtype)) = dtype else {
            return Err(bad("dtype name is not a string"));
        };
        let shape = dims
            .iter()
            .map(|d| match d {
                Value::UInt(d) => usize::try_from(*d).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        Ok(Value::Tensor { shape, dtype })
    }
}

fn kind(v: &Value<'_>) -> &'static str {
    match v {
        Value::Map(_) => "a map",
        Value::Array(_) => "an array",
        Value::UInt(_) => "an integer",
        Value::Str(_) => "a string",
        Value::Bin(_) => "binary",
        Value::Tensor { .. } => "an array",
        Value::Other => "a value that is not a string",
    }
}

fn from_msgpack(bytes: &[u8]) -> std::result::Result<BTreeMap<String, Expected>, String> {
    let mut parser = Msgpack::new(bytes);
    let top = parser.value(0)?;
    if parser.pos != bytes.len() {
        return Err(format!(
            "{} bytes after the end of the msgpack value",
            bytes.len() - parser.pos
        ));
    }
    if !matches!(top, Value::Map(_)) {
        return Err(format!(
            "the top level is {}, not a map of variables",
            kind(&top)
        ));
    }
    let mut out = BTreeMap::new();
    msgpack_leaves(&top, "", &mut out)?;
    Ok(out)
}

/// Walks the tree (bounded by [`MAX_DEPTH`] at parse time) into `out`.
fn msgpack_leaves(
    v: &Value<'_>,
    name: &str,
    out: &mut BTreeMap<String, Expected>,
) -> std::result::Result<(), String> {
    match v {
        Value::Map(entries) if entries.iter().any(|(k, _)| k == CHUNKED) => {
            let want = unchunk(entries).map_err(|e| format!("'{name}': {e}"))?;
            insert(out, name.to_string(), want)
        }
        Value::Map(entries) => {
            let mut seen = BTreeSet::new();
            for (k, child) in entries {
                let child_name = join(name, k);
                if !seen.insert(k.as_str()) {
                    return Err(format!("map key '{child_name}' is given twice"));
                }
                msgpack_leaves(child, &child_name, out)?;
            }
            Ok(())
        }
        // Lists serialised without flax's list-to-dict step: indices as keys.
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                msgpack_leaves(child, &join(name, &i.to_string()), out)?;
            }
            Ok(())
        }
        Value::Tensor { shape, dtype } => {
            let dtype = String::from_utf8_lossy(dtype);
            let want = Expected {
                shape: shape.clone(),
                dtype: Some(parse_dtype(&dtype)),
            };
            insert(out, name.to_string(), want)
        }
        // Step counters and other plain values are not tensors.
        Value::UInt(_) | Value::Str(_) | Value::Bin(_) | Value::Other => Ok(()),
    }
}

/// The shape and dtype of a chunked array: `{"shape": {"0": d0, …}, "chunks": {"0":
/// ndarray, …}}`, the chunks being flat pieces of the array.
fn unchunk(entries: &[(String, Value<'_>)]) -> std::result::Result<Expected, String> {
    let field = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let bad = || "malformed chunked array".to_string();
    let Some(Value::Map(dims)) = field("shape") else {
        return Err(bad());
    };
    let mut shape = Vec::new();
    for i in 0..dims.len() {
        let key = i.to_string();
        match dims.iter().find(|(k, _)| *k == key) {
            Some((_, Value::UInt(d))) => shape.push(usize::try_from(*d).map_err(|_| bad())?),
            _ => return Err(bad()),
        }
    }
    let dtype = match field("chunks") {
        Some(Value::Map(chunks)) => chunks.iter().find_map(|(_, c)| match c {
            Value::Tensor { dtype, .. } => Some(parse_dtype(&String::from_utf8_lossy(dtype))),
            _ => None,
        }),
        _ => return Err(bad()),
    };
    Ok(Expected { shape, dtype })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file named `name` holding `bytes`, in a folder of its own per test.
    fn file(test: &str, name: &str, bytes: &[u8]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("relayout-verify-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Loads `bytes` as an expectation file named `name`, leaving no file behind.
    fn load(test: &str, name: &str, bytes: &[u8]) -> Result<Expectation> {
        let path = file(test, name, bytes);
        let got = Expectation::from_file(&path);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        got
    }

    /// The detail of an `Error::Expectation`, failing on any other outcome.
    fn detail(r: Result<Expectation>) -> String {
        match r {
            Err(Error::Expectation { detail, .. }) => detail,
            other => panic!("expected Error::Expectation, got {other:?}"),
        }
    }

    fn want(shape: &[usize], dtype: Option<DType>) -> Expected {
        Expected {
            shape: shape.to_vec(),
            dtype: dtype.map(Want::Known),
        }
    }

    // ---- msgpack encoding, by hand ----

    fn mp_str(s: &str) -> Vec<u8> {
        assert!(s.len() < 32);
        let mut v = vec![0xa0 | s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn mp_map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        assert!(entries.len() < 16);
        let mut v = vec![0x80 | entries.len() as u8];
        for (k, val) in entries {
            v.extend(mp_str(k));
            v.extend_from_slice(val);
        }
        v
    }

    /// What `_ndarray_to_bytes` writes: packb((shape, dtype name, raw bytes)).
    fn mp_payload(shape: &[u8], dtype: &str, data_len: u8) -> Vec<u8> {
        let mut v = vec![0x93, 0x90 | shape.len() as u8];
        v.extend_from_slice(shape);
        v.extend(mp_str(dtype));
        v.extend([0xc4, data_len]);
        v.extend(std::iter::repeat_n(0xEE, data_len as usize));
        v
    }

    /// ext 8 holding `payload` with type `code`.
    fn mp_ext(code: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0xc7, payload.len() as u8, code];
        v.extend_from_slice(payload);
        v
    }

    fn mp_array(shape: &[u8], dtype: &str, data_len: u8) -> Vec<u8> {
        mp_ext(1, &mp_payload(shape, dtype, data_len))
    }

    /// `{"params": {"fc": {"kernel": f32[16, 10], "bias": f32[10]}}, "step": 7,
    /// "batch_stats": {"bn": {"mean": bf16 scalar ext 3}}}`
    fn flax_msgpack() -> Vec<u8> {
        mp_map(&[
            (
                "params",
                mp_map(&[(
                    "fc",
                    mp_map(&[
                        ("kernel", mp_array(&[16, 10], "float32", 8)),
                        ("bias", mp_array(&[10], "float32", 4)),
                    ]),
                )]),
            ),
            ("step", vec![0x07]),
            (
                "batch_stats",
                mp_map(&[(
                    "bn",
                    mp_map(&[("mean", mp_ext(3, &mp_payload(&[], "bfloat16", 2)))]),
                )]),
            ),
        ])
    }

    #[test]
    fn json_with_numpy_and_safetensors_dtype_names_loads() {
        let e = load(
            "json-flat",
            "e.json",
            br#"{"params.fc.kernel": {"shape": [16, 10], "dtype": "float32"},
                "params.fc.bias": {"shape": [10], "dtype": "BF16"},
                "a": {"shape": [], "dtype": "mlx.core.bool"},
                "b": {"shape": [2], "dtype": null},
                "c": {"shape": [3], "dtype": "uint32"}}"#,
        )
        .unwrap();
        assert_eq!(e.len(), 5);
        assert_eq!(
            e.tensors["params.fc.kernel"],
            want(&[16, 10], Some(DType::F32))
        );
        assert_eq!(e.tensors["params.fc.bias"], want(&[10], Some(DType::BF16)));
        assert_eq!(e.tensors["a"], want(&[], Some(DType::Bool)));
        assert_eq!(e.tensors["b"], want(&[2], None));
        assert_eq!(e.tensors["c"].dtype, Some(Want::Other("uint32".into())));
    }

    #[test]
    fn every_dtype_is_known_by_its_numpy_and_safetensors_names() {
        for d in DType::ALL {
            assert_eq!(parse_dtype(d.safetensors_name()), Want::Known(d));
        }
        let numpy = [
            "float64",
            "float32",
            "float16",
            "bfloat16",
            "int64",
            "int32",
            "int16",
            "int8",
            "uint8",
            "bool",
            "float8_e4m3fn",
            "float8_e5m2",
        ];
        for (name, d) in numpy.into_iter().zip(DType::ALL) {
            assert_eq!(parse_dtype(name), Want::Known(d), "{name}");
        }
    }

    #[test]
    fn json_nested_modules_and_bare_shapes_load_with_dotted_names() {
        let e = load(
            "json-nested",
            "e.json",
            br#"{"params": {"fc": {"kernel": {"shape": [16, 10]}, "bias": [10]},
                            "shape": {"w": [1]}}}"#,
        )
        .unwrap();
        let names: Vec<&str> = e.tensors.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["params.fc.bias", "params.fc.kernel", "params.shape.w"]
        );
        assert_eq!(e.tensors["params.fc.bias"], want(&[10], None));
    }

    #[test]
    fn malformed_json_expectations_are_clear_errors() {
        let cases: [(&[u8], &str); 10] = [
            (b"[1, 2]", "not a JSON object"),
            (b"{\"a\": ", "invalid JSON"),
            (br#"{"a": 3}"#, "'a' is a number"),
            (br#"{"m": {"a": "x"}}"#, "'m.a' is a string"),
            (br#"{"a": {"shape": "16"}}"#, "'a': 'shape' is not a list"),
            (br#"{"a": {"shape": [-1]}}"#, "'a': 'shape' is not a list"),
            (br#"{"a": {"shape": [1.5]}}"#, "'a': 'shape' is not a list"),
            (
                br#"{"a": {"shape": [1], "dtype": 4}}"#,
                "'dtype' is a number",
            ),
            (br#"{"a.b": [1], "a": {"b": [1]}}"#, "'a.b' is given twice"),
            (
                br#"{"a": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}"#,
                "rank 33",
            ),
        ];
        for (bytes, want) in cases {
            let d = detail(load("json-bad", "e.json", bytes));
            assert!(d.contains(want), "{}: {d}", String::from_utf8_lossy(bytes));
        }
        let long = format!("{{\"{}\": [1]}}", "x".repeat(MAX_NAME_BYTES + 1));
        assert!(detail(load("json-bad", "e.json", long.as_bytes())).contains("limit"));
    }

    #[test]
    fn json_over_the_size_limit_is_refused_before_reading_it() {
        let path = file("json-big", "big.json", b"{");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(MAX_JSON_BYTES + 1)
            .unwrap();
        let err = Expectation::from_file(&path).unwrap_err();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        let msg = err.to_string();
        assert!(matches!(err, Error::Expectation { .. }), "{err:?}");
        assert!(msg.contains("big.json") && msg.contains("limit"), "{msg}");
    }

    #[test]
    fn empty_files_and_folders_are_not_expectations() {
        assert!(detail(load("empty", "e.json", b"")).contains("empty"));
        let dir = file("dir", "x", b"").parent().unwrap().to_path_buf();
        let got = Expectation::from_file(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(detail(got).contains("regular file"));
        let err = Expectation::from_file("/nonexistent/e.json").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    fn safetensors_bytes() -> Vec<u8> {
        let h = r#"{"params.fc.kernel":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"__metadata__":{"k":"v"}}"#;
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&[0; 12]);
        bytes
    }

    #[test]
    fn safetensors_expectation_takes_names_dtypes_and_shapes_from_the_header() {
        let e = load("st", "e.safetensors", &safetensors_bytes()).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(
            e.tensors["params.fc.kernel"],
            want(&[2, 3], Some(DType::BF16))
        );
        // Told by content without the extension.
        let e2 = load("st", "e.bin", &safetensors_bytes()).unwrap();
        assert_eq!(e.tensors, e2.tensors);
    }

    #[test]
    fn a_torch_zip_named_safetensors_is_not_an_expectation() {
        let pt = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/small_cnn.pt"
        ))
        .unwrap();
        assert!(detail(load("st-zip", "e.safetensors", &pt)).contains("not safetensors"));
    }

    #[test]
    fn flax_msgpack_gives_dotted_names_and_skips_plain_values() {
        let e = load("mp", "e.msgpack", &flax_msgpack()).unwrap();
        let names: Vec<&str> = e.tensors.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["batch_stats.bn.mean", "params.fc.bias", "params.fc.kernel"]
        );
        assert_eq!(
            e.tensors["params.fc.kernel"],
            want(&[16, 10], Some(DType::F32))
        );
        assert_eq!(
            e.tensors["batch_stats.bn.mean"],
            want(&[], Some(DType::BF16))
        );
        // Told by content without the extension.
        let e2 = load("mp", "e.flax", &flax_msgpack()).unwrap();
        assert_eq!(e.tensors, e2.tensors);
    }

    #[test]
    fn msgpack_wide_encodings_and_chunked_arrays_are_read() {
        // map16 / str8 / array16 / uint16 / ext32 / bin8 dtype, and a chunked array as
        // flax writes arrays over 1 GiB: shape {"0": 70000, "1": 3}, chunks of flat f16.
        let mut payload = vec![0x93, 0xdc, 0, 2, 0xcd, 0x01, 0x00, 0xcc, 200];
        payload.extend([0xc4, 5]);
        payload.extend(b"int64");
        payload.extend([0xc4, 0]);
        let mut wide = vec![0xde, 0, 2, 0xd9, 1, b'w', 0xc9];
        wide.extend((payload.len() as u32).to_be_bytes());
        wide.push(1);
        wide.extend(&payload);
        let chunked = mp_map(&[
            ("__msgpack_chunked_array__", vec![0xc3]),
            (
                "shape",
                mp_map(&[("0", vec![0xce, 0, 1, 0x11, 0x70]), ("1", vec![3])]),
            ),
            (
                "chunks",
                mp_map(&[
                    ("0", mp_array(&[2], "float16", 4)),
                    ("1", mp_array(&[1], "float16", 2)),
                ]),
            ),
        ]);
        wide.extend(mp_str("big"));
        wide.extend(chunked);
        let e = load("mp-wide", "e.msgpack", &wide).unwrap();
        assert_eq!(e.tensors["w"], want(&[256, 200], Some(DType::I64)));
        assert_eq!(e.tensors["big"], want(&[70000, 3], Some(DType::F16)));
    }

    #[test]
    fn every_truncation_of_a_flax_msgpack_fails_cleanly() {
        let bytes = flax_msgpack();
        for len in 1..bytes.len() {
            let d = detail(load("mp-trunc", "e.msgpack", &bytes[..len]));
            assert!(!d.is_empty(), "len {len}");
        }
    }

    #[test]
    fn hostile_msgpack_is_refused_with_a_clear_error() {
        let mut deep = Vec::new();
        for _ in 0..1000 {
            deep.extend([0x81, 0xa1, b'a']);
        }
        deep.push(0xc0);
        let truncated = "truncated msgpack";
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (deep, "deeper than 64"),
            // map32 / array32 / str32 / ext32 / bin32 declaring 4 G entries or bytes.
            (vec![0xdf, 0xff, 0xff, 0xff, 0xff], truncated),
            (
                vec![0x81, 0xa1, b'a', 0xdd, 0xff, 0xff, 0xff, 0xff],
                truncated,
            ),
            (vec![0x81, 0xdb, 0xff, 0xff, 0xff, 0xff, b'a'], truncated),
            (
                vec![0x81, 0xa1, b'a', 0xc9, 0xff, 0xff, 0xff, 0xff, 1],
                truncated,
            ),
            (
                vec![0x81, 0xa1, b'a', 0xc6, 0xff, 0xff, 0xff, 0xff],
                truncated,
            ),
            (vec![0x81, 0xa1, b'a', 0xc1], "invalid msgpack byte 0xc1"),
            (vec![0x80, 0x00], "1 bytes after the end"),
            (vec![0x91, 0x80], "the top level is an array"),
            (vec![0x81, 0xc0, 0x00], "map key at byte 1 is a value"),
            (vec![0x81, 0xa1, 0xff, 0x00], "not UTF-8"),
            (
                [vec![0x81, 0xa1, b'a'], mp_ext(1, &[0x92, 0x90, 0xa0])].concat(),
                "not a (shape, dtype, bytes) triple",
            ),
            (
                [
                    vec![0x81, 0xa1, b'a'],
                    mp_ext(1, &[0x93, 0x91, 0xff, 0xa0, 0xc0]),
                ]
                .concat(),
                "shape is not a list",
            ),
            (
                [vec![0x81, 0xa1, b'a'], mp_ext(1, &[0x93, 0x90, 0x01, 0xc0])].concat(),
                "dtype name is not a string",
            ),
            (
                [vec![0x81, 0xa1, b'a'], mp_ext(1, &[0x93, 0x90, 0xa1])].concat(),
                truncated,
            ),
            (
                mp_map(&[("a", mp_map(&[("__msgpack_chunked_array__", vec![0xc3])]))]),
                "'a': malformed chunked array",
            ),
            (
                mp_map(&[("a", vec![0x01]), ("a", mp_array(&[1], "int8", 1))]),
                "map key 'a' is given twice",
            ),
        ];
        for (bytes, want) in cases {
            let d = detail(load("mp-bad", "e.msgpack", &bytes));
            assert!(d.contains(want), "{bytes:02x?}: {d}");
        }
        // A duplicated tensor name is refused.
        let dup = mp_map(&[
            ("a", mp_array(&[1], "int8", 1)),
            ("a", mp_array(&[1], "int8", 1)),
        ]);
        assert!(detail(load("mp-bad", "e.msgpack", &dup)).contains("given twice"));
    }

    #[test]
    fn unknown_content_without_extension_is_refused() {
        assert!(detail(load("sniff", "e.txt", b"hello")).contains("neither JSON"));
        let e = load("sniff", "e.txt", b"  {\"a\": [2]}").unwrap();
        assert_eq!(e.tensors["a"], want(&[2], None));
    }

    fn expectation(entries: &[(&str, &[usize], Option<DType>)]) -> Expectation {
        Expectation {
            path: PathBuf::from("want.json"),
            tensors: entries
                .iter()
                .map(|(n, s, d)| (n.to_string(), want(s, *d)))
                .collect(),
        }
    }

    #[test]
    fn a_matching_list_passes_and_dtype_is_compared_only_when_given() {
        let e = expectation(&[("a.w", &[2, 3], Some(DType::F32)), ("a.b", &[3], None)]);
        let r = e.check([
            ("a.w", DType::F32, &[2usize, 3][..]),
            ("a.b", DType::BF16, &[3][..]),
        ]);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.matched(), 2);
        assert_eq!(r.to_string(), "");
        assert_eq!(r.into_result().unwrap(), 2);
    }

    #[test]
    fn missing_leaves_of_one_module_share_a_line_and_whole_modules_are_one_line() {
        let mut entries: Vec<(String, Vec<usize>)> = vec![
            ("params.fc.kernel".into(), vec![16, 10]),
            ("params.fc.bias".into(), vec![10]),
            ("params.bn.scale".into(), vec![8]),
            ("params.bn.mean".into(), vec![8]),
            ("params.bn.var".into(), vec![8]),
            ("params.top".into(), vec![1]),
            ("top".into(), vec![1]),
            ("other".into(), vec![1]),
        ];
        for i in 0..3 {
            for leaf in ["conv.kernel", "bn.scale", "bn.bias"] {
                entries.push((format!("params.layer{i}.{leaf}"), vec![4]));
            }
        }
        for i in 0..9 {
            entries.push((format!("params.wide.w{i}"), vec![1]));
        }
        let list: Vec<(&str, &[usize], Option<DType>)> = entries
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice(), None))
            .collect();
        let e = expectation(&list);
        let present = [
            "params.bn.scale",
            "params.layer0.conv.kernel",
            "params.layer0.bn.scale",
            "params.layer0.bn.bias",
            "params.layer2.conv.kernel",
            "params.top",
            "other",
        ];
        let actual: Vec<(&str, DType, &[usize])> = entries
            .iter()
            .filter(|(n, _)| present.contains(&n.as_str()))
            .map(|(n, s)| (n.as_str(), DType::F32, s.as_slice()))
            .collect();
        let r = e.check(actual);
        assert_eq!(r.missing().len(), entries.len() - present.len());
        assert_eq!(
            r.to_string(),
            "missing     top\n\
             missing     params.bn.{mean,var}\n\
             missing     params.fc.{bias,kernel}\n\
             missing     params.layer1.* (3 tensors)\n\
             missing     params.layer2.bn.{bias,scale}\n\
             missing     params.wide.* (9 tensors)\n"
        );
    }

    #[test]
    fn unexpected_tensors_group_like_missing_ones_and_mismatches_show_both_sides() {
        let e = expectation(&[
            ("params.fc.kernel", &[16, 10], Some(DType::F32)),
            ("params.fc.bias", &[10], Some(DType::F32)),
            ("params.x", &[2], None),
            ("params.m.a", &[2], Some(DType::F32)),
            ("params.m.b", &[2], Some(DType::F32)),
            ("params.n.a", &[2], Some(DType::F32)),
            ("params.n.b", &[2], Some(DType::F32)),
        ]);
        let mut odd = Expectation::clone(&e);
        odd.tensors.insert(
            "params.q".into(),
            Expected {
                shape: vec![1],
                dtype: Some(Want::Other("uint32".into())),
            },
        );
        let r = odd.check([
            ("params.fc.kernel", DType::F32, &[10usize, 16][..]),
            ("params.fc.bias", DType::BF16, &[10][..]),
            ("params.x", DType::F16, &[3][..]),
            ("params.q", DType::U8, &[1][..]),
            ("batch_stats.bn.mean", DType::F32, &[8][..]),
            ("batch_stats.bn.var", DType::F32, &[8][..]),
            ("params.m.a", DType::BF16, &[2][..]),
            ("params.m.b", DType::BF16, &[2][..]),
            ("params.n.a", DType::BF16, &[2][..]),
            ("params.n.b", DType::F16, &[2][..]),
        ]);
        assert_eq!(r.unexpected().len(), 2);
        assert_eq!(r.mismatched().len(), 8);
        // Shape mismatches first, one line each; then dtype-only ones, grouped.
        assert_eq!(
            r.to_string(),
            "unexpected  batch_stats.bn.{mean,var}\n\
             mismatched  params.fc.kernel: [10, 16] F32, expected [16, 10] F32 (same sizes, other axis order)\n\
             mismatched  params.x: [3] F16, expected [2]\n\
             mismatched  params.n.b: [2] F16, expected [2] F32\n\
             mismatched  params.fc.bias: [10] BF16, expected [10] F32\n\
             mismatched  params.m.{a,b}: BF16, expected F32\n\
             mismatched  params.n.a: [2] BF16, expected [2] F32\n\
             mismatched  params.q: [1] U8, expected [1] uint32\n"
        );
        let err = r.into_result().unwrap_err();
        assert!(matches!(err, Error::Verify { .. }));
        assert_eq!(
            err.to_string(),
            "want.json: 0 missing, 2 unexpected and 8 mismatched tensor(s) against the 8 expected"
        );
    }

    #[test]
    fn a_name_that_is_both_a_tensor_and_a_module_is_grouped_on_both_counts() {
        let e = expectation(&[
            ("a.b", &[1], None),
            ("a.b.c", &[1], None),
            ("a.b.d", &[1], None),
            ("x.y", &[1], None),
            ("x.y.z", &[1], None),
        ]);
        let r = e.check([
            ("a.b", DType::F32, &[1usize][..]),
            ("x.y.z", DType::F32, &[1][..]),
        ]);
        assert_eq!(r.missing(), ["a.b.c", "a.b.d", "x.y"]);
        assert_eq!(r.to_string(), "missing     a.b.{c,d}\nmissing     x.y\n");
    }

    #[test]
    fn a_long_report_is_cut_after_the_line_limit_per_kind() {
        let names: Vec<String> = (0..MAX_REPORT_LINES + 5)
            .map(|i| format!("m{i}.w"))
            .collect();
        let e = expectation(&[]);
        let r = e.check(names.iter().map(|n| (n.as_str(), DType::F32, &[][..])));
        let text = r.to_string();
        assert_eq!(text.lines().count(), MAX_REPORT_LINES + 1);
        assert!(
            text.ends_with("unexpected  … and 5 more line(s)\n"),
            "{text}"
        );
    }

    #[test]
    fn a_plan_is_checked_by_its_targets_dtypes_and_target_shapes() {
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/small_cnn.pt");
        let ckpt = Checkpoint::open(fixture).unwrap();
        let plan = crate::rules::RuleSet::preset("flax")
            .unwrap()
            .plan(ckpt.tensors())
            .unwrap();
        let mut e = Expectation {
            path: PathBuf::from("want.json"),
            tensors: plan
                .entries
                .iter()
                .map(|p| (p.target.clone(), want(&p.target_shape, Some(p.dtype))))
                .collect(),
        };
        assert_eq!(
            e.check_plan(&plan).into_result().unwrap(),
            plan.entries.len()
        );
        e.tensors
            .get_mut("params.fc.kernel")
            .unwrap()
            .shape
            .reverse();
        let r = e.check_plan(&plan);
        assert_eq!(r.mismatched().len(), 1);
        assert_eq!(r.mismatched()[0].shape, [16, 10]);
    }
}
