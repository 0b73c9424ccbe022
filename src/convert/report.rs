//! What a finished conversion did.

use std::path::PathBuf;

/// What a finished conversion did.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ConvertReport {
    /// Tensors this run wrote.
    pub tensors: usize,
    /// Bytes of tensor data this run wrote.
    pub bytes: u64,
    pub seconds: f64,
    pub backend: String,
    pub dropped: usize,
    pub unmatched: usize,
    /// The files this run wrote: the output file, or its shards.
    pub outputs: Vec<PathBuf>,
    /// Shards a worker found already complete and kept (a re-run).
    pub reused: Vec<PathBuf>,
    /// The index of a shard set, when this run wrote it.
    pub index: Option<PathBuf>,
    /// Shards in the whole set (0 for a single file), and how many exist now.
    pub shards: usize,
    pub shards_present: usize,
    /// Bytes this run uploaded to the GPU and read back from it (0 on the CPU).
    pub device_upload_bytes: u64,
    pub device_readback_bytes: u64,
}

impl ConvertReport {
    /// Output throughput in GB/s (10^9 bytes).
    pub fn gb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}
