//! The restricted pickle VM on a `data.pkl`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = relayout::fuzzing::pickle(data);
});
