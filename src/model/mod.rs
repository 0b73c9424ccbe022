//! Model folders: the files beside the weights (config, tokenizer, generation config, code,
//! licence) that make an output folder a model people can load, and the model's
//! `config.json`, read as hostile input.
//!
//! A checkpoint whose folder holds `config.json` is a model folder. Converting it into a
//! folder copies the files [`is_copied`] names, in the same all-or-nothing commit as
//! the weights ([`crate::writer`]), unless copying is turned off.

pub(crate) mod config;
pub mod quantize;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

pub use config::ModelConfig;

/// The name of a model's configuration file.
pub const CONFIG_NAME: &str = "config.json";

/// Exact names copied from a model folder.
const COPIED_NAMES: [&str; 17] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "README.md",
    "spiece.model",
    "sentencepiece.bpe.model",
];

/// Whether a model folder's file of this name is copied into a folder output: the
/// configuration, tokenizer and processor files, `*.tiktoken`, the model's own code
/// (`*.py`), `LICENSE*`, `NOTICE*` and `README.md`. Weights and their indexes, hidden
/// files and anything else are not.
pub fn is_copied(name: &str) -> bool {
    if name.starts_with('.') || is_weights(name) {
        return false;
    }
    COPIED_NAMES.contains(&name)
        || name.ends_with(".tiktoken")
        || name.ends_with(".py")
        || name.starts_with("LICENSE")
        || name.starts_with("NOTICE")
}

/// Weights, checkpoints and their indexes, which a conversion writes or leaves behind but
/// never copies.
fn is_weights(name: &str) -> bool {
    const EXTENSIONS: [&str; 9] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".h5",
        ".msgpack",
        ".onnx",
    ];
    let lower = name.to_ascii_lowercase();
    EXTENSIONS.iter().any(|e| lower.ends_with(e))
        || lower.contains(".safetensors.")
        || lower.contains(".bin.")
        || lower.starts_with("consolidated.")
        || lower == "training_args.bin"
}

/// One file a folder output receives beside the weights.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModelFile {
    pub(crate) name: String,
    /// Where it comes from (links followed): copied as is, or the source of `content`.
    pub(crate) source: PathBuf,
    /// Bytes written.
    pub(crate) bytes: u64,
    /// What is written instead of the source's bytes (a rewritten `config.json`).
    pub(crate) content: Option<Arc<Vec<u8>>>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl ModelFile {
    /// The file name in the output folder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The source file (links followed).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Bytes written.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True when the output's bytes are not the source's (a rewritten `config.json`).
    pub fn is_rewritten(&self) -> bool {
        self.content.is_some()
    }

    /// The file's bytes in the output: the rewritten content, or `None` to copy the source.
    pub(crate) fn content(&self) -> Option<&[u8]> {
        self.content.as_deref().map(Vec::as_slice)
    }

    /// This file with `content` written in place of the source's bytes.
    pub(crate) fn rewritten(mut self, content: Vec<u8>) -> ModelFile {
        self.bytes = content.len() as u64;
        self.content = Some(Arc::new(content));
        self
    }
}

/// The model folder a checkpoint path belongs to: the path itself when it is a folder,
/// else the folder holding it; `None` when that folder has no `config.json`.
pub fn model_dir(input: &Path) -> Option<PathBuf> {
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        match input.parent() {
            Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
            Some(p) => p.to_path_buf(),
            None => return None,
        }
    };
    std::fs::symlink_metadata(dir.join(CONFIG_NAME))
        .is_ok()
        .then_some(dir)
}

/// The files of the model folder `dir` that a folder output receives, sorted by name.
/// Links are followed to regular files (a Hugging Face cache snapshot is all links into
/// `../../blobs`); a copied name that is a FIFO, socket, device or folder is refused.
pub fn model_files(dir: &Path) -> Result<Vec<ModelFile>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !is_copied(&name) {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            continue;
        }
        if !meta.is_file() {
            return Err(Error::ModelFile {
                path,
                detail: "is not a regular file (a FIFO, socket or device); refusing to read it"
                    .to_string(),
            });
        }
        let source = std::fs::canonicalize(&path).unwrap_or(path);
        files.push(ModelFile {
            name,
            source,
            bytes: meta.len(),
            content: None,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_the_model_files_and_never_weights_or_hidden_files() {
        for name in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.model",
            "vocab.json",
            "merges.txt",
            "added_tokens.json",
            "chat_template.jinja",
            "chat_template.json",
            "cl100k.tiktoken",
            "preprocessor_config.json",
            "processor_config.json",
            "modeling_custom.py",
            "LICENSE",
            "LICENSE.txt",
            "NOTICE",
            "README.md",
        ] {
            assert!(is_copied(name), "{name} not copied");
        }
        for name in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "model.pt",
            "model.pth",
            "model.ckpt",
            "model.gguf",
            "tf_model.h5",
            "flax_model.msgpack",
            "model.onnx",
            "training_args.bin",
            "consolidated.00.pth",
            "consolidated.safetensors",
            ".gitattributes",
            ".hidden.py",
            "notes.txt",
            "optimizer.pt",
        ] {
            assert!(!is_copied(name), "{name} copied");
        }
    }
}
