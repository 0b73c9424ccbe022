//! Cutting a gather into pieces the device can hold: each piece is a box of the output
//! index space whose compact output and whose source window both fit one binding. The
//! device runs the piece as its own gather over the window; the host scatters the compact
//! result into the box's place in the whole output. Pure index math, tested without a
//! device.

use crate::layout::{contiguous_strides, Gather};

/// Highest rank the shaders take (shape and strides are two `vec4<u32>` each).
pub const MAX_RANK: usize = 8;

/// Bytes a window may grow by: its length is rounded up to a word for the upload.
pub const WINDOW_SLACK: usize = 4;

/// Smallest chunk the planner works with: one 8-byte element plus the window slack.
pub const MIN_CHUNK: usize = 16;

/// One box of the output, run on the device as `gather` over the source bytes
/// `window_start .. window_start + window_len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The box as a gather whose offset is relative to the window start (in elements).
    pub gather: Gather,
    /// Byte offset of the window in the source (the first byte the piece reads).
    pub window_start: usize,
    /// Bytes of the source the piece reads from `window_start` (not rounded).
    pub window_len: usize,
    /// Box origin in the whole output's index space.
    pub origin: Vec<usize>,
    /// Box extent along every axis of the whole output.
    pub sizes: Vec<usize>,
}

/// The pieces of `g` (in output order), none with more than `max_out` output bytes or a
/// window of more than `max_window` bytes (slack included). `g` must not be empty.
pub fn plan(g: &Gather, max_out: usize, max_window: usize) -> Vec<Piece> {
    let (shape, strides) = rank_at_least_one(g);
    let sizes = box_sizes(g.elem_size, &shape, &strides, max_out, max_window);
    let rank = shape.len();
    let counts: Vec<usize> = shape
        .iter()
        .zip(&sizes)
        .map(|(&n, &m)| n.div_ceil(m))
        .collect();
    let total: usize = counts.iter().product();
    let mut pieces = Vec::with_capacity(total);
    let mut idx = vec![0usize; rank];
    for _ in 0..total {
        let origin: Vec<usize> = idx.iter().zip(&sizes).map(|(&b, &m)| b * m).collect();
        let extent: Vec<usize> = origin
            .iter()
            .zip(&sizes)
            .zip(&shape)
            .map(|((&a, &m), &n)| m.min(n - a))
            .collect();
        let first = g.offset
            + origin
                .iter()
                .zip(&strides)
                .map(|(&a, &s)| a * s)
                .sum::<usize>();
        let last = first
            + extent
                .iter()
                .zip(&strides)
                .map(|(&n, &s)| (n - 1) * s)
                .sum::<usize>();
        // The window starts at the first element read, whatever its alignment in the
        // source (the host copies it into the upload), so the piece's offset is 0 and
        // sub-word elements line up with words whenever the strides do.
        let window_start = first * g.elem_size;
        let window_len = (last + 1) * g.elem_size - window_start;
        let gather = Gather::from_parts(g.elem_size, extent.clone(), strides.clone(), 0);
        pieces.push(Piece {
            gather,
            window_start,
            window_len,
            origin,
            sizes: extent,
        });
        // Row-major increment of the box index.
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < counts[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    pieces
}

/// The source byte ranges a tensor's gather `g` keeps on the device while its bands
/// run: one range when its whole source window fits `limit` bytes (one binding),
/// otherwise ranges of whole slices along its largest-stride axis, each at most `limit`
/// (rounded up to a word). `None` when the window exceeds `budget` or one slice alone
/// exceeds `limit`: the tensor then streams band by band.
pub fn held_windows(g: &Gather, limit: usize, budget: usize) -> Option<Vec<(usize, usize)>> {
    let es = g.elem_size;
    let lo = g.offset.checked_mul(es)?;
    let hi = g.src_extent().checked_mul(es)?;
    let fits = |a: usize, b: usize| (b - a).next_multiple_of(4) <= limit;
    if hi <= lo || hi - lo > budget {
        return None;
    }
    if fits(lo, hi) {
        return Some(vec![(lo, hi)]);
    }
    let (shape, strides) = rank_at_least_one(g);
    let a = (0..shape.len())
        .filter(|&k| shape[k] > 1)
        .max_by_key(|&k| strides[k])?;
    let rest: usize = (0..shape.len())
        .filter(|&k| k != a)
        .map(|k| (shape[k] - 1) * strides[k])
        .sum();
    let slice = |j: usize| {
        let first = (g.offset + j * strides[a]) * es;
        (first, first + (rest + 1) * es)
    };
    let mut out: Vec<(usize, usize)> = Vec::new();
    for j in 0..shape[a] {
        let (start, end) = slice(j);
        if !fits(start, end) {
            return None;
        }
        match out.last_mut() {
            Some(w) if fits(w.0, end.max(w.1)) => w.1 = end.max(w.1),
            _ => out.push((start, end)),
        }
    }
    Some(out)
}

/// The pieces of `band` (one band of the tensor whose source is held in `windows`, as
/// [`held_windows`] made them), each with the index of the window it reads: the band is
/// cut along its largest-stride axis where its slices move from one window to the next,
/// then into boxes of at most `max_out` output bytes. A piece's gather offset is relative
/// to its window's start; its origin is in the band's output index space. `None` when a
/// slice of the band lies in no single window (then it streams instead).
pub fn held_pieces(
    band: &Gather,
    windows: &[(usize, usize, impl Sized)],
    max_out: usize,
) -> Option<Vec<(usize, Piece)>> {
    let es = band.elem_size;
    let (shape, strides) = rank_at_least_one(band);
    let b = (0..shape.len())
        .filter(|&k| shape[k] > 1)
        .max_by_key(|&k| strides[k])
        .unwrap_or(0);
    let rest: usize = (0..shape.len())
        .filter(|&k| k != b)
        .map(|k| (shape[k] - 1) * strides[k])
        .sum();
    // Runs of consecutive slices j along axis b that one window holds: (window, j0, j1).
    let mut groups: Vec<(usize, usize, usize)> = Vec::new();
    let mut w = 0;
    for j in 0..shape[b] {
        let first = (band.offset + j * strides[b]) * es;
        let end = first + (rest + 1) * es;
        let inside = |k: usize| windows[k].0 <= first && end <= windows[k].1;
        if w >= windows.len() || !inside(w) {
            w = (0..windows.len()).find(|&k| inside(k))?;
        }
        match groups.last_mut() {
            Some(grp) if grp.0 == w && grp.2 == j => grp.2 = j + 1,
            _ => groups.push((w, j, j + 1)),
        }
    }
    let mut out = Vec::new();
    for (w, j0, j1) in groups {
        let mut sub_shape = shape.clone();
        sub_shape[b] = j1 - j0;
        let first = (band.offset + j0 * strides[b]) * es;
        let sub = Gather {
            elem_size: es,
            shape: sub_shape,
            strides: strides.clone(),
            offset: 0,
        };
        for mut p in plan(&sub, max_out, usize::MAX) {
            let at = first + p.window_start - windows[w].0;
            if at % es != 0 {
                return None;
            }
            p.gather.offset = at / es;
            p.origin[b] += j0;
            out.push((w, p));
        }
    }
    Some(out)
}

/// Shape and strides with rank 0 (a scalar) written as one axis of one element.
fn rank_at_least_one(g: &Gather) -> (Vec<usize>, Vec<usize>) {
    if g.shape.is_empty() {
        (vec![1], vec![1])
    } else {
        (g.shape.clone(), g.strides.clone())
    }
}

/// Box extents: start from the whole output (with the axes beyond [`MAX_RANK`] cut to
/// one) and halve the axis that hurts most until both limits hold. An oversized window
/// halves the axis that spans the most source; an oversized output the outermost axis,
/// so the runs the host scatters stay long.
fn box_sizes(
    elem_size: usize,
    shape: &[usize],
    strides: &[usize],
    max_out: usize,
    max_window: usize,
) -> Vec<usize> {
    let max_out = max_out.max(MIN_CHUNK);
    let max_window = max_window.max(MIN_CHUNK);
    let mut m = shape.to_vec();
    let cut = shape.len().saturating_sub(MAX_RANK);
    for v in m.iter_mut().take(cut) {
        *v = 1;
    }
    loop {
        let out = crate::layout::checked_bytes(&m, elem_size).unwrap_or(usize::MAX);
        let span: usize = m.iter().zip(strides).map(|(&n, &s)| (n - 1) * s).sum();
        let window = (span + 1) * elem_size + WINDOW_SLACK;
        // The window first: cutting the axis that spans the most source shrinks the
        // upload and usually the output too, while cutting the output first can leave a
        // window mostly made of bytes the piece never reads.
        let axis = if window > max_window {
            (0..m.len())
                .filter(|&k| m[k] > 1)
                .max_by_key(|&k| (m[k] - 1) * strides[k])
        } else if out > max_out {
            m.iter().position(|&n| n > 1)
        } else {
            None
        };
        match axis {
            Some(k) => m[k] = m[k].div_ceil(2),
            None => return m,
        }
    }
}

/// The contiguous runs that copy a piece's compact output (row-major over `sizes`) into
/// the whole output of `shape`: `(byte offset in the whole output, byte offset in the
/// piece, bytes)`, in increasing order of both offsets.
pub fn runs(
    elem_size: usize,
    shape: &[usize],
    piece: &Piece,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let shape: Vec<usize> = if shape.is_empty() {
        vec![1]
    } else {
        shape.to_vec()
    };
    let rank = shape.len();
    let out_strides = contiguous_strides(&shape);
    // Axes from the innermost outwards join the run while the box spans them whole.
    let mut k = rank - 1;
    let mut run = piece.sizes[k];
    while k > 0 && piece.sizes[k] == shape[k] {
        k -= 1;
        run *= piece.sizes[k];
    }
    let outer: Vec<usize> = piece.sizes[..k].to_vec();
    let count: usize = outer.iter().product();
    let origin = piece.origin.clone();
    let mut idx = vec![0usize; k];
    (0..count).map(move |r| {
        let mut dst = origin[k] * out_strides[k];
        for a in 0..k {
            dst += (origin[a] + idx[a]) * out_strides[a];
        }
        for a in (0..k).rev() {
            idx[a] += 1;
            if idx[a] < outer[a] {
                break;
            }
            idx[a] = 0;
        }
        (dst * elem_size, r * run * elem_size, run * elem_size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs every piece on the host (a naive gather over the window) and scatters it:
    /// the result must equal the naive gather of the whole.
    fn check_plan(g: &Gather, max_out: usize, max_window: usize) {
        let es = g.elem_size;
        let extent = g.src_extent();
        let src: Vec<u8> = (0..extent * es + 3).map(|i| (i * 7 + 1) as u8).collect();
        let want = naive(g, &src);
        let mut got = vec![0xAAu8; g.out_bytes()];
        for p in plan(g, max_out, max_window) {
            assert!(p.gather.out_bytes() <= max_out.max(MIN_CHUNK));
            assert!(p.window_len.next_multiple_of(4) <= max_window.max(MIN_CHUNK));
            assert_eq!(p.gather.offset, 0);
            assert!(p.gather.shape.len() <= MAX_RANK);
            let window = &src[p.window_start..p.window_start + p.window_len];
            let part = naive(&p.gather, window);
            for (d, s, n) in runs(es, &g.shape, &p) {
                got[d..d + n].copy_from_slice(&part[s..s + n]);
            }
        }
        assert_eq!(got, want, "{g:?} max_out {max_out} max_window {max_window}");
    }

    fn naive(g: &Gather, src: &[u8]) -> Vec<u8> {
        let es = g.elem_size;
        let mut out = Vec::with_capacity(g.out_bytes());
        for i in 0..g.len() {
            let mut rem = i;
            let mut off = g.offset;
            for k in (0..g.shape.len()).rev() {
                off += (rem % g.shape[k]) * g.strides[k];
                rem /= g.shape[k];
            }
            out.extend_from_slice(&src[off * es..off * es + es]);
        }
        out
    }

    #[test]
    fn pieces_of_a_transpose_reassemble_the_whole_at_every_chunk_size() {
        for es in [1, 2, 4, 8] {
            let g = Gather::from_parts(es, vec![7, 5], vec![1, 9], 3);
            for chunk in [16, 17, 24, 32, 40, 64, 100, 1000] {
                check_plan(&g, chunk, chunk);
            }
        }
    }

    #[test]
    fn pieces_of_a_batched_strided_gather_reassemble_the_whole() {
        let g = Gather::from_parts(2, vec![3, 4, 5], vec![50, 1, 7], 1);
        for chunk in [16, 20, 48, 96, 500] {
            check_plan(&g, chunk, chunk);
            check_plan(&g, chunk, 10_000);
            check_plan(&g, 10_000, chunk);
        }
    }

    #[test]
    fn a_gather_above_rank_eight_is_cut_into_rank_eight_pieces() {
        let shape = vec![2; 10];
        let strides: Vec<usize> = (0..10).map(|k| 3usize.pow(k as u32)).collect();
        let g = Gather::from_parts(1, shape, strides, 5);
        assert_eq!(g.shape.len(), 10);
        check_plan(&g, 1 << 20, 1 << 20);
        assert_eq!(plan(&g, 1 << 20, 1 << 20).len(), 4);
    }

    #[test]
    fn a_large_transpose_uploads_no_more_source_than_it_reads() {
        let g = Gather::from_parts(4, vec![4096, 4096], vec![1, 4096], 0);
        let pieces = plan(&g, 32 << 20, (32 << 20) + 256);
        let uploaded: usize = pieces.iter().map(|p| p.window_len).sum();
        assert_eq!(pieces.len(), 2);
        assert!(uploaded <= g.out_bytes() + 4096 * 4, "{uploaded}");
    }

    #[test]
    fn a_scalar_gather_is_one_piece_of_one_element() {
        let g = Gather::from_parts(8, vec![], vec![], 2);
        let p = plan(&g, 64, 64);
        assert_eq!(p.len(), 1);
        check_plan(&g, 64, 64);
    }

    #[test]
    fn unaligned_windows_start_at_the_first_element_read_with_offset_zero() {
        let g = Gather::from_parts(1, vec![4, 3], vec![1, 5], 7);
        let p = plan(&g, 1 << 10, 1 << 10);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].window_start, 7);
        assert_eq!(p[0].gather.offset, 0);
        check_plan(&g, 16, 16);
        let g = Gather::from_parts(2, vec![6, 8], vec![1, 6], 3);
        check_plan(&g, 16, 16);
        check_plan(&g, 40, 40);
    }

    /// Holds `g`'s source in windows of at most `limit` bytes, runs every band of
    /// `band_bytes` piece by piece from the windows alone (a naive gather over each
    /// window's bytes) and scatters: each band must equal the naive gather of that band.
    /// Returns the held bytes.
    fn check_held(g: &Gather, limit: usize, band_bytes: usize, max_out: usize) -> Option<usize> {
        let es = g.elem_size;
        let src: Vec<u8> = (0..g.src_extent() * es + 5)
            .map(|i| (i * 13 + 7) as u8)
            .collect();
        let windows = held_windows(g, limit, usize::MAX)?;
        let mut held = 0;
        for (a, b) in &windows {
            assert!(
                (b - a).next_multiple_of(4) <= limit,
                "{g:?}: window {a}..{b}"
            );
            held += b - a;
        }
        let copies: Vec<(usize, usize, Vec<u8>)> = windows
            .iter()
            .map(|&(a, b)| (a, b, src[a..b].to_vec()))
            .collect();
        for (_, band) in g.split(band_bytes) {
            let want = naive(&band, &src);
            let mut got = vec![0xAAu8; band.out_bytes()];
            let pieces = held_pieces(&band, &copies, max_out).expect("every slice in a window");
            for (w, p) in pieces {
                assert!(p.gather.out_bytes() <= max_out.max(MIN_CHUNK));
                let part = naive(&p.gather, &copies[w].2);
                for (d, s, n) in runs(es, &band.shape, &p) {
                    got[d..d + n].copy_from_slice(&part[s..s + n]);
                }
            }
            assert_eq!(got, want, "{g:?} limit {limit} band {band:?}");
        }
        Some(held)
    }

    #[test]
    fn held_windows_serve_every_band_of_transposes_and_convs() {
        // (O, I) -> (I, O); (O, I, 3, 3) -> (3*3, I, O); a batched strided gather.
        let cases = [
            Gather::from_parts(4, vec![37, 29], vec![1, 37], 0),
            Gather::from_parts(2, vec![9, 6, 11], vec![1, 9, 54], 0),
            Gather::from_parts(1, vec![3, 4, 5], vec![50, 1, 7], 2),
            Gather::from_parts(8, vec![5, 7], vec![1, 5], 3),
        ];
        for g in &cases {
            let source = (g.src_extent() - g.offset) * g.elem_size;
            for limit in [64, 100, 256, 1000, 1 << 20] {
                for band in [1, 24, 100, 4096] {
                    for max_out in [16, 64, 1 << 20] {
                        let Some(held) = check_held(g, limit, band, max_out) else {
                            // Only when one slice alone is larger than the limit.
                            assert!(limit < 1000, "{g:?} limit {limit}");
                            continue;
                        };
                        // Disjoint slices: no source byte is held twice (holes between
                        // slices are not held at all).
                        assert!(held <= source, "{g:?} limit {limit}: {held} > {source}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_source_over_the_budget_is_not_held() {
        let g = Gather::from_parts(4, vec![64, 64], vec![1, 64], 0);
        assert!(held_windows(&g, 1 << 20, 64 * 64 * 4 - 1).is_none());
        assert_eq!(
            held_windows(&g, 1 << 20, 64 * 64 * 4),
            Some(vec![(0, 64 * 64 * 4)])
        );
        // A slice larger than one binding cannot be held either.
        assert!(held_windows(&g, 255, 1 << 20).is_none());
    }

    #[test]
    fn a_band_with_a_slice_in_no_window_is_refused() {
        let g = Gather::from_parts(4, vec![8, 8], vec![1, 8], 0);
        let windows = [(0usize, 64usize, ()), (128, 256, ())];
        assert!(held_pieces(&g, &windows, 1 << 20).is_none());
    }
}
