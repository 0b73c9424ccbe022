//! Writers: the output checkpoint, streamed tensor by tensor and committed atomically.

mod atomic;
pub(crate) mod output;
mod safetensors;
pub mod shard;
internal! {
pub mod stream;
}

pub use atomic::AtomicFile;
pub use output::{OutputKind, ShardOptions};
pub(crate) use safetensors::header_bytes;
pub use safetensors::{HeaderEntry, SafetensorsWriter};
internal! {
pub use stream::BlockStream;
}
