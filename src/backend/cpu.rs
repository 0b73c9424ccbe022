//! (placeholder until the cpu branch lands)
use super::reference::Reference;
use super::Backend;
use crate::error::Result;
use crate::layout::Gather;

/// Fast CPU backend.
#[derive(Clone, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Cpu {
        Cpu
    }
}

impl Backend for Cpu {
    fn name(&self) -> String {
        "cpu".to_string()
    }
    fn gather(&self, g: &Gather, src: &[u8], dst: &mut [u8]) -> Result<()> {
        Reference.gather(g, src, dst)
    }
}
