//! Writers: the output checkpoint, streamed tensor by tensor and committed atomically.

mod atomic;
mod safetensors;
internal! {
pub mod stream;
}

pub use atomic::AtomicFile;
pub(crate) use safetensors::header_bytes;
pub use safetensors::{HeaderEntry, SafetensorsWriter};
internal! {
pub use stream::BlockStream;
}
