//! torch.save checkpoints in the legacy format: what PyTorch wrote before 1.6, and since
//! then with `_use_new_zipfile_serialization=False`.
//!
//! The file is one stream (`_legacy_save` and `_legacy_load` in torch/serialization.py):
//!
//! | part | content |
//! | --- | --- |
//! | pickle | the magic number 0x1950a86a20f9469cfc6c |
//! | pickle | the protocol version, 1001 |
//! | pickle | sys_info: `{"protocol_version", "little_endian", "type_sizes"}` |
//! | pickle | the object saved; storages are persistent ids `('storage', storage_type, root_key, location, numel, view_metadata)`, `view_metadata` None or `(view_key, offset, numel)` |
//! | pickle | the list of root keys, in the order of the data that follows |
//! | per key | the element count (8 bytes, little-endian), then the elements, little-endian |
//!
//! The pickles run one after another through the VM that runs a zip's `data.pkl`, with
//! its allowlist and one memory budget for the whole file. Each storage is a byte range
//! of the map, never copied; the ranges follow one another, so none overlaps another.

use std::ops::Range;
use std::path::Path;

use super::pickle::{PersistentIds, Unpickled, Unpickler, Value};
use super::{build, is_legacy, select_state_dict};
use crate::error::{Error, Result};
use crate::reader::Parsed;

/// The protocol version of the second pickle; torch.load refuses any other.
const PROTOCOL_VERSION: i64 = 1001;
/// Bytes of the element count before each storage's data.
const COUNT_BYTES: usize = 8;

/// Parses a legacy torch.save file held in `map` (the whole mmapped file). Storages come
/// back as byte ranges of `map`; `key` picks the state dict as for the zip format.
pub(crate) fn parse(path: &Path, map: &[u8], key: Option<&str>) -> Result<Parsed> {
    let malformed = |detail: String| Error::LegacyTorchFormat {
        path: path.to_path_buf(),
        detail,
    };
    if !is_legacy(map) {
        return Err(malformed("it does not start with the magic number".into()));
    }
    let mut vm = Unpickler::new(path, map, PersistentIds::Legacy);
    // is_legacy checked the magic number's bytes; the VM keeps no value above i64.
    let magic = vm.load_next()?;
    if magic != Value::BigInt {
        return Err(malformed(format!(
            "the magic number's pickle holds a {}",
            magic.kind()
        )));
    }
    match vm.load_next()? {
        Value::Int(PROTOCOL_VERSION) => {}
        Value::Int(v) => {
            return Err(malformed(format!(
                "protocol version {v}, not {PROTOCOL_VERSION}"
            )))
        }
        other => {
            return Err(malformed(format!(
                "the protocol version is a {}",
                other.kind()
            )))
        }
    }
    let sys_info = vm.load_next()?;
    check_little_endian(path, vm.built(), &sys_info)?;
    let root = vm.load_next()?;
    let keys = vm.load_next()?;
    let data_start = vm.position();
    let un = vm.finish();
    let ranges = storage_ranges(path, map, &un, &keys, data_start)?;
    let state = select_state_dict(path, &un, &root, key)?;
    build(path, &un, state, |root, sref| {
        ranges
            .get(root)
            .cloned()
            .ok_or_else(|| malformed(format!("storage '{}' has no data", sref.key)))
    })
}

/// Refuses files from big-endian machines: storages are mapped as they are, and every
/// reader downstream assumes little-endian elements.
fn check_little_endian(path: &Path, un: &Unpickled, sys_info: &Value) -> Result<()> {
    let items = un.dict(sys_info).ok_or_else(|| Error::LegacyTorchFormat {
        path: path.to_path_buf(),
        detail: format!("sys_info is a {}, not a dict", sys_info.kind()),
    })?;
    let flag = items
        .iter()
        .rev()
        .find(|e| un.str_is(&e.key, "little_endian"))
        .map(|e| e.value);
    match flag {
        Some(Value::Bool(true)) => Ok(()),
        Some(Value::Bool(false)) => Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            detail: "legacy torch.save file written on a big-endian machine (sys_info little_endian is False); only little-endian checkpoints are supported".into(),
        }),
        _ => Err(Error::LegacyTorchFormat {
            path: path.to_path_buf(),
            detail: "sys_info has no boolean 'little_endian'".into(),
        }),
    }
}

/// The byte range of every storage the pickle names (indexed like `un.storages`), read
/// from the data after the pickles at `pos`, in the order of the key list `keys`.
fn storage_ranges(
    path: &Path,
    map: &[u8],
    un: &Unpickled,
    keys: &Value,
    mut pos: usize,
) -> Result<Vec<Range<usize>>> {
    let malformed = |detail: String| Error::LegacyTorchFormat {
        path: path.to_path_buf(),
        detail,
    };
    let truncated = |detail: String| Error::Truncated {
        path: path.to_path_buf(),
        detail,
    };
    let list = un.list(keys).ok_or_else(|| {
        malformed(format!(
            "the storage key list is a {}, not a list",
            keys.kind()
        ))
    })?;
    let mut ranges: Vec<Option<Range<usize>>> = vec![None; un.storages.len()];
    for k in list {
        let key = un.str(k).ok_or_else(|| {
            malformed(format!(
                "the storage key list holds a {}, not a str",
                k.kind()
            ))
        })?;
        let (root, sref) = un
            .storage_index(key)
            .and_then(|i| Some((i, un.storages.get(i)?)))
            .ok_or_else(|| {
                malformed(format!(
                    "storage '{key}' is listed, but the pickle refers to no storage of that key"
                ))
            })?;
        let slot = ranges
            .get_mut(root)
            .ok_or_else(|| malformed(format!("storage '{key}' has no slot")))?;
        if slot.is_some() {
            return Err(malformed(format!("storage '{key}' is listed twice")));
        }
        let data_start = pos
            .checked_add(COUNT_BYTES)
            .filter(|&e| e <= map.len())
            .ok_or_else(|| {
                truncated(format!(
                    "the element count of storage '{key}' at byte {pos} lies beyond the end of the file ({} bytes)",
                    map.len()
                ))
            })?;
        let count = map
            .get(pos..data_start)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| truncated(format!("storage '{key}' has no element count")))?;
        if usize::try_from(count).ok() != Some(sref.numel) {
            return Err(malformed(format!(
                "storage '{key}' holds {count} elements at byte {pos}, but the pickle gives it {}",
                sref.numel
            )));
        }
        let end = sref
            .numel
            .checked_mul(sref.dtype.size())
            .and_then(|n| data_start.checked_add(n))
            .filter(|&e| e <= map.len())
            .ok_or_else(|| {
                truncated(format!(
                    "storage '{key}' of {} {} elements from byte {data_start} runs beyond the end of the file ({} bytes)",
                    sref.numel,
                    sref.dtype,
                    map.len()
                ))
            })?;
        *slot = Some(data_start..end);
        pos = end;
    }
    un.storages
        .iter()
        .zip(ranges)
        .map(|(s, r)| {
            r.ok_or_else(|| {
                malformed(format!(
                    "storage '{}' is missing from the storage key list",
                    s.key
                ))
            })
        })
        .collect()
}
