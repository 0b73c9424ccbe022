//! Backends run a [`Gather`] over bytes. They differ only behind [`Backend`]; the one
//! place a backend is chosen is [`select`].

use crate::error::{Error, Result};
use crate::layout::{cast, Cast, Gather};

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

    /// Runs `g` and converts every element by `cast` on its bits: `g.elem_size` is the
    /// size of `cast.from()`, and `dst` receives exactly `g.len()` elements of
    /// `cast.to()`. Every backend gives the same bytes.
    fn gather_cast(&self, g: &Gather, cast: Cast, src: &[u8], dst: &mut [u8]) -> Result<()>;
}

/// Output bytes of `g` converted by `cast` (saturating, as [`Gather::out_bytes`]).
pub fn cast_out_bytes(g: &Gather, cast: Cast) -> usize {
    g.len().saturating_mul(cast.to().size())
}

/// Checks what [`Backend::gather_cast`] relies on: the gather reads `cast.from()`
/// elements, the source holds what it reads and `dst` what the cast writes.
pub fn check_cast_buffers(g: &Gather, cast: Cast, src: &[u8], dst: &[u8]) -> Result<()> {
    g.validate()?;
    if g.elem_size != cast.from().size() {
        return Err(Error::Layout {
            detail: format!(
                "a gather of {}-byte elements cannot be cast from {}",
                g.elem_size,
                cast.from()
            ),
        });
    }
    let want = cast_out_bytes(g, cast);
    if dst.len() != want {
        return Err(Error::Layout {
            detail: format!(
                "output buffer holds {} bytes, the cast writes {want}",
                dst.len()
            ),
        });
    }
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
    Ok(())
}

/// Source bytes gathered per step of [`gather_then_cast`]: small enough to stay in the
/// L2 cache between the gather and the cast, large enough to amortise the calls.
const CAST_STAGE_BYTES: usize = 256 << 10;

/// `gather_cast` for host backends: gathers pieces of `g` into a small staging buffer
/// with `backend`'s own gather, then converts each piece into its place in `dst`.
pub fn gather_then_cast(
    backend: &dyn Backend,
    g: &Gather,
    cast: Cast,
    src: &[u8],
    dst: &mut [u8],
) -> Result<()> {
    check_cast_buffers(g, cast, src, dst)?;
    if g.is_empty() {
        return Ok(());
    }
    let (from, to) = (cast.from().size(), cast.to().size());
    let mut stage = Vec::new();
    for (at, piece) in g.split(CAST_STAGE_BYTES) {
        let n = piece.len();
        stage.clear();
        stage.resize(n * from, 0);
        backend.gather(&piece, src, &mut stage)?;
        let start = at / from * to;
        let out = dst
            .get_mut(start..start + n * to)
            .ok_or_else(|| Error::Layout {
                detail: "cast piece outside the output".to_string(),
            })?;
        cast::cast_slice(cast, &stage, out)?;
    }
    Ok(())
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
