//! The GPU backend: WGSL compute shaders through wgpu.
//!
//! `device` gets a device; [`Gpu`] does the work on one. A gather is cut into pieces
//! (`chunk`) whose source window and output each fit one storage binding; pieces
//! stream through a ring of `PIPELINE_DEPTH` slots, each with its own upload, output
//! and readback buffers, so the upload of one piece, the kernel of the next and the
//! readback of the one before overlap. Mapped results are copied straight into the
//! caller's output. Buffers live as long as the [`Gpu`] and only grow.

mod chunk;
mod device;
mod kernel;
internal! {
pub mod source;
}

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{
    check_buffers, check_cast_buffers, check_quantize_buffers, quantize_staged, single, Backend,
    Band, Job, Part, Sink, Step,
};
use crate::error::{Error, Result};
use crate::layout::quant::Quantize;
use crate::layout::{Cast, Gather};

pub use device::{list_adapters, open as open_device, AdapterReport, GpuOptions, ADAPTER_ENV};
internal! {
pub use kernel::KernelKind;
}

/// Pieces in flight: one uploading, one computing/reading back.
const PIPELINE_DEPTH: usize = 2;
/// Default piece size: large enough that per-submit costs vanish, small enough that a
/// tensor of a few hundred MiB still streams through several overlapping pieces.
const CHUNK_TARGET: usize = 32 << 20;
/// Extra source-window bytes allowed beyond the chunk size, for the word rounding.
const WINDOW_ROOM: usize = 256;
/// Cap on any piece so every element and word index fits the shaders' u32.
const CHUNK_CAP: u64 = 1 << 30;

/// A GPU device ready to run gathers.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    kernels: kernel::Kernels,
    name: String,
    /// Largest output or window of one piece, in bytes.
    chunk: usize,
    /// Largest source window of one piece: the chunk plus room for the word rounding,
    /// so a window of exactly one chunk is not halved for want of a few bytes.
    window: usize,
    /// Largest buffer one binding may see, in bytes.
    binding: usize,
    /// Largest held source window: one binding, or the window under the test hook so
    /// small tensors are held in many windows.
    held_limit: usize,
    max_groups: u32,
    /// Validation or out-of-memory errors raised outside an error scope, and device loss.
    faults: Arc<Mutex<Vec<String>>>,
    slots: Mutex<Vec<Slot>>,
    /// Bytes written into upload buffers and mapped back, since the device was opened.
    uploaded: AtomicU64,
    read_back: AtomicU64,
    /// Jobs whose source was found already uploaded when they began (uploaded behind
    /// the job before them), and jobs whose first pieces were already in flight.
    prefetched: AtomicU64,
    carried_tensors: AtomicU64,
}

/// A part's first pieces, submitted while the part before it finished, still in flight
/// in the ring.
struct Carried {
    /// Band of each piece in flight, oldest first; the slot of the oldest.
    in_flight: VecDeque<usize>,
    oldest: usize,
    /// Pieces of the part's plan submitted so far (its first ones).
    submitted: usize,
}

/// A part's source windows, uploaded once for all its bands.
struct Held {
    /// Byte ranges of the source (start, end) and their device copies, by start.
    windows: Vec<(usize, usize, wgpu::Buffer)>,
}

impl Held {
    /// Device bytes its windows take.
    fn bytes(&self) -> usize {
        self.windows.iter().map(|w| w.1 - w.0).sum()
    }
}

/// Largest source kept on the device for one tensor; larger ones stream per band.
const HELD_BUDGET: usize = 1 << 30;

/// One stage of the pipeline: its buffers and, while in flight, the piece it carries.
struct Slot {
    params: wgpu::Buffer,
    input: wgpu::Buffer,
    output: wgpu::Buffer,
    readback: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    /// The cast pass of a converting gather: its uniform block, its output, and the bind
    /// groups reading the gather's output or, for a contiguous piece, the upload itself.
    cast_params: wgpu::Buffer,
    cast_out: wgpu::Buffer,
    cast_group: wgpu::BindGroup,
    direct_group: wgpu::BindGroup,
    pending: Option<Pending>,
}

struct Pending {
    piece: chunk::Piece,
    /// Bytes per element of what was read back (the cast's target when converting).
    out_elem: usize,
    /// Bytes mapped for readback (output rounded up to words).
    mapped: u64,
    submission: wgpu::SubmissionIndex,
    mapped_ok: Arc<Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>>,
}

fn gpu_err(detail: impl Into<String>) -> Error {
    Error::Gpu {
        detail: detail.into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves no half-written GPU state that matters: the
    // next gather re-checks every slot.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Gpu {
    /// Opens the adapter `opts` asks for. Errors with [`Error::DeviceUnavailable`] when
    /// there is none.
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        let (device, queue) = device::open(opts)?;
        Gpu::with_device(device, queue, opts)
    }

    /// Runs on a device the caller opened (tests, embedders). Only `max_chunk_bytes` of
    /// `opts` is used.
    pub fn with_device(device: wgpu::Device, queue: wgpu::Queue, opts: &GpuOptions) -> Result<Gpu> {
        // Staging through workgroup memory pays on GPUs only (see transpose2d.wgsl).
        let staged = device.adapter_info().device_type != wgpu::DeviceType::Cpu;
        Gpu::build(device, queue, opts, staged)
    }

    internal! {
    /// Test hook: [`Gpu::new`] with transpose2d.wgsl's staging forced on or off, so both
    /// variants are checked on any adapter.
    pub fn with_staging(opts: &GpuOptions, staged: bool) -> Result<Gpu> {
        let (device, queue) = device::open(opts)?;
        Gpu::build(device, queue, opts, staged)
    }
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        opts: &GpuOptions,
        staged: bool,
    ) -> Result<Gpu> {
        let faults = Arc::new(Mutex::new(Vec::new()));
        {
            let f = faults.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                lock(&f).push(e.to_string());
            }));
            let f = faults.clone();
            device.set_device_lost_callback(move |reason, msg| {
                lock(&f).push(format!("device lost ({reason:?}): {msg}"));
            });
        }
        let limits = device.limits();
        let binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            .min(CHUNK_CAP);
        // Keep every buffer a whole number of words.
        let binding = usize::try_from(binding & !255).unwrap_or(usize::MAX);
        let want = opts.max_chunk_bytes.unwrap_or(CHUNK_TARGET);
        let chunk = want.max(chunk::MIN_CHUNK).min(binding);
        // The test hook keeps windows as tight as it asks, to exercise window splits.
        let window = match opts.max_chunk_bytes {
            Some(_) => chunk,
            None => chunk.saturating_add(WINDOW_ROOM).min(binding),
        };
        let info = device.adapter_info();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = kernel::Kernels::new(&device, staged);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(format!("building the shaders failed: {e}")));
        }
        let mut gpu = Gpu {
            name: format!("gpu ({}, {:?})", info.name, info.backend),
            chunk,
            window,
            binding,
            held_limit: if opts.max_chunk_bytes.is_some() {
                window
            } else {
                binding
            },
            max_groups: limits.max_compute_workgroups_per_dimension,
            faults,
            slots: Mutex::new(Vec::new()),
            uploaded: AtomicU64::new(0),
            read_back: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            carried_tensors: AtomicU64::new(0),
            kernels,
            device,
            queue,
        };
        let slots = (0..PIPELINE_DEPTH).map(|_| gpu.slot(256, 256)).collect();
        gpu.slots = Mutex::new(slots);
        Ok(gpu)
    }

    /// Uploads the windows `g`'s bands will read, when its source fits `budget` bytes
    /// (`None` for a copy, an invalid gather or a source too large: it then streams).
    fn upload_held(&self, g: &Gather, src: &[u8], budget: usize) -> Result<Option<Held>> {
        if g.is_empty() || g.is_copy() || g.validate().is_err() {
            return Ok(None);
        }
        let Some(ranges) = chunk::held_windows(g, self.held_limit, budget) else {
            return Ok(None);
        };
        if ranges.last().is_some_and(|&(_, end)| end > src.len()) {
            return Err(gpu_err("tensor source outside the source"));
        }
        use wgpu::BufferUsages as U;
        let mut windows = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            let size = ((end - start) as u64).next_multiple_of(4).max(4);
            let buffer = self.buffer("held source", size, U::STORAGE | U::COPY_DST);
            self.upload(&buffer, 0, &src[start..end]);
            windows.push((start, end, buffer));
        }
        Ok(Some(Held { windows }))
    }

    /// Uploads a part's windows (within `budget` bytes) and submits, so the copy is
    /// queued behind the work already submitted: the part that follows the one running
    /// finds them in place.
    fn prefetch(&self, part: &Part<'_>, budget: usize) -> Result<Option<Held>> {
        let held = self.upload_held(part.gather(), part.src(), budget)?;
        if held.is_some() {
            self.queue.submit([]);
        }
        Ok(held)
    }

    internal! {
    /// Parts whose source was found already uploaded when they began (each part's
    /// upload is queued behind the one before it).
    pub fn prefetched_tensors(&self) -> u64 {
        self.prefetched.load(Ordering::Relaxed)
    }
    }

    internal! {
    /// Parts whose first pieces were already in flight when their bands began (started
    /// while the part before them finished).
    pub fn carried_tensors(&self) -> u64 {
        self.carried_tensors.load(Ordering::Relaxed)
    }
    }

    internal! {
    /// Whether any piece is in flight now: never, between calls (a run leaves its ring
    /// drained whether it ends, fails or is stopped).
    pub fn has_carried_pieces(&self) -> bool {
        lock(&self.slots).iter().any(|s| s.pending.is_some())
    }
    }

    /// The largest output or source window one piece may have, in bytes.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk
    }

    /// Runs `g` (then `cast`, if any) over `src` into a new device buffer holding exactly
    /// the converted tensor (padded to a whole word), usable as `STORAGE`, `COPY_SRC` and
    /// `COPY_DST`: nothing is read back. The source window is uploaded once. A tensor
    /// whose window or output exceeds one binding is computed piece by piece through the
    /// host and uploaded (counted as traffic either way).
    pub fn gather_to_buffer(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        src: &[u8],
    ) -> Result<wgpu::Buffer> {
        use wgpu::BufferUsages as U;
        g.validate()?;
        let out_len = match cast {
            Some(c) => crate::backend::cast_out_bytes(g, c),
            None => g.out_bytes(),
        };
        let words = |n: usize| (n as u64).next_multiple_of(4).max(4);
        let out = self.buffer(
            "tensor",
            words(out_len),
            U::STORAGE | U::COPY_SRC | U::COPY_DST,
        );
        if g.is_empty() {
            return Ok(out);
        }
        let es = g.elem_size;
        let (lo, hi) = (g.offset * es, g.src_extent() * es);
        let window = src
            .get(lo..hi)
            .ok_or_else(|| gpu_err("tensor source outside the source"))?;
        let mut local = g.clone();
        local.offset = 0;
        if !self.fits_on_device(g, cast, window.len()) {
            let mut host = vec![0u8; out_len];
            match cast {
                Some(c) => self.gather_cast(g, c, src, &mut host)?,
                None => self.gather(g, src, &mut host)?,
            }
            self.upload(&out, 0, &host);
            return Ok(out);
        }
        if cast.is_none() && local.is_copy() {
            self.upload(&out, 0, window);
            return Ok(out);
        }
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = self.gather_on_device(&local, cast, window, &out);
        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        if let Some(e) = oom.or(validation) {
            return Err(gpu_err(e.to_string()));
        }
        result?;
        self.check_faults()?;
        Ok(out)
    }

    /// Whether [`Gpu::gather_to_buffer`] computes `g` on the device in one go: its
    /// source window (`window` bytes) and output fit one binding each.
    fn fits_on_device(&self, g: &Gather, cast: Option<Cast>, window: usize) -> bool {
        let words = |n: usize| n.next_multiple_of(4).max(4);
        let out_len = match cast {
            Some(c) => crate::backend::cast_out_bytes(g, c),
            None => g.out_bytes(),
        };
        words(window) <= self.binding
            && words(g.out_bytes().max(out_len)) <= self.binding
            && g.shape.len() <= chunk::MAX_RANK
    }

    /// Quantizes `g` (cast by `cast`) on the device when the op is affine and the
    /// piece fits the device's bindings: the gathered values stay there, quantize.wgsl
    /// packs each group's codes and computes its scale and bias in f32, and only those
    /// are read back (the scales and biases rounded to the weight's dtype here, a few
    /// bytes per group). Returns false, having done nothing, when it does not apply.
    fn quantize_on_device(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        op: &Quantize,
        src: &[u8],
        dsts: &mut [&mut [u8]],
    ) -> Result<bool> {
        use crate::layout::quant::{store, QuantMode};
        use wgpu::BufferUsages as U;
        let q = op.quant();
        if q.mode() != QuantMode::Affine || g.is_empty() {
            return Ok(false);
        }
        let es = g.elem_size;
        let window = (g.src_extent() - g.offset) * es;
        let groups = g.len() / q.group_size();
        let wpg = q.words_per_group();
        let out_words = groups * (wpg + 2);
        if !self.fits_on_device(g, cast, window)
            || out_words * 4 > self.binding
            || u32::try_from(out_words).is_err()
        {
            return Ok(false);
        }
        check_quantize_buffers(g, cast, op, src, dsts)?;
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let run = || -> Result<Vec<u8>> {
            let values = self.gather_to_buffer(g, cast, src)?;
            let (d, words) = kernel::quantize_dispatch(g.len(), op, self.max_groups)?;
            let out = self.buffer("quantized", (words * 4) as u64, U::STORAGE | U::COPY_SRC);
            let params = self.buffer(
                "quantize params",
                (kernel::PARAMS_WORDS * 4) as u64,
                U::UNIFORM | U::COPY_DST,
            );
            self.queue
                .write_buffer(&params, 0, bytemuck::cast_slice(&d.params));
            let group = self.bind_group(&params, &values, &out);
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("quantize"),
                });
            self.record(&mut encoder, &group, KernelKind::Quantize, 4, &d);
            self.queue.submit([encoder.finish()]);
            let mut host = vec![0u8; words * 4];
            self.read_buffer(&out, &mut host, "quantized output")?;
            self.read_back
                .fetch_add(host.len() as u64, Ordering::Relaxed);
            Ok(host)
        };
        let host = run();
        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        if let Some(e) = oom.or(validation) {
            return Err(gpu_err(e.to_string()));
        }
        let host = host?;
        self.check_faults()?;
        let (packed, pairs) = host.split_at(groups * wpg * 4);
        let ss = op.dtype().size();
        let mut outs = dsts.iter_mut();
        if op.emits(0) {
            let d = outs
                .next()
                .ok_or_else(|| gpu_err("no buffer for the packed words"))?;
            d.copy_from_slice(packed);
        }
        for k in [1usize, 2] {
            if !op.emits(k) {
                continue;
            }
            let d = outs
                .next()
                .ok_or_else(|| gpu_err("no buffer for the scales"))?;
            for (pair, out) in pairs.chunks_exact(8).zip(d.chunks_exact_mut(ss)) {
                let at = (k - 1) * 4;
                let bits = u32::from_le_bytes([pair[at], pair[at + 1], pair[at + 2], pair[at + 3]]);
                store(op.dtype(), f32::from_bits(bits), out);
            }
        }
        Ok(true)
    }

    fn gather_on_device(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        window: &[u8],
        out: &wgpu::Buffer,
    ) -> Result<()> {
        use wgpu::BufferUsages as U;
        let words = |n: usize| (n as u64).next_multiple_of(4).max(4);
        let input = self.buffer(
            "tensor source",
            words(window.len()),
            U::STORAGE | U::COPY_DST,
        );
        self.upload(&input, 0, window);
        let params = |d: &kernel::Dispatch| {
            let b = self.buffer(
                "params",
                (kernel::PARAMS_WORDS * 4) as u64,
                U::UNIFORM | U::COPY_DST,
            );
            self.queue
                .write_buffer(&b, 0, bytemuck::cast_slice(&d.params));
            b
        };
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("tensor"),
            });
        // The gather writes the output, or the intermediate the cast then reads; a
        // contiguous tensor is cast straight from its upload, and a plane the fused
        // kernel takes is transposed and cast in one pass.
        let fused = cast.and_then(|c| kernel::fused_cast(g, c, self.max_groups));
        let gathered = match cast {
            Some(_) if g.is_copy() || fused.is_some() => None,
            Some(_) => Some(self.buffer("gathered", words(g.out_bytes()), U::STORAGE)),
            None => None,
        };
        let mut keep = Vec::new();
        if let (Some(c), Some(kind)) = (cast, fused) {
            let d = kernel::dispatch(g, kind, self.max_groups)?;
            let p = params(&d);
            let group = self.bind_group(&p, &input, out);
            self.record(&mut encoder, &group, kind, c.from().size(), &d);
            keep.push(p);
        } else {
            if cast.is_none() || gathered.is_some() {
                let kind = kernel::choose(g);
                let d = kernel::dispatch(g, kind, self.max_groups)?;
                let p = params(&d);
                let target = gathered.as_ref().unwrap_or(out);
                let group = self.bind_group(&p, &input, target);
                self.record(&mut encoder, &group, kind, g.elem_size, &d);
                keep.push(p);
            }
            if let Some(c) = cast {
                let d = kernel::cast_dispatch(g.len(), c, self.max_groups)?;
                let p = params(&d);
                let group = self.bind_group(&p, gathered.as_ref().unwrap_or(&input), out);
                self.record(
                    &mut encoder,
                    &group,
                    KernelKind::Cast(c),
                    c.from().size(),
                    &d,
                );
                keep.push(p);
            }
        }
        let index = self.queue.submit([encoder.finish()]);
        self.wait(index)
    }

    /// The largest buffer one shader binding may see on this device, in bytes.
    pub fn binding_bytes(&self) -> usize {
        self.binding
    }

    fn buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    fn slot(&self, in_size: u64, out_size: u64) -> Slot {
        use wgpu::BufferUsages as U;
        let params = self.buffer(
            "params",
            (kernel::PARAMS_WORDS * 4) as u64,
            U::UNIFORM | U::COPY_DST,
        );
        let input = self.buffer("input", in_size, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        let output_buf = self.buffer("output", out_size, U::STORAGE | U::COPY_SRC);
        let readback = self.buffer("readback", in_size.max(out_size), U::MAP_READ | U::COPY_DST);
        let bind_group = self.bind_group(&params, &input, &output_buf);
        let cast_params = self.buffer(
            "cast params",
            (kernel::PARAMS_WORDS * 4) as u64,
            U::UNIFORM | U::COPY_DST,
        );
        let cast_out = self.buffer("cast output", out_size, U::STORAGE | U::COPY_SRC);
        let cast_group = self.bind_group(&cast_params, &output_buf, &cast_out);
        let direct_group = self.bind_group(&cast_params, &input, &cast_out);
        Slot {
            params,
            input,
            output: output_buf,
            readback,
            bind_group,
            cast_params,
            cast_out,
            cast_group,
            direct_group,
            pending: None,
        }
    }

    fn bind_group(
        &self,
        params: &wgpu::Buffer,
        input: &wgpu::Buffer,
        output: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("relayout"),
            layout: &self.kernels.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: params.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: input.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: output.as_entire_binding(),
                },
            ],
        })
    }

    /// Writes `bytes` into `buffer` at `at` (the last partial word zero-padded), counted
    /// as upload traffic.
    fn upload(&self, buffer: &wgpu::Buffer, at: u64, bytes: &[u8]) {
        let whole = bytes.len() & !3;
        self.uploaded
            .fetch_add(bytes.len().next_multiple_of(4) as u64, Ordering::Relaxed);
        if whole > 0 {
            self.queue.write_buffer(buffer, at, &bytes[..whole]);
        }
        if whole < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.queue.write_buffer(buffer, at + whole as u64, &tail);
        }
    }

    /// Grows a slot's buffers to hold `input` and `output` bytes; sizes round up to a
    /// power of two (capped at the chunk size) so a sequence of tensors settles quickly.
    fn ensure(&self, slot: &mut Slot, input: u64, output: u64) {
        let grow = |have: u64, need: u64| -> Option<u64> {
            if have >= need {
                return None;
            }
            let cap = (self.window as u64).next_multiple_of(4).max(need);
            Some(need.next_power_of_two().min(cap))
        };
        let new_in = grow(slot.input.size(), input);
        let new_out = grow(slot.output.size(), output);
        if new_in.is_none() && new_out.is_none() {
            return;
        }
        use wgpu::BufferUsages as U;
        if let Some(n) = new_in {
            slot.input = self.buffer("input", n, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        }
        if let Some(n) = new_out {
            slot.output = self.buffer("output", n, U::STORAGE | U::COPY_SRC);
        }
        let rb = slot.input.size().max(slot.output.size());
        if slot.readback.size() < rb {
            slot.readback = self.buffer("readback", rb, U::MAP_READ | U::COPY_DST);
        }
        slot.bind_group = self.bind_group(&slot.params, &slot.input, &slot.output);
        slot.cast_group = self.bind_group(&slot.cast_params, &slot.output, &slot.cast_out);
        slot.direct_group = self.bind_group(&slot.cast_params, &slot.input, &slot.cast_out);
    }

    /// Grows a slot's cast output (and the readback behind it) to `bytes`.
    fn ensure_cast(&self, slot: &mut Slot, bytes: u64) {
        if slot.cast_out.size() >= bytes {
            return;
        }
        use wgpu::BufferUsages as U;
        let size = bytes
            .next_power_of_two()
            .min(self.binding as u64)
            .max(bytes);
        slot.cast_out = self.buffer("cast output", size, U::STORAGE | U::COPY_SRC);
        if slot.readback.size() < size {
            slot.readback = self.buffer("readback", size, U::MAP_READ | U::COPY_DST);
        }
        slot.cast_group = self.bind_group(&slot.cast_params, &slot.output, &slot.cast_out);
        slot.direct_group = self.bind_group(&slot.cast_params, &slot.input, &slot.cast_out);
    }

    fn check_faults(&self) -> Result<()> {
        let faults = lock(&self.faults);
        match faults.first() {
            Some(f) => Err(gpu_err(f.clone())),
            None => Ok(()),
        }
    }

    /// Runs `g` piece by piece with `kernel` choosing each piece's shader; `None` moves
    /// the source window straight to the readback (the transfer-only baseline, which
    /// needs `g` to be a copy).
    /// With `cast`, each piece's gathered elements are converted on the device before
    /// the readback, and `dst` holds the converted elements.
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        slots: &mut [Slot],
        held: Option<&Held>,
        g: &Gather,
        src: &[u8],
        dst: &mut [u8],
        kernel: Option<fn(&Gather) -> KernelKind>,
        cast: Option<Cast>,
    ) -> Result<()> {
        self.check_faults()?;
        let held_pieces = match (held, kernel) {
            (Some(h), Some(_)) => chunk::held_pieces(g, &h.windows, self.held_piece_bytes(cast)),
            _ => None,
        };
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = match (held_pieces, held) {
            (Some(pieces), Some(h)) => self.run_pieces(slots, g, pieces, dst, kernel, cast, |w| {
                Input::Held(&h.windows[w].2)
            }),
            _ => self.stream_pieces(slots, g, src, dst, kernel, cast),
        };
        // Whatever happened, leave no slot mapped or in flight for the next call.
        let drained = self.drain(slots, None);
        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        if let Some(e) = oom.or(validation) {
            return Err(gpu_err(e.to_string()));
        }
        result?;
        drained?;
        self.check_faults()
    }

    fn stream_pieces(
        &self,
        slots: &mut [Slot],
        g: &Gather,
        src: &[u8],
        dst: &mut [u8],
        kernel: Option<fn(&Gather) -> KernelKind>,
        cast: Option<Cast>,
    ) -> Result<()> {
        let pieces = chunk::plan(g, self.chunk_for(cast), self.window)
            .into_iter()
            .map(|p| (usize::MAX, p))
            .collect();
        self.run_pieces(slots, g, pieces, dst, kernel, cast, |_| Input::Upload(src))
    }

    /// Every band's pieces from the held windows, in order: (band, window, piece); `None`
    /// when some band cannot be served from them (it then runs band by band).
    fn band_pieces(
        &self,
        bands: &[Band],
        windows: &[(usize, usize, wgpu::Buffer)],
        cast: Option<Cast>,
    ) -> Option<Vec<(usize, usize, chunk::Piece)>> {
        let quarter = self.held_piece_bytes(cast);
        let mut out = Vec::new();
        for (b, g) in bands.iter().map(Band::gather).enumerate() {
            if g.is_empty() || g.validate().is_err() {
                return None;
            }
            for (w, p) in chunk::held_pieces(g, windows, quarter)? {
                out.push((b, w, p));
            }
        }
        Some(out)
    }

    /// Streams every band of `part` (job `job`), each served from its held windows by
    /// `pieces`, through the ring without a drain between bands: a band's slice is asked
    /// of `sink` when its first piece comes back, and `progress` hears of it once its
    /// last piece has (pieces finish in the order they were submitted). `carried`: this
    /// part's first pieces, submitted while the part before it finished. Once its own
    /// pieces are all submitted, the next part's windows are uploaded (`next`: the part,
    /// its cast and the device bytes it may hold) and, while this part's last pieces come
    /// back, its first pieces fill the freed slots; the windows and those pieces, still
    /// in flight, are returned for it.
    #[allow(clippy::too_many_arguments)]
    fn run_bands(
        &self,
        slots: &mut [Slot],
        job: usize,
        part: &Part<'_>,
        cast: Option<Cast>,
        pieces: Vec<(usize, usize, chunk::Piece)>,
        held: &Held,
        carried: Option<Carried>,
        next: Option<(&Part<'_>, Option<Cast>, usize)>,
        sink: &mut dyn Sink,
        progress: &mut dyn FnMut(Step) -> Result<()>,
    ) -> Result<(Option<Held>, Option<Carried>)> {
        let depth = slots.len();
        let bands = part.bands();
        // Pieces in flight, oldest first: (of the next part?, band), the oldest in slot
        // `oldest`.
        let (mut in_flight, mut oldest, mut submitted) = match carried {
            Some(c) => (
                c.in_flight.iter().map(|&b| (false, b)).collect(),
                c.oldest,
                c.submitted,
            ),
            None => (VecDeque::new(), 0, 0),
        };
        let total = pieces.len();
        let mut pieces = pieces.into_iter().skip(submitted);
        let mut next = next;
        let mut next_held: Option<Held> = None;
        let mut next_cast = None;
        let mut next_pieces = Vec::new().into_iter();
        let mut next_submitted = 0;
        let mut current: Option<usize> = None;
        let mut dst: Option<&mut [u8]> = None;
        loop {
            if submitted == total {
                if let Some((n, n_cast, budget)) = next.take() {
                    // Queued behind this part's last kernels: the device uploads the
                    // next part while the host collects this one's last pieces.
                    next_held = self.prefetch(n, budget)?;
                    next_cast = n_cast;
                    if let Some(h) = &next_held {
                        if let Some(p) = self.band_pieces(n.bands(), &h.windows, n_cast) {
                            next_pieces = p.into_iter();
                        }
                    }
                }
            }
            let more = submitted < total || next_pieces.len() > 0;
            match in_flight.front() {
                Some(&(false, b)) if in_flight.len() == depth || !more => {
                    in_flight.pop_front();
                    let band = bands.get(b).ok_or_else(|| gpu_err("no such band"))?;
                    if current != Some(b) {
                        if let Some(c) = current.and_then(|c| bands.get(c)) {
                            progress(Step::Band {
                                job,
                                bytes: c.bytes(),
                            })?;
                        }
                        dst = Some(single(sink.band(job, band.spans())?)?);
                        current = Some(b);
                    }
                    let slot = slots
                        .get_mut(oldest)
                        .ok_or_else(|| gpu_err("no pipeline slot"))?;
                    let out = dst.as_deref_mut().map(|d| (d, band.gather()));
                    self.finish(slot, out)?;
                    oldest = (oldest + 1) % depth;
                    continue;
                }
                // Every piece of this part is back (what is in flight is the next's).
                Some(&(true, _)) | None if submitted == total => break,
                _ => {}
            }
            let k = (oldest + in_flight.len()) % depth;
            let slot = slots
                .get_mut(k)
                .ok_or_else(|| gpu_err("no pipeline slot"))?;
            if let Some((b, w, piece)) = pieces.next() {
                let window = &held
                    .windows
                    .get(w)
                    .ok_or_else(|| gpu_err("no such window"))?
                    .2;
                self.submit(slot, piece, Input::Held(window), Some(kernel::choose), cast)?;
                in_flight.push_back((false, b));
                submitted += 1;
            } else if let (Some((b, w, piece)), Some(h)) = (next_pieces.next(), &next_held) {
                let window = &h.windows.get(w).ok_or_else(|| gpu_err("no such window"))?.2;
                self.submit(
                    slot,
                    piece,
                    Input::Held(window),
                    Some(kernel::choose),
                    next_cast,
                )?;
                in_flight.push_back((true, b));
                next_submitted += 1;
            } else {
                return Err(gpu_err("nothing left to submit or finish"));
            }
        }
        if let Some(c) = current.and_then(|c| bands.get(c)) {
            progress(Step::Band {
                job,
                bytes: c.bytes(),
            })?;
        }
        let carried = (next_submitted > 0).then(|| Carried {
            in_flight: in_flight.iter().map(|&(_, b)| b).collect(),
            oldest,
            submitted: next_submitted,
        });
        Ok((next_held, carried))
    }

    /// Every job's parts in order through the ring, in one pass: each part's source is
    /// uploaded once (queued behind the part before it where it fits beside it) and its
    /// bands served from the device; a part that cannot be held streams band by band.
    fn run_jobs(
        &self,
        slots: &mut [Slot],
        jobs: &[Job<'_>],
        sink: &mut dyn Sink,
        progress: &mut dyn FnMut(Step) -> Result<()>,
    ) -> Result<()> {
        let parts: Vec<(usize, &Part<'_>)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| job.parts().iter().map(move |p| (j, p)))
            .collect();
        // The next part's windows, uploaded behind this one, and its first pieces.
        let mut prefetched: Option<(usize, Held)> = None;
        let mut carried: Option<Carried> = None;
        // Jobs whose completion has been reported.
        let mut done = 0;
        for (u, &(j, part)) in parts.iter().enumerate() {
            // A job of no parts is complete as soon as the jobs before it are.
            for empty in done..j {
                sink.job_done(empty)?;
                progress(Step::Job { job: empty })?;
            }
            done = j;
            let cast = jobs.get(j).and_then(Job::cast);
            let quantize = jobs.get(j).and_then(Job::quantize);
            let held = match prefetched.take() {
                Some((p, h)) if p == u => {
                    self.prefetched.fetch_add(1, Ordering::Relaxed);
                    Some(h)
                }
                _ => self.upload_held(part.gather(), part.src(), HELD_BUDGET)?,
            };
            let next = parts
                .get(u + 1)
                .map(|&(nj, np)| (np, jobs.get(nj).and_then(Job::cast)));
            let budget = HELD_BUDGET.saturating_sub(held.as_ref().map_or(0, Held::bytes));
            // Quantized bands are gathered (and cast) on the device, then quantized on
            // the host.
            let pieces = held
                .as_ref()
                .filter(|_| quantize.is_none())
                .and_then(|h| self.band_pieces(part.bands(), &h.windows, cast));
            match (pieces, &held) {
                (Some(pieces), Some(h)) => {
                    self.check_faults()?;
                    if carried.is_some() {
                        self.carried_tensors.fetch_add(1, Ordering::Relaxed);
                    }
                    let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
                    let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                    let result = self.run_bands(
                        slots,
                        j,
                        part,
                        cast,
                        pieces,
                        h,
                        carried.take(),
                        next.map(|(np, nc)| (np, nc, budget)),
                        sink,
                        progress,
                    );
                    let oom = pollster::block_on(oom.pop());
                    let validation = pollster::block_on(validation.pop());
                    if let Some(e) = oom.or(validation) {
                        return Err(gpu_err(e.to_string()));
                    }
                    let (next_held, next_carried) = result?;
                    prefetched = next_held.map(|h| (u + 1, h));
                    carried = next_carried;
                    self.check_faults()?;
                }
                _ => {
                    // Pieces are carried only into a part served from its windows.
                    if carried.take().is_some() {
                        self.drain(slots, None)?;
                    }
                    // Streamed or copied on the host: the device is free for the next
                    // upload now.
                    prefetched = match next {
                        Some((np, _)) => self.prefetch(np, budget)?.map(|h| (u + 1, h)),
                        None => None,
                    };
                    let mut stage = Vec::new();
                    for band in part.bands() {
                        let mut dsts = sink.band(j, band.spans())?;
                        if let Some(q) = quantize {
                            // On the device where quantize.wgsl takes it (affine, within
                            // one binding); else gathered there and quantized here.
                            if !self.quantize_on_device(
                                band.gather(),
                                cast,
                                q,
                                part.src(),
                                &mut dsts,
                            )? {
                                let device = DeviceGather {
                                    gpu: self,
                                    slots: Mutex::new(&mut *slots),
                                    held: held.as_ref(),
                                };
                                quantize_staged(
                                    &device,
                                    band.gather(),
                                    cast,
                                    q,
                                    part.src(),
                                    &mut dsts,
                                    true,
                                    &mut stage,
                                )?;
                            }
                        } else {
                            self.gather_with(
                                slots,
                                held.as_ref(),
                                band.gather(),
                                cast,
                                part.src(),
                                single(dsts)?,
                            )?;
                        }
                        progress(Step::Band {
                            job: j,
                            bytes: band.bytes(),
                        })?;
                    }
                }
            }
            if parts.get(u + 1).is_none_or(|&(nj, _)| nj != j) {
                sink.job_done(j)?;
                progress(Step::Job { job: j })?;
                done = j + 1;
            }
        }
        for empty in done..jobs.len() {
            sink.job_done(empty)?;
            progress(Step::Job { job: empty })?;
        }
        Ok(())
    }

    /// One gather (converted by `cast`) into `dst`, its pieces served from `held` where
    /// they lie in its windows, streamed otherwise; a plain contiguous copy stays on the
    /// host.
    fn gather_with(
        &self,
        slots: &mut [Slot],
        held: Option<&Held>,
        g: &Gather,
        cast: Option<Cast>,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        match cast {
            Some(c) => check_cast_buffers(g, c, src, dst)?,
            None => check_buffers(g, src, dst)?,
        }
        if g.is_empty() {
            return Ok(());
        }
        if cast.is_none() && g.is_copy() {
            // One contiguous run: a round trip through the device would move the same
            // bytes three times over for nothing (copy.wgsl is tested on its own).
            let start = g.offset * g.elem_size;
            let from = src
                .get(start..start + dst.len())
                .ok_or_else(|| gpu_err("copy source outside the source"))?;
            dst.copy_from_slice(from);
            return Ok(());
        }
        // Gather and cast run back to back on the device: one upload, one readback.
        self.stream(slots, held, g, src, dst, Some(kernel::choose), cast)
    }

    /// Most gathered bytes per piece of a held source: quarter chunks, so with nothing to
    /// upload a band still streams through both slots, one piece's readback overlapping
    /// the next one's kernel.
    fn held_piece_bytes(&self, cast: Option<Cast>) -> usize {
        (self.chunk_for(cast) / 4).max(chunk::MIN_CHUNK)
    }

    /// Most gathered bytes per piece: a widening cast's output is larger than the
    /// gathered piece, so its pieces shrink until the converted output fits one chunk.
    fn chunk_for(&self, cast: Option<Cast>) -> usize {
        match cast {
            Some(c) if c.to().size() > c.from().size() => {
                (self.chunk / c.to().size() * c.from().size()).max(chunk::MIN_CHUNK)
            }
            _ => self.chunk,
        }
    }

    /// Runs `pieces` (each with the held window it reads, if any) through the ring of
    /// slots, results scattered into `dst`.
    #[allow(clippy::too_many_arguments)]
    fn run_pieces<'i>(
        &self,
        slots: &mut [Slot],
        g: &Gather,
        pieces: Vec<(usize, chunk::Piece)>,
        dst: &mut [u8],
        kernel: Option<fn(&Gather) -> KernelKind>,
        cast: Option<Cast>,
        input: impl Fn(usize) -> Input<'i>,
    ) -> Result<()> {
        let depth = slots.len();
        for (i, (window, piece)) in pieces.into_iter().enumerate() {
            let Some(slot) = slots.get_mut(i % depth) else {
                return Err(gpu_err("no pipeline slot"));
            };
            self.finish(slot, Some((&mut *dst, g)))?;
            self.submit(slot, piece, input(window), kernel, cast)?;
        }
        self.drain(slots, Some((dst, g)))
    }

    /// Completes every in-flight piece, oldest first, copying results into `dst` when
    /// given (on the error path they are dropped).
    fn drain(&self, slots: &mut [Slot], mut out: Option<(&mut [u8], &Gather)>) -> Result<()> {
        let mut order: Vec<usize> = (0..slots.len())
            .filter(|&k| slots[k].pending.is_some())
            .collect();
        order.sort_by_key(|&k| slots[k].pending.as_ref().map(|p| p.piece.origin.clone()));
        let mut first_err = Ok(());
        for k in order {
            if let Some(slot) = slots.get_mut(k) {
                let r = self.finish(slot, out.as_mut().map(|(d, g)| (&mut **d, *g)));
                if first_err.is_ok() {
                    first_err = r;
                }
            }
        }
        first_err
    }

    /// Uploads a piece's window and parameters, records the kernel and the copy into the
    /// readback buffer, submits, and asks for the mapping.
    fn submit(
        &self,
        slot: &mut Slot,
        piece: chunk::Piece,
        input: Input<'_>,
        kernel: Option<fn(&Gather) -> KernelKind>,
        cast: Option<Cast>,
    ) -> Result<()> {
        let g = &piece.gather;
        // A contiguous piece is cast straight from its upload: no gather kernel, and no
        // gathered buffer to grow.
        let direct =
            matches!(input, Input::Upload(_)) && kernel.is_some() && cast.is_some() && g.is_copy();
        // A transposed piece is transposed and converted in one pass where cast.wgsl's
        // fused kernel takes its plane.
        let fused = match (kernel, cast) {
            (Some(_), Some(c)) if !direct => kernel::fused_cast(g, c, self.max_groups),
            _ => None,
        };
        let window_words = (piece.window_len as u64).next_multiple_of(4).max(4);
        let out_words = if direct || fused.is_some() {
            4
        } else {
            (g.out_bytes() as u64).next_multiple_of(4).max(4)
        };
        let held = match input {
            Input::Upload(src) => {
                self.ensure(slot, window_words, out_words);
                let end = piece
                    .window_start
                    .checked_add(piece.window_len)
                    .ok_or_else(|| gpu_err("source window overflows"))?;
                let window = src
                    .get(piece.window_start..end)
                    .ok_or_else(|| gpu_err("source window outside the source"))?;
                self.upload(&slot.input, 0, window);
                None
            }
            Input::Held(buffer) => {
                self.ensure(slot, 4, out_words);
                Some(buffer)
            }
        };

        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("piece"),
            });
        let mapped = match (kernel, cast, fused) {
            (Some(_), Some(c), _) if direct => {
                self.record_cast(slot, &mut encoder, c, g.len(), true)?
            }
            (Some(_), Some(c), Some(kind)) => {
                self.record_fused(slot, &mut encoder, c, kind, g, held)?
            }
            (Some(choose), _, _) => {
                let kind = choose(g);
                let d = kernel::dispatch(g, kind, self.max_groups)?;
                self.queue
                    .write_buffer(&slot.params, 0, bytemuck::cast_slice(&d.params));
                let held_group = held.map(|b| self.bind_group(&slot.params, b, &slot.output));
                let group = held_group.as_ref().unwrap_or(&slot.bind_group);
                self.record(&mut encoder, group, kind, g.elem_size, &d);
                match cast {
                    None => {
                        encoder.copy_buffer_to_buffer(
                            &slot.output,
                            0,
                            &slot.readback,
                            0,
                            out_words,
                        );
                        out_words
                    }
                    Some(c) => self.record_cast(slot, &mut encoder, c, g.len(), false)?,
                }
            }
            (None, _, _) if held.is_none() => {
                encoder.copy_buffer_to_buffer(&slot.input, 0, &slot.readback, 0, window_words);
                window_words
            }
            (None, _, _) => return Err(gpu_err("a held source needs a kernel")),
        };
        let submission = self.queue.submit([encoder.finish()]);
        let mapped_ok = Arc::new(Mutex::new(None));
        let flag = mapped_ok.clone();
        slot.readback
            .slice(..mapped)
            .map_async(wgpu::MapMode::Read, move |r| *lock(&flag) = Some(r));
        slot.pending = Some(Pending {
            out_elem: cast.map_or(g.elem_size, |c| c.to().size()),
            piece,
            mapped,
            submission,
            mapped_ok,
        });
        Ok(())
    }

    /// Records the conversion of the `count` gathered elements in the slot's output (the
    /// upload itself when `direct`) into its cast output, and the copy of that into the
    /// readback; returns the bytes to map.
    fn record_cast(
        &self,
        slot: &mut Slot,
        encoder: &mut wgpu::CommandEncoder,
        c: Cast,
        count: usize,
        direct: bool,
    ) -> Result<u64> {
        let words = (count as u64 * c.to().size() as u64)
            .next_multiple_of(4)
            .max(4);
        self.ensure_cast(slot, words);
        let d = kernel::cast_dispatch(count, c, self.max_groups)?;
        self.queue
            .write_buffer(&slot.cast_params, 0, bytemuck::cast_slice(&d.params));
        let from = c.from().size();
        let group = if direct {
            &slot.direct_group
        } else {
            &slot.cast_group
        };
        self.record(encoder, group, KernelKind::Cast(c), from, &d);
        encoder.copy_buffer_to_buffer(&slot.cast_out, 0, &slot.readback, 0, words);
        Ok(words)
    }

    /// Records the fused transpose-and-convert of piece `g` from the slot's upload (or the
    /// held window `held`) into its cast output, and the copy of that into the readback;
    /// returns the bytes to map.
    fn record_fused(
        &self,
        slot: &mut Slot,
        encoder: &mut wgpu::CommandEncoder,
        c: Cast,
        kind: KernelKind,
        g: &Gather,
        held: Option<&wgpu::Buffer>,
    ) -> Result<u64> {
        let words = (g.len() as u64 * c.to().size() as u64)
            .next_multiple_of(4)
            .max(4);
        self.ensure_cast(slot, words);
        let d = kernel::dispatch(g, kind, self.max_groups)?;
        self.queue
            .write_buffer(&slot.cast_params, 0, bytemuck::cast_slice(&d.params));
        let held_group = held.map(|b| self.bind_group(&slot.cast_params, b, &slot.cast_out));
        let group = held_group.as_ref().unwrap_or(&slot.direct_group);
        self.record(encoder, group, kind, c.from().size(), &d);
        encoder.copy_buffer_to_buffer(&slot.cast_out, 0, &slot.readback, 0, words);
        Ok(words)
    }

    /// Records the passes of one dispatch into a compute pass.
    fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bind_group: &wgpu::BindGroup,
        kind: KernelKind,
        elem_size: usize,
        d: &kernel::Dispatch,
    ) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("gather"),
            timestamp_writes: None,
        });
        pass.set_bind_group(0, bind_group, &[]);
        for &(part, (x, y, z)) in &d.passes {
            pass.set_pipeline(self.kernels.pipeline(kind, elem_size, part));
            pass.dispatch_workgroups(x, y, z);
        }
    }

    /// Waits for the slot's piece, copies it into `dst` (when given) and unmaps.
    fn finish(&self, slot: &mut Slot, out: Option<(&mut [u8], &Gather)>) -> Result<()> {
        let Some(p) = slot.pending.take() else {
            return Ok(());
        };
        let polled = self.device.poll(wgpu::PollType::Wait {
            submission_index: Some(p.submission),
            timeout: None,
        });
        let state = lock(&p.mapped_ok).take();
        let result = match (polled, &state) {
            (Err(e), _) => Err(gpu_err(format!("waiting for the device: {e}"))),
            (Ok(_), Some(Ok(()))) => match out {
                Some((dst, g)) => {
                    self.read_back.fetch_add(p.mapped, Ordering::Relaxed);
                    self.scatter(&slot.readback, p.mapped, &p.piece, p.out_elem, g, dst)
                }
                None => Ok(()),
            },
            (Ok(_), Some(Err(e))) => Err(gpu_err(format!("mapping the readback buffer: {e}"))),
            (Ok(_), None) => Err(gpu_err("the readback buffer was never mapped")),
        };
        // Unmapping also cancels a map still pending; a failed map left nothing mapped.
        if !matches!(state, Some(Err(_))) {
            slot.readback.unmap();
        }
        result
    }

    fn scatter(
        &self,
        readback: &wgpu::Buffer,
        mapped: u64,
        piece: &chunk::Piece,
        out_elem: usize,
        g: &Gather,
        dst: &mut [u8],
    ) -> Result<()> {
        let view = readback
            .slice(..mapped)
            .get_mapped_range()
            .map_err(|e| gpu_err(format!("reading the readback buffer: {e}")))?;
        for (d, s, n) in chunk::runs(out_elem, &g.shape, piece) {
            let from = view
                .get(s..s + n)
                .ok_or_else(|| gpu_err("piece result shorter than planned"))?;
            let to = dst
                .get_mut(d..d + n)
                .ok_or_else(|| gpu_err("piece lies outside the output"))?;
            to.copy_from_slice(from);
        }
        Ok(())
    }
}

internal! {
/// A gather kept on the device for benchmarks: source and output stay resident, so
/// [`Resident::run`] times the kernel alone (dispatch plus the wait for the device).
pub struct Resident<'a> {
    gpu: &'a Gpu,
    output: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    kind: KernelKind,
    elem_size: usize,
    dispatch: kernel::Dispatch,
    out_bytes: u64,
}
}

impl Gpu {
    /// The adapter behind this device: (name, driver, backend API, software?).
    pub fn adapter(&self) -> (String, String, String, bool) {
        let info = self.device.adapter_info();
        let driver = format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string();
        (
            info.name.clone(),
            driver,
            format!("{:?}", info.backend),
            info.device_type == wgpu::DeviceType::Cpu,
        )
    }

    /// Time to upload `bytes` into a device buffer, waited for (benchmarks).
    #[cfg(feature = "bench")]
    pub(crate) fn time_upload(&self, bytes: &[u8]) -> Result<std::time::Duration> {
        let size = (bytes.len() as u64).next_multiple_of(4).max(4);
        let buffer = self.buffer("bench upload", size, wgpu::BufferUsages::COPY_DST);
        let started = std::time::Instant::now();
        self.queue
            .write_buffer(&buffer, 0, &bytes[..bytes.len() & !3]);
        let index = self.queue.submit([]);
        self.wait(index)?;
        Ok(started.elapsed())
    }

    /// Time to copy `len` bytes of a device buffer into host memory: copy to a mapped
    /// buffer, map, read (benchmarks).
    #[cfg(feature = "bench")]
    pub(crate) fn time_readback(&self, len: usize) -> Result<std::time::Duration> {
        use wgpu::BufferUsages as U;
        let size = (len as u64).next_multiple_of(4).max(4);
        let source = self.buffer("bench source", size, U::COPY_SRC | U::COPY_DST);
        let mut host = vec![0u8; size as usize];
        let started = std::time::Instant::now();
        self.read_buffer(&source, &mut host, "the benchmark readback")?;
        Ok(started.elapsed())
    }

    /// Fills `dst` (a whole number of words) with the first bytes of `buffer` (a
    /// `COPY_SRC` buffer), copied through a mapped staging buffer; `what` names it in
    /// errors.
    fn read_buffer(&self, buffer: &wgpu::Buffer, dst: &mut [u8], what: &str) -> Result<()> {
        let size = dst.len() as u64;
        let staging = self.buffer(
            "readback",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("read"),
            });
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let done = Arc::new(Mutex::new(None));
        let flag = done.clone();
        staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| *lock(&flag) = Some(r));
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| gpu_err(format!("waiting for the device: {e}")))?;
        if !matches!(lock(&done).take(), Some(Ok(()))) {
            return Err(gpu_err(format!("mapping {what} failed")));
        }
        dst.copy_from_slice(
            &staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| gpu_err(format!("reading {what}: {e}")))?,
        );
        staging.unmap();
        Ok(())
    }

    fn wait(&self, index: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })
            .map_err(|e| gpu_err(format!("waiting for the device: {e}")))?;
        Ok(())
    }

    internal! {
    /// The kernel [`Backend::gather`] runs for a piece like `g`.
    pub fn kernel_for(g: &Gather) -> KernelKind {
        kernel::choose(g)
    }
    }

    internal! {
    /// The kernel that transposes a piece like `g` while converting it with `cast` in one
    /// pass on this device, if any (otherwise the gather kernel and cast.wgsl run in turn).
    pub fn fused_kernel_for(&self, g: &Gather, cast: Cast) -> Option<KernelKind> {
        kernel::fused_cast(g, cast, self.max_groups)
    }
    }

    internal! {
    /// Uploads `src` once and prepares `kind` over `g`, which must fit one binding.
    pub fn resident(&self, g: &Gather, src: &[u8], kind: KernelKind) -> Result<Resident<'_>> {
        let d = kernel::dispatch(g, kind, self.max_groups)?;
        let in_bytes = (src.len() as u64).next_multiple_of(4).max(4);
        let out_len = match kind {
            KernelKind::Cast(c) | KernelKind::TransposeCast(c) => {
                crate::backend::cast_out_bytes(g, c)
            }
            _ => g.out_bytes(),
        };
        let out_bytes = (out_len as u64).next_multiple_of(4).max(4);
        if in_bytes.max(out_bytes) > self.binding as u64 {
            return Err(gpu_err(format!(
                "resident gather of {} bytes exceeds the binding limit {}",
                in_bytes.max(out_bytes),
                self.binding
            )));
        }
        Ok(self.upload_resident(src, in_bytes, out_bytes, kind, g.elem_size, d))
    }
    }

    internal! {
    /// Uploads `values` (contiguous values of `op.dtype()`, whole groups) once and
    /// prepares quantize.wgsl over them (benchmarks); `read` gives the packed words, then
    /// the (scale, bias) f32 pairs.
    pub fn resident_quantize(&self, values: &[u8], op: &crate::layout::quant::Quantize) -> Result<Resident<'_>> {
        let n = values.len() / op.dtype().size();
        let (d, words) = kernel::quantize_dispatch(n, op, self.max_groups)?;
        let in_bytes = (values.len() as u64).next_multiple_of(4).max(4);
        let out_bytes = (words as u64 * 4).max(4);
        if in_bytes.max(out_bytes) > self.binding as u64 {
            return Err(gpu_err("resident quantization exceeds the binding limit"));
        }
        Ok(self.upload_resident(values, in_bytes, out_bytes, KernelKind::Quantize, 4, d))
    }
    }

    /// `src` uploaded (zero-padded to `in_bytes`) with `d`'s uniforms and an output of
    /// `out_bytes`, bound for `kind`: what [`Gpu::resident`] and
    /// [`Gpu::resident_quantize`] hand out.
    #[cfg_attr(not(any(feature = "bench", feature = "internals")), allow(dead_code))]
    fn upload_resident(
        &self,
        src: &[u8],
        in_bytes: u64,
        out_bytes: u64,
        kind: KernelKind,
        elem_size: usize,
        d: kernel::Dispatch,
    ) -> Resident<'_> {
        use wgpu::BufferUsages as U;
        let input = self.buffer("resident input", in_bytes, U::STORAGE | U::COPY_DST);
        let output = self.buffer("resident output", out_bytes, U::STORAGE | U::COPY_SRC);
        let params = self.buffer(
            "resident params",
            (kernel::PARAMS_WORDS * 4) as u64,
            U::UNIFORM | U::COPY_DST,
        );
        let mut padded = src.to_vec();
        padded.resize(in_bytes as usize, 0);
        self.queue.write_buffer(&input, 0, &padded);
        self.queue
            .write_buffer(&params, 0, bytemuck::cast_slice(&d.params));
        let bind_group = self.bind_group(&params, &input, &output);
        Resident {
            gpu: self,
            output,
            bind_group,
            kind,
            elem_size,
            dispatch: d,
            out_bytes,
        }
    }

    internal! {
    /// Upload and readback of `src` into `dst` through the same pieces and slots as a
    /// gather, without a kernel: the transfer baseline of the round trip.
    pub fn transfer(&self, src: &[u8], dst: &mut [u8]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(gpu_err("transfer needs equal lengths"));
        }
        if src.is_empty() {
            return Ok(());
        }
        let g = Gather::from_parts(1, vec![src.len()], vec![1], 0);
        self.stream(&mut lock(&self.slots), None, &g, src, dst, None, None)
    }
    }
}

// Only `relayout bench` and the benches (through `internals`) time resident kernels.
#[cfg_attr(not(any(feature = "bench", feature = "internals")), allow(dead_code))]
impl Resident<'_> {
    /// One dispatch, waited for.
    pub fn run(&self) -> Result<()> {
        let gpu = self.gpu;
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("resident"),
            });
        gpu.record(
            &mut encoder,
            &self.bind_group,
            self.kind,
            self.elem_size,
            &self.dispatch,
        );
        let index = gpu.queue.submit([encoder.finish()]);
        gpu.wait(index)?;
        gpu.check_faults()
    }

    /// The output bytes (word-padded), for checking a benchmark computes the right thing.
    pub fn read(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.out_bytes as usize];
        self.gpu
            .read_buffer(&self.output, &mut out, "the resident output")?;
        Ok(out)
    }
}

/// Where a piece's source comes from.
#[derive(Clone, Copy)]
enum Input<'s> {
    /// The piece's window of this source, uploaded into the slot's input buffer.
    Upload(&'s [u8]),
    /// A window already on the device; the piece's offset is relative to its start.
    Held(&'s wgpu::Buffer),
}

/// The device's gathers over a run's locked ring and a part's held windows, as a
/// backend: what the host's quantization of a band is staged through.
struct DeviceGather<'g, 's> {
    gpu: &'g Gpu,
    slots: Mutex<&'s mut [Slot]>,
    held: Option<&'g Held>,
}

impl Backend for DeviceGather<'_, '_> {
    fn name(&self) -> String {
        self.gpu.name.clone()
    }

    fn gather(&self, g: &Gather, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let mut slots = lock(&self.slots);
        self.gpu
            .gather_with(&mut slots, self.held, g, None, src, dst)
    }

    fn gather_cast(&self, g: &Gather, cast: Cast, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let mut slots = lock(&self.slots);
        self.gpu
            .gather_with(&mut slots, self.held, g, Some(cast), src, dst)
    }
}

impl Backend for Gpu {
    fn gather_quantize(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        op: &Quantize,
        src: &[u8],
        dsts: &mut [&mut [u8]],
    ) -> Result<()> {
        check_quantize_buffers(g, cast, op, src, dsts)?;
        if self.quantize_on_device(g, cast, op, src, dsts)? {
            return Ok(());
        }
        quantize_staged(self, g, cast, op, src, dsts, true, &mut Vec::new())
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn traffic(&self) -> crate::backend::DeviceTraffic {
        crate::backend::DeviceTraffic {
            upload_bytes: self.uploaded.load(Ordering::Relaxed),
            readback_bytes: self.read_back.load(Ordering::Relaxed),
        }
    }

    fn gather_cast(&self, g: &Gather, cast: Cast, src: &[u8], dst: &mut [u8]) -> Result<()> {
        self.gather_with(&mut lock(&self.slots), None, g, Some(cast), src, dst)
    }

    fn gather(&self, g: &Gather, src: &[u8], dst: &mut [u8]) -> Result<()> {
        self.gather_with(&mut lock(&self.slots), None, g, None, src, dst)
    }

    fn run(
        &self,
        jobs: &[Job<'_>],
        sink: &mut dyn Sink,
        progress: &mut dyn FnMut(Step) -> Result<()>,
    ) -> Result<()> {
        self.check_faults()?;
        let mut slots = lock(&self.slots);
        let result = self.run_jobs(&mut slots, jobs, sink, progress);
        // Whatever happened, the ring is empty when the call returns: pieces still in
        // flight (a stopped or failed run's, or the next part's) are dropped unread.
        let drained = self.drain(&mut slots, None);
        result?;
        drained?;
        self.check_faults()
    }
}
