//! `Checkpoint::open` on a whole file; what opens is planned with the flax preset and
//! every tensor converted, so hostile shapes, strides and offsets reach the layout code.
//! It is planned and converted a second time with `--dtype` set, so they reach the casts
//! too; the dtype is picked by the input's length, which every mutation may change, so
//! each input keeps one and the corpus holds all three.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use relayout::DType;

const OUTPUT_DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

fuzz_target!(|data: &[u8]| {
    let Ok(ckpt) = relayout::fuzzing::checkpoint(data) else {
        return;
    };
    let mut opts = common::plan_options();
    if let Ok(plan) = common::flax().plan_with(ckpt.tensors(), &opts) {
        common::convert_and_compare(&ckpt, &plan);
    }
    opts.dtype = Some(OUTPUT_DTYPES[data.len() % OUTPUT_DTYPES.len()]);
    if let Ok(plan) = common::flax().plan_with(ckpt.tensors(), &opts) {
        common::convert_and_compare(&ckpt, &plan);
    }
});
