//! Reading a rule file: TOML into checked [`Rule`]s. Every value is parsed while toml
//! deserializes it, so a bad glob, template or perm is reported at its own line.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use std::collections::BTreeMap;

use super::pattern::{Glob, PathGlob, PermSpec, ReshapeSpec, Template, TensorPattern};
use super::{
    Action, Conditions, CountCheck, FileSettings, MapAction, NanPolicy, OutputSettings, Rule,
    SplitSpec, StackSpec,
};
use crate::dtype::DType;
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    description: Option<String>,
    /// The `config.json` model types a family file serves.
    #[serde(default)]
    model_types: Option<Vec<String>>,
    /// Values assumed for config keys the model's config.json lacks.
    #[serde(default)]
    config_defaults: Option<toml::Table>,
    #[serde(default)]
    output: Option<RawOutput>,
    #[serde(default)]
    count: Vec<RawCount>,
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    metadata: Option<BTreeMap<String, String>>,
    config: Option<String>,
    nan: Option<String>,
    dtype: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCount {
    tensor: Strings,
    index: String,
    count: toml::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStack {
    index: String,
    count: toml::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    description: Option<String>,
    tensor: Option<Strings>,
    config_is: Option<toml::Table>,
    leaf: Option<Strings>,
    rank: Option<Rank>,
    source_dtype: Option<DTypes>,
    module: Option<ModulePath>,
    module_last: Option<Globs>,
    module_last_contains: Option<Strings>,
    module_last_starts_with: Option<Strings>,
    module_has: Option<Strings>,
    module_lacks: Option<Strings>,
    parent_has: Option<Strings>,
    module_type: Option<Globs>,
    #[serde(default)]
    drop: bool,
    target: Option<String>,
    perm: Option<Perm>,
    split: Option<RawSplit>,
    stack: Option<RawStack>,
    reshape: Option<String>,
    dtype: Option<toml::Value>,
    requires: Option<BTreeMap<String, String>>,
    warn: Option<String>,
    warn_with_module_types: Option<String>,
    quantize: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    axis: i64,
    parts: Vec<String>,
}

/// The output dtypes a rule's `dtype` (and `--dtype`) may name.
pub(crate) fn output_dtype(name: &str) -> Option<DType> {
    DType::from_cast_name(name)
}

/// `dtype = "bf16"`: the output dtype. Before it set the output, `dtype` was a condition
/// on the source dtype (now `source_dtype`); an uppercase name or a list is that old
/// form, refused with the way to write it rather than silently reinterpreted.
fn parse_output_dtype(v: &toml::Value) -> std::result::Result<DType, String> {
    let moved = "'dtype' sets the output dtype (\"bf16\", \"f16\" or \"f32\"); to match on the source dtype write 'source_dtype'";
    match v.as_str() {
        Some(name) => output_dtype(name).ok_or_else(|| format!("dtype '{name}': {moved}")),
        None => Err(moved.to_string()),
    }
}

/// `quantize = false` or `quantize = { bits = 8, group_size = 64 }` (and an optional
/// `mode`): the parameters are checked as `mx.quantize` checks them.
fn parse_quantize(v: &toml::Value) -> std::result::Result<crate::plan::QuantLayer, String> {
    use crate::layout::quant::QuantMode;
    let form = "'quantize' is false or a table of bits, group_size and mode, e.g. { bits = 8, group_size = 64 }";
    let layer = match v {
        toml::Value::Boolean(false) => crate::plan::QuantLayer {
            off: true,
            ..Default::default()
        },
        toml::Value::Table(t) => {
            let mut layer = crate::plan::QuantLayer::default();
            for (k, v) in t {
                let int = || {
                    v.as_integer()
                        .filter(|n| (1..=1 << 16).contains(n))
                        .ok_or_else(|| format!("quantize.{k} must be a positive integer"))
                };
                match k.as_str() {
                    "bits" => layer.bits = Some(int()? as u32),
                    "group_size" => layer.group_size = Some(Some(int()? as usize)),
                    "mode" => {
                        let name = v.as_str().ok_or("quantize.mode must be a string")?;
                        layer.mode = Some(QuantMode::parse(name).map_err(|e| e.to_string())?);
                    }
                    other => return Err(format!("quantize.{other}: unknown key; {form}")),
                }
            }
            layer.quant().map_err(|e| format!("quantize: {e}"))?;
            layer
        }
        _ => return Err(form.to_string()),
    };
    Ok(layer)
}

/// A stack's or a count check's `count`: a positive integer, or a template of
/// `{config.KEY}` / `--set` variables that renders to one.
fn parse_count(v: &toml::Value) -> std::result::Result<super::Count, String> {
    match v {
        toml::Value::Integer(n) if *n > 0 => Ok(super::Count::Fixed(*n as usize)),
        toml::Value::String(t)
            if t.trim().starts_with('{')
                && t.trim().ends_with('}')
                && !t.trim()[1..].trim_start().starts_with("config.")
                && t.trim()[1..t.trim().len() - 1]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Ok(super::Count::Var(t.trim()[1..t.trim().len() - 1].to_string()))
        }
        toml::Value::String(t) => Template::with_captures(t, &[])
            .map(super::Count::Template)
            .map_err(|e| format!("count {e}")),
        other => Err(format!(
            "count must be a positive integer or a template such as \"{{config.num_local_experts}}\", not {other}"
        )),
    }
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn parse_settings(raw: &mut RawFile, origin: &str) -> Result<FileSettings> {
    let fail = |detail: String| Error::Rules {
        origin: origin.to_string(),
        detail,
    };
    let mut settings = FileSettings {
        model_types: raw.model_types.take().unwrap_or_default(),
        config_defaults: raw
            .config_defaults
            .take()
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| (k.clone(), toml_to_json(v)))
            .collect(),
        ..FileSettings::default()
    };
    if let Some(out) = raw.output.take() {
        let nan = match out.nan.as_deref() {
            None => None,
            Some("mlx") => Some(NanPolicy::Mlx),
            Some("torch") => Some(NanPolicy::Torch),
            Some(other) => {
                return Err(fail(format!(
                    "output.nan '{other}' is not \"torch\" or \"mlx\""
                )))
            }
        };
        if let Some(c) = out.config.as_deref() {
            if c != "mlx-lm" {
                return Err(fail(format!("output.config '{c}' is not \"mlx-lm\"")));
            }
        }
        if let Some(d) = out.dtype.as_deref() {
            if d != "config" {
                return Err(fail(format!("output.dtype '{d}' is not \"config\"")));
            }
        }
        settings.output = OutputSettings {
            metadata: out.metadata.unwrap_or_default(),
            mlx_lm_config: out.config.is_some(),
            nan,
            dtype_from_config: out.dtype.is_some(),
        };
    }
    for c in std::mem::take(&mut raw.count) {
        let patterns = tensor_patterns(&c.tensor.0).map_err(&fail)?;
        if !patterns[0].captures().contains(&c.index) {
            return Err(fail(format!(
                "count check of '{}': index '{}' is not one of its captures",
                patterns[0], c.index
            )));
        }
        settings.counts.push(CountCheck {
            patterns,
            index: c.index,
            count: parse_count(&c.count).map_err(&fail)?,
        });
    }
    Ok(settings)
}

/// One or more tensor patterns, all with the same captures (a target may name them).
fn tensor_patterns(texts: &[String]) -> std::result::Result<Vec<TensorPattern>, String> {
    let patterns = texts
        .iter()
        .map(|t| TensorPattern::new(t))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut want = patterns[0].captures();
    want.sort();
    for p in &patterns[1..] {
        let mut have = p.captures();
        have.sort();
        if have != want {
            return Err(format!(
                "tensor patterns '{}' and '{p}' capture different names",
                patterns[0]
            ));
        }
    }
    Ok(patterns)
}

/// Parses one rule file into its description, settings and rules; `origin` names it in
/// errors and in plan provenance.
pub(super) fn parse(text: &str, origin: &str) -> Result<(String, FileSettings, Vec<Rule>)> {
    let mut raw: RawFile = toml::from_str(text).map_err(|e| Error::Rules {
        origin: origin.to_string(),
        detail: match e.span() {
            Some(span) => format!("{}: {}", position(text, span.start), e.message().trim()),
            None => e.message().trim().to_string(),
        },
    })?;
    let settings = parse_settings(&mut raw, origin)?;
    let raw_description = raw.description.unwrap_or_default();
    let mut rules: Vec<Rule> = Vec::with_capacity(raw.rule.len());
    for spanned in raw.rule {
        let at = position(text, spanned.span().start);
        let r = spanned.into_inner();
        let fail = |why: String| Error::Rules {
            origin: origin.to_string(),
            detail: format!("{at}: rule '{}': {why}", r.name),
        };
        if r.name.trim().is_empty() {
            return Err(fail("name is empty".into()));
        }
        if rules.iter().any(|x| x.name == r.name) {
            return Err(fail("a rule of this name comes earlier in the file".into()));
        }
        let tensor = r
            .tensor
            .as_ref()
            .map(|t| tensor_patterns(&t.0))
            .transpose()
            .map_err(&fail)?;
        let captures = tensor.as_ref().map(|t| t[0].captures()).unwrap_or_default();
        let target = r
            .target
            .as_deref()
            .map(|t| Template::with_captures(t, &captures))
            .transpose()
            .map_err(&fail)?;
        let has_map_keys = r.perm.is_some()
            || r.split.is_some()
            || r.stack.is_some()
            || r.reshape.is_some()
            || r.dtype.is_some()
            || r.requires.is_some()
            || r.warn.is_some()
            || r.warn_with_module_types.is_some()
            || r.quantize.is_some();
        let action =
            match (r.drop, target) {
                (true, None) if !has_map_keys => Action::Drop,
                (true, _) => return Err(fail(
                    "'drop = true' takes no target, perm, split, stack, reshape, dtype, quantize, requires or warn"
                        .into(),
                )),
                (false, Some(target)) => {
                    let stack = match r.stack {
                        None => None,
                        Some(st) => {
                            if !captures.contains(&st.index) {
                                return Err(fail(format!(
                                    "stack index '{}' must be a capture of the rule's 'tensor' pattern ({})",
                                    st.index,
                                    if captures.is_empty() { "it has none".to_string() } else { captures.join(", ") }
                                )));
                            }
                            if target.uses_capture(&st.index) {
                                return Err(fail(format!(
                                    "the target names the stack index '{{{}}}', so every part would be its own target",
                                    st.index
                                )));
                            }
                            Some(StackSpec {
                                index: st.index,
                                count: parse_count(&st.count).map_err(&fail)?,
                            })
                        }
                    };
                    let split = match r.split {
                        None => None,
                        Some(sp) => {
                            if sp.parts.len() < 2 {
                                return Err(fail("split needs at least two parts".into()));
                            }
                            if !target.uses_part() {
                                return Err(fail(
                                "a split rule's target must contain '{part}', one name per part"
                                    .into(),
                            ));
                            }
                            if let Some(dup) = sp
                                .parts
                                .iter()
                                .enumerate()
                                .find_map(|(i, p)| sp.parts[..i].contains(p).then_some(p))
                            {
                                return Err(fail(format!("split part '{dup}' is named twice")));
                            }
                            Some(SplitSpec {
                                axis: sp.axis,
                                parts: sp.parts,
                            })
                        }
                    };
                    if split.is_none() && target.uses_part() {
                        return Err(fail("'{part}' in a target needs a 'split'".into()));
                    }
                    let reshape = r
                        .reshape
                        .as_deref()
                        .map(ReshapeSpec::new)
                        .transpose()
                        .map_err(&fail)?;
                    let dtype = r
                        .dtype
                        .as_ref()
                        .map(parse_output_dtype)
                        .transpose()
                        .map_err(&fail)?;
                    let quantize = r
                        .quantize
                        .as_ref()
                        .map(parse_quantize)
                        .transpose()
                        .map_err(&fail)?;
                    Action::Map(Box::new(MapAction {
                        target,
                        perm: r.perm.map(|p| p.0),
                        split,
                        stack,
                        reshape,
                        dtype,
                        requires: r.requires.unwrap_or_default(),
                        warn: r.warn,
                        warn_with_module_types: r.warn_with_module_types,
                        quantize,
                    }))
                }
                (false, None) => {
                    return Err(fail(
                        "needs 'target = \"…\"' (or 'drop = true'); '{name}' keeps the name".into(),
                    ))
                }
            };
        let rank = match r.rank {
            Some(Rank {
                min,
                max: Some(max),
            }) if min > max => return Err(fail(format!("rank min {min} is above max {max}"))),
            Some(Rank { min, max }) => Some((min, max)),
            None => None,
        };
        rules.push(Rule {
            name: r.name,
            description: r.description.unwrap_or_default(),
            origin: origin.to_string(),
            conditions: Conditions {
                tensor,
                config_is: r
                    .config_is
                    .unwrap_or_default()
                    .iter()
                    .map(|(k, v)| (k.clone(), toml_to_json(v)))
                    .collect(),
                leaf: r.leaf.map(|s| s.0),
                rank,
                dtype: r.source_dtype.map(|d| d.0),
                module: r.module.map(|m| m.0),
                module_last: r.module_last.map(|g| g.0),
                module_last_contains: r
                    .module_last_contains
                    .map(|s| s.0.iter().map(|x| x.to_lowercase()).collect()),
                module_last_starts_with: r
                    .module_last_starts_with
                    .map(|s| s.0.iter().map(|x| x.to_lowercase()).collect()),
                module_has: r.module_has.map(|s| s.0).unwrap_or_default(),
                module_lacks: r.module_lacks.map(|s| s.0).unwrap_or_default(),
                parent_has: r.parent_has.map(|s| s.0).unwrap_or_default(),
                module_type: r.module_type.map(|g| g.0),
            },
            action,
        });
    }
    Ok((raw_description, settings, rules))
}

/// `line L, column C` of a byte offset, for messages that point into the file.
fn position(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, tail)| tail)
        .chars()
        .count()
        + 1;
    format!("line {line}, column {column}")
}

/// One string or a list of strings.
struct Strings(Vec<String>);

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Strings;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Strings, E> {
                Ok(Strings(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strings, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                if out.is_empty() {
                    return Err(de::Error::custom("the list is empty"));
                }
                Ok(Strings(out))
            }
        }
        d.deserialize_any(V)
    }
}

struct Globs(Vec<Glob>);

impl<'de> Deserialize<'de> for Globs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Strings::deserialize(d)?;
        s.0.iter()
            .map(|g| Glob::new(g))
            .collect::<Result<_, _>>()
            .map(Globs)
            .map_err(de::Error::custom)
    }
}

struct ModulePath(PathGlob);

impl<'de> Deserialize<'de> for ModulePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PathGlob::new(&s).map(ModulePath).map_err(de::Error::custom)
    }
}

struct DTypes(Vec<DType>);

impl<'de> Deserialize<'de> for DTypes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Strings::deserialize(d)?;
        s.0.iter()
            .map(|name| {
                DType::from_safetensors_name(&name.to_ascii_uppercase()).ok_or_else(|| {
                    de::Error::custom(format!(
                        "unknown dtype '{name}' (known: {})",
                        DType::ALL.map(|d| d.safetensors_name()).join(", ")
                    ))
                })
            })
            .collect::<Result<_, _>>()
            .map(DTypes)
    }
}

/// `rank = 2` or `rank = { min = 3 }` / `{ max = 2 }` / `{ min = 1, max = 4 }`.
struct Rank {
    min: usize,
    max: Option<usize>,
}

fn to_rank<E: de::Error>(v: i64) -> Result<usize, E> {
    usize::try_from(v).map_err(|_| E::custom(format!("rank {v} is negative")))
}

impl<'de> Deserialize<'de> for Rank {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Rank;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rank such as 2, or a table such as { min = 3 } or { max = 2 }")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Rank, E> {
                let r = to_rank(v)?;
                Ok(Rank {
                    min: r,
                    max: Some(r),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Rank, A::Error> {
                let (mut min, mut max) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "min" => &mut min,
                        "max" => &mut max,
                        other => {
                            return Err(de::Error::custom(format!(
                                "unknown key '{other}' in rank (expected min, max)"
                            )))
                        }
                    };
                    *slot = Some(to_rank(map.next_value::<i64>()?)?);
                }
                if min.is_none() && max.is_none() {
                    return Err(de::Error::custom("rank table needs min or max"));
                }
                Ok(Rank {
                    min: min.unwrap_or(0),
                    max,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `perm = "O,I,*S -> *S,I,O"` or `perm = [1, 0]`.
struct Perm(PermSpec);

impl<'de> Deserialize<'de> for Perm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Perm;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a pattern such as \"O,I -> I,O\" or a list such as [1, 0]")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Perm, E> {
                PermSpec::pattern(s).map(Perm).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Perm, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<i64>()? {
                    let axis = usize::try_from(v)
                        .map_err(|_| de::Error::custom(format!("perm axis {v} is negative")))?;
                    out.push(axis);
                }
                PermSpec::list(out).map(Perm).map_err(de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}
