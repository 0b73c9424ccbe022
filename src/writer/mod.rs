//! Writers: the output checkpoint, streamed tensor by tensor and committed atomically.

mod atomic;
mod safetensors;
pub mod stream;

pub use atomic::AtomicFile;
pub(crate) use safetensors::header_bytes;
pub use safetensors::{HeaderEntry, SafetensorsWriter};
pub use stream::BlockStream;
