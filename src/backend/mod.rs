//! Backends run a [`Gather`] over bytes. They differ only behind [`Backend`]; the one
//! place a backend is chosen is [`select`].

use crate::error::{Error, Result};
use crate::layout::Gather;

pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod reference;

/// Moves bytes from a strided source into a contiguous output.
pub trait Backend: Send + Sync {
    /// Short name for reports ("reference", "cpu", "gpu (…adapter…)").
    fn name(&self) -> String;

    /// Runs `g`: `src` is the whole storage the gather's offset and strides index into,
    /// `dst` receives exactly `g.out_bytes()` bytes. Never interprets the bytes.
    fn gather(&self, g: &Gather, src: &[u8], dst: &mut [u8]) -> Result<()>;
}

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

/// Checks the sizes a backend relies on, so no backend can index out of bounds.
pub fn check_buffers(g: &Gather, src: &[u8], dst: &[u8]) -> Result<()> {
    let need = g
        .src_extent()
        .checked_mul(g.elem_size)
        .ok_or_else(|| Error::Layout {
            detail: "source extent overflows".to_string(),
        })?;
    if src.len() < need {
        return Err(Error::Layout {
            detail: format!("source holds {} bytes, the op reads {need}", src.len()),
        });
    }
    if dst.len() != g.out_bytes() {
        return Err(Error::Layout {
            detail: format!(
                "output buffer holds {} bytes, the op writes {}",
                dst.len(),
                g.out_bytes()
            ),
        });
    }
    Ok(())
}
