//! What the targets that reach a [`Checkpoint`] do with it: plan it and convert every
//! tensor, with the cpu backend tuned so small tensors take every path (parallel tasks,
//! tiles, streaming stores, several bands) and with the reference backend as the oracle.

use std::sync::OnceLock;

use relayout::backend::cpu::{Cpu, Simd, Tuning};
use relayout::backend::reference::Reference;
use relayout::{Backend, Checkpoint, Converter, Plan, PlanOptions, RuleSet};

/// Output converted per input, at most. Readers accept views that expand their storage
/// through stride-0 axes up to a GiB; converting that on every input would measure the
/// backends, not search the readers, and keeping two copies would pass the RSS limit.
const MAX_OUTPUT_BYTES: usize = 8 << 20;

/// Output bytes per backend call: not a multiple of any element size, and smaller than
/// most fixture tensors, so bands end mid-row and tensors take several.
const BAND_BYTES: usize = 1000;

/// Thresholds shrunk as in tests/backend_grid.rs, so a fuzz input of a few KiB crosses
/// every switch of the cpu backend.
const SMALL: Tuning = Tuning {
    par_threshold: 1024,
    par_chunk: 256,
    tile_bytes: 64,
    stream_threshold: 0,
    // The best level this CPU has (`with_tuning` lowers it to that).
    simd: Simd::Avx2,
};

/// Rule variables the presets' attention rules need.
pub fn plan_options() -> PlanOptions {
    let mut opts = PlanOptions::default();
    opts.vars.insert("heads".to_string(), "2".to_string());
    opts
}

/// The flax preset, parsed once.
pub fn flax() -> &'static RuleSet {
    static FLAX: OnceLock<RuleSet> = OnceLock::new();
    FLAX.get_or_init(|| RuleSet::preset("flax").expect("the flax preset parses"))
}

/// One thread, entered once per input: the cpu backend still splits work into parallel
/// tasks, which then run inline instead of waking other threads for every band (that
/// wait took a third of the time). libFuzzer would not see a race anyway.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a pool of one thread")
    })
}

/// Every converted tensor in plan order, up to the first error, and that error.
fn convert(
    ckpt: &Checkpoint,
    plan: &Plan,
    backend: &dyn Backend,
    band: Option<usize>,
) -> (Vec<Vec<u8>>, Option<String>) {
    let mut converter = Converter::new(ckpt, plan, backend);
    if let Some(band) = band {
        converter = converter.with_band_bytes(band);
    }
    let mut out = Vec::new();
    let result = converter.for_each(|_, bytes| {
        out.push(bytes.to_vec());
        Ok(())
    });
    (out, result.err().map(|e| e.to_string()))
}

/// Converts every entry of `plan` with the cpu backend and the reference backend and
/// panics when they disagree on a byte or on which entry fails. Plans over
/// [`MAX_OUTPUT_BYTES`] are left unconverted.
pub fn convert_and_compare(ckpt: &Checkpoint, plan: &Plan) {
    let total = plan.entries().iter().try_fold(0usize, |sum, entry| {
        Converter::entry_bytes(entry)
            .ok()
            .and_then(|n| sum.checked_add(n))
    });
    if total.is_none_or(|n| n > MAX_OUTPUT_BYTES) {
        return;
    }
    let cpu = Cpu::new().with_tuning(SMALL);
    let (got, got_err) = pool().install(|| convert(ckpt, plan, &cpu, Some(BAND_BYTES)));
    let (want, want_err) = convert(ckpt, plan, &Reference, None);
    assert_eq!(
        got.len(),
        want.len(),
        "cpu converted {} entries ({got_err:?}), reference {} ({want_err:?})",
        got.len(),
        want.len()
    );
    for ((entry, got), want) in plan.entries().iter().zip(&got).zip(&want) {
        assert!(
            got == want,
            "cpu and reference disagree on '{}' ({} <- '{}')",
            entry.target(),
            entry.describe_op(),
            entry.source_name()
        );
    }
}
