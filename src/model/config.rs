//! A model's `config.json`, read as hostile input: bounded in size and depth, duplicate
//! keys and non-JSON literals (`NaN`, `Infinity`) refused, every key a rule or the
//! `mlx-lm` preset reads checked for its type, each error naming the file and the key.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Largest `config.json` (and `generation_config.json`) read: real ones are a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Deepest nesting of arrays and objects accepted (real configs nest 3 or 4 levels).
pub const MAX_CONFIG_DEPTH: usize = 32;

/// A parsed `config.json`: a JSON object, with the path it came from for errors.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    path: PathBuf,
    values: Map<String, Value>,
}

impl ModelConfig {
    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = read_json_text(path)?;
        ModelConfig::from_text(&text, path)
    }

    /// Parses config text; `path` names it in errors.
    pub fn from_text(text: &str, path: &Path) -> Result<ModelConfig> {
        match parse_strict(text, path)? {
            Value::Object(values) => Ok(ModelConfig {
                path: path.to_path_buf(),
                values,
            }),
            other => Err(config_error(
                path,
                "",
                format!("is {}, not a JSON object", kind(&other)),
            )),
        }
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The top-level object.
    pub fn values(&self) -> &Map<String, Value> {
        &self.values
    }

    /// A value by dotted path (`text_config.dtype`); `None` when any step is missing.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let mut parts = key.split('.');
        let mut at = self.values.get(parts.next()?)?;
        for p in parts {
            at = at.as_object()?.get(p)?;
        }
        Some(at)
    }

    /// `model_type`: `None` when absent, an error when it is not a string.
    pub fn model_type(&self) -> Result<Option<&str>> {
        match self.values.get("model_type") {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                Err(self.error("model_type", format!("is {}, not a string", kind(other))))
            }
        }
    }

    /// A config value as rule text (`{config.num_local_experts}`): strings as they are,
    /// integers and booleans in JSON's spelling. Objects, arrays, null and fractions are
    /// errors naming the key, as is a missing key.
    pub fn text(&self, key: &str) -> Result<String> {
        match self.get(key) {
            None => Err(self.error(key, "is not set".to_string())),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Bool(b)) => Ok(b.to_string()),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            Some(other) => Err(self.error(
                key,
                format!(
                    "is {}, where a string, integer or boolean is needed",
                    kind(other)
                ),
            )),
        }
    }

    /// A key that must be a count: a positive integer up to `max`.
    pub fn count(&self, key: &str, max: u64) -> Result<Option<u64>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (1..=max).contains(&v) => Ok(Some(v)),
                _ => Err(self.error(key, format!("is {n}, not a count from 1 to {max}"))),
            },
            Some(other) => Err(self.error(key, format!("is {}, not an integer", kind(other)))),
        }
    }

    /// The floating dtype the config declares for the weights: `torch_dtype`, else
    /// `dtype` (what transformers 5 writes), else `text_config`'s `torch_dtype` or
    /// `dtype`, with the key it came from. Only `float16`, `bfloat16` and `float32`
    /// count; any other value (or a non-string) declares nothing, as for mlx-lm.
    pub fn declared_dtype(&self) -> Option<(DType, &'static str)> {
        const KEYS: [&str; 4] = [
            "torch_dtype",
            "dtype",
            "text_config.torch_dtype",
            "text_config.dtype",
        ];
        let value = KEYS
            .iter()
            .find_map(|&k| self.get(k).filter(|v| !v.is_null()).map(|v| (v, k)))?;
        let dtype = match value.0.as_str()? {
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            "float32" => DType::F32,
            _ => return None,
        };
        Some((dtype, value.1))
    }

    /// `config.json` as `mlx_lm.convert` writes it (`save_config` of `load_config`'s
    /// result): `eos_token_id` from the folder's `generation_config.json` when that sets
    /// a truthy one, `_name_or_path` and `vision_config` removed, `extra` keys set, keys
    /// sorted, four-space indent, non-ASCII escaped as Python's `json.dump` does.
    pub fn mlx_lm_text(
        &self,
        generation_config: Option<&Path>,
        extra: &BTreeMap<String, Value>,
    ) -> Result<Vec<u8>> {
        let mut values = self.values.clone();
        if let Some(path) = generation_config {
            if let Some(eos) = generation_eos(path)? {
                values.insert("eos_token_id".to_string(), eos);
            }
        }
        values.remove("_name_or_path");
        values.remove("vision_config");
        for (k, v) in extra {
            values.insert(k.clone(), v.clone());
        }
        let sorted: BTreeMap<String, Value> = values.into_iter().collect();
        Ok(python_json(&serde_json::to_value(sorted).unwrap_or_default()).into_bytes())
    }

    fn error(&self, key: &str, detail: String) -> Error {
        config_error(&self.path, key, detail)
    }
}

fn config_error(path: &Path, key: &str, detail: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        key: key.to_string(),
        detail,
    }
}

/// What mlx-lm's `load_config` takes from `generation_config.json`: its `eos_token_id`
/// when truthy (Python's sense: not 0, false, null, "" or []). A file that is not JSON is
/// ignored, as mlx-lm ignores it; one that is JSON but not an object is an error.
fn generation_eos(path: &Path) -> Result<Option<Value>> {
    let text = read_json_text(path)?;
    let value = match parse_strict(&text, path) {
        Ok(v) => v,
        Err(Error::Config { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Value::Object(map) = value else {
        return Err(config_error(
            path,
            "",
            format!("is {}, not a JSON object", kind(&value)),
        ));
    };
    let truthy = |v: &Value| match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    };
    Ok(map.get("eos_token_id").filter(|v| truthy(v)).cloned())
}

/// Reads a small JSON file: regular (links followed), at most [`MAX_CONFIG_BYTES`], UTF-8.
fn read_json_text(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(config_error(path, "", "is not a regular file".to_string()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(config_error(
            path,
            "",
            format!("is larger than the limit of {MAX_CONFIG_BYTES} bytes"),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        config_error(
            path,
            "",
            format!("is not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses JSON refusing duplicate keys and nesting deeper than [`MAX_CONFIG_DEPTH`];
/// the error names the key path where it failed and the line and column.
fn parse_strict(text: &str, path: &Path) -> Result<Value> {
    let mut trail = Vec::new();
    crate::reader::safetensors::strict_json_at(text, MAX_CONFIG_DEPTH, &mut trail).map_err(|e| {
        let mut detail = e.to_string();
        let at = text
            .lines()
            .nth(e.line().saturating_sub(1))
            .and_then(|l| l.get(e.column().saturating_sub(1)..))
            .unwrap_or("");
        if ["NaN", "Infinity", "-Infinity"]
            .iter()
            .any(|lit| at.trim_start().starts_with(lit))
        {
            detail = format!(
                "{detail}: NaN and Infinity are not JSON (write them as {{\"__float__\": \"NaN\"}}, as transformers does)"
            );
        }
        config_error(path, &trail.join("."), detail)
    })
}

/// JSON as Python's `json.dump(obj, f, indent=4)` writes it: `", "`-free separators with
/// newlines, `": "` after keys, non-ASCII as `\uXXXX` escapes (surrogate pairs above the
/// BMP), integers as they are and floats in their shortest form.
pub(crate) fn python_json(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0);
    out
}

fn write_value(out: &mut String, v: &Value, level: usize) {
    let indent = |out: &mut String, level: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', level * 4));
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&python_number(n)),
        Value::String(s) => write_string(out, s),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            indent(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, item, level + 1);
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// Python's `repr` of a float: `1e-05`, `10000.0`, `1e+16`.
fn python_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    let text = format!("{f:e}");
    let (mantissa, exp) = text.split_once('e').unwrap_or((&text, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let plain = format!("{f}");
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_text(text, Path::new("m/config.json"))
    }

    fn message(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn hostile_configs_are_errors_naming_the_file_and_key() {
        let dup = message(r#"{"a": 1, "text_config": {"b": 1, "b": 2}}"#);
        assert!(
            dup.contains("m/config.json") && dup.contains("text_config.b"),
            "{dup}"
        );
        assert!(dup.contains("appears twice"), "{dup}");
        let nan = message(r#"{"rope_scaling": {"factor": NaN}}"#);
        assert!(
            nan.contains("rope_scaling.factor") && nan.contains("NaN"),
            "{nan}"
        );
        let inf = message(r#"{"x": -Infinity}"#);
        assert!(inf.contains("not JSON"), "{inf}");
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let deep = message(&format!(r#"{{"a": {deep}}}"#));
        assert!(deep.contains("deeper than 32"), "{deep}");
        assert!(message("[1, 2]").contains("not a JSON object"));
        assert!(message("{} {}").contains("m/config.json"));
        let mt = parse(r#"{"model_type": 7}"#).unwrap();
        let e = mt.model_type().unwrap_err().to_string();
        assert!(
            e.contains("model_type") && e.contains("not a string"),
            "{e}"
        );
        let c = parse(r#"{"n": 0, "m": 1.5, "k": "x", "big": 99}"#).unwrap();
        assert!(c.count("n", 10).is_err());
        assert!(c.count("m", 10).is_err());
        assert!(c.count("k", 10).is_err());
        assert!(c.count("big", 10).unwrap_err().to_string().contains("big"));
        assert_eq!(c.count("absent", 10).unwrap(), None);
        assert!(c.text("m").is_err());
        assert_eq!(c.text("k").unwrap(), "x");
    }

    #[test]
    fn declared_dtype_follows_the_key_order() {
        let d = |t: &str| parse(t).unwrap().declared_dtype();
        assert_eq!(
            d(r#"{"torch_dtype": "bfloat16", "dtype": "float32"}"#),
            Some((DType::BF16, "torch_dtype"))
        );
        assert_eq!(d(r#"{"dtype": "float16"}"#), Some((DType::F16, "dtype")));
        assert_eq!(
            d(r#"{"text_config": {"dtype": "float32"}}"#),
            Some((DType::F32, "text_config.dtype"))
        );
        assert_eq!(d(r#"{"torch_dtype": "int8"}"#), None);
        assert_eq!(d(r#"{"torch_dtype": 3}"#), None);
        assert_eq!(d("{}"), None);
    }

    #[test]
    fn python_json_matches_json_dump() {
        let v: Value = serde_json::from_str(
            r#"{"a": [1, 2.5, 1e-05, 10000.0, 1e16, 1e-7], "b": {}, "c": [], "d": "é😀\"\n", "e": null, "f": true}"#,
        )
        .unwrap();
        // What Python 3 prints for json.dumps(obj, indent=4) of the same object.
        let want = "{\n    \"a\": [\n        1,\n        2.5,\n        1e-05,\n        10000.0,\n        1e+16,\n        1e-07\n    ],\n    \"b\": {},\n    \"c\": [],\n    \"d\": \"\\u00e9\\ud83d\\ude00\\\"\\n\",\n    \"e\": null,\n    \"f\": true\n}";
        assert_eq!(python_json(&v), want);
    }
}
