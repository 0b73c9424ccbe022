//! (placeholder until the pytorch reader lands)
use std::path::Path;

use super::Parsed;
use crate::error::{Error, Result};

pub(crate) fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

pub(crate) fn is_legacy(_bytes: &[u8]) -> bool {
    false
}

pub(crate) fn parse(path: &Path, _map: &[u8], _key: Option<&str>) -> Result<Parsed> {
    Err(Error::UnknownFormat {
        path: path.to_path_buf(),
        detail: "pytorch reader pending".to_string(),
    })
}
