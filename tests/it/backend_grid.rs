//! Every backend against the naive `Reference`, byte for byte, over grids that cross
//! every micro-block, tile and parallel threshold of the CPU backend (run with knobs
//! shrunk so small tensors cross them). One test body per check, instantiated for each
//! backend by `backend_grid!`.

use crate::common::Rng;
use relayout::backend::cpu::{micro_block, Cpu, Simd, Tuning};
use relayout::backend::reference::Reference;
use relayout::backend::{Backend, CAST_STAGE_BYTES};
#[cfg(feature = "gpu")]
use relayout::backend::{Job, Sink, Span};
use relayout::layout::{contiguous_strides, Cast, Gather, LayoutOp, ELEM_SIZES};
use relayout::DType;

/// Knobs small enough that grid tensors of a few KiB cross every CPU threshold.
const SMALL: Tuning = Tuning {
    par_threshold: 1024,
    par_chunk: 256,
    tile_bytes: 64,
    // Every transpose that can stream does, so the grid covers the streaming path.
    stream_threshold: 0,
    // The instantiations below pick each vector level this CPU has.
    simd: Simd::Portable,
};

/// SMALL with the vector level `simd`.
fn small(simd: Simd) -> Tuning {
    Tuning { simd, ..SMALL }
}

/// Byte an output buffer starts as, so unwritten bytes show (the oracle starts as its
/// complement, so a byte both leave unwritten cannot match).
const GARBAGE: u8 = 0xA5;

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// Multi-index of row-major element `i` of `shape`.
fn multi_index(shape: &[usize], mut i: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        idx[k] = i % shape[k].max(1);
        i /= shape[k].max(1);
    }
    idx
}

/// Sizes around a block or threshold `b`: `{b-1, b, b+1, 2b+3}`.
fn around(b: usize) -> Vec<usize> {
    vec![b.saturating_sub(1), b, b + 1, 2 * b + 3]
}

/// Runs `g` on `backend` and on `Reference` and panics at the first differing output
/// element with its multi-index and both byte values.
fn assert_matches_reference(backend: &dyn Backend, g: &Gather, src: &[u8], what: &str) {
    let mut want = vec![!GARBAGE; g.out_bytes()];
    Reference
        .gather(g, src, &mut want)
        .unwrap_or_else(|e| panic!("{what}: reference failed on {g:?}: {e}"));
    let mut got = vec![GARBAGE; g.out_bytes()];
    backend
        .gather(g, src, &mut got)
        .unwrap_or_else(|e| panic!("{what}: {} failed on {g:?}: {e}", backend.name()));
    if let Some(i) = want.iter().zip(&got).position(|(a, b)| a != b) {
        let es = g.elem_size();
        let e = i / es;
        let range = e * es..e * es + es;
        panic!(
            "{what}: {} differs from reference at output index {:?} (element {e}, byte {}) of {g:?}: got {:02x?}, want {:02x?}",
            backend.name(),
            multi_index(g.shape(), e),
            i % es,
            &got[range.clone()],
            &want[range],
        );
    }
}

/// A source storage holding `g` with `slack` extra elements, filled with seeded bytes.
fn storage_for(g: &Gather, slack: usize, seed: u64) -> Vec<u8> {
    random_bytes((g.src_extent() + slack) * g.elem_size(), seed)
}

/// The op evaluated directly, without simplifying: output multi-index `o` reads source
/// axis `perm[k]` at `o[k]`.
fn naive_op(op: &LayoutOp, src: &[u8]) -> Vec<u8> {
    let out_shape = op.out_shape();
    let n: usize = out_shape.iter().product();
    let es = op.elem_size();
    let mut out = Vec::with_capacity(n * es);
    for i in 0..n {
        let o = multi_index(&out_shape, i);
        let mut s = op.offset();
        for (k, &p) in op.perm().iter().enumerate() {
            s += o[k] * op.strides()[p];
        }
        out.extend_from_slice(&src[s * es..s * es + es]);
    }
    out
}

/// All permutations of `0..n` (Heap's algorithm).
fn all_perms(n: usize) -> Vec<Vec<usize>> {
    fn heap(k: usize, a: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if k <= 1 {
            out.push(a.clone());
            return;
        }
        for i in 0..k {
            heap(k - 1, a, out);
            let j = if k % 2 == 0 { i } else { 0 };
            a.swap(j, k - 1);
        }
    }
    let mut out = Vec::new();
    heap(n, &mut (0..n).collect(), &mut out);
    out
}

fn perms_for_rank(rank: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    if rank <= 4 {
        return all_perms(rank);
    }
    let mut perms = vec![(0..rank).collect::<Vec<_>>(), (0..rank).rev().collect()];
    for _ in 0..6 {
        let mut p: Vec<usize> = (0..rank).collect();
        rng.shuffle(&mut p);
        perms.push(p);
    }
    perms
}

/// Source strides for `shape`: contiguous, padded (each axis a little longer than
/// needed, like a slice of a bigger tensor), or random (may be 0 or overlap).
fn strides_for(shape: &[usize], kind: usize, rng: &mut Rng) -> Vec<usize> {
    match kind {
        0 => contiguous_strides(shape),
        1 => {
            let padded: Vec<usize> = shape.iter().map(|&n| n + rng.below(3)).collect();
            contiguous_strides(&padded)
        }
        _ => shape.iter().map(|_| rng.below(12)).collect(),
    }
}

/// 2-D transposes (and strided-row variants) at sizes around every micro-block and
/// tile side, for every element size.
fn transpose_grid(backend: &dyn Backend) {
    let mut seed = 1;
    for es in ELEM_SIZES {
        let mut sizes = vec![0, 1, 2, 5];
        sizes.extend(around(micro_block(es)));
        sizes.extend(around(SMALL.tile_side(es)));
        sizes.sort_unstable();
        sizes.dedup();
        for &r in &sizes {
            for &c in &sizes {
                // out[i][j] = src[off + i*sr + j*sc]: sr = 1 is a transpose of an
                // (c, ld) matrix; sr = 3 reads rows at a stride too.
                for (sr, pad, offset) in [(1, 0, 0), (1, 3, 7), (3, 1, 1)] {
                    seed += 1;
                    let sc = r * sr + pad;
                    let g = Gather::from_parts(es, vec![r, c], vec![sr, sc.max(1)], offset);
                    let src = storage_for(&g, 5, seed);
                    let what = format!("transpose {r}x{c} es {es} sr {sr} pad {pad}");
                    assert_matches_reference(backend, &g, &src, &what);
                }
            }
        }
    }
}

/// Batched transposes and transposes of short contiguous runs (widened elements).
fn batched_and_run_grid(backend: &dyn Backend) {
    let mut seed = 1000;
    for es in ELEM_SIZES {
        let t = SMALL.tile_side(es);
        for &(b, r, c) in &[
            (3, t + 1, t - 1),
            (2, 2 * t + 3, 5),
            (5, 1, t + 1),
            (1, 7, 9),
        ] {
            for run in [1, 2, 3, 4, 8] {
                seed += 1;
                // Source (b, c, r, run) contiguous, output (b, r, c, run).
                let op =
                    LayoutOp::contiguous(es, vec![b, c, r, run], vec![0, 2, 1, 3]).expect("op");
                let src = random_bytes((op.src_extent().expect("extent") + 3) * es, seed);
                for offset in [0, 1, 2] {
                    let s = op.simplify();
                    let g = Gather::raw(
                        s.elem_size(),
                        s.shape().to_vec(),
                        s.strides().to_vec(),
                        offset,
                    );
                    let what = format!("batched {b}x{r}x{c} run {run} es {es} offset {offset}");
                    assert_matches_reference(backend, &g, &src, &what);
                }
            }
        }
    }
}

/// Gathers whose outer axes read a dense set of source columns and whose last axis has
/// the largest stride (OIHW -> HWIO and friends): the CPU runs them as a transpose with
/// permuted output rows. Sizes cross the micro-block and tile on both matrix sides;
/// padded row strides, offsets and non-column-set strides check the guard.
fn column_remap_grid(backend: &dyn Backend) {
    let mut seed = 3000;
    for es in ELEM_SIZES {
        let b = micro_block(es);
        let t = SMALL.tile_side(es);
        // (O, I, H*W): I*H*W and O around the micro-block and tile.
        let mut cases = vec![(b + 1, 2, 9), (b, b / 4 + 1, 4), (t + 3, 3, 3), (5, 2, 3)];
        cases.extend(around(t).into_iter().map(|o| (o, t / 4 + 1, 4)));
        cases.extend(around(b).into_iter().map(|o| (o, 3, b / 3 + 1)));
        for (o, i, hw) in cases {
            let shape = vec![hw, i, o];
            for (pad, offset) in [(0, 0), (3, 5)] {
                seed += 1;
                let strides = vec![1, hw, i * hw + pad];
                let g = Gather::from_parts(es, shape.clone(), strides, offset);
                let src = storage_for(&g, 3, seed);
                let what = format!("column remap o {o} i {i} hw {hw} es {es} pad {pad}");
                assert_matches_reference(backend, &g, &src, &what);
                // Streaming needs a line-aligned output: also run on one, and one element off.
                let mut want = vec![!GARBAGE; g.out_bytes()];
                Reference.gather(&g, &src, &mut want).expect("reference");
                let mut backing = vec![GARBAGE; g.out_bytes() + 128];
                let base = backing.as_ptr() as usize;
                for shift in [0, es] {
                    let at = (64 - base % 64) % 64 + shift;
                    backing.fill(GARBAGE);
                    let out = &mut backing[at..at + g.out_bytes()];
                    backend.gather(&g, &src, out).expect("gather");
                    assert!(out == &want[..], "{what} at line offset {shift} differs");
                }
            }
            // Outer strides that leave gaps or overlap are not a column set.
            for strides in [vec![1, hw + 1, i * hw * 2], vec![2, hw, i * hw * 2]] {
                seed += 1;
                let g = Gather::from_parts(es, shape.clone(), strides, 1);
                let src = storage_for(&g, 3, seed);
                let what = format!("not a column set o {o} i {i} hw {hw} es {es}");
                assert_matches_reference(backend, &g, &src, &what);
            }
        }
        // Rank 4 outer axes in mixed order, and OIHW -> HWIO through LayoutOp.
        for (o, i, h, w) in [(b + 1, 3, 2, 5), (t + 1, 2, 3, 3), (2 * b + 3, b, 1, 2)] {
            seed += 1;
            let op = LayoutOp::contiguous(es, vec![o, i, h, w], vec![2, 3, 1, 0]).expect("op");
            let src = random_bytes(op.src_extent().expect("extent") * es, seed);
            let what = format!("oihw->hwio {o}x{i}x{h}x{w} es {es}");
            assert_matches_reference(backend, &op.simplify(), &src, &what);
            let g = Gather::from_parts(es, vec![i, w, h, o], vec![h * w, 1, w, i * h * w], 0);
            let what = format!("mixed outer order {o}x{i}x{h}x{w} es {es}");
            assert_matches_reference(backend, &g, &src, &what);
        }
    }
}

/// Copies and row gathers at lengths around the parallel threshold and chunk.
fn copy_and_rows_grid(backend: &dyn Backend) {
    let mut seed = 2000;
    for es in ELEM_SIZES {
        let mut lens = vec![0, 1, 3];
        lens.extend(around(SMALL.par_threshold / es));
        lens.extend(around(SMALL.par_chunk / es));
        for &n in &lens {
            for offset in [0, 1, 5] {
                seed += 1;
                let g = Gather::from_parts(es, vec![n], vec![1], offset);
                let src = storage_for(&g, 4, seed);
                assert_matches_reference(backend, &g, &src, &format!("copy {n} es {es}"));
            }
        }
        // Rows: contiguous runs with padding, broadcasts and strided inner axes.
        let rows = SMALL.par_threshold / es / 7 + 3;
        for (cols, sc, sr) in [(7, 1, 9), (7, 0, 3), (7, 2, 15), (1, 1, 2), (33, 1, 40)] {
            seed += 1;
            let g = Gather::from_parts(es, vec![rows, cols], vec![sr, sc], 2);
            let src = storage_for(&g, 4, seed);
            let what = format!("rows {rows}x{cols} es {es} strides [{sr}, {sc}]");
            assert_matches_reference(backend, &g, &src, &what);
        }
    }
}

/// Ranks 0 to 8: every permutation up to rank 4, seeded random ones above; contiguous,
/// padded and random-stride (aliasing) sources; simplified and raw gathers.
fn permutation_grid(backend: &dyn Backend) {
    let mut rng = Rng::new(42);
    for rank in 0..=8usize {
        for draw in 0..3 {
            let max_dim = if rank <= 4 { 6 } else { 3 };
            let shape: Vec<usize> = (0..rank)
                .map(|_| {
                    // Mostly >1 so axes survive, some 1s to be dropped, rarely 0.
                    match rng.below(12) {
                        0 if draw == 2 => 0,
                        1 => 1,
                        _ => 2 + rng.below(max_dim - 1),
                    }
                })
                .collect();
            for perm in perms_for_rank(rank, &mut rng) {
                let es = ELEM_SIZES[rng.below(4)];
                for kind in 0..3 {
                    let strides = strides_for(&shape, kind, &mut rng);
                    let offset = rng.below(4);
                    let op = LayoutOp::new(es, shape.clone(), strides, offset, perm.clone())
                        .expect("op");
                    let seed = rng.next();
                    let src = random_bytes((op.src_extent().expect("extent") + 2) * es, seed);
                    let what = format!("{op:?}");
                    let simplified = op.simplify();
                    assert_matches_reference(backend, &simplified, &src, &what);
                    // The same walk, unnormalised (size-1 axes, mergeable axes kept).
                    let raw = Gather::raw(
                        es,
                        op.out_shape(),
                        perm.iter().map(|&p| op.strides()[p]).collect(),
                        offset,
                    );
                    assert_matches_reference(backend, &raw, &src, &format!("raw {what}"));
                }
            }
        }
    }
}

/// The simplified op run on the backend equals the op evaluated directly.
fn layout_op_matches_naive(backend: &dyn Backend) {
    let mut rng = Rng::new(7);
    for case in 0..300 {
        let rank = rng.below(7);
        let shape: Vec<usize> = (0..rank).map(|_| 1 + rng.below(5)).collect();
        let mut perm: Vec<usize> = (0..rank).collect();
        rng.shuffle(&mut perm);
        let es = ELEM_SIZES[rng.below(4)];
        let strides = strides_for(&shape, case % 3, &mut rng);
        let op = LayoutOp::new(es, shape, strides, rng.below(9), perm).expect("op");
        let src = random_bytes((op.src_extent().expect("extent") + 1) * es, rng.next());
        let want = naive_op(&op, &src);
        let g = op.simplify();
        let mut got = vec![GARBAGE; g.out_bytes()];
        backend.gather(&g, &src, &mut got).expect("gather");
        if let Some(i) = want.iter().zip(&got).position(|(a, b)| a != b) {
            let e = i / es;
            panic!(
                "{}: {op:?} simplified to {g:?} differs at output index {:?}: got {:02x?}, want {:02x?}",
                backend.name(),
                multi_index(&op.out_shape(), e),
                &got[e * es..e * es + es],
                &want[e * es..e * es + es],
            );
        }
        assert_eq!(want.len(), got.len(), "{op:?}");
    }
}

/// Short sources, wrong output lengths and malformed gathers are errors, not panics.
fn rejects_bad_buffers(backend: &dyn Backend) {
    let g = Gather::from_parts(4, vec![5, 3], vec![1, 5], 2);
    let need = g.src_extent() * 4;
    let src = vec![0u8; need];
    let mut dst = vec![0u8; g.out_bytes()];
    assert!(backend.gather(&g, &src, &mut dst).is_ok());
    assert!(backend.gather(&g, &src[..need - 1], &mut dst).is_err());
    assert!(backend.gather(&g, &src, &mut dst[1..]).is_err());
    let mut long = vec![0u8; g.out_bytes() + 1];
    assert!(backend.gather(&g, &src, &mut long).is_err());
    let bad = [
        Gather::raw(3, vec![2], vec![1], 0),
        Gather::raw(4, vec![2, 2], vec![1], 0),
        Gather::raw(4, vec![usize::MAX / 2, 3], vec![1, 1], 0),
        Gather::raw(8, vec![2], vec![usize::MAX / 4], 0),
    ];
    for g in &bad {
        let mut dst = vec![0u8; 16];
        assert!(backend.gather(g, &[0u8; 64], &mut dst).is_err(), "{g:?}");
    }
}

/// Every conversion: each float source dtype to each different float target.
fn casts() -> Vec<Cast> {
    let mut out = Vec::new();
    for from in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        for to in [DType::F32, DType::F16, DType::BF16] {
            if let Some(c) = Cast::new(from, to).expect("float cast") {
                out.push(c);
            }
        }
    }
    out
}

/// One source element for casts: random bits, a value in the range where the target
/// has subnormals and overflows, a tie of the target, or a special.
fn cast_element(from: DType, rng: &mut Rng) -> u64 {
    let r = rng.next();
    let specials: [u64; 8] = match from {
        DType::F64 => [
            0,
            1 << 63,
            0x7FF0_0000_0000_0000,
            0xFFF8_0000_0000_0001,
            0x7FF0_0000_0000_0001,
            0x47EF_FFFF_F000_0000,
            0x3690_0000_0000_0000,
            0x3FF0_1000_0000_0001,
        ],
        DType::F32 => [
            0,
            1 << 31,
            0x7F80_0000,
            0xFF80_0001,
            0x7FC0_1234,
            0x7F7F_FFFF,
            0x3300_0000,
            0x477F_F000,
        ],
        _ => [0, 0x8000, 0x7C00, 0xFC01, 0x7E00, 0x7F80, 0x7F81, 0x0001],
    };
    match (from, rng.below(6)) {
        (_, 0 | 1) => r,
        (_, 2) => specials[rng.below(specials.len())],
        // Exponents from below the f16 subnormals to above the f16 and f32 maxima.
        (DType::F64, 3 | 4) => (r & 0x800F_FFFF_FFFF_FFFF) | (1023 - 155 + (r >> 52) % 290) << 52,
        (DType::F32, 3 | 4) => (r & 0x807F_FFFF) | (98 + (r >> 40) % 50) << 23,
        // Ties: f64 to f32 (29 dropped bits half, a few ulps off), f32 to bf16 and f16.
        (DType::F64, _) => ((r & 0xBFFF_FFFF_E000_0000) | 0x3800_0000_1000_0000) + (r >> 62),
        (DType::F32, _) if r & 1 == 0 => (r & 0xFFFF_0000) | 0x8000,
        (DType::F32, _) => (r & 0x807F_E000) | 0x1000 | (102 + (r >> 40) % 41) << 23,
        _ => r,
    }
}

fn cast_source(from: DType, elems: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..elems)
        .flat_map(|_| cast_element(from, &mut rng).to_le_bytes()[..from.size()].to_vec())
        .collect()
}

/// Runs `g` fused with `cast` on `backend` and on `Reference` (outputs pre-filled with
/// garbage, the output starting `shift` bytes into its allocation) and panics at the
/// first differing output element with its multi-index, source bits and both results.
fn assert_cast_matches_reference(
    backend: &dyn Backend,
    g: &Gather,
    cast: Cast,
    src: &[u8],
    shift: usize,
    what: &str,
) {
    let (from, to) = (cast.from().size(), cast.to().size());
    let n = g.len() * to;
    let mut want = vec![!GARBAGE; n];
    Reference
        .gather_cast(g, cast, src, &mut want)
        .unwrap_or_else(|e| panic!("{what}: reference failed on {g:?}: {e}"));
    let mut backing = vec![GARBAGE; n + shift];
    let got = &mut backing[shift..];
    backend
        .gather_cast(g, cast, src, got)
        .unwrap_or_else(|e| panic!("{what}: {} failed on {g:?}: {e}", backend.name()));
    if let Some(i) = want.iter().zip(got.iter()).position(|(a, b)| a != b) {
        let e = i / to;
        let mut gathered = vec![0u8; g.out_bytes()];
        Reference.gather(g, src, &mut gathered).expect("gather");
        panic!(
            "{what}: {} {}->{} differs from reference at output index {:?} (element {e}) of {g:?}: source {:02x?}, got {:02x?}, want {:02x?}",
            backend.name(),
            cast.from(),
            cast.to(),
            multi_index(g.shape(), e),
            &gathered[e * from..e * from + from],
            &got[e * to..e * to + to],
            &want[e * to..e * to + to],
        );
    }
}

/// Every cast fused with copies, transposes, batched and permuted gathers over strided
/// and offset sources, at sizes around the micro-block, the tiles, the parallel
/// thresholds and chunks (small and default knobs), the GPU's 4 KiB test chunks and
/// the 256 KiB cast stage.
fn cast_grid(backend: &dyn Backend) {
    let mut seed = 20_000;
    let mut rng = Rng::new(77);
    for cast in casts() {
        let (fs, ts) = (cast.from().size(), cast.to().size());
        let name = format!("{}->{}", cast.from(), cast.to());
        // Copies, and strided 1-D walks, around every threshold in source or output bytes.
        let mut lens = vec![0, 1, 3, 17];
        for bytes in [SMALL.par_threshold, SMALL.par_chunk, 4096] {
            lens.extend(around(bytes / fs));
            lens.extend(around(bytes / ts));
        }
        lens.sort_unstable();
        lens.dedup();
        for &n in &lens {
            for (stride, offset) in [(1, 0), (1, 3), (3, 1)] {
                seed += 1;
                let g = Gather::from_parts(fs, vec![n], vec![stride], offset);
                let src = cast_source(cast.from(), g.src_extent() + 2, seed);
                let what = format!("{name} copy {n} stride {stride} offset {offset}");
                assert_cast_matches_reference(backend, &g, cast, &src, offset % 2, &what);
            }
        }
        // A contiguous run just past the cast stage of host backends.
        let stage = CAST_STAGE_BYTES / fs;
        seed += 1;
        let g = Gather::from_parts(fs, vec![stage + 1], vec![1], 1);
        let src = cast_source(cast.from(), stage + 2, seed);
        assert_cast_matches_reference(backend, &g, cast, &src, 0, &format!("{name} long run"));
        // Transposes around the micro-block and the small tile, with padded and
        // strided rows.
        let mut sizes = vec![1, 5];
        sizes.extend(around(micro_block(fs)));
        sizes.extend(around(SMALL.tile_side(fs)));
        sizes.sort_unstable();
        sizes.dedup();
        for &r in &sizes {
            for &c in &sizes {
                let (sr, pad, offset) = [(1, 0, 0), (1, 3, 7), (3, 1, 1)][rng.below(3)];
                seed += 1;
                let g = Gather::from_parts(fs, vec![r, c], vec![sr, r * sr + pad], offset);
                let src = cast_source(cast.from(), g.src_extent() + 3, seed);
                let what = format!("{name} transpose {r}x{c} sr {sr} pad {pad}");
                assert_cast_matches_reference(backend, &g, cast, &src, 0, &what);
            }
        }
        // Transposes whose rows and columns cross the default tile and stage, so host
        // backends stage them in blocks, some columns short.
        let tile = Tuning::default().tile_side(fs);
        let cols = CAST_STAGE_BYTES / fs / tile + 5;
        for (r, c) in [(tile + 3, cols), (2 * tile + 1, 3), (5, stage / 5 + 3)] {
            seed += 1;
            let g = Gather::from_parts(fs, vec![r, c], vec![1, r + 1], 2);
            let src = cast_source(cast.from(), g.src_extent(), seed);
            let what = format!("{name} staged transpose {r}x{c}");
            assert_cast_matches_reference(backend, &g, cast, &src, 1, &what);
        }
        // Batched transposes and permutations of padded, offset and aliasing sources.
        for (shape, perm) in [
            (vec![3, 9, 17], vec![0, 2, 1]),
            (vec![2, 5, 3, 7], vec![2, 3, 1, 0]),
            (vec![4, 3, 5, 2], vec![3, 1, 0, 2]),
            (vec![33, 2, 40], vec![1, 2, 0]),
        ] {
            for kind in 0..3 {
                seed += 1;
                let strides = strides_for(&shape, kind, &mut rng);
                let op = LayoutOp::new(fs, shape.clone(), strides, rng.below(5), perm.clone())
                    .expect("op");
                let src = cast_source(cast.from(), op.src_extent().expect("extent") + 1, seed);
                let what = format!("{name} {op:?}");
                assert_cast_matches_reference(backend, &op.simplify(), cast, &src, 0, &what);
            }
        }
    }
}

/// Mismatched element sizes, short sources and wrong output lengths are errors.
fn rejects_bad_cast_buffers(backend: &dyn Backend) {
    let cast = Cast::new(DType::F32, DType::BF16)
        .expect("cast")
        .expect("a conversion");
    let g = Gather::from_parts(4, vec![5, 3], vec![1, 5], 2);
    let need = g.src_extent() * 4;
    let src = vec![0u8; need];
    let mut dst = vec![0u8; g.len() * 2];
    assert!(backend.gather_cast(&g, cast, &src, &mut dst).is_ok());
    assert!(backend
        .gather_cast(&g, cast, &src[..need - 1], &mut dst)
        .is_err());
    assert!(backend.gather_cast(&g, cast, &src, &mut dst[1..]).is_err());
    let mut long = vec![0u8; g.len() * 4];
    assert!(backend.gather_cast(&g, cast, &src, &mut long).is_err());
    let wide = Gather::from_parts(8, vec![5, 3], vec![1, 5], 0);
    assert!(backend.gather_cast(&wide, cast, &src, &mut dst).is_err());
}

/// One module of tests per backend: `backend_grid!(name, constructor)`.
macro_rules! backend_grid {
    ($name:ident, optional $ctor:expr) => {
        backend_grid!(@tests $name, $ctor);
    };
    ($name:ident, $ctor:expr) => {
        backend_grid!(@tests $name, Some($ctor));
    };
    (@tests $name:ident, $ctor:expr) => {
        mod $name {
            use super::*;

            /// The backend under test, or `None` when its device is absent (GPU only).
            fn available() -> Option<Box<dyn Backend>> {
                $ctor.map(|b| Box::new(b) as Box<dyn Backend>)
            }

            #[test]
            fn transposes_match_reference() {
                let Some(b) = available() else { return };
                transpose_grid(&*b);
            }

            #[test]
            fn batched_transposes_and_short_runs_match_reference() {
                let Some(b) = available() else { return };
                batched_and_run_grid(&*b);
            }

            #[test]
            fn column_remapped_transposes_match_reference() {
                let Some(b) = available() else { return };
                column_remap_grid(&*b);
            }

            #[test]
            fn copies_and_row_gathers_match_reference() {
                let Some(b) = available() else { return };
                copy_and_rows_grid(&*b);
            }

            #[test]
            fn permutations_of_rank_0_to_8_match_reference() {
                let Some(b) = available() else { return };
                permutation_grid(&*b);
            }

            #[test]
            fn simplified_layout_ops_match_direct_evaluation() {
                let Some(b) = available() else { return };
                layout_op_matches_naive(&*b);
            }

            #[test]
            fn bad_buffers_are_errors() {
                let Some(b) = available() else { return };
                rejects_bad_buffers(&*b);
            }

            #[test]
            fn gather_casts_match_reference() {
                let Some(b) = available() else { return };
                cast_grid(&*b);
            }

            #[test]
            fn bad_cast_buffers_are_errors() {
                let Some(b) = available() else { return };
                rejects_bad_cast_buffers(&*b);
            }
        }
    };
}

backend_grid!(reference, Reference);
backend_grid!(cpu, Cpu::new());
backend_grid!(
    cpu_small_knobs,
    Cpu::new().with_tuning(small(Simd::detect()))
);
backend_grid!(
    cpu_one_thread_small_knobs,
    Cpu::with_threads(1)
        .expect("pool")
        .with_tuning(small(Simd::detect()))
);
backend_grid!(
    cpu_three_threads_small_knobs,
    Cpu::with_threads(3)
        .expect("pool")
        .with_tuning(small(Simd::detect()))
);
// Every vector level on the same grid (a level the CPU lacks falls back to the best it
// has, so these never run code the CPU cannot).
backend_grid!(
    cpu_portable_small_knobs,
    Cpu::new().with_tuning(small(Simd::Portable))
);
backend_grid!(
    cpu_sse2_small_knobs,
    Cpu::new().with_tuning(small(Simd::Sse2))
);
backend_grid!(
    cpu_avx2_small_knobs,
    Cpu::new().with_tuning(small(Simd::Avx2))
);

#[test]
fn this_cpu_runs_its_best_vector_level() {
    let best = Simd::detect();
    assert_eq!(Cpu::new().tuning().simd, best);
    assert_eq!(Simd::available().last(), Some(&best));
    assert_eq!(
        Cpu::new().with_tuning(small(Simd::Avx2)).tuning().simd,
        best
    );
}

/// Default knobs: tensors just past the real parallel threshold and tile sides.
#[test]
fn cpu_default_knobs_match_reference_past_real_thresholds() {
    let cpu = Cpu::new();
    let t = cpu.tuning();
    let mut seed = 9000;
    for es in ELEM_SIZES {
        let side = t.tile_side(es);
        let n = (t.par_threshold / es).isqrt() + 1;
        for (r, c) in [
            (side + 1, 2 * side + 3),
            (n, n + 3),
            (3, t.par_chunk / es + 1),
        ] {
            seed += 1;
            let g = Gather::from_parts(es, vec![r, c], vec![1, r], 0);
            let src = storage_for(&g, 0, seed);
            assert_matches_reference(&cpu, &g, &src, &format!("default {r}x{c} es {es}"));
        }
        let n = t.par_threshold / es + t.par_chunk / es + 1;
        let g = Gather::from_parts(es, vec![n], vec![1], 1);
        let src = storage_for(&g, 0, seed);
        assert_matches_reference(&cpu, &g, &src, &format!("default copy {n} es {es}"));
    }
}

/// Streaming transposes need output rows that are whole cache lines and shift their
/// micro-blocks onto line boundaries: every output alignment, row counts around the
/// micro-block and widths of one and several lines, against the reference.
#[test]
fn cpu_streaming_transposes_match_reference_at_every_output_alignment() {
    for simd in Simd::available() {
        streaming_transposes_match_reference(&Cpu::new().with_tuning(small(simd)));
    }
}

fn streaming_transposes_match_reference(cpu: &Cpu) {
    let mut seed = 9500;
    for es in ELEM_SIZES {
        let b = micro_block(es);
        let line = 64 / es;
        for cols in [line, 2 * line, 3 * line + line] {
            for rows in [1, b - 1, b, b + 1, 2 * b + 3] {
                seed += 1;
                let g = Gather::from_parts(es, vec![rows, cols], vec![1, rows + 1], 3);
                let src = storage_for(&g, 2, seed);
                let mut want = vec![0u8; g.out_bytes()];
                Reference.gather(&g, &src, &mut want).expect("reference");
                // Over-allocate and slide the output window through every element offset
                // of a line.
                let mut backing = vec![GARBAGE; g.out_bytes() + 64];
                let base = backing.as_ptr() as usize;
                for shift in (0..64).step_by(es) {
                    let at = (64 - base % 64 + shift) % 64;
                    backing.fill(GARBAGE);
                    let out = &mut backing[at..at + g.out_bytes()];
                    cpu.gather(&g, &src, out).expect("gather");
                    assert!(
                        out == &want[..],
                        "streaming transpose {rows}x{cols} es {es} at line offset {shift} differs"
                    );
                }
            }
        }
    }
}

/// Element bytes move untouched: every f32 and bf16 NaN payload, signed zero and
/// subnormal pattern survives a transpose.
#[test]
fn cpu_transpose_keeps_nan_payloads() {
    let cpu = Cpu::new().with_tuning(SMALL);
    let patterns: [u32; 6] = [
        0x7fc0_0001,
        0xffbf_ffff,
        0x7f80_0001,
        0x8000_0000,
        0x0000_0001,
        0x7fa5_a5a5,
    ];
    let (r, c) = (37, 41);
    let src: Vec<u8> = (0..r * c)
        .flat_map(|i| patterns[i % patterns.len()].to_ne_bytes())
        .collect();
    for es in [2, 4] {
        let n = r * c * 4 / es;
        let g = Gather::from_parts(es, vec![n / r, r], vec![1, n / r], 0);
        let mut got = vec![0u8; g.out_bytes()];
        cpu.gather(&g, &src, &mut got).expect("gather");
        let mut back = vec![0u8; g.out_bytes()];
        let inverse = Gather::from_parts(es, vec![r, n / r], vec![1, r], 0);
        cpu.gather(&inverse, &got, &mut back).expect("gather");
        assert_eq!(back, src, "es {es}");
    }
}

/// A GPU for the grid: any adapter, software included. `None` (the GPU grid is skipped)
/// when there is none, unless RELAYOUT_REQUIRE_GPU=1, which makes that a failure.
#[cfg(feature = "gpu")]
fn gpu(max_chunk_bytes: Option<usize>) -> Option<relayout::backend::gpu::Gpu> {
    use relayout::backend::gpu::{Gpu, GpuOptions};
    crate::common::gpu_or_skip(Gpu::new(&match max_chunk_bytes {
        Some(n) => GpuOptions::new(None, true).with_max_chunk_bytes(n),
        None => GpuOptions::new(None, true),
    }))
}

#[cfg(feature = "gpu")]
backend_grid!(gpu, optional gpu(None));
// Chunks of 4 KiB force every grid case through the chunked, pipelined path.
#[cfg(feature = "gpu")]
backend_grid!(gpu_small_chunks, optional gpu(Some(4096)));

/// A backend run the way the converter runs it: every gather handed over as a job of
/// bands of 8191 output bytes through `Backend::run`, so a device backend holds the
/// source and streams the bands from its held windows without draining between them.
#[cfg(feature = "gpu")]
struct AsTensor<B: Backend>(B);

#[cfg(feature = "gpu")]
impl<B: Backend> AsTensor<B> {
    fn run(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        src: &[u8],
        dst: &mut [u8],
    ) -> relayout::Result<()> {
        // Buffer sizes are checked by the plain call, which reports them as the grid expects.
        let want = match cast {
            None => g.out_bytes(),
            Some(c) => g.len() * c.to().size(),
        };
        let job = match Job::new(vec![(src, g.clone())], cast, 8191) {
            Ok(job) if dst.len() == want => job,
            // An invalid gather or source is the plain call's error to report.
            _ => {
                return match cast {
                    None => self.0.gather(g, src, dst),
                    Some(c) => self.0.gather_cast(g, c, src, dst),
                }
            }
        };
        let mut sink = Whole(dst);
        self.0.run(&[job], &mut sink, &mut |_| Ok(()))
    }
}

/// One job's output buffer as a sink.
#[cfg(feature = "gpu")]
struct Whole<'d>(&'d mut [u8]);

#[cfg(feature = "gpu")]
impl Sink for Whole<'_> {
    fn band(&mut self, _job: usize, spans: &[Span]) -> relayout::Result<Vec<&mut [u8]>> {
        let [s] = spans else {
            panic!("an element-wise band writes one span, not {}", spans.len());
        };
        assert_eq!(s.output(), 0);
        Ok(vec![&mut self.0[s.at()..s.at() + s.len()]])
    }
}

#[cfg(feature = "gpu")]
impl<B: Backend> Backend for AsTensor<B> {
    fn name(&self) -> String {
        format!("{} (held source, bands)", self.0.name())
    }

    fn gather(&self, g: &Gather, src: &[u8], dst: &mut [u8]) -> relayout::Result<()> {
        self.run(g, None, src, dst)
    }

    fn gather_cast(
        &self,
        g: &Gather,
        cast: Cast,
        src: &[u8],
        dst: &mut [u8],
    ) -> relayout::Result<()> {
        self.run(g, Some(cast), src, dst)
    }
}

// The held-source planner over the whole grid, in windows and pieces of 4 KiB.
#[cfg(feature = "gpu")]
backend_grid!(gpu_held_small_chunks, optional gpu(Some(4096)).map(AsTensor));
