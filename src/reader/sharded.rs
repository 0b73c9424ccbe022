//! Sharded checkpoints: `*.index.json` (`{"metadata": …, "weight_map": {tensor: file}}`)
//! beside its shard files, safetensors or `torch.save` zips.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    map_file, not_regular, parse_single, Checkpoint, Format, OpenOptions, MAX_INDEX_BYTES,
};

/// Unsharded checkpoint files a folder without an index may hold, as Hugging Face
/// names them.
const SINGLE_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];
use crate::error::{Error, Result};

/// Finds the one `*.index.json` in a folder.
pub(crate) fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.ends_with(".index.json")) {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => find_single(dir),
        many => Err(Error::Shard {
            path: dir.to_path_buf(),
            detail: format!(
                "the folder holds {} index files ({}); open one of them",
                many.len(),
                many.iter()
                    .filter_map(|p| p.file_name().and_then(|n| n.to_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The one unsharded checkpoint file of a folder without an index (the usual layout of
/// small Hugging Face models).
fn find_single(dir: &Path) -> Result<PathBuf> {
    let present: Vec<PathBuf> = SINGLE_FILES
        .iter()
        .map(|name| dir.join(name))
        .filter(|p| p.exists())
        .collect();
    match present.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::Shard {
            path: dir.to_path_buf(),
            detail: format!(
                "the folder holds no *.index.json and none of {} (open a checkpoint file, or the index of a sharded one)",
                SINGLE_FILES.join(", ")
            ),
        }),
        _ => Err(Error::Shard {
            path: dir.to_path_buf(),
            detail: format!(
                "the folder holds both {}; open one of them",
                SINGLE_FILES.join(" and ")
            ),
        }),
    }
}

/// Opens the shards an index names and checks them against its weight map.
pub(crate) fn open(index: &Path, opts: &OpenOptions) -> Result<Checkpoint> {
    let err = |detail: String| Error::Shard {
        path: index.to_path_buf(),
        detail,
    };
    let meta = std::fs::metadata(index).map_err(|e| Error::io(index, e))?;
    if !meta.is_file() {
        return Err(err(not_regular(&meta)));
    }
    let len = meta.len();
    if len > MAX_INDEX_BYTES {
        return Err(err(format!(
            "the index is {len} bytes, over the limit of {MAX_INDEX_BYTES}"
        )));
    }
    // Never more than the limit, even if the file grows after the check above.
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(
            std::fs::File::open(index).map_err(|e| Error::io(index, e))?,
            MAX_INDEX_BYTES + 1,
        ),
        &mut text,
    )
    .map_err(|e| Error::io(index, e))?;
    if text.len() as u64 > MAX_INDEX_BYTES {
        return Err(err(format!(
            "the index grew over the limit of {MAX_INDEX_BYTES} bytes while being read"
        )));
    }
    let json: Value =
        super::safetensors::strict_json(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| err("no 'weight_map' object".to_string()))?;
    let dir = index.parent().unwrap_or(Path::new("."));

    // Shard files in first-mention order, each with the tensors the index puts there.
    let mut shards: Vec<(String, Vec<&str>)> = Vec::new();
    let mut expected: HashMap<&str, &str> = HashMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| err(format!("weight_map entry of '{tensor}' is not a file name")))?;
        if file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file == "."
            || file == ".."
        {
            return Err(err(format!(
                "shard name '{file}' of '{tensor}' is not a plain file name beside the index"
            )));
        }
        expected.insert(tensor.as_str(), file);
        match shards.iter_mut().find(|(f, _)| f == file) {
            Some((_, names)) => names.push(tensor),
            None => shards.push((file.to_string(), vec![tensor])),
        }
    }
    if shards.is_empty() {
        return Err(err("the weight_map is empty".to_string()));
    }
    shards.sort_by(|a, b| a.0.cmp(&b.0));

    let mut parts = Vec::with_capacity(shards.len());
    let mut format = Format::ShardedSafetensors;
    for (file_name, _) in &shards {
        let file = map_file(&dir.join(file_name))?;
        let (shard_format, parsed) = parse_single(&file, opts)?;
        if matches!(shard_format, Format::PyTorchZip | Format::PyTorchLegacy) {
            format = Format::ShardedPyTorch;
        }
        parts.push((file, parsed));
    }
    // Duplicates first: a tensor in two shards is the more telling error.
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for ((file_name, _), (_, parsed)) in shards.iter().zip(&parts) {
        for t in &parsed.tensors {
            if let Some(other) = seen.insert(t.name.as_str(), file_name.as_str()) {
                return Err(err(format!(
                    "tensor '{}' is in two shards, {other} and {file_name}",
                    t.name
                )));
            }
        }
    }
    for ((file_name, _), (_, parsed)) in shards.iter().zip(&parts) {
        for t in &parsed.tensors {
            match expected.get(t.name.as_str()) {
                Some(&f) if f == file_name => {}
                Some(&f) => {
                    return Err(err(format!(
                        "tensor '{}' is in {file_name} but the weight_map puts it in {f}",
                        t.name
                    )))
                }
                None => {
                    return Err(err(format!(
                        "tensor '{}' in {file_name} is not in the weight_map",
                        t.name
                    )))
                }
            }
        }
    }
    let mut missing: Vec<&str> = expected
        .keys()
        .filter(|name| !seen.contains_key(**name))
        .copied()
        .collect();
    missing.sort_unstable();
    if let Some(first) = missing.first() {
        return Err(err(format!(
            "{} tensor(s) of the weight_map are in no shard, first '{first}' (expected in {})",
            missing.len(),
            expected.get(first).unwrap_or(&"?")
        )));
    }
    let mut ckpt = Checkpoint::assemble(index.to_path_buf(), format, parts)?;
    if let Some(meta) = json.get("metadata").and_then(Value::as_object) {
        let extra: BTreeMap<String, String> = meta
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect();
        for (k, v) in extra {
            ckpt.metadata.entry(k).or_insert(v);
        }
    }
    Ok(ckpt)
}
