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
}

impl BackendOptions {
    /// The backend named `device` (`auto`, `cpu`, `gpu`, `reference`), on the adapter
    /// whose name contains `adapter` when one is given.
    pub fn new(device: Device, adapter: Option<String>) -> BackendOptions {
        BackendOptions { device, adapter }
    }

    /// Parses a device name as the CLI's `--device` and Python's `device=` take it.
    pub fn parse(device: &str, adapter: Option<String>) -> Result<BackendOptions> {
        Ok(BackendOptions::new(device.parse()?, adapter))
    }

    /// Whether a software GPU (lavapipe, llvmpipe, WARP) may be used: only when the
    /// user asked for a GPU by name (`gpu`) or for an adapter by name. `auto` wants
    /// speed, and a software GPU is slower than the CPU backend, so it never takes one.
    pub fn allows_software_gpu(&self) -> bool {
        self.device == Device::Gpu || self.adapter.is_some()
    }
}

/// The one place a backend is chosen.
///
/// `Auto` takes a hardware GPU when one is found and the CPU otherwise; `Gpu` takes a GPU
/// (a software one included, see [`BackendOptions::allows_software_gpu`]) or fails, it
/// never falls back silently.
pub fn select(opts: &BackendOptions) -> Result<Box<dyn Backend>> {
    match opts.device {
        Device::Cpu => Ok(Box::new(cpu::Cpu::new())),
        Device::Reference => Ok(Box::new(reference::Reference)),
        Device::Gpu => open_gpu(opts, opts.allows_software_gpu()),
        Device::Auto => match open_gpu(opts, opts.allows_software_gpu()) {
            Ok(gpu) => Ok(gpu),
            Err(_) => Ok(Box::new(cpu::Cpu::new())),
        },
    }
}

#[cfg(feature = "gpu")]
fn open_gpu(opts: &BackendOptions, allow_software: bool) -> Result<Box<dyn Backend>> {
    let gpu = gpu::Gpu::new(&gpu::GpuOptions::new(opts.adapter.clone(), allow_software))?;
    Ok(Box::new(gpu))
}

#[cfg(not(feature = "gpu"))]
fn open_gpu(_opts: &BackendOptions, _allow_software: bool) -> Result<Box<dyn Backend>> {
    Err(Error::DeviceUnavailable {
        device: "gpu".to_string(),
        detail: "relayout was built without the 'gpu' feature".to_string(),
    })
}
