//! The fast CPU backend: memcpy for copies, a cache-tiled transpose for gathers whose
//! innermost output axis is strided (with permuted output rows when the other axes read
//! a dense set of source columns, as OIHW -> HWIO does), and a row walker for everything
//! else; all of them
//! parallel over disjoint output chunks with rayon once a gather is large enough.
//!
//! Kernels see the buffers as slices of `[u8; N]` (N = element size), so they only
//! move bytes: no value is ever interpreted and NaN payloads survive.

use std::sync::Arc;

use bytemuck::Pod;
use rayon::prelude::*;

use crate::backend::{
    check_buffers, check_quantize_buffers, gather_then_cast_in, quantize_staged, Backend, Staging,
    CAST_STAGE_BYTES,
};
use crate::error::{Error, Result};
use crate::layout::quant::Quantize;
use crate::layout::{Cast, Gather};

internal! {
/// Output bytes below which a gather runs on the calling thread: a rayon task costs a
/// few microseconds, about what copying this much costs.
pub const PAR_THRESHOLD: usize = 256 * 1024;
}

internal! {
/// Output bytes per parallel task: large enough to amortise scheduling, small enough to
/// balance load over many cores.
pub const PAR_CHUNK: usize = 512 * 1024;
}

internal! {
/// Side of a transpose cache tile in bytes: 1 KiB source runs keep DRAM streams long
/// (measured best of 256 B to 4 KiB on 64 MiB f32/bf16 transposes); micro-blocks move
/// whole lines, so the tile need not fit L1.
pub const TILE_BYTES: usize = 1024;
}

internal! {
/// Output bytes from which a transpose writes with non-temporal stores: larger outputs
/// do not stay in the last-level cache anyway, and streaming them skips the read for
/// ownership of every output line (a third of the DRAM traffic).
pub const STREAM_THRESHOLD: usize = 16 * 1024 * 1024;
}

internal! {
/// How many micro-blocks ahead a transpose prefetches its source runs: two hides DRAM
/// latency on 64 MiB transposes (one and four measured lower).
pub const PREFETCH_BLOCKS: usize = 2;
}

internal! {
/// Knobs of the CPU backend; tests shrink them so small tensors cross every threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Output bytes from which work is split over threads.
    pub par_threshold: usize,
    /// Output bytes per parallel task (rounded to whole rows / tile rows).
    pub par_chunk: usize,
    /// Transpose tile side in bytes (rounded to whole micro-blocks, at least one).
    pub tile_bytes: usize,
    /// Output bytes from which transposes use non-temporal stores where they can.
    pub stream_threshold: usize,
    /// The vector code of the transposes (the best the CPU has, detected at run time).
    pub simd: Simd,
}
}

internal! {
/// Which vector code the CPU transposes run; every level gives the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// Plain Rust, one element per move (any CPU).
    Portable,
    /// 16-byte squares (every x86_64 CPU).
    Sse2,
    /// 32-byte squares (x86_64 CPUs with AVX2, detected at run time).
    Avx2,
}
}

impl Simd {
    /// The best level this CPU runs.
    pub fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
            Simd::Sse2
        }
        #[cfg(not(target_arch = "x86_64"))]
        Simd::Portable
    }

    /// Every level this CPU runs, the detected one last.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub fn available() -> Vec<Simd> {
        [Simd::Portable, Simd::Sse2, Simd::Avx2]
            .into_iter()
            .filter(|&s| s <= Simd::detect())
            .collect()
    }
}

impl PartialOrd for Simd {
    fn partial_cmp(&self, other: &Simd) -> Option<std::cmp::Ordering> {
        Some((*self as u8).cmp(&(*other as u8)))
    }
}

impl Tuning {
    /// Transpose tile side, in elements, for `elem_size`-byte elements: whole
    /// micro-blocks, at least one.
    pub fn tile_side(&self, elem_size: usize) -> usize {
        let b = micro_block(elem_size);
        (self.tile_bytes / elem_size.max(1) / b).max(1) * b
    }
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            par_threshold: PAR_THRESHOLD,
            par_chunk: PAR_CHUNK,
            tile_bytes: TILE_BYTES,
            stream_threshold: STREAM_THRESHOLD,
            simd: Simd::detect(),
        }
    }
}

internal! {
/// Side of the micro-block of the transpose kernel for each element size: one block
/// row or column is a 64-byte cache line, so a block reads and writes whole lines and
/// needs no line to survive in L1 until the next block, even when power-of-two strides
/// map every line of a tile to the same cache set.
pub const fn micro_block(elem_size: usize) -> usize {
    match elem_size {
        1 => 64,
        2 => 32,
        4 => 16,
        _ => 8,
    }
}
}

/// The CPU backend.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    /// `None` runs on rayon's global pool (all cores).
    pool: Option<Arc<rayon::ThreadPool>>,
    tuning: Tuning,
}

impl Cpu {
    /// A backend using every core through rayon's global pool.
    pub fn new() -> Cpu {
        Cpu::default()
    }

    /// A backend with its own pool of `threads` threads (1 runs everything inline).
    pub fn with_threads(threads: usize) -> Result<Cpu> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| Error::DeviceUnavailable {
                device: "cpu".to_string(),
                detail: format!("cannot start {threads} threads: {e}"),
            })?;
        Ok(Cpu {
            pool: Some(Arc::new(pool)),
            tuning: Tuning::default(),
        })
    }

    internal! {
    /// The same backend with other knobs (a vector level the CPU lacks is lowered to
    /// the best it has).
    pub fn with_tuning(mut self, tuning: Tuning) -> Cpu {
        let best = Simd::detect();
        self.tuning = Tuning {
            simd: if tuning.simd <= best { tuning.simd } else { best },
            ..tuning
        };
        self
    }
    }

    internal! {
    /// The knobs in use.
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }
    }

    fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }
}

impl Backend for Cpu {
    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn gather_cast(&self, g: &Gather, cast: Cast, src: &[u8], dst: &mut [u8]) -> Result<()> {
        // Staged pieces are the parallel tasks, so each piece's gather runs inline on
        // its thread; a stage is at most one task's worth of bytes, and transposes are
        // staged in blocks of a whole tile's rows.
        let inline = Cpu {
            pool: None,
            tuning: Tuning {
                par_threshold: usize::MAX,
                ..self.tuning
            },
        };
        let staging = Staging {
            bytes: CAST_STAGE_BYTES.min(self.tuning.par_chunk),
            parallel: dst.len() >= self.tuning.par_threshold,
            tile_rows: self.tuning.tile_side(cast.from().size()),
        };
        let mut run = move || gather_then_cast_in(&inline, g, cast, src, dst, staging);
        match &self.pool {
            Some(pool) => pool.install(run),
            None => run(),
        }
    }

    fn gather_quantize(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        op: &Quantize,
        src: &[u8],
        dsts: &mut [&mut [u8]],
    ) -> Result<()> {
        check_quantize_buffers(g, cast, op, src, dsts)?;
        // Pieces of whole groups, each gathered, cast and quantized on one thread in a
        // stage that stays in its cache: the gather and the quantization are one pass.
        let inline = Cpu {
            pool: None,
            tuning: Tuning {
                par_threshold: usize::MAX,
                ..self.tuning
            },
        };
        let gs = op.quant().group_size();
        let from = g.elem_size;
        let per = (CAST_STAGE_BYTES.min(self.tuning.par_chunk) / from / gs).max(1) * gs;
        let mut rests: Vec<&mut [u8]> = dsts.iter_mut().map(|d| &mut **d).collect();
        let emitted: Vec<usize> = (0..op.output_count()).filter(|&k| op.emits(k)).collect();
        let mut pieces = Vec::new();
        for (_, piece) in g.split(per * from) {
            let mut outs = Vec::with_capacity(emitted.len());
            for (rest, &k) in rests.iter_mut().zip(&emitted) {
                let len = op.output_bytes(k, piece.len()).unwrap_or(usize::MAX);
                if len > rest.len() {
                    return Err(layout_err("quantize piece outside its buffers".to_string()));
                }
                let (head, tail) = std::mem::take(rest).split_at_mut(len);
                *rest = tail;
                outs.push(head);
            }
            pieces.push((piece, outs));
        }
        let parallel = g.len() * from >= self.tuning.par_threshold && pieces.len() > 1;
        let run = |stage: &mut Vec<u8>, (piece, mut outs): (Gather, Vec<&mut [u8]>)| {
            quantize_staged(&inline, &piece, cast, op, src, &mut outs, true, stage)
        };
        let go = move || {
            if parallel {
                pieces.into_par_iter().try_for_each_init(Vec::new, run)
            } else {
                let mut stage = Vec::new();
                pieces.into_iter().try_for_each(|p| run(&mut stage, p))
            }
        };
        match &self.pool {
            Some(pool) => pool.install(go),
            None => go(),
        }
    }

    fn gather(&self, g: &Gather, src: &[u8], dst: &mut [u8]) -> Result<()> {
        g.validate()?;
        check_buffers(g, src, dst)?;
        let w = g.widen();
        if w.is_empty() {
            return Ok(());
        }
        // Widening keeps the bytes read, so this is within what check_buffers allowed.
        let src = src
            .get(..w.src_extent() * w.elem_size)
            .ok_or_else(|| layout_err("source shorter than the widened gather".to_string()))?;
        let tuning = &self.tuning;
        let mut run = move || match w.elem_size {
            1 => run_typed::<1>(&w, src, dst, tuning),
            2 => run_typed::<2>(&w, src, dst, tuning),
            4 => run_typed::<4>(&w, src, dst, tuning),
            8 => run_typed::<8>(&w, src, dst, tuning),
            n => Err(layout_err(format!("element size {n} is not 1, 2, 4 or 8"))),
        };
        match &self.pool {
            Some(pool) => pool.install(run),
            None => run(),
        }
    }
}

fn layout_err(detail: String) -> Error {
    Error::Layout { detail }
}

/// Runs a validated, widened, non-empty gather over `[u8; N]` elements.
fn run_typed<const N: usize>(g: &Gather, src: &[u8], dst: &mut [u8], t: &Tuning) -> Result<()>
where
    [u8; N]: Pod,
{
    let cast_err = |e| layout_err(format!("buffer is not whole {N}-byte elements: {e:?}"));
    let src: &[[u8; N]] = bytemuck::try_cast_slice(src).map_err(cast_err)?;
    let dst: &mut [[u8; N]] = bytemuck::try_cast_slice_mut(dst).map_err(cast_err)?;
    let parallel = dst.len() * N >= t.par_threshold;
    let rank = g.shape.len();
    if g.is_copy() {
        copy(src, dst, g.offset, parallel, t);
    } else if let Some(cols_of_rows) = column_set(g) {
        let tile = t.tile_side(N);
        match N {
            1 => remap::<N, { micro_block(1) }>(g, &cols_of_rows, src, dst, tile, parallel, t),
            2 => remap::<N, { micro_block(2) }>(g, &cols_of_rows, src, dst, tile, parallel, t),
            4 => remap::<N, { micro_block(4) }>(g, &cols_of_rows, src, dst, tile, parallel, t),
            _ => remap::<N, { micro_block(8) }>(g, &cols_of_rows, src, dst, tile, parallel, t),
        }
    } else if rank >= 2 && g.strides[rank - 1] > 1 {
        let tile = t.tile_side(N);
        match N {
            1 => transpose::<N, { micro_block(1) }>(g, src, dst, tile, parallel, t),
            2 => transpose::<N, { micro_block(2) }>(g, src, dst, tile, parallel, t),
            4 => transpose::<N, { micro_block(4) }>(g, src, dst, tile, parallel, t),
            _ => transpose::<N, { micro_block(8) }>(g, src, dst, tile, parallel, t),
        }
    } else {
        rows(g, src, dst, parallel, t);
    }
    Ok(())
}

fn copy<T: Copy + Send + Sync>(
    src: &[T],
    dst: &mut [T],
    offset: usize,
    parallel: bool,
    t: &Tuning,
) {
    let src = &src[offset..offset + dst.len()];
    if parallel {
        let chunk = (t.par_chunk / size_of::<T>()).max(1);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    } else {
        dst.copy_from_slice(src);
    }
}

/// Source element of output row `row` (a row is one index of every axis but the last).
fn row_base(g: &Gather, mut row: usize) -> usize {
    let rank = g.shape.len();
    let mut base = g.offset;
    for k in (0..rank.saturating_sub(1)).rev() {
        base += (row % g.shape[k]) * g.strides[k];
        row /= g.shape[k];
    }
    base
}

/// Everything that is neither a copy nor a transpose: each output row is a memcpy run
/// (innermost stride 1), a broadcast (stride 0) or a strided walk.
fn rows<T: Copy + Send + Sync>(g: &Gather, src: &[T], dst: &mut [T], parallel: bool, t: &Tuning) {
    let rank = g.shape.len();
    let (cols, stride) = match (g.shape.last(), g.strides.last()) {
        (Some(&c), Some(&s)) => (c, s),
        // Rank 0: one element.
        _ => (1, 0),
    };
    let rows_per_chunk = (t.par_chunk / (cols * size_of::<T>()).max(1)).max(1);
    let run_chunk = |first_row: usize, chunk: &mut [T]| {
        // Walk the row multi-index like an odometer instead of dividing per row.
        let outer = &g.shape[..rank.saturating_sub(1)];
        let mut idx = vec![0usize; outer.len()];
        let mut rem = first_row;
        for k in (0..outer.len()).rev() {
            idx[k] = rem % outer[k];
            rem /= outer[k];
        }
        let mut base = row_base(g, first_row);
        for out in chunk.chunks_mut(cols) {
            match stride {
                1 => out.copy_from_slice(&src[base..base + cols]),
                0 => out.fill(src[base]),
                s => {
                    for (o, v) in out.iter_mut().zip(src[base..].iter().step_by(s)) {
                        *o = *v;
                    }
                }
            }
            for k in (0..outer.len()).rev() {
                idx[k] += 1;
                base += g.strides[k];
                if idx[k] < outer[k] {
                    break;
                }
                base -= outer[k] * g.strides[k];
                idx[k] = 0;
            }
        }
    };
    if parallel {
        dst.par_chunks_mut(rows_per_chunk * cols)
            .enumerate()
            .for_each(|(i, chunk)| run_chunk(i * rows_per_chunk, chunk));
    } else {
        run_chunk(0, dst);
    }
}

/// The last two axes form planes of `rows × cols` output elements whose source strides
/// are `sr` and `sc` (`sc > 1`); the axes before them index planes. Each plane is walked
/// in cache tiles of micro-blocks; parallel tasks take bands of tile rows of a plane,
/// which are contiguous in the output.
fn transpose<const N: usize, const B: usize>(
    g: &Gather,
    src: &[[u8; N]],
    dst: &mut [[u8; N]],
    tile: usize,
    parallel: bool,
    t: &Tuning,
) {
    let rank = g.shape.len();
    let (rows, cols) = (g.shape[rank - 2], g.shape[rank - 1]);
    let (sr, sc) = (g.strides[rank - 2], g.strides[rank - 1]);
    let plane = rows * cols;
    // Streaming needs every output row to start at the same offset in its cache line,
    // so one column shift aligns every micro-block row to a whole line.
    let stream = cfg!(target_arch = "x86_64")
        && sr == 1
        && dst.len() * N >= t.stream_threshold
        && (cols * N) % LINE == 0;
    let band = |plane_idx: usize, r0: usize, out: &mut [[u8; N]]| {
        let base = row_base(g, plane_idx * rows) + r0 * sr;
        let misalign = out.as_ptr() as usize % LINE;
        let head = (LINE - misalign) % LINE / N;
        let p = Plane {
            base,
            sr,
            sc,
            cols,
            head: 0,
        };
        if stream && misalign % N == 0 && head < cols {
            tiles::<N, B, true, true>(src, out, &Plane { head, ..p }, tile, t.simd);
            fence();
        } else if sr == 1 {
            tiles::<N, B, true, false>(src, out, &p, tile, t.simd);
        } else {
            tiles::<N, B, false, false>(src, out, &p, tile, t.simd);
        }
    };
    if parallel {
        let band_rows = band_rows(t, cols * N, tile);
        dst.par_chunks_mut(plane)
            .enumerate()
            .flat_map(|(pi, p)| {
                p.par_chunks_mut(band_rows * cols)
                    .enumerate()
                    .map(move |(bi, b)| (pi, bi, b))
            })
            .for_each(|(pi, bi, out)| band(pi, bi * band_rows, out));
    } else {
        for (pi, out) in dst.chunks_mut(plane).enumerate() {
            band(pi, 0, out);
        }
    }
}

/// Rows per parallel task: about `par_chunk` bytes of `row_bytes`-byte rows, in whole
/// tiles so no task splits a tile.
fn band_rows(t: &Tuning, row_bytes: usize, tile: usize) -> usize {
    (t.par_chunk / row_bytes.max(1)).div_ceil(tile).max(1) * tile
}

/// For a gather of rank 3 or more whose axes before the last read, between them, every
/// source element `offset + c` for `c` in `0..R` exactly once (their strides sorted form
/// a dense mixed radix starting at 1), the source column `c` each output row reads.
/// Such a gather is the transpose of the `[cols, R]` matrix at row stride `sc` with its
/// transposed rows permuted: OIHW -> HWIO is `[H*W, I, O]` with strides `[1, H*W, I*H*W]`.
fn column_set(g: &Gather) -> Option<Vec<usize>> {
    let rank = g.shape.len();
    if rank < 3 {
        return None;
    }
    let outer = &g.shape[..rank - 1];
    let strides = &g.strides[..rank - 1];
    let mut axes: Vec<usize> = (0..outer.len()).collect();
    axes.sort_unstable_by_key(|&a| strides[a]);
    let mut next = 1usize;
    for &a in &axes {
        if strides[a] != next {
            return None;
        }
        next = next.checked_mul(outer[a])?;
    }
    // Matrix rows that overlap their neighbours are not worth a special case.
    if *g.strides.last()? < next {
        return None;
    }
    // Walk output rows like an odometer; `next` rows in all.
    let mut of_row = Vec::with_capacity(next);
    let mut idx = vec![0usize; outer.len()];
    let mut c = 0usize;
    for _ in 0..next {
        of_row.push(c);
        for k in (0..outer.len()).rev() {
            idx[k] += 1;
            c += strides[k];
            if idx[k] < outer[k] {
                break;
            }
            c -= outer[k] * strides[k];
            idx[k] = 0;
        }
    }
    Some(of_row)
}

/// Transposes the `[cols, R]` source matrix whose rows start at `offset + o · sc`,
/// writing transposed row `c` to output row `r` where `col_of_row[r] = c`. Tasks take
/// bands of `c`, which are contiguous runs of the source; their output rows are
/// scattered, so each task gets the `&mut` rows it owns.
fn remap<const N: usize, const B: usize>(
    g: &Gather,
    col_of_row: &[usize],
    src: &[[u8; N]],
    dst: &mut [[u8; N]],
    tile: usize,
    parallel: bool,
    t: &Tuning,
) {
    let rank = g.shape.len();
    let (cols, sc) = (g.shape[rank - 1], g.strides[rank - 1]);
    let stream = cfg!(target_arch = "x86_64")
        && dst.len() * N >= t.stream_threshold
        && (cols * N) % LINE == 0
        && dst.as_ptr() as usize % LINE == 0;
    let mut slots: Vec<Option<&mut [[u8; N]]>> = Vec::new();
    slots.resize_with(col_of_row.len(), || None);
    for (row, &c) in dst.chunks_mut(cols).zip(col_of_row) {
        if let Some(slot) = slots.get_mut(c) {
            *slot = Some(row);
        }
    }
    // column_set made `col_of_row` a bijection onto 0..R, so nothing is dropped.
    let mut rows: Vec<&mut [[u8; N]]> = slots.into_iter().flatten().collect();
    let band = |c0: usize, rows: &mut [&mut [[u8; N]]]| {
        let base = g.offset + c0;
        if stream {
            remap_tiles::<N, B, true>(src, rows, base, sc, cols, tile);
            fence();
        } else {
            remap_tiles::<N, B, false>(src, rows, base, sc, cols, tile);
        }
    };
    if parallel {
        let band_rows = band_rows(t, cols * N, tile);
        rows.par_chunks_mut(band_rows)
            .enumerate()
            .for_each(|(i, r)| band(i * band_rows, r));
    } else {
        band(0, &mut rows);
    }
}

fn remap_tiles<const N: usize, const B: usize, const STREAM: bool>(
    src: &[[u8; N]],
    rows: &mut [&mut [[u8; N]]],
    base: usize,
    sc: usize,
    cols: usize,
    tile: usize,
) {
    let n = rows.len();
    for ct in (0..n).step_by(tile) {
        let ch = tile.min(n - ct);
        for ot in (0..cols).step_by(tile) {
            let ow = tile.min(cols - ot);
            for o in (ot..ot + ow).step_by(B) {
                let bw = B.min(ot + ow - o);
                for c in (ct..ct + ch).step_by(B) {
                    let bh = B.min(ct + ch - c);
                    let s0 = base + c + o * sc;
                    let blk = &mut rows[c..c + bh];
                    // Plain element moves: measured faster here than the SSE2 and AVX2
                    // squares (0.47-0.49x against 0.28-0.37x a 1-thread memcpy for f32
                    // 1024x1024x4x4 on 2 threads), whose output rows lie far apart.
                    for (i, row) in blk.iter_mut().enumerate() {
                        for (j, v) in row[o..o + bw].iter_mut().enumerate() {
                            *v = src[s0 + i + j * sc];
                        }
                    }
                }
            }
        }
    }
}

/// Bytes in a cache line.
const LINE: usize = 64;

/// Orders this thread's non-temporal stores before whatever signals the band is done.
fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence only needs SSE, which every x86_64 CPU has.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
}

/// One band of a plane: output rows starting at source element `base`.
struct Plane {
    base: usize,
    sr: usize,
    sc: usize,
    cols: usize,
    /// Leading columns done element by element so micro-blocks start on a cache line.
    head: usize,
}

fn tiles<const N: usize, const B: usize, const UNIT_ROWS: bool, const STREAM: bool>(
    src: &[[u8; N]],
    out: &mut [[u8; N]],
    p: &Plane,
    tile: usize,
    simd: Simd,
) {
    let cols = p.cols;
    let rows = out.len() / cols;
    let sr = if UNIT_ROWS { 1 } else { p.sr };
    let head = p.head.min(cols);
    for rt in (0..rows).step_by(tile) {
        let rh = tile.min(rows - rt);
        let col_tiles = std::iter::once((0, head)).chain(
            (head..cols)
                .step_by(tile)
                .map(|ct| (ct, tile.min(cols - ct))),
        );
        for (ct, cw) in col_tiles {
            let blk = |r: usize, c: usize, bh: usize, bw: usize, out: &mut [[u8; N]]| {
                let s0 = p.base + r * sr + c * p.sc;
                if bw == B && bh == B {
                    micro::<N, B, UNIT_ROWS, STREAM>(
                        src,
                        out,
                        (s0, sr, p.sc),
                        (r * cols + c, cols),
                        simd,
                    );
                } else {
                    for i in 0..bh {
                        for j in 0..bw {
                            out[(r + i) * cols + c + j] = src[s0 + i * sr + j * p.sc];
                        }
                    }
                }
            };
            for c in (ct..ct + cw).step_by(B) {
                let bw = B.min(ct + cw - c);
                for r in (rt..rt + rh).step_by(B) {
                    blk(r, c, B.min(rt + rh - r), bw, out);
                }
            }
        }
    }
}

/// A full `B × B` block: gather source columns into registers, write output rows.
#[inline(always)]
fn micro<const N: usize, const B: usize, const UNIT_ROWS: bool, const STREAM: bool>(
    src: &[[u8; N]],
    out: &mut [[u8; N]],
    (s0, sr, sc): (usize, usize, usize),
    (d0, cols): (usize, usize),
    simd: Simd,
) {
    #[cfg(target_arch = "x86_64")]
    if UNIT_ROWS && simd != Simd::Portable {
        if simd == Simd::Avx2 {
            // SAFETY: `Simd::Avx2` is only chosen when the CPU has AVX2.
            unsafe { squares::block_avx2::<N, B, STREAM>(src, out, s0, sc, (d0, cols)) };
        } else {
            squares::block_sse2::<N, B, STREAM>(src, out, s0, sc, (d0, cols));
        }
        return;
    }
    let _ = simd;
    let mut blk = [[[0u8; N]; B]; B];
    for (j, col) in blk.iter_mut().enumerate() {
        let s = s0 + j * sc;
        if UNIT_ROWS {
            col.copy_from_slice(&src[s..s + B]);
        } else {
            for (i, v) in col.iter_mut().enumerate() {
                *v = src[s + i * sr];
            }
        }
    }
    for i in 0..B {
        let row = &mut out[d0 + i * cols..d0 + i * cols + B];
        for (j, v) in row.iter_mut().enumerate() {
            *v = blk[j][i];
        }
    }
}

/// x86_64 transposes of vector squares: `K` source runs of `K` elements, one vector
/// each, become as many output rows through `log2(K)` rounds of unpacks. LLVM does not
/// find these shuffles in the portable kernel, which moves one element per instruction.
/// One body serves both levels; a [`Level`] says what differs: SSE2 (part of every
/// x86_64 CPU) has 16-byte vectors, AVX2 (detected at run time) 32-byte ones whose
/// unpacks stay within 16-byte lanes, so one last round exchanges lanes between rows
/// `K / 2` apart. The body is `#[inline(always)]` so it compiles inside each level's
/// entry point, with that level's instructions inlined.
#[cfg(target_arch = "x86_64")]
mod squares {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_loadu_si256, _mm256_permute2x128_si256, _mm256_setzero_si256,
        _mm256_storeu_si256, _mm256_stream_si256, _mm256_unpackhi_epi16, _mm256_unpackhi_epi32,
        _mm256_unpackhi_epi64, _mm256_unpackhi_epi8, _mm256_unpacklo_epi16, _mm256_unpacklo_epi32,
        _mm256_unpacklo_epi64, _mm256_unpacklo_epi8, _mm_loadu_si128, _mm_prefetch,
        _mm_setzero_si128, _mm_storeu_si128, _mm_stream_si128, _mm_unpackhi_epi16,
        _mm_unpackhi_epi32, _mm_unpackhi_epi64, _mm_unpackhi_epi8, _mm_unpacklo_epi16,
        _mm_unpacklo_epi32, _mm_unpacklo_epi64, _mm_unpacklo_epi8, _MM_HINT_NTA,
    };

    /// A vector level: its vector and the moves the squares make with it. A value of
    /// the type is the proof that the CPU has the level's instructions.
    trait Level: Copy {
        type V: Copy;
        /// Bytes in a vector.
        const BYTES: usize;
        fn zero(self) -> Self::V;
        /// The `BYTES` bytes from element `at` on.
        fn load<const N: usize>(self, s: &[[u8; N]], at: usize) -> Self::V;
        /// Stores `BYTES` bytes at element `at`, non-temporally where `STREAM` and the
        /// address is vector-aligned.
        fn store<const N: usize, const STREAM: bool>(
            self,
            d: &mut [[u8; N]],
            at: usize,
            v: Self::V,
        );
        /// Interleaves the low (or high) halves of each 16-byte lane of `a` and `b`, in
        /// units of `width` bytes.
        fn unpack(self, hi: bool, width: usize, a: Self::V, b: Self::V) -> Self::V;
        /// Finishes a square whose 16-byte lanes the unpack rounds have transposed.
        fn cross_lanes<const K: usize>(self, v: [Self::V; K]) -> [Self::V; K];
    }

    /// SSE2, which every x86_64 CPU has.
    #[derive(Clone, Copy)]
    struct Sse2;

    /// AVX2; made only in [`block_avx2`], whose callers have checked the CPU has it.
    #[derive(Clone, Copy)]
    struct Avx2(());

    impl Level for Sse2 {
        type V = __m128i;
        const BYTES: usize = 16;

        #[inline(always)]
        fn zero(self) -> __m128i {
            // SAFETY: an all-zero vector is a valid `__m128i`; SSE2 is baseline on x86_64.
            unsafe { _mm_setzero_si128() }
        }

        #[inline(always)]
        fn load<const N: usize>(self, s: &[[u8; N]], at: usize) -> __m128i {
            let run = &s[at..at + 16 / N];
            // SAFETY: `run` is a bounds-checked slice of exactly 16 bytes and the
            // unaligned load has no alignment requirement; SSE2 is baseline on x86_64.
            unsafe { _mm_loadu_si128(run.as_ptr().cast()) }
        }

        #[inline(always)]
        fn store<const N: usize, const STREAM: bool>(
            self,
            d: &mut [[u8; N]],
            at: usize,
            v: __m128i,
        ) {
            let run = &mut d[at..at + 16 / N];
            let ptr: *mut __m128i = run.as_mut_ptr().cast();
            if STREAM && ptr as usize % 16 == 0 {
                // SAFETY: `run` is a bounds-checked, exclusively borrowed slice of
                // exactly 16 bytes, and the pointer was just checked to be 16-byte aligned.
                unsafe { _mm_stream_si128(ptr, v) }
            } else {
                // SAFETY: as above; the unaligned store has no alignment requirement.
                unsafe { _mm_storeu_si128(ptr, v) }
            }
        }

        #[inline(always)]
        fn unpack(self, hi: bool, width: usize, a: __m128i, b: __m128i) -> __m128i {
            // SAFETY: these intrinsics only need SSE2, which every x86_64 CPU has.
            unsafe {
                match (hi, width) {
                    (false, 1) => _mm_unpacklo_epi8(a, b),
                    (true, 1) => _mm_unpackhi_epi8(a, b),
                    (false, 2) => _mm_unpacklo_epi16(a, b),
                    (true, 2) => _mm_unpackhi_epi16(a, b),
                    (false, 4) => _mm_unpacklo_epi32(a, b),
                    (true, 4) => _mm_unpackhi_epi32(a, b),
                    (false, _) => _mm_unpacklo_epi64(a, b),
                    (true, _) => _mm_unpackhi_epi64(a, b),
                }
            }
        }

        #[inline(always)]
        fn cross_lanes<const K: usize>(self, v: [__m128i; K]) -> [__m128i; K] {
            // One lane: the unpack rounds did it all.
            v
        }
    }

    impl Level for Avx2 {
        type V = __m256i;
        const BYTES: usize = 32;

        #[inline(always)]
        fn zero(self) -> __m256i {
            // SAFETY: an `Avx2` exists only where the CPU has AVX2 (see the type).
            unsafe { _mm256_setzero_si256() }
        }

        #[inline(always)]
        fn load<const N: usize>(self, s: &[[u8; N]], at: usize) -> __m256i {
            let run = &s[at..at + 32 / N];
            // SAFETY: `run` is a bounds-checked slice of exactly 32 bytes; unaligned
            // load; the CPU has AVX2 (see the type).
            unsafe { _mm256_loadu_si256(run.as_ptr().cast()) }
        }

        #[inline(always)]
        fn store<const N: usize, const STREAM: bool>(
            self,
            d: &mut [[u8; N]],
            at: usize,
            v: __m256i,
        ) {
            let run = &mut d[at..at + 32 / N];
            let ptr: *mut __m256i = run.as_mut_ptr().cast();
            if STREAM && ptr as usize % 32 == 0 {
                // SAFETY: `run` is a bounds-checked, exclusively borrowed slice of
                // exactly 32 bytes, the pointer was just checked to be 32-byte aligned,
                // and the CPU has AVX2 (see the type).
                unsafe { _mm256_stream_si256(ptr, v) }
            } else {
                // SAFETY: as above; the unaligned store has no alignment requirement.
                unsafe { _mm256_storeu_si256(ptr, v) }
            }
        }

        #[inline(always)]
        fn unpack(self, hi: bool, width: usize, a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: the CPU has AVX2 (see the type).
            unsafe {
                match (hi, width) {
                    (false, 1) => _mm256_unpacklo_epi8(a, b),
                    (true, 1) => _mm256_unpackhi_epi8(a, b),
                    (false, 2) => _mm256_unpacklo_epi16(a, b),
                    (true, 2) => _mm256_unpackhi_epi16(a, b),
                    (false, 4) => _mm256_unpacklo_epi32(a, b),
                    (true, 4) => _mm256_unpackhi_epi32(a, b),
                    (false, _) => _mm256_unpacklo_epi64(a, b),
                    (true, _) => _mm256_unpackhi_epi64(a, b),
                }
            }
        }

        #[inline(always)]
        fn cross_lanes<const K: usize>(self, v: [__m256i; K]) -> [__m256i; K] {
            let half = K / 2;
            let mut w = v;
            for i in 0..half {
                let (a, b) = (v[i], v[i + half]);
                // SAFETY: the CPU has AVX2 (see the type).
                unsafe {
                    w[i] = _mm256_permute2x128_si256::<0x20>(a, b);
                    w[i + half] = _mm256_permute2x128_si256::<0x31>(a, b);
                }
            }
            w
        }
    }

    /// A `B × B` block (`B` elements = one cache line) as squares of `K = 16 / N`.
    #[inline(always)]
    pub(super) fn block_sse2<const N: usize, const B: usize, const STREAM: bool>(
        src: &[[u8; N]],
        out: &mut [[u8; N]],
        s0: usize,
        sc: usize,
        (d0, cols): (usize, usize),
    ) {
        let o = (d0, cols);
        // Fixed-size arrays per K keep every vector in a register.
        match N {
            1 => squares::<Sse2, N, B, 4, 16, STREAM>(Sse2, src, out, s0, sc, o),
            2 => squares::<Sse2, N, B, 4, 8, STREAM>(Sse2, src, out, s0, sc, o),
            4 => squares::<Sse2, N, B, 4, 4, STREAM>(Sse2, src, out, s0, sc, o),
            _ => squares::<Sse2, N, B, 4, 2, STREAM>(Sse2, src, out, s0, sc, o),
        }
    }

    /// A `B × B` block as squares of `K = 32 / N`.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block_avx2<const N: usize, const B: usize, const STREAM: bool>(
        src: &[[u8; N]],
        out: &mut [[u8; N]],
        s0: usize,
        sc: usize,
        (d0, cols): (usize, usize),
    ) {
        let (l, o) = (Avx2(()), (d0, cols));
        match N {
            1 => squares::<Avx2, N, B, 2, 32, STREAM>(l, src, out, s0, sc, o),
            2 => squares::<Avx2, N, B, 2, 16, STREAM>(l, src, out, s0, sc, o),
            4 => squares::<Avx2, N, B, 2, 8, STREAM>(l, src, out, s0, sc, o),
            _ => squares::<Avx2, N, B, 2, 4, STREAM>(l, src, out, s0, sc, o),
        }
    }

    /// One block of `SQ` squares of side `K` per block row: each square reads `K`
    /// source runs (columns of the output) and writes `K` output rows, rows `cols`
    /// apart from element `d0` on.
    #[inline(always)]
    fn squares<
        L: Level,
        const N: usize,
        const B: usize,
        const SQ: usize,
        const K: usize,
        const STREAM: bool,
    >(
        l: L,
        src: &[[u8; N]],
        out: &mut [[u8; N]],
        s0: usize,
        sc: usize,
        (d0, cols): (usize, usize),
    ) {
        // A block row is one cache line of SQ squares side by side; all of them are
        // transposed before any store so each output line is written in one go, which
        // streaming stores need to fill a write-combining buffer at once.
        debug_assert_eq!(SQ, super::LINE / L::BYTES);
        debug_assert_eq!(B, SQ * K);
        // Source runs are 64 bytes at a stride that is often a multiple of 4 KiB, so
        // their lines share one L1 set and would be evicted between the squares that
        // use each; copying each whole line once into registers or the stack avoids it.
        // The next blocks down the same source runs: the hardware prefetcher loses
        // track of 16+ interleaved streams, and NTA keeps them out of the L1 set that
        // power-of-two strides would thrash.
        for j in 0..B {
            let ahead = src
                .as_ptr()
                .wrapping_add(s0 + j * sc + super::PREFETCH_BLOCKS * B);
            // SAFETY: prefetching never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_NTA>(ahead.cast()) }
        }
        // Plain loops rather than `array::from_fn`: LLVM leaves the 16-byte-element
        // closures out of line, so u8 squares went through a call and memcpy per run.
        let zero = l.zero();
        let mut runs = [[zero; SQ]; B];
        for (j, run) in runs.iter_mut().enumerate() {
            for (q, v) in run.iter_mut().enumerate() {
                *v = l.load(src, s0 + j * sc + q * K);
            }
        }
        for (rq, rg) in (0..B).step_by(K).enumerate() {
            let mut line = [[zero; K]; SQ];
            for (q, sq) in line.iter_mut().enumerate() {
                let mut v = [zero; K];
                for (j, x) in v.iter_mut().enumerate() {
                    *x = runs[q * K + j][rq];
                }
                *sq = square::<L, N, K>(l, v);
            }
            for i in 0..K {
                for (q, sq) in line.iter().enumerate() {
                    l.store::<N, STREAM>(out, d0 + (rg + i) * cols + q * K, sq[i]);
                }
            }
        }
    }

    /// Transposes a `K × K` square of `N`-byte elements held one row per vector: the
    /// unpack rounds transpose each 16-byte lane, then lanes cross between rows.
    #[inline(always)]
    fn square<L: Level, const N: usize, const K: usize>(l: L, mut v: [L::V; K]) -> [L::V; K] {
        // Round with half-distance h: within groups of 2h, pair j with j + h; a lane
        // holds K / lanes elements of each row.
        let lanes = L::BYTES / 16;
        let mut width = N;
        let mut h = 1;
        while h < K / lanes {
            let mut w = v;
            for g in (0..K).step_by(2 * h) {
                for j in 0..h {
                    let (a, b) = (v[g + j], v[g + j + h]);
                    w[g + 2 * j] = l.unpack(false, width, a, b);
                    w[g + 2 * j + 1] = l.unpack(true, width, a, b);
                }
            }
            v = w;
            width *= 2;
            h *= 2;
        }
        l.cross_lanes(v)
    }
}
