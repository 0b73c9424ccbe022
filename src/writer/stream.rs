//! A sequential byte stream to a file, written by a background thread in large aligned
//! blocks, with `O_DIRECT` where the file system allows it.
//!
//! Buffered writes cost a copy into the page cache and leave gigabytes of dirty pages for
//! the final fsync to flush; direct writes go from our buffer to the device while the
//! next band is being computed. `O_DIRECT` needs every write's address, offset and length
//! aligned to the device block, so the stream fills aligned buffers and carries the
//! unaligned tail of each into the next; the last block is padded and the file cut back
//! to its length.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

/// Alignment of direct writes: covers 512-byte and 4 KiB logical block devices.
pub const BLOCK: usize = 4096;
/// Buffers alive at once: one being filled, one queued, one being written.
const BUFFERS: usize = 3;

/// A heap buffer whose usable part starts on a [`BLOCK`] boundary.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
}

impl AlignedBuf {
    fn new(cap: usize) -> AlignedBuf {
        let raw = vec![0u8; cap + BLOCK];
        let start = raw.as_ptr().align_offset(BLOCK).min(BLOCK);
        AlignedBuf { raw, start, cap }
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.cap]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.cap]
    }
}

/// Work for the background thread, done in order.
enum Job {
    /// One block-aligned write into the current file.
    Write {
        buf: AlignedBuf,
        len: usize,
        offset: u64,
    },
    /// Ends the current file (cut to `cut` bytes when given, then synced to disk) and
    /// goes on with `next`; answered with [`Done::Closed`]`(id)`.
    Switch {
        cut: Option<u64>,
        next: File,
        next_path: PathBuf,
        id: u64,
    },
}

/// What the background thread hands back.
enum Done {
    /// A buffer it has written, to fill again.
    Buffer(AlignedBuf),
    /// The file of [`BlockStream::switch`] call `id` is complete and durable.
    Closed(u64),
}

/// A sequential writer with a background thread doing the writes.
pub struct BlockStream {
    path: PathBuf,
    file: File,
    /// True when the file was opened with `O_DIRECT`: writes must stay block-aligned.
    direct: bool,
    to_writer: Option<SyncSender<Job>>,
    from_writer: Receiver<Result<Done>>,
    /// Files of earlier [`BlockStream::switch`] calls the thread has closed.
    closed: Vec<u64>,
    switches: u64,
    thread: Option<JoinHandle<()>>,
    cur: AlignedBuf,
    /// Bytes of `cur` filled.
    fill: usize,
    /// File offset of `cur`'s first byte.
    offset: u64,
    /// Largest slice `reserve` hands out.
    capacity: usize,
    /// Buffers on hand, not in flight.
    spare: Vec<AlignedBuf>,
    /// Buffers allocated so far (at most [`BUFFERS`]).
    allocated: usize,
}

impl std::fmt::Debug for BlockStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStream")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .field("offset", &self.offset)
            .field("fill", &self.fill)
            .finish()
    }
}

impl BlockStream {
    /// Streams into `file` from offset 0. `capacity` bounds the largest slice
    /// [`BlockStream::reserve`] hands out; `direct` says the file was opened with
    /// `O_DIRECT`.
    pub fn new(path: &Path, file: File, direct: bool, capacity: usize) -> Result<BlockStream> {
        let capacity = capacity.max(1);
        // Room for one reservation after the carried tail of the previous buffer.
        let cap = capacity.div_ceil(BLOCK) * BLOCK + 2 * BLOCK;
        let mut writer_file = file.try_clone().map_err(|e| Error::io(path, e))?;
        let (to_writer, jobs) = mpsc::sync_channel::<Job>(1);
        // Unbounded, but never long: at most BUFFERS buffers exist, and a Closed answer
        // follows each switch.
        let (done, from_writer) = mpsc::channel::<Result<Done>>();
        let mut thread_path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("relayout-writer".to_string())
            .spawn(move || {
                for job in jobs {
                    let result = match job {
                        Job::Write { buf, len, offset } => {
                            write_at(&writer_file, &buf.bytes()[..len], offset)
                                .map(|()| Done::Buffer(buf))
                                .map_err(|e| Error::io(&thread_path, e))
                        }
                        Job::Switch {
                            cut,
                            next,
                            next_path,
                            id,
                        } => cut
                            .map_or(Ok(()), |len| writer_file.set_len(len))
                            .and_then(|()| writer_file.sync_all())
                            .map_err(|e| Error::io(&thread_path, e))
                            .map(|()| {
                                writer_file = next;
                                thread_path = next_path;
                                Done::Closed(id)
                            }),
                    };
                    let failed = result.is_err();
                    if done.send(result).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| Error::io(path, e))?;
        Ok(BlockStream {
            path: path.to_path_buf(),
            file,
            direct,
            to_writer: Some(to_writer),
            from_writer,
            closed: Vec::new(),
            switches: 0,
            thread: Some(thread),
            cur: AlignedBuf::new(cap),
            fill: 0,
            offset: 0,
            capacity,
            spare: Vec::new(),
            allocated: 1,
        })
    }

    /// Bytes handed out so far (the stream's length).
    pub fn position(&self) -> u64 {
        self.offset + self.fill as u64
    }

    /// The next `len` bytes of the stream, to be filled by the caller before the next
    /// call; `len` is at most the capacity given to [`BlockStream::new`].
    pub fn reserve(&mut self, len: usize) -> Result<&mut [u8]> {
        if len > self.capacity {
            return Err(Error::io(
                &self.path,
                std::io::Error::other(format!(
                    "a write of {len} bytes exceeds the stream's block of {}",
                    self.capacity
                )),
            ));
        }
        if self.fill + len > self.cur.cap {
            self.send_full_blocks()?;
        }
        let start = self.fill;
        self.fill += len;
        Ok(&mut self.cur.bytes_mut()[start..start + len])
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        for chunk in bytes.chunks(self.capacity) {
            self.reserve(chunk.len())?.copy_from_slice(chunk);
        }
        Ok(())
    }

    /// Ends the current file and goes on streaming into `file` from its offset 0,
    /// without waiting: the background thread writes what is left of the current file,
    /// cuts it to its length and syncs it while the caller fills the next one. Returns
    /// the id [`BlockStream::take_closed`] reports once the file is complete and durable.
    pub fn switch(&mut self, path: &Path, file: File, direct: bool) -> Result<u64> {
        let total = self.position();
        let len = self.padded_fill();
        if len > 0 {
            let next = self.take_buffer()?;
            let last = std::mem::replace(&mut self.cur, next);
            self.send(last, len)?;
        }
        let writer_file = file.try_clone().map_err(|e| Error::io(path, e))?;
        self.switches += 1;
        let id = self.switches;
        self.send_job(Job::Switch {
            cut: self.direct.then_some(total),
            next: writer_file,
            next_path: path.to_path_buf(),
            id,
        })?;
        self.path = path.to_path_buf();
        self.file = file;
        self.direct = direct;
        self.offset = 0;
        self.fill = 0;
        Ok(id)
    }

    /// Ids of the files of earlier [`BlockStream::switch`] calls that are complete and
    /// synced, each reported once.
    pub fn take_closed(&mut self) -> Result<Vec<u64>> {
        while let Ok(result) = self.from_writer.try_recv() {
            match result? {
                Done::Buffer(b) => self.spare.push(b),
                Done::Closed(id) => self.closed.push(id),
            }
        }
        Ok(std::mem::take(&mut self.closed))
    }

    /// Bytes of `cur` to write at the end of a file: the filled part, zero-padded to a
    /// block for direct I/O.
    fn padded_fill(&mut self) -> usize {
        if self.direct {
            let padded = self.fill.div_ceil(BLOCK) * BLOCK;
            self.cur.bytes_mut()[self.fill..padded].fill(0);
            padded
        } else {
            self.fill
        }
    }

    /// Writes what is left, waits for every write and cuts the file to the stream's
    /// length. Returns the underlying file. Every earlier switched-from file is then
    /// closed (see [`BlockStream::take_closed`]).
    pub fn finish(mut self) -> Result<File> {
        let total = self.position();
        let len = self.padded_fill();
        let last = std::mem::replace(&mut self.cur, AlignedBuf::new(0));
        if len > 0 {
            self.send(last, len)?;
        }
        self.to_writer = None;
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| {
                Error::io(
                    &self.path,
                    std::io::Error::other("the writer thread panicked"),
                )
            })?;
        }
        while let Ok(result) = self.from_writer.try_recv() {
            if let Done::Closed(id) = result? {
                self.closed.push(id);
            }
        }
        if self.direct {
            self.file
                .set_len(total)
                .map_err(|e| Error::io(&self.path, e))?;
        }
        self.file.try_clone().map_err(|e| Error::io(&self.path, e))
    }

    /// Hands the whole blocks of `cur` to the writer and carries its tail to a fresh
    /// buffer.
    fn send_full_blocks(&mut self) -> Result<()> {
        let aligned = self.fill / BLOCK * BLOCK;
        let tail = self.fill - aligned;
        let mut next = self.take_buffer()?;
        next.bytes_mut()[..tail].copy_from_slice(&self.cur.bytes()[aligned..self.fill]);
        let full = std::mem::replace(&mut self.cur, next);
        self.send(full, aligned)?;
        self.offset += aligned as u64;
        self.fill = tail;
        Ok(())
    }

    fn send(&mut self, buf: AlignedBuf, len: usize) -> Result<()> {
        let offset = self.offset;
        self.send_job(Job::Write { buf, len, offset })
    }

    fn send_job(&mut self, job: Job) -> Result<()> {
        let sent = self
            .to_writer
            .as_ref()
            .is_some_and(|tx| tx.send(job).is_ok());
        if sent {
            return Ok(());
        }
        // The thread stopped: it returned the error that stopped it.
        Err(self.writer_error())
    }

    /// A buffer to fill: a spare, a new one while fewer than [`BUFFERS`] exist, or the
    /// next one the writer is done with.
    fn take_buffer(&mut self) -> Result<AlignedBuf> {
        if let Some(b) = self.spare.pop() {
            return Ok(b);
        }
        if self.allocated < BUFFERS {
            self.allocated += 1;
            return Ok(AlignedBuf::new(self.cur.cap));
        }
        loop {
            match self.from_writer.recv() {
                Ok(Ok(Done::Buffer(b))) => return Ok(b),
                Ok(Ok(Done::Closed(id))) => self.closed.push(id),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(self.writer_error()),
            }
        }
    }

    fn writer_error(&mut self) -> Error {
        while let Ok(result) = self.from_writer.try_recv() {
            if let Err(e) = result {
                return e;
            }
        }
        Error::io(
            &self.path,
            std::io::Error::other("the writer thread stopped"),
        )
    }
}

impl Drop for BlockStream {
    fn drop(&mut self) {
        // Stop the thread before the caller removes the file it writes to.
        self.to_writer = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(all(unix, not(relayout_portable)))]
fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset)
}

#[cfg(any(not(unix), relayout_portable))]
fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::AtomicFile;

    /// Streams `total` pseudo-random bytes in reservations of the given sizes (cycled)
    /// through a stream of `capacity`, direct or not, and checks the file holds exactly
    /// those bytes.
    fn round_trip(name: &str, capacity: usize, sizes: &[usize], total: usize, direct: bool) {
        let dir = std::env::temp_dir().join(format!("relayout-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join(name);
        let mut out = AtomicFile::create(&target, true).unwrap();
        let direct = direct && out.try_direct();
        let file = out.file().unwrap().try_clone().unwrap();
        let mut stream = BlockStream::new(out.temp_path(), file, direct, capacity).unwrap();
        let want: Vec<u8> = (0..total).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut at = 0;
        for &size in sizes.iter().cycle() {
            if at == total {
                break;
            }
            let n = size.min(total - at).min(capacity);
            stream
                .reserve(n)
                .unwrap()
                .copy_from_slice(&want[at..at + n]);
            at += n;
            assert_eq!(stream.position(), at as u64);
        }
        stream.finish().unwrap();
        out.commit().unwrap();
        let got = std::fs::read(&target).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        assert!(got == want, "{name}: bytes differ");
        std::fs::remove_file(&target).unwrap();
    }

    #[test]
    fn reservations_of_every_size_around_the_block_reach_the_file_in_order() {
        let sizes = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3, 2 * BLOCK + 5, 17];
        for direct in [false, true] {
            for capacity in [8, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK] {
                for total in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 10 * BLOCK + 123] {
                    let name = format!("s-{direct}-{capacity}-{total}");
                    round_trip(&name, capacity, &sizes, total, direct);
                }
            }
        }
    }

    #[test]
    fn large_streams_cycle_through_every_buffer() {
        for direct in [false, true] {
            round_trip(
                "large",
                1 << 16,
                &[(1 << 16) - 3, 1 << 16, 12_345],
                3 << 20,
                direct,
            );
        }
    }

    #[test]
    fn switching_files_mid_stream_gives_each_file_exactly_its_bytes() {
        let dir = std::env::temp_dir().join(format!("relayout-switch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sizes = [1, BLOCK - 1, BLOCK + 1, 7, 3 * BLOCK];
        // File lengths around the block, empty files among them.
        let lengths = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 0, 5 * BLOCK + 77, 3];
        for direct in [false, true] {
            for capacity in [BLOCK - 1, BLOCK, 2 * BLOCK + 3] {
                let mut outs = Vec::new();
                let mut stream: Option<BlockStream> = None;
                let mut ids = Vec::new();
                for (k, &len) in lengths.iter().enumerate() {
                    let target = dir.join(format!("f{k}"));
                    let mut out = AtomicFile::create(&target, true).unwrap();
                    let d = direct && out.try_direct();
                    let file = out.file().unwrap().try_clone().unwrap();
                    match stream.as_mut() {
                        None => {
                            stream =
                                Some(BlockStream::new(out.temp_path(), file, d, capacity).unwrap())
                        }
                        Some(s) => ids.push(s.switch(out.temp_path(), file, d).unwrap()),
                    }
                    let s = stream.as_mut().unwrap();
                    let mut at = 0;
                    for &size in sizes.iter().cycle() {
                        if at == len {
                            break;
                        }
                        let n = size.min(len - at).min(capacity);
                        for (i, b) in s.reserve(n).unwrap().iter_mut().enumerate() {
                            *b = (at + i + 31 * k) as u8;
                        }
                        at += n;
                    }
                    assert_eq!(s.position(), len as u64);
                    outs.push((target, out, len));
                }
                let mut stream = stream.unwrap();
                let mut closed = stream.take_closed().unwrap();
                stream.finish().unwrap();
                // Not reported twice; after finish every earlier file is closed.
                let mut rest = Vec::new();
                for (i, (target, mut out, len)) in outs.into_iter().enumerate() {
                    if i + 1 < lengths.len() {
                        out.assume_synced().unwrap();
                    }
                    out.commit().unwrap();
                    let got = std::fs::read(&target).unwrap();
                    let want: Vec<u8> = (0..len).map(|j| (j + 31 * i) as u8).collect();
                    assert!(
                        got == want,
                        "file {i}, direct {direct}, capacity {capacity}"
                    );
                    rest.push(target);
                }
                closed.sort_unstable();
                closed.dedup();
                assert!(closed.iter().all(|id| ids.contains(id)));
                for t in rest {
                    std::fs::remove_file(t).unwrap();
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failure_in_a_later_file_is_reported() {
        let dir = std::env::temp_dir();
        let good = dir.join(format!("relayout-switch-ok-{}", std::process::id()));
        let bad = dir.join(format!("relayout-switch-ro-{}", std::process::id()));
        std::fs::write(&bad, b"").unwrap();
        let mut stream =
            BlockStream::new(&good, File::create(&good).unwrap(), false, BLOCK).unwrap();
        stream.reserve(10).unwrap().fill(1);
        // The next file is read-only: its writes fail in the thread.
        stream
            .switch(&bad, File::open(&bad).unwrap(), false)
            .unwrap();
        let mut result = Ok(());
        for _ in 0..64 {
            if let Err(e) = stream.reserve(BLOCK).map(|b| b.fill(2)) {
                result = Err(e);
                break;
            }
        }
        let err = match result {
            Err(e) => e,
            Ok(()) => stream.finish().expect_err("writes to a read-only file"),
        };
        assert!(err.to_string().contains("relayout-switch-ro"), "{err}");
        assert_eq!(std::fs::read(&good).unwrap(), [1; 10]);
        std::fs::remove_file(&good).unwrap();
        std::fs::remove_file(&bad).unwrap();
    }

    #[test]
    fn a_reservation_over_capacity_is_an_error() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("relayout-stream-cap-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let mut stream = BlockStream::new(&path, file, false, 16).unwrap();
        assert!(stream.reserve(17).is_err());
        assert!(stream.reserve(16).is_ok());
        drop(stream);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_failing_write_is_reported_not_hung_or_panicked() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("relayout-stream-ro-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        // A read-only descriptor: every write fails with EBADF in the writer thread.
        let file = File::open(&path).unwrap();
        let mut stream = BlockStream::new(&path, file, false, BLOCK).unwrap();
        let mut result = Ok(());
        for _ in 0..64 {
            if let Err(e) = stream.reserve(BLOCK).map(|b| b.fill(1)) {
                result = Err(e);
                break;
            }
        }
        let err = match result {
            Err(e) => e,
            Ok(()) => stream.finish().expect_err("writes to a read-only file"),
        };
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        std::fs::remove_file(&path).unwrap();
    }
}
