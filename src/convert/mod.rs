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

use crate::backend::{Backend, BandSink, DeviceTraffic, NextTensor};
use crate::error::{Error, Result};
use crate::layout::{Cast, Gather};
use crate::plan::{Plan, PlanEntry};
use crate::reader::Checkpoint;
use crate::writer::output::{check_not_input, check_space, shard_is_complete, OutputFolder};
use crate::writer::shard::{OutputFile, OutputLayout, INDEX_NAME, SHARD_METADATA_KEY};
use crate::writer::{AtomicFile, OutputKind, SafetensorsWriter, ShardOptions};

mod report;
mod spec;

pub use report::ConvertReport;
pub use spec::{convert, plan_checkpoint, provenance, rule_set, ConvertSpec};

/// Output bytes per backend call: large enough to amortise calls and syscalls, small
/// enough that two bands stay far below the memory budget.
pub const DEFAULT_BAND_BYTES: usize = 32 << 20;

/// How far a conversion has got; handed to the progress callback after every band.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
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

    /// Converts one tensor into `dst`, which must hold exactly its bytes.
    pub fn convert_into(&self, entry: &PlanEntry, dst: &mut [u8]) -> Result<()> {
        let (g, cast) = self.op(entry)?;
        let src = self.source_bytes(entry);
        check_buffer(entry, dst.len(), out_bytes(&g, cast))?;
        self.run_entry(
            &g,
            cast,
            src,
            None,
            &mut &mut *dst,
            self.interrupt.as_ref(),
            &mut |_| {},
        )?;
        // Alone, a split part cannot know whether its siblings are still to come.
        self.release(entry, entry.slice.is_none());
        Ok(())
    }

    /// Converts every tensor of the plan into the caller's buffers, `dsts[i]` holding
    /// exactly the bytes of `plan.entries[i]` (see [`Converter::entry_bytes`]): the way
    /// loaders fill arrays they allocated, with no copy in between. Every length is
    /// checked before any work; `progress` hears about every band and every tensor.
    pub fn fill(&self, dsts: &mut [&mut [u8]], progress: &mut dyn FnMut(Progress)) -> Result<()> {
        let entries = &self.plan.entries;
        if dsts.len() != entries.len() {
            return Err(Error::Layout {
                detail: format!(
                    "{} buffers for a plan of {} tensors",
                    dsts.len(),
                    entries.len()
                ),
            });
        }
        let mut ops = Vec::with_capacity(entries.len());
        for (entry, dst) in entries.iter().zip(dsts.iter()) {
            let (g, cast) = self.op(entry)?;
            check_buffer(entry, dst.len(), out_bytes(&g, cast))?;
            ops.push((g, cast));
        }
        let mut run = Run::for_entries(self.plan, ops.iter().map(|(g, c)| out_bytes(g, *c)));
        progress(run.state);
        for (i, ((entry, dst), (g, cast))) in
            entries.iter().zip(dsts.iter_mut()).zip(&ops).enumerate()
        {
            Interrupt::check(self.interrupt.as_ref())?;
            let src = self.source_bytes(entry);
            let next = match (ops.get(i + 1), entries.get(i + 1)) {
                (Some((g, c)), Some(e)) => Some((g, *c, self.source_bytes(e))),
                _ => None,
            };
            let state = &mut run.state;
            self.run_entry(
                g,
                *cast,
                src,
                next,
                &mut &mut **dst,
                self.interrupt.as_ref(),
                &mut |len| {
                    state.bytes_done += len as u64;
                    progress(*state);
                },
            )?;
            if run.finish_source(entry.source) {
                self.release(entry, true);
            }
            run.state.tensors_done += 1;
            progress(run.state);
        }
        Ok(())
    }

    /// Runs one tensor band by band, each band computed in place into the slice `sink`
    /// hands out for it; `done` hears the bytes of every finished band.
    /// `next`: the tensor that follows, whose upload a device backend queues behind
    /// this one's last pieces.
    #[allow(clippy::too_many_arguments)]
    fn run_entry(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        src: &[u8],
        next: Option<(&Gather, Option<Cast>, &[u8])>,
        sink: &mut dyn BandSink,
        interrupt: Option<&Interrupt>,
        done: &mut dyn FnMut(usize),
    ) -> Result<()> {
        // The bands share one source: a device backend uploads it once for all of them.
        self.backend.begin_tensor(g, src)?;
        let result = self.run_bands(g, cast, src, next, sink, interrupt, done);
        self.backend.end_tensor();
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn run_bands(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        src: &[u8],
        next: Option<(&Gather, Option<Cast>, &[u8])>,
        sink: &mut dyn BandSink,
        interrupt: Option<&Interrupt>,
        done: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let bands = self.bands(g, cast);
        let next_bands = next.map(|(g, c, _)| self.bands(g, c));
        let next = match (next, &next_bands) {
            (Some((gather, cast, src)), Some(bands)) => Some(NextTensor {
                gather,
                bands,
                cast,
                src,
            }),
            _ => None,
        };
        Interrupt::check(interrupt)?;
        self.backend
            .gather_bands(&bands, cast, src, next, sink, &mut |len| {
                self.ckpt.check_reads()?;
                done(len);
                Interrupt::check(interrupt)
            })
    }

    /// A tensor's bands: bands count output bytes; with a cast the gather splits by
    /// source elements.
    fn bands(&self, g: &Gather, cast: Option<Cast>) -> Vec<(usize, Gather)> {
        match cast {
            None => g.split(self.band_bytes),
            Some(c) => {
                let (from, to) = (c.from().size(), c.to().size());
                g.split((self.band_bytes / to).max(1).saturating_mul(from))
            }
        }
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
            let (g, cast) = self.op(entry)?;
            let buffer = gpu.gather_to_buffer(&g, cast, self.source_bytes(entry))?;
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
        let started = self.start();
        check_not_input(self.ckpt, out)?;
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let layout = OutputLayout::single(self.plan, &name)?;
        let metadata = layout.metadata_of(&self.base_metadata(opts));
        let file = &layout.files[0];
        let mut run = Run::new(self.plan, [file]);
        progress(run.state);
        self.ckpt.advise_sequential();
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        check_space(
            parent.unwrap_or(Path::new(".")),
            &[(out.to_path_buf(), file)],
            &metadata,
        )?;
        let mut pending = Vec::new();
        self.write_files(
            &[(out.to_path_buf(), file)],
            &metadata,
            opts,
            &mut run,
            progress,
            &mut |f| {
                pending.push(f);
                Ok(())
            },
        )?;
        Interrupt::check(opts.interrupt.as_ref())?;
        self.ckpt.check_unchanged()?;
        AtomicFile::commit_all(pending)?;
        Ok(self.report(started, &run, vec![out.to_path_buf()]))
    }

    /// Writes the converted checkpoint into the folder `dir` as shards of at most
    /// `shard.max_shard_bytes` (`model-00001-of-0000N.safetensors`, …) and
    /// `model.safetensors.index.json`, creating the folder if needed.
    ///
    /// Without a worker, all or nothing: every shard is written and synced as a
    /// temporary file, and the set (index last) appears only once all are complete.
    ///
    /// With a worker (`i/N`), only its shards are written, each atomically; a shard
    /// already there with exactly the expected header and size is kept, so a re-run is
    /// idempotent. The worker that finds every shard present checks the set and writes
    /// the index ([`crate::writer::shard::merge_index`]).
    pub fn write_sharded(
        &self,
        dir: &Path,
        shard: &ShardOptions,
        opts: &WriteOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ConvertReport> {
        let started = self.start();
        let layout = OutputLayout::sharded(self.plan, shard.max_shard_bytes)?;
        let metadata = layout.metadata_of(&self.base_metadata(opts));
        let index = dir.join(INDEX_NAME);
        let mut folder = OutputFolder::open(dir, shard.worker.is_none())?;
        for path in layout
            .files
            .iter()
            .map(|f| dir.join(&f.name))
            .chain([index.clone()])
        {
            check_not_input(self.ckpt, &path)?;
        }
        // Shards of an earlier set with another count, replaced with --force.
        let stale: Vec<PathBuf> = crate::writer::shard::parse_dir_shards(dir)?
            .into_iter()
            .filter(|(_, n, _)| *n != layout.files.len())
            .map(|(_, _, name)| dir.join(name))
            .filter(|p| check_not_input(self.ckpt, p).is_ok())
            .collect();

        let mine: Vec<&OutputFile> = layout
            .files
            .iter()
            .enumerate()
            .filter(|(k, _)| shard.worker.is_none_or(|w| w.owns(*k)))
            .map(|(_, f)| f)
            .collect();
        let mut reused = Vec::new();
        let mut todo = Vec::new();
        match shard.worker {
            None => {
                if !opts.force {
                    let taken = mine
                        .iter()
                        .map(|f| dir.join(&f.name))
                        .chain([index.clone()])
                        .chain(stale.iter().cloned())
                        .find(|p| std::fs::symlink_metadata(p).is_ok());
                    if let Some(path) = taken {
                        return Err(Error::OutputExists { path });
                    }
                }
                todo = mine;
            }
            Some(_) => {
                for f in mine {
                    let path = dir.join(&f.name);
                    if std::fs::symlink_metadata(&path).is_err() {
                        todo.push(f);
                    } else if shard_is_complete(&path, f, &metadata)? {
                        reused.push(path);
                    } else if opts.force {
                        todo.push(f);
                    } else {
                        return Err(Error::Shard {
                            path,
                            detail: "exists but is not this conversion's shard (pass --force to replace it)".to_string(),
                        });
                    }
                }
            }
        }

        let mut run = Run::new(self.plan, todo.iter().copied());
        progress(run.state);
        self.ckpt.advise_sequential();
        let files: Vec<(PathBuf, &OutputFile)> =
            todo.iter().map(|f| (dir.join(&f.name), *f)).collect();
        let outputs: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        check_space(dir, &files, &metadata)?;
        let mut pending = Vec::new();
        let worker = shard.worker.is_some();
        let interrupt = opts.interrupt.as_ref();
        let ckpt = self.ckpt;
        self.write_files(&files, &metadata, opts, &mut run, progress, &mut |f| {
            if worker {
                // Each worker's shard appears as soon as it is complete.
                Interrupt::check(interrupt)?;
                ckpt.check_unchanged()?;
                f.commit()
            } else {
                pending.push(f);
                Ok(())
            }
        })?;
        Interrupt::check(opts.interrupt.as_ref())?;
        let mut report = self.report(started, &run, outputs);
        report.reused = reused;
        report.shards = layout.files.len();
        if shard.worker.is_none() {
            // The index last: a loader that finds it finds every shard.
            let mut idx = AtomicFile::create(&index, true)?;
            idx.write_all(&layout.index_bytes())?;
            idx.sync()?;
            pending.push(idx);
            self.ckpt.check_unchanged()?;
            AtomicFile::commit_all(pending)?;
            for path in &stale {
                // Best effort: the new set is complete; an old file left is only clutter.
                let _ = std::fs::remove_file(path);
            }
            report.index = Some(index);
            report.shards_present = layout.files.len();
        } else {
            // Shards appear only complete, and a merge writes nothing new but the index,
            // so one look at the folder serves both.
            report.shards_present = crate::writer::shard::shards_present(dir, &layout);
            if report.shards_present == layout.files.len() {
                report.index = Some(crate::writer::shard::merge_index(dir)?.index);
            }
        }
        folder.keep();
        Ok(report)
    }

    /// Writes output files one after the other through one writer, each with its tensors
    /// in its order, into temporary files; `durable` receives each file, synced but not
    /// committed, as soon as the writer's thread has completed it (files end while the
    /// next is being filled, so shard boundaries cost no drain).
    fn write_files(
        &self,
        files: &[(PathBuf, &OutputFile)],
        metadata: &BTreeMap<String, String>,
        opts: &WriteOptions,
        run: &mut Run,
        progress: &mut dyn FnMut(Progress),
        durable: &mut dyn FnMut(AtomicFile) -> Result<()>,
    ) -> Result<()> {
        // A piece is never smaller than one element, whatever the band.
        let capacity = self.band_bytes.max(crate::layout::ELEM_SIZES[3]);
        let interrupt = opts.interrupt.as_ref();
        let mut writer: Option<SafetensorsWriter> = None;
        // Every entry in the order written, so each tensor knows the one after it (across
        // files too): the device uploads the next while this one finishes.
        let mut order = Vec::new();
        for (_, file) in files {
            for &i in &file.entries {
                let entry = self.plan.entries.get(i).ok_or_else(|| Error::Layout {
                    detail: format!(
                        "output file {} names plan entry {i}, which does not exist",
                        file.name
                    ),
                })?;
                order.push(entry);
            }
        }
        let mut ops = order.iter().map(|e| self.op(e));
        let mut upcoming = ops.next().transpose()?;
        let mut position = 0;
        for (path, file) in files {
            Interrupt::check(interrupt)?;
            let w = match writer.as_mut() {
                None => writer.insert(SafetensorsWriter::with_capacity(
                    path,
                    &file.header,
                    metadata,
                    opts.force,
                    capacity,
                )?),
                Some(w) => {
                    w.next_file(path, &file.header, metadata, opts.force)?;
                    w
                }
            };
            for f in w.take_durable()? {
                durable(f)?;
            }
            // Each band is computed straight into the writer's block buffer; the
            // writer's thread writes full blocks while the backend fills the next one.
            for _ in &file.entries {
                Interrupt::check(interrupt)?;
                let (Some(entry), Some((g, cast))) = (order.get(position), upcoming.take()) else {
                    return Err(Error::Layout {
                        detail: format!(
                            "output file {} lists more entries than planned",
                            file.name
                        ),
                    });
                };
                position += 1;
                upcoming = ops.next().transpose()?;
                let next = match (&upcoming, order.get(position)) {
                    (Some((g, c)), Some(e)) => Some((g, *c, self.source_bytes(e))),
                    _ => None,
                };
                let src = self.source_bytes(entry);
                let state = &mut run.state;
                self.run_entry(&g, cast, src, next, w, interrupt, &mut |len| {
                    state.bytes_done += len as u64;
                    progress(*state);
                })?;
                // A source read by several entries (split parts) goes after its last.
                if run.finish_source(entry.source) {
                    self.release(entry, true);
                }
                run.state.tensors_done += 1;
                progress(run.state);
                for f in w.take_durable()? {
                    durable(f)?;
                }
            }
        }
        if let Some(w) = writer {
            for f in w.finish_all_uncommitted()? {
                durable(f)?;
            }
        }
        Ok(())
    }

    /// The source's metadata with `opts`' entries over it, less a shard tag it carried.
    fn base_metadata(&self, opts: &WriteOptions) -> BTreeMap<String, String> {
        let mut metadata = self.ckpt.metadata().clone();
        metadata.remove(SHARD_METADATA_KEY);
        metadata.extend(opts.metadata.clone());
        metadata
    }

    /// The clock and the device counters at the start of a run.
    fn start(&self) -> (Instant, DeviceTraffic) {
        (Instant::now(), self.backend.traffic())
    }

    fn report(
        &self,
        (started, traffic): (Instant, DeviceTraffic),
        run: &Run,
        outputs: Vec<PathBuf>,
    ) -> ConvertReport {
        let moved = self.backend.traffic().since(traffic);
        ConvertReport {
            tensors: run.state.tensors_total,
            bytes: run.state.bytes_total,
            seconds: started.elapsed().as_secs_f64(),
            device_upload_bytes: moved.upload_bytes,
            device_readback_bytes: moved.readback_bytes,
            backend: self.backend.name(),
            dropped: self.plan.dropped.len(),
            unmatched: self.plan.unmatched.len(),
            shards_present: 0,
            shards: 0,
            index: None,
            reused: Vec::new(),
            outputs,
        }
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

/// Progress of one run over its files, and how many entries still read each source.
struct Run {
    state: Progress,
    readers_left: HashMap<usize, usize>,
}

impl Run {
    fn new<'f>(plan: &Plan, files: impl IntoIterator<Item = &'f OutputFile>) -> Run {
        let mut state = Progress::default();
        let mut readers_left: HashMap<usize, usize> = HashMap::new();
        for f in files {
            state.tensors_total += f.entries.len();
            state.bytes_total += f.bytes;
            for &i in &f.entries {
                if let Some(e) = plan.entries.get(i) {
                    *readers_left.entry(e.source).or_default() += 1;
                }
            }
        }
        Run {
            state,
            readers_left,
        }
    }

    /// A run over every entry of `plan`, whose outputs have the given byte sizes.
    fn for_entries(plan: &Plan, bytes: impl Iterator<Item = usize>) -> Run {
        let mut state = Progress {
            tensors_total: plan.entries.len(),
            ..Progress::default()
        };
        let mut readers_left: HashMap<usize, usize> = HashMap::new();
        for (e, b) in plan.entries.iter().zip(bytes) {
            state.bytes_total += b as u64;
            *readers_left.entry(e.source).or_default() += 1;
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

/// Output bytes of `g`, converted by `cast` when there is one.
fn out_bytes(g: &Gather, cast: Option<Cast>) -> usize {
    match cast {
        Some(c) => crate::backend::cast_out_bytes(g, c),
        None => g.out_bytes(),
    }
}
