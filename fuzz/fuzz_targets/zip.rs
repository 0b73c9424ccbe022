//! The zip reader: central directory, local headers, entry data ranges.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = relayout::fuzzing::zip(data);
});
