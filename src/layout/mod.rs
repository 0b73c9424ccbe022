//! Layout ops and their index math.
//!
//! A [`LayoutOp`] says how one tensor is read (element size, shape, element strides and
//! offset into its storage, as a `.pt` view describes it) and how its axes are permuted
//! into a contiguous output. [`LayoutOp::simplify`] lowers it into the one form every
//! backend runs, a [`Gather`]: output element `i` (row-major over `shape`) comes from
//! source element `offset + Σ i_k · strides[k]`. Simplifying drops size-1 axes and merges
//! axes that stay adjacent, so a contiguous tensor becomes a 1-D copy and a Linear
//! transpose a 2-D one whatever its original rank.

use crate::error::{Error, Result};

pub mod cast;
pub mod quant;
pub use cast::Cast;

/// Element sizes the backends move, in bytes.
pub const ELEM_SIZES: [usize; 4] = [1, 2, 4, 8];

/// Reading a strided source and permuting its axes into a contiguous output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutOp {
    /// Bytes per element: 1, 2, 4 or 8.
    pub(crate) elem_size: usize,
    /// Logical shape of the source tensor.
    pub(crate) shape: Vec<usize>,
    /// Element stride of each source axis inside its storage.
    pub(crate) strides: Vec<usize>,
    /// Element offset of the first element inside its storage.
    pub(crate) offset: usize,
    /// Output axis `k` is source axis `perm[k]`.
    pub(crate) perm: Vec<usize>,
}

impl LayoutOp {
    /// Builds an op, checking that `perm` is a permutation of the source axes and that
    /// every size fits in memory arithmetic.
    pub fn new(
        elem_size: usize,
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
        perm: Vec<usize>,
    ) -> Result<LayoutOp> {
        if !ELEM_SIZES.contains(&elem_size) {
            return Err(layout_err(format!(
                "element size {elem_size} is not 1, 2, 4 or 8"
            )));
        }
        if strides.len() != shape.len() {
            return Err(layout_err(format!(
                "{} strides for a rank {} shape",
                strides.len(),
                shape.len()
            )));
        }
        check_perm(&perm, shape.len())?;
        let op = LayoutOp {
            elem_size,
            shape,
            strides,
            offset,
            perm,
        };
        // Both sizes must be representable before any backend multiplies them.
        op.out_bytes()?;
        op.src_extent()?;
        Ok(op)
    }

    /// Bytes per element: 1, 2, 4 or 8.
    pub fn elem_size(&self) -> usize {
        self.elem_size
    }

    /// Logical shape of the source tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element stride of each source axis inside its storage.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Element offset of the first element inside its storage.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Output axis `k` is source axis `perm[k]`.
    pub fn perm(&self) -> &[usize] {
        &self.perm
    }

    /// A contiguous (row-major) source permuted by `perm`.
    pub fn contiguous(elem_size: usize, shape: Vec<usize>, perm: Vec<usize>) -> Result<LayoutOp> {
        let strides = contiguous_strides(&shape);
        LayoutOp::new(elem_size, shape, strides, 0, perm)
    }

    /// The same op over indices `start..start + len` of source axis `axis` only: the
    /// offset moves to the first index and the axis shrinks, so no byte outside the
    /// slice is read.
    pub fn sliced(mut self, axis: usize, start: usize, len: usize) -> Result<LayoutOp> {
        let n = *self.shape.get(axis).ok_or_else(|| {
            layout_err(format!(
                "slice of axis {axis} of a rank {} tensor",
                self.shape.len()
            ))
        })?;
        let end = start.checked_add(len).filter(|&e| e <= n).ok_or_else(|| {
            layout_err(format!(
                "slice {start}..{start}+{len} of an axis of size {n}"
            ))
        })?;
        if start < end {
            // In range of src_extent, which LayoutOp::new checked: start < n.
            self.offset += start * self.strides[axis];
        }
        self.shape[axis] = len;
        Ok(self)
    }

    /// Shape of the output.
    pub fn out_shape(&self) -> Vec<usize> {
        self.perm.iter().map(|&p| self.shape[p]).collect()
    }

    /// Number of output bytes.
    pub fn out_bytes(&self) -> Result<usize> {
        checked_bytes(&self.shape, self.elem_size)
            .ok_or_else(|| layout_err(format!("shape {:?} overflows", self.shape)))
    }

    /// Number of source elements the op reads up to (offset + last element + 1), 0 when
    /// the tensor is empty.
    pub fn src_extent(&self) -> Result<usize> {
        src_extent(&self.shape, &self.strides, self.offset)
    }

    /// Lowers the op into the canonical [`Gather`] every backend runs.
    pub fn simplify(&self) -> Gather {
        let mut shape = Vec::with_capacity(self.perm.len());
        let mut strides = Vec::with_capacity(self.perm.len());
        for &p in &self.perm {
            shape.push(self.shape[p]);
            strides.push(self.strides[p]);
        }
        Gather::from_parts(self.elem_size, shape, strides, self.offset)
    }
}

/// The canonical op: a row-major walk over `shape` whose element `i` reads source
/// element `offset + Σ i_k · strides[k]`. After `Gather::from_parts` no axis has size 1,
/// no two neighbouring axes can be merged, and an empty gather has shape `[0]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gather {
    /// Bytes per element: 1, 2, 4 or 8.
    pub(crate) elem_size: usize,
    /// Output shape (row-major, contiguous).
    pub(crate) shape: Vec<usize>,
    /// Source element stride of each output axis.
    pub(crate) strides: Vec<usize>,
    /// Source element offset of output element 0.
    pub(crate) offset: usize,
}

impl Gather {
    /// A checked gather: a supported element size, one stride per axis, and output and
    /// source byte sizes that fit in memory arithmetic; normalised like every gather
    /// (size-1 axes dropped, neighbours that stay adjacent merged).
    pub fn new(
        elem_size: usize,
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
    ) -> Result<Gather> {
        let raw = Gather {
            elem_size,
            shape,
            strides,
            offset,
        };
        raw.validate()?;
        Ok(Gather::from_parts(
            raw.elem_size,
            raw.shape,
            raw.strides,
            raw.offset,
        ))
    }

    internal! {
    /// Test hook: a gather exactly as given, unnormalised and unchecked, to prove the
    /// backends refuse or handle what [`Gather::new`] never builds.
    pub fn raw(elem_size: usize, shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Gather {
        Gather {
            elem_size,
            shape,
            strides,
            offset,
        }
    }
    }

    /// Bytes per element: 1, 2, 4 or 8.
    pub fn elem_size(&self) -> usize {
        self.elem_size
    }

    /// Output shape (row-major, contiguous).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Source element stride of each output axis.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Source element offset of output element 0.
    pub fn offset(&self) -> usize {
        self.offset
    }

    internal! {
    /// Normalises a gather: drops size-1 axes and merges neighbours that stay adjacent.
    pub fn from_parts(
        elem_size: usize,
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
    ) -> Gather {
        if shape.contains(&0) {
            return Gather {
                elem_size,
                shape: vec![0],
                strides: vec![1],
                offset: 0,
            };
        }
        let mut out_shape: Vec<usize> = Vec::with_capacity(shape.len());
        let mut out_strides: Vec<usize> = Vec::with_capacity(shape.len());
        for (n, s) in shape.into_iter().zip(strides) {
            if n == 1 {
                continue;
            }
            match (out_shape.last_mut(), out_strides.last_mut()) {
                // The previous axis steps exactly over this whole axis: one longer axis.
                (Some(pn), Some(ps)) if n.checked_mul(s) == Some(*ps) => {
                    *pn *= n;
                    *ps = s;
                }
                _ => {
                    out_shape.push(n);
                    out_strides.push(s);
                }
            }
        }
        Gather {
            elem_size,
            shape: out_shape,
            strides: out_strides,
            offset,
        }
    }
    }

    /// Number of elements written (saturating, so a hand-built gather whose shape
    /// overflows fails [`Gather::validate`] and the buffer checks instead of panicking).
    pub fn len(&self) -> usize {
        checked_numel(&self.shape).unwrap_or(usize::MAX)
    }

    /// True when nothing is written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes written (saturating, see [`Gather::len`]).
    pub fn out_bytes(&self) -> usize {
        self.len().saturating_mul(self.elem_size)
    }

    /// Checks what [`LayoutOp::new`] and [`Gather::new`] guarantee: a supported element
    /// size, one stride per axis, and output and source byte sizes that fit in `usize`.
    /// Backends call it before trusting any field.
    pub fn validate(&self) -> Result<()> {
        if !ELEM_SIZES.contains(&self.elem_size) {
            return Err(layout_err(format!(
                "element size {} is not 1, 2, 4 or 8",
                self.elem_size
            )));
        }
        if self.strides.len() != self.shape.len() {
            return Err(layout_err(format!(
                "{} strides for a rank {} shape",
                self.strides.len(),
                self.shape.len()
            )));
        }
        let overflow = || layout_err(format!("gather of shape {:?} overflows", self.shape));
        checked_bytes(&self.shape, self.elem_size).ok_or_else(overflow)?;
        src_extent(&self.shape, &self.strides, self.offset)?
            .checked_mul(self.elem_size)
            .ok_or_else(overflow)?;
        Ok(())
    }

    /// The same gather over wider elements when the innermost axis is a contiguous run
    /// that whole wider elements tile exactly: every stride, the offset and the run
    /// length must be multiples of the widening factor, so each wide element covers the
    /// same source bytes, in the same order, as the narrow ones it replaces. A bf16
    /// transpose whose runs have even length thus moves u32s. Returns a normalised
    /// gather, unchanged (but normalised) when no widening applies.
    pub fn widen(&self) -> Gather {
        let g = Gather::from_parts(
            self.elem_size,
            self.shape.clone(),
            self.strides.clone(),
            self.offset,
        );
        if g.is_empty() || g.validate().is_err() {
            return g;
        }
        let (Some(&inner), Some(&1)) = (g.shape.last(), g.strides.last()) else {
            return g;
        };
        for wide in [8, 4, 2] {
            if wide <= g.elem_size {
                break;
            }
            let m = wide / g.elem_size;
            let rest = &g.strides[..g.strides.len() - 1];
            if inner % m == 0 && g.offset % m == 0 && rest.iter().all(|s| s % m == 0) {
                let mut shape = g.shape.clone();
                let mut strides: Vec<usize> = rest.iter().map(|s| s / m).collect();
                strides.push(1);
                if let Some(last) = shape.last_mut() {
                    *last = inner / m;
                }
                return Gather::from_parts(wide, shape, strides, g.offset / m);
            }
        }
        g
    }

    /// Source elements the gather reads up to (0 when empty).
    pub fn src_extent(&self) -> usize {
        // LayoutOp::new checked this arithmetic; sub-gathers only shrink it.
        src_extent(&self.shape, &self.strides, self.offset).unwrap_or(usize::MAX)
    }

    /// True when the gather is one contiguous run of the source (a plain copy).
    pub fn is_copy(&self) -> bool {
        self.shape.len() <= 1 && self.strides.first().is_none_or(|&s| s == 1)
    }

    /// Splits the gather into pieces of at most `max_bytes` output bytes each (a piece is
    /// never smaller than one element), in output order. Each item is the byte offset of
    /// the piece inside the whole output and the piece itself.
    pub fn split(&self, max_bytes: usize) -> Vec<(usize, Gather)> {
        let total = self.out_bytes();
        // A rank-0 gather is one element, which is never split.
        if total <= max_bytes || self.is_empty() || self.shape.is_empty() {
            return vec![(0, self.clone())];
        }
        let max_elems = (max_bytes / self.elem_size).max(1);
        // Find the outermost axis k whose inner block (axes after k) fits; slice axis k
        // into runs of `per` indices and walk every index of the axes before it.
        let rank = self.shape.len();
        let mut inner = 1usize;
        let mut k = rank;
        while k > 0 && inner * self.shape[k - 1] <= max_elems {
            inner *= self.shape[k - 1];
            k -= 1;
        }
        // Axis k-1 is the one to slice: `inner` elements per index fit, its whole does not.
        let axis = k - 1;
        let per = (max_elems / inner).max(1);
        let outer: usize = self.shape[..axis].iter().product();
        let mut pieces = Vec::new();
        let mut dst = 0usize;
        for o in 0..outer {
            // Offset of this outer multi-index.
            let mut rem = o;
            let mut base = self.offset;
            for a in (0..axis).rev() {
                base += (rem % self.shape[a]) * self.strides[a];
                rem /= self.shape[a];
            }
            let mut start = 0;
            while start < self.shape[axis] {
                let n = per.min(self.shape[axis] - start);
                let mut shape = vec![n];
                shape.extend_from_slice(&self.shape[axis + 1..]);
                let mut strides = vec![self.strides[axis]];
                strides.extend_from_slice(&self.strides[axis + 1..]);
                let g = Gather::from_parts(
                    self.elem_size,
                    shape,
                    strides,
                    base + start * self.strides[axis],
                );
                let bytes = g.out_bytes();
                pieces.push((dst, g));
                dst += bytes;
                start += n;
            }
        }
        pieces
    }
}

/// Row-major element strides of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1usize;
    for (s, &n) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.saturating_mul(n);
    }
    strides
}

/// Product of `shape`, or `None` on overflow.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n))
}

/// Largest tensor, in bytes, relayout accepts anywhere: 2^63 - 1, the largest size the
/// safetensors format's readers can represent.
pub const MAX_TENSOR_BYTES: u64 = i64::MAX as u64;

/// Bytes of a tensor of `shape` with `elem_size`-byte elements: the one place element
/// counts become byte counts. `None` when the product of the non-zero dimensions and
/// the element size exceeds [`MAX_TENSOR_BYTES`]: a shape like `[0, 2^62, 2^62]` holds
/// nothing, but other readers (which multiply in other orders) overflow on it, so it is
/// invalid too.
pub fn checked_bytes(shape: &[usize], elem_size: usize) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(elem_size, |acc, &d| acc.checked_mul(d))?;
    if nonzero as u64 > MAX_TENSOR_BYTES {
        return None;
    }
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

/// Elements of storage a strided tensor reaches: `offset + Σ (n_k - 1)·s_k + 1`, or 0
/// for an empty tensor. Errors on overflow.
pub fn src_extent(shape: &[usize], strides: &[usize], offset: usize) -> Result<usize> {
    if shape.contains(&0) {
        return Ok(0);
    }
    let overflow = || {
        layout_err(format!(
            "shape {shape:?} with strides {strides:?} overflows"
        ))
    };
    let mut last = offset;
    for (&n, &s) in shape.iter().zip(strides) {
        let step = (n - 1).checked_mul(s).ok_or_else(overflow)?;
        last = last.checked_add(step).ok_or_else(overflow)?;
    }
    last.checked_add(1).ok_or_else(overflow)
}

/// Checks that `perm` is a permutation of `0..rank`.
pub fn check_perm(perm: &[usize], rank: usize) -> Result<()> {
    let mut seen = vec![false; rank];
    if perm.len() != rank {
        return Err(layout_err(format!(
            "permutation {perm:?} has {} axes, the tensor {rank}",
            perm.len()
        )));
    }
    for &p in perm {
        match seen.get_mut(p) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(layout_err(format!(
                    "{perm:?} is not a permutation of 0..{rank}"
                )))
            }
        }
    }
    Ok(())
}

fn layout_err(detail: String) -> Error {
    Error::Layout { detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::reference::Reference;
    use crate::backend::Backend;

    fn run(g: &Gather, src: &[u8]) -> Vec<u8> {
        let mut out = vec![0xA5; g.out_bytes()];
        Reference.gather(g, src, &mut out).expect("reference");
        out
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 + i / 7) as u8).collect()
    }

    #[test]
    fn simplify_drops_size_one_axes_and_merges_contiguous_ones() {
        let op = LayoutOp::contiguous(4, vec![2, 1, 3, 4], vec![0, 1, 2, 3]).expect("op");
        let g = op.simplify();
        assert_eq!((g.shape, g.strides), (vec![24], vec![1]));
        assert!(op.simplify().is_copy());
        // Linear (out, in) -> (in, out) stays a 2-D transpose whatever size-1 axes surround it.
        let op = LayoutOp::contiguous(2, vec![1, 5, 1, 7], vec![3, 2, 1, 0]).expect("op");
        let g = op.simplify();
        assert_eq!((g.shape, g.strides), (vec![7, 5], vec![1, 7]));
        // OIHW -> HWIO merges H and W into one axis.
        let op = LayoutOp::contiguous(4, vec![8, 6, 3, 3], vec![2, 3, 1, 0]).expect("op");
        let g = op.simplify();
        assert_eq!((g.shape, g.strides), (vec![9, 6, 8], vec![1, 9, 54]));
    }

    #[test]
    fn simplify_of_empty_and_rank_zero_ops() {
        let op = LayoutOp::contiguous(8, vec![3, 0, 2], vec![2, 1, 0]).expect("op");
        let g = op.simplify();
        assert_eq!(
            (g.shape.clone(), g.is_empty(), g.out_bytes()),
            (vec![0], true, 0)
        );
        let op = LayoutOp::new(2, vec![], vec![], 5, vec![]).expect("op");
        let g = op.simplify();
        assert!(g.shape.is_empty() && g.is_copy());
        assert_eq!((g.len(), g.offset, g.src_extent()), (1, 5, 6));
    }

    #[test]
    fn split_pieces_concatenate_to_the_whole_and_respect_max_bytes() {
        let ops = [
            LayoutOp::contiguous(4, vec![5, 7, 3], vec![2, 0, 1]),
            LayoutOp::contiguous(2, vec![13, 11], vec![1, 0]),
            LayoutOp::contiguous(1, vec![2, 3, 5, 7], vec![3, 1, 0, 2]),
            LayoutOp::new(8, vec![4, 6], vec![9, 1], 3, vec![1, 0]),
            LayoutOp::new(4, vec![], vec![], 2, vec![]),
        ];
        for op in ops {
            let op = op.expect("op");
            let g = op.simplify();
            let src = bytes(g.src_extent() * g.elem_size);
            let whole = run(&g, &src);
            for max in (0..=g.out_bytes() + 3).chain([1 << 20]) {
                let mut joined = vec![0x5A; g.out_bytes()];
                let mut next = 0;
                for (at, piece) in g.split(max) {
                    assert_eq!(at, next, "{g:?} max {max}: pieces out of order");
                    let n = piece.out_bytes();
                    assert!(
                        n <= max.max(g.elem_size),
                        "{g:?} max {max}: piece of {n} bytes"
                    );
                    joined[at..at + n].copy_from_slice(&run(&piece, &src));
                    next += n;
                }
                assert_eq!(next, g.out_bytes(), "{g:?} max {max}");
                assert_eq!(joined, whole, "{g:?} max {max}");
            }
        }
    }

    #[test]
    fn widen_merges_even_bf16_runs_into_wider_elements() {
        // (A, B, 2) bf16 -> (B, A, 2): the pairs become u32 and the gather a transpose.
        let op = LayoutOp::contiguous(2, vec![3, 5, 2], vec![1, 0, 2]).expect("op");
        let w = op.simplify().widen();
        assert_eq!(
            (w.elem_size, w.shape, w.strides),
            (4, vec![5, 3], vec![1, 5])
        );
        // Runs of 4 f16 become u64.
        let op = LayoutOp::contiguous(2, vec![3, 5, 4], vec![1, 0, 2]).expect("op");
        assert_eq!(op.simplify().widen().elem_size, 8);
        // An odd offset, odd run or odd stride forbids widening.
        for (shape, strides, offset) in [
            (vec![3, 2], vec![2, 1], 1),
            (vec![3, 3], vec![3, 1], 0),
            (vec![3, 2], vec![3, 1], 0),
        ] {
            let g = Gather::from_parts(2, shape, strides, offset);
            assert_eq!(g.widen().elem_size, 2, "{g:?}");
        }
    }

    #[test]
    fn widened_gathers_move_the_same_bytes() {
        for es in [1, 2, 4] {
            for (shape, strides, offset) in [
                (vec![3, 4], vec![8, 1], 0),
                (vec![5, 2, 8], vec![16, 80, 1], 8),
                (vec![2, 3, 2], vec![0, 4, 1], 4),
                (vec![6, 2], vec![2, 1], 2),
            ] {
                let g = Gather::from_parts(es, shape, strides, offset);
                let w = g.widen();
                let src = bytes(g.src_extent() * es + 16);
                assert_eq!(run(&g, &src), run(&w, &src), "{g:?} widened to {w:?}");
            }
        }
    }

    #[test]
    fn validate_rejects_malformed_gathers() {
        let ok = Gather::from_parts(4, vec![2, 3], vec![1, 2], 0);
        assert!(ok.validate().is_ok());
        let mut g = ok.clone();
        g.elem_size = 3;
        assert!(g.validate().is_err());
        let mut g = ok.clone();
        g.strides.pop();
        assert!(g.validate().is_err());
        let mut g = ok.clone();
        g.shape = vec![usize::MAX, 2];
        assert!(g.validate().is_err());
        let mut g = ok;
        g.offset = usize::MAX - 1;
        assert!(g.validate().is_err());
    }
}
