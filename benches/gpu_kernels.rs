//! WGSL kernels against the WGSL copy kernel on the same bytes, and the whole round trip
//! (upload, kernel, readback) against upload + readback alone.
//!
//! `cargo bench --bench gpu_kernels` (set RELAYOUT_ADAPTER to pick an adapter; software
//! adapters are allowed here). Kernel timings include the wait for the device; buffers
//! stay resident so they measure the kernels alone.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use relayout::backend::gpu::{Gpu, GpuOptions, KernelKind, Resident};
use relayout::backend::Backend;
use relayout::layout::{Cast, Gather, LayoutOp};
use relayout::DType;

fn open() -> Option<Gpu> {
    let opts = GpuOptions::new(None, true);
    match Gpu::new(&opts) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            eprintln!("no GPU, nothing to measure: {e}");
            None
        }
    }
}

fn pattern(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn op(elem_size: usize, shape: &[usize], perm: &[usize]) -> Gather {
    match LayoutOp::contiguous(elem_size, shape.to_vec(), perm.to_vec()) {
        Ok(op) => op.simplify(),
        Err(e) => panic!("{e}"),
    }
}

/// (name, gather) pairs of 16 and 64 MiB.
fn cases() -> Vec<(&'static str, Gather)> {
    vec![
        ("f32 4096x1024 T", op(4, &[4096, 1024], &[1, 0])),
        ("f32 4096x4096 T", op(4, &[4096, 4096], &[1, 0])),
        ("bf16 4096x2048 T", op(2, &[4096, 2048], &[1, 0])),
        ("bf16 4096x8192 T", op(2, &[4096, 8192], &[1, 0])),
        ("u8 4096x4096 T", op(1, &[4096, 4096], &[1, 0])),
        ("u8 8192x8192 T", op(1, &[8192, 8192], &[1, 0])),
        (
            "f32 OIHW->HWIO 1024x512x3x3",
            op(4, &[1024, 512, 3, 3], &[2, 3, 1, 0]),
        ),
        (
            "bf16 OIHW->HWIO 1024x1024x3x3",
            op(2, &[1024, 1024, 3, 3], &[2, 3, 1, 0]),
        ),
        ("f32 4096x1023 T (odd width)", op(4, &[4096, 1023], &[1, 0])),
    ]
}

/// Casts of 16 M contiguous elements (64 MiB of f32), as cast.wgsl runs them after a
/// gather: the copy baseline moves the same source bytes.
fn cast_cases() -> Vec<(&'static str, Gather, Cast)> {
    let cast = |from: DType, to: DType| match Cast::new(from, to) {
        Ok(Some(c)) => c,
        _ => panic!("{from} -> {to}"),
    };
    let n = 16 << 20;
    let run = |d: DType| Gather::from_parts(d.size(), vec![n], vec![1], 0);
    vec![
        (
            "cast f32->bf16 16M",
            run(DType::F32),
            cast(DType::F32, DType::BF16),
        ),
        (
            "cast f32->f16 16M",
            run(DType::F32),
            cast(DType::F32, DType::F16),
        ),
        (
            "cast bf16->f32 16M",
            run(DType::BF16),
            cast(DType::BF16, DType::F32),
        ),
        (
            "cast f16->f32 16M",
            run(DType::F16),
            cast(DType::F16, DType::F32),
        ),
    ]
}

/// The kernel `g` runs on (or `kind` when given) and, on the same bytes, the copy
/// kernel with the same element size (copy.wgsl then has transpose2d.wgsl's dispatch
/// shape); `None` when either does not fit one binding.
fn kernel_and_copy<'g>(
    gpu: &'g Gpu,
    g: &Gather,
    src: &[u8],
    kind: Option<KernelKind>,
) -> Option<(KernelKind, Resident<'g>, Resident<'g>)> {
    let kind = kind.unwrap_or_else(|| Gpu::kernel_for(g));
    let copy = Gather::from_parts(g.elem_size(), vec![g.len()], vec![1], 0);
    let k = gpu.resident(g, src, kind).ok()?;
    let base = gpu.resident(&copy, src, KernelKind::Copy).ok()?;
    Some((kind, k, base))
}

/// The layout cases, then the casts.
fn all_cases() -> Vec<(&'static str, Gather, Option<Cast>)> {
    let layouts = cases().into_iter().map(|(n, g)| (n, g, None));
    let casts = cast_cases().into_iter().map(|(n, g, c)| (n, g, Some(c)));
    layouts.chain(casts).collect()
}

fn kernels(c: &mut Criterion) {
    let Some(gpu) = open() else { return };
    let mut group = c.benchmark_group("kernel");
    group.sample_size(10);
    for (name, g, cast) in all_cases() {
        let src = pattern(g.out_bytes());
        let Some((kind, k, base)) = kernel_and_copy(&gpu, &g, &src, cast.map(KernelKind::Cast))
        else {
            eprintln!("{name}: does not fit one binding, skipped");
            continue;
        };
        // The kernel must compute the gather, or its speed means nothing.
        let reference = relayout::backend::reference::Reference;
        let want = match cast {
            None => {
                let mut want = vec![0u8; g.out_bytes()];
                reference.gather(&g, &src, &mut want).map(|()| want)
            }
            Some(c) => {
                let mut want = vec![0u8; g.len() * c.to().size()];
                reference.gather_cast(&g, c, &src, &mut want).map(|()| want)
            }
        };
        let want = want.unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = k.run() {
            panic!("{name}: {e}");
        }
        match k.read() {
            Ok(got) if got[..want.len()] == want[..] => {}
            _ => panic!("{name}: kernel output differs from the reference"),
        }
        group.throughput(Throughput::Bytes(g.out_bytes() as u64));
        group.bench_function(format!("{name} [{kind:?}]"), |b| {
            b.iter(|| k.run().map_err(|e| panic!("{e}")))
        });
        group.bench_function(format!("{name} [copy baseline]"), |b| {
            b.iter(|| base.run().map_err(|e| panic!("{e}")))
        });
    }
    group.finish();
}

fn round_trip(c: &mut Criterion) {
    let Some(gpu) = open() else { return };
    let mut group = c.benchmark_group("round_trip");
    group.sample_size(10);
    for (name, g) in [
        ("f32 4096x4096 T", op(4, &[4096, 4096], &[1, 0])),
        ("bf16 4096x4096 T", op(2, &[4096, 4096], &[1, 0])),
    ] {
        let src = pattern(g.out_bytes());
        let mut dst = vec![0u8; g.out_bytes()];
        group.throughput(Throughput::Bytes(g.out_bytes() as u64));
        group.bench_function(format!("{name} [gather]"), |b| {
            b.iter(|| gpu.gather(&g, &src, &mut dst).map_err(|e| panic!("{e}")))
        });
        group.bench_function(format!("{name} [upload+readback baseline]"), |b| {
            b.iter(|| gpu.transfer(&src, &mut dst).map_err(|e| panic!("{e}")))
        });
    }
    group.finish();
}

/// Kernel and copy run alternately, so load from other processes hits both alike: prints
/// each one's best throughput and the median of the per-pair ratios (copy time / kernel
/// time). On a shared machine this ratio is steadier than two separate criterion runs.
fn paired(_: &mut Criterion) {
    const PAIRS: usize = 15;
    let Some(gpu) = open() else { return };
    eprintln!("paired: case [kernel] | kernel MiB/s | copy MiB/s | median ratio of {PAIRS}");
    for (name, g, cast) in all_cases() {
        let src = pattern(g.out_bytes());
        let Some((kind, k, base)) = kernel_and_copy(&gpu, &g, &src, cast.map(KernelKind::Cast))
        else {
            continue;
        };
        let time = |r: &Resident| {
            let t = std::time::Instant::now();
            r.run().map_err(|e| panic!("{e}")).ok();
            t.elapsed().as_secs_f64()
        };
        time(&k);
        time(&base);
        let (mut best_k, mut best_c, mut ratios) = (f64::MAX, f64::MAX, Vec::new());
        for _ in 0..PAIRS {
            let (tk, tc) = (time(&k), time(&base));
            best_k = best_k.min(tk);
            best_c = best_c.min(tc);
            ratios.push(tc / tk);
        }
        ratios.sort_by(f64::total_cmp);
        let mib = g.out_bytes() as f64 / f64::from(1 << 20);
        eprintln!(
            "paired: {name} [{kind:?}] | {:.0} | {:.0} | {:.2}",
            mib / best_k,
            mib / best_c,
            ratios[PAIRS / 2]
        );
    }
}

/// quantize.wgsl over 32 MiB of resident bf16 weights against the copy kernel over the
/// same bytes, paired as `paired` does (the ratio is the measure), after
/// checking the packed words against the CPU backend's.
fn quantize(_: &mut Criterion) {
    use relayout::layout::quant::{Quant, QuantMode, Quantize};
    const PAIRS: usize = 9;
    let Some(gpu) = open() else { return };
    let n = 16 << 20;
    let mut values = pattern(2 * n);
    for (i, b) in values.iter_mut().enumerate().skip(1).step_by(2) {
        *b = (*b & 0x80) | (0x38 + (i as u8 ^ *b) % 7);
    }
    let copy = Gather::from_parts(2, vec![n], vec![1], 0);
    let Ok(base) = gpu.resident(&copy, &values, KernelKind::Copy) else {
        return;
    };
    for bits in [4, 8] {
        let q = Quant::new(QuantMode::Affine, Some(bits), Some(64)).expect("params");
        let op = Quantize::new(q, DType::BF16).expect("op");
        let Ok(k) = gpu.resident_quantize(&values, &op) else {
            eprintln!("quantize: does not fit one binding, skipped");
            return;
        };
        k.run().map_err(|e| panic!("{e}")).ok();
        let rows = Gather::from_parts(2, vec![n / 4096, 4096], vec![4096, 1], 0);
        let mut want: Vec<Vec<u8>> = (0..3)
            .map(|i| vec![0u8; op.output_bytes(i, n).expect("size")])
            .collect();
        let mut dsts: Vec<&mut [u8]> = want.iter_mut().map(|w| w.as_mut_slice()).collect();
        relayout::backend::cpu::Cpu::new()
            .gather_quantize(&rows, None, &op, &values, &mut dsts)
            .map_err(|e| panic!("{e}"))
            .ok();
        let got = k.read().map_err(|e| panic!("{e}")).unwrap_or_default();
        assert!(
            got[..want[0].len()] == want[0][..],
            "quantize.wgsl differs from the CPU"
        );
        let time = |r: &Resident| {
            let t = std::time::Instant::now();
            r.run().map_err(|e| panic!("{e}")).ok();
            t.elapsed().as_secs_f64()
        };
        let (mut best_k, mut best_c, mut ratios) = (f64::MAX, f64::MAX, Vec::new());
        for _ in 0..PAIRS {
            let (tk, tc) = (time(&k), time(&base));
            best_k = best_k.min(tk);
            best_c = best_c.min(tc);
            ratios.push(tc / tk);
        }
        ratios.sort_by(f64::total_cmp);
        let mib = (2 * n) as f64 / f64::from(1 << 20);
        eprintln!(
            "quantize: affine {bits}-bit g64 bf16 | {:.0} MiB/s | copy {:.0} MiB/s | median ratio of {PAIRS}: {:.2}",
            mib / best_k,
            mib / best_c,
            ratios[PAIRS / 2]
        );
    }
}

criterion_group!(benches, kernels, round_trip, paired, quantize);
criterion_main!(benches);
