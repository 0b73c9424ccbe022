//! A small, read-only zip parser for torch.save archives: central directory (with zip64),
//! local headers, stored entries only. Nothing is decompressed or copied: an entry's data
//! is a byte range of the mapped file.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};

/// More entries than any checkpoint has (one per storage plus a few): bounds the memory a
/// hostile central directory can make us allocate.
const MAX_ENTRIES: usize = 1 << 22;

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD_LEN: usize = 22;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_LOCATOR_LEN: usize = 20;
const EOCD64_SIG: u32 = 0x0606_4b50;
const EOCD64_LEN: usize = 56;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const CENTRAL_LEN: usize = 46;
const LOCAL_SIG: u32 = 0x0403_4b50;
const LOCAL_LEN: usize = 30;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// General purpose flag: sizes live in a data descriptor after the data, not in the local header.
const FLAG_DATA_DESCRIPTOR: u16 = 1 << 3;
const FLAG_ENCRYPTED: u16 = 1;
const METHOD_STORED: u16 = 0;

/// One central directory entry.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub name: String,
    pub method: u16,
    flags: u16,
    compressed_size: u64,
    uncompressed_size: u64,
    local_offset: u64,
}

/// The entries of an archive held in `map`.
pub(crate) struct Archive<'a> {
    path: &'a Path,
    map: &'a [u8],
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

impl<'a> Archive<'a> {
    /// Reads the central directory of the zip archive `map`.
    pub fn open(path: &'a Path, map: &'a [u8]) -> Result<Archive<'a>> {
        let r = Reader { path, map };
        let eocd = find_eocd(&r)?;
        let (count, cd_size, cd_offset) = read_directory_location(&r, eocd)?;
        let count = usize::try_from(count)
            .ok()
            .filter(|&c| c <= MAX_ENTRIES)
            .ok_or_else(|| r.err(format!("{count} entries exceed the limit of {MAX_ENTRIES}")))?;
        let cd = r.range(cd_offset, cd_size, "central directory")?;
        let mut entries = Vec::with_capacity(count.min(cd.len() / CENTRAL_LEN));
        let mut by_name = HashMap::new();
        let mut pos = cd.start;
        for i in 0..count {
            let (entry, next) = read_central_entry(&r, pos, cd.end)
                .map_err(|e| wrap(e, &format!("central directory entry {i}")))?;
            if by_name.insert(entry.name.clone(), entries.len()).is_some() {
                return Err(r.err(format!("entry '{}' appears twice", entry.name)));
            }
            entries.push(entry);
            pos = next;
        }
        Ok(Archive {
            path,
            map,
            entries,
            by_name,
        })
    }

    /// Entries in central directory order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).and_then(|&i| self.entries.get(i))
    }

    /// Byte range of a stored entry's data inside the map, found through its local header.
    pub fn data(&self, entry: &Entry) -> Result<Range<usize>> {
        let r = Reader {
            path: self.path,
            map: self.map,
        };
        let ctx = |e: Error| wrap(e, &format!("entry '{}'", entry.name));
        if entry.flags & FLAG_ENCRYPTED != 0 {
            return Err(ctx(r.err("encrypted entries are not supported".into())));
        }
        if entry.method != METHOD_STORED {
            return Err(ctx(r.err(format!(
                "compressed with method {} (relayout maps entries without copying, so they must be stored uncompressed)",
                entry.method
            ))));
        }
        if entry.compressed_size != entry.uncompressed_size {
            return Err(ctx(r.err(format!(
                "stored entry has compressed size {} but uncompressed size {}",
                entry.compressed_size, entry.uncompressed_size
            ))));
        }
        let start = local_data_start(&r, entry).map_err(ctx)?;
        r.range(start as u64, entry.compressed_size, "entry data")
            .map_err(ctx)
    }
}

/// Bounds-checked little-endian reads of the map.
struct Reader<'a> {
    path: &'a Path,
    map: &'a [u8],
}

impl Reader<'_> {
    fn err(&self, detail: String) -> Error {
        Error::Zip {
            path: self.path.to_path_buf(),
            detail,
        }
    }

    fn bytes(&self, at: usize, len: usize, what: &str) -> Result<&[u8]> {
        at.checked_add(len)
            .and_then(|end| self.map.get(at..end))
            .ok_or_else(|| {
                self.err(format!(
                    "{what} at offset {at} ({len} bytes) runs past the end of the file ({} bytes)",
                    self.map.len()
                ))
            })
    }

    fn range(&self, at: u64, len: u64, what: &str) -> Result<Range<usize>> {
        let start = usize::try_from(at).ok();
        let end = start
            .zip(usize::try_from(len).ok())
            .and_then(|(s, l)| s.checked_add(l));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.map.len() => Ok(start..end),
            _ => Err(self.err(format!(
                "{what} at offset {at} ({len} bytes) runs past the end of the file ({} bytes)",
                self.map.len()
            ))),
        }
    }

    fn u16(&self, at: usize) -> Result<u16> {
        let b = self.bytes(at, 2, "field")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&self, at: usize) -> Result<u32> {
        let b = self.bytes(at, 4, "field")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, at: usize) -> Result<u64> {
        let b = self.bytes(at, 8, "field")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

fn wrap(e: Error, context: &str) -> Error {
    match e {
        Error::Zip { path, detail } => Error::Zip {
            path,
            detail: format!("{context}: {detail}"),
        },
        other => other,
    }
}

/// Offset of the end-of-central-directory record: the last signature whose record and
/// comment fit in the file, searched backwards over the longest comment zip allows.
fn find_eocd(r: &Reader) -> Result<usize> {
    let len = r.map.len();
    let last = len
        .checked_sub(EOCD_LEN)
        .ok_or_else(|| r.err(format!("{len} bytes is too short for a zip archive")))?;
    let first = last.saturating_sub(usize::from(u16::MAX));
    let sig = EOCD_SIG.to_le_bytes();
    let window = r.bytes(first, len - first, "end of central directory")?;
    let mut end = window.len();
    while let Some(i) = window
        .get(..end)
        .and_then(|w| w.windows(4).rposition(|x| x == sig))
    {
        let pos = first + i;
        if pos <= last {
            let comment = usize::from(r.u16(pos + 20)?);
            if pos + EOCD_LEN + comment <= len {
                return Ok(pos);
            }
        }
        end = i + 3;
    }
    Err(r.err("no end of central directory record found".into()))
}

/// Entry count, size and offset of the central directory, from the EOCD record or, when
/// a zip64 locator precedes it, from the zip64 EOCD record.
fn read_directory_location(r: &Reader, eocd: usize) -> Result<(u64, u64, u64)> {
    let count = u64::from(r.u16(eocd + 10)?);
    let size = u64::from(r.u32(eocd + 12)?);
    let offset = u64::from(r.u32(eocd + 16)?);
    let needs64 = count == u64::from(u16::MAX)
        || size == u64::from(u32::MAX)
        || offset == u64::from(u32::MAX);
    let locator = eocd
        .checked_sub(EOCD64_LOCATOR_LEN)
        .filter(|&at| r.u32(at).ok() == Some(EOCD64_LOCATOR_SIG));
    let Some(locator) = locator else {
        if needs64 {
            return Err(
                r.err("zip64 fields without a zip64 end of central directory locator".into())
            );
        }
        if r.u16(eocd + 4)? != 0 || r.u16(eocd + 6)? != 0 {
            return Err(r.err("multi-disk archives are not supported".into()));
        }
        return Ok((count, size, offset));
    };
    let at = r.u64(locator + 8)?;
    let at = r
        .range(at, EOCD64_LEN as u64, "zip64 end of central directory")?
        .start;
    if r.u32(at)? != EOCD64_SIG {
        return Err(r.err(format!(
            "no zip64 end of central directory record at offset {at}"
        )));
    }
    if r.u32(at + 16)? != 0 || r.u32(at + 20)? != 0 {
        return Err(r.err("multi-disk archives are not supported".into()));
    }
    Ok((r.u64(at + 32)?, r.u64(at + 40)?, r.u64(at + 48)?))
}

/// Reads the central directory entry at `pos` (which must end by `end`); returns it and
/// the position of the next one.
fn read_central_entry(r: &Reader, pos: usize, end: usize) -> Result<(Entry, usize)> {
    r.bytes(pos, CENTRAL_LEN, "header")?;
    if pos + CENTRAL_LEN > end {
        return Err(r.err("runs past the end of the central directory".into()));
    }
    if r.u32(pos)? != CENTRAL_SIG {
        return Err(r.err(format!("bad signature at offset {pos}")));
    }
    let flags = r.u16(pos + 8)?;
    let method = r.u16(pos + 10)?;
    let mut compressed_size = u64::from(r.u32(pos + 20)?);
    let mut uncompressed_size = u64::from(r.u32(pos + 24)?);
    let name_len = usize::from(r.u16(pos + 28)?);
    let extra_len = usize::from(r.u16(pos + 30)?);
    let comment_len = usize::from(r.u16(pos + 32)?);
    let disk = r.u16(pos + 34)?;
    let mut local_offset = u64::from(r.u32(pos + 42)?);
    // Lengths are u16s, so these sums cannot overflow.
    let name_at = pos + CENTRAL_LEN;
    let extra_at = name_at + name_len;
    let next = extra_at + extra_len + comment_len;
    if next > end {
        return Err(r.err("runs past the end of the central directory".into()));
    }
    let name = std::str::from_utf8(r.bytes(name_at, name_len, "name")?)
        .map_err(|_| r.err("entry name is not UTF-8".into()))?
        .to_owned();
    let extra = r.bytes(extra_at, extra_len, "extra field")?;
    if let Some(z) = find_extra(r, extra, ZIP64_EXTRA_ID)? {
        // Only the fields whose 32-bit slot is saturated are present, in this order.
        let mut fields = z.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        });
        let mut take = |v: &mut u64, what: &str| -> Result<()> {
            if *v == u64::from(u32::MAX) {
                *v = fields
                    .next()
                    .ok_or_else(|| r.err(format!("zip64 extra field lacks the {what}")))?;
            }
            Ok(())
        };
        take(&mut uncompressed_size, "uncompressed size")?;
        take(&mut compressed_size, "compressed size")?;
        take(&mut local_offset, "local header offset")?;
    }
    if disk != 0 && disk != u16::MAX {
        return Err(r.err("multi-disk archives are not supported".into()));
    }
    Ok((
        Entry {
            name,
            method,
            flags,
            compressed_size,
            uncompressed_size,
            local_offset,
        },
        next,
    ))
}

/// The payload of the extra record `id` inside an extra field, if present.
fn find_extra<'m>(r: &Reader, mut extra: &'m [u8], id: u16) -> Result<Option<&'m [u8]>> {
    while !extra.is_empty() {
        let (head, rest) = extra
            .split_at_checked(4)
            .ok_or_else(|| r.err("truncated extra field record".into()))?;
        let rid = u16::from_le_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let (body, rest) = rest
            .split_at_checked(len)
            .ok_or_else(|| r.err("extra field record runs past its field".into()))?;
        if rid == id {
            return Ok(Some(body));
        }
        extra = rest;
    }
    Ok(None)
}

/// Where an entry's data starts: after its local header, name and extra field. The local
/// header must agree with the central directory on name and method (and on sizes when it
/// records them), so two parsers cannot see different archives.
fn local_data_start(r: &Reader, entry: &Entry) -> Result<usize> {
    let at = r
        .range(entry.local_offset, LOCAL_LEN as u64, "local header")?
        .start;
    if r.u32(at)? != LOCAL_SIG {
        return Err(r.err(format!("bad local header signature at offset {at}")));
    }
    let flags = r.u16(at + 6)?;
    let method = r.u16(at + 8)?;
    let compressed = u64::from(r.u32(at + 18)?);
    let uncompressed = u64::from(r.u32(at + 22)?);
    let name_len = usize::from(r.u16(at + 26)?);
    let extra_len = usize::from(r.u16(at + 28)?);
    let name_at = at
        .checked_add(LOCAL_LEN)
        .ok_or_else(|| r.err("local header offset overflows".into()))?;
    let name = r.bytes(name_at, name_len, "local name")?;
    if name != entry.name.as_bytes() {
        return Err(r.err("local header names a different entry".into()));
    }
    if method != entry.method {
        return Err(r.err(format!(
            "local header says method {method}, central directory {}",
            entry.method
        )));
    }
    let extra_at = name_at + name_len;
    let extra = r.bytes(extra_at, extra_len, "local extra field")?;
    if flags & FLAG_DATA_DESCRIPTOR == 0 {
        let (mut c, mut u) = (compressed, uncompressed);
        if c == u64::from(u32::MAX) || u == u64::from(u32::MAX) {
            // A local zip64 record always holds both sizes, uncompressed first.
            let z = find_extra(r, extra, ZIP64_EXTRA_ID)?
                .ok_or_else(|| r.err("local header lacks its zip64 extra field".into()))?;
            let read = |i: usize| -> Result<u64> {
                let b = z
                    .get(i * 8..i * 8 + 8)
                    .ok_or_else(|| r.err("local zip64 extra field is too short".into()))?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Ok(u64::from_le_bytes(a))
            };
            u = read(0)?;
            c = read(1)?;
        }
        if c != entry.compressed_size || u != entry.uncompressed_size {
            return Err(r.err(format!(
                "local header sizes ({c}, {u}) differ from the central directory ({}, {})",
                entry.compressed_size, entry.uncompressed_size
            )));
        }
    }
    Ok(extra_at + extra_len)
}
