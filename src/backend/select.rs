//! The one place a backend is chosen, and the names users give devices.

#[cfg(feature = "gpu")]
use crate::backend::gpu;
use crate::backend::{cpu, reference, Backend};
use crate::error::{Error, Result};

/// Which backend the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// A hardware GPU when one is found, the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    Gpu,
    /// The naive oracle; for tests and debugging.
    Reference,
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "gpu" => Ok(Device::Gpu),
            "reference" => Ok(Device::Reference),
            other => Err(Error::DeviceUnavailable {
                device: other.to_string(),
                detail: "expected auto, cpu, gpu or reference".to_string(),
            }),
        }
    }
}

/// What [`select`] needs to pick and open a backend.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    pub device: Device,
    /// GPU adapter name (substring) to use instead of the preferred one.
    pub adapter: Option<String>,
    /// Accept a software GPU (lavapipe, llvmpipe, WARP) for `--device gpu`.
    pub allow_software_gpu: bool,
}

/// The one place a backend is chosen.
///
/// `Auto` takes a hardware GPU when one is found and the CPU otherwise; `Gpu` takes a GPU
/// or fails, it never falls back silently.
pub fn select(opts: &BackendOptions) -> Result<Box<dyn Backend>> {
    match opts.device {
        Device::Cpu => Ok(Box::new(cpu::Cpu::new())),
        Device::Reference => Ok(Box::new(reference::Reference)),
        Device::Gpu => open_gpu(opts, opts.allow_software_gpu),
        Device::Auto => match open_gpu(opts, false) {
            Ok(gpu) => Ok(gpu),
            Err(_) => Ok(Box::new(cpu::Cpu::new())),
        },
    }
}

#[cfg(feature = "gpu")]
fn open_gpu(opts: &BackendOptions, allow_software: bool) -> Result<Box<dyn Backend>> {
    let gpu = gpu::Gpu::new(&gpu::GpuOptions {
        adapter: opts.adapter.clone(),
        allow_software,
        max_chunk_bytes: None,
    })?;
    Ok(Box::new(gpu))
}

#[cfg(not(feature = "gpu"))]
fn open_gpu(_opts: &BackendOptions, _allow_software: bool) -> Result<Box<dyn Backend>> {
    Err(Error::DeviceUnavailable {
        device: "gpu".to_string(),
        detail: "relayout was built without the 'gpu' feature".to_string(),
    })
}
