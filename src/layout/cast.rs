//! Element conversions between floating dtypes, done on the bits with integer
//! operations only, so every backend produces the same bytes.
//!
//! Semantics are PyTorch's `tensor.to(dtype)`: round to nearest, ties to even;
//! subnormals kept and rounded (never flushed); overflow to ±inf; ±0 and ±inf kept;
//! f64 to bf16/f16 rounds through f32 (two roundings, as torch does); widening
//! conversions are exact.
//!
//! NaN policy: a NaN stays a NaN in the same position. Narrowing conversions give the
//! canonical quiet NaN of the target with the source's sign (bf16 `0x7FC0`/`0xFFC0`,
//! f16 `0x7E00`/`0xFE00`, f32 `0x7FC00000`/`0xFFC00000`), as ml_dtypes does. Widening
//! conversions are exact on every bit, NaN payloads included.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A conversion from one floating dtype to another. Only [`Cast::new`] builds one, so
/// a `Cast` always names two different dtypes among F64, F32, F16 and BF16 with a
/// target other than F64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cast {
    from: DType,
    to: DType,
}

impl Cast {
    /// The conversion from `from` to `to`: `None` when they are the same dtype, an error
    /// when either is not a floating dtype relayout converts.
    pub fn new(from: DType, to: DType) -> Result<Option<Cast>> {
        if from == to {
            return Ok(None);
        }
        if !is_castable(from) || !matches!(to, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Layout {
                detail: format!("no conversion from {from} to {to}"),
            });
        }
        Ok(Some(Cast { from, to }))
    }

    pub fn from(self) -> DType {
        self.from
    }

    pub fn to(self) -> DType {
        self.to
    }
}

/// The floating dtypes a cast can start from. F8 tensors and every integer and bool
/// dtype are never converted.
pub fn is_castable(d: DType) -> bool {
    matches!(d, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
}

/// Converts a contiguous run: `src` holds whole `cast.from()` elements, `dst` exactly
/// as many `cast.to()` elements.
pub fn cast_slice(cast: Cast, src: &[u8], dst: &mut [u8]) -> Result<()> {
    let _ = (cast, src, dst);
    Err(Error::Layout {
        detail: "cast_slice: not built yet".to_string(),
    })
}

/// The naive oracle for one element: the source bits in the low bytes of a `u64`, the
/// result likewise.
pub(crate) fn reference_cast(cast: Cast, bits: u64) -> u64 {
    let _ = (cast, bits);
    0
}
