//! The safetensors header parser on a whole file's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = relayout::fuzzing::safetensors_header(data);
});
