//! A loader that fills its own map of tensors straight from the converter, with no file
//! in between: every converted tensor is handed over as soon as it is ready.
//!
//! cargo run --release --example load_into_map -- tests/fixtures/mixed.pt

use std::collections::BTreeMap;

use relayout::backend::{self, BackendOptions};
use relayout::{Checkpoint, Converter, DType, RuleSet};

/// What a framework loader would keep: dtype, shape and its own copy of the bytes (a real
/// loader would copy into device memory here instead).
struct Loaded {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let input = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/mixed.pt".to_string());
    let ckpt = Checkpoint::open(&input)?;
    let plan = RuleSet::preset("flax")?.plan(ckpt.tensors())?;
    let backend = backend::select(&BackendOptions::default())?;
    let mut params: BTreeMap<String, Loaded> = BTreeMap::new();
    Converter::new(&ckpt, &plan, backend.as_ref()).for_each(|entry, bytes| {
        params.insert(
            entry.target().to_string(),
            Loaded {
                dtype: entry.dtype(),
                shape: entry.target_shape().to_vec(),
                data: bytes.to_vec(),
            },
        );
        Ok(())
    })?;
    for (name, t) in &params {
        println!(
            "{name:<40} {:<5} {:?} ({} bytes)",
            t.dtype,
            t.shape,
            t.data.len()
        );
    }
    Ok(())
}
