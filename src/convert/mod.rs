//! The pipeline: plan entries in, converted tensors out — into a file, or handed to the
//! caller one by one.
//!
//! Every tensor is produced in bands of at most `band_bytes` output bytes, computed in
//! place into the writer's block buffers, so memory is bounded by a few bands whatever
//! the tensor size: while the backend fills one block, the writer's thread writes the
//! previous one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, Buffers, Job, Sink, Span, Step};
use crate::error::{Error, Result};
use crate::layout::Cast;
use crate::plan::{Plan, PlanEntry};
use crate::reader::Checkpoint;
use crate::writer::output::Output;
use crate::writer::shard::{OutputFile, OutputLayout, SHARD_METADATA_KEY};
use crate::writer::{AtomicFile, OutputKind, SafetensorsWriter, ShardOptions};

mod spec;

pub use crate::report::ConvertReport;
pub use spec::{
    convert, merge_index_from, open_and_plan, plan_checkpoint, provenance, rule_set, ConvertSpec,
};

/// Output bytes per backend call: large enough to amortise calls and syscalls, small
/// enough that two bands stay far below the memory budget.
pub const DEFAULT_BAND_BYTES: usize = 32 << 20;

/// How far a conversion has got; handed to the progress callback after every band.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    pub(crate) tensors_done: usize,
    pub(crate) tensors_total: usize,
    pub(crate) bytes_done: u64,
    pub(crate) bytes_total: u64,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl Progress {
    /// Tensors complete.
    pub fn tensors_done(&self) -> usize {
        self.tensors_done
    }

    /// Tensors in the run.
    pub fn tensors_total(&self) -> usize {
        self.tensors_total
    }

    /// Output bytes complete.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    /// Output bytes in the run.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_total
    }
}

/// Options of [`Converter::write_safetensors`] and [`Converter::write_sharded`].
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Replace existing output files.
    pub force: bool,
    /// Extra `__metadata__` entries (provenance); the source's metadata is kept.
    pub metadata: BTreeMap<String, String>,
    /// Stops the conversion when raised; nothing is left behind.
    pub interrupt: Option<Interrupt>,
}

/// Stops a running conversion from another thread or a signal handler: once its flag is
/// non-zero, the conversion ends with [`Error::Interrupted`] carrying that value at the
/// next band (at most one band of work later) and removes what it had written.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicUsize>);

impl Interrupt {
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// The shared flag, e.g. for `signal_hook::flag::register_usize(SIGINT, flag, 2)`.
    pub fn flag(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.0)
    }

    /// Asks the conversion to stop; `code` (non-zero) is reported back in the error.
    pub fn raise(&self, code: usize) {
        self.0.store(code.max(1), Ordering::SeqCst);
    }

    /// The code it was raised with, if it was.
    pub fn code(&self) -> Option<usize> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            c => Some(c),
        }
    }

    fn check(this: Option<&Interrupt>) -> Result<()> {
        match this.and_then(Interrupt::code) {
            None => Ok(()),
            Some(code) => Err(Error::Interrupted { code }),
        }
    }
}

/// Runs a plan over a checkpoint with one backend.
pub struct Converter<'a> {
    ckpt: &'a Checkpoint,
    plan: &'a Plan,
    backend: &'a dyn Backend,
    band_bytes: usize,
    interrupt: Option<Interrupt>,
}

impl<'a> Converter<'a> {
    pub fn new(ckpt: &'a Checkpoint, plan: &'a Plan, backend: &'a dyn Backend) -> Converter<'a> {
        Converter {
            ckpt,
            plan,
            backend,
            band_bytes: DEFAULT_BAND_BYTES,
            interrupt: None,
        }
    }

    /// Stops [`Converter::convert_into`], [`Converter::fill`] and [`Converter::for_each`]
    /// with [`Error::Interrupted`] at the next band once `interrupt` is raised (the
    /// writers take theirs from [`WriteOptions::interrupt`]).
    pub fn with_interrupt(mut self, interrupt: Interrupt) -> Converter<'a> {
        self.interrupt = Some(interrupt);
        self
    }

    /// Sets the band size (bytes of output per backend call); at least one element.
    pub fn with_band_bytes(mut self, band_bytes: usize) -> Converter<'a> {
        self.band_bytes = band_bytes.max(1);
        self
    }

    /// The job that produces `entry`'s outputs `outputs` (see [`PlanEntry::outputs`]),
    /// the one place a plan entry becomes work: the gather over its (sliced) source, the
    /// element conversion, the quantization, and its bands.
    fn job(&self, entry: &PlanEntry, outputs: std::ops::Range<usize>) -> Result<Job<'a>> {
        let sources = entry.sources();
        let mut parts = Vec::with_capacity(sources.len());
        let mut elements = 0usize;
        let mut dtype = entry.source_dtype;
        for (k, &source) in sources.iter().enumerate() {
            let name = entry
                .stack
                .get(k)
                .map_or(entry.source_name.as_str(), |(_, n)| n.as_str());
            let t = self
                .ckpt
                .tensors()
                .get(source)
                .ok_or_else(|| Error::Layout {
                    detail: format!(
                        "plan entry '{}' names a missing source tensor '{name}'",
                        entry.target
                    ),
                })?;
            if t.dtype != entry.source_dtype {
                return Err(Error::Layout {
                    detail: format!(
                        "'{}': part '{name}' is {}, the entry's source dtype {}",
                        entry.target, t.dtype, entry.source_dtype
                    ),
                });
            }
            dtype = t.dtype;
            let mut op = self.ckpt.layout_op(t, &entry.perm)?;
            if let Some(s) = entry.slice {
                op = op.sliced(s.axis, s.start, s.len)?;
            }
            let g = op.simplify();
            elements = elements.checked_add(g.len()).ok_or_else(|| Error::Layout {
                detail: format!("'{}' has more elements than fit in memory", entry.target),
            })?;
            parts.push((self.ckpt.storage_bytes(t), g));
        }
        let cast = Cast::new(dtype, entry.dtype)?.map(|c| c.with_nan(self.plan.nan));
        // A reshape is free on the contiguous output, but must keep the element count.
        if crate::layout::checked_numel(&entry.target_shape) != Some(elements) {
            return Err(Error::Layout {
                detail: format!(
                    "'{}': target shape {:?} does not hold the {elements} elements of '{}'{}",
                    entry.target,
                    entry.target_shape,
                    entry.source_name,
                    if sources.len() > 1 {
                        format!(" and the {} other stacked parts", sources.len() - 1)
                    } else {
                        String::new()
                    }
                ),
            });
        }
        match entry.quantize_op()? {
            Some(op) => Job::quantized(parts, cast, op.only(outputs), self.band_bytes),
            None => Job::new(parts, cast, self.band_bytes),
        }
        .map_err(|e| match e {
            Error::Layout { detail } => Error::Layout {
                detail: format!("'{}': {detail}", entry.target),
            },
            other => other,
        })
    }

    /// The jobs writing every output of each of `entries`, in order.
    fn jobs(&self, entries: &[&PlanEntry]) -> Result<Vec<Job<'a>>> {
        entries
            .iter()
            .map(|e| self.job(e, 0..e.outputs().len()))
            .collect()
    }

    /// Bytes of one output tensor; an error when its shape overflows.
    pub fn entry_bytes(entry: &PlanEntry) -> Result<usize> {
        let bytes = crate::writer::shard::entry_bytes(entry)?;
        usize::try_from(bytes).map_err(|_| Error::Layout {
            detail: format!(
                "'{}' is {bytes} bytes, more than this platform can address",
                entry.target
            ),
        })
    }

    /// Converts one entry into `dst`, which must hold exactly its bytes
    /// ([`Converter::entry_bytes`]): for a quantized weight, its outputs one after the
    /// other (packed words, scales, biases; see [`PlanEntry::outputs`]).
    pub fn convert_into(&self, entry: &PlanEntry, dst: &mut [u8]) -> Result<()> {
        let jobs = self.jobs(&[entry])?;
        check_buffer(entry, dst.len(), jobs[0].out_bytes())?;
        let interrupt = self.interrupt.as_ref();
        Interrupt::check(interrupt)?;
        let mut bufs = Vec::new();
        let mut rest = dst;
        for &n in jobs[0].outputs() {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            bufs.push(head);
            rest = tail;
        }
        self.backend.run(
            &jobs,
            &mut Buffers::new(&mut bufs, &jobs)?,
            &mut |step| match step {
                Step::Band { .. } => {
                    self.ckpt.check_reads()?;
                    Interrupt::check(interrupt)
                }
                Step::Job { .. } => Ok(()),
            },
        )?;
        // Alone, a split part cannot know whether its siblings are still to come.
        self.release(entry, entry.slice.is_none());
        Ok(())
    }

    /// Converts every tensor of the plan into the caller's buffers, one per output
    /// tensor of every entry in plan order ([`PlanEntry::outputs`]: one for a plain
    /// entry, the packed weight, scales and biases of a quantized one), each holding
    /// exactly that tensor's bytes: the way loaders fill arrays they allocated, with no
    /// copy in between. Every length is checked before any work; `progress` hears about
    /// every band and every tensor.
    pub fn fill(&self, dsts: &mut [&mut [u8]], progress: &mut dyn FnMut(Progress)) -> Result<()> {
        let entries: Vec<&PlanEntry> = self.plan.entries.iter().collect();
        let tensors: Vec<(String, usize)> = entries
            .iter()
            .flat_map(|e| e.outputs())
            .map(|t| {
                let n = crate::layout::checked_bytes(&t.shape, t.dtype.size());
                (t.name, n.unwrap_or(usize::MAX))
            })
            .collect();
        if dsts.len() != tensors.len() {
            return Err(Error::Layout {
                detail: format!(
                    "{} buffers for a plan of {} tensors",
                    dsts.len(),
                    tensors.len()
                ),
            });
        }
        for ((name, want), dst) in tensors.iter().zip(dsts.iter()) {
            if dst.len() != *want {
                return Err(Error::Layout {
                    detail: format!(
                        "buffer of {} bytes for '{name}', which needs {want}",
                        dst.len()
                    ),
                });
            }
        }
        let jobs = self.jobs(&entries)?;
        let mut run = Run::new(&entries, jobs.iter().map(|j| j.out_bytes() as u64));
        progress(run.state);
        let interrupt = self.interrupt.as_ref();
        let mut sink = Buffers::new(dsts, &jobs)?;
        self.run(&entries, &jobs, &mut sink, &mut run, interrupt, progress)
    }

    /// Runs `jobs` (those of `entries`) in one backend call: every band is checked
    /// against the input's reads and the interrupt, each finished tensor lets its
    /// source's pages go, and `progress` hears of both.
    fn run(
        &self,
        entries: &[&PlanEntry],
        jobs: &[Job<'_>],
        sink: &mut dyn Sink,
        run: &mut Run,
        interrupt: Option<&Interrupt>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        Interrupt::check(interrupt)?;
        let last = jobs.len().checked_sub(1);
        self.backend.run(jobs, sink, &mut |step| {
            let finished = matches!(step, Step::Job { job } if Some(job) == last);
            match step {
                Step::Band { bytes, .. } => {
                    self.ckpt.check_reads()?;
                    run.state.bytes_done += bytes as u64;
                }
                Step::Job { job } => {
                    let entry = entries.get(job).ok_or_else(|| Error::Layout {
                        detail: format!("the backend finished job {job}, which was not given"),
                    })?;
                    // A source read by several entries (split parts) goes after its last.
                    for source in entry.sources() {
                        if run.finish_source(source) {
                            self.release_source(source);
                        }
                    }
                    run.state.tensors_done += 1;
                }
            }
            progress(run.state);
            if finished {
                // The last job is written: nothing is left to stop.
                return Ok(());
            }
            Interrupt::check(interrupt)
        })
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
            buf.resize(Self::entry_bytes(entry)?, 0);
            self.convert_into(entry, &mut buf)?;
            f(entry, &buf)?;
        }
        Ok(())
    }

    /// Hands every converted tensor to `f` as a buffer on the caller's wgpu `device`, in
    /// plan order, for engines that run on wgpu: each source is uploaded once, converted
    /// by the same kernels as the GPU backend, and nothing is read back (a tensor larger
    /// than one binding is converted through the host, then uploaded). The buffer holds
    /// `entry`'s bytes, row-major, padded to a whole word, with `STORAGE | COPY_SRC |
    /// COPY_DST` usage; it is the caller's to keep. The converter's own backend is not
    /// used.
    #[cfg(feature = "gpu")]
    pub fn for_each_on_device<F>(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        mut f: F,
    ) -> Result<()>
    where
        F: FnMut(&PlanEntry, wgpu::Buffer) -> Result<()>,
    {
        let gpu = crate::backend::gpu::Gpu::with_device(
            device.clone(),
            queue.clone(),
            &crate::backend::gpu::GpuOptions::default(),
        )?;
        for entry in &self.plan.entries {
            Interrupt::check(self.interrupt.as_ref())?;
            if entry.quant.is_some() {
                return Err(Error::Layout {
                    detail: format!(
                        "'{}' is quantized: device buffers are made for plain tensors only",
                        entry.target
                    ),
                });
            }
            let job = self.job(entry, 0..1)?;
            let [part] = job.parts() else {
                return Err(Error::Layout {
                    detail: format!(
                        "'{}' reads {} sources; a device buffer is made from one",
                        entry.target,
                        job.parts().len()
                    ),
                });
            };
            let buffer = gpu.gather_to_buffer(part.gather(), job.cast(), part.src())?;
            self.ckpt.check_reads()?;
            f(entry, buffer)?;
        }
        Ok(())
    }

    /// Writes the converted checkpoint to `out`: one file or a folder of shards.
    pub fn write(
        &self,
        out: &Path,
        kind: &OutputKind,
        opts: &WriteOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ConvertReport> {
        match kind {
            OutputKind::File => self.write_safetensors(out, opts, progress),
            OutputKind::Shards(shard) => self.write_sharded(out, shard, opts, progress),
        }
    }

    /// Writes the converted checkpoint to `out` as safetensors, streaming, atomically.
    pub fn write_safetensors(
        &self,
        out: &Path,
        opts: &WriteOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ConvertReport> {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let layout = OutputLayout::single(self.plan, &name)?;
        let metadata = layout.metadata_of(&self.base_metadata(opts));
        let output = Output::file(out, &layout, &metadata, self.ckpt)?;
        self.write_output(out, output, &metadata, opts, progress)
    }

    /// Writes the converted checkpoint into the folder `dir` as shards of at most
    /// `shard.max_shard_bytes` (`model-00001-of-0000N.safetensors`, …, or
    /// `model.safetensors` when one shard holds everything) and
    /// `model.safetensors.index.json`, creating the folder if needed.
    ///
    /// Without a worker, all or nothing: every shard is written and synced as a
    /// temporary file, and the set (index last) appears only once all are complete.
    ///
    /// With a worker (`i/N`), only its shards are written, each atomically; a shard
    /// already there with exactly the expected header and size is kept, so a re-run is
    /// idempotent. The worker that finds every shard present checks the set and writes
    /// the index ([`crate::shard::merge_index`]).
    pub fn write_sharded(
        &self,
        dir: &Path,
        shard: &ShardOptions,
        opts: &WriteOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ConvertReport> {
        let layout = OutputLayout::sharded(self.plan, shard.max_shard_bytes)?;
        let metadata = layout.metadata_of(&self.base_metadata(opts));
        let output = Output::shards(
            dir,
            &layout,
            &metadata,
            shard.worker,
            opts.force,
            self.ckpt,
            &self.plan.files,
        )?;
        self.write_output(dir, output, &metadata, opts, progress)
    }

    /// Converts into the files `output` lists, then commits them.
    fn write_output(
        &self,
        output_path: &Path,
        mut output: Output<'_>,
        metadata: &BTreeMap<String, String>,
        opts: &WriteOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ConvertReport> {
        let started = (Instant::now(), self.backend.traffic());
        let interrupt = opts.interrupt.as_ref();
        let ready = || -> Result<()> {
            Interrupt::check(interrupt)?;
            self.ckpt.check_unchanged()
        };
        let files = output.todo().to_vec();
        let mut entries = Vec::new();
        let mut jobs = Vec::new();
        for (_, file) in &files {
            for (&i, outputs) in file.entries.iter().zip(&file.outputs) {
                let entry = self.plan.entries.get(i).ok_or_else(|| Error::Layout {
                    detail: format!(
                        "output file {} names plan entry {i}, which does not exist",
                        file.name
                    ),
                })?;
                jobs.push(self.job(entry, outputs.clone())?);
                entries.push(entry);
            }
        }
        let mut run = Run::new(&entries, jobs.iter().map(|j| j.out_bytes() as u64));
        run.state.bytes_total = files.iter().map(|(_, f)| f.bytes).sum();
        progress(run.state);
        self.ckpt.advise_sequential();
        if let Some((first, file)) = files.first() {
            // A piece is never smaller than one element, whatever the band.
            let capacity = self.band_bytes.max(crate::layout::ELEM_SIZES[3]);
            let writer = SafetensorsWriter::with_capacity(
                first,
                &file.header,
                metadata,
                opts.force,
                capacity,
            )?;
            let mut sink = FileSink {
                writer,
                jobs: &jobs,
                open_job: None,
                streamed: 0,
                held: Vec::new(),
                files: &files,
                starts: files
                    .iter()
                    .scan(0, |at, (_, f)| {
                        let start = *at;
                        *at += f.entries.len();
                        Some(start)
                    })
                    .collect(),
                current: 0,
                metadata,
                force: opts.force,
                durable: &mut |f| output.durable(f, &ready),
            };
            sink.advance_to(0)?;
            self.run(&entries, &jobs, &mut sink, &mut run, interrupt, progress)?;
            sink.advance_to(jobs.len())?;
            let FileSink {
                writer, durable, ..
            } = sink;
            for f in writer.finish_all_uncommitted()? {
                durable(f)?;
            }
        }
        let done = output.commit(&ready)?;
        let moved = self.backend.traffic().since(started.1);
        let seconds = started.0.elapsed().as_secs_f64();
        Ok(ConvertReport {
            input: self.ckpt.path().to_path_buf(),
            output: output_path.to_path_buf(),
            tensors: run.state.tensors_total,
            bytes: run.state.bytes_total,
            seconds,
            gb_per_s: crate::report::gb_per_s(run.state.bytes_total, seconds),
            device_upload_bytes: moved.upload_bytes,
            device_readback_bytes: moved.readback_bytes,
            backend: self.backend.name(),
            dropped: self.plan.dropped.len(),
            unmatched: self.plan.unmatched.len(),
            shards_present: done.shards_present,
            shards: done.shards,
            index: done.index,
            copied: done.copied,
            reused: done.reused,
            outputs: done.outputs,
        })
    }

    /// The source's metadata with `opts`' entries over it, less a shard tag it carried.
    fn base_metadata(&self, opts: &WriteOptions) -> BTreeMap<String, String> {
        let mut metadata = self.ckpt.metadata().clone();
        metadata.remove(SHARD_METADATA_KEY);
        metadata.extend(opts.metadata.clone());
        metadata
    }

    /// Lets the pages of a finished tensor go, unless another entry reads the same
    /// storage: a tensor shared with others, or (`last` false) a later part of a split.
    fn release(&self, entry: &PlanEntry, last: bool) {
        if !last {
            return;
        }
        for source in entry.sources() {
            self.release_source(source);
        }
    }

    /// Lets the pages of source tensor `source` go, unless its storage is shared.
    fn release_source(&self, source: usize) {
        if let Some(t) = self.ckpt.tensors().get(source) {
            if !self.ckpt.shares_storage(t) {
                self.ckpt.release(t);
            }
        }
    }
}

/// A caller's buffer for `entry` must hold exactly its `want` bytes.
fn check_buffer(entry: &PlanEntry, len: usize, want: usize) -> Result<()> {
    if len == want {
        return Ok(());
    }
    Err(Error::Layout {
        detail: format!(
            "buffer of {len} bytes for '{}', which needs {want}",
            entry.target
        ),
    })
}

/// The writer as a run's sink: jobs go into the output files in order, each file's
/// tensors one after the other, the next file begun once the last tensor before it is
/// done.
struct FileSink<'s, 'j> {
    writer: SafetensorsWriter,
    jobs: &'s [Job<'j>],
    /// The job being written, the bytes of its first output streamed so far, and its
    /// other outputs, held until it is done.
    open_job: Option<usize>,
    streamed: usize,
    held: Vec<Vec<u8>>,
    files: &'s [(PathBuf, &'s OutputFile)],
    /// The first job of each file.
    starts: Vec<usize>,
    /// The file being written.
    current: usize,
    metadata: &'s BTreeMap<String, String>,
    force: bool,
    /// Hears of every file written and synced, as soon as the writer's thread is done
    /// with it (files end while the next is being filled: no drain at file boundaries).
    durable: &'s mut dyn FnMut(AtomicFile) -> Result<()>,
}

impl FileSink<'_, '_> {
    /// Begins every file whose tensors start at or before `job` (a file of no tensors
    /// is begun and ended at once).
    fn advance_to(&mut self, job: usize) -> Result<()> {
        while let (Some(&start), Some((path, file))) = (
            self.starts.get(self.current + 1),
            self.files.get(self.current + 1),
        ) {
            if start > job {
                break;
            }
            self.writer
                .next_file(path, &file.header, self.metadata, self.force)?;
            self.current += 1;
            self.hand_over()?;
        }
        Ok(())
    }

    fn hand_over(&mut self) -> Result<()> {
        for f in self.writer.take_durable()? {
            (self.durable)(f)?;
        }
        Ok(())
    }
}

impl Sink for FileSink<'_, '_> {
    fn band(&mut self, job: usize, spans: &[Span]) -> Result<Vec<&mut [u8]>> {
        if self.open_job != Some(job) {
            let outputs = self.jobs.get(job).map(Job::outputs).unwrap_or_default();
            self.held = outputs.iter().skip(1).map(|&n| vec![0; n]).collect();
            self.open_job = Some(job);
            self.streamed = 0;
        }
        let bad = |s: &Span| Error::Layout {
            detail: format!(
                "band at {} of output {} of job {job} is out of order or outside it",
                s.at(),
                s.output()
            ),
        };
        let mut out = Vec::with_capacity(spans.len());
        let mut writer = Some(&mut self.writer);
        let mut rest: &mut [Vec<u8>] = &mut self.held;
        let mut next = 1;
        for s in spans {
            if s.output() == 0 {
                // The job's first output streams: each band is computed straight into
                // the writer's block buffer, whose thread writes full blocks while the
                // backend fills the next one.
                let w = writer.take().filter(|_| s.at() == self.streamed);
                let w = w.ok_or_else(|| bad(s))?;
                self.streamed += s.len();
                out.push(w.reserve(s.len())?);
                continue;
            }
            // The others (a weight's scales) are held for this one job, then follow it.
            let skip = s.output().checked_sub(next).ok_or_else(|| bad(s))?;
            let (buf, tail) = std::mem::take(&mut rest)
                .get_mut(skip..)
                .and_then(|r| r.split_first_mut())
                .ok_or_else(|| bad(s))?;
            rest = tail;
            next = s.output() + 1;
            let end = s.at().checked_add(s.len()).ok_or_else(|| bad(s))?;
            out.push(buf.get_mut(s.at()..end).ok_or_else(|| bad(s))?);
        }
        Ok(out)
    }

    fn job_done(&mut self, job: usize) -> Result<()> {
        for held in std::mem::take(&mut self.held) {
            self.writer.write(&held)?;
        }
        self.open_job = None;
        self.hand_over()?;
        self.advance_to(job + 1)
    }
}

/// Progress of one run over its files, and how many entries still read each source.
struct Run {
    state: Progress,
    readers_left: HashMap<usize, usize>,
}

impl Run {
    /// A run over `entries`, whose outputs have the given byte sizes.
    fn new(entries: &[&PlanEntry], bytes: impl Iterator<Item = u64>) -> Run {
        let mut state = Progress {
            tensors_total: entries.len(),
            ..Progress::default()
        };
        let mut readers_left: HashMap<usize, usize> = HashMap::new();
        for (e, b) in entries.iter().zip(bytes) {
            state.bytes_total += b;
            for source in e.sources() {
                *readers_left.entry(source).or_default() += 1;
            }
        }
        Run {
            state,
            readers_left,
        }
    }

    /// Counts one entry of `source` done; true when it was the last to read it.
    fn finish_source(&mut self, source: usize) -> bool {
        match self.readers_left.get_mut(&source) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_jobs::two_output_job;
    use crate::dtype::DType;
    use crate::writer::HeaderEntry;

    #[test]
    fn the_file_sink_streams_a_jobs_first_output_and_writes_the_others_after_it() {
        let dir = std::env::temp_dir().join(format!("relayout-filesink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.safetensors");
        let src: Vec<u8> = (0..10).collect();
        let jobs = [two_output_job(&src), two_output_job(&src[..4])];
        let entry = |name: &str, n| HeaderEntry {
            name: name.into(),
            dtype: DType::U8,
            shape: vec![n],
        };
        let header = [
            entry("a", 10),
            entry("a.s", 4),
            entry("b", 4),
            entry("b.s", 2),
        ];
        let metadata = BTreeMap::new();
        let writer = SafetensorsWriter::with_capacity(&path, &header, &metadata, false, 8).unwrap();
        let mut durable = Vec::new();
        let mut sink = FileSink {
            writer,
            jobs: &jobs,
            open_job: None,
            streamed: 0,
            held: Vec::new(),
            files: &[],
            starts: vec![0],
            current: 0,
            metadata: &metadata,
            force: false,
            durable: &mut |f| {
                durable.push(f);
                Ok(())
            },
        };
        for (j, job) in jobs.iter().enumerate() {
            let bands = job.parts()[0].bands();
            // Out of order within the streamed output: refused.
            if let Some(second) = bands.get(1) {
                assert!(sink.band(j, second.spans()).is_err());
            }
            for (i, band) in bands.iter().enumerate() {
                let mut dsts = sink.band(j, band.spans()).unwrap();
                let at = band.gather().offset();
                for (k, x) in dsts[0].iter_mut().enumerate() {
                    *x = src[at + k] + 1;
                }
                dsts[1][0] = 100 + i as u8;
            }
            sink.job_done(j).unwrap();
        }
        let FileSink { writer, .. } = sink;
        let mut files = durable;
        files.extend(writer.finish_all_uncommitted().unwrap());
        AtomicFile::commit_all(files).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data = |n: &str| st.tensor(n).unwrap().data().to_vec();
        assert_eq!(data("a"), (1..11).collect::<Vec<u8>>());
        assert_eq!(data("a.s"), [100, 101, 102, 103]);
        assert_eq!(data("b"), [1, 2, 3, 4]);
        assert_eq!(data("b.s"), [100, 101]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
