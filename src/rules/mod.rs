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
//! module_last = ["embed_tokens", "wte", "wpe"]
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
//! | `source_dtype` | the dtype is one of the safetensors names (`"F32"`, `["F16", "BF16"]`) |
//! | `module` | the module path matches a component glob: `*` and `?` inside one component, a `**` component spans any number of them (`"**.downsample.*"`, `"encoder.**"`); `""` is the top level |
//! | `module_last` | the module's last component matches one of the globs (`"conv*"`) |
//! | `module_last_contains` | the module's last component contains one of the strings, ignoring case |
//! | `module_last_starts_with` | the module's last component starts with one of the strings, ignoring case |
//! | `module_has` | the module's leaves include all of the names (`["running_mean", "running_var"]`) |
//! | `module_lacks` | the module's leaves include none of the names |
//! | `parent_has` | the parent module's leaves include all of the names (`out_proj` of an attention) |
//! | `module_type` | `--module-types` gives the module a class matching one of the globs (`"ConvTranspose*"`); never holds without that file |
//!
//! A top-level tensor has no last component, so `module_last*` never holds for it.
//!
//! Actions: `drop = true` leaves the tensor out (the plan lists it with the rule's name);
//! otherwise `target` names the output and the op is, in this order:
//!
//! - `split = { axis = 0, parts = ["query", "key", "value"] }`: equal parts along one
//!   source axis (negative counts from the end), one output per part, each reading only
//!   its slice; the target must contain `{part}`;
//! - `perm`: reorders the axes (below);
//! - `reshape = "I, {heads}, -1"`: a new shape for the permuted result, free because the
//!   output is contiguous; dimensions are axis names of the perm pattern (their sizes, a
//!   `*` group giving all of its axes), `{variables}` from `--set`, integers and at most
//!   one `-1`;
//! - `dtype = "bf16" | "f16" | "f32"`: output dtype of floating tensors, over `--dtype`
//!   (integer, bool and F8 tensors never change).
//!
//! `requires = { heads = "message" }` names variables the rule needs, each with the
//! message of the error when it is not set (placeholders as in targets); `warn = "…"`
//! attaches a note to every entry the rule makes, which `plan` shows;
//! `warn_with_module_types = "…"` is the note instead when `--module-types` was given
//! (a preset's advice to pass it would be wrong then).
//! `target` is a template with placeholders `{name}` (the whole source name), `{module}`
//! (the module path as written), `{module_merged}` (the module path with every all-digit
//! component merged into the one before it with `_`: `layer1.0.conv1` → `layer1_0.conv1`),
//! `{leaf}`, `{parent}` and `{parent_merged}` (the module's own module), and `{part}` in
//! a split; `{{`/`}}` are literal braces. A dot-separated piece of the template that
//! renders empty is left out, so `params.{module_merged}.{leaf}` names a top-level `w`
//! `params.w`. `perm` is a pattern of named source axes and their output order,
//! `"O,I,*S -> *S,I,O"`, where `*S` stands for all axes not otherwise named (possibly
//! none), or an explicit list, `[1, 0]`, where output axis `k` is source axis `perm[k]`.
//! A pattern that cannot fit a matched tensor's rank is an error, not a skip.
//!
//! Whole names, stacks and the model's config:
//!
//! - `tensor = "model.layers.{layer}.mlp.experts.{e}.{w}.weight"` (or a list of patterns
//!   with the same captures) holds when the whole name matches: text matches itself,
//!   `{x}` one or more characters inside one component, `{*x}` one or more whole
//!   components. Captures are placeholders of the rule's target (`{layer}`).
//! - `stack = { index = "e", count = "{config.num_local_experts}" }`: all tensors the
//!   rule maps to one target (the target must not name `index`) are stacked along a new
//!   leading axis, ordered by the integer the `index` capture holds, which must cover
//!   `0..count` once each, with one shape and dtype; `count` is an integer,
//!   `"{config.KEY}"` or a `--set` variable (`"{n}"`). Slice, perm, reshape and dtype
//!   apply to every part alike.
//! - `config_is = { tie_word_embeddings = true }` holds when the model's `config.json`
//!   has those values; `{config.KEY}` (dotted into nested objects) in a target or count
//!   reads one. A file's `[config_defaults]` table gives values for keys the config lacks.
//! - `[[count]]` tables (`tensor`, `index`, `count`) check that the indices the tensors
//!   matching `tensor` carry are exactly `0..count` (a config's layer count against the
//!   layers there are).
//! - `model_types = ["llama", "mistral"]` names the `config.json` model types a family
//!   file serves; an `[output]` table sets every file's `metadata = { … }`,
//!   `config = "mlx-lm"` (config.json written as mlx-lm writes it), `nan = "mlx"` (casts
//!   with mlx's NaN bits, see [`NanPolicy`]) and `dtype = "config"` (without `--dtype`,
//!   the config's declared dtype).
//!
//! Rules may also carry a `description`; a file may carry a top-level `description`.
//! Unknown keys are errors, so a typo cannot silently disable a condition.
//! [`RuleSet::layered`] puts a user's file in front of a preset, so the user's rules win
//! for the tensors they match and the preset handles the rest.

mod pattern;
mod syntax;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::cast::is_castable;
use crate::plan::{Plan, PlanEntry, Skipped, Slice};
use crate::reader::TensorInfo;

use pattern::{merge_digits, NameParts, PathGlob, PermSpec, ReshapeSpec, Template, TensorPattern};

pub use crate::layout::cast::NanPolicy;
use crate::model::ModelConfig;

/// Rule files larger than this are refused before reading: a real one is a few KiB.
const MAX_RULE_FILE_BYTES: u64 = 1 << 20;

/// The built-in presets, as (name, embedded TOML).
const PRESETS: [(&str, &str); 4] = [
    ("flax", include_str!("presets/flax.toml")),
    ("nnx", include_str!("presets/nnx.toml")),
    ("mlx", include_str!("presets/mlx.toml")),
    (MLX_LM_PRESET, include_str!("presets/mlx-lm.toml")),
];
const PRESET_NAMES: [&str; 4] = [PRESETS[0].0, PRESETS[1].0, PRESETS[2].0, PRESETS[3].0];

/// The preset whose rules depend on the model: it reads `model_type` from `config.json`
/// and layers that family's file over its own.
pub const MLX_LM_PRESET: &str = "mlx-lm";

/// The families of the `mlx-lm` preset, as (name, embedded TOML); each file declares the
/// `model_type`s it serves.
const MLX_LM_FAMILIES: [(&str, &str); 11] = [
    ("llama", include_str!("presets/mlx-lm/llama.toml")),
    ("qwen2", include_str!("presets/mlx-lm/qwen2.toml")),
    ("qwen3", include_str!("presets/mlx-lm/qwen3.toml")),
    ("gemma2", include_str!("presets/mlx-lm/gemma2.toml")),
    (
        "gemma3_text",
        include_str!("presets/mlx-lm/gemma3_text.toml"),
    ),
    ("phi3", include_str!("presets/mlx-lm/phi3.toml")),
    ("gpt2", include_str!("presets/mlx-lm/gpt2.toml")),
    ("starcoder2", include_str!("presets/mlx-lm/starcoder2.toml")),
    ("olmo2", include_str!("presets/mlx-lm/olmo2.toml")),
    ("mixtral", include_str!("presets/mlx-lm/mixtral.toml")),
    ("qwen3_moe", include_str!("presets/mlx-lm/qwen3_moe.toml")),
];

/// The rule set a conversion uses: the preset (for `mlx-lm`, its base layered under the
/// family of `config`'s `model_type`), then each rule file over it. `input` names the
/// checkpoint in the error when the `mlx-lm` preset finds no config.
pub(crate) fn rule_set_for(
    preset: Option<&str>,
    rule_files: &[std::path::PathBuf],
    config: Option<&ModelConfig>,
    input: &Path,
) -> Result<RuleSet> {
    let mut rules = match preset {
        Some(MLX_LM_PRESET) => {
            let base = RuleSet::preset(MLX_LM_PRESET)?;
            let model_type = match config {
                Some(c) => c.model_type()?.map(|t| (t, c.path())),
                None => None,
            };
            let family = match model_type {
                Some((t, _)) => RuleSet::family(MLX_LM_PRESET, t)?,
                None => None,
            };
            match (family, model_type) {
                (Some(f), _) => Some(base.layered(f)),
                // A user's rule file supplies the family.
                _ if !rule_files.is_empty() => Some(base),
                (None, Some((t, path))) => {
                    return Err(Error::UnknownModelType {
                        path: path.to_path_buf(),
                        model_type: t.to_string(),
                        families: family_list(),
                    })
                }
                (None, None) => {
                    return Err(Error::NoModelType {
                        path: config.map_or_else(
                            || {
                                crate::model::model_dir(input)
                                    .unwrap_or_else(|| {
                                        input.parent().unwrap_or(input).to_path_buf()
                                    })
                                    .join(crate::model::CONFIG_NAME)
                            },
                            |c| c.path().to_path_buf(),
                        ),
                        detail: if config.is_some() {
                            "has no 'model_type'".to_string()
                        } else {
                            "is missing".to_string()
                        },
                        families: family_list(),
                    })
                }
            }
        }
        Some(name) => Some(RuleSet::preset(name)?),
        None => None,
    };
    for file in rule_files {
        let over = RuleSet::from_file(file)?;
        rules = Some(match rules {
            Some(base) => base.layered(over),
            None => over,
        });
    }
    rules.ok_or_else(|| Error::Rules {
        origin: "(none)".to_string(),
        detail: "give a preset or at least one rule file".to_string(),
    })
}

/// "llama (llama, mistral), qwen2 (qwen2), …" for errors.
fn family_list() -> String {
    RuleSet::families(MLX_LM_PRESET)
        .iter()
        .map(|(name, set)| format!("{name} ({})", set.model_types().join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An ordered list of rules, from one or more presets and rule files.
///
/// ```
/// use relayout::{DType, RuleSet, TensorInfo};
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
/// let tensor = |name: &str, shape: &[usize]| TensorInfo::contiguous(name, DType::F32, shape.to_vec());
/// let plan = rules.plan(&[tensor("shared.weight", &[100, 16]), tensor("fc.weight", &[10, 16])])?;
/// assert_eq!(plan.entries()[0].target(), "params.shared.embedding");
/// assert_eq!(plan.entries()[1].target(), "params.fc.kernel");
/// assert_eq!(plan.entries()[1].target_shape(), [16, 10]);
/// # Ok::<(), relayout::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    sources: Vec<String>,
    description: String,
    settings: FileSettings,
}

/// What a rule file says besides its rules: the model types a family serves, defaults
/// for config keys, checks of counts against the tensors, and how the output is written.
#[derive(Clone, Debug, Default)]
pub(crate) struct FileSettings {
    pub(crate) model_types: Vec<String>,
    pub(crate) config_defaults: BTreeMap<String, serde_json::Value>,
    pub(crate) counts: Vec<CountCheck>,
    pub(crate) output: OutputSettings,
}

/// A rule file's `[output]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputSettings {
    /// `__metadata__` entries of every output file (`{"format": "mlx"}`).
    pub(crate) metadata: BTreeMap<String, String>,
    /// Write `config.json` as `mlx_lm.convert` does (`config = "mlx-lm"`).
    pub(crate) mlx_lm_config: bool,
    /// The NaN bits of casts (`nan = "mlx"`); `None` keeps torch's.
    pub(crate) nan: Option<NanPolicy>,
    /// Without `--dtype`, cast floating tensors to the config's declared dtype
    /// (`dtype = "config"`).
    pub(crate) dtype_from_config: bool,
}

impl OutputSettings {
    /// `__metadata__` entries every output file carries.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// True when `config.json` is written as `mlx_lm.convert` writes it.
    pub fn mlx_lm_config(&self) -> bool {
        self.mlx_lm_config
    }

    /// The NaN bits of casts.
    pub fn nan(&self) -> NanPolicy {
        self.nan.unwrap_or_default()
    }

    /// True when floating tensors take the config's declared dtype without `--dtype`.
    pub fn dtype_from_config(&self) -> bool {
        self.dtype_from_config
    }

    /// `over`'s settings where it sets them, else these.
    fn layered(mut self, over: &OutputSettings) -> OutputSettings {
        self.metadata.extend(over.metadata.clone());
        self.mlx_lm_config |= over.mlx_lm_config;
        self.nan = over.nan.or(self.nan);
        self.dtype_from_config |= over.dtype_from_config;
        self
    }
}

/// A check that the tensors matching `pattern` carry every `index` in `0..count`, once.
#[derive(Clone, Debug)]
pub(crate) struct CountCheck {
    pub(crate) patterns: Vec<TensorPattern>,
    pub(crate) index: String,
    pub(crate) count: Count,
}

/// A count: fixed, or rendered from config values and variables.
#[derive(Clone, Debug)]
pub(crate) enum Count {
    Fixed(usize),
    /// A `--set` variable (`"{experts}"`).
    Var(String),
    /// `{config.KEY}` text.
    Template(Template),
}

impl Count {
    /// The count, at most `limit` (what the tensors could possibly satisfy).
    fn resolve(
        &self,
        vars: &BTreeMap<String, String>,
        names: &NameParts<'_>,
        limit: usize,
    ) -> std::result::Result<usize, String> {
        let (n, from) = match self {
            Count::Fixed(n) => (n.to_string(), format!("{n}")),
            Count::Var(v) => match vars.get(v) {
                Some(value) => (value.clone(), format!("--set {v}={value}")),
                None => return Err(format!("variable '{v}' is not set (pass --set {v}=N)")),
            },
            Count::Template(t) => {
                let text = t.render(names)?;
                (text.clone(), format!("'{t}' = {text}"))
            }
        };
        match n.trim().parse::<usize>() {
            Ok(k) if k > 0 && k <= limit => Ok(k),
            Ok(k) if k > 0 => Err(format!(
                "the count ({from}) is more than the {limit} tensors there are"
            )),
            _ => Err(format!("the count ({from}) is not a positive integer")),
        }
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::Fixed(n) => write!(f, "{n}"),
            Count::Var(v) => write!(f, "{{{v}}}"),
            Count::Template(t) => write!(f, "{t}"),
        }
    }
}

/// The tensors one stacking rule maps to one target, by index.
struct StackGroup {
    rule: String,
    origin: String,
    count: usize,
    /// Where the stacked entry goes in the plan (its first part's place).
    slot: usize,
    members: Vec<Option<PlanEntry>>,
}

impl StackGroup {
    fn add(&mut self, k: usize, entry: PlanEntry) -> Result<()> {
        let err = |detail: String| Error::Rules {
            origin: self.origin.clone(),
            detail: format!(
                "rule '{}', stacked target '{}': {detail}",
                self.rule, entry.target
            ),
        };
        match self.members.get_mut(k) {
            None => Err(err(format!(
                "'{}' has index {k}, outside 0..{}",
                entry.source_name, self.count
            ))),
            Some(Some(first)) => Err(err(format!(
                "index {k} is given twice, by '{}' and '{}'",
                first.source_name, entry.source_name
            ))),
            Some(slot) => {
                *slot = Some(entry);
                Ok(())
            }
        }
    }

    /// The stacked entry: every index present, every part alike.
    fn finish(self) -> Result<PlanEntry> {
        let err = |target: &str, detail: String| Error::Rules {
            origin: self.origin.clone(),
            detail: format!("rule '{}', stacked target '{target}': {detail}", self.rule),
        };
        let present: Vec<&PlanEntry> = self.members.iter().flatten().collect();
        let Some(&first) = present.first() else {
            return Err(err("?", "no parts".to_string()));
        };
        let missing: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_none())
            .map(|(k, _)| k.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(err(
                &first.target,
                format!(
                    "{} of its {} parts are missing: index {} (it has '{}' and {} more)",
                    missing.len(),
                    self.count,
                    missing.join(", "),
                    first.source_name,
                    present.len() - 1
                ),
            ));
        }
        for m in &present[1..] {
            if m.source_shape != first.source_shape || m.source_dtype != first.source_dtype {
                return Err(err(
                    &first.target,
                    format!(
                        "'{}' is {} {:?}, but '{}' is {} {:?}: stacked parts must be alike",
                        m.source_name,
                        m.source_dtype,
                        m.source_shape,
                        first.source_name,
                        first.source_dtype,
                        first.source_shape
                    ),
                ));
            }
        }
        let mut entry = first.clone();
        entry.stack = present
            .iter()
            .map(|m| (m.source, m.source_name.clone()))
            .collect();
        entry.target_shape.insert(0, self.count);
        Ok(entry)
    }
}

/// Stacks every tensor the rule maps to one target along a new leading axis, ordered by
/// the capture `index` (`0..count`).
#[derive(Clone, Debug)]
pub(crate) struct StackSpec {
    pub(crate) index: String,
    pub(crate) count: Count,
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
    /// The whole name (any of the patterns), with captures for the target.
    tensor: Option<Vec<TensorPattern>>,
    /// Config values that must hold (a missing key takes the file's default).
    config_is: Vec<(String, serde_json::Value)>,
    leaf: Option<Vec<String>>,
    /// Inclusive bounds.
    rank: Option<(usize, Option<usize>)>,
    dtype: Option<Vec<DType>>,
    module: Option<PathGlob>,
    module_last: Option<Vec<pattern::Glob>>,
    /// Lowercased.
    module_last_contains: Option<Vec<String>>,
    /// Lowercased.
    module_last_starts_with: Option<Vec<String>>,
    module_has: Vec<String>,
    module_lacks: Vec<String>,
    /// Leaves the parent module (the module's module) must hold.
    parent_has: Vec<String>,
    /// Class names (globs) from `--module-types`; never holds without that file.
    module_type: Option<Vec<pattern::Glob>>,
}

#[derive(Clone, Debug)]
enum Action {
    Drop,
    Map(Box<MapAction>),
}

/// What a mapping rule does: the target name and the op.
#[derive(Clone, Debug)]
struct MapAction {
    target: Template,
    perm: Option<PermSpec>,
    split: Option<SplitSpec>,
    stack: Option<StackSpec>,
    reshape: Option<ReshapeSpec>,
    /// Output dtype of floating tensors; wins over [`PlanOptions::dtype`].
    dtype: Option<DType>,
    /// Variables the rule needs, each with the message shown when it is not set.
    requires: BTreeMap<String, String>,
    /// A message attached to every entry the rule makes.
    warn: Option<String>,
    /// The message instead of `warn` when `--module-types` was given, so a note never
    /// advises passing an option the user already passed.
    warn_with_module_types: Option<String>,
    /// `quantize = false` or `quantize = { bits, group_size, mode }`: what a quantized
    /// conversion does with the rule's tensors (a family's quantization predicate).
    quantize: Option<crate::plan::QuantLayer>,
}

/// Equal parts along one source axis (negative counts from the end), each its own target.
#[derive(Clone, Debug)]
struct SplitSpec {
    axis: i64,
    parts: Vec<String>,
}

/// What conditions see of one tensor.
struct Subject<'a> {
    info: &'a TensorInfo,
    /// Module path components; empty for a top-level name.
    components: Vec<&'a str>,
    leaf: &'a str,
    /// Leaves of every tensor in the same module.
    siblings: &'a HashSet<&'a str>,
    /// Leaves of every tensor in the parent module.
    parent_siblings: &'a HashSet<&'a str>,
    /// The module's class, when `--module-types` gives it.
    module_type: Option<&'a str>,
    /// The model's config values (with the rule files' defaults).
    config: &'a ConfigView<'a>,
}

/// The model's config as rules see it: its values, else the rule files' defaults.
pub(crate) struct ConfigView<'a> {
    config: Option<&'a ModelConfig>,
    defaults: &'a BTreeMap<String, serde_json::Value>,
}

impl ConfigView<'_> {
    fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.config
            .and_then(|c| c.get(key))
            .or_else(|| self.defaults.get(key))
    }

    /// A value as rule text (`{config.KEY}`): strings, integers and booleans.
    fn text(&self, key: &str) -> std::result::Result<String, String> {
        if let Some(c) = self.config {
            if c.get(key).is_some() {
                return c.text(key).map_err(|e| e.to_string());
            }
        }
        match self.defaults.get(key) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
            Some(serde_json::Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            _ => Err(match self.config {
                Some(c) => format!("{}: key '{key}' is not set", c.path().display()),
                None => {
                    format!("'{{config.{key}}}' needs the model's config.json, and there is none")
                }
            }),
        }
    }
}

/// `detail`, naming the config file the values came from.
fn with_config_path(detail: String, opts: &PlanOptions) -> String {
    match &opts.config {
        Some(c) => format!("{detail} (in {})", c.path().display()),
        None => detail,
    }
}

/// Whether a config value equals a rule's: numbers by value, the rest exactly.
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// What planning takes besides the tensors.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Rule variables (`--set NAME=VALUE`), e.g. `heads` for attention.
    pub vars: BTreeMap<String, String>,
    /// The model's module classes (`--module-types`), for `module_type` conditions.
    pub module_types: Option<ModuleTypes>,
    /// The model's `config.json`, for `config_is` conditions and `{config.KEY}`.
    pub config: Option<ModelConfig>,
    /// Output dtype of every floating tensor (`--dtype`); a rule's own `dtype` wins.
    pub dtype: Option<DType>,
}

impl PlanOptions {
    /// Parses `--dtype` (and Python's `dtype=`): `bf16`, `f16` or `f32`, or the NumPy
    /// names of the same dtypes (`bfloat16`, `float16`, `float32`), in any case.
    pub fn parse_dtype(name: &str) -> Result<DType> {
        let lower = name.to_ascii_lowercase();
        syntax::output_dtype(&lower)
            .or_else(|| DType::from_numpy_name(&lower).filter(|d| d.cast_name().is_some()))
            .ok_or_else(|| Error::Rules {
                origin: "--dtype".to_string(),
                detail: format!(
                    "'{name}' is not one of bf16, f16, f32 (or bfloat16, float16, float32)"
                ),
            })
    }

    /// Parses one `--set NAME=VALUE`.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        match assignment.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => {
                self.vars
                    .insert(name.trim().to_string(), value.trim().to_string());
                Ok(())
            }
            _ => Err(Error::Rules {
                origin: "--set".to_string(),
                detail: format!("'{assignment}' is not NAME=VALUE"),
            }),
        }
    }
}

/// Largest `--module-types` file read: one line per module, a few MiB for the largest
/// models.
const MAX_MODULE_TYPES_BYTES: u64 = 64 << 20;

/// A model's module classes, `{module name: class name}`, as one line of Python writes
/// them: `json.dump({n: type(m).__name__ for n, m in model.named_modules()}, f)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleTypes {
    classes: HashMap<String, String>,
}

impl ModuleTypes {
    /// Parses the JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<ModuleTypes> {
        let bad = |detail: String| Error::ModuleTypes {
            path: origin.to_path_buf(),
            detail,
        };
        let classes: HashMap<String, String> = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "expected a JSON object of module name to class name: {e}"
            ))
        })?;
        Ok(ModuleTypes { classes })
    }

    /// Reads a module-types file.
    pub fn from_file(path: &Path) -> Result<ModuleTypes> {
        let text = read_text(path, MAX_MODULE_TYPES_BYTES, |detail| Error::ModuleTypes {
            path: path.to_path_buf(),
            detail,
        })?;
        ModuleTypes::from_json(&text, path)
    }

    /// The class of a module (`""` is the model itself).
    pub fn get(&self, module: &str) -> Option<&str> {
        self.classes.get(module).map(String::as_str)
    }
}

/// Reads a small text file: regular files only, at most `limit` bytes, UTF-8.
fn read_text(path: &Path, limit: u64, err: impl Fn(String) -> Error) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(err("not a regular file".to_string()));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(err(format!(
            "file is larger than the limit of {limit} bytes"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        err(format!(
            "not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })
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
        c.tensor
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(&s.info.name).is_some()))
            && c.config_is
                .iter()
                .all(|(k, want)| s.config.get(k).is_some_and(|have| same_value(have, want)))
            && c.leaf
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
            && c.module_last_starts_with.as_ref().is_none_or(|pres| {
                last.is_some_and(|l| {
                    let l = l.to_lowercase();
                    pres.iter().any(|x| l.starts_with(x.as_str()))
                })
            })
            && c.module_has.iter().all(|x| s.siblings.contains(x.as_str()))
            && c.parent_has
                .iter()
                .all(|x| s.parent_siblings.contains(x.as_str()))
            && c.module_type.as_ref().is_none_or(|gs| {
                s.module_type
                    .is_some_and(|t| gs.iter().any(|g| g.matches(t)))
            })
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

    /// The families of a preset that has them (`mlx-lm`), by name, each parsed: its
    /// [`RuleSet::model_types`] and rules. Empty for the other presets.
    pub fn families(preset: &str) -> Vec<(&'static str, RuleSet)> {
        if preset != MLX_LM_PRESET {
            return Vec::new();
        }
        MLX_LM_FAMILIES
            .iter()
            .filter_map(|(name, text)| {
                RuleSet::from_toml(text, &format!("preset {preset}/{name}"))
                    .ok()
                    .map(|set| (*name, set))
            })
            .collect()
    }

    /// The family of `preset` serving `model_type`, if there is one.
    pub fn family(preset: &str, model_type: &str) -> Result<Option<RuleSet>> {
        if preset != MLX_LM_PRESET {
            return Ok(None);
        }
        for (name, text) in MLX_LM_FAMILIES {
            let set = RuleSet::from_toml(text, &format!("preset {preset}/{name}"))?;
            if set.model_types().iter().any(|t| t == model_type) {
                return Ok(Some(set));
            }
        }
        Ok(None)
    }

    /// The embedded TOML of a family (`mlx-lm/llama`).
    pub fn family_source(preset: &str, name: &str) -> Option<&'static str> {
        (preset == MLX_LM_PRESET)
            .then(|| MLX_LM_FAMILIES.iter().find(|(n, _)| *n == name))
            .flatten()
            .map(|(_, t)| *t)
    }

    /// The embedded TOML of a built-in preset, to show or to start a rule file from.
    pub fn preset_source(name: &str) -> Option<&'static str> {
        PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// Parses a rule file's text; `origin` names it in errors and in the plan.
    pub fn from_toml(text: &str, origin: &str) -> Result<RuleSet> {
        let (description, settings, rules) = syntax::parse(text, origin)?;
        Ok(RuleSet {
            rules,
            sources: vec![origin.to_string()],
            description,
            settings,
        })
    }

    /// The `config.json` model types the set's files declare they serve (a family file
    /// of the `mlx-lm` preset).
    pub fn model_types(&self) -> &[String] {
        &self.settings.model_types
    }

    /// How the output is written (the files' `[output]` tables).
    pub fn output(&self) -> &OutputSettings {
        &self.settings.output
    }

    /// True when a rule reads the model's config (`config_is`, `{config.KEY}`) or the
    /// output needs it.
    pub fn needs_config(&self) -> bool {
        let s = &self.settings;
        s.output.mlx_lm_config
            || s.output.dtype_from_config
            || !s.counts.is_empty()
            || self.rules.iter().any(|r| {
                !r.conditions.config_is.is_empty()
                    || match &r.action {
                        Action::Map(a) => {
                            a.target.config_keys().next().is_some() || a.stack.is_some()
                        }
                        Action::Drop => false,
                    }
            })
    }

    /// The `description` of the file this set came from (the base of a layered set).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Reads and parses a rule file.
    pub fn from_file(path: &Path) -> Result<RuleSet> {
        let origin = path.display().to_string();
        let text = read_text(path, MAX_RULE_FILE_BYTES, |detail| Error::Rules {
            origin: origin.clone(),
            detail,
        })?;
        RuleSet::from_toml(&text, &origin)
    }

    /// `over`'s rules in front of this set's: they are tried first.
    pub fn layered(self, over: RuleSet) -> RuleSet {
        let mut rules = over.rules;
        rules.extend(self.rules);
        let mut sources = self.sources;
        sources.extend(over.sources);
        let mut settings = self.settings;
        settings.output = settings.output.layered(&over.settings.output);
        for (k, v) in over.settings.config_defaults {
            settings.config_defaults.insert(k, v);
        }
        settings.counts.extend(over.settings.counts);
        if settings.model_types.is_empty() {
            settings.model_types = over.settings.model_types;
        }
        RuleSet {
            rules,
            sources,
            description: self.description,
            settings,
        }
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
        self.plan_with(tensors, &PlanOptions::default())
    }

    /// [`RuleSet::plan`] with rule variables, module classes, the model's config and an
    /// output dtype.
    pub fn plan_with(&self, tensors: &[TensorInfo], opts: &PlanOptions) -> Result<Plan> {
        let mut siblings: HashMap<&str, HashSet<&str>> = HashMap::new();
        for t in tensors {
            let (module, leaf) = split_name(&t.name);
            siblings.entry(module).or_default().insert(leaf);
        }
        let empty = HashSet::new();
        let view = ConfigView {
            config: opts.config.as_ref(),
            defaults: &self.settings.config_defaults,
        };
        let config_text = |k: &str| view.text(k);
        let mut plan = Plan {
            sources: self.sources.clone(),
            nan: self.settings.output.nan(),
            metadata: self.settings.output.metadata.clone(),
            ..Plan::default()
        };
        // Target name → source name, to report both sides of a collision.
        let mut taken: HashMap<String, String> = HashMap::new();
        let mut stacks: HashMap<String, StackGroup> = HashMap::new();
        let mut shadow = Shadowing::new(self);

        for (index, info) in tensors.iter().enumerate() {
            let (module, leaf) = split_name(&info.name);
            let components: Vec<&str> = if module.is_empty() {
                Vec::new()
            } else {
                module.split('.').collect()
            };
            let parent = split_name(module).0;
            let subject = Subject {
                info,
                leaf,
                siblings: siblings.get(module).unwrap_or(&empty),
                parent_siblings: if module.is_empty() {
                    &empty
                } else {
                    siblings.get(parent).unwrap_or(&empty)
                },
                module_type: opts.module_types.as_ref().and_then(|m| m.get(module)),
                components,
                config: &view,
            };
            let mut matching = self
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.matches(&subject));
            let Some((chosen, rule)) = matching.next() else {
                plan.unmatched.push(Skipped {
                    source: index,
                    name: info.name.clone(),
                    reason: "no rule matched".to_string(),
                });
                continue;
            };
            shadow.record(index, chosen, matching.map(|(i, _)| i));
            let action = match &rule.action {
                Action::Drop => {
                    plan.dropped.push(Skipped {
                        source: index,
                        name: info.name.clone(),
                        reason: rule.name.clone(),
                    });
                    continue;
                }
                Action::Map(action) => action,
            };
            let captures = rule
                .conditions
                .tensor
                .as_ref()
                .and_then(|ps| ps.iter().find_map(|p| p.matches(&info.name)))
                .unwrap_or_default();
            let merged = merge_digits(&subject.components);
            let parent_merged =
                merge_digits(&subject.components[..subject.components.len().saturating_sub(1)]);
            let names = NameParts {
                name: &info.name,
                module,
                module_merged: &merged,
                leaf,
                parent,
                parent_merged: &parent_merged,
                part: "",
                captures: &captures,
                config: Some(&config_text),
            };
            for entry in rule.entries(action, index, info, &names, opts)? {
                if entry.target == "__metadata__" || entry.target.is_empty() {
                    return Err(Error::Rules {
                        origin: format!("'{}'", rule.name),
                        detail: format!(
                            "maps '{}' to the target name '{}', which a safetensors file cannot hold as a tensor",
                            info.name, entry.target
                        ),
                    });
                }
                if let Some(stack) = &action.stack {
                    let rule_err = |detail: String| Error::Rules {
                        origin: rule.origin.clone(),
                        detail: format!("rule '{}', tensor '{}': {detail}", rule.name, info.name),
                    };
                    let value = captures
                        .iter()
                        .find(|(n, _)| *n == stack.index)
                        .map_or("", |(_, v)| v.as_str());
                    let k: usize = value.parse().map_err(|_| {
                        rule_err(format!(
                            "the stack index {{{}}} is '{value}', not an integer",
                            stack.index
                        ))
                    })?;
                    if let Some(group) = stacks.get_mut(&entry.target) {
                        group.add(k, entry)?;
                        continue;
                    }
                    if let Some(first) = taken.get(entry.target.as_str()) {
                        return Err(Error::TargetCollision {
                            first: first.clone(),
                            second: info.name.clone(),
                            target: entry.target,
                        });
                    }
                    let count = stack
                        .count
                        .resolve(&opts.vars, &names, tensors.len())
                        .map_err(|e| rule_err(with_config_path(e, opts)))?;
                    taken.insert(entry.target.clone(), info.name.clone());
                    let mut group = StackGroup {
                        rule: rule.name.clone(),
                        origin: rule.origin.clone(),
                        count,
                        slot: plan.entries.len(),
                        members: vec![None; count],
                    };
                    let target = entry.target.clone();
                    plan.entries.push(entry.clone());
                    group.add(k, entry)?;
                    stacks.insert(target, group);
                    continue;
                }
                if let Some(first) = taken.get(entry.target.as_str()) {
                    return Err(Error::TargetCollision {
                        first: first.clone(),
                        second: info.name.clone(),
                        target: entry.target,
                    });
                }
                taken.insert(entry.target.clone(), info.name.clone());
                plan.entries.push(entry);
            }
        }
        let mut groups: Vec<StackGroup> = stacks.into_values().collect();
        groups.sort_by_key(|g| g.slot);
        for g in groups {
            let slot = g.slot;
            plan.entries[slot] = g.finish()?;
        }
        self.check_counts(tensors, opts, &config_text)?;
        plan.unreachable = shadow.report(self, tensors);
        Ok(plan)
    }

    /// The files' `[[count]]` checks: the indices the tensors carry are exactly
    /// `0..count` (a config's layer or expert count that disagrees with the tensors).
    fn check_counts(
        &self,
        tensors: &[TensorInfo],
        opts: &PlanOptions,
        config_text: pattern::ConfigText<'_>,
    ) -> Result<()> {
        for check in &self.settings.counts {
            let mut seen = std::collections::BTreeSet::new();
            for t in tensors {
                let Some(caps) = check.patterns.iter().find_map(|p| p.matches(&t.name)) else {
                    continue;
                };
                let value = caps
                    .iter()
                    .find(|(n, _)| *n == check.index)
                    .map_or("", |(_, v)| v.as_str());
                if let Ok(k) = value.parse::<usize>() {
                    seen.insert(k);
                }
            }
            let names = NameParts {
                name: "",
                module: "",
                module_merged: "",
                leaf: "",
                parent: "",
                parent_merged: "",
                part: "",
                captures: &[],
                config: Some(config_text),
            };
            let fail = |detail: String| Error::Rules {
                origin: self.sources.join(" + "),
                detail: format!("count check of '{}': {detail}", check.patterns[0]),
            };
            let count = check
                .count
                .resolve(&opts.vars, &names, usize::MAX)
                .map_err(|e| fail(with_config_path(e, opts)))?;
            let expected: std::collections::BTreeSet<usize> = (0..count).collect();
            if seen != expected {
                let shown = |s: &std::collections::BTreeSet<usize>| {
                    let v: Vec<String> = s.iter().take(12).map(ToString::to_string).collect();
                    let more = s.len().saturating_sub(12);
                    if more > 0 {
                        format!("{} and {more} more", v.join(", "))
                    } else if v.is_empty() {
                        "none".to_string()
                    } else {
                        v.join(", ")
                    }
                };
                return Err(fail(format!(
                    "{} = {count}, but the tensors have {{{}}} = {}",
                    check.count,
                    check.index,
                    shown(&seen)
                )));
            }
        }
        Ok(())
    }
}

impl Rule {
    /// The plan entries a mapping rule makes of one tensor: one, or one per split part.
    fn entries(
        &self,
        action: &MapAction,
        index: usize,
        info: &TensorInfo,
        names: &NameParts<'_>,
        opts: &PlanOptions,
    ) -> Result<Vec<PlanEntry>> {
        let rule_err = |detail: String| Error::Rules {
            origin: self.origin.clone(),
            detail: format!("rule '{}', tensor '{}': {detail}", self.name, info.name),
        };
        for (var, message) in &action.requires {
            if !opts.vars.contains_key(var) {
                return Err(Error::MissingVariable {
                    message: names.fill(message),
                    rule: self.name.clone(),
                    variable: var.clone(),
                });
            }
        }
        let var = |name: &str| -> Option<usize> {
            opts.vars
                .get(name)
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        if let Some(reshape) = &action.reshape {
            for v in reshape.variables() {
                if let Some(value) = opts.vars.get(v) {
                    if var(v).is_none() {
                        return Err(rule_err(format!(
                            "--set {v}={value}: the reshape needs a positive integer"
                        )));
                    }
                }
            }
        }
        let rank = info.shape.len();
        let perm = match &action.perm {
            Some(p) => p.resolve(rank).map_err(rule_err)?,
            None => (0..rank).collect(),
        };
        // Rule dtype first, then --dtype; integer, bool and F8 tensors never change.
        let dtype = match action.dtype.or(opts.dtype) {
            Some(to) if is_castable(info.dtype) => to,
            _ => info.dtype,
        };
        let parts: Vec<(&str, Option<Slice>)> = match &action.split {
            None => vec![("", None)],
            Some(split) => {
                let axis = resolve_axis(split.axis, rank).ok_or_else(|| {
                    rule_err(format!(
                        "split axis {} does not exist in a rank {rank} tensor",
                        split.axis
                    ))
                })?;
                let n = info.shape[axis];
                let k = split.parts.len();
                if n % k != 0 {
                    return Err(rule_err(format!(
                        "axis {axis} of size {n} does not split into {k} equal parts"
                    )));
                }
                let len = n / k;
                split
                    .parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let slice = Slice {
                            axis,
                            start: i * len,
                            len,
                        };
                        (p.as_str(), Some(slice))
                    })
                    .collect()
            }
        };
        let mut entries = Vec::with_capacity(parts.len());
        for (part, slice) in parts {
            let target = action
                .target
                .render(&NameParts { part, ..*names })
                .map_err(&rule_err)?;
            if target.is_empty() {
                return Err(rule_err(format!(
                    "target '{}' renders empty",
                    action.target
                )));
            }
            let mut entry = PlanEntry {
                source: index,
                source_name: info.name.clone(),
                target,
                dtype,
                source_dtype: info.dtype,
                source_shape: info.shape.clone(),
                slice,
                perm: perm.clone(),
                target_shape: Vec::new(),
                rule: self.name.clone(),
                stack: Vec::new(),
                warning: match (&opts.module_types, &action.warn_with_module_types) {
                    (Some(_), Some(w)) => Some(names.fill(w)),
                    _ => action.warn.as_ref().map(|w| names.fill(w)),
                },
                quant_rule: action.quantize.clone(),
                quant: None,
                quant_layer: None,
                kept_whole: None,
            };
            let permuted = entry.permuted_shape();
            entry.target_shape = match &action.reshape {
                None => permuted,
                Some(reshape) => {
                    let mut sliced = info.shape.clone();
                    if let Some(s) = slice {
                        sliced[s.axis] = s.len;
                    }
                    let numel = crate::layout::checked_numel(&permuted)
                        .ok_or_else(|| rule_err(format!("shape {permuted:?} overflows")))?;
                    reshape
                        .resolve(numel, &sliced, action.perm.as_ref(), &var)
                        .map_err(rule_err)?
                }
            };
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// Axis `axis` of a rank `rank` tensor, negative counting from the end.
fn resolve_axis(axis: i64, rank: usize) -> Option<usize> {
    let rank = i64::try_from(rank).ok()?;
    let a = if axis < 0 { axis + rank } else { axis };
    (0..rank).contains(&a).then_some(a as usize)
}

/// Which preset rules never got a tensor because user rules in front took every tensor
/// they match.
struct Shadowing {
    /// Only tracked when the set layers user files over a preset.
    active: bool,
    /// Per rule: tensors it matched, and for each the index of the rule that won.
    matched: Vec<Vec<(usize, usize)>>,
    chosen: Vec<usize>,
}

impl Shadowing {
    fn new(rules: &RuleSet) -> Shadowing {
        let n = rules.rules.len();
        Shadowing {
            active: rules.sources.len() > 1,
            matched: vec![Vec::new(); n],
            chosen: vec![0; n],
        }
    }

    fn record(&mut self, tensor: usize, winner: usize, others: impl Iterator<Item = usize>) {
        if !self.active {
            return;
        }
        self.chosen[winner] += 1;
        for r in others {
            self.matched[r].push((tensor, winner));
        }
    }

    fn report(&self, rules: &RuleSet, tensors: &[TensorInfo]) -> Vec<String> {
        let is_preset = |r: &Rule| r.origin.starts_with("preset ");
        let mut out = Vec::new();
        for (i, rule) in rules.rules.iter().enumerate() {
            let seen = &self.matched[i];
            let Some(&(tensor, winner)) = seen.first() else {
                continue;
            };
            if !is_preset(rule)
                || self.chosen[i] > 0
                || seen.iter().any(|&(_, w)| is_preset(&rules.rules[w]))
            {
                continue;
            }
            let by = &rules.rules[winner];
            out.push(format!(
                "{} rule '{}' is unreachable: all {} tensor(s) it matches are taken by rules of {} (first '{}' by '{}')",
                rule.origin,
                rule.name,
                seen.len(),
                by.origin,
                tensors.get(tensor).map_or("?", |t| t.name.as_str()),
                by.name
            ));
        }
        out
    }
}
