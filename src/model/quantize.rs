//! Which tensors a quantized conversion quantizes, with which parameters, and the
//! `quantization` object `config.json` records: mlx-lm 0.32's `quantize_model`, as
//! plan data.
//!
//! - The top-level parameters are `--q-mode` with `--q-bits` and `--q-group-size`, each
//!   defaulting per mode (affine 64/4, mxfp4 32/4, nvfp4 16/4, mxfp8 32/8).
//! - A candidate is what mlx-lm's `to_quantized` modules hold: a 2-D `.weight` (Linear,
//!   Embedding) or a 3-D stacked expert weight (`switch_mlp`, a SwitchLinear), of a
//!   float dtype. Its last dimension must be a multiple of the *top-level* group size,
//!   checked before any predicate; otherwise it stays whole, with no entry.
//! - Then the predicate: a recipe (`--quant-predicate`) when given, else the rules'
//!   `quantize` key (the family's own predicate: Qwen3-MoE's router at 8 bits, group
//!   64). Its parameters go into `config.json` verbatim under the module's path; a
//!   tensor with no parameters of its own takes the top-level ones and gets no entry.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::quant::{Quant, QuantMode};
use crate::plan::{Plan, PlanEntry, QuantLayer};

/// mlx-lm's mixed-precision recipes (`--quant-predicate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recipe {
    Mixed2_6,
    Mixed3_4,
    Mixed3_6,
    Mixed4_6,
}

impl Recipe {
    /// Every recipe, in mlx-lm's order.
    pub const ALL: [Recipe; 4] = [
        Recipe::Mixed2_6,
        Recipe::Mixed3_4,
        Recipe::Mixed3_6,
        Recipe::Mixed4_6,
    ];

    /// The name mlx-lm gives it (`mixed_3_6`).
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Mixed2_6 => "mixed_2_6",
            Recipe::Mixed3_4 => "mixed_3_4",
            Recipe::Mixed3_6 => "mixed_3_6",
            Recipe::Mixed4_6 => "mixed_4_6",
        }
    }

    /// The recipe named `name`; an error listing the recipes otherwise.
    pub fn parse(name: &str) -> Result<Recipe> {
        Recipe::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| {
                quant_err(format!(
                    "unknown quantization recipe '{name}' (known: {})",
                    Recipe::ALL.map(Recipe::name).join(", ")
                ))
            })
    }

    /// (low, high) bits.
    pub fn bits(self) -> (u32, u32) {
        match self {
            Recipe::Mixed2_6 => (2, 6),
            Recipe::Mixed3_4 => (3, 4),
            Recipe::Mixed3_6 => (3, 6),
            Recipe::Mixed4_6 => (4, 6),
        }
    }
}

impl std::fmt::Display for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `--quantize` asks for: mlx-lm's `q_mode`, `q_bits`, `q_group_size` and
/// `quant_predicate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizeOptions {
    pub mode: QuantMode,
    /// `None`: the mode's default.
    pub bits: Option<u32>,
    /// `None`: the mode's default.
    pub group_size: Option<usize>,
    pub recipe: Option<Recipe>,
}

impl Default for QuantizeOptions {
    /// mlx-lm's default: affine, 4 bits, groups of 64.
    fn default() -> Self {
        QuantizeOptions {
            mode: QuantMode::Affine,
            bits: None,
            group_size: None,
            recipe: None,
        }
    }
}

impl QuantizeOptions {
    /// The options mlx-lm's flags describe (`--quantize`, `--q-bits`,
    /// `--q-group-size`, `--q-mode`, `--quant-predicate`), checked: `None` without
    /// `quantize`, and an error when any other is given without it.
    pub fn from_flags(
        quantize: bool,
        bits: Option<u32>,
        group_size: Option<usize>,
        mode: Option<&str>,
        recipe: Option<&str>,
    ) -> Result<Option<QuantizeOptions>> {
        if !quantize {
            let given: Vec<&str> = [
                (bits.is_some(), "--q-bits"),
                (group_size.is_some(), "--q-group-size"),
                (mode.is_some(), "--q-mode"),
                (recipe.is_some(), "--quant-predicate"),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
            if given.is_empty() {
                return Ok(None);
            }
            return Err(quant_err(format!(
                "{} only apply with --quantize (relayout's -q is --quiet, not mlx-lm's -q for quantize)",
                given.join(", ")
            )));
        }
        let opts = QuantizeOptions {
            mode: mode
                .map(QuantMode::parse)
                .transpose()?
                .unwrap_or(QuantMode::Affine),
            bits,
            group_size,
            recipe: recipe.map(Recipe::parse).transpose()?,
        };
        opts.quant()?;
        Ok(Some(opts))
    }

    /// The top-level parameters, checked as `mx.quantize` and mlx-lm check them: an
    /// error naming the allowed values, or refusing a recipe with a non-affine mode.
    pub fn quant(&self) -> Result<Quant> {
        if let Some(r) = self.recipe {
            if self.mode != QuantMode::Affine {
                return Err(quant_err(format!(
                    "the recipe {r} quantizes in affine mode only, not {} (mlx-lm: \"Quant predicates only support 'affine' quantization.\")",
                    self.mode
                )));
            }
        }
        Quant::new(self.mode, self.bits, self.group_size)
    }
}

/// Decides every entry's quantization in `plan` by `opts` and sets the plan's
/// `quantization` config object.
pub(crate) fn apply(plan: &mut Plan, opts: &QuantizeOptions) -> Result<()> {
    let top = opts.quant()?;
    let recipe = match opts.recipe {
        Some(r) => Some(RecipeRun::new(r, opts.group_size, &plan.entries)?),
        None => None,
    };
    let mut config = Map::new();
    config.insert("group_size".into(), json!(top.group_size()));
    config.insert("bits".into(), json!(top.bits()));
    config.insert("mode".into(), json!(top.mode().name()));
    for entry in &mut plan.entries {
        entry.quant = None;
        entry.quant_layer = None;
        entry.kept_whole = None;
        if !entry.target.ends_with(".weight") {
            continue;
        }
        if let Some(why) = not_a_candidate(entry) {
            entry.kept_whole = Some(why);
            continue;
        }
        let cols = entry.target_shape.last().copied().unwrap_or(0);
        if cols % top.group_size() != 0 {
            entry.kept_whole = Some(format!(
                "its last dimension {cols} is not a multiple of the group size {}",
                top.group_size()
            ));
            continue;
        }
        let path = module_path(&entry.target).to_string();
        let layer = match &recipe {
            Some(r) => Some(r.layer(&path)?),
            None => entry.quant_rule.clone(),
        };
        let quant = match &layer {
            Some(l) if l.off => {
                entry.kept_whole = Some(format!("rule '{}' sets quantize = false", entry.rule));
                continue;
            }
            Some(l) => l
                .quant()
                .map_err(|e| quant_err(format!("'{}': {e}", entry.target)))?,
            None => top,
        };
        if cols % quant.group_size() != 0 {
            // mlx-lm checks only the top-level group size and then fails in mx.quantize.
            return Err(quant_err(format!(
                "'{}': its last dimension {cols} is not a multiple of the group size {} its rule asks for",
                entry.target,
                quant.group_size()
            )));
        }
        if let Some(l) = &layer {
            config.insert(path, l.to_json());
        }
        entry.quant = Some(quant);
        entry.quant_layer = layer;
    }
    plan.quantization = Some(Value::Object(config));
    Ok(())
}

/// Why `entry` (a `.weight`) is not what mlx-lm quantizes, if it is not.
fn not_a_candidate(entry: &PlanEntry) -> Option<String> {
    if !matches!(entry.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Some(format!("a {} weight is not quantized", entry.dtype));
    }
    match entry.target_shape.len() {
        2 => None,
        3 if entry.target.contains("switch_mlp") => None,
        n => Some(format!(
            "{n}-D, not a Linear, Embedding or switch_mlp weight"
        )),
    }
}

/// The module a `.weight` belongs to (`model.layers.0.mlp.down_proj`).
fn module_path(target: &str) -> &str {
    target.strip_suffix(".weight").unwrap_or(target)
}

/// A recipe over one model: the position of the layer index in module paths and the
/// number of layers, found as mlx-lm finds them (from the first `down_proj` module).
struct RecipeRun {
    recipe: Recipe,
    group_size: Option<usize>,
    location: usize,
    layers: usize,
}

impl RecipeRun {
    fn new(recipe: Recipe, group_size: Option<usize>, entries: &[PlanEntry]) -> Result<RecipeRun> {
        let paths: Vec<&str> = entries.iter().map(|e| parent(&e.target)).collect();
        let Some(down) = paths.iter().find(|p| p.contains("down_proj")) else {
            return Err(quant_err(format!(
                "the recipe {recipe} needs layers with a down_proj, as mlx-lm's recipes do, and this model has none (mlx-lm: \"Model does not have expected keys for mixed quant.\")"
            )));
        };
        let parts: Vec<&str> = down.split('.').collect();
        let location = parts
            .iter()
            .position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .unwrap_or(parts.len().saturating_sub(1));
        // mlx-lm counts model.layers: the distinct indices under the same prefix.
        let prefix = parts[..location].join(".");
        let mut indices = BTreeSet::new();
        for p in &paths {
            let ps: Vec<&str> = p.split('.').collect();
            if ps.len() > location && ps[..location].join(".") == prefix {
                if let Ok(i) = ps[location].parse::<usize>() {
                    indices.insert(i);
                }
            }
        }
        let layers = indices.last().map_or(0, |&i| i + 1);
        Ok(RecipeRun {
            recipe,
            group_size,
            location,
            layers,
        })
    }

    /// The parameters the recipe gives module `path`.
    fn layer(&self, path: &str) -> Result<QuantLayer> {
        let parts: Vec<&str> = path.split('.').collect();
        let index = match parts.get(self.location) {
            None => 0,
            Some(p) => p.parse::<i64>().map_err(|_| {
                quant_err(format!(
                    "the recipe {} reads a layer index at position {} of '{path}', which holds '{p}'",
                    self.recipe, self.location
                ))
            })?,
        };
        let n = self.layers as i64;
        let more = index < n / 8 || index >= 7 * n / 8 || (index - n / 8).rem_euclid(3) == 2;
        let (low, high_bits) = self.recipe.bits();
        let v_proj = ["v_proj", "v_a_proj", "v_b_proj"]
            .iter()
            .any(|k| path.contains(k));
        let high = (v_proj || path.contains("down_proj")) && more || path.contains("lm_head");
        let bits = if high { high_bits } else { low };
        Ok(QuantLayer {
            off: false,
            group_size: Some(self.group_size),
            bits: Some(bits),
            mode: Some(QuantMode::Affine),
        })
    }
}

/// The module path of a tensor name: all but its last component.
fn parent(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(p, _)| p)
}

fn quant_err(detail: String) -> Error {
    Error::Quantization { detail }
}
