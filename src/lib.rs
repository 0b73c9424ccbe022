//! relayout: convert PyTorch checkpoints into other frameworks' tensor layouts.

pub mod backend;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod plan;
pub mod reader;
pub mod rules;
pub mod writer;

pub use dtype::DType;
pub use error::{Error, Result};
