//! CPU kernels against `memcpy` of the same bytes, measured in the same run.
//!
//! `cargo bench --bench cpu_kernels -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use relayout::backend::cpu::Cpu;
use relayout::backend::reference::Reference;
use relayout::backend::Backend;
use relayout::layout::cast::{cast_slice, Cast};
use relayout::layout::{Gather, LayoutOp};
use relayout::DType;

fn source(bytes: usize) -> Vec<u8> {
    // Non-constant bytes, so nothing can be elided or compressed by the memory system.
    (0..bytes)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Transpose of a contiguous (rows, cols) matrix.
fn transpose(elem_size: usize, rows: usize, cols: usize) -> Gather {
    Gather::from_parts(elem_size, vec![cols, rows], vec![1, cols], 0)
}

/// One group: memcpy of the output size on one thread and on as many threads as the
/// backend uses (the fair baseline for a parallel kernel), then each named gather.
fn group(c: &mut Criterion, name: &str, backend: &dyn Backend, cases: &[(&str, Gather)]) {
    let bytes = cases.iter().map(|(_, g)| g.out_bytes()).max().unwrap_or(0);
    let src = source(bytes);
    let mut dst = vec![0u8; bytes];
    let mut grp = c.benchmark_group(name);
    grp.throughput(Throughput::Bytes(bytes as u64));
    grp.bench_function("memcpy 1 thread", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)));
    });
    let threads = rayon::current_num_threads();
    // Chunks of the kernels' own parallel task size, on the same global pool.
    let chunk = relayout::backend::cpu::PAR_CHUNK;
    grp.bench_function(format!("memcpy {threads} threads"), |b| {
        b.iter(|| {
            dst.par_chunks_mut(chunk)
                .zip(black_box(&src).par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
        });
    });
    for (label, g) in cases {
        let n = g.out_bytes();
        grp.throughput(Throughput::Bytes(n as u64));
        let src = &src[..g.src_extent() * g.elem_size()];
        let dst = &mut dst[..n];
        grp.bench_function(*label, |b| {
            b.iter(|| backend.gather(black_box(g), black_box(src), dst));
        });
    }
    grp.finish();
}

fn kernels(c: &mut Criterion) {
    let cpu = Cpu::new();
    let hwio = |o, i, kh, kw| {
        LayoutOp::contiguous(4, vec![o, i, kh, kw], vec![2, 3, 1, 0])
            .map(|op| op.simplify())
            .unwrap_or_else(|_| transpose(4, 1, 1))
    };
    group(
        c,
        "4MiB",
        &cpu,
        &[
            ("f32 transpose 1024x1024", transpose(4, 1024, 1024)),
            ("bf16 transpose 2048x1024", transpose(2, 2048, 1024)),
            ("u8 transpose 2048x2048", transpose(1, 2048, 2048)),
            ("f32 oihw->hwio 256x256x3x3", hwio(256, 256, 3, 3)),
        ],
    );
    group(
        c,
        "64MiB",
        &cpu,
        &[
            ("f32 transpose 4096x4096", transpose(4, 4096, 4096)),
            ("f32 transpose 4000x4200", transpose(4, 4000, 4200)),
            ("bf16 transpose 4096x8192", transpose(2, 4096, 8192)),
            ("bf16 transpose 4000x8400", transpose(2, 4000, 8400)),
            ("u8 transpose 8192x8192", transpose(1, 8192, 8192)),
            ("f32 oihw->hwio 1024x1024x4x4", hwio(1024, 1024, 4, 4)),
        ],
    );
    group(
        c,
        "reference",
        &Reference,
        &[("f32 transpose 256x256", transpose(4, 256, 256))],
    );
}

/// Every cast pair the benches time.
const CAST_PAIRS: [(DType, DType); 7] = [
    (DType::F32, DType::BF16),
    (DType::F32, DType::F16),
    (DType::BF16, DType::F32),
    (DType::F16, DType::F32),
    (DType::BF16, DType::F16),
    (DType::F64, DType::F32),
    (DType::F64, DType::BF16),
];

/// Casts of 256 KiB of source bytes, below the parallel threshold and inside L2: the
/// kernels' own speed on one core, against memcpy of the same source bytes.
fn casts_in_cache(c: &mut Criterion) {
    let bytes = 256 << 10;
    let src = source(bytes);
    let mut dst = vec![0u8; 2 * bytes];
    let mut grp = c.benchmark_group("cast 256KiB 1 thread");
    grp.throughput(Throughput::Bytes(bytes as u64));
    grp.bench_function("memcpy", |b| {
        b.iter(|| dst[..bytes].copy_from_slice(black_box(&src)));
    });
    for (from, to) in CAST_PAIRS {
        let Ok(Some(cast)) = Cast::new(from, to) else {
            continue;
        };
        let out = &mut dst[..bytes / from.size() * to.size()];
        grp.bench_function(format!("cast_slice {from}->{to}"), |b| {
            b.iter(|| cast_slice(cast, black_box(&src), out));
        });
    }
    grp.finish();
}

/// Casts of 64 MiB of source bytes, against memcpy of the same source bytes (which moves
/// more: it writes as much as it reads, a narrowing cast half or a quarter of it).
fn casts(c: &mut Criterion) {
    let bytes = 64 << 20;
    let src = source(bytes);
    let mut dst = vec![0u8; 2 * bytes];
    let mut grp = c.benchmark_group("cast 64MiB");
    grp.throughput(Throughput::Bytes(bytes as u64));
    grp.bench_function("memcpy 1 thread", |b| {
        b.iter(|| dst[..bytes].copy_from_slice(black_box(&src)));
    });
    let threads = rayon::current_num_threads();
    let chunk = relayout::backend::cpu::PAR_CHUNK;
    grp.bench_function(format!("memcpy {threads} threads"), |b| {
        b.iter(|| {
            dst[..bytes]
                .par_chunks_mut(chunk)
                .zip(black_box(&src).par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
        });
    });
    for (from, to) in CAST_PAIRS {
        let Ok(Some(cast)) = Cast::new(from, to) else {
            continue;
        };
        let n = bytes / from.size();
        let out = &mut dst[..n * to.size()];
        grp.bench_function(format!("cast_slice {from}->{to}"), |b| {
            b.iter(|| cast_slice(cast, black_box(&src), out));
        });
    }
    // Fused with a transpose, against the same transpose without the cast.
    let cpu = Cpu::new();
    let g = transpose(4, 4096, 4096);
    if let Ok(Some(cast)) = Cast::new(DType::F32, DType::BF16) {
        let out = &mut dst[..g.len() * 2];
        grp.bench_function("cpu gather_cast f32->bf16 transpose 4096x4096", |b| {
            b.iter(|| cpu.gather_cast(black_box(&g), cast, black_box(&src), out));
        });
        let out = &mut dst[..g.out_bytes()];
        grp.bench_function("cpu gather f32 transpose 4096x4096", |b| {
            b.iter(|| cpu.gather(black_box(&g), black_box(&src), out));
        });
        let copy = Gather::from_parts(4, vec![g.len()], vec![1], 0);
        let out = &mut dst[..g.len() * 2];
        grp.bench_function("cpu gather_cast f32->bf16 copy", |b| {
            b.iter(|| cpu.gather_cast(black_box(&copy), cast, black_box(&src), out));
        });
    }
    grp.finish();
}

/// bf16 values in [-1, 1) (sign, exponent 0x70..0x7E, any mantissa): weights, not NaNs.
fn weights_bf16(bytes: usize) -> Vec<u8> {
    let mut v = source(bytes);
    for (i, b) in v.iter_mut().enumerate().skip(1).step_by(2) {
        *b = (*b & 0x80) | (0x38 + (i as u8 ^ *b) % 7);
    }
    v
}

/// Quantization of 64 MiB of bf16 weights (out of cache) on the CPU backend's threads,
/// fused with the gather, against a 1-thread memcpy of the source bytes: affine at 4 and
/// 8 bits (the targets), the other modes and a transposed source reported beside them.
fn quantize(c: &mut Criterion) {
    use relayout::layout::quant::{Quant, QuantMode, Quantize};
    let bytes = 64 << 20;
    let (rows, cols) = (8192, bytes / 2 / 8192);
    let src = weights_bf16(bytes);
    let mut copy = vec![0u8; bytes];
    let cpu = Cpu::new();
    let mut grp = c.benchmark_group("quantize 64MiB bf16");
    grp.throughput(Throughput::Bytes(bytes as u64));
    grp.sample_size(10);
    grp.bench_function("memcpy 1 thread", |b| {
        b.iter(|| copy.copy_from_slice(black_box(&src)));
    });
    let rowwise = Gather::from_parts(2, vec![rows, cols], vec![cols, 1], 0);
    let cases = [
        (
            "affine 4-bit g64",
            QuantMode::Affine,
            Some(4),
            Some(64),
            false,
        ),
        (
            "affine 8-bit g64",
            QuantMode::Affine,
            Some(8),
            Some(64),
            false,
        ),
        (
            "affine 4-bit g32",
            QuantMode::Affine,
            Some(4),
            Some(32),
            false,
        ),
        (
            "affine 4-bit g64 transposed source",
            QuantMode::Affine,
            Some(4),
            Some(64),
            true,
        ),
        ("mxfp4", QuantMode::Mxfp4, None, None, false),
        ("mxfp8", QuantMode::Mxfp8, None, None, false),
        ("nvfp4", QuantMode::Nvfp4, None, None, false),
    ];
    for (label, mode, bits, group, transposed) in cases {
        let q = Quant::new(mode, bits, group).unwrap();
        let op = Quantize::new(q, DType::BF16).unwrap();
        // The transposed case reads a (cols, rows) source column by column.
        let g = if transposed {
            transpose(2, cols, rows)
        } else {
            rowwise.clone()
        };
        let mut outs: Vec<Vec<u8>> = (0..op.output_count())
            .map(|k| vec![0u8; op.output_bytes(k, g.len()).unwrap()])
            .collect();
        grp.bench_function(label, |b| {
            b.iter(|| {
                let mut dsts: Vec<&mut [u8]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                cpu.gather_quantize(black_box(&g), None, &op, black_box(&src), &mut dsts)
                    .unwrap()
            });
        });
    }
    grp.finish();
}

criterion_group!(benches, kernels, casts_in_cache, casts, quantize);
criterion_main!(benches);
