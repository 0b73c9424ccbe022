//! Reading a rule file: TOML into checked [`Rule`]s. Every value is parsed while toml
//! deserializes it, so a bad glob, template or perm is reported at its own line.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use std::collections::BTreeMap;

use super::pattern::{Glob, PathGlob, PermSpec, ReshapeSpec, Template};
use super::{Action, Conditions, MapAction, Rule, SplitSpec};
use crate::dtype::DType;
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    description: Option<String>,
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
    target: Option<TargetTemplate>,
    perm: Option<Perm>,
    split: Option<RawSplit>,
    reshape: Option<String>,
    dtype: Option<toml::Value>,
    requires: Option<BTreeMap<String, String>>,
    warn: Option<String>,
    warn_with_module_types: Option<String>,
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

/// Parses one rule file into its description and rules; `origin` names it in errors and
/// in plan provenance.
pub(super) fn parse(text: &str, origin: &str) -> Result<(String, Vec<Rule>)> {
    let raw: RawFile = toml::from_str(text).map_err(|e| Error::Rules {
        origin: origin.to_string(),
        detail: match e.span() {
            Some(span) => format!("{}: {}", position(text, span.start), e.message().trim()),
            None => e.message().trim().to_string(),
        },
    })?;
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
        let has_map_keys = r.perm.is_some()
            || r.split.is_some()
            || r.reshape.is_some()
            || r.dtype.is_some()
            || r.requires.is_some()
            || r.warn.is_some()
            || r.warn_with_module_types.is_some();
        let action =
            match (r.drop, r.target) {
                (true, None) if !has_map_keys => Action::Drop,
                (true, _) => return Err(fail(
                    "'drop = true' takes no target, perm, split, reshape, dtype, requires or warn"
                        .into(),
                )),
                (false, Some(target)) => {
                    let target = target.0;
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
                    Action::Map(Box::new(MapAction {
                        target,
                        perm: r.perm.map(|p| p.0),
                        split,
                        reshape,
                        dtype,
                        requires: r.requires.unwrap_or_default(),
                        warn: r.warn,
                        warn_with_module_types: r.warn_with_module_types,
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
    Ok((raw_description, rules))
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

struct TargetTemplate(Template);

impl<'de> Deserialize<'de> for TargetTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::new(&s)
            .map(TargetTemplate)
            .map_err(de::Error::custom)
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
