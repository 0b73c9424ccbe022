//! Quantization as mlx's `mx.quantize` does it on the CPU (mlx 0.32.4), bit for bit: the
//! parameters it accepts ([`Quant`]) and a naive per-group oracle ([`Quant::quantize`])
//! that the fast paths are compared to.
//!
//! Groups run along the last axis; a row's codes form one little-endian bit stream
//! (the first value in the lowest bits of the first word), so a group of `g` values of
//! `b` bits fills `g * b / 32` whole `uint32` words.
//!
//! What mlx does, and so what this does:
//! - **affine** (bits 1–6 or 8, group 32/64/128): in f32, over the group's values as
//!   f32, `max`/`min` skip NaN; `scale = max((max - min) / (2^b - 1), 1e-7)`, signed
//!   towards the edge of larger magnitude, then snapped so that edge is an exact code
//!   (`edge / round(edge / scale)`), `bias` that edge; each code is
//!   `clamp(rint((w - bias) / scale), 0, 2^b - 1)`, NaN packing as 0. Scales and biases
//!   are rounded to the weight's dtype only when stored. With 1 bit the scale is
//!   `max - min` and the bias `min`. A group of equal values gets a scale of about
//!   −1e-7 and its value as bias; a group holding +inf gets a NaN scale.
//! - **mxfp4 / mxfp8** (group 32, bits 4 / 8): the shared scale is the power of two
//!   `2^e`, `e` the least integer with `2^e >= amax / max_code` (6 or 448, divided in
//!   the weight's dtype), stored as the byte `e + 127`; each value divided by it (in
//!   the weight's dtype) becomes the nearest e2m1 code (ties to the smaller magnitude,
//!   as mlx's first-minimum search gives) or an e4m3 byte (round to nearest even,
//!   saturating at 448). A group with inf or NaN gets scale byte 0 (0x80 from f32) and
//!   codes from dividing by zero.
//! - **nvfp4** (group 16, bits 4): the scale is `amax / 6` (in the weight's dtype)
//!   rounded to e4m3, stored as that byte; values are divided by the decoded scale.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::cast::{f16_to_f32, f32_to_bf16, f32_to_f16, mlx_nan_bf16, mlx_nan_f16};

/// A quantization format: how values become codes and scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// A scale and a bias per group, `bits`-bit unsigned codes (mlx-lm's default).
    Affine,
    /// OCP microscaling: e2m1 codes, a power-of-two (e8m0) scale per 32 values.
    Mxfp4,
    /// OCP microscaling: e4m3 codes, a power-of-two (e8m0) scale per 32 values.
    Mxfp8,
    /// NVIDIA's fp4: e2m1 codes, an e4m3 scale per 16 values.
    Nvfp4,
}

impl QuantMode {
    /// Every mode, in the order mlx-lm lists them.
    pub const ALL: [QuantMode; 4] = [
        QuantMode::Affine,
        QuantMode::Mxfp4,
        QuantMode::Nvfp4,
        QuantMode::Mxfp8,
    ];

    /// The name mlx and mlx-lm use (`affine`, `mxfp4`, `mxfp8`, `nvfp4`).
    pub fn name(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
            QuantMode::Mxfp8 => "mxfp8",
            QuantMode::Nvfp4 => "nvfp4",
        }
    }

    /// The mode named `name`; an error listing the modes otherwise.
    pub fn parse(name: &str) -> Result<QuantMode> {
        QuantMode::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| quant_err(format!("unknown mode '{name}' ({})", mode_names())))
    }

    /// mlx-lm's (group size, bits) when none are given.
    pub fn defaults(self) -> (usize, u32) {
        match self {
            QuantMode::Affine => (64, 4),
            QuantMode::Mxfp4 => (32, 4),
            QuantMode::Nvfp4 => (16, 4),
            QuantMode::Mxfp8 => (32, 8),
        }
    }
}

impl std::fmt::Display for QuantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn mode_names() -> String {
    QuantMode::ALL.map(QuantMode::name).join(", ")
}

/// Bit widths and group sizes `mx.quantize` accepts in affine mode.
pub const AFFINE_BITS: [u32; 7] = [1, 2, 3, 4, 5, 6, 8];
pub const AFFINE_GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Quantization parameters `mx.quantize` accepts, checked by [`Quant::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Quant {
    mode: QuantMode,
    bits: u32,
    group_size: usize,
}

impl Quant {
    /// `mode` with `bits` and `group_size`, each defaulting as in mlx-lm; an error
    /// naming the allowed values for a pair mlx refuses.
    pub fn new(mode: QuantMode, bits: Option<u32>, group_size: Option<usize>) -> Result<Quant> {
        let (g0, b0) = mode.defaults();
        let (bits, group_size) = (bits.unwrap_or(b0), group_size.unwrap_or(g0));
        match mode {
            QuantMode::Affine => {
                if !AFFINE_BITS.contains(&bits) {
                    return Err(quant_err(format!(
                        "affine quantization takes bits {AFFINE_BITS:?}, not {bits}"
                    )));
                }
                if !AFFINE_GROUP_SIZES.contains(&group_size) {
                    return Err(quant_err(format!(
                        "affine quantization takes group sizes {AFFINE_GROUP_SIZES:?}, not {group_size}"
                    )));
                }
            }
            _ if (group_size, bits) != (g0, b0) => {
                return Err(quant_err(format!(
                    "{mode} quantization takes group size {g0} and {b0} bits only, not group size {group_size} and {bits} bits"
                )));
            }
            _ => {}
        }
        Ok(Quant {
            mode,
            bits,
            group_size,
        })
    }

    pub fn mode(self) -> QuantMode {
        self.mode
    }

    pub fn bits(self) -> u32 {
        self.bits
    }

    pub fn group_size(self) -> usize {
        self.group_size
    }

    /// `uint32` words one group packs into (`group_size * bits / 32`, whole).
    pub fn words_per_group(self) -> usize {
        self.group_size * self.bits as usize / 32
    }

    /// Bytes of one group's scale (and, affine, of its bias): the weight's element size
    /// for affine, one byte for the fp modes.
    pub fn scale_size(self, dtype: DType) -> usize {
        match self.mode {
            QuantMode::Affine => dtype.size(),
            _ => 1,
        }
    }

    /// Whether the format stores a bias per group.
    pub fn has_biases(self) -> bool {
        self.mode == QuantMode::Affine
    }

    /// The dtype of the stored scales: the weight's for affine, `uint8` otherwise.
    pub fn scale_dtype(self, dtype: DType) -> DType {
        match self.mode {
            QuantMode::Affine => dtype,
            _ => DType::U8,
        }
    }

    /// The oracle: quantizes `values` (whole groups of `dtype` values as their `f32`
    /// bits, widened exactly) into `packed` (`words_per_group` little-endian words per
    /// group), `scales` and `biases` (`scale_size` bytes per group; `biases` empty for
    /// the fp modes), one group at a time, as mlx does.
    pub fn quantize(
        self,
        dtype: DType,
        values: &[f32],
        packed: &mut [u8],
        scales: &mut [u8],
        biases: &mut [u8],
    ) -> Result<()> {
        self.check_buffers(dtype, values.len(), packed, scales, biases)?;
        let g = self.group_size;
        let groups = values.len() / g;
        let ss = self.scale_size(dtype);
        let mut codes = vec![0u8; g];
        let wb = self.words_per_group() * 4;
        for k in 0..groups {
            let group = &values[k * g..(k + 1) * g];
            let scale = &mut scales[k * ss..(k + 1) * ss];
            match self.mode {
                QuantMode::Affine => {
                    let (s, b) = affine_group(group, self.bits, &mut codes);
                    store(dtype, s, scale);
                    store(dtype, b, &mut biases[k * ss..(k + 1) * ss]);
                }
                QuantMode::Mxfp4 | QuantMode::Mxfp8 => {
                    scale[0] = mx_group(dtype, group, self.bits, &mut codes);
                }
                QuantMode::Nvfp4 => scale[0] = nv_group(dtype, group, &mut codes),
            }
            pack(&codes, self.bits, &mut packed[k * wb..(k + 1) * wb]);
        }
        Ok(())
    }

    /// Checks what both quantize paths rely on: whole groups of a float dtype, and
    /// output buffers of exactly the packed words, scales and (affine) biases they make.
    fn check_buffers(
        self,
        dtype: DType,
        n: usize,
        packed: &[u8],
        scales: &[u8],
        biases: &[u8],
    ) -> Result<()> {
        let g = self.group_size;
        let groups = n / g;
        let ss = self.scale_size(dtype);
        let bias_bytes = if self.has_biases() { groups * ss } else { 0 };
        if n % g != 0
            || packed.len() != groups * self.words_per_group() * 4
            || scales.len() != groups * ss
            || biases.len() != bias_bytes
            || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        {
            return Err(Error::Layout {
                detail: format!(
                    "quantizing {n} {dtype} values in groups of {g} into {} packed, {} scale and {} bias bytes",
                    packed.len(),
                    scales.len(),
                    biases.len()
                ),
            });
        }
        Ok(())
    }
}

/// Lanes of the fast path's reductions: wide enough for the compiler to keep them in
/// vector registers (two SSE or one AVX register of f32).
const LANES: usize = 8;

impl Quant {
    /// What [`Quant::quantize`] computes, the same bytes, the fast way: affine groups
    /// reduced in vector lanes and their codes rounded without a library call; the fp
    /// modes run the oracle's per-group code. The caller splits work across threads.
    pub fn quantize_fast(
        self,
        dtype: DType,
        values: &[f32],
        packed: &mut [u8],
        scales: &mut [u8],
        biases: &mut [u8],
    ) -> Result<()> {
        if self.mode != QuantMode::Affine {
            return self.quantize(dtype, values, packed, scales, biases);
        }
        self.check_buffers(dtype, values.len(), packed, scales, biases)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        // The f32 values as they are: the same groups through the same code.
        affine_rows(self, DType::F32, dtype, &bytes, packed, scales, biases);
        Ok(())
    }

    /// [`Quant::quantize_fast`] straight from little-endian `dtype` elements (whole
    /// groups), each group widened in a stack buffer: no pass over memory besides the
    /// one reading them. With AVX2 (found at run time) the same code is compiled for
    /// it.
    pub fn quantize_fast_bytes(
        self,
        dtype: DType,
        values: &[u8],
        packed: &mut [u8],
        scales: &mut [u8],
        biases: &mut [u8],
    ) -> Result<()> {
        let es = dtype.size();
        if values.len() % es != 0 {
            return Err(quant_err(format!(
                "{} bytes are not whole {dtype} values",
                values.len()
            )));
        }
        if self.mode != QuantMode::Affine {
            let mut wide = Vec::with_capacity(values.len() / es);
            widen_to_f32(dtype, values, &mut wide)?;
            return self.quantize(dtype, &wide, packed, scales, biases);
        }
        self.check_buffers(dtype, values.len() / es, packed, scales, biases)?;
        #[cfg(all(target_arch = "x86_64", not(relayout_portable)))]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { affine_rows_avx2(self, dtype, dtype, values, packed, scales, biases) };
            return Ok(());
        }
        affine_rows(self, dtype, dtype, values, packed, scales, biases);
        Ok(())
    }
}

/// [`affine_rows`] compiled for AVX2.
#[cfg(all(target_arch = "x86_64", not(relayout_portable)))]
#[target_feature(enable = "avx2")]
unsafe fn affine_rows_avx2(
    q: Quant,
    input: DType,
    dtype: DType,
    values: &[u8],
    packed: &mut [u8],
    scales: &mut [u8],
    biases: &mut [u8],
) {
    affine_rows(q, input, dtype, values, packed, scales, biases)
}

/// Groups per batch of the fast path: their scales and biases are computed together,
/// one vector lane each.
const BATCH: usize = 8;

/// Affine groups of `input` elements (checked sizes), scales and biases stored as
/// `dtype`: in batches of [`BATCH`] groups, each widened on the stack and reduced in
/// [`LANES`] lanes, the batch's scales and biases computed side by side, then each
/// group's codes and words.
#[inline(always)]
fn affine_rows(
    q: Quant,
    input: DType,
    dtype: DType,
    values: &[u8],
    packed: &mut [u8],
    scales: &mut [u8],
    biases: &mut [u8],
) {
    let g = q.group_size;
    let es = input.size();
    let ss = dtype.size();
    let wb = q.words_per_group() * 4;
    let bits = q.bits;
    let n_bins = ((1u32 << bits) - 1) as f32;
    let mut wide = [[0f32; 128]; BATCH];
    let mut codes = [0u32; 128];
    let per = values
        .chunks(g * es * BATCH)
        .zip(packed.chunks_mut(wb * BATCH))
        .zip(
            scales
                .chunks_mut(ss * BATCH)
                .zip(biases.chunks_mut(ss * BATCH)),
        );
    for ((batch, out), (scale, bias)) in per {
        let k = batch.len() / (g * es);
        let (mut hi, mut lo) = ([0f32; BATCH], [0f32; BATCH]);
        for (j, group) in batch.chunks_exact(g * es).enumerate() {
            let w = &mut wide[j][..g];
            widen_group(input, group, w);
            (hi[j], lo[j]) = extremes(w);
        }
        let (sc, bi) = affine_params_batch(&hi, &lo, bits);
        for j in 0..k {
            let w = &wide[j][..g];
            let codes = &mut codes[..g];
            let (s, b) = if bits == 1 && lo[j] == 0.0 {
                // A zero minimum is the 1-bit bias: the oracle's order gives its sign.
                let mut narrow = [0u8; 128];
                let narrow = &mut narrow[..g];
                let params = affine_group(w, bits, narrow);
                for (c, &n) in codes.iter_mut().zip(narrow.iter()) {
                    *c = u32::from(n);
                }
                params
            } else {
                affine_codes(w, sc[j], bi[j], n_bins, codes);
                (sc[j], bi[j])
            };
            store(dtype, s, &mut scale[j * ss..(j + 1) * ss]);
            store(dtype, b, &mut bias[j * ss..(j + 1) * ss]);
            pack_fast(codes, bits, &mut out[j * wb..(j + 1) * wb]);
        }
    }
}

/// Little-endian `input` elements (a group, or any whole run) widened to f32, exactly.
#[inline(always)]
fn widen_group(input: DType, group: &[u8], w: &mut [f32]) {
    match input {
        DType::BF16 => {
            for (x, c) in w.iter_mut().zip(group.chunks_exact(2)) {
                *x = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        DType::F16 => {
            for (x, c) in w.iter_mut().zip(group.chunks_exact(2)) {
                *x = f32::from_bits(f16_to_f32(u16::from_le_bytes([c[0], c[1]])));
            }
        }
        _ => {
            for (x, c) in w.iter_mut().zip(group.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// The group's max and min as [`affine_group`] finds them, reduced in [`LANES`] lanes:
/// they do not depend on the order except for the sign of a zero extreme, which only the
/// 1-bit bias keeps (and [`affine_rows`] takes the oracle's order for).
#[inline(always)]
fn extremes(w: &[f32]) -> (f32, f32) {
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut min = [f32::INFINITY; LANES];
    for chunk in w.chunks_exact(LANES) {
        for l in 0..LANES {
            max[l] = cmax(max[l], chunk[l]);
            min[l] = cmin(min[l], chunk[l]);
        }
    }
    let (mut hi, mut lo) = (f32::NEG_INFINITY, f32::INFINITY);
    for l in 0..LANES {
        hi = cmax(hi, max[l]);
        lo = cmin(lo, min[l]);
    }
    (hi, lo)
}

/// [`affine_params`] for a batch of groups, branch-free so the groups share vector
/// lanes (unused lanes compute on zeros and are dropped).
#[inline(always)]
fn affine_params_batch(
    hi: &[f32; BATCH],
    lo: &[f32; BATCH],
    bits: u32,
) -> ([f32; BATCH], [f32; BATCH]) {
    let eps = 1e-7f32;
    let (mut sc, mut bi) = ([0f32; BATCH], [0f32; BATCH]);
    if bits == 1 {
        for j in 0..BATCH {
            sc[j] = cmax(hi[j] - lo[j], eps);
            bi[j] = lo[j];
        }
        return (sc, bi);
    }
    let n_bins = ((1u32 << bits) - 1) as f32;
    for j in 0..BATCH {
        let s = cmax((hi[j] - lo[j]) / n_bins, eps);
        let towards_min = lo[j].abs() > hi[j].abs();
        let s = if towards_min { s } else { -s };
        let edge = if towards_min { lo[j] } else { hi[j] };
        let q0 = (edge / s).round_ties_even();
        let nonzero = q0 != 0.0;
        let snapped = edge / q0;
        sc[j] = if nonzero { snapped } else { s };
        bi[j] = if nonzero { edge } else { 0.0 };
    }
    (sc, bi)
}

/// The codes of one group with its scale and bias: clamping before rounding gives the
/// same code (the bounds are whole numbers), and inside [0, 255] adding 1.5 * 2^23
/// rounds to nearest even, the code in the low bits; `f32::max` takes 0 for a NaN, whose
/// code is 0 in the oracle too. (Multiplying by the reciprocal, with a check for values
/// near a half, was measured slower here than dividing.)
#[inline(always)]
fn affine_codes(w: &[f32], scale: f32, bias: f32, n_bins: f32, codes: &mut [u32]) {
    const MAGIC: f32 = 12_582_912.0;
    for (c, &x) in codes.iter_mut().zip(w) {
        let v = ((x - bias) / scale).max(0.0).min(n_bins);
        *c = (v + MAGIC).to_bits() & 0xFF;
    }
}

/// [`pack`] a word at a time: 2, 4 and 8 bits fill words with whole codes; 3, 5 and 6
/// run a 64-bit accumulator; 1 bit packs eight codes per byte.
#[inline(always)]
fn pack_fast(codes: &[u32], bits: u32, out: &mut [u8]) {
    match bits {
        2 | 4 | 8 => {
            let per = 32 / bits as usize;
            for (word, c) in out.chunks_exact_mut(4).zip(codes.chunks_exact(per)) {
                let mut v = 0u32;
                for (k, &x) in c.iter().enumerate() {
                    v |= x << (k * bits as usize);
                }
                word.copy_from_slice(&v.to_le_bytes());
            }
        }
        1 => {
            for (byte, c) in out.iter_mut().zip(codes.chunks_exact(8)) {
                *byte = c
                    .iter()
                    .enumerate()
                    .fold(0u8, |b, (k, &x)| b | ((x as u8) << k));
            }
        }
        _ => {
            let (mut acc, mut n, mut at) = (0u64, 0u32, 0usize);
            for &x in codes {
                acc |= u64::from(x) << n;
                n += bits;
                if n >= 32 {
                    out[at..at + 4].copy_from_slice(&(acc as u32).to_le_bytes());
                    at += 4;
                    acc >>= 32;
                    n -= 32;
                }
            }
        }
    }
}

fn quant_err(detail: String) -> Error {
    Error::Quantization { detail }
}

/// `std::max(a, b)` (`a < b ? b : a`): a NaN `b` is skipped.
#[inline(always)]
fn cmax(a: f32, b: f32) -> f32 {
    if a < b {
        b
    } else {
        a
    }
}

/// `std::min(a, b)` (`b < a ? b : a`): a NaN `b` is skipped.
#[inline(always)]
fn cmin(a: f32, b: f32) -> f32 {
    if b < a {
        b
    } else {
        a
    }
}

/// An affine group's (scale, bias) from its `max` and `min` (NaN skipped), in f32: the scale
/// signed towards the edge of larger magnitude and snapped so that edge is an exact code.
/// With 1 bit, the range and the minimum.
#[inline(always)]
fn affine_params(max: f32, min: f32, bits: u32) -> (f32, f32) {
    let eps = 1e-7f32;
    if bits == 1 {
        return (cmax(max - min, eps), min);
    }
    let n_bins = ((1u32 << bits) - 1) as f32;
    let s = cmax((max - min) / n_bins, eps);
    let towards_min = min.abs() > max.abs();
    let s = if towards_min { s } else { -s };
    let edge = if towards_min { min } else { max };
    let q0 = (edge / s).round_ties_even();
    if q0 != 0.0 {
        (edge / q0, edge)
    } else {
        (s, 0.0)
    }
}

/// One affine group: its codes into `codes`, and its (scale, bias) in f32.
pub(crate) fn affine_group(w: &[f32], bits: u32, codes: &mut [u8]) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let (mut max, mut min) = (f32::NEG_INFINITY, f32::INFINITY);
    for &x in w {
        max = cmax(max, x);
        min = cmin(min, x);
    }
    let (scale, bias) = affine_params(max, min, bits);
    for (c, &x) in codes.iter_mut().zip(w) {
        let v = cmin(cmax(((x - bias) / scale).round_ties_even(), 0.0), n_bins);
        // NaN survives both clamps and packs as 0, as mlx's cast to an integer gives.
        *c = if v.is_nan() { 0 } else { v as u8 };
    }
    (scale, bias)
}

/// `x` rounded to `dtype` (as mlx converts), still as f32.
#[inline(always)]
pub(crate) fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => f32::from_bits(u32::from(mlx_nan_bf16(f32_to_bf16(x.to_bits()))) << 16),
        DType::F16 => f32::from_bits(f16_to_f32(mlx_nan_f16(f32_to_f16(x.to_bits())))),
        _ => x,
    }
}

/// Stores `x` as `dtype`'s little-endian bytes (mlx's NaN bits).
#[inline(always)]
pub(crate) fn store(dtype: DType, x: f32, out: &mut [u8]) {
    match dtype {
        DType::BF16 => out.copy_from_slice(&mlx_nan_bf16(f32_to_bf16(x.to_bits())).to_le_bytes()),
        DType::F16 => out.copy_from_slice(&mlx_nan_f16(f32_to_f16(x.to_bits())).to_le_bytes()),
        _ => out.copy_from_slice(&x.to_bits().to_le_bytes()),
    }
}

/// x86's division: a NaN operand comes back quieted (the first one if both), and an
/// invalid quotient (0/0, inf/inf) is the negative default NaN; the bytes of an fp8 code
/// depend on that sign.
#[inline(always)]
fn div_x86(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        f32::from_bits(a.to_bits() | 0x0040_0000)
    } else if b.is_nan() {
        f32::from_bits(b.to_bits() | 0x0040_0000)
    } else {
        let q = a / b;
        if q.is_nan() {
            f32::from_bits(0xFFC0_0000)
        } else {
            q
        }
    }
}

/// `static_cast<int32_t>(float)` on x86: truncation, and `i32::MIN` for NaN, infinities
/// and values out of range.
#[inline(always)]
fn to_i32_x86(x: f32) -> i32 {
    if x.is_finite() && x > -2_147_483_904.0 && x < 2_147_483_648.0 {
        x as i32
    } else {
        i32::MIN
    }
}

/// `2^e` in f32, exact (0 below the smallest subnormal's half, inf above the range).
#[inline(always)]
fn exp2_f32(e: f32) -> f32 {
    if e.is_nan() {
        return e;
    }
    (e.clamp(-2000.0, 2000.0) as f64).exp2() as f32
}

/// The e2m1 values in code order (sign bit 3).
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The e2m1 code nearest `x`: the first of the least distances `|x - v|` (each rounded
/// to `dist`), 0 when every distance is NaN.
#[inline(always)]
fn fp4_code(x: f32, dist: DType) -> u8 {
    if !x.is_nan() && dist != DType::F16 {
        return fp4_code_plain(x, dist == DType::BF16);
    }
    fp4_code_naive(x, dist)
}

/// [`fp4_code`] as mlx's search writes it: the first of the 16 codes whose distance,
/// rounded to `dist`, is least.
fn fp4_code_naive(x: f32, dist: DType) -> u8 {
    let d = |v: f32| round_to(dist, x - v).abs();
    let mut best = d(FP4[0]);
    let mut code = 0u8;
    for (i, &v) in FP4.iter().enumerate().skip(1) {
        let di = d(v);
        if di < best {
            best = di;
            code = i as u8;
        }
    }
    code
}

/// [`fp4_code_naive`] for a value that is not NaN, distances in f32 or rounded to bf16
/// (round to nearest even on the bits, which is what the bf16 cast does to a number):
/// the same search without branches, which the compiler can spread over vector lanes.
#[inline(always)]
fn fp4_code_plain(x: f32, bf16: bool) -> u8 {
    let mut best = f32::INFINITY;
    let mut code = 0u8;
    for (i, &v) in FP4.iter().enumerate() {
        let mut d = x - v;
        if bf16 {
            let b = d.to_bits();
            d = f32::from_bits((b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) << 16);
        }
        let d = d.abs();
        // Strictly less: the first of equal distances stays, as in the search.
        let better = d < best;
        best = if better { d } else { best };
        code = if better { i as u8 } else { code };
    }
    code
}

/// f32 to e4m3 (saturating to 448, NaN to ±448 as mlx's `ToFP8`), round to nearest even.
#[inline(always)]
pub(crate) fn to_fp8(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits ^ sign;
    let r = if a >= 543 << 21 {
        0x7E
    } else if a < 121 << 23 {
        // Below e4m3's smallest normal: adding 2^14 rounds to multiples of 2^-9 in f32.
        let low = f32::from_bits(a) + 16384.0;
        low.to_bits().wrapping_sub(141 << 23) & 0xFF
    } else {
        let odd = (a >> 20) & 1;
        (a.wrapping_add((((7i32 - 127) << 23) as u32).wrapping_add(0x7FFFF + odd)) >> 20) & 0xFF
    };
    (r | (sign >> 24)) as u8
}

/// e4m3 to f32, exact; `0x7F`/`0xFF` are NaN.
#[inline(always)]
pub(crate) fn from_fp8(b: u8) -> f32 {
    let e = i32::from((b >> 3) & 0xF);
    let m = f32::from(b & 7);
    let v = if b & 0x7F == 0x7F {
        f32::NAN
    } else if e == 0 {
        m / 8.0 * (2f32).powi(-6)
    } else {
        (1.0 + m / 8.0) * (2f32).powi(e - 7)
    };
    if b & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// The largest absolute value of a group, NaN if it holds one (as mlx's `max`).
#[inline(always)]
fn amax(w: &[f32]) -> f32 {
    let mut m = 0f32;
    for &x in w {
        let a = x.abs();
        if a.is_nan() {
            return a;
        }
        m = m.max(a);
    }
    m
}

/// One mxfp4/mxfp8 group: codes into `codes`, the scale byte returned.
pub(crate) fn mx_group(dtype: DType, w: &[f32], bits: u32, codes: &mut [u8]) -> u8 {
    let maxval = if bits == 4 { 6.0 } else { 448.0 };
    let s = round_to(dtype, div_x86(amax(w), maxval));
    let l2 = round_to(dtype, (f64::from(s)).log2() as f32);
    let mut e = to_i32_x86(l2.round_ties_even());
    if exp2_f32(e as f32) < s {
        e = e.wrapping_add(1);
    }
    let e_t = if s == 0.0 {
        0.0
    } else {
        round_to(dtype, e as f32)
    };
    let p = round_to(dtype, exp2_f32(e_t));
    for (c, &x) in codes.iter_mut().zip(w) {
        let q = round_to(dtype, div_x86(x, p));
        *c = if bits == 4 {
            fp4_code(q, dtype)
        } else {
            to_fp8(q)
        };
    }
    (to_i32_x86(round_to(dtype, e_t + 127.0)) & 0xFF) as u8
}

/// One nvfp4 group: codes into `codes`, the e4m3 scale byte returned.
pub(crate) fn nv_group(dtype: DType, w: &[f32], codes: &mut [u8]) -> u8 {
    let s = round_to(dtype, div_x86(amax(w), 6.0));
    let byte = to_fp8(s);
    let sd = round_to(dtype, from_fp8(byte));
    for (c, &x) in codes.iter_mut().zip(w) {
        *c = fp4_code(round_to(dtype, div_x86(x, sd)), DType::F32);
    }
    byte
}

/// Packs `bits`-bit codes as one little-endian bit stream, lowest bits first.
pub(crate) fn pack(codes: &[u8], bits: u32, out: &mut [u8]) {
    out.fill(0);
    let mut at = 0usize;
    for &c in codes {
        for b in 0..bits as usize {
            if (c >> b) & 1 == 1 {
                out[(at + b) / 8] |= 1 << ((at + b) % 8);
            }
        }
        at += bits as usize;
    }
}

/// The quantize op of a job: groups of `quant.group_size()` values of `dtype` (the
/// weight's dtype, after any cast) become the packed weight, its scales and (affine)
/// its biases: the op's outputs, in that order. `emit` says which of them the job
/// writes; the others are computed and dropped (an output written elsewhere in the
/// file, by another job).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quantize {
    quant: Quant,
    dtype: DType,
    emit: [bool; 3],
}

impl Quantize {
    /// Every output of quantizing `dtype` values by `quant`; `dtype` must be a float.
    pub fn new(quant: Quant, dtype: DType) -> Result<Quantize> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(quant_err(format!(
                "only f32, f16 and bf16 weights are quantized, not {dtype}"
            )));
        }
        Ok(Quantize {
            quant,
            dtype,
            emit: [true, true, quant.has_biases()],
        })
    }

    /// The same op writing only the outputs `keep` names (indices into
    /// [`Quantize::output_count`]).
    pub fn only(mut self, keep: std::ops::Range<usize>) -> Quantize {
        for (k, e) in self.emit.iter_mut().enumerate() {
            *e = *e && keep.contains(&k);
        }
        self
    }

    pub fn quant(&self) -> Quant {
        self.quant
    }

    /// The dtype of the values quantized.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Outputs the op makes: 3 for affine (weight, scales, biases), 2 otherwise.
    pub fn output_count(&self) -> usize {
        2 + usize::from(self.quant.has_biases())
    }

    /// Whether output `k` is written by the job.
    pub fn emits(&self, k: usize) -> bool {
        self.emit.get(k).copied().unwrap_or(false)
    }

    /// Bytes of output `k` (whether emitted or not) for `elems` values, whole groups;
    /// `None` when they overflow.
    pub fn output_bytes(&self, k: usize, elems: usize) -> Option<usize> {
        let groups = elems / self.quant.group_size;
        match k {
            0 => groups.checked_mul(self.quant.words_per_group() * 4),
            1 => groups.checked_mul(self.quant.scale_size(self.dtype)),
            2 if self.quant.has_biases() => groups.checked_mul(self.dtype.size()),
            _ => Some(0),
        }
    }

    /// Quantizes `values` (whole groups of little-endian `dtype` elements) into `outs`,
    /// one buffer per emitted output in order; the outputs not emitted go to scratch.
    /// `fast` picks [`Quant::quantize_fast_bytes`], else the oracle.
    pub fn run_bytes(&self, values: &[u8], outs: &mut [&mut [u8]], fast: bool) -> Result<()> {
        let n = values.len() / self.dtype.size();
        let mut scratch: [Vec<u8>; 3] = Default::default();
        let mut bufs: [&mut [u8]; 3] = [&mut [], &mut [], &mut []];
        let mut given = outs.iter_mut();
        for (k, (buf, s)) in bufs.iter_mut().zip(scratch.iter_mut()).enumerate() {
            if k >= self.output_count() {
                break;
            }
            if self.emits(k) {
                *buf = given.next().map(|b| &mut **b).ok_or_else(|| {
                    quant_err("fewer output buffers than emitted outputs".to_string())
                })?;
            } else {
                let len = self
                    .output_bytes(k, n)
                    .ok_or_else(|| quant_err("output size overflows".to_string()))?;
                s.resize(len, 0);
                *buf = s.as_mut_slice();
            }
        }
        if given.next().is_some() {
            return Err(quant_err(
                "more output buffers than emitted outputs".to_string(),
            ));
        }
        let [w, s, b] = bufs;
        if fast {
            self.quant.quantize_fast_bytes(self.dtype, values, w, s, b)
        } else {
            let mut wide = Vec::with_capacity(n);
            widen_to_f32(self.dtype, values, &mut wide)?;
            self.quant.quantize(self.dtype, &wide, w, s, b)
        }
    }
}

/// Widens `bytes` (little-endian `dtype` elements, a float dtype) to f32, exactly.
pub(crate) fn widen_to_f32(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(quant_err(format!("cannot quantize {dtype} values")));
    }
    out.clear();
    out.resize(bytes.len() / dtype.size(), 0.0);
    widen_group(dtype, bytes, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::cast::bf16_to_f32;

    const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/quant/mx_quantize.safetensors");

    fn widen(dtype: DType, bytes: &[u8]) -> Vec<f32> {
        match dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))))
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(f16_to_f32(u16::from_le_bytes([c[0], c[1]]))))
                .collect(),
        }
    }

    #[test]
    fn the_oracle_gives_mx_quantizes_bytes_for_every_mode_bit_width_group_and_edge_case() {
        let st = safetensors::SafeTensors::deserialize(FIXTURE).unwrap();
        let mut checked = 0;
        for (name, dtype) in [
            ("float32", DType::F32),
            ("float16", DType::F16),
            ("bfloat16", DType::BF16),
        ] {
            let input = st.tensor(&format!("in.{name}")).unwrap();
            let rows = input.shape()[0];
            let values = widen(dtype, input.data());
            let mut cases: Vec<Quant> = AFFINE_GROUP_SIZES
                .iter()
                .flat_map(|&g| {
                    AFFINE_BITS
                        .iter()
                        .map(move |&b| Quant::new(QuantMode::Affine, Some(b), Some(g)).unwrap())
                })
                .collect();
            for mode in [QuantMode::Mxfp4, QuantMode::Mxfp8, QuantMode::Nvfp4] {
                cases.push(Quant::new(mode, None, None).unwrap());
            }
            for q in cases {
                let key = format!("{}.{name}.g{}.b{}", q.mode(), q.group_size(), q.bits());
                let want = |s: &str| st.tensor(&format!("{key}.{s}")).unwrap().data().to_vec();
                let (ww, ws) = (want("w"), want("s"));
                let wb = if q.has_biases() { want("b") } else { vec![] };
                let (mut w, mut s, mut b) = (
                    vec![0xAA; ww.len()],
                    vec![0xAA; ws.len()],
                    vec![0xAA; wb.len()],
                );
                q.quantize(dtype, &values, &mut w, &mut s, &mut b).unwrap();
                let cols = values.len() / rows;
                let per_row = cols / q.group_size();
                for (k, (got, want)) in s
                    .chunks(q.scale_size(dtype))
                    .zip(ws.chunks(q.scale_size(dtype)))
                    .enumerate()
                {
                    assert_eq!(
                        got,
                        want,
                        "{key}: scale of group {} of row {}",
                        k % per_row,
                        k / per_row
                    );
                }
                assert_eq!(b, wb, "{key}: biases");
                let row_bytes = w.len() / rows;
                for (r, (got, want)) in w.chunks(row_bytes).zip(ww.chunks(row_bytes)).enumerate() {
                    assert_eq!(got, want, "{key}: packed row {r}");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * (21 + 3));
    }

    /// Values that cross every case: random spreads, equal groups, zeros of both signs,
    /// outliers, subnormals, the largest finite values, inf and NaN, at random places.
    fn hostile_values(dtype: DType, n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out = Vec::with_capacity(n);
        let mut kind = 0u64;
        for i in 0..n {
            if i % 32 == 0 {
                kind = next() % 13;
            }
            let r = next();
            let u = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let v = match (kind, r % 97) {
                (_, 0) => f32::NAN,
                (_, 1) => f32::INFINITY,
                (_, 2) => f32::NEG_INFINITY,
                (0, _) => 0.25,
                (1, _) => {
                    if r % 2 == 0 {
                        0.0
                    } else {
                        -0.0
                    }
                }
                (2, _) => u * 1e-40,
                (3, _) => u * f32::MAX,
                (4, _) => {
                    if r % 31 == 0 {
                        1e4
                    } else {
                        u * 1e-3
                    }
                }
                // Positive values with zeros of both signs scattered among them: the
                // minimum is a zero whose sign depends on the order it is found in.
                (12, _) => match r % 5 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => u.abs() + 0.5,
                },
                _ => u * (1u64 << (kind * 2)) as f32,
            };
            out.push(round_to(dtype, v));
        }
        out
    }

    #[test]
    fn the_fast_path_gives_the_oracles_bytes_at_every_bit_width_group_and_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (i, &g) in AFFINE_GROUP_SIZES.iter().enumerate() {
                for &b in &AFFINE_BITS {
                    let q = Quant::new(QuantMode::Affine, Some(b), Some(g)).unwrap();
                    for groups in [0usize, 1, 2, 3, 17] {
                        let v = hostile_values(dtype, groups * g, 1 + i as u64 * 7 + u64::from(b));
                        let ss = q.scale_size(dtype) * groups;
                        let pw = groups * q.words_per_group() * 4;
                        let run = |fast: bool| {
                            let (mut w, mut s, mut z) =
                                (vec![0x5A; pw], vec![0x5A; ss], vec![0x5A; ss]);
                            if fast {
                                q.quantize_fast(dtype, &v, &mut w, &mut s, &mut z).unwrap();
                            } else {
                                q.quantize(dtype, &v, &mut w, &mut s, &mut z).unwrap();
                            }
                            (w, s, z)
                        };
                        assert_eq!(run(true), run(false), "{dtype} g{g} b{b} x{groups}");
                    }
                }
            }
        }
    }

    #[test]
    fn parameters_mx_refuses_are_refused_with_the_allowed_values() {
        assert_eq!(
            Quant::new(QuantMode::Affine, None, None)
                .unwrap()
                .group_size(),
            64
        );
        assert_eq!(Quant::new(QuantMode::Mxfp8, None, None).unwrap().bits(), 8);
        for (mode, bits, group) in [
            (QuantMode::Affine, 7, 64),
            (QuantMode::Affine, 4, 16),
            (QuantMode::Mxfp4, 8, 32),
            (QuantMode::Nvfp4, 4, 32),
            (QuantMode::Mxfp8, 4, 32),
        ] {
            let e = Quant::new(mode, Some(bits), Some(group)).unwrap_err();
            assert!(matches!(e, Error::Quantization { .. }), "{e}");
        }
        let e = QuantMode::parse("fp8").unwrap_err().to_string();
        assert!(e.contains("affine, mxfp4, nvfp4, mxfp8"), "{e}");
    }
}
#[cfg(test)]
mod zero_sign {
    use super::*;

    /// The branch-free e2m1 search equals mlx's, for every bf16 and f16 value (what
    /// mxfp4 and nvfp4 search over) and a million random f32 patterns, in every distance
    /// dtype it serves.
    #[test]
    fn the_fast_fp4_search_is_the_naive_one_for_every_half_precision_value() {
        let mut xs: Vec<f32> = (0..=u16::MAX)
            .flat_map(|h| {
                [
                    f32::from_bits(u32::from(h) << 16),
                    f32::from_bits(f16_to_f32(h)),
                ]
            })
            .collect();
        let mut r = 0x9E37_79B9u32;
        for _ in 0..1_000_000 {
            r ^= r << 13;
            r ^= r >> 17;
            r ^= r << 5;
            xs.push(f32::from_bits(r));
        }
        for x in xs {
            for dist in [DType::BF16, DType::F32, DType::F16] {
                assert_eq!(
                    fp4_code(x, dist),
                    fp4_code_naive(x, dist),
                    "{x:e} ({:#010x}) in {dist}",
                    x.to_bits()
                );
            }
        }
    }

    /// With 1 bit the bias is the group's minimum itself, so a zero minimum keeps the
    /// sign of the first zero found: the fast path's lanes find them in another order
    /// (here lane 1's +0 before lane 2's −0) and must take the oracle's.
    #[test]
    fn a_one_bit_group_whose_minimum_is_zero_keeps_the_oracles_sign() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (neg, pos) in [(2, 9), (9, 2), (0, 31), (31, 0), (5, 6)] {
                let mut v = vec![1.0f32; 32];
                v[neg] = -0.0;
                v[pos] = 0.0;
                let q = Quant::new(QuantMode::Affine, Some(1), Some(32)).unwrap();
                let ss = q.scale_size(dtype);
                let run = |fast: bool| {
                    let (mut w, mut s, mut z) = (vec![0; 4], vec![0; ss], vec![0; ss]);
                    if fast {
                        q.quantize_fast(dtype, &v, &mut w, &mut s, &mut z).unwrap();
                    } else {
                        q.quantize(dtype, &v, &mut w, &mut s, &mut z).unwrap();
                    }
                    (w, s, z)
                };
                let want = run(false);
                // The oracle's bias is the first zero's: -0 when it comes first.
                let negative = want.2[ss - 1] & 0x80 != 0;
                assert_eq!(negative, neg < pos, "{dtype} -0 at {neg}, +0 at {pos}");
                assert_eq!(run(true), want, "{dtype} -0 at {neg}, +0 at {pos}");
            }
        }
    }
}
