//! Backends run a [`Gather`] over bytes. They differ only behind [`Backend`]; the one
//! place a backend is chosen is [`select`].

use crate::error::{Error, Result};
use crate::layout::quant::Quantize;
use crate::layout::{cast, Cast, Gather};

pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;
mod job;
pub mod reference;
mod select;

#[cfg(feature = "gpu")]
pub(crate) use job::single;
#[cfg(test)]
pub(crate) use job::test_jobs;
pub(crate) use job::Buffers;
pub use job::{run_on_host, Band, Job, Part, Sink, Span, Step};

pub use select::{select, BackendOptions, Device};

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

    /// Runs `g` (converted by `cast`, if any, to `op.dtype()`) and quantizes the values
    /// by `op` into `dsts`, one buffer per emitted output of the op, each exactly its
    /// bytes. `g` holds whole groups: its last axis is a multiple of the group size.
    /// Every backend gives the bytes of the oracle, [`crate::layout::quant::Quant::quantize`];
    /// this default runs it.
    fn gather_quantize(
        &self,
        g: &Gather,
        cast: Option<Cast>,
        op: &Quantize,
        src: &[u8],
        dsts: &mut [&mut [u8]],
    ) -> Result<()> {
        quantize_staged(self, g, cast, op, src, dsts, false, &mut Vec::new())
    }

    /// Runs every job in order, each band computed (and converted by the job's cast)
    /// into the slice `sink` hands out for it; `progress` hears of every band and job
    /// once complete and stops the run by returning an error. Returns when everything
    /// is written; nothing is left in flight. Host backends run band after band; a
    /// device backend keeps its pipeline full across bands and jobs within this call.
    fn run(
        &self,
        jobs: &[Job<'_>],
        sink: &mut dyn Sink,
        progress: &mut dyn FnMut(Step) -> Result<()>,
    ) -> Result<()> {
        job::run_on_host(self, jobs, sink, progress)
    }

    /// Bytes this backend has moved to and from a device since it was made (zero for the
    /// host backends): what a conversion's report counts as device traffic.
    fn traffic(&self) -> DeviceTraffic {
        DeviceTraffic::default()
    }
}

/// Bytes moved between the host and a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceTraffic {
    /// Host to device: source windows and packed sources uploaded.
    pub upload_bytes: u64,
    /// Device to host: results mapped and read back.
    pub readback_bytes: u64,
}

impl DeviceTraffic {
    /// What was moved since `earlier`, a snapshot of the same backend.
    pub fn since(self, earlier: DeviceTraffic) -> DeviceTraffic {
        DeviceTraffic {
            upload_bytes: self.upload_bytes.saturating_sub(earlier.upload_bytes),
            readback_bytes: self.readback_bytes.saturating_sub(earlier.readback_bytes),
        }
    }
}

/// Output bytes of `g` converted by `cast` (saturating, as [`Gather::out_bytes`]).
pub(crate) fn cast_out_bytes(g: &Gather, cast: Cast) -> usize {
    g.len().saturating_mul(cast.to().size())
}

/// Checks what [`Backend::gather_cast`] relies on: the gather reads `cast.from()`
/// elements, the source holds what it reads and `dst` what the cast writes.
pub(crate) fn check_cast_buffers(g: &Gather, cast: Cast, src: &[u8], dst: &[u8]) -> Result<()> {
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
    check_source(g, src)
}

internal! {
/// Source bytes gathered per step of [`gather_then_cast_in`]: small enough to stay in the
/// L2 cache between the gather and the cast, large enough to amortise the calls.
pub const CAST_STAGE_BYTES: usize = 256 << 10;
}

/// How [`gather_then_cast_in`] stages a gather.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Staging {
    /// Source bytes gathered per step.
    pub bytes: usize,
    /// Run pieces as rayon tasks on the current pool, each with its own stage; the
    /// backend's gather should then run inline.
    pub parallel: bool,
    /// Output rows the backend's transposes want per call. A gather whose innermost
    /// axis is strided and whose rows are too long for that many to fit in the stage
    /// is staged in blocks of `tile_rows` rows by as many columns as fit: pieces of
    /// whole rows would give the backend flat tiles that read each source line once
    /// per piece. 1 turns this off.
    pub tile_rows: usize,
}

/// `gather_cast` for host backends: gathers pieces of `g` into small staging buffers with
/// `backend`'s own gather, staged as `staging` says, then converts each piece into its
/// place in `dst`.
pub(crate) fn gather_then_cast_in(
    backend: &dyn Backend,
    g: &Gather,
    cast: Cast,
    src: &[u8],
    dst: &mut [u8],
    staging: Staging,
) -> Result<()> {
    use rayon::prelude::*;

    check_cast_buffers(g, cast, src, dst)?;
    if g.is_empty() {
        return Ok(());
    }
    let jobs = cast_jobs(g, cast, dst, staging)?;
    let run = |stage: &mut Vec<u8>, (piece, out): (Gather, CastOut)| {
        run_cast_job(backend, &piece, cast, src, out, stage, staging.bytes)
    };
    if staging.parallel && jobs.len() > 1 {
        jobs.into_par_iter().try_for_each_init(Vec::new, run)
    } else {
        let mut stage = Vec::new();
        jobs.into_iter().try_for_each(|job| run(&mut stage, job))
    }
}

/// Where the converted elements of one staged piece go.
enum CastOut<'a> {
    /// The piece's whole output, contiguous.
    Run(&'a mut [u8]),
    /// One slice per row of a 2-D block of the output.
    Rows(Vec<&'a mut [u8]>),
}

/// Splits `g` and `dst` into independent pieces of work: runs of whole output rows, or,
/// for transposes with long rows, 2-D blocks of up to `tile_rows` rows.
fn cast_jobs<'a>(
    g: &Gather,
    cast: Cast,
    dst: &'a mut [u8],
    staging: Staging,
) -> Result<Vec<(Gather, CastOut<'a>)>> {
    let (from, to) = (cast.from().size(), cast.to().size());
    let stage_elems = (staging.bytes / from).max(1);
    let piece_bytes = match (g.shape.len(), g.shape.last(), g.strides.last()) {
        (2.., Some(&cols), Some(&sc))
            if sc != 1 && staging.tile_rows > 1 && stage_elems / cols < staging.tile_rows =>
        {
            staging.tile_rows.saturating_mul(cols).saturating_mul(from)
        }
        _ => staging.bytes,
    };
    // Pieces come in output order and tile it, so the output splits into their slices.
    let mut jobs = Vec::new();
    let mut rest = dst;
    let mut done = 0;
    for (at, piece) in g.split(piece_bytes) {
        let len = piece.len() * to;
        if at / from * to != done || len > rest.len() {
            return Err(cast_piece_err());
        }
        let (out, tail) = rest.split_at_mut(len);
        rest = tail;
        done += len;
        match (&piece.shape[..], &piece.strides[..]) {
            (&[rows, cols], &[sr, sc]) if sc != 1 && rows * cols > stage_elems => {
                // Blocks of all the rows and as many columns as fit in the stage.
                let width = (stage_elems / rows).max(1);
                let mut blocks: Vec<Vec<&mut [u8]>> = (0..cols.div_ceil(width))
                    .map(|_| Vec::with_capacity(rows))
                    .collect();
                for row in out.chunks_mut(cols * to) {
                    for (block, part) in blocks.iter_mut().zip(row.chunks_mut(width * to)) {
                        block.push(part);
                    }
                }
                for (b, rows_out) in blocks.into_iter().enumerate() {
                    let c0 = b * width;
                    let shape = vec![rows, width.min(cols - c0)];
                    let offset = piece.offset + c0 * sc;
                    let block = Gather::from_parts(from, shape, vec![sr, sc], offset);
                    jobs.push((block, CastOut::Rows(rows_out)));
                }
            }
            _ => jobs.push((piece, CastOut::Run(out))),
        }
    }
    Ok(jobs)
}

fn cast_piece_err() -> Error {
    Error::Layout {
        detail: "cast piece outside its buffers".to_string(),
    }
}

/// Gathers `piece` through `stage`, at most `stage_bytes` at a time, and casts it into
/// `out`; contiguous runs convert straight from the source.
fn run_cast_job(
    backend: &dyn Backend,
    piece: &Gather,
    cast: Cast,
    src: &[u8],
    out: CastOut,
    stage: &mut Vec<u8>,
    stage_bytes: usize,
) -> Result<()> {
    let (from, to) = (cast.from().size(), cast.to().size());
    let staged = |g: &Gather, stage: &mut Vec<u8>| -> Result<()> {
        stage.clear();
        stage.resize(g.len() * from, 0);
        backend.gather(g, src, stage)
    };
    match out {
        CastOut::Rows(rows) => {
            let width = piece.len() / rows.len().max(1);
            if width * rows.len() != piece.len() {
                return Err(cast_piece_err());
            }
            staged(piece, stage)?;
            for (run, row) in stage.chunks_exact(width * from).zip(rows) {
                cast::cast_slice(cast, run, row)?;
            }
        }
        CastOut::Run(out) => {
            for (at, sub) in piece.split(stage_bytes) {
                let start = at / from * to;
                let out = out
                    .get_mut(start..start + sub.len() * to)
                    .ok_or_else(cast_piece_err)?;
                if sub.is_copy() {
                    let run = sub.offset * from..(sub.offset + sub.len()) * from;
                    let run = src.get(run).ok_or_else(cast_piece_err)?;
                    cast::cast_slice(cast, run, out)?;
                } else {
                    staged(&sub, stage)?;
                    cast::cast_slice(cast, stage, out)?;
                }
            }
        }
    }
    Ok(())
}

/// Checks that `src` holds every byte `g` reads.
pub(crate) fn check_source(g: &Gather, src: &[u8]) -> Result<()> {
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

/// Checks the sizes a backend relies on, so no backend can index out of bounds.
pub(crate) fn check_buffers(g: &Gather, src: &[u8], dst: &[u8]) -> Result<()> {
    check_source(g, src)?;
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

/// Checks what [`Backend::gather_quantize`] relies on: whole groups, the values' element
/// size, one buffer per emitted output, each of its bytes.
pub(crate) fn check_quantize_buffers(
    g: &Gather,
    cast: Option<Cast>,
    op: &Quantize,
    src: &[u8],
    dsts: &[&mut [u8]],
) -> Result<()> {
    g.validate()?;
    let gs = op.quant().group_size();
    let from = cast.map_or(op.dtype(), |c| c.from());
    let err = |detail: String| Err(Error::Layout { detail });
    if cast.is_some_and(|c| c.to() != op.dtype()) || g.elem_size != from.size() {
        return err(format!(
            "a gather of {}-byte elements cannot be quantized as {}",
            g.elem_size,
            op.dtype()
        ));
    }
    if g.shape.last().copied().unwrap_or(1) % gs != 0 {
        return err(format!(
            "rows of {:?} are not whole groups of {gs}",
            g.shape
        ));
    }
    let want: Vec<usize> = (0..op.output_count())
        .filter(|&k| op.emits(k))
        .map(|k| op.output_bytes(k, g.len()).unwrap_or(usize::MAX))
        .collect();
    let got: Vec<usize> = dsts.iter().map(|d| d.len()).collect();
    if want != got {
        return err(format!(
            "quantize output buffers hold {got:?} bytes, the op writes {want:?}"
        ));
    }
    check_source(g, src)
}

/// `gather_quantize` on the host: `g` gathered (and cast) by `backend` into `stage`,
/// widened to f32, then quantized by the oracle or (`fast`) the fast path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_staged<B: Backend + ?Sized>(
    backend: &B,
    g: &Gather,
    cast: Option<Cast>,
    op: &Quantize,
    src: &[u8],
    dsts: &mut [&mut [u8]],
    fast: bool,
    stage: &mut Vec<u8>,
) -> Result<()> {
    check_quantize_buffers(g, cast, op, src, dsts)?;
    let es = op.dtype().size();
    if cast.is_none() && g.is_copy() {
        // Contiguous values of the right dtype: quantized where they lie.
        let run = g.offset * es..(g.offset + g.len()) * es;
        let values = src.get(run).ok_or_else(|| Error::Layout {
            detail: "quantize source outside the source".to_string(),
        })?;
        return op.run_bytes(values, dsts, fast);
    }
    let bytes = g.len().checked_mul(es).ok_or_else(|| Error::Layout {
        detail: "quantize stage overflows".to_string(),
    })?;
    stage.clear();
    stage.resize(bytes, 0);
    match cast {
        None => backend.gather(g, src, stage)?,
        Some(c) => backend.gather_cast(g, c, src, stage)?,
    }
    op.run_bytes(stage, dsts, fast)
}
