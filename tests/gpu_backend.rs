//! The GPU backend against a naive gather, byte for byte, over grids that cross every
//! tile and chunk size. Needs a device (lavapipe is enough): without one these tests
//! print a note and pass, unless RELAYOUT_REQUIRE_GPU=1, where they fail.
#![cfg(feature = "gpu")]

mod common;
use common::Rng;
use relayout::backend::gpu::{list_adapters, Gpu, GpuOptions, KernelKind};
use relayout::backend::Backend;
use relayout::layout::{contiguous_strides, Gather, LayoutOp};
use relayout::Error;

fn open(max_chunk_bytes: Option<usize>) -> Option<Gpu> {
    open_with(max_chunk_bytes, None)
}

/// `staged`: force transpose2d.wgsl's workgroup-memory staging on or off (None: the
/// adapter's default), so both variants are checked on any adapter.
fn open_with(max_chunk_bytes: Option<usize>, staged: Option<bool>) -> Option<Gpu> {
    let opts = GpuOptions {
        adapter: None,
        allow_software: true,
        max_chunk_bytes,
    };
    let gpu = match staged {
        Some(s) => Gpu::with_staging(&opts, s),
        None => Gpu::new(&opts),
    };
    match gpu {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var("RELAYOUT_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("RELAYOUT_REQUIRE_GPU=1 but no GPU: {e}")
        }
        Err(e) => {
            eprintln!("skipping: no GPU adapter ({e})");
            None
        }
    }
}

/// The oracle: walks the op's own output coordinates, independent of `simplify`.
fn naive(op: &LayoutOp, src: &[u8]) -> Vec<u8> {
    let es = op.elem_size;
    let out_shape = op.out_shape();
    let n: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(n * es);
    for i in 0..n {
        let mut rem = i;
        let mut idx = op.offset;
        for k in (0..out_shape.len()).rev() {
            idx += (rem % out_shape[k]) * op.strides[op.perm[k]];
            rem /= out_shape[k];
        }
        out.extend_from_slice(&src[idx * es..(idx + 1) * es]);
    }
    out
}

/// Runs `op` on the GPU over garbage-filled output and compares with the oracle,
/// naming the first differing output coordinate.
fn check(gpu: &Gpu, op: &LayoutOp, rng: &mut Rng) {
    let es = op.elem_size;
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
        assert_eq!(op.simplify().shape.len(), 10);
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
    let opts = GpuOptions {
        adapter: Some("no adapter is called this".to_string()),
        allow_software: true,
        max_chunk_bytes: None,
    };
    assert!(matches!(
        Gpu::new(&opts),
        Err(Error::DeviceUnavailable { .. })
    ));
}

#[test]
fn software_adapters_are_refused_unless_allowed() {
    if list_adapters().iter().any(|a| !a.software) {
        eprintln!("skipping: a hardware adapter is present");
        return;
    }
    // RELAYOUT_ADAPTER names an adapter explicitly, which overrides the refusal.
    if std::env::var_os("RELAYOUT_ADAPTER").is_some() {
        return;
    }
    let opts = GpuOptions {
        adapter: None,
        allow_software: false,
        max_chunk_bytes: None,
    };
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
                            KernelKind::Transpose2d { shifted: false },
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
            // OIHW -> HWIO with odd H*W: sub-word batches start off the word grid.
            // O and I * H * W multiples of 4, so even bytes take transpose2d.
            for shape in [[4, 4, 3, 3], [68, 8, 3, 3], [132, 4, 1, 3], [8, 40, 5, 5]] {
                let op = strided_op(es, &shape, &identity(4), 0, 0, vec![2, 3, 1, 0]);
                let shifted = es < 4 && (shape[2] * shape[3]) % (4 / es) != 0;
                assert_eq!(
                    kernel_of(&op),
                    KernelKind::Transpose2d { shifted },
                    "{shape:?} es {es}"
                );
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
