//! Flax msgpack expectations (`flax.serialization.to_bytes`): a nested map whose array
//! leaves are ext type 1 (3 for numpy scalars) holding the msgpack triple (shape, dtype
//! name, raw bytes), arrays over 1 GiB split into `__msgpack_chunked_array__` maps.
//!
//! The subset of msgpack (<https://github.com/msgpack/msgpack/blob/master/spec.md>) that
//! Flax writes, parsed in place: strings and binary payloads stay slices of the file,
//! and the raw bytes are skipped, never read.

use std::collections::BTreeSet;

use super::expect::{insert, join, parse_dtype, Expected, Tensors, MAX_NAME_BYTES};

/// Deepest msgpack nesting accepted; Flax trees are a dozen levels at most, and the
/// parser recurses once per level.
const MAX_DEPTH: usize = 64;
/// Most msgpack values (maps, keys, leaves) in one file: bounds the memory a file can
/// make us allocate, whatever counts it declares.
const MAX_VALUES: usize = 1 << 22;
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

/// The expected tensors of a Flax msgpack file; errors are the detail of an
/// [`crate::Error::Expectation`].
pub(super) fn parse(bytes: &[u8]) -> std::result::Result<Tensors, String> {
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
    let mut out = Tensors::new();
    msgpack_leaves(&top, "", &mut out)?;
    Ok(out)
}

/// Walks the tree (bounded by [`MAX_DEPTH`] at parse time) into `out`.
fn msgpack_leaves(v: &Value<'_>, name: &str, out: &mut Tensors) -> std::result::Result<(), String> {
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
    use crate::dtype::DType;
    use crate::reader::expect::tests::{detail, load, want};

    // msgpack encoding, by hand.

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
    fn flax_msgpack_gives_dotted_names_and_skips_plain_values() {
        let e = load("mp", "e.msgpack", &flax_msgpack()).unwrap();
        let names: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["batch_stats.bn.mean", "params.fc.bias", "params.fc.kernel"]
        );
        assert_eq!(e["params.fc.kernel"], want(&[16, 10], Some(DType::F32)));
        assert_eq!(e["batch_stats.bn.mean"], want(&[], Some(DType::BF16)));
        // Told by content without the extension.
        let e2 = load("mp", "e.flax", &flax_msgpack()).unwrap();
        assert_eq!(e, e2);
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
        assert_eq!(e["w"], want(&[256, 200], Some(DType::I64)));
        assert_eq!(e["big"], want(&[70000, 3], Some(DType::F16)));
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
}
