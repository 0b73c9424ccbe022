//! Jobs of several parts: sources stacked one after the other into one target (what a
//! stack op, e.g. MoE experts into one `(E, out, in)` tensor, hands a backend). Every
//! backend runs them through `Backend::run`, several jobs per call, at band sizes from one
//! element to whole parts, and must give the bytes of the naive oracle: each part's
//! reference gather (and cast), concatenated.

use relayout::backend::reference::Reference;
use relayout::backend::{Backend, Job, Sink, Span};
use relayout::layout::{Cast, Gather};
use relayout::DType;

use crate::common::{all_backends, Rng};

/// The jobs' outputs, one buffer each.
struct Outputs(Vec<Vec<u8>>);

impl Sink for Outputs {
    fn band(&mut self, job: usize, spans: &[Span]) -> relayout::Result<Vec<&mut [u8]>> {
        let [s] = spans else {
            panic!("an element-wise band writes one span, not {}", spans.len());
        };
        assert_eq!(s.output(), 0);
        Ok(vec![&mut self.0[job][s.at()..s.at() + s.len()]])
    }
}

/// A part: `rows x cols` elements read from a `(cols, rows)` source (a transpose, the
/// layout every stacked Linear weight needs), or straight when `transpose` is false.
fn part_gather(es: usize, rows: usize, cols: usize, transpose: bool) -> Gather {
    if transpose {
        Gather::from_parts(es, vec![rows, cols], vec![1, rows], 0)
    } else {
        Gather::from_parts(es, vec![rows, cols], vec![cols, 1], 0)
    }
}

/// The oracle: every part gathered (and cast) by the reference backend, in order.
fn expected(parts: &[(&[u8], Gather)], cast: Option<Cast>) -> Vec<u8> {
    let mut out = Vec::new();
    for (src, g) in parts {
        let n = match cast {
            None => g.out_bytes(),
            Some(c) => g.len() * c.to().size(),
        };
        let mut dst = vec![0u8; n];
        match cast {
            None => Reference.gather(g, src, &mut dst).unwrap(),
            Some(c) => Reference.gather_cast(g, c, src, &mut dst).unwrap(),
        }
        out.extend_from_slice(&dst);
    }
    out
}

#[test]
fn stacked_parts_give_the_oracle_bytes_on_every_backend_band_and_cast() {
    let backends = all_backends();
    let mut rng = Rng::new(18);
    // (element size, cast): plain moves of 4, 2 and 1 bytes, and casts either way.
    let kinds: [(usize, Option<Cast>); 5] = [
        (4, None),
        (2, None),
        (1, None),
        (4, Cast::new(DType::F32, DType::BF16).unwrap()),
        (2, Cast::new(DType::BF16, DType::F32).unwrap()),
    ];
    // (experts, rows, cols): one part, a few odd ones crossing the 32x32 tiles, and
    // eight experts of a shape that spans several 4 KiB chunks each.
    let shapes = [(1, 5, 3), (3, 33, 65), (8, 64, 40), (2, 1, 129)];
    for (es, cast) in kinds {
        for &(experts, rows, cols) in &shapes {
            // Each expert its own source, of its own bytes.
            let sources: Vec<Vec<u8>> = (0..experts).map(|_| rng.bytes(rows * cols * es)).collect();
            for transpose in [true, false] {
                let parts: Vec<(&[u8], Gather)> = sources
                    .iter()
                    .map(|s| (s.as_slice(), part_gather(es, rows, cols, transpose)))
                    .collect();
                let want = expected(&parts, cast);
                // A plain target after the stacked one, so a backend crosses from a
                // many-part job into the next job within one call.
                let tail_src = rng.bytes(7 * 9 * es);
                let tail = vec![(tail_src.as_slice(), part_gather(es, 7, 9, true))];
                let want_tail = expected(&tail, cast);
                let to = cast.map_or(es, |c| c.to().size());
                // One-element bands only where they stay few (every band is a dispatch
                // on the GPU); bands that cut parts mid-row, chunk-sized ones, whole parts.
                let mut bands = vec![7 * to, 4096, 8191, want.len().max(1)];
                if want.len() <= 2048 {
                    bands.push(to);
                }
                for band in bands {
                    let jobs = [
                        Job::new(parts.clone(), cast, band).unwrap(),
                        Job::new(tail.clone(), cast, band).unwrap(),
                    ];
                    assert_eq!(jobs[0].out_bytes(), want.len());
                    for backend in &backends {
                        let mut sink =
                            Outputs(vec![vec![0xA5; want.len()], vec![0x5A; want_tail.len()]]);
                        backend.run(&jobs, &mut sink, &mut |_| Ok(())).unwrap();
                        let what = format!(
                            "{}: {experts} x ({rows}, {cols}), {es}-byte, {cast:?}, transpose {transpose}, band {band}",
                            backend.name()
                        );
                        assert!(sink.0[0] == want, "{what}: stacked target differs");
                        assert!(sink.0[1] == want_tail, "{what}: the job after it differs");
                    }
                }
            }
        }
    }
}

#[test]
fn a_part_that_reads_past_its_source_is_refused_naming_it() {
    let short = vec![0u8; 4 * 10];
    let whole = vec![0u8; 4 * 12];
    let g = part_gather(4, 3, 4, true);
    let err = Job::new(
        vec![(whole.as_slice(), g.clone()), (short.as_slice(), g)],
        None,
        4096,
    )
    .unwrap_err();
    let relayout::Error::Layout { detail } = &err else {
        panic!("{err:?}");
    };
    assert!(detail.starts_with("part 1: "), "{detail}");
}
