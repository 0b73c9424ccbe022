//! The naive oracle every other backend is compared with, byte for byte.
//!
//! It is deliberately slow and obvious: each output element, in row-major order, turns
//! its linear index into a multi-index, takes `offset + Σ i_k · strides[k]` as its source
//! element and copies that element's bytes. Nothing is merged, tiled or parallel.

use crate::backend::{check_buffers, check_cast_buffers, Backend};
use crate::error::{Error, Result};
use crate::layout::{cast, Cast, Gather};

/// The oracle backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Backend for Reference {
    fn name(&self) -> String {
        "reference".to_string()
    }

    fn gather(&self, g: &Gather, src: &[u8], dst: &mut [u8]) -> Result<()> {
        g.validate()?;
        check_buffers(g, src, dst)?;
        let es = g.elem_size;
        for (i, out) in dst.chunks_exact_mut(es).enumerate() {
            out.copy_from_slice(source_element(g, i, src)?);
        }
        Ok(())
    }

    fn gather_cast(&self, g: &Gather, c: Cast, src: &[u8], dst: &mut [u8]) -> Result<()> {
        check_cast_buffers(g, c, src, dst)?;
        let (from, to) = (c.from().size(), c.to().size());
        for (i, out) in dst.chunks_exact_mut(to).enumerate() {
            // One element as the plain gather finds it, then through the naive cast.
            let mut word = [0u8; 8];
            word[..from].copy_from_slice(source_element(g, i, src)?);
            let bits = cast::reference_cast(c, u64::from_le_bytes(word));
            out.copy_from_slice(&bits.to_le_bytes()[..to]);
        }
        Ok(())
    }
}

/// The bytes of the source element output element `i` reads. The buffer checks bounded
/// every index; `get` keeps a broken invariant an error.
fn source_element<'s>(g: &Gather, i: usize, src: &'s [u8]) -> Result<&'s [u8]> {
    let es = g.elem_size;
    let elem = element_offset(g, i);
    src.get(elem * es..elem * es + es)
        .ok_or_else(|| Error::Layout {
            detail: format!("source element {elem} is out of bounds"),
        })
}

/// Source element of output element `i`: its multi-index dotted with the strides.
fn element_offset(g: &Gather, i: usize) -> usize {
    let mut rem = i;
    let mut elem = g.offset;
    for (&n, &s) in g.shape.iter().zip(&g.strides).rev() {
        elem += (rem % n) * s;
        rem /= n;
    }
    elem
}
