//! Expectation files: the tensor names, shapes and dtypes a target model expects, read
//! here for [`crate::verify`] to compare. An expectation file is one of
//! - JSON: `{"params.fc.kernel": {"shape": [16, 10], "dtype": "float32"}, …}`; `dtype`
//!   is optional and takes numpy (`bfloat16`) or safetensors (`BF16`) names; nested
//!   objects are modules (`{"params": {"fc": {"kernel": {"shape": …}}}}`), and a bare
//!   list is a shape;
//! - safetensors: the header's names, dtypes and shapes (the data is never read);
//! - Flax msgpack, read by [`super::msgpack`].
//!
//! Nested keys are joined with '.', as `flax.traverse_util.flatten_dict(…, sep='.')`
//! joins them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use super::{Checkpoint, Format};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Largest JSON expectation parsed: about a million tensors, far above any model.
const MAX_JSON_BYTES: u64 = 64 << 20;
/// Most tensors in an expectation; the largest models have tens of thousands.
const MAX_TENSORS: usize = 1 << 20;
/// Longest tensor name, joined; real names are a few hundred bytes.
pub(super) const MAX_NAME_BYTES: usize = 4096;
/// Highest rank accepted, as in the safetensors reader.
const MAX_RANK: usize = 32;

/// The dtype an expectation asks for: one relayout knows, or a name it does not
/// (`uint32`, `complex64`), which no output can match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Want {
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

/// One expected tensor: its shape and, when the file gives one, its dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    pub shape: Vec<usize>,
    pub dtype: Option<Want>,
}

/// Expected tensors by dotted name.
pub(crate) type Tensors = BTreeMap<String, Expected>;

/// Reads an expectation file: JSON, safetensors or Flax msgpack, told by the extension
/// (`.json`, `.safetensors`, `.msgpack`) or else by the first bytes.
pub(crate) fn read(path: &Path) -> Result<Tensors> {
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
    let file = super::map_file(path)?;
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
        Kind::Msgpack => super::msgpack::parse(bytes).map_err(bad)?,
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
    Ok(tensors)
}

/// `path.part`, or `part` at the top: names as `flatten_dict(…, sep='.')` joins them.
pub(crate) fn join(path: &str, part: &str) -> String {
    if path.is_empty() {
        part.to_string()
    } else {
        format!("{path}.{part}")
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

fn tensors_of(ckpt: &Checkpoint) -> Tensors {
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
pub(super) fn parse_dtype(name: &str) -> Want {
    let short = name.rsplit('.').next().unwrap_or(name);
    DType::from_numpy_name(short)
        .or_else(|| DType::from_safetensors_name(short))
        .map_or_else(|| Want::Other(name.to_string()), Want::Known)
}

/// Adds one tensor, refusing duplicates and oversized names or counts.
pub(super) fn insert(
    out: &mut Tensors,
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

fn from_json(bytes: &[u8]) -> std::result::Result<Tensors, String> {
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
    out: &mut Tensors,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A file named `name` holding `bytes`, in a folder of its own per test.
    fn file(test: &str, name: &str, bytes: &[u8]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("relayout-expect-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Loads `bytes` as an expectation file named `name`, leaving no file behind.
    pub(in crate::reader) fn load(test: &str, name: &str, bytes: &[u8]) -> Result<Tensors> {
        let path = file(test, name, bytes);
        let got = read(&path);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        got
    }

    /// The detail of an `Error::Expectation`, failing on any other outcome.
    pub(in crate::reader) fn detail(r: Result<Tensors>) -> String {
        match r {
            Err(Error::Expectation { detail, .. }) => detail,
            other => panic!("expected Error::Expectation, got {other:?}"),
        }
    }

    pub(crate) fn want(shape: &[usize], dtype: Option<DType>) -> Expected {
        Expected {
            shape: shape.to_vec(),
            dtype: dtype.map(Want::Known),
        }
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
                "c": {"shape": [3], "dtype": "uint64"}}"#,
        )
        .unwrap();
        assert_eq!(e.len(), 5);
        assert_eq!(e["params.fc.kernel"], want(&[16, 10], Some(DType::F32)));
        assert_eq!(e["params.fc.bias"], want(&[10], Some(DType::BF16)));
        assert_eq!(e["a"], want(&[], Some(DType::Bool)));
        assert_eq!(e["b"], want(&[2], None));
        assert_eq!(e["c"].dtype, Some(Want::Other("uint64".into())));
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
        let names: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["params.fc.bias", "params.fc.kernel", "params.shape.w"]
        );
        assert_eq!(e["params.fc.bias"], want(&[10], None));
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
        let err = read(&path).unwrap_err();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        let msg = err.to_string();
        assert!(matches!(err, Error::Expectation { .. }), "{err:?}");
        assert!(msg.contains("big.json") && msg.contains("limit"), "{msg}");
    }

    #[test]
    fn empty_files_and_folders_are_not_expectations() {
        assert!(detail(load("empty", "e.json", b"")).contains("empty"));
        let dir = file("dir", "x", b"").parent().unwrap().to_path_buf();
        let got = read(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(detail(got).contains("regular file"));
        let err = read(Path::new("/nonexistent/e.json")).unwrap_err();
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
        assert_eq!(e["params.fc.kernel"], want(&[2, 3], Some(DType::BF16)));
        // Told by content without the extension.
        let e2 = load("st", "e.bin", &safetensors_bytes()).unwrap();
        assert_eq!(e, e2);
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
    fn unknown_content_without_extension_is_refused() {
        assert!(detail(load("sniff", "e.txt", b"hello")).contains("neither JSON"));
        let e = load("sniff", "e.txt", b"  {\"a\": [2]}").unwrap();
        assert_eq!(e["a"], want(&[2], None));
    }
}
