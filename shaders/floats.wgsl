// Float formats on their bits, shared by cast.wgsl and quantize.wgsl (assembled after
// them, src/backend/gpu/source.rs): no float arithmetic, so no driver's rounding, flushing
// or NaN assumptions can change a result.

// f16 bits (low half) widened to f32 bits, exactly: subnormals normalised, NaN payloads
// and signs kept.
fn f16_to_f32(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1Fu;
    let m = h & 0x3FFu;
    if (e == 0x1Fu) {
        return sign | 0x7F800000u | (m << 13u);
    }
    if (e == 0u) {
        if (m == 0u) {
            return sign;
        }
        // m * 2^-24 with its leading bit at p: exponent p - 24, the rest the mantissa.
        let p = firstLeadingBit(m);
        return sign | ((p + 103u) << 23u) | ((m << (23u - p)) & 0x7FFFFFu);
    }
    return sign | ((e + 112u) << 23u) | (m << 13u);
}
