//! Output files: which tensors go into which file and in what order, the names and index
//! of sharded output, how shards are shared out among workers, and the merge that checks
//! a set written by many workers before it writes the index.
//!
//! Every decision here is a pure function of the plan, the shard size and the metadata,
//! so workers on different machines compute the same layout without talking to each
//! other.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::{Plan, PlanEntry};
use crate::reader::{Checkpoint, Format};
use crate::writer::{AtomicFile, HeaderEntry};

/// The index file of sharded output, as Hugging Face names it.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// Shard size when the output is a folder and no size is given (as `transformers`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;
/// The `__metadata__` key of every shard saying which set it belongs to:
/// `{"count": N, "layout": DIGEST}`.
pub const SHARD_METADATA_KEY: &str = "relayout_shard";

/// Parses a size such as `5GB`, `500MB`, `1.5GiB` or `4096`: KB/MB/GB/TB are powers of
/// 1000, KiB/MiB/GiB/TiB of 1024, a bare number is bytes. Letters are case-insensitive.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}' (use KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 9 {
        return Err(format!("'{text}' is not a size"));
    }
    let too_big = || format!("'{text}' is too large");
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_big())?
    };
    let mut bytes = whole.checked_mul(mult).ok_or_else(too_big)?;
    if !frac.is_empty() {
        let scale = 10u128.pow(frac.len() as u32);
        let f: u128 = frac
            .parse()
            .map_err(|_| format!("'{text}' is not a size"))?;
        let part = u64::try_from(f * u128::from(mult) / scale).map_err(|_| too_big())?;
        bytes = bytes.checked_add(part).ok_or_else(too_big)?;
    }
    if bytes == 0 {
        return Err(format!("'{text}': the size must be at least one byte"));
    }
    Ok(bytes)
}

/// The name one shard alone has, as Hugging Face and mlx-lm write it.
pub const SINGLE_SHARD_NAME: &str = "model.safetensors";

/// The name of shard `k` (1-based) of `n`: `model-00001-of-00004.safetensors`, or
/// [`SINGLE_SHARD_NAME`] when it is the only one.
pub fn shard_name(k: usize, n: usize) -> String {
    if n == 1 {
        return SINGLE_SHARD_NAME.to_string();
    }
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// `(k, n)` when `name` is exactly [`shard_name`]`(k, n)` with `1 <= k <= n`.
pub fn parse_shard_name(name: &str) -> Option<(usize, usize)> {
    if name == SINGLE_SHARD_NAME {
        return Some((1, 1));
    }
    let rest = name.strip_prefix("model-")?.strip_suffix(".safetensors")?;
    let (k, n) = rest.split_once("-of-")?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(k) || !digits(n) {
        return None;
    }
    let (k, n): (usize, usize) = (k.parse().ok()?, n.parse().ok()?);
    (k >= 1 && k <= n && shard_name(k, n) == name).then_some((k, n))
}

/// Bytes an entry writes (all its output tensors), checked: a shape whose size
/// overflows is an error naming the tensor.
pub fn entry_bytes(entry: &PlanEntry) -> Result<u64> {
    entry.outputs().iter().try_fold(0u64, |acc, t| {
        let b = tensor_bytes(&t.name, &t.shape, t.dtype)?;
        acc.checked_add(b).ok_or_else(|| Error::Layout {
            detail: format!("'{}' overflows 2^64 bytes", entry.target),
        })
    })
}

fn tensor_bytes(name: &str, shape: &[usize], dtype: DType) -> Result<u64> {
    crate::layout::checked_bytes(shape, dtype.size())
        .map(|b| b as u64)
        .ok_or_else(|| Error::Layout {
            detail: format!("'{name}': shape {shape:?} of {dtype} overflows 2^63 bytes"),
        })
}

/// One output file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputFile {
    /// File name (inside the output folder for shards).
    pub(crate) name: String,
    /// Indices of the plan entries it holds, in the order they are written: one job
    /// each. An entry appears twice when its outputs are written apart (a quantized
    /// weight whose `uint8` scales would leave the tensors after it unaligned).
    pub(crate) entries: Vec<usize>,
    /// For each of `entries`, the range of the entry's outputs
    /// ([`PlanEntry::outputs`]) written there.
    pub(crate) outputs: Vec<std::ops::Range<usize>>,
    /// Its header, in the same order.
    pub(crate) header: Vec<HeaderEntry>,
    /// Bytes of tensor data.
    pub(crate) bytes: u64,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl OutputFile {
    /// File name (inside the output folder for shards).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Indices of the plan entries it holds, in the order they are written (see
    /// [`OutputFile::outputs`]).
    pub fn entries(&self) -> &[usize] {
        &self.entries
    }

    /// For each of [`OutputFile::entries`], the range of the entry's outputs written
    /// there: all of them, or, for an entry written in two places, each part.
    pub fn outputs(&self) -> &[std::ops::Range<usize>] {
        &self.outputs
    }

    /// Its header, in the same order.
    pub fn header(&self) -> &[HeaderEntry] {
        &self.header
    }

    /// Bytes of tensor data.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The files a plan is written to.
///
/// Inside each file the tensors are ordered by descending element size, then by name
/// (the order of the reference `safetensors` serializer): the header is padded to 8
/// bytes, so every tensor then starts at a file offset that is a multiple of its element
/// size, as zero-copy loaders need, without holes in the data. A quantized weight is
/// placed by its packed `uint32` words, its scales and biases right after it (they are
/// made in the same pass, so nothing waits for them): affine scales and biases come in
/// pairs and end on a word boundary. One-byte scales that would not (a group count
/// that is not a multiple of 4) go with the one-byte tensors, made by a second pass
/// over the weight's source rather than held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLayout {
    /// The files, in shard order.
    pub(crate) files: Vec<OutputFile>,
    /// True for a shard set (`model-…-of-….safetensors` + index).
    pub(crate) sharded: bool,
    /// Bytes of tensor data over all files.
    pub(crate) total_bytes: u64,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl OutputLayout {
    /// The files, in shard order.
    pub fn files(&self) -> &[OutputFile] {
        &self.files
    }

    /// True for a shard set (`model-…-of-….safetensors` + index).
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// Bytes of tensor data over all files.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}

impl OutputLayout {
    /// Everything in one file named `name`.
    pub fn single(plan: &Plan, name: &str) -> Result<OutputLayout> {
        let all: Vec<usize> = (0..plan.entries.len()).collect();
        let file = output_file(plan, name.to_string(), all)?;
        Ok(OutputLayout {
            total_bytes: file.bytes,
            files: vec![file],
            sharded: false,
        })
    }

    /// Shards of at most `max_bytes` of tensor data, filled greedily in plan order; a
    /// tensor larger than the limit gets a shard of its own. An empty plan still gives
    /// one (empty) shard, so the output is a readable checkpoint.
    pub fn sharded(plan: &Plan, max_bytes: u64) -> Result<OutputLayout> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        let mut filled = 0u64;
        for (i, e) in plan.entries.iter().enumerate() {
            let b = entry_bytes(e)?;
            if !current.is_empty() && filled.saturating_add(b) > max_bytes {
                groups.push(std::mem::take(&mut current));
                filled = 0;
            }
            current.push(i);
            filled = filled.saturating_add(b);
        }
        if !current.is_empty() || groups.is_empty() {
            groups.push(current);
        }
        let n = groups.len();
        let files = groups
            .into_iter()
            .enumerate()
            .map(|(k, entries)| output_file(plan, shard_name(k + 1, n), entries))
            .collect::<Result<Vec<_>>>()?;
        let total_bytes = files
            .iter()
            .try_fold(0u64, |acc, f| acc.checked_add(f.bytes))
            .ok_or_else(|| Error::Layout {
                detail: "the output's size overflows".to_string(),
            })?;
        Ok(OutputLayout {
            files,
            sharded: true,
            total_bytes,
        })
    }

    /// For every plan entry, the index of the file it is written to.
    pub fn file_of_entries(&self) -> Vec<usize> {
        let n = self
            .files
            .iter()
            .flat_map(|f| f.entries.iter().map(|&i| i + 1))
            .max()
            .unwrap_or(0);
        let mut of = vec![0; n];
        for (k, f) in self.files.iter().enumerate() {
            for &i in &f.entries {
                if let Some(slot) = of.get_mut(i) {
                    *slot = k;
                }
            }
        }
        of
    }

    /// The `__metadata__` of file `k`: `base` (the conversion's metadata), plus, for a
    /// shard, [`SHARD_METADATA_KEY`] tying it to this exact set.
    pub fn metadata_of(&self, base: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut meta = base.clone();
        if self.sharded {
            let tag = json!({
                "count": self.files.len(),
                "layout": layout_digest(self.files.iter().map(|f| (f.name.as_str(), f.header.as_slice())), base),
            });
            meta.insert(SHARD_METADATA_KEY.to_string(), tag.to_string());
        }
        meta
    }

    /// The index of a shard set: total size and the file of every tensor.
    pub fn index_bytes(&self) -> Vec<u8> {
        let map = self
            .files
            .iter()
            .flat_map(|f| f.header.iter().map(|h| (h.name.clone(), f.name.clone())))
            .collect();
        index_bytes(&map, self.total_bytes, self.total_parameters())
    }

    /// Elements of every tensor in the set: the index's `total_parameters`, as mlx-lm
    /// and transformers write it (quantized weights count their packed elements).
    pub fn total_parameters(&self) -> u64 {
        total_parameters(self.files.iter().flat_map(|f| f.header.iter()))
    }
}

fn output_file(plan: &Plan, name: String, entries: Vec<usize>) -> Result<OutputFile> {
    // The pieces each entry is written as, with the element size and name that place
    // them.
    let mut items = Vec::with_capacity(entries.len());
    for &i in &entries {
        let e = plan.entries.get(i).ok_or_else(|| Error::Layout {
            detail: format!("output file {name} names plan entry {i}, which does not exist"),
        })?;
        let outs = e.outputs();
        let apart = e.quant.is_some_and(|q| !q.has_biases())
            && outs.get(1).is_some_and(|s| {
                crate::layout::checked_numel(&s.shape).is_some_and(|n| n % 4 != 0)
            });
        let ranges: Vec<std::ops::Range<usize>> = if apart {
            vec![0..1, 1..outs.len()]
        } else {
            std::iter::once(0..outs.len()).collect()
        };
        for r in ranges {
            let first = &outs[r.start];
            items.push((first.dtype.size(), first.name.clone(), i, r));
        }
    }
    items.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut bytes = 0u64;
    let mut header = Vec::with_capacity(items.len());
    let (mut order, mut ranges) = (Vec::with_capacity(items.len()), Vec::new());
    for (_, _, i, r) in items {
        let outs = plan.entries[i].outputs();
        for t in &outs[r.clone()] {
            bytes = bytes
                .checked_add(tensor_bytes(&t.name, &t.shape, t.dtype)?)
                .ok_or_else(|| Error::Layout {
                    detail: format!("the output file {name} would exceed 2^64 bytes"),
                })?;
            header.push(HeaderEntry {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            });
        }
        order.push(i);
        ranges.push(r);
    }
    Ok(OutputFile {
        name,
        entries: order,
        outputs: ranges,
        header,
        bytes,
    })
}

/// A digest of a shard set's names, tensors (name, dtype, shape, order) and metadata:
/// equal digests mean the same set. FNV-1a over a canonical JSON text, twice with
/// different offsets (128 bits): it detects mix-ups, it is not a security measure.
fn layout_digest<'a>(
    files: impl Iterator<Item = (&'a str, &'a [HeaderEntry])>,
    base: &BTreeMap<String, String>,
) -> String {
    let files: Vec<Value> = files
        .map(|(name, header)| {
            let tensors: Vec<Value> = header
                .iter()
                .map(|h| json!([h.name, h.dtype.safetensors_name(), h.shape]))
                .collect();
            json!({"name": name, "tensors": tensors})
        })
        .collect();
    let text = json!({"files": files, "metadata": base}).to_string();
    let fnv = |mut h: u64| {
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    format!(
        "{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    )
}

/// The index JSON: `{"metadata": {"total_size": …}, "weight_map": {…}}`, keys sorted,
/// indented like `transformers` writes it.
fn index_bytes(
    weight_map: &BTreeMap<String, String>,
    total_size: u64,
    total_parameters: u64,
) -> Vec<u8> {
    let doc = json!({
        "metadata": {"total_size": total_size, "total_parameters": total_parameters},
        "weight_map": weight_map,
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text.into_bytes()
}

/// One of `count` workers converting a shard set together: worker `index` (0-based)
/// writes shards `index`, `index + count`, … (0-based), a pure function of the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    index: usize,
    count: usize,
}

impl Worker {
    /// Worker `index` of `count`.
    pub fn new(index: usize, count: usize) -> std::result::Result<Worker, String> {
        if count == 0 {
            return Err("the number of workers must be at least 1".to_string());
        }
        if index >= count {
            return Err(format!(
                "worker {index} does not exist among {count} (workers count from 0 to {})",
                count - 1
            ));
        }
        Ok(Worker { index, count })
    }

    /// Parses `i/N`.
    pub fn parse(text: &str) -> std::result::Result<Worker, String> {
        let (i, n) = text
            .split_once('/')
            .ok_or_else(|| format!("'{text}' is not i/N (e.g. 0/8)"))?;
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{text}' is not i/N (e.g. 0/8)"))
        };
        Worker::new(num(i)?, num(n)?)
    }

    /// The worker a cluster scheduler made this process: a Slurm job array
    /// (`SLURM_ARRAY_TASK_ID` from `SLURM_ARRAY_TASK_MIN` in steps of
    /// `SLURM_ARRAY_TASK_STEP`, `SLURM_ARRAY_TASK_COUNT` tasks) or a Kubernetes Indexed
    /// Job (`JOB_COMPLETION_INDEX`, which needs `shards`). `shards` overrides the count.
    pub fn from_env(
        shards: Option<usize>,
        var: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Worker, String> {
        let num = |name: &str| -> std::result::Result<Option<usize>, String> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("{name}='{v}' is not a number"))
                })
                .transpose()
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let offset = id.checked_sub(min).ok_or_else(|| {
                format!("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}")
            })?;
            let count = match shards {
                Some(n) => n,
                None => num("SLURM_ARRAY_TASK_COUNT")?
                    .ok_or("SLURM_ARRAY_TASK_COUNT is not set; give --shards N")?,
            };
            return Worker::new(offset / step, count);
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = shards.ok_or(
                "JOB_COMPLETION_INDEX is set but the number of workers is not: give --shards N (the Job's completions)",
            )?;
            return Worker::new(index, count);
        }
        Err("neither SLURM_ARRAY_TASK_ID (Slurm job array) nor JOB_COMPLETION_INDEX (Kubernetes Indexed Job) is set".to_string())
    }

    /// 0-based index of this worker.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Number of workers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether this worker writes shard `file` (0-based).
    pub fn owns(&self, file: usize) -> bool {
        file % self.count == self.index
    }
}

impl std::fmt::Display for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What [`merge_index`] found and wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeReport {
    /// The index written.
    pub(crate) index: PathBuf,
    pub(crate) shards: usize,
    pub(crate) tensors: usize,
    /// Bytes of tensor data over all shards.
    pub(crate) total_size: u64,
    pub(crate) copied: Vec<PathBuf>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl MergeReport {
    /// The index written.
    pub fn index(&self) -> &std::path::Path {
        &self.index
    }

    /// Shards in the set.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Tensors over all shards.
    pub fn tensors(&self) -> usize {
        self.tensors
    }

    /// Bytes of tensor data over all shards.
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    /// The model folder's files written with the index.
    pub fn copied(&self) -> &[PathBuf] {
        &self.copied
    }
}

/// The shard files of `dir` as `(k, n, name)`, sorted.
pub(crate) fn parse_dir_shards(dir: &Path) -> Result<Vec<(usize, usize, String)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            if let Some((k, n)) = parse_shard_name(name) {
                found.push((k, n, name.to_string()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// How many of `layout`'s shards exist in `dir` (complete: shards appear atomically).
pub(crate) fn shards_present(dir: &Path, layout: &OutputLayout) -> usize {
    layout
        .files
        .iter()
        .filter(|f| dir.join(&f.name).is_file())
        .count()
}

fn total_parameters<'a>(headers: impl Iterator<Item = &'a HeaderEntry>) -> u64 {
    headers
        .map(|h| {
            h.shape
                .iter()
                .fold(1u64, |n, &d| n.saturating_mul(d as u64))
        })
        .fold(0u64, u64::saturating_add)
}

/// Checks a complete shard set in `dir`, written by one process or by many workers, and
/// writes its index ([`INDEX_NAME`], atomically, replacing an old one).
///
/// Every shard `model-k-of-N` for k = 1..N must be there, be a well-formed safetensors
/// file without holes whose size matches its header, carry the same set tag
/// ([`SHARD_METADATA_KEY`]) and conversion metadata as the others, and hold exactly the
/// tensors the tag's digest records. A missing, foreign or stale shard is an error that
/// names it, and nothing is written.
pub fn merge_index(dir: &Path) -> Result<MergeReport> {
    merge_index_with(dir, Vec::new())
}

/// [`merge_index`], committing `with` (the model folder's files, written and synced)
/// together with the index once the set checks out; on an error none of them appears.
pub(crate) fn merge_index_with(dir: &Path, with: Vec<AtomicFile>) -> Result<MergeReport> {
    let err = |detail: String| Error::Shard {
        path: dir.to_path_buf(),
        detail,
    };
    let found = parse_dir_shards(dir)?;
    let mut counts: Vec<usize> = found.iter().map(|(_, n, _)| *n).collect();
    counts.dedup();
    let n = match counts.as_slice() {
        [] => {
            return Err(err(
                "holds no model-NNNNN-of-NNNNN.safetensors shards".to_string()
            ))
        }
        [n] => *n,
        many => {
            return Err(err(format!(
                "holds shards of {} different sets (of {}); remove the stale ones",
                many.len(),
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let missing: Vec<String> = (1..=n)
        .filter(|k| !found.iter().any(|(fk, _, _)| fk == k))
        .map(|k| shard_name(k, n))
        .collect();
    if let Some(first) = missing.first() {
        return Err(err(format!(
            "{} of {n} shards are missing, first {first}{}",
            missing.len(),
            if missing.len() > 1 {
                format!(" (all: {})", missing.join(", "))
            } else {
                String::new()
            }
        )));
    }

    struct Read {
        name: String,
        header: Vec<HeaderEntry>,
        base: BTreeMap<String, String>,
        digest: String,
        bytes: u64,
    }
    let mut shards = Vec::with_capacity(n);
    for (_, _, name) in &found {
        let path = dir.join(name);
        let shard_err = |detail: String| Error::Shard {
            path: path.clone(),
            detail,
        };
        let ckpt = Checkpoint::open(&path)?;
        if ckpt.format() != Format::Safetensors {
            return Err(shard_err("is not a safetensors file".to_string()));
        }
        let (header, bytes) = read_back(&ckpt, &path)?;
        let mut base = ckpt.metadata().clone();
        let tag = base.remove(SHARD_METADATA_KEY).ok_or_else(|| {
            shard_err(format!(
                "has no '{SHARD_METADATA_KEY}' metadata: it was not written by relayout as part of a shard set"
            ))
        })?;
        let tag: Value = serde_json::from_str(&tag)
            .map_err(|e| shard_err(format!("'{SHARD_METADATA_KEY}' is not JSON: {e}")))?;
        let count = tag.get("count").and_then(Value::as_u64);
        if count != Some(n as u64) {
            return Err(shard_err(format!(
                "its '{SHARD_METADATA_KEY}' metadata says it belongs to a set of {}, its name to one of {n}",
                count.map_or("?".to_string(), |c| c.to_string())
            )));
        }
        let digest = tag
            .get("layout")
            .and_then(Value::as_str)
            .ok_or_else(|| shard_err(format!("'{SHARD_METADATA_KEY}' has no 'layout'")))?
            .to_string();
        shards.push(Read {
            name: name.clone(),
            header,
            base,
            digest,
            bytes,
        });
    }

    // The tag most shards carry is the set; the others are stale.
    let mut votes: HashMap<(&str, &BTreeMap<String, String>), usize> = HashMap::new();
    for s in &shards {
        *votes.entry((s.digest.as_str(), &s.base)).or_default() += 1;
    }
    let (&(digest, base), _) = votes
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0 .0.cmp(a.0 .0)))
        .ok_or_else(|| err("holds no shards".to_string()))?;
    let stale: Vec<&str> = shards
        .iter()
        .filter(|s| s.digest != digest || &s.base != base)
        .map(|s| s.name.as_str())
        .collect();
    if !stale.is_empty() {
        return Err(err(format!(
            "{} shard(s) come from a different conversion than the other {}: {} (re-run the worker(s) that write them, with --force)",
            stale.len(),
            n - stale.len(),
            stale.join(", ")
        )));
    }
    let recomputed = layout_digest(
        shards
            .iter()
            .map(|s| (s.name.as_str(), s.header.as_slice())),
        base,
    );
    if recomputed != digest {
        return Err(err(format!(
            "the shards' tensors differ from the set they record (layout {digest}, found {recomputed}): a shard was altered after it was written"
        )));
    }

    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for s in &shards {
        for h in &s.header {
            if let Some(other) = weight_map.insert(h.name.clone(), s.name.clone()) {
                return Err(err(format!(
                    "tensor '{}' is in two shards, {other} and {}",
                    h.name, s.name
                )));
            }
        }
        total = total
            .checked_add(s.bytes)
            .ok_or_else(|| err("the shards' sizes overflow".to_string()))?;
    }
    let index = dir.join(INDEX_NAME);
    let parameters = total_parameters(shards.iter().flat_map(|s| s.header.iter()));
    let mut out = AtomicFile::create(&index, true)?;
    out.write_all(&index_bytes(&weight_map, total, parameters))?;
    out.sync()?;
    let copied = with.iter().map(|f| f.target().to_path_buf()).collect();
    let mut files = with;
    files.push(out);
    AtomicFile::commit_all(files)?;
    Ok(MergeReport {
        index,
        shards: n,
        tensors: weight_map.len(),
        total_size: total,
        copied,
    })
}

/// A written file's header in data order, checked to cover its data section without
/// holes up to the end of the file; returns it with the data bytes.
fn read_back(ckpt: &Checkpoint, path: &Path) -> Result<(Vec<HeaderEntry>, u64)> {
    let err = |detail: String| Error::Shard {
        path: path.to_path_buf(),
        detail,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let mut placed = Vec::with_capacity(ckpt.tensors().len());
    for t in ckpt.tensors() {
        let range = ckpt
            .storage_range(t)
            .ok_or_else(|| err(format!("tensor '{}' has no data", t.name)))?;
        placed.push((range.start as u64, range.end as u64, t));
    }
    placed.sort_by_key(|&(start, end, _)| (start, end));
    let mut head = [0u8; 8];
    {
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .map_err(|e| Error::io(path, e))?;
    }
    let mut at = u64::from_le_bytes(head)
        .checked_add(8)
        .ok_or_else(|| err("header length overflows".to_string()))?;
    let data_start = at;
    for (start, end, t) in &placed {
        if *start != at {
            return Err(err(format!(
                "tensor '{}' starts at byte {start}, not at {at}: the data has holes or overlaps",
                t.name
            )));
        }
        at = *end;
    }
    if at != len {
        return Err(err(format!(
            "is {len} bytes but its header ends the data at byte {at}"
        )));
    }
    let header = placed
        .iter()
        .map(|(_, _, t)| HeaderEntry {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    Ok((header, at - data_start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_unit_families() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("64kb"), Ok(64_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("3KiB"), Ok(3 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size("0.5KB"), Ok(500));
        for bad in [
            "",
            "GB",
            "0",
            "0MB",
            "5XB",
            "1.2.3GB",
            "-1GB",
            "99999999999TB",
            ".",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn shard_names_round_trip_and_reject_near_misses() {
        assert_eq!(shard_name(1, 4), "model-00001-of-00004.safetensors");
        assert_eq!(shard_name(3, 123456), "model-00003-of-123456.safetensors");
        // One shard alone is named as Hugging Face and mlx-lm name it.
        assert_eq!(shard_name(1, 1), "model.safetensors");
        assert_eq!(parse_shard_name("model.safetensors"), Some((1, 1)));
        for (k, n) in [(1, 1), (2, 7), (7, 7), (99999, 100000)] {
            assert_eq!(parse_shard_name(&shard_name(k, n)), Some((k, n)));
        }
        for bad in [
            "model-0001-of-00004.safetensors",
            "model-00000-of-00004.safetensors",
            "model-00005-of-00004.safetensors",
            "model-000001-of-00004.safetensors",
            "model-00001-of-00004.safetensors.tmp",
            ".model-00001-of-00004.safetensors",
            "model-0000a-of-00004.safetensors",
            // The numbered name of a set of one is no longer what relayout writes.
            "model-00001-of-00001.safetensors",
            "model.safetensors.tmp",
        ] {
            assert_eq!(parse_shard_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn workers_share_every_shard_exactly_once() {
        for count in 1..=9 {
            for files in 0..30 {
                for f in 0..files {
                    let owners = (0..count)
                        .filter(|&i| Worker::new(i, count).unwrap().owns(f))
                        .count();
                    assert_eq!(owners, 1);
                }
            }
        }
        assert_eq!(Worker::parse("2/7"), Worker::new(2, 7));
        assert!(Worker::parse("7/7").is_err());
        assert!(Worker::parse("0/0").is_err());
        assert!(Worker::parse("1-7").is_err());
    }

    #[test]
    fn workers_come_from_slurm_or_kubernetes() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "64"),
        ]);
        assert_eq!(Worker::from_env(None, slurm), Worker::new(5, 64));
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(Worker::from_env(None, stepped), Worker::new(3, 4));
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(Worker::from_env(Some(8), k8s), Worker::new(3, 8));
        assert!(Worker::from_env(None, k8s).is_err());
        assert!(Worker::from_env(Some(3), env(&[])).is_err());
        assert!(Worker::from_env(None, env(&[("SLURM_ARRAY_TASK_ID", "x")])).is_err());
    }
}
