//! The CPU transposes at every vector level this CPU runs (portable, SSE2, AVX2), on 1
//! and 2 threads, against a single-thread memcpy of the same buffers (best of 5 each,
//! 64 MiB, page-faulted first):
//!
//! cargo run --release --example cpu_simd_levels
use relayout::backend::cpu::{Cpu, Simd, Tuning};
use relayout::backend::Backend;
use relayout::LayoutOp;
use std::time::Instant;
fn main() {
    let size = 64usize << 20;
    let src: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
    let mut dst = vec![0u8; size];
    dst.copy_from_slice(&src);
    let mut bestm = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        bestm = bestm.min(t.elapsed().as_secs_f64());
    }
    let memcpy = size as f64 / bestm / 1e9;
    println!("memcpy 1 thread {memcpy:.2} GB/s");
    for (name, es, shape, perm) in [
        (
            "f32 4096x4096",
            4usize,
            vec![4096usize, 4096],
            vec![1usize, 0],
        ),
        ("bf16 4096x8192", 2, vec![4096, 8192], vec![1, 0]),
        ("u8 8192x8192", 1, vec![8192, 8192], vec![1, 0]),
        (
            "f32 OIHW 1024x1024x3x3",
            4,
            vec![1024, 1024, 3, 3],
            vec![2, 3, 1, 0],
        ),
        (
            "f32 OIHW 1024x1024x4x4",
            4,
            vec![1024, 1024, 4, 4],
            vec![2, 3, 1, 0],
        ),
        (
            "bf16 OIHW 1024x2048x3x3",
            2,
            vec![1024, 2048, 3, 3],
            vec![2, 3, 1, 0],
        ),
    ] {
        let g = LayoutOp::contiguous(es, shape, perm).unwrap().simplify();
        let n = g.out_bytes();
        for threads in [1, 2] {
            for simd in Simd::available() {
                let cpu = Cpu::with_threads(threads).unwrap().with_tuning(Tuning {
                    simd,
                    ..Tuning::default()
                });
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = Instant::now();
                    cpu.gather(&g, &src[..n], &mut dst[..n]).unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let v = n as f64 / best / 1e9;
                println!(
                    "{name:28} {threads}t {simd:?}: {v:.2} GB/s = {:.2} x memcpy",
                    v / memcpy
                );
            }
        }
    }
}
