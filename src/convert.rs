//! The pipeline: plan entries in, converted tensors out — into a file, or handed to the
//! caller one by one.
//!
//! Every tensor is produced in bands of at most `band_bytes` output bytes, computed in
//! place into the writer's block buffers, so memory is bounded by a few bands whatever
//! the tensor size: while the backend fills one block, the writer's thread writes the
//! previous one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::{Backend, BackendOptions};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{Cast, Gather};
use crate::plan::{Plan, PlanEntry};
use crate::reader::{Checkpoint, OpenOptions};
use crate::rules::{ModuleTypes, PlanOptions, RuleSet};
use crate::writer::{HeaderEntry, SafetensorsWriter};

/// Output bytes per backend call: large enough to amortise calls and syscalls, small
/// enough that two bands stay far below the memory budget.
pub const DEFAULT_BAND_BYTES: usize = 32 << 20;

/// How far a conversion has got; handed to the progress callback after every band.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What a finished conversion did.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertReport {
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub backend: String,
    pub dropped: usize,
    pub unmatched: usize,
}

impl ConvertReport {
    /// Output throughput in GB/s (10^9 bytes).
    pub fn gb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

/// Options of [`Converter::write_safetensors`].
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Replace an existing output file.
    pub force: bool,
    /// Extra `__metadata__` entries (provenance); the source's metadata is kept.
    pub metadata: BTreeMap<String, String>,
}

/// Runs a plan over a checkpoint with one backend.
pub struct Converter<'a> {
    ckpt: &'a Checkpoint,
    plan: &'a Plan,
    backend: &'a dyn Backend,
    band_bytes: usize,
}

impl<'a> Converter<'a> {
    pub fn new(ckpt: &'a Checkpoint, plan: &'a Plan, backend: &'a dyn Backend) -> Converter<'a> {
        Converter {
            ckpt,
            plan,
            backend,
            band_bytes: DEFAULT_BAND_BYTES,
        }
    }

    /// Sets the band size (bytes of output per backend call); at least one element.
    pub fn with_band_bytes(mut self, band_bytes: usize) -> Converter<'a> {
        self.band_bytes = band_bytes.max(1);
        self
    }

    /// The op that produces `entry`: the gather over its (sliced) source and the element
    /// conversion, if any.
    fn op(&self, entry: &PlanEntry) -> Result<(Gather, Option<Cast>)> {
        let t = self
            .ckpt
            .tensors()
            .get(entry.source)
            .ok_or_else(|| Error::Layout {
                detail: format!(
                    "plan entry '{}' names a missing source tensor",
                    entry.source_name
                ),
            })?;
        let mut op = self.ckpt.layout_op(t, &entry.perm)?;
        if let Some(s) = entry.slice {
            op = op.sliced(s.axis, s.start, s.len)?;
        }
        let g = op.simplify();
        let cast = Cast::new(t.dtype, entry.dtype)?;
        // A reshape is free on the contiguous output, but must keep the element count.
        if crate::layout::checked_numel(&entry.target_shape) != Some(g.len()) {
            return Err(Error::Layout {
                detail: format!(
                    "'{}': target shape {:?} does not hold the {} elements of '{}'",
                    entry.target,
                    entry.target_shape,
                    g.len(),
                    entry.source_name
                ),
            });
        }
        Ok((g, cast))
    }

    /// Bytes of one output tensor.
    pub fn entry_bytes(entry: &PlanEntry) -> usize {
        entry.target_shape.iter().product::<usize>() * entry.dtype.size()
    }

    /// Converts one tensor into `dst`, which must hold exactly its bytes.
    pub fn convert_into(&self, entry: &PlanEntry, dst: &mut [u8]) -> Result<()> {
        let (g, cast) = self.op(entry)?;
        let src = self.source_bytes(entry);
        let want = out_bytes(&g, cast);
        if dst.len() != want {
            return Err(Error::Layout {
                detail: format!(
                    "buffer of {} bytes for '{}', which needs {want}",
                    dst.len(),
                    entry.target,
                ),
            });
        }
        self.run_entry(&g, cast, src, &mut &mut *dst, &mut |_| {})?;
        // Alone, a split part cannot know whether its siblings are still to come.
        self.release(entry, entry.slice.is_none());
        Ok(())
    }

    /// Runs one tensor band by band, each band computed in place into the slice `sink`
    /// hands out for it; `done` hears the bytes of every finished band.
    fn run_entry(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        src: &[u8],
        sink: &mut dyn BandSink,
        done: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let Some(cast) = cast else {
            for (at, piece) in g.split(self.band_bytes) {
                let len = piece.out_bytes();
                self.backend.gather(&piece, src, sink.band(at, len)?)?;
                done(len);
            }
            return Ok(());
        };
        // Bands count output bytes; the gather splits by source elements.
        let (from, to) = (cast.from().size(), cast.to().size());
        let per_band = (self.band_bytes / to).max(1).saturating_mul(from);
        for (at, piece) in g.split(per_band) {
            let len = piece.len() * to;
            let band = sink.band(at / from * to, len)?;
            self.backend.gather_cast(&piece, cast, src, band)?;
            done(len);
        }
        Ok(())
    }

    /// Hands every converted tensor to `f` as soon as it is ready, in plan order; the
    /// bytes live in one buffer reused across tensors, so copy what you keep.
    pub fn for_each<F>(&self, mut f: F) -> Result<()>
    where
        F: FnMut(&PlanEntry, &[u8]) -> Result<()>,
    {
        let mut buf = Vec::new();
        for entry in &self.plan.entries {
            buf.clear();
            buf.resize(Self::entry_bytes(entry), 0);
            self.convert_into(entry, &mut buf)?;
            f(entry, &buf)?;
        }
        Ok(())
    }

    /// Writes the converted checkpoint to `out` as safetensors, streaming, atomically.
    pub fn write_safetensors(
        &self,
        out: &Path,
        opts: &WriteOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ConvertReport> {
        let started = Instant::now();
        check_not_input(self.ckpt, out)?;
        let entries: Vec<HeaderEntry> = self
            .plan
            .entries
            .iter()
            .map(|e| HeaderEntry {
                name: e.target.clone(),
                dtype: e.dtype,
                shape: e.target_shape.clone(),
            })
            .collect();
        let mut metadata = self.ckpt.metadata().clone();
        metadata.extend(opts.metadata.clone());
        let band = self.band_bytes;
        // A piece is never smaller than one element, whatever the band.
        let capacity = band.max(crate::layout::ELEM_SIZES[3]);
        let mut writer =
            SafetensorsWriter::with_capacity(out, &entries, &metadata, opts.force, capacity)?;
        let mut state = Progress {
            tensors_done: 0,
            tensors_total: entries.len(),
            bytes_done: 0,
            bytes_total: entries.iter().map(|e| e.bytes() as u64).sum(),
        };
        progress(state);
        self.ckpt.advise_sequential();
        // Each band is computed straight into the writer's block buffer; the writer's
        // thread writes full blocks while the backend fills the next one.
        let mut entries_iter = self.plan.entries.iter().peekable();
        while let Some(entry) = entries_iter.next() {
            let next = entries_iter.peek();
            let (g, cast) = self.op(entry)?;
            let src = self.source_bytes(entry);
            self.run_entry(&g, cast, src, &mut writer, &mut |len| {
                state.bytes_done += len as u64;
                progress(state);
            })?;
            // The parts of a split source are consecutive: release after the last.
            let last = next.is_none_or(|n| n.source != entry.source);
            self.release(entry, last);
            state.tensors_done += 1;
            progress(state);
        }
        writer.finish()?;
        Ok(ConvertReport {
            tensors: entries.len(),
            bytes: state.bytes_total,
            seconds: started.elapsed().as_secs_f64(),
            backend: self.backend.name(),
            dropped: self.plan.dropped.len(),
            unmatched: self.plan.unmatched.len(),
        })
    }

    fn source_bytes(&self, entry: &PlanEntry) -> &'a [u8] {
        self.ckpt
            .tensors()
            .get(entry.source)
            .map_or(&[], |t| self.ckpt.storage_bytes(t))
    }

    /// Lets the pages of a finished tensor go, unless another entry reads the same
    /// storage: a tensor shared with others, or (`last` false) a later part of a split.
    fn release(&self, entry: &PlanEntry, last: bool) {
        if !last {
            return;
        }
        if let Some(t) = self.ckpt.tensors().get(entry.source) {
            if !self.ckpt.shares_storage(t) {
                self.ckpt.release(t);
            }
        }
    }
}

/// Where the bands of a tensor go.
trait BandSink {
    /// The slice for the band of `len` bytes at byte `at` of the tensor.
    fn band(&mut self, at: usize, len: usize) -> Result<&mut [u8]>;
}

impl BandSink for SafetensorsWriter {
    fn band(&mut self, _at: usize, len: usize) -> Result<&mut [u8]> {
        self.reserve(len)
    }
}

impl BandSink for &mut [u8] {
    fn band(&mut self, at: usize, len: usize) -> Result<&mut [u8]> {
        let end = at.saturating_add(len);
        self.get_mut(at..end).ok_or_else(|| Error::Layout {
            detail: format!("band {at}..{end} outside the output buffer"),
        })
    }
}

/// Output bytes of `g`, converted by `cast` when there is one.
fn out_bytes(g: &Gather, cast: Option<Cast>) -> usize {
    match cast {
        Some(c) => crate::backend::cast_out_bytes(g, c),
        None => g.out_bytes(),
    }
}

/// Refuses to write over any file of the input checkpoint.
fn check_not_input(ckpt: &Checkpoint, out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let same = |p: &Path| same_file(p, out);
    if same(ckpt.path()) || ckpt.files().any(same) {
        return Err(Error::OutputIsInput {
            path: out.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Everything [`convert`] needs besides the two paths.
#[derive(Clone, Debug, Default)]
pub struct ConvertSpec {
    /// Built-in preset to start from (see [`RuleSet::preset_names`]).
    pub preset: Option<String>,
    /// User rule files, layered over the preset in order (later files win).
    pub rules: Vec<PathBuf>,
    /// Training checkpoints: the key holding the state dict.
    pub key: Option<String>,
    /// Which backend runs the layout ops.
    pub backend: BackendOptions,
    /// Replace an existing output.
    pub force: bool,
    /// Leave tensors that match no rule out of the output instead of failing.
    pub allow_unmatched: bool,
    /// Rule variables (`--set NAME=VALUE`).
    pub vars: BTreeMap<String, String>,
    /// A `{module name: class name}` JSON file (`--module-types`).
    pub module_types: Option<PathBuf>,
    /// Output dtype of every floating tensor (`--dtype`).
    pub dtype: Option<DType>,
    /// An expectation file (`--expect`): the plan must produce exactly its tensor names,
    /// shapes and dtypes, checked before anything is written.
    pub expect: Option<PathBuf>,
}

impl ConvertSpec {
    /// Fails with [`Error::Verify`] when `plan` does not produce what the expectation
    /// file asks for; passes when there is none.
    pub fn check_expectation(&self, plan: &Plan) -> Result<()> {
        if let Some(path) = &self.expect {
            crate::verify::Expectation::from_file(path)?
                .check_plan(plan)
                .into_result()?;
        }
        Ok(())
    }

    /// The planning options the spec describes; reads the module-types file.
    pub fn plan_options(&self) -> Result<PlanOptions> {
        Ok(PlanOptions {
            vars: self.vars.clone(),
            module_types: self
                .module_types
                .as_deref()
                .map(ModuleTypes::from_file)
                .transpose()?,
            dtype: self.dtype,
        })
    }
}

/// Builds the rule set of a preset and/or rule files.
pub fn rule_set(preset: Option<&str>, rule_files: &[PathBuf]) -> Result<RuleSet> {
    let mut rules = match preset {
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

/// Plans `ckpt`, failing when tensors match no rule unless `allow_unmatched`.
pub fn plan_checkpoint(
    ckpt: &Checkpoint,
    rules: &RuleSet,
    opts: &PlanOptions,
    allow_unmatched: bool,
) -> Result<Plan> {
    let plan = rules.plan_with(ckpt.tensors(), opts)?;
    if !allow_unmatched {
        plan.require_all_matched()?;
    }
    Ok(plan)
}

/// Opens `input`, plans it and writes the converted checkpoint to `output`.
///
/// ```
/// # fn main() -> relayout::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("relayout-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// # let out = dir.join("small_cnn.flax.safetensors");
/// use relayout::{convert, ConvertSpec, Device};
/// let spec = ConvertSpec {
///     preset: Some("flax".into()),
///     backend: relayout::BackendOptions { device: Device::Cpu, ..Default::default() },
///     force: true,
///     ..Default::default()
/// };
/// let report = convert("tests/fixtures/small_cnn.pt", &out, &spec, &mut |_| {})?;
/// assert!(report.tensors > 0);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(())
/// # }
/// ```
pub fn convert(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    spec: &ConvertSpec,
    progress: &mut dyn FnMut(Progress),
) -> Result<ConvertReport> {
    let input = input.as_ref();
    let rules = rule_set(spec.preset.as_deref(), &spec.rules)?;
    let ckpt = Checkpoint::open_with(
        input,
        &OpenOptions {
            key: spec.key.clone(),
        },
    )?;
    let plan = plan_checkpoint(&ckpt, &rules, &spec.plan_options()?, spec.allow_unmatched)?;
    spec.check_expectation(&plan)?;
    let backend = crate::backend::select(&spec.backend)?;
    let opts = WriteOptions {
        force: spec.force,
        metadata: provenance(spec, &plan),
    };
    Converter::new(&ckpt, &plan, backend.as_ref()).write_safetensors(
        output.as_ref(),
        &opts,
        progress,
    )
}

/// The `relayout` metadata entry recording what produced a file.
pub fn provenance(spec: &ConvertSpec, plan: &Plan) -> BTreeMap<String, String> {
    let value = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "preset": spec.preset,
        "rules": plan.sources,
        "set": spec.vars,
        "dtype": spec.dtype.map(|d| d.to_string()),
        "dropped": plan.dropped.len(),
        "unmatched": plan.unmatched.len(),
    });
    BTreeMap::from([("relayout".to_string(), value.to_string())])
}
