//! What the commands report, as plain data. Each report derives `Serialize`: the CLI's
//! `--json` prints it and the Python package builds its objects from it, so both give
//! the same keys from the same struct. Paths serialize as text (lossily where a name is
//! not UTF-8), dtypes by their safetensors name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};

use crate::convert::Converter;
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::{Plan, Skipped, Slice};
use crate::reader::{Checkpoint, Format};
use crate::writer::shard::OutputLayout;

/// What a finished conversion did (`convert --json`, `relayout.convert`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ConvertReport {
    /// The checkpoint read.
    #[serde(serialize_with = "path_text")]
    pub(crate) input: PathBuf,
    /// The output file or folder.
    #[serde(serialize_with = "path_text")]
    pub(crate) output: PathBuf,
    /// Tensors this run wrote.
    pub(crate) tensors: usize,
    /// Bytes of tensor data this run wrote.
    pub(crate) bytes: u64,
    /// Wall time of the conversion, from opening the output to its commit.
    pub(crate) seconds: f64,
    /// Output throughput in GB/s (10^9 bytes): `bytes / seconds`.
    pub(crate) gb_per_s: f64,
    /// The backend that ran it (`cpu (2 threads)`, `gpu (…adapter…)`).
    pub(crate) backend: String,
    /// Source tensors a rule dropped, and source tensors no rule matched.
    pub(crate) dropped: usize,
    pub(crate) unmatched: usize,
    /// The files this run wrote: the output file, or its shards.
    #[serde(serialize_with = "paths_text")]
    pub(crate) outputs: Vec<PathBuf>,
    /// Shards a worker found already complete and kept (a re-run).
    #[serde(serialize_with = "paths_text")]
    pub(crate) reused: Vec<PathBuf>,
    /// The index of a shard set, when this run wrote it.
    #[serde(serialize_with = "opt_path_text")]
    pub(crate) index: Option<PathBuf>,
    /// The model folder's files (config, tokenizer, …) this run wrote beside the shards.
    #[serde(serialize_with = "paths_text")]
    pub(crate) copied: Vec<PathBuf>,
    /// Shards in the whole set (0 for a single file), and how many exist now.
    pub(crate) shards: usize,
    pub(crate) shards_present: usize,
    /// Bytes this run uploaded to the GPU and read back from it (0 on the CPU).
    pub(crate) device_upload_bytes: u64,
    pub(crate) device_readback_bytes: u64,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl ConvertReport {
    /// `input`.
    pub fn input(&self) -> &std::path::Path {
        &self.input
    }

    /// `output`.
    pub fn output(&self) -> &std::path::Path {
        &self.output
    }

    /// The model folder's files (config, tokenizer, …) this run wrote beside the shards.
    pub fn copied(&self) -> &[PathBuf] {
        &self.copied
    }

    /// Tensors this run wrote.
    pub fn tensors(&self) -> usize {
        self.tensors
    }

    /// Bytes of tensor data this run wrote.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Wall time of the conversion, from opening the output to its commit.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    /// Output throughput in GB/s (10^9 bytes): `bytes / seconds`.
    pub fn gb_per_s(&self) -> f64 {
        self.gb_per_s
    }

    /// The backend that ran it (`cpu (2 threads)`, `gpu (…adapter…)`).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Source tensors a rule dropped.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Source tensors no rule matched.
    pub fn unmatched(&self) -> usize {
        self.unmatched
    }

    /// `outputs`.
    pub fn outputs(&self) -> &[PathBuf] {
        &self.outputs
    }

    /// `reused`.
    pub fn reused(&self) -> &[PathBuf] {
        &self.reused
    }

    /// `index`.
    pub fn index(&self) -> Option<&std::path::Path> {
        self.index.as_deref()
    }

    /// Shards in the whole set (0 for a single file).
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Shards of the set that exist now.
    pub fn shards_present(&self) -> usize {
        self.shards_present
    }

    /// Bytes this run uploaded to the GPU (0 on the CPU).
    pub fn device_upload_bytes(&self) -> u64 {
        self.device_upload_bytes
    }

    /// Bytes this run read back from the GPU (0 on the CPU).
    pub fn device_readback_bytes(&self) -> u64 {
        self.device_readback_bytes
    }
}

/// `bytes / seconds` in GB/s; 0 for a run too short to time.
pub(crate) fn gb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    }
}

/// The whole mapping of a checkpoint, with its shard layout when one was asked for
/// (`plan --json`, `relayout.plan`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PlanReport {
    /// The checkpoint planned.
    #[serde(serialize_with = "path_text")]
    pub(crate) path: PathBuf,
    /// The preset and rule files the plan was built from.
    pub(crate) sources: Vec<String>,
    /// One row per output tensor, in plan order.
    pub(crate) entries: Vec<PlanRow>,
    /// Tensors a rule dropped, and tensors no rule matched.
    pub(crate) dropped: Vec<Skipped>,
    pub(crate) unmatched: Vec<Skipped>,
    /// Preset rules shadowed by user rules for every tensor they matched.
    pub(crate) unreachable: Vec<String>,
    /// The output shards (`--max-shard-size`); `None` for one file.
    pub(crate) shards: Option<Vec<ShardRow>>,
    /// Bytes of tensor data over all shards; `None` for one file.
    pub(crate) total_size: Option<u64>,
    /// How many `--shard i/N` workers can share the work; `None` for one file.
    pub(crate) max_workers: Option<usize>,
    /// The model folder's files a folder output receives beside the weights.
    pub(crate) copied: Vec<FileRow>,
    /// Where the output dtype came from when the preset took it from the config.
    pub(crate) dtype_from: Option<String>,
    /// The `quantization` object `config.json` gets, for a quantized conversion.
    pub(crate) quantization: Option<serde_json::Value>,
}

/// One file of the model folder that a folder output receives (`config.json`, the
/// tokenizer, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FileRow {
    /// Its name in the output folder.
    pub(crate) name: String,
    /// The file it comes from (links followed).
    #[serde(serialize_with = "path_text")]
    pub(crate) source: PathBuf,
    /// Bytes written.
    pub(crate) bytes: u64,
    /// True when the bytes written are not the source's (the `mlx-lm` preset's
    /// `config.json`).
    pub(crate) rewritten: bool,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl FileRow {
    /// Its name in the output folder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file it comes from (links followed).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Bytes written.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True when the bytes written are not the source's.
    pub fn rewritten(&self) -> bool {
        self.rewritten
    }
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl PlanReport {
    /// `path`.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The preset and rule files the plan was built from.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// One row per output tensor, in plan order.
    pub fn entries(&self) -> &[PlanRow] {
        &self.entries
    }

    /// Tensors a rule dropped.
    pub fn dropped(&self) -> &[Skipped] {
        &self.dropped
    }

    /// Tensors no rule matched.
    pub fn unmatched(&self) -> &[Skipped] {
        &self.unmatched
    }

    /// Preset rules shadowed by user rules for every tensor they matched.
    pub fn unreachable(&self) -> &[String] {
        &self.unreachable
    }

    /// The output shards (`--max-shard-size`); `None` for one file.
    pub fn shards(&self) -> Option<&[ShardRow]> {
        self.shards.as_deref()
    }

    /// Bytes of tensor data over all shards; `None` for one file.
    pub fn total_size(&self) -> Option<u64> {
        self.total_size
    }

    /// How many `--shard i/N` workers can share the work; `None` for one file.
    pub fn max_workers(&self) -> Option<usize> {
        self.max_workers
    }

    /// The model folder's files a folder output receives beside the weights.
    pub fn copied(&self) -> &[FileRow] {
        &self.copied
    }

    /// Where the output dtype came from when the preset took it from the model's config
    /// (`bfloat16 from config.json 'torch_dtype'`).
    pub fn dtype_from(&self) -> Option<&str> {
        self.dtype_from.as_deref()
    }

    /// The `quantization` object `config.json` gets, for a quantized conversion.
    pub fn quantization(&self) -> Option<&serde_json::Value> {
        self.quantization.as_ref()
    }
}

/// One output tensor of a [`PlanReport`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PlanRow {
    /// Source tensor name.
    pub(crate) source: String,
    /// Output tensor name.
    pub(crate) target: String,
    pub(crate) source_shape: Vec<usize>,
    pub(crate) target_shape: Vec<usize>,
    pub(crate) source_dtype: DType,
    pub(crate) dtype: DType,
    /// The op as `plan` prints it (`permute[3, 2, 1, 0] + cast F32->BF16`).
    pub(crate) op: String,
    /// Output axis `k` is axis `perm[k]` of the (sliced) source.
    pub(crate) perm: Vec<usize>,
    /// The part of the source read, when one source is split into several targets.
    pub(crate) slice: Option<Slice>,
    /// The rule that produced the entry.
    pub(crate) rule: String,
    /// Something to check, e.g. a layout decided from a name alone.
    pub(crate) warning: Option<String>,
    /// Bytes of the output tensor.
    pub(crate) bytes: u64,
    /// The shard file it is written to, for a sharded layout.
    pub(crate) shard: Option<String>,
    /// The sources of a stacked target, in stack order (`source` is the first); empty
    /// for a target made of one source.
    pub(crate) stack: Vec<String>,
    /// How the tensor is quantized (mode, bits, group_size), when it is.
    pub(crate) quantize: Option<crate::layout::quant::Quant>,
    /// The per-layer entry `config.json` records for it (a predicate's or a recipe's
    /// parameters), if any.
    pub(crate) quant_config: Option<serde_json::Value>,
    /// Why a weight that could be quantized was left whole.
    pub(crate) kept_whole: Option<String>,
    /// The tensors it writes: the target, or a quantized weight's packed words, scales
    /// and biases.
    pub(crate) outputs: Vec<crate::plan::OutputTensor>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl PlanRow {
    /// How the tensor is quantized, when it is.
    pub fn quantize(&self) -> Option<crate::layout::quant::Quant> {
        self.quantize
    }

    /// Why a weight that could be quantized was left whole.
    pub fn kept_whole(&self) -> Option<&str> {
        self.kept_whole.as_deref()
    }

    /// The tensors it writes.
    pub fn outputs(&self) -> &[crate::plan::OutputTensor] {
        &self.outputs
    }

    /// The sources of a stacked target, in stack order; empty for one source.
    pub fn stack(&self) -> &[String] {
        &self.stack
    }

    /// Source tensor name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Output tensor name.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Source shape.
    pub fn source_shape(&self) -> &[usize] {
        &self.source_shape
    }

    /// Output shape.
    pub fn target_shape(&self) -> &[usize] {
        &self.target_shape
    }

    /// Source dtype.
    pub fn source_dtype(&self) -> DType {
        self.source_dtype
    }

    /// Output dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The op as `plan` prints it (`permute[3, 2, 1, 0] + cast F32->BF16`).
    pub fn op(&self) -> &str {
        &self.op
    }

    /// Output axis `k` is axis `perm[k]` of the (sliced) source.
    pub fn perm(&self) -> &[usize] {
        &self.perm
    }

    /// The part of the source read, when one source is split into several targets.
    pub fn slice(&self) -> Option<Slice> {
        self.slice
    }

    /// The rule that produced the entry.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// Something to check, e.g. a layout decided from a name alone.
    pub fn warning(&self) -> Option<&str> {
        self.warning.as_deref()
    }

    /// Bytes of the output tensor.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The shard file it is written to, for a sharded layout.
    pub fn shard(&self) -> Option<&str> {
        self.shard.as_deref()
    }
}

/// One output file of a sharded [`PlanReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShardRow {
    pub(crate) name: String,
    /// Bytes of tensor data.
    pub(crate) bytes: u64,
    pub(crate) tensors: usize,
    /// The `--shard i/N` worker that writes it, when a worker count was given.
    pub(crate) worker: Option<usize>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl ShardRow {
    /// File name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of tensor data.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Tensors in it.
    pub fn tensors(&self) -> usize {
        self.tensors
    }

    /// The `--shard i/N` worker that writes it, when a worker count was given.
    pub fn worker(&self) -> Option<usize> {
        self.worker
    }
}

impl PlanReport {
    /// The report of `plan` over `ckpt`; with `max_shard_size`, of the shard layout the
    /// converter would write (`--max-shard-size`), each shard's worker given when the
    /// number of `workers` is.
    pub fn new(
        ckpt: &Checkpoint,
        plan: &Plan,
        max_shard_size: Option<u64>,
        workers: Option<usize>,
    ) -> Result<PlanReport> {
        let layout = max_shard_size
            .map(|max| OutputLayout::sharded(plan, max))
            .transpose()?;
        let layout = layout.as_ref();
        let file_of = layout.map(OutputLayout::file_of_entries);
        let mut entries = Vec::with_capacity(plan.entries.len());
        for (i, e) in plan.entries.iter().enumerate() {
            let shard = match (layout, &file_of) {
                (Some(l), Some(of)) => of
                    .get(i)
                    .and_then(|&k| l.files.get(k))
                    .map(|f| f.name.clone()),
                _ => None,
            };
            entries.push(PlanRow {
                source: e.source_name.clone(),
                target: e.target.clone(),
                source_shape: e.source_shape.clone(),
                target_shape: e.target_shape.clone(),
                source_dtype: e.source_dtype,
                dtype: e.dtype,
                op: e.describe_op(),
                perm: e.perm.clone(),
                slice: e.slice,
                rule: e.rule.clone(),
                warning: e.warning.clone(),
                bytes: Converter::entry_bytes(e)? as u64,
                shard,
                stack: e.stack.iter().map(|(_, n)| n.clone()).collect(),
                quantize: e.quant,
                quant_config: e.quant_layer.as_ref().map(crate::plan::QuantLayer::to_json),
                kept_whole: e.kept_whole.clone(),
                outputs: e.outputs(),
            });
        }
        let shards = layout.map(|l| {
            l.files
                .iter()
                .enumerate()
                .map(|(k, f)| ShardRow {
                    name: f.name.clone(),
                    bytes: f.bytes,
                    tensors: f.header.len(),
                    worker: workers.filter(|&n| n > 0).map(|n| k % n),
                })
                .collect()
        });
        Ok(PlanReport {
            path: ckpt.path().to_path_buf(),
            sources: plan.sources.clone(),
            entries,
            dropped: plan.dropped.clone(),
            unmatched: plan.unmatched.clone(),
            unreachable: plan.unreachable.clone(),
            shards,
            total_size: layout.map(|l| l.total_bytes),
            max_workers: layout.map(|l| l.files.len()),
            dtype_from: plan.dtype_from.clone(),
            quantization: plan.quantization.clone(),
            copied: plan
                .files
                .iter()
                .map(|f| FileRow {
                    name: f.name().to_string(),
                    source: f.source().to_path_buf(),
                    bytes: f.bytes(),
                    rewritten: f.is_rewritten(),
                })
                .collect(),
        })
    }
}

/// The tensors of a checkpoint as stored (`inspect --json`, `relayout.inspect`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct InspectReport {
    #[serde(serialize_with = "path_text")]
    pub(crate) path: PathBuf,
    pub(crate) format: Format,
    /// Number of tensors, and their bytes in all and by dtype.
    pub(crate) tensors: usize,
    pub(crate) bytes: u64,
    pub(crate) bytes_by_dtype: BTreeMap<DType, u64>,
    /// The checkpoint's string metadata (safetensors `__metadata__`).
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) entries: Vec<TensorRow>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl InspectReport {
    /// The checkpoint inspected.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Number of tensors.
    pub fn tensors(&self) -> usize {
        self.tensors
    }

    /// Their bytes in all.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Their bytes by dtype.
    pub fn bytes_by_dtype(&self) -> &BTreeMap<DType, u64> {
        &self.bytes_by_dtype
    }

    /// The checkpoint's string metadata (safetensors `__metadata__`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// One row per stored tensor.
    pub fn entries(&self) -> &[TensorRow] {
        &self.entries
    }
}

/// One stored tensor of an [`InspectReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TensorRow {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    /// Element strides and offset inside its storage.
    pub(crate) strides: Vec<usize>,
    pub(crate) offset: usize,
    pub(crate) bytes: u64,
    /// True when the view covers its elements in row-major order with no gap.
    pub(crate) contiguous: bool,
    /// True when another tensor views the same storage.
    pub(crate) shares_storage: bool,
    /// The file holding it (a shard of a sharded checkpoint).
    #[serde(serialize_with = "path_text")]
    pub(crate) file: PathBuf,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl TensorRow {
    /// Tensor name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element strides inside its storage.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Element offset inside its storage.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes of the tensor.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True when the view covers its elements in row-major order with no gap.
    pub fn contiguous(&self) -> bool {
        self.contiguous
    }

    /// True when another tensor views the same storage.
    pub fn shares_storage(&self) -> bool {
        self.shares_storage
    }

    /// `file`.
    pub fn file(&self) -> &std::path::Path {
        &self.file
    }
}

impl InspectReport {
    /// The report of an opened checkpoint.
    pub fn new(ckpt: &Checkpoint) -> InspectReport {
        let mut bytes_by_dtype: BTreeMap<DType, u64> = BTreeMap::new();
        let entries: Vec<TensorRow> = ckpt
            .tensors()
            .iter()
            .map(|t| {
                let bytes = t.bytes() as u64;
                *bytes_by_dtype.entry(t.dtype).or_default() += bytes;
                TensorRow {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    strides: t.strides.clone(),
                    offset: t.offset,
                    bytes,
                    contiguous: ckpt.is_contiguous(t),
                    shares_storage: ckpt.shares_storage(t),
                    file: ckpt.file_of(t).to_path_buf(),
                }
            })
            .collect();
        InspectReport {
            path: ckpt.path().to_path_buf(),
            format: ckpt.format(),
            tensors: entries.len(),
            bytes: bytes_by_dtype.values().sum(),
            bytes_by_dtype,
            metadata: ckpt.metadata().clone(),
            entries,
        }
    }
}

impl Serialize for DType {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.safetensors_name())
    }
}

/// A path as text (lossily where it is not UTF-8); `verify.rs` uses it too.
pub(crate) fn path_text<S: Serializer>(p: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

fn paths_text<S: Serializer>(ps: &[PathBuf], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(ps.iter().map(|p| p.to_string_lossy()))
}

fn opt_path_text<S: Serializer>(p: &Option<PathBuf>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match p {
        Some(p) => path_text(p, s),
        None => s.serialize_none(),
    }
}
