//! The naive oracle every other backend is compared with, byte for byte.
//!
//! It is deliberately slow and obvious: each output element, in row-major order, turns
//! its linear index into a multi-index, takes `offset + Σ i_k · strides[k]` as its source
//! element and copies that element's bytes. Nothing is merged, tiled or parallel.

use crate::backend::{check_buffers, Backend};
use crate::error::{Error, Result};
use crate::layout::Gather;

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
            let mut rem = i;
            let mut elem = g.offset;
            for (&n, &s) in g.shape.iter().zip(&g.strides).rev() {
                elem += (rem % n) * s;
                rem /= n;
            }
            // check_buffers bounded every index; `get` keeps a broken invariant an error.
            let bytes = src
                .get(elem * es..elem * es + es)
                .ok_or_else(|| Error::Layout {
                    detail: format!("source element {elem} is out of bounds"),
                })?;
            out.copy_from_slice(bytes);
        }
        Ok(())
    }
}
