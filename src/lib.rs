//! relayout: convert PyTorch checkpoints into the tensor layouts and parameter names of
//! other frameworks (Flax linen and NNX, MLX), on the GPU or the CPU, streaming.
//!
//! ```text
//!  checkpoint file(s)                       rules (preset + user TOML)
//!        │ mmap                                        │
//!  ┌─────▼──────┐  TensorInfo (name, dtype,   ┌────────▼────────┐
//!  │  reader    │──shape, strides, offset)───▶│ rules → plan    │  pure data: target name,
//!  │ safetensors│                             └────────┬────────┘  slice, perm, reshape, cast
//!  │ torch zip  │  storage bytes (borrowed)            │ PlanEntry
//!  │ sharded    │──────────────┐              ┌────────▼────────┐
//!  └────────────┘              └─────────────▶│ convert         │  one Job per target: parts
//!                                             │ (Converter::job)│  (Gather over a source, cut
//!                                             └────────┬────────┘  into bands), cast, outputs
//!                                                      │ one call: run(jobs, sink, step)
//!                                             ┌────────▼────────┐
//!                                             │ backend         │  reference | cpu | gpu
//!                                             └────────┬────────┘  (same bytes from all)
//!                                   bands of ≤ 32 MiB  │ Sink
//!                                             ┌────────▼────────┐
//!                                             │ writer          │  safetensors, streamed,
//!                                             └─────────────────┘  temp file + fsync + rename
//! ```
//!
//! [`verify_file`] and `--expect` check a plan (before anything is written) or a written
//! file against the names, shapes and dtypes the target model expects.
//!
//! The one-call entry point is [`convert`]; [`Checkpoint`], [`RuleSet`] and
//! [`Converter`] give the pieces to loaders that want tensors without a file in between:
//!
//! ```
//! use relayout::{backend::cpu::Cpu, Checkpoint, Converter, RuleSet};
//!
//! let ckpt = Checkpoint::open("tests/fixtures/small_cnn.pt")?;
//! let plan = RuleSet::preset("flax")?.plan(ckpt.tensors())?;
//! let mut names = Vec::new();
//! Converter::new(&ckpt, &plan, &Cpu::new()).for_each(|entry, bytes| {
//!     assert_eq!(bytes.len(), entry.target_shape().iter().product::<usize>() * 4);
//!     names.push(entry.target().to_string());
//!     Ok(())
//! })?;
//! assert!(names.contains(&"params.layer1_0.conv1.kernel".to_string()));
//! # Ok::<(), relayout::Error>(())
//! ```

/// Declares an item public with the `internals` feature (this crate's tests and benches
/// turn it on) and crate-private otherwise: tuning knobs and test hooks stay out of the
/// library's API.
macro_rules! internal {
    ($(#[$meta:meta])* pub $($item:tt)*) => {
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        $(#[$meta])*
        pub $($item)*

        #[cfg(not(feature = "internals"))]
        $(#[$meta])*
        #[allow(dead_code)]
        pub(crate) $($item)*
    };
}

pub mod backend;
/// What `relayout bench` measures; the binary's (feature `bench`, which `cli` turns on),
/// not part of the library's API.
#[cfg(feature = "bench")]
#[doc(hidden)]
pub mod bench;
mod convert;
mod dtype;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod layout;
pub mod model;
mod plan;
mod reader;
mod report;
mod rules;
mod verify;
pub mod writer;

pub use backend::{Backend, BackendOptions, Device};
pub use convert::{
    convert, merge_index_from, open_and_plan, plan_checkpoint, provenance, rule_set, ConvertReport,
    ConvertSpec, Converter, Interrupt, Progress, WriteOptions, DEFAULT_BAND_BYTES,
};
pub use dtype::DType;
pub use error::{human_bytes, Error, Result};
pub use layout::quant::{Quant, QuantMode};
pub use layout::{Gather, LayoutOp};
pub use model::quantize::{QuantizeOptions, Recipe};
pub use plan::{OutputTensor, Plan, PlanEntry, QuantLayer, Skipped, Slice};
pub use reader::{
    Checkpoint, Format, OpenOptions, StorageRange, TensorInfo, EXPANSION_FLOOR, MAX_EXPANSION,
};
pub use report::{FileRow, InspectReport, PlanReport, PlanRow, ShardRow, TensorRow};
pub use rules::{ModuleTypes, NanPolicy, OutputSettings, PlanOptions, Rule, RuleSet};
pub use verify::{verify_file, verify_report, Expectation, Mismatch, VerifyReport};
/// The wgpu this crate is built with, for [`Converter::for_each_on_device`] callers.
#[cfg(feature = "gpu")]
pub use wgpu;
pub use writer::shard;
pub use writer::shard::{merge_index, MergeReport, OutputLayout, Worker};
pub use writer::{OutputKind, ShardOptions};
