//! CPU kernels against `memcpy` of the same bytes, measured in the same run.
//!
//! `cargo bench --bench cpu_kernels -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use relayout::backend::cpu::Cpu;
use relayout::backend::reference::Reference;
use relayout::backend::Backend;
use relayout::layout::{Gather, LayoutOp};

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
        let src = &src[..g.src_extent() * g.elem_size];
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

criterion_group!(benches, kernels);
criterion_main!(benches);
