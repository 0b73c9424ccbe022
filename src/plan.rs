//! A plan: what happens to every source tensor. Pure data, built by [`crate::rules`],
//! consumed by the converter; it does no I/O.

use crate::dtype::DType;
use crate::layout::quant::{Quant, QuantMode, Quantize};

/// One output tensor: where it comes from and how it is made, in this order: a slice of
/// the source along one axis, a permutation of the axes, a reshape of the (contiguous)
/// result, and an element conversion.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlanEntry {
    /// Index of the source tensor in the checkpoint's tensor list.
    pub(crate) source: usize,
    /// Source tensor name.
    pub(crate) source_name: String,
    /// Output tensor name.
    pub(crate) target: String,
    /// Output dtype; differs from `source_dtype` when the entry converts elements.
    pub(crate) dtype: DType,
    pub(crate) source_dtype: DType,
    pub(crate) source_shape: Vec<usize>,
    /// The part of the source this entry reads, when it is one of several targets split
    /// from one source; `None` reads the whole tensor.
    pub(crate) slice: Option<Slice>,
    /// Output axis `k` is axis `perm[k]` of the (sliced) source.
    pub(crate) perm: Vec<usize>,
    /// Shape written: the permuted shape, or a reshape of it with the same element count.
    pub(crate) target_shape: Vec<usize>,
    /// The rule that produced this entry, for reports.
    pub(crate) rule: String,
    /// The sources of a stacked target, index by index (`source` is the first); empty
    /// for a target made of one source.
    pub(crate) stack: Vec<(usize, String)>,
    /// Something the user should check, e.g. a layout decided from a name alone.
    pub(crate) warning: Option<String>,
    /// What the rule says about quantizing the tensor (`quantize = …`), if anything.
    pub(crate) quant_rule: Option<QuantLayer>,
    /// How the tensor is quantized, when it is: its outputs are then the packed
    /// weight, its scales and (affine) its biases.
    pub(crate) quant: Option<Quant>,
    /// The per-layer entry the model's `config.json` records for it (a predicate's or a
    /// recipe's parameters), if any.
    pub(crate) quant_layer: Option<QuantLayer>,
    /// Why a weight that could be quantized was left whole.
    pub(crate) kept_whole: Option<String>,
}

/// Per-layer quantization parameters as mlx-lm records them in `config.json`: each key
/// present only when given (`group_size` may be present as `null`), `quantize = false`
/// as `off`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuantLayer {
    /// Leave the tensor whole (`quantize = false`).
    pub(crate) off: bool,
    pub(crate) group_size: Option<Option<usize>>,
    pub(crate) bits: Option<u32>,
    pub(crate) mode: Option<QuantMode>,
}

impl QuantLayer {
    /// `quantize = false`.
    pub fn is_off(&self) -> bool {
        self.off
    }

    /// The entry as mlx-lm writes it: `{"group_size": 64, "bits": 8}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        if let Some(g) = self.group_size {
            m.insert("group_size".into(), g.into());
        }
        if let Some(b) = self.bits {
            m.insert("bits".into(), b.into());
        }
        if let Some(mode) = self.mode {
            m.insert("mode".into(), mode.name().into());
        }
        serde_json::Value::Object(m)
    }

    /// The parameters these give, each missing one defaulting as mlx does for the mode
    /// (affine when none is named).
    pub fn quant(&self) -> crate::Result<Quant> {
        Quant::new(
            self.mode.unwrap_or(QuantMode::Affine),
            self.bits,
            self.group_size.flatten(),
        )
    }
}

/// One tensor of the output: name, dtype, shape.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl PlanEntry {
    /// Index of the source tensor in the checkpoint's tensor list.
    pub fn source(&self) -> usize {
        self.source
    }

    /// Source tensor name.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Output tensor name.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Output dtype; differs from `source_dtype` when the entry converts elements.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Source dtype.
    pub fn source_dtype(&self) -> DType {
        self.source_dtype
    }

    /// Source shape.
    pub fn source_shape(&self) -> &[usize] {
        &self.source_shape
    }

    /// The part of the source this entry reads, when it is one of several targets split
    /// from one source; `None` reads the whole tensor.
    pub fn slice(&self) -> Option<Slice> {
        self.slice
    }

    /// Output axis `k` is axis `perm[k]` of the (sliced) source.
    pub fn perm(&self) -> &[usize] {
        &self.perm
    }

    /// Shape written: the permuted shape, or a reshape of it with the same element count.
    pub fn target_shape(&self) -> &[usize] {
        &self.target_shape
    }

    /// The rule that produced this entry, for reports.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// The sources of a stacked target as (tensor index, name), in stack order (the
    /// first is [`PlanEntry::source`]); empty for a target made of one source. Each is
    /// sliced and permuted alike, and they fill the target's leading axis.
    pub fn stack(&self) -> &[(usize, String)] {
        &self.stack
    }

    /// Every source tensor the entry reads, by index.
    pub fn sources(&self) -> Vec<usize> {
        if self.stack.is_empty() {
            vec![self.source]
        } else {
            self.stack.iter().map(|(i, _)| *i).collect()
        }
    }

    /// Something the user should check, e.g. a layout decided from a name alone.
    pub fn warning(&self) -> Option<&str> {
        self.warning.as_deref()
    }

    /// How the tensor is quantized, if it is.
    pub fn quant(&self) -> Option<Quant> {
        self.quant
    }

    /// The per-layer entry `config.json` records for it, if any.
    pub fn quant_layer(&self) -> Option<&QuantLayer> {
        self.quant_layer.as_ref()
    }

    /// Why a weight that could be quantized was left whole, when it was.
    pub fn kept_whole(&self) -> Option<&str> {
        self.kept_whole.as_deref()
    }

    /// The quantize op of the entry, if it is quantized.
    pub(crate) fn quantize_op(&self) -> crate::Result<Option<Quantize>> {
        self.quant.map(|q| Quantize::new(q, self.dtype)).transpose()
    }

    /// The tensors the entry writes: the target, or for a quantized weight `X.weight`
    /// (`uint32`, the last axis packed), `X.scales` and (affine) `X.biases` (the last
    /// axis one per group).
    pub fn outputs(&self) -> Vec<OutputTensor> {
        let Some(q) = self.quant else {
            return vec![OutputTensor {
                name: self.target.clone(),
                dtype: self.dtype,
                shape: self.target_shape.clone(),
            }];
        };
        let base = self.target.strip_suffix(".weight").unwrap_or(&self.target);
        let (lead, cols) = match self.target_shape.split_last() {
            Some((&c, lead)) => (lead.to_vec(), c),
            None => (Vec::new(), 0),
        };
        let with = |last: usize| {
            let mut s = lead.clone();
            s.push(last);
            s
        };
        let groups = cols / q.group_size();
        let mut out = vec![
            OutputTensor {
                name: self.target.clone(),
                dtype: DType::U32,
                shape: with(cols * q.bits() as usize / 32),
            },
            OutputTensor {
                name: format!("{base}.scales"),
                dtype: q.scale_dtype(self.dtype),
                shape: with(groups),
            },
        ];
        if q.has_biases() {
            out.push(OutputTensor {
                name: format!("{base}.biases"),
                dtype: self.dtype,
                shape: with(groups),
            });
        }
        out
    }
}

/// Indices `start..start + len` of source axis `axis`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Slice {
    pub(crate) axis: usize,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl Slice {
    /// The source axis.
    pub fn axis(&self) -> usize {
        self.axis
    }

    /// First index read.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Number of indices read.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it reads nothing (rules never make such a slice).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl PlanEntry {
    /// True when the op leaves the axes in place.
    pub fn is_identity(&self) -> bool {
        self.perm.iter().enumerate().all(|(i, &p)| i == p)
    }

    /// The shape the permutation produces, before any reshape.
    pub fn permuted_shape(&self) -> Vec<usize> {
        let mut out = self.part_shape();
        if !self.stack.is_empty() {
            out.insert(0, self.stack.len());
        }
        out
    }

    /// The permuted shape of one part (of the one source, or of each stacked source).
    fn part_shape(&self) -> Vec<usize> {
        let mut shape = self.source_shape.clone();
        if let Some(s) = self.slice {
            if let Some(n) = shape.get_mut(s.axis) {
                *n = s.len;
            }
        }
        self.perm
            .iter()
            .map(|&p| shape.get(p).copied().unwrap_or(0))
            .collect()
    }

    /// True when the entry reshapes the permuted tensor.
    pub fn is_reshape(&self) -> bool {
        self.permuted_shape() != self.target_shape
    }

    /// A short description of the op: `copy`, `slice[0:0..4]`, `permute[1, 0]`,
    /// `reshape`, `cast F32->BF16`, joined with ` + `.
    pub fn describe_op(&self) -> String {
        let mut parts = Vec::new();
        if !self.stack.is_empty() {
            parts.push(format!("stack[0..{}]", self.stack.len()));
        }
        if let Some(s) = self.slice {
            parts.push(format!(
                "slice[{}:{}..{}]",
                s.axis,
                s.start,
                s.start + s.len
            ));
        }
        if !self.is_identity() {
            parts.push(format!("permute{:?}", self.perm));
        }
        if self.is_reshape() {
            parts.push(format!("reshape{:?}", self.target_shape));
        }
        if self.dtype != self.source_dtype {
            parts.push(format!("cast {}->{}", self.source_dtype, self.dtype));
        }
        if let Some(q) = self.quant {
            parts.push(format!(
                "quantize {} {}-bit g{}",
                q.mode(),
                q.bits(),
                q.group_size()
            ));
        }
        if parts.is_empty() {
            "copy".to_string()
        } else {
            parts.join(" + ")
        }
    }
}

/// A source tensor left out of the output, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Skipped {
    /// Index of the source tensor in the checkpoint's tensor list.
    #[serde(skip)]
    pub(crate) source: usize,
    pub(crate) name: String,
    pub(crate) reason: String,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl Skipped {
    /// `source`.
    pub fn source(&self) -> usize {
        self.source
    }

    /// Source tensor name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why it was left out.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// The whole mapping of a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// Output tensors, in source order.
    pub(crate) entries: Vec<PlanEntry>,
    /// Tensors a rule dropped.
    pub(crate) dropped: Vec<Skipped>,
    /// Tensors no rule matched; they are not in the output.
    pub(crate) unmatched: Vec<Skipped>,
    /// Provenance: the preset and rule files this plan was built from.
    pub(crate) sources: Vec<String>,
    /// Preset rules that matched some tensors but were shadowed for every one of them by
    /// rules layered in front (user rule files), one sentence each.
    pub(crate) unreachable: Vec<String>,
    /// The model folder's files a folder output receives beside the weights (config,
    /// tokenizer, …): set by [`crate::open_and_plan`] when the input is a model folder.
    pub(crate) files: Vec<crate::model::ModelFile>,
    /// The NaN bits of the plan's casts (the rule files' `output.nan`).
    pub(crate) nan: crate::layout::cast::NanPolicy,
    /// Where the output dtype came from when the preset took it from the model's config
    /// (`bfloat16 from config.json 'torch_dtype'`).
    pub(crate) dtype_from: Option<String>,
    /// `__metadata__` entries the rule files ask every output file to carry
    /// (`{"format": "mlx"}`).
    pub(crate) metadata: std::collections::BTreeMap<String, String>,
    /// The `quantization` object of a quantized conversion's `config.json`, as mlx-lm
    /// writes it (top-level parameters and per-layer entries).
    pub(crate) quantization: Option<serde_json::Value>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl Plan {
    /// Output tensors, in source order.
    pub fn entries(&self) -> &[PlanEntry] {
        &self.entries
    }

    /// Where the output dtype came from when the preset took it from the model's config
    /// (`bfloat16 from config.json 'torch_dtype'`); `None` otherwise.
    pub fn dtype_from(&self) -> Option<&str> {
        self.dtype_from.as_deref()
    }

    /// The `quantization` object `config.json` gets, for a quantized conversion.
    pub fn quantization(&self) -> Option<&serde_json::Value> {
        self.quantization.as_ref()
    }

    /// `__metadata__` entries the rule files ask every output file to carry.
    pub fn metadata(&self) -> &std::collections::BTreeMap<String, String> {
        &self.metadata
    }

    /// The NaN bits of the plan's casts: torch's, or mlx's `astype` (preset `mlx-lm`).
    pub fn nan(&self) -> crate::layout::cast::NanPolicy {
        self.nan
    }

    /// The model folder's files a folder output receives beside the weights.
    pub fn files(&self) -> &[crate::model::ModelFile] {
        &self.files
    }

    /// Tensors a rule dropped.
    pub fn dropped(&self) -> &[Skipped] {
        &self.dropped
    }

    /// Tensors no rule matched; they are not in the output.
    pub fn unmatched(&self) -> &[Skipped] {
        &self.unmatched
    }

    /// Provenance: the preset and rule files this plan was built from.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Preset rules that matched some tensors but were shadowed for every one of them by
    /// rules layered in front (user rule files), one sentence each.
    pub fn unreachable(&self) -> &[String] {
        &self.unreachable
    }
}

impl Plan {
    /// Fails when some tensor matched no rule, naming the first; for callers that do
    /// not want tensors to vanish from the output silently.
    pub fn require_all_matched(&self) -> crate::error::Result<()> {
        match self.unmatched.first() {
            None => Ok(()),
            Some(first) => Err(crate::error::Error::Unmatched {
                count: self.unmatched.len(),
                first: first.name.clone(),
            }),
        }
    }

    /// The entry a source tensor became, if any.
    pub fn entry_for(&self, source_name: &str) -> Option<&PlanEntry> {
        self.entries.iter().find(|e| e.source_name == source_name)
    }
}
