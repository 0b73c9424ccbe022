//! torch.save checkpoints (`.pt`, `.pth`, `.bin`): the zip format of PyTorch 1.6 and
//! newer, and the [`legacy`] stream before it.
//!
//! The archive holds `<prefix>/data.pkl` (a pickle describing the object saved) and one
//! entry `<prefix>/data/<key>` per storage, stored uncompressed. The pickle is run by a
//! restricted VM ([`pickle`]) that only knows the few globals a state dict needs; the
//! storages are handed back as byte ranges of the mapped file, never copied.

mod legacy;
pub(crate) mod pickle;
pub(crate) mod zip;

pub(crate) use self::legacy::parse as parse_legacy;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use self::pickle::{DictItem, Span, StorageRef, Unpickled, Value};
use self::zip::Archive;
use super::{Parsed, TensorInfo};
use crate::error::{Error, Result};

/// How many keys an error message lists before it elides the rest.
const MAX_LISTED_KEYS: usize = 20;
/// Characters of a key an error message shows before it elides the rest.
const MAX_SHOWN_KEY_CHARS: usize = 80;

/// Parses a torch.save zip held in `map` (the whole mmapped file). Storages come back as
/// byte ranges of `map` (stored zip entries are mapped, never copied); tensors index into
/// them. `key` picks the state dict out of a top-level dict (e.g. `"model"`); without it
/// the top-level dict is used when it holds only tensors, else its one entry that does.
pub(crate) fn parse(path: &Path, map: &[u8], key: Option<&str>) -> Result<Parsed> {
    let archive = Archive::open(path, map)?;
    let prefix = archive_prefix(path, &archive)?;
    check_byteorder(path, map, &archive, &prefix)?;
    let pkl_name = format!("{prefix}data.pkl");
    let pkl_entry = archive.get(&pkl_name).ok_or_else(|| Error::UnknownFormat {
        path: path.to_path_buf(),
        detail: format!("zip archive without a '{pkl_name}' entry"),
    })?;
    let pkl = entry_bytes(map, archive.data(pkl_entry)?);
    let (un, root) = pickle::load(path, pkl)?;
    let state = select_state_dict(path, &un, &root, key)?;
    build(path, &un, state, |_, sref| {
        storage_range(path, &archive, &prefix, sref)
    })
}

/// True when `bytes` start like the legacy (pre-1.6, non-zip) torch.save format: a pickle
/// whose first object is the magic number 0x1950a86a20f9469cfc6c.
pub(crate) fn is_legacy(bytes: &[u8]) -> bool {
    const MAGIC: [u8; 12] = [
        0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
    ];
    let Some((&[0x80, proto], rest)) = bytes.split_first_chunk::<2>() else {
        return false;
    };
    if !(2..=5).contains(&proto) {
        return false;
    }
    // Protocol 4 and newer may open with a FRAME (opcode and 8-byte length).
    let rest = match rest.split_first_chunk::<9>() {
        Some((frame, after)) if frame[0] == 0x95 => after,
        _ => rest,
    };
    rest.starts_with(&MAGIC)
}

/// True when `bytes` look like a zip archive (a local file header, or the end record of
/// an empty archive).
pub(crate) fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

fn entry_bytes(map: &[u8], range: Range<usize>) -> &[u8] {
    // Archive::data bounds-checked the range against this map.
    map.get(range).unwrap_or_default()
}

/// The folder every entry lives in: the first entry's top folder, slash included.
fn archive_prefix(path: &Path, archive: &Archive) -> Result<String> {
    let first = archive
        .entries()
        .first()
        .ok_or_else(|| Error::UnknownFormat {
            path: path.to_path_buf(),
            detail: "empty zip archive".into(),
        })?;
    match first.name.find('/') {
        Some(i) if i > 0 => Ok(first.name[..=i].to_owned()),
        _ => Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            detail: format!(
                "zip archive whose first entry '{}' is not inside a folder, as torch.save writes",
                first.name
            ),
        }),
    }
}

/// Refuses big-endian archives: storages are mapped as they are, and every reader
/// downstream assumes little-endian elements.
fn check_byteorder(path: &Path, map: &[u8], archive: &Archive, prefix: &str) -> Result<()> {
    let Some(entry) = archive.get(&format!("{prefix}byteorder")) else {
        return Ok(());
    };
    let order = entry_bytes(map, archive.data(entry)?);
    if order.trim_ascii() == b"little" {
        return Ok(());
    }
    Err(Error::UnknownFormat {
        path: path.to_path_buf(),
        detail: format!(
            "byte order '{}' (only little-endian checkpoints are supported)",
            String::from_utf8_lossy(order.get(..16).unwrap_or(order))
        ),
    })
}

/// Whether `v` is a non-empty dict with only string keys and tensor values.
fn is_tensor_dict(un: &Unpickled, v: &Value) -> bool {
    un.dict(v).is_some_and(|items| {
        !items.is_empty()
            && items
                .iter()
                .all(|e| matches!((e.key, e.value), (Value::Str(_), Value::Tensor(_))))
    })
}

fn key_display(un: &Unpickled, k: &Value) -> String {
    match k {
        Value::Str(_) => {
            let s = un.str(k).unwrap_or_default();
            match s.char_indices().nth(MAX_SHOWN_KEY_CHARS) {
                Some((cut, _)) => format!("{}…", s.get(..cut).unwrap_or_default()),
                None => s.to_owned(),
            }
        }
        Value::Int(i) => i.to_string(),
        other => format!("<{}>", other.kind()),
    }
}

/// The first keys, quoted, and how many more there are: only what is shown is formatted.
fn list_keys<'v>(un: &Unpickled, keys: impl ExactSizeIterator<Item = &'v Value>) -> String {
    let total = keys.len();
    let mut s = keys
        .take(MAX_LISTED_KEYS)
        .map(|k| format!("'{}'", key_display(un, k)))
        .collect::<Vec<_>>()
        .join(", ");
    if total > MAX_LISTED_KEYS {
        s.push_str(&format!(" and {} more", total - MAX_LISTED_KEYS));
    }
    if s.is_empty() {
        s.push_str("none");
    }
    s
}

/// Finds the dict whose items are the checkpoint's tensors.
fn select_state_dict<'u>(
    path: &Path,
    un: &'u Unpickled,
    root: &Value,
    key: Option<&str>,
) -> Result<&'u [DictItem]> {
    let no_state = |detail: String| Error::NoStateDict {
        path: path.to_path_buf(),
        detail,
    };
    let top = un.dict(root).ok_or_else(|| {
        no_state(format!(
            "the saved object is a {}, not a dict of tensors",
            root.kind()
        ))
    })?;
    let top_keys = || list_keys(un, top.iter().map(|e| &e.key));
    if let Some(key) = key {
        // The last occurrence wins, as in the dict Python would build.
        let found = top.iter().rev().find(|e| un.str_is(&e.key, key));
        let Some(entry) = found else {
            return Err(no_state(format!(
                "no key '{key}' in the saved dict; available keys: {}",
                top_keys()
            )));
        };
        let v = &entry.value;
        let items = un.dict(v).ok_or_else(|| {
            no_state(format!(
                "'{key}' is a {}, not a dict of tensors; available keys: {}",
                v.kind(),
                top_keys()
            ))
        })?;
        if let Some(e) = items.iter().find(|e| !matches!(e.value, Value::Tensor(_))) {
            return Err(no_state(format!(
                "'{key}' is not a dict of tensors: its entry '{}' is a {}; available keys: {}",
                key_display(un, &e.key),
                e.value.kind(),
                top_keys()
            )));
        }
        return Ok(items);
    }
    if top.iter().all(|e| matches!(e.value, Value::Tensor(_))) {
        return Ok(top);
    }
    // Each dict is checked once, however many entries refer to it through the memo.
    let mut checked: HashMap<u32, bool> = HashMap::new();
    let candidates: Vec<&DictItem> = top
        .iter()
        .filter(|e| match e.value {
            Value::Dict(id) => *checked
                .entry(id)
                .or_insert_with(|| is_tensor_dict(un, &e.value)),
            _ => false,
        })
        .collect();
    match candidates.as_slice() {
        [e] => un
            .dict(&e.value)
            .ok_or_else(|| no_state("the state dict vanished".into())),
        [] => Err(no_state(format!(
            "the saved dict holds values that are not tensors and no entry is a dict of tensors; top-level keys: {}",
            top_keys()
        ))),
        many => Err(no_state(format!(
            "several entries are dicts of tensors ({}); choose one with a key",
            list_keys(un, many.iter().map(|e| &e.key))
        ))),
    }
}

/// Turns the state dict's items into tensors over the storages they use. `range_of`
/// gives the byte range of a storage of the pickle (its index in `un.storages`), checked
/// to hold all of its elements; it is asked once per storage used.
fn build(
    path: &Path,
    un: &Unpickled,
    state: &[DictItem],
    mut range_of: impl FnMut(usize, &StorageRef) -> Result<Range<usize>>,
) -> Result<Parsed> {
    let mut parsed = Parsed::default();
    // Storage of the pickle → index in `parsed.storages`, only for storages used.
    let mut storage_index: HashMap<usize, usize> = HashMap::new();
    // Names are looked up by their span of the pickle first: a name the memo repeats is
    // read and hashed once, not once per entry, so a long name repeated costs no more
    // than its bytes in the pickle.
    let mut by_span: HashMap<Span, usize> = HashMap::new();
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for item in state {
        let Value::Str(span) = item.key else {
            return Err(Error::NoStateDict {
                path: path.to_path_buf(),
                detail: format!(
                    "the state dict has a {} key '{}'",
                    item.key.kind(),
                    key_display(un, &item.key)
                ),
            });
        };
        let bad = |detail: String| Error::BadTensor {
            path: path.to_path_buf(),
            tensor: un.str(&item.key).unwrap_or_default().to_owned(),
            detail,
        };
        let Value::Tensor(t) = item.value else {
            return Err(bad(format!(
                "is a {}, not a tensor (nested containers inside a state dict are not supported)",
                item.value.kind()
            )));
        };
        let raw = un
            .tensors
            .get(t as usize)
            .ok_or_else(|| bad("dangling tensor".into()))?;
        let view = un
            .views
            .get(raw.storage)
            .ok_or_else(|| bad("dangling storage".into()))?;
        let sref = un
            .storages
            .get(view.root)
            .ok_or_else(|| bad("dangling storage".into()))?;
        let to_usize = |x: i64, what: &str| {
            usize::try_from(x).map_err(|_| bad(format!("{what} {x} is negative")))
        };
        let shape = un
            .shape(raw)
            .iter()
            .map(|&n| to_usize(n, "size"))
            .collect::<Result<Vec<_>>>()?;
        let strides = un
            .strides(raw)
            .iter()
            .map(|&s| to_usize(s, "stride"))
            .collect::<Result<Vec<_>>>()?;
        let offset = to_usize(raw.offset, "storage offset")?;
        crate::layout::checked_numel(&shape)
            .and_then(|n| n.checked_mul(sref.dtype.size()))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        let extent = crate::layout::src_extent(&shape, &strides, offset).map_err(|_| {
            bad(format!(
                "shape {shape:?} with strides {strides:?} overflows"
            ))
        })?;
        if extent > view.numel {
            return Err(bad(format!(
                "shape {shape:?} with strides {strides:?} at offset {offset} reaches element {extent} of a storage of {} elements",
                view.numel
            )));
        }
        // A view of a legacy storage starts inside its root.
        let offset = offset
            .checked_add(view.offset)
            .ok_or_else(|| bad(format!("storage offset {offset} overflows")))?;
        let storage = match storage_index.get(&view.root) {
            Some(&i) => i,
            None => {
                parsed.storages.push(range_of(view.root, sref)?);
                let i = parsed.storages.len() - 1;
                storage_index.insert(view.root, i);
                i
            }
        };
        let info = TensorInfo {
            name: String::new(),
            dtype: sref.dtype,
            shape,
            strides,
            offset,
            storage,
        };
        // A repeated key replaces the value in place, as in the dict Python would build.
        let known = match by_span.get(&span) {
            Some(&i) => Some(i),
            None => {
                let name = un.str(&item.key).unwrap_or_default();
                let known = by_name.get(name).copied();
                let i = *by_name.entry(name).or_insert(parsed.tensors.len());
                by_span.insert(span, i);
                known
            }
        };
        match known {
            Some(i) => {
                if let Some(slot) = parsed.tensors.get_mut(i) {
                    let name = std::mem::take(&mut slot.name);
                    *slot = TensorInfo { name, ..info };
                }
            }
            None => parsed.tensors.push(TensorInfo {
                name: un.str(&item.key).unwrap_or_default().to_owned(),
                ..info
            }),
        }
    }
    Ok(parsed)
}

/// Byte range of a storage's entry, checked to hold all of its elements.
fn storage_range(
    path: &Path,
    archive: &Archive,
    prefix: &str,
    sref: &StorageRef,
) -> Result<Range<usize>> {
    let name = format!("{prefix}data/{}", sref.key);
    let entry = archive.get(&name).ok_or_else(|| Error::Zip {
        path: path.to_path_buf(),
        detail: format!("storage entry '{name}' is missing"),
    })?;
    let range = archive.data(entry)?;
    let need = sref.numel.checked_mul(sref.dtype.size());
    match need {
        Some(need) if need <= range.len() => Ok(range.start..range.start + need),
        _ => Err(Error::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "storage entry '{name}' holds {} bytes, too few for its {} {} elements",
                range.len(),
                sref.numel,
                sref.dtype
            ),
        }),
    }
}

#[cfg(test)]
mod tests;
