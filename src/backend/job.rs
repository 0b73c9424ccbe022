//! The work a backend is handed: one [`Job`] per target tensor, in output order, run in
//! one call of [`Backend::run`](crate::backend::Backend::run).
//!
//! A job is plain data: the sources it reads ([`Part`]s, each a gather over one source,
//! cut into [`Band`]s), the element conversion, and where its bytes go. A plain
//! conversion has one part; a stacked target has one part per stacked source, their
//! outputs one after the other. A backend keeps whatever it needs across jobs (held
//! uploads, a ring of pieces in flight, the next job's prefetched source) as locals of
//! that call, never between calls.

use crate::error::{Error, Result};
use crate::layout::{Cast, Gather};

/// One band of a part: a piece of the part's gather and where its output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Band {
    at: usize,
    len: usize,
    gather: Gather,
}

impl Band {
    /// Byte offset of the band's output within its job's output.
    pub fn at(&self) -> usize {
        self.at
    }

    /// Output bytes of the band (after the job's cast).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the band writes nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The gather that computes it, over its part's source.
    pub fn gather(&self) -> &Gather {
        &self.gather
    }
}

/// One source read by a job: its bytes, the gather over them, and its bands in output
/// order.
#[derive(Clone, Debug)]
pub struct Part<'a> {
    src: &'a [u8],
    gather: Gather,
    bands: Vec<Band>,
}

impl<'a> Part<'a> {
    /// The whole storage the gather's offset and strides index into.
    pub fn src(&self) -> &'a [u8] {
        self.src
    }

    /// The part's whole gather (its bands are pieces of it).
    pub fn gather(&self) -> &Gather {
        &self.gather
    }

    pub fn bands(&self) -> &[Band] {
        &self.bands
    }
}

/// The work for one target tensor.
#[derive(Clone, Debug)]
pub struct Job<'a> {
    parts: Vec<Part<'a>>,
    cast: Option<Cast>,
    out_bytes: usize,
}

impl<'a> Job<'a> {
    /// A job reading `parts` in order, each `(source, gather)` producing the next
    /// `gather.len()` elements of the output, converted by `cast`, cut into bands of at
    /// most `band_bytes` output bytes (at least one element). Checks that every gather
    /// reads the cast's source elements and stays inside its source.
    pub fn new(
        parts: Vec<(&'a [u8], Gather)>,
        cast: Option<Cast>,
        band_bytes: usize,
    ) -> Result<Job<'a>> {
        let mut out_bytes = 0usize;
        let mut built = Vec::with_capacity(parts.len());
        for (src, gather) in parts {
            gather.validate()?;
            let (from, to) = match cast {
                Some(c) => (c.from().size(), c.to().size()),
                None => (gather.elem_size, gather.elem_size),
            };
            if gather.elem_size != from {
                return Err(job_err(format!(
                    "a gather of {}-byte elements cannot be cast from {from}-byte ones",
                    gather.elem_size
                )));
            }
            crate::backend::check_source(&gather, src)?;
            // Bands count output bytes; with a cast the gather splits by source elements.
            let per_band = match cast {
                None => band_bytes,
                Some(_) => (band_bytes / to).max(1).saturating_mul(from),
            };
            let mut bands = Vec::new();
            for (at, piece) in gather.split(per_band) {
                let len = piece.len().checked_mul(to).ok_or_else(overflow)?;
                let at = (at / from)
                    .checked_mul(to)
                    .and_then(|a| a.checked_add(out_bytes))
                    .ok_or_else(overflow)?;
                bands.push(Band {
                    at,
                    len,
                    gather: piece,
                });
            }
            let len = gather.len().checked_mul(to).ok_or_else(overflow)?;
            out_bytes = out_bytes.checked_add(len).ok_or_else(overflow)?;
            built.push(Part { src, gather, bands });
        }
        Ok(Job {
            parts: built,
            cast,
            out_bytes,
        })
    }

    pub fn parts(&self) -> &[Part<'a>] {
        &self.parts
    }

    /// The element conversion every part's output goes through, if any.
    pub fn cast(&self) -> Option<Cast> {
        self.cast
    }

    /// Bytes of the job's output.
    pub fn out_bytes(&self) -> usize {
        self.out_bytes
    }
}

fn overflow() -> Error {
    job_err("output size overflows".to_string())
}

fn job_err(detail: String) -> Error {
    Error::Layout { detail }
}

/// Where a run's bytes go.
pub trait Sink {
    /// The slice for `len` output bytes at byte `at` of job `job`'s output. Bands are
    /// asked for in output order: every band of a job before any of the next job's.
    fn band(&mut self, job: usize, at: usize, len: usize) -> Result<&mut [u8]>;

    /// Every byte of job `job` is in place. Called once per job, in order, empty jobs
    /// included, after its last band and before the next job's first.
    fn job_done(&mut self, job: usize) -> Result<()> {
        let _ = job;
        Ok(())
    }
}

/// What a run reports as it goes; the callback stops the run by returning an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A band of `bytes` output bytes of job `job` is complete in its slice.
    Band { job: usize, bytes: usize },
    /// Job `job` is complete (after its [`Sink::job_done`]).
    Job { job: usize },
}

/// One buffer per job, `bufs[i]` holding exactly job `i`'s output.
pub(crate) struct Buffers<'b, 'd>(pub &'b mut [&'d mut [u8]]);

impl Sink for Buffers<'_, '_> {
    fn band(&mut self, job: usize, at: usize, len: usize) -> Result<&mut [u8]> {
        let end = at.saturating_add(len);
        self.0
            .get_mut(job)
            .and_then(|b| b.get_mut(at..end))
            .ok_or_else(|| job_err(format!("band {at}..{end} outside job {job}'s buffer")))
    }
}

/// [`Backend::run`](crate::backend::Backend::run) for host backends: each band of each
/// job computed in turn.
pub fn run_on_host<B: crate::backend::Backend + ?Sized>(
    backend: &B,
    jobs: &[Job<'_>],
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<()> {
    for (j, job) in jobs.iter().enumerate() {
        for part in job.parts() {
            for band in part.bands() {
                let dst = sink.band(j, band.at(), band.len())?;
                match job.cast() {
                    None => backend.gather(band.gather(), part.src(), dst)?,
                    Some(c) => backend.gather_cast(band.gather(), c, part.src(), dst)?,
                }
                progress(Step::Band {
                    job: j,
                    bytes: band.len(),
                })?;
            }
        }
        sink.job_done(j)?;
        progress(Step::Job { job: j })?;
    }
    Ok(())
}
