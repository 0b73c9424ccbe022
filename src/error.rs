//! The one error type of the library.

use std::path::PathBuf;

/// Everything that can go wrong, with the file, tensor or rule it concerns.
///
/// Messages are lowercase, without a trailing period, and name the file first so the
/// CLI can print them as one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The OS error is part of the message and deliberately not also the `source()`:
    /// printers that walk the source chain (anyhow's `{:#}`) would show it twice.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{}: not a checkpoint relayout can read: {detail}", path.display())]
    UnknownFormat { path: PathBuf, detail: String },

    #[error("{}: malformed legacy torch.save file (written before PyTorch 1.6): {detail}", path.display())]
    LegacyTorchFormat { path: PathBuf, detail: String },

    #[error("{}: header of {size} bytes exceeds the limit of {limit} bytes", path.display())]
    HeaderTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    #[error("{}: file is truncated: {detail}", path.display())]
    Truncated { path: PathBuf, detail: String },

    #[error("{}: malformed safetensors header: {detail}", path.display())]
    SafetensorsHeader { path: PathBuf, detail: String },

    #[error("{}: tensor '{tensor}': {detail}", path.display())]
    BadTensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },

    #[error("{}: unsupported dtype '{dtype}'", path.display())]
    UnsupportedDType { path: PathBuf, dtype: String },

    #[error("{}: malformed zip archive: {detail}", path.display())]
    Zip { path: PathBuf, detail: String },

    #[error("{}: malformed pickle: {detail}", path.display())]
    Pickle { path: PathBuf, detail: String },

    #[error(
        "{}: pickle refers to global '{module}.{name}', which is not on the allowlist (nothing was executed)",
        path.display()
    )]
    ForbiddenGlobal {
        path: PathBuf,
        module: String,
        name: String,
    },

    #[error("{}: unsupported tensor: {detail}", path.display())]
    UnsupportedTensor { path: PathBuf, detail: String },

    #[error("{}: no state dict found: {detail}", path.display())]
    NoStateDict { path: PathBuf, detail: String },

    #[error("{}: sharded checkpoint: {detail}", path.display())]
    Shard { path: PathBuf, detail: String },

    #[error("{}: {}{detail}", path.display(), if key.is_empty() { String::new() } else { format!("key '{key}': ") })]
    Config {
        path: PathBuf,
        /// The dotted key path (empty for the file as a whole).
        key: String,
        detail: String,
    },

    #[error("{}: model folder: {detail}", path.display())]
    ModelFile { path: PathBuf, detail: String },

    #[error("{}: model_type '{model_type}' has no family in preset mlx-lm (families: {families}); pass --rules with a rule file for it", path.display())]
    UnknownModelType {
        path: PathBuf,
        model_type: String,
        families: String,
    },

    #[error("{}: {detail}, and preset mlx-lm picks the family by its model_type (families: {families}); pass --rules with a rule file for the model", path.display())]
    NoModelType {
        path: PathBuf,
        detail: String,
        families: String,
    },

    #[error("rules {origin}: {detail}")]
    Rules { origin: String, detail: String },

    #[error("{message} (rule '{rule}' needs variable '{variable}')")]
    MissingVariable {
        message: String,
        rule: String,
        variable: String,
    },

    #[error("{}: module types: {detail}", path.display())]
    ModuleTypes { path: PathBuf, detail: String },

    #[error("unknown preset '{name}' (available: {available})")]
    UnknownPreset { name: String, available: String },

    #[error("tensors '{first}' and '{second}' both map to '{target}'")]
    TargetCollision {
        first: String,
        second: String,
        target: String,
    },

    #[error("{count} tensor(s) match no rule, first '{first}' (add a rule, or allow unmatched tensors to leave them out)")]
    Unmatched { count: usize, first: String },

    #[error("invalid layout op: {detail}")]
    Layout { detail: String },

    /// Quantization parameters `mx.quantize` does not accept (the allowed ones named).
    #[error("quantization: {detail}")]
    Quantization { detail: String },

    #[error("{}: output already exists (pass --force to overwrite)", path.display())]
    OutputExists { path: PathBuf },

    #[error("{}: output path is the input checkpoint", path.display())]
    OutputIsInput { path: PathBuf },

    #[error("device '{device}' is not available: {detail}")]
    DeviceUnavailable { device: String, detail: String },

    #[error("{}: input changed while reading: {detail}", path.display())]
    InputChanged { path: PathBuf, detail: String },

    #[error("not enough space: the output needs {}, {} free on {}", human_bytes(*needed), human_bytes(*available), path.display())]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },

    #[error("interrupted; nothing was left behind")]
    Interrupted {
        /// The value the [`crate::convert::Interrupt`] was raised with (the CLI: the signal).
        code: usize,
    },

    #[error("gpu: {detail}")]
    Gpu { detail: String },

    #[error("{}: not a valid expectation file: {detail}", path.display())]
    Expectation { path: PathBuf, detail: String },

    #[error(
        "{}: {missing} missing, {unexpected} unexpected and {mismatched} mismatched tensor(s) against the {expected} expected",
        file.display()
    )]
    Verify {
        /// The expectation file.
        file: PathBuf,
        /// Counts of expected tensors not there, tensors not expected, and tensors on
        /// both sides with another shape or dtype.
        missing: usize,
        unexpected: usize,
        mismatched: usize,
        /// Number of tensors the expectation lists.
        expected: usize,
        /// The grouped report (`VerifyReport`'s `Display`), one line per finding, for
        /// the caller to show above the message.
        report: String,
    },
}

/// `7.4 GiB`, `512 B`: sizes as messages (and the CLI) show them.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}
