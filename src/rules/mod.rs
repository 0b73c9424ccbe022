//! Rules: which source tensors go where, with which axis order.
//!
//! A rule file is TOML: a list of `[[rule]]` tables, tried in order for every source
//! tensor; the first rule whose conditions all hold decides. A tensor name splits at its
//! last `.` into a *module* (`layer1.0.bn1`) and a *leaf* (`weight`); a top-level name
//! has an empty module. Conditions look at whole module path components and at the
//! module's set of leaves, never at substrings of the dotted name ("subnet" is not a
//! BatchNorm because it contains "bn").
//!
//! ```toml
//! description = "Flax linen, with BatchNorm statistics in batch_stats"
//!
//! [[rule]]
//! name = "drop-bn-counter"
//! leaf = "num_batches_tracked"
//! drop = true
//!
//! [[rule]]
//! name = "batchnorm-stats"
//! description = "a module holding running statistics is a BatchNorm"
//! module_has = ["running_mean", "running_var"]
//! leaf = "running_mean"
//! target = "batch_stats.{module_merged}.mean"
//!
//! [[rule]]
//! name = "embedding"
//! leaf = "weight"
//! rank = 2
//! module_last_contains = ["embed", "wte", "wpe"]
//! target = "params.{module_merged}.embedding"
//!
//! [[rule]]
//! name = "conv-kernel"
//! leaf = "weight"
//! rank = { min = 3 }
//! target = "params.{module_merged}.kernel"
//! perm = "O,I,*S -> *S,I,O"
//!
//! [[rule]]
//! name = "keep"                 # no conditions: matches everything left
//! target = "params.{module_merged}.{leaf}"
//! ```
//!
//! Conditions (all optional; a rule with none matches every tensor). "One or a list"
//! means a string or a list of strings, any of which may match:
//!
//! | key | holds when |
//! | --- | --- |
//! | `leaf` | the leaf equals one of the names |
//! | `rank` | `rank = 2`, or bounds `rank = { min = 3 }`, `{ max = 2 }`, `{ min = 1, max = 4 }` |
//! | `dtype` | the dtype is one of the safetensors names (`"F32"`, `["F16", "BF16"]`) |
//! | `module` | the module path matches a component glob: `*` and `?` inside one component, a `**` component spans any number of them (`"**.downsample.*"`, `"encoder.**"`); `""` is the top level |
//! | `module_last` | the module's last component matches one of the globs (`"conv*"`) |
//! | `module_last_contains` | the module's last component contains one of the strings, ignoring case |
//! | `module_has` | the module's leaves include all of the names (`["running_mean", "running_var"]`) |
//! | `module_lacks` | the module's leaves include none of the names |
//!
//! A top-level tensor has no last component, so `module_last*` never holds for it.
//!
//! Actions: `drop = true` leaves the tensor out (the plan lists it with the rule's name);
//! otherwise `target` names the output and an optional `perm` reorders its axes.
//! `target` is a template with placeholders `{name}` (the whole source name), `{module}`
//! (the module path as written), `{module_merged}` (the module path with every all-digit
//! component merged into the one before it with `_`: `layer1.0.conv1` → `layer1_0.conv1`)
//! and `{leaf}`; `{{`/`}}` are literal braces. A dot-separated piece of the template that
//! renders empty is left out, so `params.{module_merged}.{leaf}` names a top-level `w`
//! `params.w`. `perm` is a pattern of named source axes and their output order,
//! `"O,I,*S -> *S,I,O"`, where `*S` stands for all axes not otherwise named (possibly
//! none), or an explicit list, `[1, 0]`, where output axis `k` is source axis `perm[k]`.
//! A pattern that cannot fit a matched tensor's rank is an error, not a skip.
//!
//! Rules may also carry a `description`; a file may carry a top-level `description`.
//! Unknown keys are errors, so a typo cannot silently disable a condition.
//! [`RuleSet::layered`] puts a user's file in front of a preset, so the user's rules win
//! for the tensors they match and the preset handles the rest.

mod pattern;
mod syntax;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::{Plan, PlanEntry, Skipped};
use crate::reader::TensorInfo;

use pattern::{merge_digits, NameParts, PathGlob, PermSpec, Template};

/// Rule files larger than this are refused before reading: a real one is a few KiB.
const MAX_RULE_FILE_BYTES: u64 = 1 << 20;

/// The built-in presets, as (name, embedded TOML).
const PRESETS: [(&str, &str); 2] = [
    ("flax", include_str!("presets/flax.toml")),
    ("mlx", include_str!("presets/mlx.toml")),
];
const PRESET_NAMES: [&str; 2] = [PRESETS[0].0, PRESETS[1].0];

/// An ordered list of rules, from one or more presets and rule files.
///
/// ```
/// use relayout::{layout::contiguous_strides, reader::TensorInfo, rules::RuleSet, DType};
///
/// let user = RuleSet::from_toml(
///     r#"
///     [[rule]]
///     name = "shared-embedding"
///     module = "shared"
///     leaf = "weight"
///     target = "params.shared.embedding"
///     "#,
///     "my-rules.toml",
/// )?;
/// let rules = RuleSet::preset("flax")?.layered(user);
/// let tensor = |name: &str, shape: &[usize]| TensorInfo {
///     name: name.into(),
///     dtype: DType::F32,
///     shape: shape.to_vec(),
///     strides: contiguous_strides(shape),
///     offset: 0,
///     storage: 0,
/// };
/// let plan = rules.plan(&[tensor("shared.weight", &[100, 16]), tensor("fc.weight", &[10, 16])])?;
/// assert_eq!(plan.entries[0].target, "params.shared.embedding");
/// assert_eq!(plan.entries[1].target, "params.fc.kernel");
/// assert_eq!(plan.entries[1].target_shape, [16, 10]);
/// # Ok::<(), relayout::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    sources: Vec<String>,
}

/// One rule: conditions on a tensor, and what to do with a tensor that meets them.
#[derive(Clone, Debug)]
pub struct Rule {
    name: String,
    description: String,
    origin: String,
    conditions: Conditions,
    action: Action,
}

#[derive(Clone, Debug, Default)]
struct Conditions {
    leaf: Option<Vec<String>>,
    /// Inclusive bounds.
    rank: Option<(usize, Option<usize>)>,
    dtype: Option<Vec<DType>>,
    module: Option<PathGlob>,
    module_last: Option<Vec<pattern::Glob>>,
    /// Lowercased.
    module_last_contains: Option<Vec<String>>,
    module_has: Vec<String>,
    module_lacks: Vec<String>,
}

#[derive(Clone, Debug)]
enum Action {
    Drop,
    Map {
        target: Template,
        perm: Option<PermSpec>,
    },
}

/// What conditions see of one tensor.
struct Subject<'a> {
    info: &'a TensorInfo,
    /// Module path components; empty for a top-level name.
    components: Vec<&'a str>,
    leaf: &'a str,
    /// Leaves of every tensor in the same module.
    siblings: &'a HashSet<&'a str>,
}

/// `a.b.c` → (`a.b`, `c`); a name without a dot is a top-level leaf.
fn split_name(name: &str) -> (&str, &str) {
    name.rsplit_once('.').unwrap_or(("", name))
}

impl Rule {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// The preset or file the rule came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn matches(&self, s: &Subject<'_>) -> bool {
        let c = &self.conditions;
        let rank = s.info.shape.len();
        let last = s.components.last();
        c.leaf
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == s.leaf))
            && c.rank
                .is_none_or(|(min, max)| rank >= min && max.is_none_or(|m| rank <= m))
            && c.dtype.as_ref().is_none_or(|d| d.contains(&s.info.dtype))
            && c.module.as_ref().is_none_or(|g| g.matches(&s.components))
            && c.module_last
                .as_ref()
                .is_none_or(|gs| last.is_some_and(|l| gs.iter().any(|g| g.matches(l))))
            && c.module_last_contains.as_ref().is_none_or(|subs| {
                last.is_some_and(|l| {
                    let l = l.to_lowercase();
                    subs.iter().any(|x| l.contains(x.as_str()))
                })
            })
            && c.module_has.iter().all(|x| s.siblings.contains(x.as_str()))
            && !c
                .module_lacks
                .iter()
                .any(|x| s.siblings.contains(x.as_str()))
    }
}

impl RuleSet {
    /// A built-in preset by name.
    pub fn preset(name: &str) -> Result<RuleSet> {
        match RuleSet::preset_source(name) {
            Some(text) => RuleSet::from_toml(text, &format!("preset {name}")),
            None => Err(Error::UnknownPreset {
                name: name.to_string(),
                available: PRESET_NAMES.join(", "),
            }),
        }
    }

    /// Names of the built-in presets.
    pub fn preset_names() -> &'static [&'static str] {
        &PRESET_NAMES
    }

    /// The embedded TOML of a built-in preset, to show or to start a rule file from.
    pub fn preset_source(name: &str) -> Option<&'static str> {
        PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// Parses a rule file's text; `origin` names it in errors and in the plan.
    pub fn from_toml(text: &str, origin: &str) -> Result<RuleSet> {
        Ok(RuleSet {
            rules: syntax::parse(text, origin)?,
            sources: vec![origin.to_string()],
        })
    }

    /// Reads and parses a rule file.
    pub fn from_file(path: &Path) -> Result<RuleSet> {
        let origin = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut bytes = Vec::new();
        file.take(MAX_RULE_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        if bytes.len() as u64 > MAX_RULE_FILE_BYTES {
            return Err(Error::Rules {
                origin,
                detail: format!("file is larger than the limit of {MAX_RULE_FILE_BYTES} bytes"),
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| Error::Rules {
            origin: origin.clone(),
            detail: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        })?;
        RuleSet::from_toml(&text, &origin)
    }

    /// `over`'s rules in front of this set's: they are tried first.
    pub fn layered(self, over: RuleSet) -> RuleSet {
        let mut rules = over.rules;
        rules.extend(self.rules);
        let mut sources = self.sources;
        sources.extend(over.sources);
        RuleSet { rules, sources }
    }

    /// The rules, in the order they are tried.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The presets and files this set was built from, base first.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Maps every tensor (by name, dtype and shape) to an output, a drop, or "unmatched".
    pub fn plan(&self, tensors: &[TensorInfo]) -> Result<Plan> {
        let mut siblings: HashMap<&str, HashSet<&str>> = HashMap::new();
        for t in tensors {
            let (module, leaf) = split_name(&t.name);
            siblings.entry(module).or_default().insert(leaf);
        }
        let empty = HashSet::new();
        let mut plan = Plan {
            sources: self.sources.clone(),
            ..Plan::default()
        };
        // Target name → source name, to report both sides of a collision.
        let mut taken: HashMap<String, &str> = HashMap::new();

        for (index, info) in tensors.iter().enumerate() {
            let (module, leaf) = split_name(&info.name);
            let components: Vec<&str> = if module.is_empty() {
                Vec::new()
            } else {
                module.split('.').collect()
            };
            let subject = Subject {
                info,
                leaf,
                siblings: siblings.get(module).unwrap_or(&empty),
                components,
            };
            let Some(rule) = self.rules.iter().find(|r| r.matches(&subject)) else {
                plan.unmatched.push(Skipped {
                    source: index,
                    name: info.name.clone(),
                    reason: "no rule matched".to_string(),
                });
                continue;
            };
            let (template, perm) = match &rule.action {
                Action::Drop => {
                    plan.dropped.push(Skipped {
                        source: index,
                        name: info.name.clone(),
                        reason: rule.name.clone(),
                    });
                    continue;
                }
                Action::Map { target, perm } => (target, perm),
            };
            let rule_err = |detail: String| Error::Rules {
                origin: rule.origin.clone(),
                detail: format!("rule '{}', tensor '{}': {detail}", rule.name, info.name),
            };
            let merged = merge_digits(&subject.components);
            let target = template.render(&NameParts {
                name: &info.name,
                module,
                module_merged: &merged,
                leaf,
            });
            if target.is_empty() {
                return Err(rule_err(format!("target '{template}' renders empty")));
            }
            let rank = info.shape.len();
            let perm = match perm {
                Some(p) => p.resolve(rank).map_err(rule_err)?,
                None => (0..rank).collect(),
            };
            // resolve() returns a permutation of 0..rank, so every index is in range.
            let target_shape = perm
                .iter()
                .map(|&p| info.shape.get(p).copied())
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| rule_err(format!("perm {perm:?} out of range")))?;
            if let Some(first) = taken.get(target.as_str()) {
                return Err(Error::TargetCollision {
                    first: first.to_string(),
                    second: info.name.clone(),
                    target,
                });
            }
            taken.insert(target.clone(), &info.name);
            plan.entries.push(PlanEntry {
                source: index,
                source_name: info.name.clone(),
                target,
                dtype: info.dtype,
                source_shape: info.shape.clone(),
                target_shape,
                perm,
                rule: rule.name.clone(),
            });
        }
        Ok(plan)
    }
}
