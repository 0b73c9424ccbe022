//! relayout: convert PyTorch checkpoints into other frameworks' tensor layouts.

pub mod backend;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod plan;
pub mod reader;
pub mod rules;
pub mod writer;

pub use backend::{Backend, BackendOptions, Device};
pub use convert::{
    convert, plan_checkpoint, rule_set, ConvertReport, ConvertSpec, Converter, Progress,
    WriteOptions,
};
pub use dtype::DType;
pub use error::{Error, Result};
pub use layout::{Gather, LayoutOp};
pub use plan::{Plan, PlanEntry};
pub use reader::{Checkpoint, Format, OpenOptions, TensorInfo};
pub use rules::RuleSet;
