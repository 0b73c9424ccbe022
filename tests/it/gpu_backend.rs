//! The GPU backend against a naive gather, byte for byte, over grids that cross every
//! tile and chunk size. Needs a device (lavapipe is enough): without one these tests
//! print a note and pass, unless RELAYOUT_REQUIRE_GPU=1, where they fail.
#![cfg(feature = "gpu")]

use crate::common::Rng;
use relayout::backend::gpu::{list_adapters, Gpu, GpuOptions, KernelKind};
use relayout::backend::reference::Reference;
use relayout::backend::Backend;
use relayout::layout::{cast::cast_slice, contiguous_strides, Cast, Gather, LayoutOp};
use relayout::{DType, Error};

fn open(max_chunk_bytes: Option<usize>) -> Option<Gpu> {
    open_with(max_chunk_bytes, None)
}

/// `staged`: force transpose2d.wgsl's workgroup-memory staging on or off (None: the
/// adapter's default), so both variants are checked on any adapter.
fn open_with(max_chunk_bytes: Option<usize>, staged: Option<bool>) -> Option<Gpu> {
    let opts = match max_chunk_bytes {
        Some(n) => GpuOptions::new(None, true).with_max_chunk_bytes(n),
        None => GpuOptions::new(None, true),
    };
    let gpu = match staged {
        Some(s) => Gpu::with_staging(&opts, s),
        None => Gpu::new(&opts),
    };
    crate::common::gpu_or_skip(gpu)
}

/// The oracle: walks the op's own output coordinates, independent of `simplify`.
fn naive(op: &LayoutOp, src: &[u8]) -> Vec<u8> {
    let es = op.elem_size();
    let out_shape = op.out_shape();
    let n: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(n * es);
    for i in 0..n {
        let mut rem = i;
        let mut idx = op.offset();
        for k in (0..out_shape.len()).rev() {
            idx += (rem % out_shape[k]) * op.strides()[op.perm()[k]];
            rem /= out_shape[k];
        }
        out.extend_from_slice(&src[idx * es..(idx + 1) * es]);
    }
    out
}

/// Runs `op` on the GPU over garbage-filled output and compares with the oracle,
/// naming the first differing output coordinate.
fn check(gpu: &Gpu, op: &LayoutOp, rng: &mut Rng) {
    let es = op.elem_size();
    let extent = op.src_extent().unwrap_or(0);
    // Trailing bytes past the extent must never be read into the output.
    let extra = rng.below(5);
    let src = rng.bytes(extent * es + extra);
    let want = naive(op, &src);
    let mut got = rng.bytes(want.len());
    let g = op.simplify();
    if let Err(e) = gpu.gather(&g, &src, &mut got) {
        panic!("{op:?} (gather {g:?}): {e}");
    }
    if let Some(byte) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let shape = op.out_shape();
        let mut rem = byte / es;
        let mut coord = vec![0; shape.len()];
        for k in (0..shape.len()).rev() {
            coord[k] = rem % shape[k];
            rem /= shape[k];
        }
        let e = byte / es * es;
        panic!(
            "{op:?} (gather {g:?}, chunk {}): first difference at output coordinate {coord:?} \
             (byte {byte}): got {:02x?}, want {:02x?}",
            gpu.chunk_bytes(),
            &got[e..e + es],
            &want[e..e + es],
        );
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for pos in 0..n {
            let mut q = p.clone();
            q.insert(pos, n - 1);
            out.push(q);
        }
    }
    out
}

/// A source view of `shape`: its storage is padded by `pad` along every axis, laid out
/// in the axis order `storage_order` (outermost first), and starts at element `offset`.
fn strided_op(
    es: usize,
    shape: &[usize],
    storage_order: &[usize],
    pad: usize,
    offset: usize,
    perm: Vec<usize>,
) -> LayoutOp {
    let padded: Vec<usize> = storage_order.iter().map(|&a| shape[a] + pad).collect();
    let storage_strides = contiguous_strides(&padded);
    let mut strides = vec![0; shape.len()];
    for (pos, &a) in storage_order.iter().enumerate() {
        strides[a] = storage_strides[pos];
    }
    match LayoutOp::new(es, shape.to_vec(), strides, offset, perm) {
        Ok(op) => op,
        Err(e) => panic!("bad test op: {e}"),
    }
}

fn identity(rank: usize) -> Vec<usize> {
    (0..rank).collect()
}

const ELEM_SIZES: [usize; 4] = [1, 2, 4, 8];

#[test]
fn every_permutation_up_to_rank_four_matches_the_naive_gather() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng(0x5eed_0001);
    let shapes: [&[usize]; 9] = [
        &[],
        &[1],
        &[7],
        &[5, 3],
        &[1, 9],
        &[33, 31],
        &[2, 3, 5],
        &[4, 1, 6],
        &[3, 2, 5, 7],
    ];
    for es in ELEM_SIZES {
        for shape in shapes {
            let rank = shape.len();
            for perm in permutations(rank) {
                let op = strided_op(es, shape, &identity(rank), 0, 0, perm.clone());
                check(&gpu, &op, &mut rng);
                // A padded, reordered view at an odd offset (not word aligned).
                let order: Vec<usize> = (0..rank).rev().collect();
                let op = strided_op(es, shape, &order, 1, 3, perm);
                check(&gpu, &op, &mut rng);
            }
        }
    }
}

#[test]
fn two_d_transposes_around_every_tile_size_match_the_naive_gather() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng(0x5eed_0002);
    // Tiles are 16 or 32 rows by 32, 64 or 128 columns depending on the element size.
    let sizes = [1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129];
    for es in ELEM_SIZES {
        for &r in &sizes {
            for &c in &sizes {
                let op = strided_op(es, &[r, c], &[0, 1], 0, 0, vec![1, 0]);
                check(&gpu, &op, &mut rng);
            }
        }
        // Odd offsets, padded rows and a batch axis.
        for &(b, r, c) in &[(3, 33, 65), (2, 17, 128), (5, 64, 31), (1, 129, 16)] {
            let op = strided_op(es, &[b, r, c], &[0, 1, 2], 3, 5, vec![0, 2, 1]);
            check(&gpu, &op, &mut rng);
        }
    }
}

#[test]
fn conv_weights_oihw_to_hwio_match_the_naive_gather() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng(0x5eed_0003);
    for es in ELEM_SIZES {
        for shape in [[8, 3, 3, 3], [64, 32, 3, 3], [5, 7, 1, 1], [33, 17, 5, 2]] {
            let op = strided_op(es, &shape, &identity(4), 0, 0, vec![2, 3, 1, 0]);
            check(&gpu, &op, &mut rng);
        }
    }
}

#[test]
fn random_permutations_of_rank_five_to_eight_match_the_naive_gather() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng(0x5eed_0004);
    for rank in 5..=8 {
        for es in ELEM_SIZES {
            for _ in 0..6 {
                let shape: Vec<usize> = (0..rank).map(|_| 1 + rng.below(4)).collect();
                let mut perm = identity(rank);
                for i in (1..rank).rev() {
                    perm.swap(i, rng.below(i + 1));
                }
                let mut order = identity(rank);
                for i in (1..rank).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                let pad = rng.below(2);
                let offset = rng.below(7);
                let op = strided_op(es, &shape, &order, pad, offset, perm);
                check(&gpu, &op, &mut rng);
            }
        }
    }
}

#[test]
fn gathers_above_rank_eight_are_run_in_rank_eight_pieces() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng(0x5eed_0005);
    for es in ELEM_SIZES {
        let shape = vec![2; 10];
        let op = strided_op(es, &shape, &identity(10), 1, 1, (0..10).rev().collect());
        assert_eq!(op.simplify().shape().len(), 10);
        check(&gpu, &op, &mut rng);
    }
}

#[test]
fn tiny_forced_chunks_reassemble_every_kind_of_gather() {
    let mut rng = Rng(0x5eed_0006);
    for chunk in [16, 40, 100, 256, 1000, 4096] {
        let Some(gpu) = open(Some(chunk)) else { return };
        for es in ELEM_SIZES {
            // Output sizes on both sides of the chunk size.
            let n = chunk / es;
            // Every piece is a submit and a wait: keep the many-piece cases small.
            let big = if chunk >= 256 { (33, 65) } else { (5, 9) };
            for &(r, c) in &[(1, n), (3, n / 3 + 1), (n / 7 + 1, 7), big, (2, n + 1)] {
                let op = strided_op(es, &[r, c], &[0, 1], 0, 0, vec![1, 0]);
                check(&gpu, &op, &mut rng);
                let op = strided_op(es, &[r, c], &[1, 0], 1, 3, vec![0, 1]);
                check(&gpu, &op, &mut rng);
            }
            let op = strided_op(es, &[6, 5, 9], &[2, 0, 1], 2, 1, vec![2, 0, 1]);
            check(&gpu, &op, &mut rng);
            let op = strided_op(
                es,
                &[3, 4, 2, 5, 3],
                &[4, 3, 2, 1, 0],
                1,
                2,
                vec![1, 3, 0, 4, 2],
            );
            check(&gpu, &op, &mut rng);
        }
    }
}

#[test]
fn strided_one_d_views_and_odd_counts_of_sub_word_elements_match() {
    let Some(gpu) = open(Some(64)) else { return };
    let mut rng = Rng(0x5eed_0007);
    for es in ELEM_SIZES {
        for n in [1, 2, 3, 5, 17, 63, 64, 65, 257] {
            for stride in [1, 2, 3, 7] {
                for offset in [0, 1, 2, 3, 5] {
                    let op = match LayoutOp::new(es, vec![n], vec![stride], offset, vec![0]) {
                        Ok(op) => op,
                        Err(e) => panic!("{e}"),
                    };
                    check(&gpu, &op, &mut rng);
                }
            }
        }
    }
}

#[test]
fn nan_payloads_and_every_byte_value_survive_unchanged() {
    let Some(gpu) = open(None) else { return };
    // Signalling and quiet NaNs with payloads, negative zero, a denormal, all 256 bytes.
    let mut src = Vec::new();
    for v in [
        0x7f80_0001u32,
        0xffc0_1234,
        0x8000_0000,
        0x0000_0001,
        0x7fbf_ffff,
    ] {
        src.extend_from_slice(&v.to_le_bytes());
    }
    src.extend(0..=255u8);
    src.truncate(src.len() / 16 * 16);
    for es in ELEM_SIZES {
        let n = src.len() / es;
        let op = match LayoutOp::contiguous(es, vec![2, n / 2], vec![1, 0]) {
            Ok(op) => op,
            Err(e) => panic!("{e}"),
        };
        let want = naive(&op, &src);
        let mut got = vec![0u8; want.len()];
        if let Err(e) = gpu.gather(&op.simplify(), &src, &mut got) {
            panic!("{e}");
        }
        assert_eq!(got, want, "element size {es}");
    }
}

#[test]
fn a_transpose_larger_than_one_storage_binding_is_chunked_correctly() {
    let Some(gpu) = open(None) else { return };
    // 136 MiB of f32, above lavapipe's 128 MiB binding limit and several default chunks.
    let (r, c) = (8192, 4352);
    let es = 4;
    let mut rng = Rng(0x5eed_0008);
    let mut src = vec![0u8; r * c * es];
    for w in src.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    let g = Gather::from_parts(es, vec![c, r], vec![1, c], 0);
    let mut got = vec![0xA5u8; src.len()];
    if let Err(e) = gpu.gather(&g, &src, &mut got) {
        panic!("{e}");
    }
    for j in 0..c {
        for i in 0..r {
            let s = (i * c + j) * es;
            let d = (j * r + i) * es;
            if got[d..d + es] != src[s..s + es] {
                panic!("first difference at output coordinate [{j}, {i}]");
            }
        }
    }
}

#[test]
fn empty_gathers_write_nothing_and_short_buffers_are_errors() {
    let Some(gpu) = open(None) else { return };
    let g = Gather::from_parts(4, vec![0, 5], vec![5, 1], 0);
    let mut dst: [u8; 0] = [];
    assert!(gpu.gather(&g, &[], &mut dst).is_ok());
    let g = Gather::from_parts(4, vec![4, 4], vec![1, 4], 0);
    let mut dst = [0u8; 64];
    assert!(matches!(
        gpu.gather(&g, &[0u8; 60], &mut dst),
        Err(Error::Layout { .. })
    ));
}

#[test]
fn one_gpu_serves_several_threads_at_once() {
    let Some(gpu) = open(Some(512)) else { return };
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    assert_send_sync(&gpu);
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let gpu = &gpu;
            s.spawn(move || {
                let mut rng = Rng(0x5eed_0100 + t);
                for es in ELEM_SIZES {
                    let op = strided_op(es, &[37, 29], &[1, 0], 1, 1, vec![1, 0]);
                    check(gpu, &op, &mut rng);
                }
            });
        }
    });
}

#[test]
fn an_unknown_adapter_name_is_device_unavailable() {
    let opts = GpuOptions::new(Some("no adapter is called this".to_string()), true);
    assert!(matches!(
        Gpu::new(&opts),
        Err(Error::DeviceUnavailable { .. })
    ));
}

#[test]
fn software_adapters_are_refused_unless_allowed() {
    if list_adapters().iter().any(|a| !a.software()) {
        eprintln!("skipping: a hardware adapter is present");
        return;
    }
    // RELAYOUT_ADAPTER names an adapter explicitly, which overrides the refusal.
    if std::env::var_os("RELAYOUT_ADAPTER").is_some() {
        return;
    }
    let opts = GpuOptions::new(None, false);
    assert!(matches!(
        Gpu::new(&opts),
        Err(Error::DeviceUnavailable { .. })
    ));
}

/// Which kernel `op` runs with in one piece, so a test can prove it reaches the path it
/// is about.
fn kernel_of(op: &LayoutOp) -> KernelKind {
    Gpu::kernel_for(&op.simplify())
}

#[test]
fn transpose2d_staged_and_direct_match_around_every_tile_edge() {
    // Tiles are 32 x 32 blocks: 32, 64 or 128 elements a side by element size; sizes
    // cover empty, partial and several full tiles on both axes.
    let sizes = [1, 2, 4, 6, 30, 32, 34, 62, 64, 66, 124, 128, 132, 260];
    for staged in [false, true] {
        let Some(gpu) = open_with(None, Some(staged)) else {
            return;
        };
        let mut rng = Rng(0x5eed_0201);
        for es in ELEM_SIZES {
            // Elements per word: rows and row pitch must be whole words.
            let k = 4 / es.min(4);
            for &r in &sizes {
                for &c in &sizes {
                    let op = strided_op(es, &[r, c], &[0, 1], 0, 0, vec![1, 0]);
                    if r > 1 && c > 1 && r % k == 0 && c % k == 0 {
                        assert_eq!(
                            kernel_of(&op),
                            KernelKind::Transpose2d {
                                shifted: false,
                                remap: false
                            },
                            "{r}x{c} es {es}"
                        );
                    }
                    check(&gpu, &op, &mut rng);
                }
            }
            // Odd widths: the other kernels, still exact.
            for &(r, c) in &[(33, 65), (7, 129), (129, 31)] {
                let op = strided_op(es, &[r, c], &[0, 1], 0, 0, vec![1, 0]);
                check(&gpu, &op, &mut rng);
            }
        }
    }
}

#[test]
fn batched_transposes_and_shifted_batches_match_in_both_variants() {
    for staged in [false, true] {
        let Some(gpu) = open_with(None, Some(staged)) else {
            return;
        };
        let mut rng = Rng(0x5eed_0202);
        for es in ELEM_SIZES {
            // [B, R, C] -> [B, C, R]: batch outermost.
            for &(b, r, c) in &[(3, 64, 36), (2, 132, 68), (5, 4, 260)] {
                let op = strided_op(es, &[b, r, c], &[0, 1, 2], 0, 0, vec![0, 2, 1]);
                assert!(matches!(kernel_of(&op), KernelKind::Transpose2d { .. }));
                check(&gpu, &op, &mut rng);
            }
            // OIHW -> HWIO: one O x (I*H*W) plane with its output rows permuted, for
            // any H*W (1, 3, 9, 25) and across tile and word edges. O and I * H * W
            // multiples of 4, so even bytes take transpose2d.
            for shape in [
                [4, 4, 3, 3],
                [68, 8, 3, 3],
                [132, 4, 1, 3],
                [8, 40, 5, 5],
                [36, 12, 1, 1],
                [4, 132, 3, 3],
                [64, 36, 3, 3],
            ] {
                let op = strided_op(es, &shape, &identity(4), 0, 0, vec![2, 3, 1, 0]);
                // 1x1 kernels simplify to a plain transpose.
                let remapped = (2..32).contains(&(shape[2] * shape[3]));
                assert_eq!(
                    kernel_of(&op),
                    KernelKind::Transpose2d {
                        shifted: false,
                        remap: remapped
                    },
                    "{shape:?} es {es}"
                );
                check(&gpu, &op, &mut rng);
            }
            // A source starting off the word grid: I batches, sub-word ones shifted.
            for shape in [[4, 4, 3, 3], [68, 8, 1, 3]] {
                let op = strided_op(es, &shape, &identity(4), 0, 1, vec![2, 3, 1, 0]);
                if es < 4 {
                    assert_eq!(
                        kernel_of(&op),
                        KernelKind::Transpose2d {
                            shifted: true,
                            remap: false
                        },
                        "{shape:?} es {es}"
                    );
                }
                check(&gpu, &op, &mut rng);
            }
        }
    }
}

#[test]
fn transpose2d_pieces_of_forced_chunks_and_unaligned_sources_match() {
    for staged in [false, true] {
        let mut rng = Rng(0x5eed_0203);
        for chunk in [256, 1000, 4096, 20_000] {
            let Some(gpu) = open_with(Some(chunk), Some(staged)) else {
                return;
            };
            for es in ELEM_SIZES {
                for &(r, c) in &[(64, 68), (132, 36), (8, 260)] {
                    // A view starting at an odd element: every piece's window starts
                    // off the word grid in the source.
                    let op = strided_op(es, &[r, c], &[0, 1], 0, 3, vec![1, 0]);
                    check(&gpu, &op, &mut rng);
                    let op = strided_op(es, &[2, r, c], &[0, 1, 2], 0, 5, vec![0, 2, 1]);
                    check(&gpu, &op, &mut rng);
                }
            }
        }
    }
}

#[test]
fn the_copy_kernel_moves_words_unchanged_and_contiguous_gathers_copy_on_the_host() {
    let Some(gpu) = open(Some(4096)) else { return };
    let mut rng = Rng(0x5eed_0204);
    for es in ELEM_SIZES {
        // Word counts around copy.wgsl's 1024 * PLANES words per workgroup.
        for words in [1, 255, 1023, 1024, 1025, 4096, 8193] {
            let n = words * 4 / es;
            if n < 2 {
                continue;
            }
            let src = rng.bytes(n * es);
            let g = Gather::from_parts(es, vec![n], vec![1], 0);
            let resident = match gpu.resident(&g, &src, KernelKind::Copy) {
                Ok(r) => r,
                Err(e) => panic!("{e}"),
            };
            if let Err(e) = resident.run() {
                panic!("{e}");
            }
            match resident.read() {
                Ok(got) => assert_eq!(got, src, "copy kernel, es {es}, {words} words"),
                Err(e) => panic!("{e}"),
            }
            // The same gather through the backend is a host copy, offset included.
            let op = match LayoutOp::new(es, vec![n - 1], vec![1], 1, vec![0]) {
                Ok(op) => op,
                Err(e) => panic!("{e}"),
            };
            assert!(op.simplify().is_copy());
            check(&gpu, &op, &mut rng);
        }
    }
}

// ---- gather_cast: cast.wgsl after the gather kernels, against the reference oracle ----

const FLOATS: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

fn cast_of(from: DType, to: DType) -> Cast {
    match Cast::new(from, to) {
        Ok(Some(c)) => c,
        other => panic!("{from} -> {to}: {other:?}"),
    }
}

/// Every conversion cast.wgsl compiles: each float to each other float but f64.
fn all_casts() -> Vec<Cast> {
    let mut out = Vec::new();
    for from in FLOATS {
        for to in [DType::F32, DType::F16, DType::BF16] {
            if from != to {
                out.push(cast_of(from, to));
            }
        }
    }
    out
}

/// A random mantissa of `bits` bits, half the time an exact tie (or one off it) at a
/// random position, so every rounding shift meets its ties.
fn mantissa(rng: &mut Rng, bits: u32) -> u64 {
    let r = rng.next() & ((1u64 << bits) - 1);
    if rng.below(2) == 0 {
        return r;
    }
    let p = rng.below(bits as usize + 1) as u32;
    let tie = if p == 0 {
        0
    } else {
        (r >> p << p) | (1 << (p - 1))
    };
    match rng.below(3) {
        0 => tie,
        1 => tie.wrapping_sub(1) & ((1u64 << bits) - 1),
        _ => (tie + 1) & ((1u64 << bits) - 1),
    }
}

/// f32 bits: any pattern, exponents from below f16's subnormals to above its maximum,
/// the extremes of f32 itself, with tie-heavy mantissas.
fn f32_bits(rng: &mut Rng) -> u32 {
    let sign = (rng.next() & 1) << 31;
    let e = match rng.below(4) {
        0 => return rng.next() as u32,
        1 | 2 => 98 + rng.below(48) as u64,
        _ => [0, 1, 2, 253, 254, 255][rng.below(6)],
    };
    (sign | e << 23 | mantissa(rng, 23)) as u32
}

/// f64 bits: any pattern, exponents from below f32's subnormals to above its maximum,
/// the extremes of f64, and f32-sized values whose dropped bits sit at or near a tie
/// (the double-rounding cases of f64 -> f32 -> half).
fn f64_bits(rng: &mut Rng) -> u64 {
    let sign = (rng.next() & 1) << 63;
    let e = match rng.below(5) {
        0 => return rng.next(),
        1 | 2 => 1023 - 160 + rng.below(300) as u64,
        3 => [0, 1, 2, 2045, 2046, 2047][rng.below(6)],
        _ => {
            let x = u64::from(f32_bits(rng));
            let e32 = (x >> 23) & 0xFF;
            let e = if e32 == 0 || e32 == 255 {
                1023
            } else {
                e32 + 1023 - 127
            };
            let low = [0x1000_0000, 0x0FFF_FFFF, 0x1000_0001, 1, 0x1FFF_FFFF][rng.below(5)];
            return sign | e << 52 | (x & 0x7F_FFFF) << 29 | low;
        }
    };
    sign | e << 52 | mantissa(rng, 52)
}

/// `n` random elements of `d`, little-endian.
fn float_source(d: DType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * d.size());
    for _ in 0..n {
        match d {
            DType::F64 => out.extend_from_slice(&f64_bits(rng).to_le_bytes()),
            DType::F32 => out.extend_from_slice(&f32_bits(rng).to_le_bytes()),
            _ => out.extend_from_slice(&(rng.next() as u16).to_le_bytes()),
        }
    }
    out
}

/// Runs `g` fused with `cast` on the GPU (output pre-filled with garbage) and on the
/// reference; panics at the first differing element with its source and both results.
fn check_cast(gpu: &Gpu, g: &Gather, cast: Cast, src: &[u8], what: &str) {
    let (fs, ts) = (cast.from().size(), cast.to().size());
    let mut want = vec![0x5Au8; g.len() * ts];
    if let Err(e) = Reference.gather_cast(g, cast, src, &mut want) {
        panic!("{what}: reference on {g:?}: {e}");
    }
    let mut got = vec![0xA5u8; want.len()];
    if let Err(e) = gpu.gather_cast(g, cast, src, &mut got) {
        panic!("{what}: gpu on {g:?}: {e}");
    }
    if let Some(byte) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let i = byte / ts;
        let mut gathered = vec![0u8; g.out_bytes()];
        if let Err(e) = Reference.gather(g, src, &mut gathered) {
            panic!("{e}");
        }
        panic!(
            "{what}: {}->{} of {g:?} (chunk {}) differs at element {i}: source {:02x?}, \
             got {:02x?}, want {:02x?}",
            cast.from(),
            cast.to(),
            gpu.chunk_bytes(),
            &gathered[i * fs..(i + 1) * fs],
            &got[i * ts..(i + 1) * ts],
            &want[i * ts..(i + 1) * ts],
        );
    }
}

/// Runs `op` fused with `cast` over `extra` random elements past its extent.
fn check_cast_op(gpu: &Gpu, op: &LayoutOp, cast: Cast, rng: &mut Rng, what: &str) {
    let extent = op.src_extent().unwrap_or(0);
    let src = float_source(cast.from(), extent + rng.below(3), rng);
    check_cast(gpu, &op.simplify(), cast, &src, &format!("{what} {op:?}"));
}

#[test]
fn every_bf16_and_f16_pattern_casts_like_the_reference_contiguous_and_transposed() {
    let Some(gpu) = open(None) else { return };
    let src: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    for from in [DType::F16, DType::BF16] {
        for to in [DType::F32, DType::F16, DType::BF16] {
            if from == to {
                continue;
            }
            let cast = cast_of(from, to);
            let all = Gather::from_parts(2, vec![1 << 16], vec![1], 0);
            check_cast(&gpu, &all, cast, &src, "every pattern");
            // An odd count from an odd offset: the last output word is half used.
            let odd = Gather::from_parts(2, vec![(1 << 16) - 1], vec![1], 1);
            check_cast(&gpu, &odd, cast, &src, "every pattern but 0, odd count");
            let t = Gather::from_parts(2, vec![256, 256], vec![1, 256], 0);
            assert!(matches!(
                Gpu::kernel_for(&t),
                KernelKind::Transpose2d { .. }
            ));
            check_cast(&gpu, &t, cast, &src, "every pattern transposed");
        }
    }
}

#[test]
fn random_f32_and_f64_patterns_with_ties_cast_like_the_reference() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng::new(0x5eed_0300);
    for cast in all_casts() {
        if !matches!(cast.from(), DType::F32 | DType::F64) {
            continue;
        }
        let n = 1 << 16;
        let src = float_source(cast.from(), n, &mut rng);
        let g = Gather::from_parts(cast.from().size(), vec![n], vec![1], 0);
        check_cast(&gpu, &g, cast, &src, "random patterns");
        let t = Gather::from_parts(cast.from().size(), vec![128, 512], vec![1, 128], 0);
        check_cast(&gpu, &t, cast, &src, "random patterns transposed");
    }
}

/// Expected results fixed by hand from the semantics (torch's `.to()`, the NaN policy),
/// independent of the oracle: `(from, to, source bits, result bits)`.
const SPECIALS: &[(DType, DType, u64, u64)] = &[
    // f32 -> bf16: RNE on bit 16, overflow to inf, subnormals rounded, NaN canonical.
    (DType::F32, DType::BF16, 0x3F80_8000, 0x3F80),
    (DType::F32, DType::BF16, 0x3F81_8000, 0x3F82),
    (DType::F32, DType::BF16, 0x3F80_8001, 0x3F81),
    (DType::F32, DType::BF16, 0x7F7F_FFFF, 0x7F80),
    (DType::F32, DType::BF16, 0xFF7F_FFFF, 0xFF80),
    (DType::F32, DType::BF16, 0x0000_8000, 0x0000),
    (DType::F32, DType::BF16, 0x0001_8000, 0x0002),
    (DType::F32, DType::BF16, 0x8000_0001, 0x8000),
    (DType::F32, DType::BF16, 0x7F80_0001, 0x7FC0),
    (DType::F32, DType::BF16, 0xFFFF_FFFF, 0xFFC0),
    (DType::F32, DType::BF16, 0xFF80_0000, 0xFF80),
    // f32 -> f16: max 65504, 65520 rounds up to inf, subnormals 2^-24 apart.
    (DType::F32, DType::F16, 0x477F_E000, 0x7BFF),
    (DType::F32, DType::F16, 0x477F_EFFF, 0x7BFF),
    (DType::F32, DType::F16, 0x477F_F000, 0x7C00),
    (DType::F32, DType::F16, 0x3380_0000, 0x0001),
    (DType::F32, DType::F16, 0x3300_0000, 0x0000),
    (DType::F32, DType::F16, 0x3300_0001, 0x0001),
    (DType::F32, DType::F16, 0xB3C0_0000, 0x8002),
    (DType::F32, DType::F16, 0x387F_E000, 0x0400),
    (DType::F32, DType::F16, 0x0000_0001, 0x0000),
    (DType::F32, DType::F16, 0x7F80_0000, 0x7C00),
    (DType::F32, DType::F16, 0xFF80_0001, 0xFE00),
    (DType::F32, DType::F16, 0x7FC0_1234, 0x7E00),
    // Widening keeps every bit, NaN payloads included.
    (DType::F16, DType::F32, 0x7C01, 0x7F80_2000),
    (DType::F16, DType::F32, 0xFE00, 0xFFC0_0000),
    (DType::F16, DType::F32, 0x0001, 0x3380_0000),
    (DType::F16, DType::F32, 0x83FF, 0xB87F_C000),
    (DType::F16, DType::F32, 0x7BFF, 0x477F_E000),
    (DType::BF16, DType::F32, 0xFF81, 0xFF81_0000),
    (DType::BF16, DType::F32, 0x0001, 0x0001_0000),
    // Half to half through f32: one rounding, NaN canonical with its sign.
    (DType::BF16, DType::F16, 0x4780, 0x7C00),
    (DType::BF16, DType::F16, 0x3380, 0x0001),
    (DType::BF16, DType::F16, 0xFF81, 0xFE00),
    (DType::F16, DType::BF16, 0x3C01, 0x3F80),
    (DType::F16, DType::BF16, 0x3C03, 0x3F80),
    (DType::F16, DType::BF16, 0x3C05, 0x3F81),
    (DType::F16, DType::BF16, 0x7D00, 0x7FC0),
    (DType::F16, DType::BF16, 0xFC00, 0xFF80),
    // f64 -> f32: RNE on 29 dropped bits, overflow, subnormals, NaN canonical.
    (DType::F64, DType::F32, 0x3FF0_0000_1000_0000, 0x3F80_0000),
    (DType::F64, DType::F32, 0x3FF0_0000_3000_0000, 0x3F80_0002),
    (DType::F64, DType::F32, 0x3FF0_0000_1000_0001, 0x3F80_0001),
    (DType::F64, DType::F32, 0x47EF_FFFF_F000_0000, 0x7F80_0000),
    (DType::F64, DType::F32, 0x47EF_FFFF_EFFF_FFFF, 0x7F7F_FFFF),
    (DType::F64, DType::F32, 0x36A0_0000_0000_0000, 0x0000_0001),
    (DType::F64, DType::F32, 0x3690_0000_0000_0000, 0x0000_0000),
    (DType::F64, DType::F32, 0xB690_0000_0000_0001, 0x8000_0001),
    (DType::F64, DType::F32, 0x0000_0000_0000_0001, 0x0000_0000),
    (DType::F64, DType::F32, 0x7FF0_0000_0000_0001, 0x7FC0_0000),
    (DType::F64, DType::F32, 0xFFF8_0000_0000_0000, 0xFFC0_0000),
    (DType::F64, DType::F32, 0xFFF0_0000_0000_0000, 0xFF80_0000),
    // f64 -> bf16 / f16 rounds twice: 1 + 2^-8 + 2^-30 is 1 + 2^-8 in f32, a bf16 tie
    // that goes to even (one rounding would give 0x3F81); likewise 1 + 2^-11 + 2^-30
    // for f16.
    (DType::F64, DType::BF16, 0x3FF0_1000_0040_0000, 0x3F80),
    (DType::F64, DType::F16, 0x3FF0_0200_0040_0000, 0x3C00),
    (DType::F64, DType::BF16, 0x3FF0_1000_1000_0001, 0x3F81),
    (DType::F64, DType::F16, 0x40F0_0000_0000_0000, 0x7C00),
    (DType::F64, DType::BF16, 0xFFF0_0000_0000_0001, 0xFFC0),
    (DType::F64, DType::F16, 0x7FF0_0000_0000_0001, 0x7E00),
];

#[test]
fn specials_ties_overflow_subnormals_and_nans_cast_to_the_bits_torch_gives() {
    let Some(gpu) = open(None) else { return };
    for cast in all_casts() {
        let (fs, ts) = (cast.from().size(), cast.to().size());
        let cases: Vec<(u64, u64)> = SPECIALS
            .iter()
            .filter(|&&(f, t, _, _)| f == cast.from() && t == cast.to())
            .map(|&(_, _, x, y)| (x, y))
            .collect();
        if cases.is_empty() {
            continue;
        }
        let src: Vec<u8> = cases
            .iter()
            .flat_map(|&(x, _)| x.to_le_bytes()[..fs].to_vec())
            .collect();
        let want: Vec<u8> = cases
            .iter()
            .flat_map(|&(_, y)| y.to_le_bytes()[..ts].to_vec())
            .collect();
        let g = Gather::from_parts(fs, vec![cases.len()], vec![1], 0);
        // The oracle agrees with the hand-made table, and the GPU with the oracle.
        let mut oracle = vec![0u8; want.len()];
        if let Err(e) = Reference.gather_cast(&g, cast, &src, &mut oracle) {
            panic!("{e}");
        }
        let mut got = vec![0xA5u8; want.len()];
        if let Err(e) = gpu.gather_cast(&g, cast, &src, &mut got) {
            panic!("{e}");
        }
        for (k, &(x, y)) in cases.iter().enumerate() {
            let bits = |b: &[u8]| {
                let mut w = [0u8; 8];
                w[..ts].copy_from_slice(&b[k * ts..(k + 1) * ts]);
                u64::from_le_bytes(w)
            };
            let name = format!("{}->{} of {x:#x}", cast.from(), cast.to());
            assert_eq!(bits(&oracle), y, "reference {name}");
            assert_eq!(bits(&got), y, "gpu {name}");
        }
    }
}

#[test]
fn casts_fused_with_every_gather_kernel_over_strided_sources_match_the_reference() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng::new(0x5eed_0301);
    for cast in all_casts() {
        let es = cast.from().size();
        let mut kinds = Vec::new();
        let mut ops = Vec::new();
        // 2-D transposes around the tiles, plain and from padded, offset storage.
        for &(r, c) in &[(1, 7), (31, 33), (64, 66), (33, 65), (128, 2), (3, 129)] {
            ops.push(strided_op(es, &[r, c], &[0, 1], 0, 0, vec![1, 0]));
            ops.push(strided_op(es, &[r, c], &[0, 1], 3, 5, vec![1, 0]));
        }
        // Batched transposes, OIHW -> HWIO with odd H*W (shifted batches), rank 4 and 5
        // permutations, a reordered padded view that stays row-major (the gather).
        ops.push(strided_op(
            es,
            &[3, 64, 36],
            &[0, 1, 2],
            0,
            0,
            vec![0, 2, 1],
        ));
        ops.push(strided_op(
            es,
            &[8, 4, 3, 3],
            &identity(4),
            0,
            0,
            vec![2, 3, 1, 0],
        ));
        // OIHW starting off the word grid: I batches, shifted for sub-word elements.
        ops.push(strided_op(
            es,
            &[4, 4, 3, 3],
            &identity(4),
            0,
            1,
            vec![2, 3, 1, 0],
        ));
        ops.push(strided_op(
            es,
            &[68, 8, 3, 3],
            &identity(4),
            0,
            0,
            vec![2, 3, 1, 0],
        ));
        ops.push(strided_op(
            es,
            &[2, 3, 5, 8],
            &identity(4),
            0,
            0,
            vec![0, 3, 1, 2],
        ));
        ops.push(strided_op(
            es,
            &[3, 2, 5, 7],
            &[3, 2, 1, 0],
            1,
            3,
            vec![2, 0, 3, 1],
        ));
        ops.push(strided_op(
            es,
            &[2, 3, 4, 2, 3],
            &identity(5),
            1,
            1,
            vec![4, 2, 0, 3, 1],
        ));
        ops.push(strided_op(es, &[6, 5, 9], &[2, 0, 1], 2, 1, identity(3)));
        // Strided 1-D walks and row slices.
        for (n, stride, offset) in [(17, 2, 1), (257, 3, 2), (1, 5, 4), (100, 7, 0)] {
            match LayoutOp::new(es, vec![n], vec![stride], offset, vec![0]) {
                Ok(op) => ops.push(op),
                Err(e) => panic!("{e}"),
            }
        }
        ops.push(strided_op(es, &[9, 13], &[0, 1], 3, 1, identity(2)));
        let mut fused = 0;
        for op in &ops {
            kinds.push(kernel_of(op));
            if gpu.fused_kernel_for(&op.simplify(), cast).is_some() {
                fused += 1;
            }
            check_cast_op(&gpu, op, cast, &mut rng, "fused");
        }
        // Planes ran transposed and cast in one pass; the rest in two.
        assert!(
            fused > 0 && fused < ops.len(),
            "{fused} of {} fused",
            ops.len()
        );
        // Every gather kernel ran fused with this cast.
        let reached = |f: fn(&KernelKind) -> bool| kinds.iter().any(f);
        assert!(
            reached(|k| *k == KernelKind::Gather),
            "{es}-byte: no gather"
        );
        assert!(
            reached(|k| matches!(k, KernelKind::Transpose { .. })),
            "{es}-byte: no transpose: {kinds:?}"
        );
        let t2d = |shifted, remap| KernelKind::Transpose2d { shifted, remap };
        assert!(kinds.contains(&t2d(false, false)), "{kinds:?}");
        assert!(kinds.contains(&t2d(false, true)), "{kinds:?}");
        if es < 4 {
            assert!(kinds.contains(&t2d(true, false)), "{kinds:?}");
        }
    }
}

/// cast.wgsl's fused `transpose` (one pass) in both variants, staged through workgroup
/// memory and straight from registers: every cast over planes whose columns and output
/// words cross the 32 x 32 tile edges, from padded sources starting at any element (the
/// fused kernel reads elements, so no source alignment is needed), batched planes and
/// remapped OIHW -> HWIO planes; each is checked to run fused, and planes whose output
/// rows are not whole target words to fall back to two passes.
#[test]
fn fused_transpose_casts_match_the_reference_around_every_tile_edge_in_both_variants() {
    for staged in [false, true] {
        let Some(gpu) = open_with(None, Some(staged)) else {
            return;
        };
        let mut rng = Rng::new(0x5eed_0305);
        for cast in all_casts() {
            let (es, k) = (cast.from().size(), 4 / cast.to().size());
            let mut ops = Vec::new();
            // Output words per row around 32 (64 rows of 16-bit targets), columns
            // around 32 and 64.
            for &r in &[2, 30, 32 * k, 32 * k + 2, 64 * k - 2, 64 * k + 2] {
                for &c in &[2, 31, 32, 33, 64, 65] {
                    ops.push(strided_op(es, &[r, c], &[0, 1], 0, 0, vec![1, 0]));
                }
                ops.push(strided_op(es, &[r, 35], &[0, 1], 3, 1 + r % 3, vec![1, 0]));
            }
            // [B, R, C] -> [B, C, R] and OIHW -> HWIO (remapped planes of I*H*W columns;
            // an offset source or 1x1 kernels too).
            ops.push(strided_op(
                es,
                &[3, 66, 34],
                &identity(3),
                0,
                1,
                vec![0, 2, 1],
            ));
            for (shape, offset) in [
                ([64, 8, 3, 3], 0),
                ([6, 12, 5, 5], 0),
                ([66, 4, 3, 3], 3),
                ([34, 40, 1, 1], 1),
            ] {
                ops.push(strided_op(
                    es,
                    &shape,
                    &identity(4),
                    0,
                    offset,
                    vec![2, 3, 1, 0],
                ));
            }
            for op in &ops {
                let g = op.simplify();
                let out_rows = *g.shape().last().unwrap_or(&0);
                assert_eq!(
                    gpu.fused_kernel_for(&g, cast),
                    Some(KernelKind::TransposeCast(cast)),
                    "{op:?} -> {g:?} staged {staged}"
                );
                assert_eq!(out_rows % k, 0, "{op:?}");
                check_cast_op(&gpu, op, cast, &mut rng, &format!("fused staged {staged}"));
            }
            // Odd output rows of a 16-bit target would share words: two passes.
            if k == 2 {
                let op = strided_op(es, &[33, 64], &[0, 1], 0, 0, vec![1, 0]);
                assert_eq!(gpu.fused_kernel_for(&op.simplify(), cast), None);
                check_cast_op(&gpu, &op, cast, &mut rng, "odd rows, two passes");
            }
        }
    }
}

#[test]
fn odd_and_boundary_counts_of_cast_elements_are_written_whole() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng::new(0x5eed_0302);
    // cast.wgsl converts 1024 output words per workgroup: 1024 or 2048 elements.
    let counts = [
        1, 2, 3, 5, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049, 4097,
    ];
    for cast in all_casts() {
        let es = cast.from().size();
        for n in counts {
            for (stride, offset) in [(1, 0), (1, 1), (1, 3), (2, 1)] {
                let op = match LayoutOp::new(es, vec![n], vec![stride], offset, vec![0]) {
                    Ok(op) => op,
                    Err(e) => panic!("{e}"),
                };
                check_cast_op(&gpu, &op, cast, &mut rng, "count");
            }
        }
        // A transpose with an odd element count.
        let op = strided_op(es, &[33, 31], &[0, 1], 0, 1, vec![1, 0]);
        check_cast_op(&gpu, &op, cast, &mut rng, "odd transpose");
    }
}

#[test]
fn forced_small_chunks_split_casts_at_every_piece_boundary() {
    let mut rng = Rng::new(0x5eed_0303);
    for chunk in [16, 24, 40, 64, 100, 256, 1000, 4096] {
        let Some(gpu) = open(Some(chunk)) else { return };
        for cast in all_casts() {
            let (fs, ts) = (cast.from().size(), cast.to().size());
            // Every piece is a submit and a wait: keep the many-piece cases small.
            let mut lens: Vec<usize> = Vec::new();
            for per in [chunk / fs, chunk / ts, chunk / fs.max(ts)] {
                for k in [1, 3] {
                    let m = (k * per).min(600);
                    lens.extend([m.saturating_sub(1).max(1), m, m + 1]);
                }
            }
            lens.sort_unstable();
            lens.dedup();
            for &n in &lens {
                for offset in [0, 1] {
                    let op = match LayoutOp::new(fs, vec![n], vec![1], offset, vec![0]) {
                        Ok(op) => op,
                        Err(e) => panic!("{e}"),
                    };
                    check_cast_op(&gpu, &op, cast, &mut rng, "chunked run");
                }
            }
            let rows = (chunk / fs / 3 + 2).min(40);
            let big = if chunk >= 256 { (33, 65) } else { (5, 9) };
            for (r, c) in [(3, rows), (rows, 7), big] {
                let op = strided_op(fs, &[r, c], &[0, 1], 0, 0, vec![1, 0]);
                check_cast_op(&gpu, &op, cast, &mut rng, "chunked transpose");
                let op = strided_op(fs, &[r, c], &[1, 0], 1, 3, vec![0, 1]);
                check_cast_op(&gpu, &op, cast, &mut rng, "chunked strided rows");
            }
            let op = strided_op(fs, &[3, 4, 2, 5], &[3, 2, 1, 0], 1, 2, vec![1, 3, 0, 2]);
            check_cast_op(&gpu, &op, cast, &mut rng, "chunked permutation");
        }
    }
}

#[test]
fn casts_whose_input_or_output_exceeds_one_storage_binding_are_chunked() {
    let Some(gpu) = open(None) else { return };
    let mut rng = Rng::new(0x5eed_0304);
    // bf16 transposed to f32: 72 MiB gathered, 144 MiB converted, above lavapipe's
    // 128 MiB binding; bf16 -> f32 is a shift, so the expectation needs no oracle.
    let (r, c) = (4608, 8192);
    let mut src = vec![0u8; r * c * 2];
    for w in src.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    let g = Gather::from_parts(2, vec![c, r], vec![1, c], 0);
    let mut got = vec![0xA5u8; r * c * 4];
    if let Err(e) = gpu.gather_cast(&g, cast_of(DType::BF16, DType::F32), &src, &mut got) {
        panic!("{e}");
    }
    for j in 0..c {
        for i in 0..r {
            let s = (i * c + j) * 2;
            let d = (j * r + i) * 4;
            let want = u32::from(u16::from_le_bytes([src[s], src[s + 1]])) << 16;
            if got[d..d + 4] != want.to_le_bytes() {
                panic!("first difference at output coordinate [{j}, {i}]");
            }
        }
    }
    // A contiguous f32 -> bf16 run of 144 MiB: its source alone exceeds a binding.
    let n = 36 << 20;
    let mut src = vec![0u8; n * 4];
    for w in src.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    let cast = cast_of(DType::F32, DType::BF16);
    let mut want = vec![0u8; n * 2];
    if let Err(e) = cast_slice(cast, &src, &mut want) {
        panic!("{e}");
    }
    let mut got = vec![0xA5u8; n * 2];
    let g = Gather::from_parts(4, vec![n], vec![1], 0);
    if let Err(e) = gpu.gather_cast(&g, cast, &src, &mut got) {
        panic!("{e}");
    }
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("first difference at output byte {i}");
    }
}

#[test]
fn bad_cast_buffers_are_layout_errors_on_the_gpu() {
    let Some(gpu) = open(None) else { return };
    let cast = cast_of(DType::F32, DType::F16);
    let g = Gather::from_parts(4, vec![4, 4], vec![1, 4], 0);
    let mut dst = [0u8; 32];
    assert!(matches!(
        gpu.gather_cast(&g, cast, &[0u8; 60], &mut dst),
        Err(Error::Layout { .. })
    ));
    assert!(matches!(
        gpu.gather_cast(&g, cast, &[0u8; 64], &mut dst[..30]),
        Err(Error::Layout { .. })
    ));
    let wide = Gather::from_parts(8, vec![4, 4], vec![1, 4], 0);
    assert!(matches!(
        gpu.gather_cast(&wide, cast, &[0u8; 128], &mut dst),
        Err(Error::Layout { .. })
    ));
    let empty = Gather::from_parts(4, vec![0, 4], vec![4, 1], 0);
    assert!(gpu.gather_cast(&empty, cast, &[], &mut []).is_ok());
}
