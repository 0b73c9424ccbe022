//! Element conversions between floating dtypes, done on the bits with integer
//! operations only, so every backend produces the same bytes.
//!
//! Semantics are PyTorch's `tensor.to(dtype)`: round to nearest, ties to even;
//! subnormals kept and rounded (never flushed); overflow to ±inf; ±0 and ±inf kept;
//! f64 to bf16/f16 rounds through f32 (two roundings, as torch does); widening
//! conversions are exact; f16 <-> bf16 widens exactly to f32 and rounds once.
//!
//! [`cast_slice`] is the fast path: branch-free integer kernels per dtype pair that
//! LLVM vectorises (compiled for AVX2 too, picked at run time), split over rayon
//! threads for large slices. `reference_cast` is the naive oracle the reference
//! backend uses: it decodes the value exactly and searches the target's patterns for
//! the nearest one, sharing no code with the fast path.
//!
//! NaN policy: a NaN stays a NaN in the same position. Narrowing conversions give the
//! canonical quiet NaN of the target with the source's sign (bf16 `0x7FC0`/`0xFFC0`,
//! f16 `0x7E00`/`0xFE00`, f32 `0x7FC00000`/`0xFFC00000`), as ml_dtypes does. Widening
//! conversions are exact on every bit, NaN payloads included.

use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Source bytes from which [`cast_slice`] splits over rayon threads: even the fastest
/// kernel (f32 -> bf16, about 30 GiB/s on one core) takes over 30 µs for this much,
/// several times what waking other threads costs.
const PAR_THRESHOLD: usize = 1 << 20;

/// Elements per parallel task of [`cast_slice`]: 256 KiB of f32, enough to amortise a
/// task, small enough to balance over every core.
const PAR_CHUNK_ELEMS: usize = 64 << 10;

/// The bits a cast gives a NaN. Every other value converts the same way under both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// PyTorch's `tensor.to()` (and ml_dtypes'): narrowing gives the target's quiet NaN
    /// with the source's sign (bf16 `0x7FC0`/`0xFFC0`, f16 `0x7E00`/`0xFE00`); widening
    /// keeps every bit.
    #[default]
    Torch,
    /// mlx's `astype` on the CPU (mlx 0.32): any NaN to bf16 is `0x7FC0` (sign dropped);
    /// to f16 from f32 or bf16 `0x7D00` with the source's sign; f16 to f32 keeps the
    /// payload and sets the quiet bit; bf16 to f32 keeps every bit.
    Mlx,
}

/// A conversion from one floating dtype to another. Only [`Cast::new`] builds one, so
/// a `Cast` always names two different dtypes among F64, F32, F16 and BF16 with a
/// target other than F64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cast {
    from: DType,
    to: DType,
    nan: NanPolicy,
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
        Ok(Some(Cast {
            from,
            to,
            nan: NanPolicy::Torch,
        }))
    }

    /// The same conversion with the NaN bits of `nan`.
    pub fn with_nan(self, nan: NanPolicy) -> Cast {
        Cast { nan, ..self }
    }

    /// The NaN bits it gives.
    pub fn nan(self) -> NanPolicy {
        self.nan
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
/// as many `cast.to()` elements. Integer operations on the bits only; slices of 1 MiB
/// and more run in parallel on the current rayon pool.
pub fn cast_slice(cast: Cast, src: &[u8], dst: &mut [u8]) -> Result<()> {
    let (from, to) = (cast.from.size(), cast.to.size());
    let n = src.len() / from;
    if src.len() % from != 0 || n.checked_mul(to) != Some(dst.len()) {
        return Err(Error::Layout {
            detail: format!(
                "cannot cast {} bytes of {} into {} bytes of {}",
                src.len(),
                cast.from,
                dst.len(),
                cast.to
            ),
        });
    }
    // Words are little-endian, the byte order of safetensors and of `.pt` storages.
    let f32_of = u32::from_le_bytes;
    let half_of = u16::from_le_bytes;
    let f64_of = u64::from_le_bytes;
    if cast.nan == NanPolicy::Mlx {
        return cast_slice_mlx(cast, src, dst);
    }
    match (cast.from, cast.to) {
        (DType::F32, DType::BF16) => run(src, dst, |s| f32_to_bf16(f32_of(s)).to_le_bytes()),
        (DType::F32, DType::F16) => run(src, dst, |s| f32_to_f16(f32_of(s)).to_le_bytes()),
        (DType::BF16, DType::F32) => run(src, dst, |s| bf16_to_f32(half_of(s)).to_le_bytes()),
        (DType::F16, DType::F32) => run(src, dst, |s| f16_to_f32(half_of(s)).to_le_bytes()),
        // Half to half widens exactly to f32 and rounds once, as torch does.
        (DType::BF16, DType::F16) => run(src, dst, |s| {
            f32_to_f16(bf16_to_f32(half_of(s))).to_le_bytes()
        }),
        (DType::F16, DType::BF16) => run(src, dst, |s| {
            f32_to_bf16(f16_to_f32(half_of(s))).to_le_bytes()
        }),
        (DType::F64, DType::F32) => run(src, dst, |s| f64_to_f32(f64_of(s)).to_le_bytes()),
        // Two roundings, f64 -> f32 -> target, exactly as torch.
        (DType::F64, DType::BF16) => run(src, dst, |s| {
            f32_to_bf16(f64_to_f32(f64_of(s))).to_le_bytes()
        }),
        (DType::F64, DType::F16) => run(src, dst, |s| {
            f32_to_f16(f64_to_f32(f64_of(s))).to_le_bytes()
        }),
        (from, to) => Err(Error::Layout {
            detail: format!("no conversion from {from} to {to}"),
        }),
    }
}

/// [`cast_slice`] with mlx's NaN bits: torch's conversion, then the NaN of the output
/// replaced by mlx's (branch-free selects, so the loops still vectorise).
fn cast_slice_mlx(cast: Cast, src: &[u8], dst: &mut [u8]) -> Result<()> {
    let f32_of = u32::from_le_bytes;
    let half_of = u16::from_le_bytes;
    let f64_of = u64::from_le_bytes;
    let bf = mlx_nan_bf16;
    let h = mlx_nan_f16;
    match (cast.from, cast.to) {
        (DType::F32, DType::BF16) => run(src, dst, |s| bf(f32_to_bf16(f32_of(s))).to_le_bytes()),
        (DType::F32, DType::F16) => run(src, dst, |s| h(f32_to_f16(f32_of(s))).to_le_bytes()),
        (DType::BF16, DType::F32) => run(src, dst, |s| bf16_to_f32(half_of(s)).to_le_bytes()),
        (DType::F16, DType::F32) => run(src, dst, |s| {
            mlx_nan_f32_from_f16(f16_to_f32(half_of(s))).to_le_bytes()
        }),
        (DType::BF16, DType::F16) => run(src, dst, |s| {
            h(f32_to_f16(bf16_to_f32(half_of(s)))).to_le_bytes()
        }),
        (DType::F16, DType::BF16) => run(src, dst, |s| {
            bf(f32_to_bf16(f16_to_f32(half_of(s)))).to_le_bytes()
        }),
        (DType::F64, DType::F32) => run(src, dst, |s| f64_to_f32(f64_of(s)).to_le_bytes()),
        (DType::F64, DType::BF16) => run(src, dst, |s| {
            bf(f32_to_bf16(f64_to_f32(f64_of(s)))).to_le_bytes()
        }),
        (DType::F64, DType::F16) => run(src, dst, |s| {
            h(f32_to_f16(f64_to_f32(f64_of(s)))).to_le_bytes()
        }),
        (from, to) => Err(Error::Layout {
            detail: format!("no conversion from {from} to {to}"),
        }),
    }
}

/// mlx's bf16 NaN: `0x7FC0` whatever the sign.
#[inline(always)]
pub(crate) fn mlx_nan_bf16(r: u16) -> u16 {
    if (r & 0x7FFF) > 0x7F80 {
        0x7FC0
    } else {
        r
    }
}

/// mlx's f16 NaN from f32 or bf16: `0x7D00` with the sign.
#[inline(always)]
pub(crate) fn mlx_nan_f16(r: u16) -> u16 {
    if (r & 0x7FFF) > 0x7C00 {
        (r & 0x8000) | 0x7D00
    } else {
        r
    }
}

/// mlx's f16-to-f32 NaN: the widened payload with the quiet bit set.
#[inline(always)]
fn mlx_nan_f32_from_f16(r: u32) -> u32 {
    if (r & 0x7FFF_FFFF) > 0x7F80_0000 {
        r | 0x0040_0000
    } else {
        r
    }
}

/// Runs `f` over every element, in parallel tasks for large slices.
fn run<const A: usize, const B: usize, F>(src: &[u8], dst: &mut [u8], f: F) -> Result<()>
where
    F: Fn([u8; A]) -> [u8; B] + Copy + Send + Sync,
    [u8; A]: bytemuck::Pod,
    [u8; B]: bytemuck::Pod,
{
    let err = |e| Error::Layout {
        detail: format!("cast buffers are not whole elements: {e:?}"),
    };
    let src: &[[u8; A]] = bytemuck::try_cast_slice(src).map_err(err)?;
    let dst: &mut [[u8; B]] = bytemuck::try_cast_slice_mut(dst).map_err(err)?;
    if src.len() * A >= PAR_THRESHOLD {
        src.par_chunks(PAR_CHUNK_ELEMS)
            .zip(dst.par_chunks_mut(PAR_CHUNK_ELEMS))
            .for_each(|(s, d)| kernel(s, d, f));
    } else {
        kernel(src, dst, f);
    }
    Ok(())
}

/// The loop LLVM vectorises: every element function below is branch-free, so each
/// `if` becomes a vector select.
#[inline(always)]
fn kernel<const A: usize, const B: usize, F>(src: &[[u8; A]], dst: &mut [[u8; B]], f: F)
where
    F: Fn([u8; A]) -> [u8; B] + Copy,
{
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { kernel_avx2(src, dst, f) };
        return;
    }
    kernel_portable(src, dst, f);
}

#[inline(always)]
fn kernel_portable<const A: usize, const B: usize, F>(src: &[[u8; A]], dst: &mut [[u8; B]], f: F)
where
    F: Fn([u8; A]) -> [u8; B] + Copy,
{
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*s);
    }
}

/// The same loop compiled for AVX2: SSE2, the x86_64 baseline, has no per-lane variable
/// shifts, which the subnormal paths need, nor 32-to-16-bit packs.
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn kernel_avx2<const A: usize, const B: usize, F>(src: &[[u8; A]], dst: &mut [[u8; B]], f: F)
where
    F: Fn([u8; A]) -> [u8; B] + Copy,
{
    kernel_portable(src, dst, f);
}

/// f32 to bf16, round to nearest even: adding `0x7FFF` plus the kept lowest bit carries
/// into the kept bits exactly when the dropped half is above the tie, or at it with an
/// odd kept part; the carry runs into the exponent for overflow to inf.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: u32) -> u16 {
    let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    let quiet = ((x >> 16) & 0x8000) | 0x7FC0;
    (if nan { quiet } else { rounded }) as u16
}

/// f32 to f16, round to nearest even, subnormals rounded, overflow to inf.
#[inline(always)]
pub(crate) fn f32_to_f16(x: u32) -> u16 {
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7FFF_FFFF;
    // Normal f16 (a >= 2^-14): rebias the exponent by 127 - 15 and round off 13 bits;
    // a carry out of the mantissa lands in the exponent, which is the right result.
    let normal = a
        .wrapping_add(0x0FFF + ((a >> 13) & 1))
        .wrapping_sub(112 << 23)
        >> 13;
    // Subnormal f16: the f32 significand (with its implicit bit) in units of 2^-24 is
    // m >> (126 - e); rounding up to 0x400 gives the smallest normal, also right. The
    // clamps keep every lane's shift in range; lanes that need them are not selected,
    // or shift everything out (value below 2^-25, rounds to 0).
    let e = a >> 23;
    let m = (a & 0x7F_FFFF) | 0x80_0000;
    let shift = (126 - e.min(113)).min(31);
    let sub = (m + (1 << (shift - 1)) - 1 + ((m >> shift) & 1)) >> shift;
    // 0x477FF000 is halfway from 65504 (odd mantissa) to 65536: ties round up to inf.
    let r = if a >= 0x477F_F000 {
        0x7C00
    } else if a < 0x3880_0000 {
        sub
    } else {
        normal
    };
    let r = if a > 0x7F80_0000 { 0x7E00 } else { r };
    (sign | r) as u16
}

/// bf16 to f32: exact, NaN payloads included.
#[inline(always)]
pub(crate) fn bf16_to_f32(h: u16) -> u32 {
    u32::from(h) << 16
}

/// f16 to f32: exact; NaN payloads move to the top of the f32 mantissa.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> u32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let a = h & 0x7FFF;
    let normal = (a << 13) + (112 << 23);
    let inf_nan = (a << 13) | 0x7F80_0000;
    // Subnormal a = m · 2^-24: shift m left by k until its top bit is bit 10, in
    // steps of 8, 4, 2 and 1 (a leading-zero count, which AVX2 lacks); the value is
    // then 2^(-14-k) · 1.f, so the exponent field is 113 - k, and the top bit itself
    // adds one to the field, hence 112 - k. Zero is selected away below.
    let (mut m, mut k) = (a, 0);
    for step in [8, 4, 2, 1] {
        let short = m < 0x800 >> step;
        m = if short { m << step } else { m };
        k += if short { step } else { 0 };
    }
    let sub = (m << 13) + ((112 - k) << 23);
    let r = if a >= 0x7C00 {
        inf_nan
    } else if a >= 0x0400 {
        normal
    } else if a == 0 {
        0
    } else {
        sub
    };
    sign | r
}

/// f64 to f32, round to nearest even, subnormals rounded, overflow to inf.
#[inline(always)]
fn f64_to_f32(x: u64) -> u32 {
    let sign = ((x >> 32) as u32) & 0x8000_0000;
    let a = x & 0x7FFF_FFFF_FFFF_FFFF;
    // Normal f32 (a >= 2^-126): rebias by 1023 - 127 and round off 29 bits.
    let normal = (a
        .wrapping_add(0x0FFF_FFFF + ((a >> 29) & 1))
        .wrapping_sub(896 << 52)
        >> 29) as u32;
    // Subnormal f32: the significand in units of 2^-149 is m >> (926 - e); see
    // f32_to_f16 for the clamps.
    let e = a >> 52;
    let m = (a & 0x000F_FFFF_FFFF_FFFF) | (1 << 52);
    let shift = (926 - e.min(897)).min(63);
    let sub = ((m + (1 << (shift - 1)) - 1 + ((m >> shift) & 1)) >> shift) as u32;
    // Halfway from f32::MAX (odd mantissa) to 2^128: ties round up to inf.
    let r = if a >= 0x47EF_FFFF_F000_0000 {
        0x7F80_0000
    } else if a < 0x3810_0000_0000_0000 {
        sub
    } else {
        normal
    };
    let r = if a > 0x7FF0_0000_0000_0000 {
        0x7FC0_0000
    } else {
        r
    };
    sign | r
}

/// An IEEE binary format by its field widths, for the oracle only.
#[derive(Clone, Copy, Debug)]
struct Format {
    exp_bits: u32,
    mant_bits: u32,
}

impl Format {
    fn of(d: DType) -> Format {
        let (exp_bits, mant_bits) = match d {
            DType::F64 => (11, 52),
            DType::F16 => (5, 10),
            DType::BF16 => (8, 7),
            _ => (8, 23),
        };
        Format {
            exp_bits,
            mant_bits,
        }
    }

    fn sign_bit(self) -> u64 {
        1 << (self.exp_bits + self.mant_bits)
    }

    fn mant_mask(self) -> u64 {
        (1 << self.mant_bits) - 1
    }

    /// The pattern of +inf, one past the largest finite magnitude.
    fn inf(self) -> u64 {
        ((1 << self.exp_bits) - 1) << self.mant_bits
    }

    fn bias(self) -> i32 {
        (1 << (self.exp_bits - 1)) - 1
    }

    /// The value of magnitude pattern `mag`, reading the all-ones exponent as an
    /// ordinary one: the inf pattern then reads as the power of two past the largest
    /// finite value, which is the neighbour IEEE overflow rounds towards.
    fn magnitude(self, mag: u64) -> f64 {
        let e = (mag >> self.mant_bits) as i32;
        let m = mag & self.mant_mask();
        let lowest = 1 - self.bias() - self.mant_bits as i32;
        if e == 0 {
            m as f64 * pow2(lowest)
        } else {
            (m | (1 << self.mant_bits)) as f64 * pow2(lowest + e - 1)
        }
    }

    /// The pattern nearest to `v` (finite, >= 0), ties to the even pattern, by binary
    /// search over the magnitude patterns, which are ordered like their values.
    fn nearest(self, v: f64) -> u64 {
        let inf = self.inf();
        if v >= self.magnitude(inf) {
            return inf;
        }
        // Largest lo with magnitude(lo) <= v.
        let (mut lo, mut hi) = (0, inf);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.magnitude(mid) <= v {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let below = v - self.magnitude(lo);
        let above = self.magnitude(lo + 1) - v;
        if below < above || (below == above && lo % 2 == 0) {
            lo
        } else {
            lo + 1
        }
    }
}

/// 2^k for a k in f64's normal range, built from its bits.
fn pow2(k: i32) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// The naive oracle for one element: the source bits in the low bytes of a `u64`, the
/// result likewise. It decodes the source to its exact value in an f64 and searches
/// the target's patterns for the nearest one; f64 sources go through Rust's `as f32`
/// (IEEE round to nearest even) first. It shares nothing with [`cast_slice`].
pub(crate) fn reference_cast(cast: Cast, bits: u64) -> u64 {
    let (from, to) = (Format::of(cast.from), Format::of(cast.to));
    let negative = bits & from.sign_bit() != 0;
    let mag = bits & (from.sign_bit() - 1);
    let sign = if negative { to.sign_bit() } else { 0 };
    let is_inf_or_nan = mag >= from.inf();
    if mag > from.inf() && cast.nan == NanPolicy::Mlx {
        // mlx's astype: to bf16 one NaN, unsigned; to f16 0x7D00 signed; to f32 from
        // f16 the payload with the quiet bit; from bf16 every bit.
        let payload = || (mag & from.mant_mask()) << (to.mant_bits - from.mant_bits);
        return match (cast.from, cast.to) {
            (_, DType::BF16) => 0x7FC0,
            (_, DType::F16) => sign | 0x7D00,
            (DType::F16, _) => sign | to.inf() | payload() | (1 << (to.mant_bits - 1)),
            (DType::BF16, _) => sign | to.inf() | payload(),
            _ => sign | to.inf() | (1 << (to.mant_bits - 1)),
        };
    }
    if mag > from.inf() {
        // NaN: widening keeps the payload at the top of the mantissa, narrowing gives
        // the target's canonical quiet NaN.
        let payload = if cast.from.size() < cast.to.size() {
            (mag & from.mant_mask()) << (to.mant_bits - from.mant_bits)
        } else {
            1 << (to.mant_bits - 1)
        };
        return sign | to.inf() | payload;
    }
    if is_inf_or_nan {
        return sign | to.inf();
    }
    let value = match cast.from {
        DType::F64 => {
            let as_f32 = f64::from_bits(mag) as f32;
            if cast.to == DType::F32 {
                return sign | u64::from(as_f32.to_bits());
            }
            f64::from(as_f32)
        }
        DType::F32 => f64::from(f32::from_bits(mag as u32)),
        _ => from.magnitude(mag),
    };
    sign | to.nearest(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cast(from: DType, to: DType) -> Cast {
        Cast {
            from,
            to,
            nan: NanPolicy::Torch,
        }
    }

    #[test]
    fn mlx_nan_bits_match_the_oracle_and_what_mlx_astype_gives() {
        let halves: Vec<u64> = (0..=0xFFFF).collect();
        let mut f32s: Vec<u64> = (0..=0xFFFFu64)
            .map(|hi| hi << 16 | (hi * 7919) & 0xFFFF)
            .collect();
        f32s.extend([
            0x7FC0_0000,
            0xFFC0_0000,
            0x7F80_0001,
            0xFF80_0001,
            0x7FFF_FFFF,
            0x7FA0_0000,
        ]);
        let mlx = |from, to| cast(from, to).with_nan(NanPolicy::Mlx);
        for (from, to, pats) in [
            (DType::F32, DType::BF16, &f32s),
            (DType::F32, DType::F16, &f32s),
            (DType::BF16, DType::F32, &halves),
            (DType::F16, DType::F32, &halves),
            (DType::BF16, DType::F16, &halves),
            (DType::F16, DType::BF16, &halves),
        ] {
            let got = check(mlx(from, to), pats);
            let torch = check(cast(from, to), pats);
            for ((&p, &g), &t) in pats.iter().zip(&got).zip(&torch) {
                if !is_nan(from, p) {
                    assert_eq!(g, t, "{from} -> {to} of {p:#x}: only NaNs differ");
                }
            }
        }
        // Recorded from mlx 0.32.4's astype on the CPU.
        let one = |from, to, p| check(mlx(from, to), &[p])[0];
        for (p, want) in [
            (0x7FC0_0000, 0x7FC0),
            (0xFFC0_0000, 0x7FC0),
            (0xFF80_0001, 0x7FC0),
        ] {
            assert_eq!(one(DType::F32, DType::BF16, p), want);
        }
        for (p, want) in [
            (0x7FC0_0000, 0x7D00),
            (0xFFC0_0000, 0xFD00),
            (0x7FA0_0000, 0x7D00),
        ] {
            assert_eq!(one(DType::F32, DType::F16, p), want);
        }
        for (p, want) in [
            (0x7E00, 0x7FC0_0000),
            (0xFC01, 0xFFC0_2000),
            (0x7D00, 0x7FE0_0000),
        ] {
            assert_eq!(one(DType::F16, DType::F32, p), want);
        }
        assert_eq!(one(DType::BF16, DType::F32, 0xFF81), 0xFF81_0000);
        assert_eq!(one(DType::BF16, DType::F16, 0xFF81), 0xFD00);
        assert_eq!(one(DType::F16, DType::BF16, 0xFC01), 0x7FC0);
    }

    /// xorshift64*, fixed seeds: the same patterns on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    /// Runs `patterns` through `cast_slice` and through the oracle one by one, and
    /// returns the fast results after checking they are equal everywhere.
    fn check(c: Cast, patterns: &[u64]) -> Vec<u64> {
        let (fs, ts) = (c.from.size(), c.to.size());
        let src: Vec<u8> = patterns
            .iter()
            .flat_map(|p| p.to_le_bytes()[..fs].to_vec())
            .collect();
        let mut dst = vec![0xA5; patterns.len() * ts];
        cast_slice(c, &src, &mut dst).expect("cast_slice");
        let got: Vec<u64> = dst
            .chunks_exact(ts)
            .map(|b| {
                let mut w = [0u8; 8];
                w[..ts].copy_from_slice(b);
                u64::from_le_bytes(w)
            })
            .collect();
        for (&p, &g) in patterns.iter().zip(&got) {
            let want = reference_cast(c, p);
            assert_eq!(
                g, want,
                "{} -> {} of {p:#x}: fast {g:#x}, oracle {want:#x}",
                c.from, c.to
            );
        }
        got
    }

    fn is_nan(d: DType, bits: u64) -> bool {
        let f = Format::of(d);
        bits & (f.sign_bit() - 1) > f.inf()
    }

    /// The policy's NaN for target `to` with the sign of source pattern `p`.
    fn canonical_nan(from: DType, to: DType, p: u64) -> u64 {
        let (f, t) = (Format::of(from), Format::of(to));
        let sign = if p & f.sign_bit() != 0 {
            t.sign_bit()
        } else {
            0
        };
        sign | t.inf() | 1 << (t.mant_bits - 1)
    }

    const NARROW_FROM_F32: [DType; 2] = [DType::F16, DType::BF16];

    #[test]
    fn every_bf16_pattern_matches_the_oracle_in_every_cast() {
        let all: Vec<u64> = (0..=0xFFFF).collect();
        let f32s = check(cast(DType::BF16, DType::F32), &all);
        for (&p, &g) in all.iter().zip(&f32s) {
            assert_eq!(g, p << 16, "bf16 -> f32 of {p:#x} is not exact");
        }
        let f16s = check(cast(DType::BF16, DType::F16), &all);
        for (&p, &g) in all.iter().zip(&f16s) {
            if is_nan(DType::BF16, p) {
                assert_eq!(g, canonical_nan(DType::BF16, DType::F16, p), "{p:#x}");
            }
        }
    }

    #[test]
    fn every_f16_pattern_matches_the_oracle_in_every_cast() {
        let all: Vec<u64> = (0..=0xFFFF).collect();
        let f32s = check(cast(DType::F16, DType::F32), &all);
        for (&p, &g) in all.iter().zip(&f32s) {
            if is_nan(DType::F16, p) {
                // Widening keeps every payload bit.
                let want = (p & 0x8000) << 16 | 0x7F80_0000 | (p & 0x3FF) << 13;
                assert_eq!(g, want, "f16 NaN {p:#x}");
            } else {
                // Exact: the f32 converts back to the same f16.
                let back = check(cast(DType::F32, DType::F16), &[g]);
                assert_eq!(back, [p], "f16 {p:#x} -> f32 {g:#x} is not exact");
            }
        }
        let bf16s = check(cast(DType::F16, DType::BF16), &all);
        for (&p, &g) in all.iter().zip(&bf16s) {
            if is_nan(DType::F16, p) {
                assert_eq!(g, canonical_nan(DType::F16, DType::BF16, p), "{p:#x}");
            }
        }
    }

    #[test]
    fn f32_to_bf16_ties_round_to_even_for_every_high_half() {
        // Low half exactly 0x8000 is a tie; one below and above are not.
        for low in [0x7FFF, 0x8000, 0x8001] {
            let ties: Vec<u64> = (0..=0xFFFFu64).map(|hi| hi << 16 | low).collect();
            let got = check(cast(DType::F32, DType::BF16), &ties);
            for (&p, &g) in ties.iter().zip(&got) {
                let hi = p >> 16;
                if is_nan(DType::F32, p) || (hi & 0x7FFF) >= 0x7F80 {
                    continue;
                }
                let want = match low {
                    0x7FFF => hi,
                    0x8000 => hi + (hi & 1),
                    _ => hi + 1,
                };
                assert_eq!(g, want, "tie class {low:#x} of {p:#x}");
            }
        }
    }

    #[test]
    fn f32_to_f16_ties_round_to_even_in_normals_and_subnormals() {
        let mut ties = Vec::new();
        // Normal f16 range: f32 exponents 113..=142, the 13 dropped bits exactly half.
        for e in 113u64..=142 {
            for top in 0..1024u64 {
                for low in [0x0FFF, 0x1000, 0x1001] {
                    ties.push(e << 23 | top << 13 | low);
                }
            }
        }
        // Subnormal f16: f32 exponent e drops 126 - e bits of the 24-bit significand;
        // e = 101 is exactly half the smallest subnormal (rounds to 0).
        for e in 101u64..=112 {
            let shift = 126 - e;
            let kept = 24 - shift.min(24);
            for q in (1u64 << kept.saturating_sub(1))..(1 << kept).max(2) {
                let m = (q << shift | 1 << (shift - 1)) & 0x7F_FFFF;
                for d in [0, 1, u64::MAX] {
                    ties.push(e << 23 | m.wrapping_add(d) & 0x7F_FFFF);
                }
            }
        }
        let signed: Vec<u64> = ties.iter().flat_map(|&t| [t, t | 1 << 31]).collect();
        check(cast(DType::F32, DType::F16), &signed);
        // The tie at 2^-25 goes to 0, at 1.5 · 2^-24 to 2 · 2^-24, at 65520 to inf.
        let spot = check(
            cast(DType::F32, DType::F16),
            &[0x3300_0000, 0x33C0_0000, 0x477F_F000, 0x3A00_1000],
        );
        assert_eq!(spot, [0x0000, 0x0002, 0x7C00, 0x1000]);
    }

    #[test]
    fn random_f32_patterns_match_the_oracle() {
        let mut rng = Rng(0x05EE_DF32);
        let mut patterns: Vec<u64> = (0..1 << 20).map(|_| rng.next() >> 32).collect();
        // Half of them in f16's range, where the random ones rarely land.
        for p in patterns.iter_mut().skip(1).step_by(2) {
            let e = 98 + (*p >> 23) % 48;
            *p = (*p & 0x807F_FFFF) | e << 23;
        }
        for to in NARROW_FROM_F32 {
            check(cast(DType::F32, to), &patterns);
        }
    }

    /// f64 patterns: random bits, random values in the f32 range, and values a few f64
    /// ulps either side of f32 ties and of bf16/f16 ties, where rounding twice (as
    /// torch does) and rounding once differ.
    fn f64_patterns() -> Vec<u64> {
        let mut rng = Rng(0x05EE_DF64);
        let mut out = Vec::new();
        for _ in 0..1 << 15 {
            let r = rng.next();
            out.push(r);
            let e = 1023 - 160 + (r >> 52) % 300;
            out.push((r & 0x800F_FFFF_FFFF_FFFF) | e << 52);
        }
        for _ in 0..1 << 13 {
            let r = rng.next();
            // An f32 tie: the 29 dropped bits exactly half.
            let f32_tie = ((r & 0xBFFF_FFFF_E000_0000) | 0x3800_0000_0000_0000) | 1 << 28;
            // A bf16 tie as an f32, widened.
            let hi = (r >> 48) as u32;
            let bf16_tie = f64::from(f32::from_bits(hi << 16 | 0x8000)).to_bits();
            // An f16 tie (normal or subnormal) as an f32, widened.
            let e = 102 + (r >> 20) % 41;
            let f16_tie = (e << 23 | (r & 0x7F_E000) | 0x1000) as u32;
            let f16_tie = f64::from(f32::from_bits(f16_tie)).to_bits();
            for base in [f32_tie, bf16_tie, f16_tie] {
                for d in [0u64, 1, 2, 0x0FFF_FFFF] {
                    out.push(base.wrapping_add(d));
                    out.push(base.wrapping_sub(d));
                }
            }
        }
        out
    }

    #[test]
    fn f64_patterns_match_the_oracle_through_f32() {
        let patterns = f64_patterns();
        let f32s = check(cast(DType::F64, DType::F32), &patterns);
        for to in NARROW_FROM_F32 {
            let direct = check(cast(DType::F64, to), &patterns);
            let twice = check(cast(DType::F32, to), &f32s);
            assert_eq!(direct, twice, "f64 -> {to} is not f64 -> f32 -> {to}");
        }
    }

    #[test]
    fn f64_to_bf16_rounds_twice_like_torch() {
        // 1 + 2^-8 + 2^-40: once it would round up to 1 + 2^-7; through f32 it is the
        // tie 1 + 2^-8, which goes to the even 1.0.
        let x = (1.0f64 + 2f64.powi(-8) + 2f64.powi(-40)).to_bits();
        assert_eq!(check(cast(DType::F64, DType::BF16), &[x]), [0x3F80]);
        let x = (1.0f64 + 2f64.powi(-11) + 2f64.powi(-40)).to_bits();
        assert_eq!(check(cast(DType::F64, DType::F16), &[x]), [0x3C00]);
    }

    #[test]
    fn specials_give_the_ieee_results() {
        let table: &[(DType, DType, u64, u64)] = &[
            // Zeros, infinities, overflow, the smallest subnormals.
            (DType::F32, DType::BF16, 0x0000_0000, 0x0000),
            (DType::F32, DType::BF16, 0x8000_0000, 0x8000),
            (DType::F32, DType::BF16, 0x7F80_0000, 0x7F80),
            (DType::F32, DType::BF16, 0xFF80_0000, 0xFF80),
            (DType::F32, DType::BF16, 0x7F7F_FFFF, 0x7F80),
            (DType::F32, DType::BF16, 0xFF7F_FFFF, 0xFF80),
            (DType::F32, DType::BF16, 0x7F7F_7FFF, 0x7F7F),
            (DType::F32, DType::BF16, 0x0000_0001, 0x0000),
            (DType::F32, DType::BF16, 0x0000_8000, 0x0000),
            (DType::F32, DType::BF16, 0x0001_8000, 0x0002),
            (DType::F32, DType::BF16, 0x0000_8001, 0x0001),
            (DType::F32, DType::F16, 0x477F_E000, 0x7BFF),
            (DType::F32, DType::F16, 0x477F_EFFF, 0x7BFF),
            (DType::F32, DType::F16, 0x477F_F000, 0x7C00),
            (DType::F32, DType::F16, 0xC77F_F000, 0xFC00),
            (DType::F32, DType::F16, 0x3380_0000, 0x0001),
            (DType::F32, DType::F16, 0x3300_0001, 0x0001),
            (DType::F32, DType::F16, 0x0000_0001, 0x0000),
            (DType::F32, DType::F16, 0x8000_0001, 0x8000),
            (DType::F32, DType::F16, 0x387F_C000, 0x03FF),
            (DType::F32, DType::F16, 0x387F_DFFF, 0x03FF),
            (DType::F32, DType::F16, 0x387F_E000, 0x0400),
            (DType::F64, DType::F32, 0x47EF_FFFF_E000_0000, 0x7F7F_FFFF),
            (DType::F64, DType::F32, 0x47EF_FFFF_EFFF_FFFF, 0x7F7F_FFFF),
            (DType::F64, DType::F32, 0x47EF_FFFF_F000_0000, 0x7F80_0000),
            (DType::F64, DType::F32, 0xFFF0_0000_0000_0000, 0xFF80_0000),
            (DType::F64, DType::F32, 0x36A0_0000_0000_0000, 0x0000_0001),
            (DType::F64, DType::F32, 0x3690_0000_0000_0000, 0x0000_0000),
            (DType::F64, DType::F32, 0x3690_0000_0000_0001, 0x0000_0001),
            (DType::F64, DType::F32, 0x8000_0000_0000_0001, 0x8000_0000),
            (DType::F64, DType::F32, 0x380F_FFFF_F000_0000, 0x0080_0000),
            (DType::F64, DType::BF16, 0x7FF0_0000_0000_0000, 0x7F80),
            (DType::F64, DType::F16, 0x40EF_FE00_0000_0000, 0x7C00),
            (DType::F16, DType::F32, 0x0001, 0x3380_0000),
            (DType::F16, DType::F32, 0x83FF, 0xB87F_C000),
            (DType::F16, DType::F32, 0x7BFF, 0x477F_E000),
            (DType::F16, DType::F32, 0xFC00, 0xFF80_0000),
            (DType::BF16, DType::F16, 0x7F7F, 0x7C00),
            (DType::BF16, DType::F16, 0x0001, 0x0000),
            (DType::F16, DType::BF16, 0x0001, 0x3380),
            (DType::F16, DType::BF16, 0x7BFF, 0x4780),
            // NaN policy: narrowing gives the canonical quiet NaN with the source sign
            // (a signalling payload must not truncate into inf); widening keeps bits.
            (DType::F32, DType::BF16, 0x7F80_0001, 0x7FC0),
            (DType::F32, DType::BF16, 0xFFC0_0000, 0xFFC0),
            (DType::F32, DType::BF16, 0xFFFF_FFFF, 0xFFC0),
            (DType::F32, DType::F16, 0x7F80_0001, 0x7E00),
            (DType::F32, DType::F16, 0xFFC0_1234, 0xFE00),
            (DType::F64, DType::F32, 0x7FF0_0000_0000_0001, 0x7FC0_0000),
            (DType::F64, DType::F32, 0xFFF8_0000_0000_0000, 0xFFC0_0000),
            (DType::F64, DType::BF16, 0xFFF0_0000_0000_0001, 0xFFC0),
            (DType::F64, DType::F16, 0x7FF8_0000_0000_0000, 0x7E00),
            (DType::F16, DType::BF16, 0xFC01, 0xFFC0),
            (DType::BF16, DType::F16, 0x7F81, 0x7E00),
            (DType::F16, DType::F32, 0x7C01, 0x7F80_2000),
            (DType::F16, DType::F32, 0xFE00, 0xFFC0_0000),
            (DType::BF16, DType::F32, 0xFF81, 0xFF81_0000),
        ];
        for &(from, to, x, want) in table {
            assert_eq!(
                check(cast(from, to), &[x]),
                [want],
                "{from} -> {to} of {x:#x}"
            );
        }
    }

    #[test]
    fn oracle_search_agrees_with_native_f64_to_f32() {
        // The binary search the oracle uses for half targets, checked on f32 against
        // the hardware's rounding.
        let f32_fmt = Format::of(DType::F32);
        for p in f64_patterns() {
            let v = f64::from_bits(p & !(1 << 63));
            if !v.is_finite() {
                continue;
            }
            let native = u64::from((v as f32).to_bits());
            assert_eq!(f32_fmt.nearest(v), native, "{p:#x}");
        }
    }

    #[test]
    fn large_slices_split_over_threads_give_the_same_bytes() {
        let mut rng = Rng(99);
        let n = PAR_THRESHOLD / 4 * 3 + 17;
        let src: Vec<u8> = (0..n * 4).map(|_| rng.next() as u8).collect();
        let mut par = vec![0u8; n * 2];
        cast_slice(cast(DType::F32, DType::BF16), &src, &mut par).expect("cast");
        for (i, (s, d)) in src.chunks_exact(4).zip(par.chunks_exact(2)).enumerate() {
            let x = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            let want = reference_cast(cast(DType::F32, DType::BF16), u64::from(x));
            assert_eq!(
                u64::from(u16::from_le_bytes([d[0], d[1]])),
                want,
                "element {i}"
            );
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let c = cast(DType::F32, DType::BF16);
        let mut dst = [0u8; 4];
        assert!(cast_slice(c, &[0u8; 8], &mut dst).is_ok());
        assert!(cast_slice(c, &[0u8; 7], &mut dst).is_err());
        assert!(cast_slice(c, &[0u8; 8], &mut dst[..3]).is_err());
        assert!(cast_slice(c, &[0u8; 12], &mut dst).is_err());
        let mut dst = [0u8; 8];
        assert!(cast_slice(c, &[0u8; 8], &mut dst).is_err());
        assert!(cast_slice(cast(DType::F64, DType::F16), &[0u8; 12], &mut [0u8; 3]).is_err());
        assert!(cast_slice(c, &[], &mut []).is_ok());
    }

    #[test]
    fn only_float_casts_between_different_dtypes_exist() {
        assert_eq!(Cast::new(DType::F32, DType::F32).ok(), Some(None));
        assert!(Cast::new(DType::F32, DType::F64).is_err());
        assert!(Cast::new(DType::I32, DType::F32).is_err());
        assert!(Cast::new(DType::F32, DType::I16).is_err());
        assert!(Cast::new(DType::F8E4M3, DType::F16).is_err());
        let c = Cast::new(DType::F64, DType::BF16).ok().flatten();
        assert_eq!(
            c.map(|c| (c.from(), c.to())),
            Some((DType::F64, DType::BF16))
        );
    }
}
