//! (placeholder until the cpu branch lands)
use super::{check_buffers, Backend};
use crate::error::Result;
use crate::layout::Gather;

/// Naive oracle.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Backend for Reference {
    fn name(&self) -> String {
        "reference".to_string()
    }
    fn gather(&self, g: &Gather, src: &[u8], dst: &mut [u8]) -> Result<()> {
        check_buffers(g, src, dst)?;
        let e = g.elem_size;
        for i in 0..g.len() {
            let mut rem = i;
            let mut idx = g.offset;
            for k in (0..g.shape.len()).rev() {
                idx += (rem % g.shape[k]) * g.strides[k];
                rem /= g.shape[k];
            }
            dst[i * e..(i + 1) * e].copy_from_slice(&src[idx * e..(idx + 1) * e]);
        }
        Ok(())
    }
}
