//! safetensors: `u64` little-endian header length N, N bytes of JSON
//! (`{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {k: v}}`), then
//! the data section; offsets are relative to the data section's start.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{Parsed, TensorInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{checked_bytes, contiguous_strides};

/// Largest header relayout accepts (the `safetensors` crate uses the same bound).
pub(crate) const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Highest rank accepted; real models stay far below it.
const MAX_RANK: usize = 32;

/// True when the bytes start like a safetensors file.
pub(crate) fn sniff(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes.get(8) == Some(&b'{')
}

/// Parses the header of a mapped safetensors file; the storages are the tensors' byte
/// ranges of the map.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let header_err = |detail: String| Error::SafetensorsHeader {
        path: path.to_path_buf(),
        detail,
    };
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "{} bytes, shorter than the 8-byte header length",
                bytes.len()
            ),
        })?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(Error::HeaderTooLarge {
            path: path.to_path_buf(),
            size: n,
            limit: MAX_HEADER_BYTES,
        });
    }
    // n <= MAX_HEADER_BYTES fits in usize on every supported target.
    let n = n as usize;
    let header = bytes.get(8..8 + n).ok_or_else(|| Error::Truncated {
        path: path.to_path_buf(),
        detail: format!(
            "the header says it is {n} bytes but the file holds only {} after the length",
            bytes.len() - 8
        ),
    })?;
    let data_start = 8 + n;
    let data_len = bytes.len() - data_start;
    let header = std::str::from_utf8(header).map_err(|e| header_err(format!("not UTF-8: {e}")))?;
    let json: serde_json::Map<String, Value> = match strict_json(header.trim_end()) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(header_err("the header is not a JSON object".to_string())),
        Err(e) => return Err(header_err(format!("invalid JSON: {e}"))),
    };

    let mut parsed = Parsed::default();
    let mut ranges = Vec::with_capacity(json.len());
    for (name, entry) in &json {
        if name == "__metadata__" {
            parsed.metadata = parse_metadata(entry).map_err(header_err)?;
            continue;
        }
        let bad = |detail: String| Error::BadTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            detail,
        };
        let obj = entry
            .as_object()
            .ok_or_else(|| bad("entry is not a JSON object".to_string()))?;
        let dtype_name = obj
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing string field 'dtype'".to_string()))?;
        let dtype =
            DType::from_safetensors_name(dtype_name).ok_or_else(|| Error::UnsupportedDType {
                path: path.to_path_buf(),
                dtype: format!("{dtype_name} (tensor '{name}')"),
            })?;
        let shape = usize_list(obj.get("shape"))
            .ok_or_else(|| bad("'shape' is not a list of non-negative integers".to_string()))?;
        if shape.len() > MAX_RANK {
            return Err(bad(format!(
                "rank {} exceeds the limit of {MAX_RANK}",
                shape.len()
            )));
        }
        let offsets = usize_list(obj.get("data_offsets"))
            .filter(|o| o.len() == 2)
            .ok_or_else(|| {
                bad("'data_offsets' is not a pair of non-negative integers".to_string())
            })?;
        let (start, end) = (offsets[0], offsets[1]);
        let size = checked_bytes(&shape, dtype.size())
            .ok_or_else(|| bad(format!("shape {shape:?} of {dtype} overflows 2^63 bytes")))?;
        if end < start || end - start != size {
            return Err(bad(format!(
                "data_offsets [{start}, {end}] do not span the {size} bytes of a {dtype} tensor of shape {shape:?}"
            )));
        }
        ranges.push((start, end, name.as_str()));
        parsed.tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            strides: contiguous_strides(&shape),
            shape,
            offset: 0,
            storage: parsed.storages.len(),
        });
        let abs = |o: usize| data_start.saturating_add(o);
        parsed.storages.push(abs(start)..abs(end));
    }

    let needed = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    if needed > data_len {
        return Err(Error::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "the data section holds {data_len} bytes but its tensors need {needed}"
            ),
        });
    }
    ranges.sort_unstable();
    // The data section is the tensors, back to back: no overlap, no hole, nothing after
    // (as the reference implementation requires; bytes nobody owns could hide anything).
    let mut at = 0usize;
    let mut previous: Option<&str> = None;
    for &(start, end, name) in &ranges {
        let bad = |detail: String| Error::BadTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            detail,
        };
        if start < at {
            return Err(bad(format!(
                "its bytes overlap those of '{}'",
                previous.unwrap_or("?")
            )));
        }
        if start > at {
            return Err(bad(format!(
                "it starts at data byte {start}, leaving a hole of {} bytes after {}",
                start - at,
                previous.map_or("the header".to_string(), |p| format!("'{p}'"))
            )));
        }
        at = end;
        previous = Some(name);
    }
    if at != data_len {
        return Err(header_err(format!(
            "{} bytes follow the last tensor's data",
            data_len - at
        )));
    }
    // Tensors in file order, as every other reader of the format lists them.
    let mut order: Vec<usize> = (0..parsed.tensors.len()).collect();
    order.sort_by_key(|&i| parsed.storages[i].start);
    let tensors = std::mem::take(&mut parsed.tensors);
    let storages = std::mem::take(&mut parsed.storages);
    for (new, &i) in order.iter().enumerate() {
        let mut t = tensors[i].clone();
        t.storage = new;
        parsed.tensors.push(t);
        parsed.storages.push(storages[i].clone());
    }
    Ok(parsed)
}

/// Parses JSON like `serde_json`, but refuses an object with the same key twice (at any
/// depth): the reference implementations refuse such headers, and taking either entry
/// would let two readers see different tensors in one file.
pub(crate) fn strict_json(text: &str) -> std::result::Result<Value, serde_json::Error> {
    strict_json_at(text, usize::MAX, &mut Vec::new())
}

/// [`strict_json`] that also refuses arrays and objects nested deeper than `max_depth`,
/// and leaves in `trail` the key path (object keys, array indices) where it failed.
pub(crate) fn strict_json_at(
    text: &str,
    max_depth: usize,
    trail: &mut Vec<String>,
) -> std::result::Result<Value, serde_json::Error> {
    use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

    struct Strict<'t> {
        depth: usize,
        max_depth: usize,
        trail: &'t mut Vec<String>,
    }

    impl Strict<'_> {
        fn nested<E: serde::de::Error>(&mut self) -> std::result::Result<Strict<'_>, E> {
            if self.depth >= self.max_depth {
                return Err(E::custom(format!(
                    "nested deeper than {} levels",
                    self.max_depth
                )));
            }
            Ok(Strict {
                depth: self.depth + 1,
                max_depth: self.max_depth,
                trail: self.trail,
            })
        }
    }

    impl<'de> DeserializeSeed<'de> for Strict<'_> {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Strict<'_> {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
            Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
            Ok(Value::String(v.to_string()))
        }
        fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E>(self) -> std::result::Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> std::result::Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(
            mut self,
            mut seq: A,
        ) -> std::result::Result<Value, A::Error> {
            let mut out = Vec::new();
            loop {
                let index = out.len().to_string();
                let inner = self.nested()?;
                inner.trail.push(index);
                let next = seq.next_element_seed(inner)?;
                self.trail.pop();
                match next {
                    Some(v) => out.push(v),
                    None => break,
                }
            }
            Ok(Value::Array(out))
        }
        fn visit_map<A: MapAccess<'de>>(
            mut self,
            mut map: A,
        ) -> std::result::Result<Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(key) = map.next_key::<String>()? {
                let inner = self.nested()?;
                inner.trail.push(key.clone());
                let value = map.next_value_seed(inner)?;
                if out.contains_key(&key) {
                    return Err(A::Error::custom(format!("the key '{key}' appears twice")));
                }
                self.trail.pop();
                out.insert(key, value);
            }
            Ok(Value::Object(out))
        }
    }

    let mut de = serde_json::Deserializer::from_str(text);
    let value = Strict {
        depth: 0,
        max_depth,
        trail,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

fn usize_list(v: Option<&Value>) -> Option<Vec<usize>> {
    v?.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
        .collect()
}

fn parse_metadata(v: &Value) -> std::result::Result<BTreeMap<String, String>, String> {
    // MLX's save_safetensors writes `"__metadata__": null` when given none; the format's
    // own readers take it as no metadata.
    if v.is_null() {
        return Ok(BTreeMap::new());
    }
    let obj = v
        .as_object()
        .ok_or_else(|| "'__metadata__' is not an object".to_string())?;
    obj.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(format!("'__metadata__' value of '{k}' is not a string")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn parse_err(bytes: &[u8]) -> Error {
        parse(Path::new("x.safetensors"), bytes).expect_err("must fail")
    }

    #[test]
    fn valid_file_gives_tensors_in_file_order_with_metadata() {
        let h = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},"__metadata__":{"k":"v"}}"#;
        let p = parse(Path::new("x"), &file(h, &[0; 11])).unwrap();
        let names: Vec<&str> = p.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        let start = 8 + h.len();
        assert_eq!(p.storages, vec![start..start + 8, start + 8..start + 11]);
        assert_eq!(p.metadata["k"], "v");
    }

    #[test]
    fn null_metadata_as_mlx_writes_it_is_no_metadata() {
        let h = r#"{"__metadata__":null,"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#;
        let p = parse(Path::new("x"), &file(h, &[1, 2, 3])).unwrap();
        assert!(p.metadata.is_empty());
        assert_eq!(p.tensors.len(), 1);
        // Any other non-object is still malformed.
        for h in [r#"{"__metadata__":[]}"#, r#"{"__metadata__":"k"}"#] {
            assert!(matches!(
                parse_err(&file(h, b"")),
                Error::SafetensorsHeader { .. }
            ));
        }
    }

    #[test]
    fn shorter_than_the_length_prefix_is_truncated() {
        assert!(matches!(parse_err(&[1, 0, 0]), Error::Truncated { .. }));
    }

    #[test]
    fn header_longer_than_the_file_is_truncated() {
        let mut bytes = file("{}", b"");
        bytes[0] = 200;
        assert!(matches!(parse_err(&bytes), Error::Truncated { .. }));
    }

    #[test]
    fn header_over_the_limit_is_refused_before_reading_it() {
        let mut bytes = vec![0u8; 16];
        bytes[..8].copy_from_slice(&(MAX_HEADER_BYTES + 1).to_le_bytes());
        assert!(matches!(parse_err(&bytes), Error::HeaderTooLarge { .. }));
    }

    #[test]
    fn malformed_headers_are_header_errors() {
        for h in ["{\"a\":", "[1,2]", "{\"__metadata__\":{\"k\":1}}"] {
            let err = parse_err(&file(h, b""));
            assert!(
                matches!(err, Error::SafetensorsHeader { .. }),
                "{h}: {err:?}"
            );
        }
        let mut bytes = file("{\"a\":1}", b"");
        bytes[9] = 0xff;
        assert!(matches!(parse_err(&bytes), Error::SafetensorsHeader { .. }));
    }

    #[test]
    fn unknown_dtype_is_unsupported() {
        let h = r#"{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#;
        let err = parse_err(&file(h, &[0; 8]));
        assert!(matches!(err, Error::UnsupportedDType { .. }), "{err:?}");
    }

    #[test]
    fn bad_tensor_entries_name_the_tensor() {
        let cases = [
            r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
            r#"{"t":{"shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"t":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}}"#,
            r#"{"t":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#,
            r#"{"t":4}"#,
        ];
        for h in cases {
            let err = parse_err(&file(h, &[0; 8]));
            assert!(
                matches!(&err, Error::BadTensor { tensor, .. } if tensor == "t"),
                "{h}: {err:?}"
            );
        }
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let err = parse_err(&file(h, &[0; 8]));
        assert!(err.to_string().contains("overlap"), "{err}");
    }

    #[test]
    fn every_truncation_of_a_valid_file_fails_cleanly() {
        let h = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        let bytes = file(h, &[7; 16]);
        for len in 0..bytes.len() {
            assert!(parse(Path::new("x"), &bytes[..len]).is_err(), "len {len}");
        }
        assert!(parse(Path::new("x"), &bytes).is_ok());
    }
}
