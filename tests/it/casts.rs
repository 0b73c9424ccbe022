//! Casts against PyTorch's own `tensor.to(dtype)`, bit for bit, from the patterns and
//! torch outputs in tests/fixtures/casts/torch_casts.safetensors (made by
//! make_casts.py next to it; these tests need neither Python nor torch).
//!
//! NaN: torch has no single NaN policy, so at NaN positions these tests check that the
//! output is a NaN exactly where torch's is, with relayout's documented bits (see
//! `relayout::layout::cast`). What torch 2.x's CPU kernels give (AVX512 build):
//! f32 -> bf16 is `0xFFFF` for every NaN in the vectorised path (sign and payload lost)
//! but `0x7FC0` in the scalar path (a 0-dim tensor); f32 -> f16 keeps the sign and the
//! top payload bits and quiets signalling NaNs (`0xFFFFFFFF` -> `0xFFFF`, `0x7F800001`
//! -> `0x7E00`); f16 -> f32 quiets signalling NaNs (`0x7C01` -> `0x7FC02000`) where
//! relayout keeps every bit; bf16 -> f32 is exact; bf16 -> f16 keeps payload bits
//! (`0x7F81` -> `0x7E08`); f64 -> f32 is the canonical NaN with the sign; f64 -> bf16
//! is `0xFFFF`.

use crate::common;
use relayout::layout::cast::{cast_slice, Cast};
use relayout::{DType, Gather};

fn fixture() -> std::collections::BTreeMap<String, common::Tensor> {
    common::load_safetensors(&common::fixture("casts/torch_casts.safetensors"))
}

fn name(d: DType) -> &'static str {
    match d {
        DType::F64 => "f64",
        DType::F32 => "f32",
        DType::F16 => "f16",
        _ => "bf16",
    }
}

/// Little-endian words of `size` bytes as u64s.
fn words(bytes: &[u8], size: usize) -> Vec<u64> {
    bytes
        .chunks_exact(size)
        .map(|b| {
            let mut w = [0u8; 8];
            w[..size].copy_from_slice(b);
            u64::from_le_bytes(w)
        })
        .collect()
}

/// (exponent bits, mantissa bits) of a float dtype.
fn fields(d: DType) -> (u32, u32) {
    match d {
        DType::F64 => (11, 52),
        DType::F32 => (8, 23),
        DType::F16 => (5, 10),
        _ => (8, 7),
    }
}

fn sign_bit(d: DType) -> u64 {
    let (e, m) = fields(d);
    1 << (e + m)
}

fn inf(d: DType) -> u64 {
    let (e, m) = fields(d);
    ((1 << e) - 1) << m
}

fn is_nan(d: DType, bits: u64) -> bool {
    bits & (sign_bit(d) - 1) > inf(d)
}

/// relayout's NaN for source NaN `x`: widening keeps every bit (the payload moves to
/// the top of the wider mantissa), narrowing gives the canonical quiet NaN with the
/// source's sign.
fn policy_nan(from: DType, to: DType, x: u64) -> u64 {
    let sign = if x & sign_bit(from) != 0 {
        sign_bit(to)
    } else {
        0
    };
    let ((_, fm), (_, tm)) = (fields(from), fields(to));
    if from.size() < to.size() {
        sign | inf(to) | (x & ((1 << fm) - 1)) << (tm - fm)
    } else {
        sign | inf(to) | 1 << (tm - 1)
    }
}

/// One conversion's bit patterns, one u64 per element.
struct Outcome {
    input: Vec<u64>,
    torch: Vec<u64>,
    /// Who computed it (`cast_slice` or a backend) and what it gave.
    ours: Vec<(String, Vec<u64>)>,
}

/// The torch inputs and outputs of `from -> to`, and relayout's outputs from
/// `cast_slice` and every backend (through a transpose-free 1-D gather, so only the
/// cast differs).
fn run(from: DType, to: DType) -> Outcome {
    let tensors = fixture();
    let input = &tensors[name(from)];
    let torch = &tensors[&format!("{}_to_{}", name(from), name(to))];
    let cast = Cast::new(from, to)
        .expect("castable")
        .expect("different dtypes");
    let n = input.bytes.len() / from.size();
    assert_eq!(
        torch.bytes.len(),
        n * to.size(),
        "{from} -> {to}: fixture sizes"
    );
    let mut outs = Vec::new();
    let mut out = vec![0xA5; n * to.size()];
    cast_slice(cast, &input.bytes, &mut out).expect("cast_slice");
    outs.push(("cast_slice".to_string(), words(&out, to.size())));
    let g = Gather::from_parts(from.size(), vec![n], vec![1], 0);
    // Reference, CPU and (where an adapter opens) GPU with default and 4 KiB chunks.
    for b in common::all_backends() {
        let mut out = vec![0x5A; n * to.size()];
        b.gather_cast(&g, cast, &input.bytes, &mut out)
            .expect("gather_cast");
        outs.push((b.name(), words(&out, to.size())));
    }
    Outcome {
        input: words(&input.bytes, from.size()),
        torch: words(&torch.bytes, to.size()),
        ours: outs,
    }
}

/// Every output equals torch's bits, except that at NaN positions it is relayout's
/// documented NaN; returns how many positions were NaN.
fn assert_matches_torch(from: DType, to: DType) -> usize {
    let Outcome { input, torch, ours } = run(from, to);
    let mut nans = 0;
    for (i, (&x, &t)) in input.iter().zip(&torch).enumerate() {
        assert_eq!(
            is_nan(to, t),
            is_nan(from, x),
            "{from} -> {to}: torch makes {x:#x} into {t:#x}"
        );
        let want = if is_nan(to, t) {
            nans += 1;
            policy_nan(from, to, x)
        } else {
            t
        };
        for (who, got) in &ours {
            assert_eq!(
                got[i], want,
                "{from} -> {to} by {who}, element {i}: input {x:#x}, torch {t:#x}, got {:#x}",
                got[i]
            );
        }
    }
    nans
}

#[test]
fn every_bf16_pattern_casts_like_torch() {
    assert_eq!(assert_matches_torch(DType::BF16, DType::F32), 254);
    assert_eq!(assert_matches_torch(DType::BF16, DType::F16), 254);
}

#[test]
fn every_f16_pattern_casts_like_torch() {
    assert_eq!(assert_matches_torch(DType::F16, DType::F32), 2046);
    assert_eq!(assert_matches_torch(DType::F16, DType::BF16), 2046);
}

#[test]
fn f32_specials_ties_and_random_patterns_cast_like_torch() {
    for to in [DType::BF16, DType::F16] {
        assert!(
            assert_matches_torch(DType::F32, to) > 10,
            "{to}: too few NaNs"
        );
    }
}

#[test]
fn f64_patterns_cast_like_torch_rounding_twice() {
    for to in [DType::F32, DType::BF16, DType::F16] {
        assert!(
            assert_matches_torch(DType::F64, to) > 4,
            "{to}: too few NaNs"
        );
    }
}

fn position(patterns: &[u64], x: u64) -> usize {
    patterns
        .iter()
        .position(|&v| v == x)
        .unwrap_or_else(|| panic!("{x:#x} is not in the fixture"))
}

/// The fixture holds the cases it is meant to: bf16 ties, the bf16 overflow boundary,
/// f16 subnormal ties and double-rounding f64s, with torch's answers for them.
#[test]
fn fixture_holds_the_boundary_cases() {
    let Outcome { input, torch, .. } = run(DType::F32, DType::BF16);
    let ties = input.iter().filter(|&&x| x & 0xFFFF == 0x8000).count();
    assert!(ties >= 1 << 16, "{ties} bf16 ties");
    let at = |x: u64| position(&input, x);
    assert_eq!(torch[at(0x7F7F_FFFF)], 0x7F80, "overflow to inf");
    assert_eq!(torch[at(0x0001_8000)], 0x0002, "subnormal tie to even");
    let Outcome { input, torch, .. } = run(DType::F32, DType::F16);
    let at = |x: u64| position(&input, x);
    assert_eq!(torch[at(0x3300_0000)], 0x0000, "f16 tie at 2^-25");
    assert_eq!(torch[at(0x33C0_0000)], 0x0002, "f16 subnormal tie");
    assert_eq!(torch[at(0x477F_F000)], 0x7C00, "f16 overflow tie");
    let Outcome { input, torch, .. } = run(DType::F64, DType::BF16);
    let at = |x: u64| position(&input, x);
    // 1 + 2^-8 + 2^-52 rounds up once but to even through f32.
    assert_eq!(torch[at(0x3FF0_1000_0000_0001)], 0x3F80, "double rounding");
}

/// `bits` (little-endian `size`-byte words) as a `rows x cols` matrix, transposed and
/// cast on every backend; each must equal the naive reference backend byte for byte.
fn transposed_casts_match_reference(from: DType, to: DType, bytes: &[u8], rows: usize) {
    use relayout::backend::reference::Reference;
    use relayout::backend::Backend;
    let cols = bytes.len() / from.size() / rows;
    let g = relayout::LayoutOp::contiguous(from.size(), vec![rows, cols], vec![1, 0])
        .expect("op")
        .simplify();
    let cast = Cast::new(from, to).expect("castable").expect("a cast");
    let mut want = vec![0u8; rows * cols * to.size()];
    Reference
        .gather_cast(&g, cast, bytes, &mut want)
        .expect("reference");
    for b in common::all_backends() {
        let mut got = vec![0xC3; want.len()];
        b.gather_cast(&g, cast, bytes, &mut got)
            .unwrap_or_else(|e| panic!("{}: {e}", b.name()));
        assert!(got == want, "{from} -> {to} transposed on {}", b.name());
    }
}

#[test]
fn every_16_bit_pattern_fused_with_a_transpose_matches_the_oracle_on_every_backend() {
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect();
    for from in [DType::F16, DType::BF16] {
        for to in [DType::F32, DType::F16, DType::BF16] {
            if from != to {
                // 256 x 256 and an odd-width 64 x 1024 view of the same patterns.
                transposed_casts_match_reference(from, to, &all, 256);
                transposed_casts_match_reference(from, to, &all, 64);
            }
        }
    }
}

#[test]
fn random_f32_and_f64_patterns_fused_with_a_transpose_match_the_oracle_on_every_backend() {
    let mut rng = common::Rng::new(2024);
    // 2^20 f32 patterns: uniform bits, plus every 7th near a bf16/f16 rounding boundary.
    let f32s: Vec<u8> = (0..1usize << 20)
        .flat_map(|i| {
            let x = rng.next() as u32;
            let x = if i % 7 == 0 {
                (x & !0x1FFF) | 0x1000
            } else {
                x
            };
            x.to_le_bytes()
        })
        .collect();
    for to in [DType::BF16, DType::F16] {
        transposed_casts_match_reference(DType::F32, to, &f32s, 1024);
    }
    let f64s: Vec<u8> = (0..1usize << 16)
        .flat_map(|i| {
            let x = rng.next();
            // Every 3rd sits on an f32 rounding tie, where rounding twice shows.
            let x = if i % 3 == 0 {
                (x & !0x1FFF_FFFF) | 0x1000_0000
            } else {
                x
            };
            x.to_le_bytes()
        })
        .collect();
    for to in [DType::F32, DType::BF16, DType::F16] {
        transposed_casts_match_reference(DType::F64, to, &f64s, 256);
    }
}
