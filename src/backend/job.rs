//! The work a backend is handed: one [`Job`] per target tensor, in output order, run in
//! one call of [`Backend::run`](crate::backend::Backend::run).
//!
//! A job is plain data: the sources it reads ([`Part`]s, each a gather over one source,
//! cut into [`Band`]s), the element conversion, and where its bytes go ([`Span`]s of its
//! outputs). A plain conversion has one part and one output; a stacked target has one
//! part per stacked source, their bytes one after the other; an op that makes several
//! tensors from one source (a quantized weight, its scales and biases) has one output
//! per tensor, each band writing a span of each, so all are made in one pass. A backend keeps whatever it needs across jobs (held
//! uploads, a ring of pieces in flight, the next job's prefetched source) as locals of
//! that call, never between calls.

use crate::error::{Error, Result};
use crate::layout::quant::Quantize;
use crate::layout::{Cast, Gather};

/// Where some of a band's bytes go: `len` bytes at byte `at` of output `output` of its
/// job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    output: usize,
    at: usize,
    len: usize,
}

impl Span {
    pub(crate) fn new(output: usize, at: usize, len: usize) -> Span {
        Span { output, at, len }
    }

    /// Which of the job's outputs (see [`Job::outputs`]).
    pub fn output(&self) -> usize {
        self.output
    }

    /// Byte offset within that output.
    pub fn at(&self) -> usize {
        self.at
    }

    /// Bytes written there.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span writes nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One band of a part: a piece of the part's gather and where its output goes. An
/// element-wise job's band writes one span of its one output; an op with several
/// outputs (a quantized weight with its scales) writes a span of each, in output order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Band {
    gather: Gather,
    spans: Vec<Span>,
}

impl Band {
    pub(crate) fn new(gather: Gather, spans: Vec<Span>) -> Band {
        Band { gather, spans }
    }

    /// The gather that computes it, over its part's source.
    pub fn gather(&self) -> &Gather {
        &self.gather
    }

    /// Where its bytes go, outputs in increasing order, one span per output at most.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Output bytes of the band, over all its spans.
    pub fn bytes(&self) -> usize {
        self.spans.iter().map(|s| s.len).sum()
    }

    /// Whether the band writes nothing.
    pub fn is_empty(&self) -> bool {
        self.spans.iter().all(Span::is_empty)
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
    pub(crate) fn new(src: &'a [u8], gather: Gather, bands: Vec<Band>) -> Part<'a> {
        Part { src, gather, bands }
    }

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

/// The work for one target: what it reads, the op, and the byte size of each output it
/// writes. Sources stacked into one target are its parts, one after the other; an op
/// that makes several tensors from one source has one output per tensor.
#[derive(Clone, Debug)]
pub struct Job<'a> {
    parts: Vec<Part<'a>>,
    cast: Option<Cast>,
    quantize: Option<Quantize>,
    outputs: Vec<usize>,
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
        let many = parts.len() > 1;
        for (k, (src, gather)) in parts.into_iter().enumerate() {
            // A stacked target's error says which of its sources is wrong.
            let part = |e: Error| match e {
                Error::Layout { detail } if many => Error::Layout {
                    detail: format!("part {k}: {detail}"),
                },
                other => other,
            };
            gather.validate().map_err(part)?;
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
            crate::backend::check_source(&gather, src).map_err(part)?;
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
                bands.push(Band::new(piece, vec![Span::new(0, at, len)]));
            }
            let len = gather.len().checked_mul(to).ok_or_else(overflow)?;
            out_bytes = out_bytes.checked_add(len).ok_or_else(overflow)?;
            built.push(Part::new(src, gather, bands));
        }
        Job::with_outputs(built, cast, vec![out_bytes])
    }

    /// A job of hand-cut `parts` writing `outputs` (byte sizes): for ops whose bands
    /// write several outputs. Checks that every band's spans name increasing outputs of
    /// the job and that, output by output, the spans tile it exactly, in order.
    pub(crate) fn with_outputs(
        parts: Vec<Part<'a>>,
        cast: Option<Cast>,
        outputs: Vec<usize>,
    ) -> Result<Job<'a>> {
        let mut filled = vec![0usize; outputs.len()];
        for part in &parts {
            part.gather.validate()?;
            crate::backend::check_source(&part.gather, part.src)?;
            for band in &part.bands {
                let mut next = 0;
                for s in &band.spans {
                    let at = filled.get_mut(s.output).filter(|_| s.output >= next);
                    match at {
                        Some(at) if *at == s.at => {
                            *at = at.checked_add(s.len).ok_or_else(overflow)?
                        }
                        _ => {
                            return Err(job_err(format!(
                                "a band's span at {} of output {} does not follow the one before",
                                s.at, s.output
                            )))
                        }
                    }
                    next = s.output + 1;
                }
            }
        }
        if filled != outputs {
            return Err(job_err(format!(
                "bands write {filled:?} bytes of outputs of {outputs:?}"
            )));
        }
        Ok(Job {
            parts,
            cast,
            quantize: None,
            outputs,
        })
    }

    /// A job quantizing `parts` (each `(source, gather)` the next whole rows of the
    /// weight, converted by `cast` to `op.dtype()` first) by `op`: one output per
    /// emitted output of the op, every band whole groups whose packed words are at most
    /// `band_bytes` (at least one group). Each gather's last axis must hold whole groups.
    pub fn quantized(
        parts: Vec<(&'a [u8], Gather)>,
        cast: Option<Cast>,
        op: Quantize,
        band_bytes: usize,
    ) -> Result<Job<'a>> {
        let g = op.quant().group_size();
        let to = op.dtype().size();
        if cast.is_some_and(|c| c.to() != op.dtype()) {
            return Err(job_err(format!(
                "a quantize job of {} values cannot take a cast to another dtype",
                op.dtype()
            )));
        }
        let from = cast.map_or(to, |c| c.from().size());
        let bits = op.quant().bits() as usize;
        // Whole groups per band, sized by the packed words (the output that streams).
        let per_band = (band_bytes.saturating_mul(8) / bits / g)
            .max(1)
            .saturating_mul(g);
        let emitted: Vec<usize> = (0..op.output_count()).filter(|&k| op.emits(k)).collect();
        let mut filled = vec![0usize; emitted.len()];
        let mut built = Vec::with_capacity(parts.len());
        for (src, gather) in parts {
            gather.validate()?;
            if gather.elem_size != from {
                return Err(job_err(format!(
                    "a gather of {}-byte elements cannot be quantized from {from}-byte ones",
                    gather.elem_size
                )));
            }
            let last = gather.shape.last().copied().unwrap_or(1);
            if last % g != 0 {
                return Err(job_err(format!(
                    "rows of {last} values are not whole groups of {g}"
                )));
            }
            crate::backend::check_source(&gather, src)?;
            let mut bands = Vec::new();
            for (_, piece) in gather.split(per_band.saturating_mul(from)) {
                let n = piece.len();
                if n % g != 0 {
                    return Err(job_err(format!("a band of {n} values is not whole groups")));
                }
                let mut spans = Vec::with_capacity(emitted.len());
                for (o, &k) in emitted.iter().enumerate() {
                    let len = op.output_bytes(k, n).ok_or_else(overflow)?;
                    spans.push(Span::new(o, filled[o], len));
                    filled[o] = filled[o].checked_add(len).ok_or_else(overflow)?;
                }
                bands.push(Band::new(piece, spans));
            }
            built.push(Part::new(src, gather, bands));
        }
        let mut job = Job::with_outputs(built, cast, filled)?;
        job.quantize = Some(op);
        Ok(job)
    }

    pub fn parts(&self) -> &[Part<'a>] {
        &self.parts
    }

    /// The element conversion every part's output goes through, if any.
    pub fn cast(&self) -> Option<Cast> {
        self.cast
    }

    /// The quantize op every band goes through after its cast, if any: then the job's
    /// outputs are the op's emitted outputs.
    pub fn quantize(&self) -> Option<&Quantize> {
        self.quantize.as_ref()
    }

    /// Byte size of each output, in the order the sink receives them (an element-wise
    /// job has one).
    pub fn outputs(&self) -> &[usize] {
        &self.outputs
    }

    /// Bytes of all the job's outputs together.
    pub fn out_bytes(&self) -> usize {
        self.outputs.iter().sum()
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
    /// One slice per span of a band of job `job`, in the spans' order, each exactly the
    /// span's bytes of that output. Bands are asked for in output order: every band of a
    /// job before any of the next job's, and within one output, in increasing offsets.
    fn band(&mut self, job: usize, spans: &[Span]) -> Result<Vec<&mut [u8]>>;

    /// Every byte of job `job` is in place. Called once per job, in order, empty jobs
    /// included, after its last band and before the next job's first.
    fn job_done(&mut self, job: usize) -> Result<()> {
        let _ = job;
        Ok(())
    }
}

/// The one slice an element-wise band writes.
pub(crate) fn single(dsts: Vec<&mut [u8]>) -> Result<&mut [u8]> {
    let n = dsts.len();
    match <[_; 1]>::try_from(dsts) {
        Ok([d]) => Ok(d),
        Err(_) => Err(job_err(format!(
            "an element-wise band writes one output, the sink gave {n}"
        ))),
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

/// One buffer per output of every job, in job order.
pub(crate) struct Buffers<'b, 'd> {
    bufs: &'b mut [&'d mut [u8]],
    /// Index in `bufs` of each job's first output, and one past the last job's.
    first: Vec<usize>,
}

impl<'b, 'd> Buffers<'b, 'd> {
    /// `bufs` for `jobs`, checked to be one per output and each of its output's size.
    pub(crate) fn new(bufs: &'b mut [&'d mut [u8]], jobs: &[Job<'_>]) -> Result<Self> {
        let mut first = vec![0];
        let mut n = 0usize;
        for job in jobs {
            n = n.checked_add(job.outputs().len()).ok_or_else(overflow)?;
            first.push(n);
        }
        if n != bufs.len() {
            return Err(job_err(format!("{} buffers for {n} outputs", bufs.len())));
        }
        let sizes = jobs.iter().flat_map(|j| j.outputs().iter());
        if let Some((b, want)) = bufs.iter().zip(sizes).find(|(b, w)| b.len() != **w) {
            return Err(job_err(format!(
                "an output buffer holds {} bytes, its tensor {want}",
                b.len()
            )));
        }
        Ok(Buffers { bufs, first })
    }
}

impl Sink for Buffers<'_, '_> {
    fn band(&mut self, job: usize, spans: &[Span]) -> Result<Vec<&mut [u8]>> {
        let (Some(&from), Some(&to)) = (self.first.get(job), self.first.get(job + 1)) else {
            return Err(job_err(format!("no buffers for job {job}")));
        };
        let mut rest = self.bufs.get_mut(from..to).unwrap_or_default();
        let mut next = 0;
        let mut out = Vec::with_capacity(spans.len());
        for s in spans {
            let outside = || {
                job_err(format!(
                    "span {}..{} of output {} outside job {job}'s buffers",
                    s.at,
                    s.at.saturating_add(s.len),
                    s.output
                ))
            };
            let skip = s.output.checked_sub(next).ok_or_else(outside)?;
            let (buf, tail) = std::mem::take(&mut rest)
                .get_mut(skip..)
                .and_then(|r| r.split_first_mut())
                .ok_or_else(outside)?;
            rest = tail;
            next = s.output + 1;
            let end = s.at.checked_add(s.len).ok_or_else(outside)?;
            out.push(buf.get_mut(s.at..end).ok_or_else(outside)?);
        }
        Ok(out)
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
                let mut dsts = sink.band(j, band.spans())?;
                if let Some(q) = job.quantize() {
                    backend.gather_quantize(band.gather(), job.cast(), q, part.src(), &mut dsts)?;
                } else {
                    let dst = single(dsts)?;
                    match job.cast() {
                        None => backend.gather(band.gather(), part.src(), dst)?,
                        Some(c) => backend.gather_cast(band.gather(), c, part.src(), dst)?,
                    }
                }
                progress(Step::Band {
                    job: j,
                    bytes: band.bytes(),
                })?;
            }
        }
        sink.job_done(j)?;
        progress(Step::Job { job: j })?;
    }
    Ok(())
}

/// Jobs for the tests of the sinks.
#[cfg(test)]
pub(crate) mod test_jobs {
    use super::*;

    /// A two-output job as a quantizing op would cut it: each band writes its elements
    /// to output 0 and one byte per band to output 1.
    pub(crate) fn two_output_job(src: &[u8]) -> Job<'_> {
        let g = Gather::new(1, vec![src.len()], vec![1], 0).unwrap();
        let bands = g
            .split(3)
            .into_iter()
            .enumerate()
            .map(|(i, (at, piece))| {
                let len = piece.len();
                Band::new(piece, vec![Span::new(0, at, len), Span::new(1, i, 1)])
            })
            .collect::<Vec<_>>();
        let n = bands.len();
        Job::with_outputs(vec![Part::new(src, g, bands)], None, vec![src.len(), n]).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_jobs::two_output_job;
    use super::*;
    use crate::dtype::DType;

    fn flat(n: usize, elem: usize) -> Gather {
        Gather::new(elem, vec![n], vec![1], 0).unwrap()
    }

    #[test]
    fn bands_tile_the_output_at_every_band_size_and_cast() {
        let src = [0u8; 4 * 37];
        let f32_to_bf16 = Cast::new(DType::F32, DType::BF16).unwrap().unwrap();
        for band in [1, 2, 3, 4, 7, 8, 64, 147, 148, 149, 1 << 20] {
            for cast in [None, Some(f32_to_bf16)] {
                let parts = vec![(&src[..], flat(37, 4)), (&src[..4 * 5], flat(5, 4))];
                let job = Job::new(parts, cast, band).unwrap();
                let to = if cast.is_some() { 2 } else { 4 };
                assert_eq!(job.outputs(), &[42 * to]);
                let mut at = 0;
                for b in job.parts().iter().flat_map(|p| p.bands()) {
                    let [s] = b.spans() else {
                        panic!("one span per band")
                    };
                    assert_eq!((s.output(), s.at()), (0, at));
                    assert_eq!(s.len(), b.gather().len() * to);
                    assert!(s.len() <= band.max(to), "band {band}: {}", s.len());
                    at += s.len();
                }
                assert_eq!(at, job.out_bytes());
            }
        }
    }

    #[test]
    fn buffers_hand_out_one_disjoint_slice_per_span_of_every_output() {
        let src: Vec<u8> = (0..10).collect();
        let jobs = [
            two_output_job(&src),
            Job::new(vec![(&src[..], flat(4, 1))], None, 3).unwrap(),
        ];
        let (mut a, mut b, mut c) = (vec![0u8; 10], vec![0u8; 4], vec![0u8; 4]);
        let mut bufs: Vec<&mut [u8]> = vec![&mut a, &mut b, &mut c];
        let mut sink = Buffers::new(&mut bufs, &jobs).unwrap();
        // A span outside its job's buffers, or to an output the job lacks, is an error.
        assert!(sink.band(0, &[Span::new(1, 3, 2)]).is_err());
        assert!(sink.band(1, &[Span::new(1, 0, 1)]).is_err());
        assert!(sink.band(2, &[Span::new(0, 0, 1)]).is_err());
        for (j, job) in jobs.iter().enumerate() {
            for (i, band) in job.parts()[0].bands().iter().enumerate() {
                let mut dsts = sink.band(j, band.spans()).unwrap();
                let at = band.gather().offset();
                for (k, x) in dsts[0].iter_mut().enumerate() {
                    *x = src[at + k] + 1;
                }
                if let Some(d) = dsts.get_mut(1) {
                    d[0] = 100 + i as u8;
                }
            }
        }
        drop(bufs);
        assert_eq!(a, (1..11).collect::<Vec<u8>>());
        assert_eq!(b, [100, 101, 102, 103]);
        assert_eq!(c, [1, 2, 3, 4]);
    }

    #[test]
    fn buffers_are_checked_against_the_jobs_outputs() {
        let src = [0u8; 10];
        let jobs = [two_output_job(&src)];
        let (mut a, mut b) = (vec![0u8; 10], vec![0u8; 3]);
        assert!(Buffers::new(&mut [&mut a[..], &mut b[..]], &jobs).is_err());
        assert!(Buffers::new(&mut [&mut a[..]], &jobs).is_err());
    }

    #[test]
    fn hand_cut_jobs_must_tile_each_output_in_order() {
        let src = [0u8; 6];
        let g = flat(6, 1);
        let cut = |spans: Vec<Vec<Span>>, outputs: Vec<usize>| {
            let bands = spans
                .into_iter()
                .map(|s| Band::new(flat(3, 1), s))
                .collect::<Vec<_>>();
            Job::with_outputs(vec![Part::new(&src, g.clone(), bands)], None, outputs)
        };
        let ok = vec![
            vec![Span::new(0, 0, 3), Span::new(1, 0, 1)],
            vec![Span::new(0, 3, 3), Span::new(1, 1, 1)],
        ];
        assert!(cut(ok, vec![6, 2]).is_ok());
        // A gap, an overlap, outputs out of order, a missing byte, an unknown output.
        let gap = vec![vec![Span::new(0, 0, 3)], vec![Span::new(0, 4, 2)]];
        let overlap = vec![vec![Span::new(0, 0, 3)], vec![Span::new(0, 2, 4)]];
        let order = vec![vec![Span::new(1, 0, 1), Span::new(0, 0, 6)]];
        let short = vec![vec![Span::new(0, 0, 5)]];
        let unknown = vec![vec![Span::new(0, 0, 6), Span::new(2, 0, 1)]];
        assert!(cut(gap, vec![6]).is_err());
        assert!(cut(overlap, vec![6]).is_err());
        assert!(cut(order, vec![6, 1]).is_err());
        assert!(cut(short, vec![6]).is_err());
        assert!(cut(unknown, vec![6, 1]).is_err());
    }
}
