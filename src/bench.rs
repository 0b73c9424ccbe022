//! `relayout bench`: what the conversion's building blocks reach on this machine, as
//! ratios a user can paste into an issue. Every kernel measured is the one `convert`
//! runs (no bench-only code paths): the GPU kernels on resident buffers against the
//! WGSL copy kernel, upload and readback bandwidth, the CPU backend against `memcpy`,
//! and a whole conversion of a generated checkpoint against a plain file copy.
//!
//! The library only measures; the binary prints.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{Gather, LayoutOp};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// `Gpu` measures the GPU kernels and transfers too; `Cpu` only the host; `Auto`
    /// the GPU when a hardware one is found.
    pub device: Device,
    /// GPU adapter (a substring of its name); a named adapter may be a software one.
    pub adapter: Option<String>,
    /// Bytes per kernel case and of the generated checkpoint.
    pub size: usize,
    /// Folder for the end-to-end checkpoint (the system's temporary folder by default);
    /// everything written there is removed afterwards.
    pub dir: Option<PathBuf>,
    /// Least time spent repeating each measurement (the best repetition counts).
    pub min_time: Duration,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            device: Device::Auto,
            adapter: None,
            size: 256 << 20,
            dir: None,
            min_time: Duration::from_millis(300),
        }
    }
}

/// One measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// "transfer", "gpu kernel", "cpu kernel" or "end to end".
    pub group: &'static str,
    pub name: String,
    /// Bytes produced (or moved) per second, in GB/s (10^9).
    pub gb_per_s: f64,
    /// Against `baseline` in the same group and run, when there is one.
    pub ratio: Option<f64>,
    pub baseline: Option<String>,
}

/// The adapter the GPU rows ran on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchAdapter {
    pub name: String,
    pub driver: String,
    pub backend: String,
    pub software: bool,
}

/// Everything `relayout bench` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    pub adapter: Option<BenchAdapter>,
    pub cpu_threads: usize,
    pub size: usize,
    pub rows: Vec<BenchRow>,
}

/// The best of as many runs of `f` as fit in `min_time` (at least two).
fn best(min_time: Duration, mut f: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let started = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 2 || started.elapsed() < min_time {
        best = best.min(f()?);
        runs += 1;
        if runs >= 50 {
            break;
        }
    }
    Ok(best)
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-9) / 1e9
}

/// Pseudo-random bytes (xorshift), so nothing compresses or short-cuts.
fn pattern(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = vec![0u8; n];
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// The layout cases, each about `size` bytes: square-ish transposes of f32, bf16 and u8
/// with power-of-two sides, and OIHW -> HWIO conv kernels (3x3 and 1x1).
fn layout_cases(size: usize) -> Vec<(String, Gather)> {
    let side = |es: usize| {
        let n = ((size / es) as f64).sqrt() as usize;
        (1usize << n.max(2).ilog2()).max(4)
    };
    let mut out = Vec::new();
    for (dtype, es) in [(DType::F32, 4), (DType::BF16, 2), (DType::U8, 1)] {
        let n = side(es);
        let rows = (size / es / n).max(1);
        if let Ok(op) = LayoutOp::contiguous(es, vec![rows, n], vec![1, 0]) {
            out.push((format!("transpose {dtype} {rows}x{n}"), op.simplify()));
        }
    }
    for (dtype, es) in [(DType::F32, 4), (DType::BF16, 2), (DType::U8, 1)] {
        for k in [3usize, 1] {
            // O = I, a multiple of 64 as in a ResNet stage.
            let c = ((((size / es / (k * k)) as f64).sqrt() as usize) / 64 * 64).max(64);
            if let Ok(op) = LayoutOp::contiguous(es, vec![c, c, k, k], vec![2, 3, 1, 0]) {
                out.push((format!("OIHW->HWIO {dtype} {c}x{c}x{k}x{k}"), op.simplify()));
            }
        }
    }
    out
}

/// Runs every measurement `opts` asks for; `status` hears what is being measured.
pub fn run(opts: &BenchOptions, status: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let size = opts.size.max(1 << 16);
    let mut rows = Vec::new();
    #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
    let mut adapter = None;
    #[cfg(feature = "gpu")]
    if opts.device != Device::Cpu && opts.device != Device::Reference {
        match gpu_rows(opts, size, status, &mut rows) {
            Ok(a) => adapter = Some(a),
            Err(e) if opts.device == Device::Gpu || opts.adapter.is_some() => return Err(e),
            Err(_) => {}
        }
    }
    let cpu = Cpu::new();
    cpu_rows(&cpu, opts, size, status, &mut rows)?;
    end_to_end(opts, size, status, &mut rows, adapter.is_some())?;
    Ok(BenchReport {
        adapter,
        cpu_threads: rayon::current_num_threads(),
        size,
        rows,
    })
}

#[cfg(feature = "gpu")]
fn gpu_rows(
    opts: &BenchOptions,
    size: usize,
    status: &mut dyn FnMut(&str),
    rows: &mut Vec<BenchRow>,
) -> Result<BenchAdapter> {
    use crate::backend::gpu::{Gpu, GpuOptions, KernelKind};
    use crate::layout::Cast;

    let allow_software = crate::backend::BackendOptions::new(opts.device, opts.adapter.clone())
        .allows_software_gpu();
    let gpu = Gpu::new(&GpuOptions::new(opts.adapter.clone(), allow_software))?;
    let (name, driver, backend, software) = gpu.adapter();
    status(&format!("gpu: {name} ({backend})"));
    let src = pattern(size);
    // Kernels run on resident buffers, each within one binding.
    let ksize = size.min(gpu.binding_bytes());
    let up = best(opts.min_time, || gpu.time_upload(&src))?;
    rows.push(BenchRow {
        group: "transfer",
        name: "upload (host -> device)".into(),
        gb_per_s: gbps(size, up),
        ratio: None,
        baseline: None,
    });
    let back = best(opts.min_time, || gpu.time_readback(size))?;
    rows.push(BenchRow {
        group: "transfer",
        name: "readback (device -> host)".into(),
        gb_per_s: gbps(size, back),
        ratio: None,
        baseline: None,
    });
    // The copy kernel per element size, then every case against its copy.
    let mut copies: Vec<(usize, f64)> = Vec::new();
    let mut copy_for = |es: usize, status: &mut dyn FnMut(&str)| -> Result<f64> {
        if let Some(&(_, v)) = copies.iter().find(|c| c.0 == es) {
            return Ok(v);
        }
        status(&format!("gpu copy kernel, {es}-byte elements"));
        let n = ksize / es;
        let g = Gather::from_parts(es, vec![n], vec![1], 0);
        let r = gpu.resident(&g, &src[..n * es], KernelKind::Copy)?;
        let t = best(opts.min_time, || {
            let started = Instant::now();
            r.run()?;
            Ok(started.elapsed())
        })?;
        let v = gbps(n * es, t);
        copies.push((es, v));
        Ok(v)
    };
    let copy4 = copy_for(4, status)?;
    rows.push(BenchRow {
        group: "gpu kernel",
        name: "copy (copy.wgsl)".into(),
        gb_per_s: copy4,
        ratio: Some(1.0),
        baseline: Some("copy".into()),
    });
    let mut cases: Vec<(String, Gather, KernelKind)> = layout_cases(ksize)
        .into_iter()
        .map(|(n, g)| {
            let k = Gpu::kernel_for(&g);
            (n, g, k)
        })
        .collect();
    for (from, to) in [(DType::F32, DType::BF16), (DType::BF16, DType::F32)] {
        if let Ok(Some(c)) = Cast::new(from, to) {
            let n = ksize / from.size().max(to.size());
            cases.push((
                format!("cast {from}->{to}"),
                Gather::from_parts(from.size(), vec![n], vec![1], 0),
                KernelKind::Cast(c),
            ));
        }
    }
    // Transposed and cast in one pass (a Linear and a 3x3 conv kernel, f32 -> bf16), and
    // the same as two passes (the transpose kernel, then cast.wgsl over its output).
    let mut two_pass = Vec::new();
    if let Ok(Some(c)) = Cast::new(DType::F32, DType::BF16) {
        for (name, g) in layout_cases(ksize) {
            let linear = name.starts_with("transpose F32");
            let conv = name.starts_with("OIHW->HWIO F32") && name.ends_with("3x3");
            if !(linear || conv) {
                continue;
            }
            let Some(kind) = gpu.fused_kernel_for(&g, c) else {
                continue;
            };
            let label = name.replacen(" F32", " + cast F32->BF16", 1);
            two_pass.push((format!("{label} (two passes)"), g.clone(), c));
            cases.push((format!("{label} (fused)"), g, kind));
        }
    }
    for (name, g, kind) in cases {
        status(&format!("gpu {name}"));
        let es = g.elem_size();
        // Bytes produced: a cast writes its target's width.
        let bytes = match kind {
            KernelKind::Cast(c) | KernelKind::TransposeCast(c) => {
                crate::backend::cast_out_bytes(&g, c)
            }
            _ => g.out_bytes(),
        };
        let r = match gpu.resident(&g, &src[..g.src_extent() * es], kind) {
            Ok(r) => r,
            // Larger than one binding on this adapter: not measured.
            Err(_) => continue,
        };
        let t = best(opts.min_time, || {
            let started = Instant::now();
            r.run()?;
            Ok(started.elapsed())
        })?;
        // A kernel that computes the wrong bytes has no speed worth reporting.
        let cpu = Cpu::new();
        let input = &src[..g.src_extent() * es];
        let want = match kind {
            KernelKind::Cast(c) | KernelKind::TransposeCast(c) => {
                let mut out = vec![0u8; bytes];
                cpu.gather_cast(&g, c, input, &mut out)?;
                out
            }
            _ => {
                let mut out = vec![0u8; g.out_bytes()];
                cpu.gather(&g, input, &mut out)?;
                out
            }
        };
        if r.read()?.get(..want.len()) != Some(&want[..]) {
            return Err(Error::Gpu {
                detail: format!("benchmark: the {name} kernel computed other bytes than the CPU"),
            });
        }
        let base = copy_for(es, status)?;
        let v = gbps(bytes, t);
        rows.push(BenchRow {
            group: "gpu kernel",
            name,
            gb_per_s: v,
            ratio: Some(v / base),
            baseline: Some(format!("copy, {es}-byte elements")),
        });
    }
    for (name, g, c) in two_pass {
        status(&format!("gpu {name}"));
        let es = g.elem_size();
        let input = &src[..g.src_extent() * es];
        let (Ok(first), Ok(second)) = (
            gpu.resident(&g, input, Gpu::kernel_for(&g)),
            gpu.resident(
                &Gather::from_parts(es, vec![g.len()], vec![1], 0),
                &src[..g.out_bytes()],
                KernelKind::Cast(c),
            ),
        ) else {
            continue;
        };
        let t = best(opts.min_time, || {
            let started = Instant::now();
            first.run()?;
            second.run()?;
            Ok(started.elapsed())
        })?;
        let v = gbps(crate::backend::cast_out_bytes(&g, c), t);
        rows.push(BenchRow {
            group: "gpu kernel",
            name,
            gb_per_s: v,
            ratio: Some(v / copy_for(es, status)?),
            baseline: Some(format!("copy, {es}-byte elements")),
        });
    }
    // quantize.wgsl over resident bf16 weights, by the bytes read, against the copy
    // kernel over 2-byte elements; checked against the CPU first.
    let n = (ksize / 2 / 4096).max(1) * 4096;
    let values = weights_bf16(n * 2);
    for (name, op) in quant_cases() {
        if op.quant().mode() != crate::layout::quant::QuantMode::Affine {
            continue;
        }
        status(&format!("gpu {name}"));
        let r = match gpu.resident_quantize(&values, &op) {
            Ok(r) => r,
            Err(_) => continue,
        };
        r.run()?;
        let got = r.read()?;
        let want = cpu_quantize(&Cpu::new(), &op, &values)?;
        let packed = want[0].len();
        let mut scales = vec![0u8; want[1].len()];
        for (pair, out) in got[packed..]
            .chunks_exact(8)
            .zip(scales.chunks_exact_mut(2))
        {
            let bits = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
            crate::layout::quant::store(DType::BF16, f32::from_bits(bits), out);
        }
        if got[..packed] != want[0][..] || scales != want[1] {
            return Err(Error::Gpu {
                detail: format!("benchmark: the {name} kernel computed other bytes than the CPU"),
            });
        }
        let t = best(opts.min_time, || {
            let started = Instant::now();
            r.run()?;
            Ok(started.elapsed())
        })?;
        let v = gbps(values.len(), t);
        rows.push(BenchRow {
            group: "gpu kernel",
            name,
            gb_per_s: v,
            ratio: Some(v / copy_for(2, status)?),
            baseline: Some("copy, 2-byte elements".into()),
        });
    }
    Ok(BenchAdapter {
        name,
        driver,
        backend,
        software,
    })
}

/// bf16 weights in [-1, 1) (no NaN or inf), the quantize kernels' input.
fn weights_bf16(n: usize) -> Vec<u8> {
    let mut v = pattern(n);
    for (i, b) in v.iter_mut().enumerate().skip(1).step_by(2) {
        *b = (*b & 0x80) | (0x38 + (i as u8 ^ *b) % 7);
    }
    v
}

/// The quantizations measured: mlx-lm's default and 8-bit affine, and the MX/NV modes
/// (on the CPU; the GPU runs affine).
fn quant_cases() -> Vec<(String, crate::layout::quant::Quantize)> {
    use crate::layout::quant::{Quant, QuantMode, Quantize};
    let mut out = Vec::new();
    for (mode, bits) in [
        (QuantMode::Affine, Some(4)),
        (QuantMode::Affine, Some(8)),
        (QuantMode::Mxfp4, None),
        (QuantMode::Mxfp8, None),
        (QuantMode::Nvfp4, None),
    ] {
        if let Ok(op) = Quant::new(mode, bits, None).and_then(|q| Quantize::new(q, DType::BF16)) {
            let q = op.quant();
            out.push((
                format!(
                    "quantize BF16 {} {}-bit g{}",
                    q.mode(),
                    q.bits(),
                    q.group_size()
                ),
                op,
            ));
        }
    }
    out
}

/// The CPU's quantization of `values` (contiguous bf16, whole rows of 4096): every
/// output, in order.
fn cpu_quantize(
    cpu: &Cpu,
    op: &crate::layout::quant::Quantize,
    values: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let n = values.len() / 2;
    let g = Gather::from_parts(2, vec![n / 4096, 4096], vec![4096, 1], 0);
    let mut outs: Vec<Vec<u8>> = (0..op.output_count())
        .map(|k| vec![0u8; op.output_bytes(k, n).unwrap_or(0)])
        .collect();
    let mut dsts: Vec<&mut [u8]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    cpu.gather_quantize(&g, None, op, values, &mut dsts)?;
    Ok(outs)
}

fn cpu_rows(
    cpu: &Cpu,
    opts: &BenchOptions,
    size: usize,
    status: &mut dyn FnMut(&str),
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    status("cpu memcpy");
    let src = pattern(size);
    let mut dst = vec![0u8; size];
    let t = best(opts.min_time, || {
        let started = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        Ok(started.elapsed())
    })?;
    let memcpy = gbps(size, t);
    rows.push(BenchRow {
        group: "cpu kernel",
        name: "memcpy (1 thread)".into(),
        gb_per_s: memcpy,
        ratio: Some(1.0),
        baseline: Some("memcpy".into()),
    });
    for (name, g) in layout_cases(size) {
        status(&format!("cpu {name}"));
        let bytes = g.out_bytes();
        let input = &src[..g.src_extent() * g.elem_size()];
        let out = &mut dst[..bytes];
        let t = best(opts.min_time, || {
            let started = Instant::now();
            cpu.gather(&g, input, out)?;
            Ok(started.elapsed())
        })?;
        let v = gbps(bytes, t);
        rows.push(BenchRow {
            group: "cpu kernel",
            name: format!("{name} ({} threads)", rayon::current_num_threads()),
            gb_per_s: v,
            ratio: Some(v / memcpy),
            baseline: Some("memcpy (1 thread)".into()),
        });
    }
    // Quantization of bf16 weights, measured by the bytes read (the source).
    let n = (size / 2 / 4096).max(1) * 4096;
    let values = weights_bf16(n * 2);
    for (name, op) in quant_cases() {
        status(&format!("cpu {name}"));
        let t = best(opts.min_time, || {
            let started = Instant::now();
            std::hint::black_box(cpu_quantize(cpu, &op, &values)?);
            Ok(started.elapsed())
        })?;
        let v = gbps(values.len(), t);
        rows.push(BenchRow {
            group: "cpu kernel",
            name: format!("{name} ({} threads)", rayon::current_num_threads()),
            gb_per_s: v,
            ratio: Some(v / memcpy),
            baseline: Some("memcpy (1 thread)".into()),
        });
    }
    Ok(())
}

/// Removes the benchmark's folder however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A generated f32 checkpoint of about `size` bytes (Linear and conv weights, biases)
/// converted with the flax preset, against copying the same file and syncing it.
fn end_to_end(
    opts: &BenchOptions,
    size: usize,
    status: &mut dyn FnMut(&str),
    rows: &mut Vec<BenchRow>,
    gpu: bool,
) -> Result<()> {
    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("relayout-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let scratch = Scratch(dir);
    let input = scratch.0.join("model.safetensors");
    status("end to end: writing a checkpoint");
    write_checkpoint(&input, size)?;
    let copy = scratch.0.join("copy.safetensors");
    let output = scratch.0.join("out.safetensors");
    let mut devices = vec![Device::Cpu];
    if gpu {
        devices.push(Device::Gpu);
    }
    let copy_time = best(opts.min_time, || {
        let started = Instant::now();
        std::fs::copy(&input, &copy).map_err(|e| Error::io(&copy, e))?;
        std::fs::File::open(&copy)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&copy, e))?;
        let t = started.elapsed();
        std::fs::remove_file(&copy).map_err(|e| Error::io(&copy, e))?;
        Ok(t)
    })?;
    let bytes = std::fs::metadata(&input)
        .map_err(|e| Error::io(&input, e))?
        .len() as usize;
    let copy_rate = gbps(bytes, copy_time);
    rows.push(BenchRow {
        group: "end to end",
        name: "file copy + fsync".into(),
        gb_per_s: copy_rate,
        ratio: Some(1.0),
        baseline: Some("file copy".into()),
    });
    for device in devices {
        status(&format!("end to end: convert --device {device:?}"));
        let spec = crate::convert::ConvertSpec::new()
            .preset("flax")
            .force(true)
            .backend(crate::backend::BackendOptions::new(
                device,
                opts.adapter.clone(),
            ));
        let mut written = 0;
        let t = best(opts.min_time, || {
            let started = Instant::now();
            let r = crate::convert::convert(&input, &output, &spec, &mut |_| {})?;
            written = r.bytes as usize;
            Ok(started.elapsed())
        })?;
        let v = gbps(written, t);
        rows.push(BenchRow {
            group: "end to end",
            name: format!(
                "convert --preset flax --device {}",
                format!("{device:?}").to_lowercase()
            ),
            gb_per_s: v,
            ratio: Some(v / copy_rate),
            baseline: Some("file copy".into()),
        });
    }
    drop(scratch);
    Ok(())
}

/// Linear weights (out, in) and 3x3 conv weights with their biases, f32, until `size`.
fn write_checkpoint(path: &Path, size: usize) -> Result<()> {
    use crate::writer::{HeaderEntry, SafetensorsWriter};
    let mut entries = Vec::new();
    let mut total = 0;
    let mut k = 0;
    while total < size {
        let (name, shape) = if k % 2 == 0 {
            (format!("layers.{k}.fc.weight"), vec![1024, 1024])
        } else {
            (format!("layers.{k}.conv.weight"), vec![128, 256, 3, 3])
        };
        let bias = vec![shape[0]];
        for (n, s) in [(name, shape), (format!("layers.{k}.bias"), bias)] {
            let e = HeaderEntry {
                name: n,
                dtype: DType::F32,
                shape: s,
            };
            total += e.bytes();
            entries.push(e);
        }
        k += 1;
    }
    let data = pattern(4 << 20);
    let mut w = SafetensorsWriter::create(path, &entries, &Default::default(), true)?;
    for e in &entries {
        let mut left = e.bytes();
        while left > 0 {
            let n = left.min(data.len());
            w.write(&data[..n])?;
            left -= n;
        }
    }
    w.finish()?;
    Ok(())
}
