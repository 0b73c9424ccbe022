//! A sharded checkpoint's `*.index.json` beside the two fixture shards and a third shard
//! taken from the input: the index is the input up to its first NUL byte (which JSON
//! text cannot hold), `extra.safetensors` the bytes after it. What opens is converted.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

const SHARD_1: &[u8] =
    include_bytes!("../../tests/fixtures/sharded/model-00001-of-00002.safetensors");
const SHARD_2: &[u8] =
    include_bytes!("../../tests/fixtures/sharded/model-00002-of-00002.safetensors");

fuzz_target!(|data: &[u8]| {
    let (index, extra) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let shards = [
        ("model-00001-of-00002.safetensors", SHARD_1),
        ("model-00002-of-00002.safetensors", SHARD_2),
        ("extra.safetensors", extra),
    ];
    let Ok(ckpt) = relayout::fuzzing::sharded_index(index, &shards) else {
        return;
    };
    if let Ok(plan) = common::flax().plan_with(ckpt.tensors(), &common::plan_options()) {
        common::convert_and_compare(&ckpt, &plan);
    }
});
