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
    pub input: PathBuf,
    /// The output file or folder.
    #[serde(serialize_with = "path_text")]
    pub output: PathBuf,
    /// Tensors this run wrote.
    pub tensors: usize,
    /// Bytes of tensor data this run wrote.
    pub bytes: u64,
    /// Wall time of the conversion, from opening the output to its commit.
    pub seconds: f64,
    /// Output throughput in GB/s (10^9 bytes): `bytes / seconds`.
    pub gb_per_s: f64,
    /// The backend that ran it (`cpu (2 threads)`, `gpu (…adapter…)`).
    pub backend: String,
    /// Source tensors a rule dropped, and source tensors no rule matched.
    pub dropped: usize,
    pub unmatched: usize,
    /// The files this run wrote: the output file, or its shards.
    #[serde(serialize_with = "paths_text")]
    pub outputs: Vec<PathBuf>,
    /// Shards a worker found already complete and kept (a re-run).
    #[serde(serialize_with = "paths_text")]
    pub reused: Vec<PathBuf>,
    /// The index of a shard set, when this run wrote it.
    #[serde(serialize_with = "opt_path_text")]
    pub index: Option<PathBuf>,
    /// Shards in the whole set (0 for a single file), and how many exist now.
    pub shards: usize,
    pub shards_present: usize,
    /// Bytes this run uploaded to the GPU and read back from it (0 on the CPU).
    pub device_upload_bytes: u64,
    pub device_readback_bytes: u64,
}

impl ConvertReport {
    /// Output throughput in GB/s (10^9 bytes).
    pub fn gb_per_s(&self) -> f64 {
        self.gb_per_s
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
    pub path: PathBuf,
    /// The preset and rule files the plan was built from.
    pub sources: Vec<String>,
    /// One row per output tensor, in plan order.
    pub entries: Vec<PlanRow>,
    /// Tensors a rule dropped, and tensors no rule matched.
    pub dropped: Vec<Skipped>,
    pub unmatched: Vec<Skipped>,
    /// Preset rules shadowed by user rules for every tensor they matched.
    pub unreachable: Vec<String>,
    /// The output shards (`--max-shard-size`); `None` for one file.
    pub shards: Option<Vec<ShardRow>>,
    /// Bytes of tensor data over all shards; `None` for one file.
    pub total_size: Option<u64>,
    /// How many `--shard i/N` workers can share the work; `None` for one file.
    pub max_workers: Option<usize>,
}

/// One output tensor of a [`PlanReport`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PlanRow {
    /// Source tensor name.
    pub source: String,
    /// Output tensor name.
    pub target: String,
    pub source_shape: Vec<usize>,
    pub target_shape: Vec<usize>,
    pub source_dtype: DType,
    pub dtype: DType,
    /// The op as `plan` prints it (`permute[3, 2, 1, 0] + cast F32->BF16`).
    pub op: String,
    /// Output axis `k` is axis `perm[k]` of the (sliced) source.
    pub perm: Vec<usize>,
    /// The part of the source read, when one source is split into several targets.
    pub slice: Option<Slice>,
    /// The rule that produced the entry.
    pub rule: String,
    /// Something to check, e.g. a layout decided from a name alone.
    pub warning: Option<String>,
    /// Bytes of the output tensor.
    pub bytes: u64,
    /// The shard file it is written to, for a sharded layout.
    pub shard: Option<String>,
}

/// One output file of a sharded [`PlanReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShardRow {
    pub name: String,
    /// Bytes of tensor data.
    pub bytes: u64,
    pub tensors: usize,
    /// The `--shard i/N` worker that writes it, when a worker count was given.
    pub worker: Option<usize>,
}

impl PlanReport {
    /// The report of `plan` over `ckpt`, with the shard layout `layout` (written by
    /// `workers` workers, when given).
    pub fn new(
        ckpt: &Checkpoint,
        plan: &Plan,
        layout: Option<&OutputLayout>,
        workers: Option<usize>,
    ) -> Result<PlanReport> {
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
            });
        }
        let shards = layout.map(|l| {
            l.files
                .iter()
                .enumerate()
                .map(|(k, f)| ShardRow {
                    name: f.name.clone(),
                    bytes: f.bytes,
                    tensors: f.entries.len(),
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
        })
    }
}

/// The tensors of a checkpoint as stored (`inspect --json`, `relayout.inspect`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct InspectReport {
    #[serde(serialize_with = "path_text")]
    pub path: PathBuf,
    pub format: Format,
    /// Number of tensors, and their bytes in all and by dtype.
    pub tensors: usize,
    pub bytes: u64,
    pub bytes_by_dtype: BTreeMap<DType, u64>,
    /// The checkpoint's string metadata (safetensors `__metadata__`).
    pub metadata: BTreeMap<String, String>,
    pub entries: Vec<TensorRow>,
}

/// One stored tensor of an [`InspectReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TensorRow {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Element strides and offset inside its storage.
    pub strides: Vec<usize>,
    pub offset: usize,
    pub bytes: u64,
    /// True when the view covers its elements in row-major order with no gap.
    pub contiguous: bool,
    /// True when another tensor views the same storage.
    pub shares_storage: bool,
    /// The file holding it (a shard of a sharded checkpoint).
    #[serde(serialize_with = "path_text")]
    pub file: PathBuf,
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

fn path_text<S: Serializer>(p: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
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

/// For [`crate::verify::VerifyReport`]'s `file`.
pub(crate) fn serialize_path<S: Serializer>(
    p: &Path,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    path_text(p, s)
}
