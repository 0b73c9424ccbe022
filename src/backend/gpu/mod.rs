//! (placeholder until the gpu branch lands)
use crate::error::{Error, Result};

/// Options for opening a GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub adapter: Option<String>,
    pub allow_software: bool,
    pub max_chunk_bytes: Option<usize>,
}

/// GPU backend.
#[derive(Debug)]
pub struct Gpu;

impl Gpu {
    pub fn new(_opts: &GpuOptions) -> Result<Gpu> {
        Err(Error::DeviceUnavailable {
            device: "gpu".to_string(),
            detail: "pending".to_string(),
        })
    }
}

impl super::Backend for Gpu {
    fn name(&self) -> String {
        "gpu".to_string()
    }
    fn gather(&self, _g: &crate::layout::Gather, _s: &[u8], _d: &mut [u8]) -> Result<()> {
        Ok(())
    }
}
