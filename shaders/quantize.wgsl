// mlx's affine quantization (mx.quantize, mode "affine", as mlx 0.32.4's CPU computes it)
// of contiguous groups of gathered f32, f16 or bf16 values, one group per invocation: the
// group's max and min (NaN skipped), scale and bias in f32, each value's code, and the
// codes packed into the group's words. WGSL lets f32 division be off by 2.5 ULP, flush
// subnormals and assume there are no NaNs or infinities, and the bytes depend on all of
// them, so every float operation here is IEEE 754 binary32 emulated on u32 bits, rounded
// to nearest even, with x86's NaN rules (a NaN operand comes back quieted, the first one
// first; an invalid operation gives 0xFFC00000), which is what the CPU does.
//
// Bindings (group 0), as every kernel's (common.wgsl):
//   0: uniform Params
//   1: storage, read       src: array<u32>, the gathered values (params.dtype), whole groups
//   2: storage, read_write dst: array<u32>, the packed words of every group, then from word
//      params.scales_at a (scale, bias) pair of f32 bits per group
// Workgroup size: 256 x 1 x 1, one group per invocation, linear workgroup id
// x + nx * (y + ny * z).
// Word packing: values: f32 one per word, f16/bf16 two per word (value 2w in the low half
// of word w). Codes: one little-endian bit stream per group, value 0 in the lowest bits of
// the group's first word; a group of G values of B bits fills G * B / 32 words.
struct Params {
    groups: u32,
    group_size: u32,
    bits: u32,
    // 1 f32, 2 f16, 3 bf16
    dtype: u32,
    scales_at: u32,
}

const SIGN: u32 = 0x80000000u;
const INF: u32 = 0x7F800000u;
const DEFAULT_NAN: u32 = 0xFFC00000u;
// 1e-7f32, mlx's smallest scale.
const EPS: u32 = 0x33D6BF95u;

fn is_nan(a: u32) -> bool {
    return (a & 0x7FFFFFFFu) > INF;
}

fn quiet(a: u32) -> u32 {
    return a | 0x00400000u;
}

// a < b as IEEE compares: false with a NaN, false for two zeros.
fn lt(a: u32, b: u32) -> bool {
    if is_nan(a) || is_nan(b) || ((a | b) & 0x7FFFFFFFu) == 0u {
        return false;
    }
    let x = bitcast<i32>(a);
    let y = bitcast<i32>(b);
    return select(x, x ^ 0x7FFFFFFF, x < 0) < select(y, y ^ 0x7FFFFFFF, y < 0);
}

// The accumulating max and min of the CPU code: the new value wins only when it compares
// greater (less), so NaN never wins and the first of two equal zeros stays.
fn cmax(a: u32, b: u32) -> u32 {
    return select(a, b, lt(a, b));
}

fn cmin(a: u32, b: u32) -> u32 {
    return select(a, b, lt(b, a));
}

// m >> s with every bit shifted out or'ed into bit 0.
fn shr_sticky(m: u32, s: u32) -> u32 {
    if s == 0u {
        return m;
    }
    if s >= 32u {
        return select(0u, 1u, m != 0u);
    }
    return (m >> s) | select(0u, 1u, (m & ((1u << s) - 1u)) != 0u);
}

// sign | the value m * 2^(e - 127 - 26), m carrying 3 bits below the mantissa (m in
// [2^26, 2^27) for a normal e >= 1, or smaller with e = 1 for a subnormal), rounded to
// nearest even; e < 1 is scaled down to a subnormal first, e past 254 overflows to inf.
fn round_pack(sign: u32, e_in: i32, m_in: u32) -> u32 {
    var e = e_in;
    var m = m_in;
    if e < 1 {
        m = shr_sticky(m, u32(min(1 - e, 32)));
        e = 1;
    }
    let g = m & 7u;
    m = m >> 3u;
    if g > 4u || (g == 4u && (m & 1u) == 1u) {
        m += 1u;
    }
    if m >= 0x1000000u {
        m = m >> 1u;
        e += 1;
    }
    if e >= 255 {
        return sign | INF;
    }
    if m < 0x800000u {
        return sign | m;
    }
    return sign | (u32(e) << 23u) | (m & 0x7FFFFFu);
}

// a + b for operands that are not NaN.
fn add_core(a: u32, b: u32) -> u32 {
    let ea = (a >> 23u) & 0xFFu;
    let eb = (b >> 23u) & 0xFFu;
    if ea == 255u {
        if eb == 255u && ((a ^ b) & SIGN) != 0u {
            return DEFAULT_NAN;
        }
        return a;
    }
    if eb == 255u {
        return b;
    }
    let za = (a & 0x7FFFFFFFu) == 0u;
    let zb = (b & 0x7FFFFFFFu) == 0u;
    if za && zb {
        return a & b;
    }
    if za {
        return b;
    }
    if zb {
        return a;
    }
    // x the larger magnitude.
    let swap = (b & 0x7FFFFFFFu) > (a & 0x7FFFFFFFu);
    let x = select(a, b, swap);
    let y = select(b, a, swap);
    let ex = max((x >> 23u) & 0xFFu, 1u);
    let ey = max((y >> 23u) & 0xFFu, 1u);
    let mx = ((x & 0x7FFFFFu) | select(0u, 0x800000u, ((x >> 23u) & 0xFFu) != 0u)) << 3u;
    let my = shr_sticky(((y & 0x7FFFFFu) | select(0u, 0x800000u, ((y >> 23u) & 0xFFu) != 0u)) << 3u, ex - ey);
    var e = i32(ex);
    var m: u32;
    if ((x ^ y) & SIGN) == 0u {
        m = mx + my;
        if m >= 0x8000000u {
            m = shr_sticky(m, 1u);
            e += 1;
        }
    } else {
        m = mx - my;
        if m == 0u {
            return 0u;
        }
        while m < 0x4000000u && e > 1 {
            m = m << 1u;
            e -= 1;
        }
    }
    return round_pack(x & SIGN, e, m);
}

fn f_sub(a: u32, b: u32) -> u32 {
    if is_nan(a) {
        return quiet(a);
    }
    if is_nan(b) {
        return quiet(b);
    }
    return add_core(a, b ^ SIGN);
}

fn f_div(a: u32, b: u32) -> u32 {
    if is_nan(a) {
        return quiet(a);
    }
    if is_nan(b) {
        return quiet(b);
    }
    let sign = (a ^ b) & SIGN;
    let ea = (a >> 23u) & 0xFFu;
    let eb = (b >> 23u) & 0xFFu;
    let za = (a & 0x7FFFFFFFu) == 0u;
    let zb = (b & 0x7FFFFFFFu) == 0u;
    if ea == 255u {
        return select(sign | INF, DEFAULT_NAN, eb == 255u);
    }
    if eb == 255u {
        return sign;
    }
    if zb {
        return select(sign | INF, DEFAULT_NAN, za);
    }
    if za {
        return sign;
    }
    var ma = a & 0x7FFFFFu;
    var mb = b & 0x7FFFFFu;
    var xa = i32(ea);
    var xb = i32(eb);
    if ea == 0u {
        xa = 1;
        while ma < 0x800000u {
            ma = ma << 1u;
            xa -= 1;
        }
    } else {
        ma = ma | 0x800000u;
    }
    if eb == 0u {
        xb = 1;
        while mb < 0x800000u {
            mb = mb << 1u;
            xb -= 1;
        }
    } else {
        mb = mb | 0x800000u;
    }
    var e = xa - xb + 127;
    if ma < mb {
        ma = ma << 1u;
        e -= 1;
    }
    // 26 quotient bits (the leading one and 25 below it), the remainder as sticky.
    var q = 0u;
    var r = ma;
    for (var i = 0u; i < 26u; i++) {
        q = q << 1u;
        if r >= mb {
            r -= mb;
            q = q | 1u;
        }
        r = r << 1u;
    }
    return round_pack(sign, e, (q << 1u) | select(0u, 1u, r != 0u));
}

// Round to the nearest integer, ties to even (roundss / roundevenf).
fn f_rint(a: u32) -> u32 {
    if is_nan(a) {
        return quiet(a);
    }
    let e = (a >> 23u) & 0xFFu;
    let sign = a & SIGN;
    if e >= 150u {
        return a;
    }
    if e < 126u {
        return sign;
    }
    let shift = 150u - e;
    let m = (a & 0x7FFFFFu) | 0x800000u;
    var n = m >> shift;
    let rem = m & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    if rem > half || (rem == half && (n & 1u) == 1u) {
        n += 1u;
    }
    if n == 0u {
        return sign;
    }
    return sign | bitcast<u32>(f32(n));
}

// (scale, bias) of a group with extremes (hi, lo), as mlx computes them.
fn scale_bias(hi: u32, lo: u32, bits: u32, n_bins: u32) -> vec2<u32> {
    if bits == 1u {
        return vec2<u32>(cmax(f_sub(hi, lo), EPS), lo);
    }
    var s = cmax(f_div(f_sub(hi, lo), n_bins), EPS);
    let towards_min = lt(hi & 0x7FFFFFFFu, lo & 0x7FFFFFFFu);
    s = select(s ^ SIGN, s, towards_min);
    let edge = select(hi, lo, towards_min);
    let q0 = f_rint(f_div(edge, s));
    if (q0 & 0x7FFFFFFFu) != 0u {
        return vec2<u32>(f_div(edge, q0), edge);
    }
    return vec2<u32>(s, 0u);
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let g = linear_group(wid, nwg) * WG + li;
    if g >= params.groups {
        return;
    }
    let n = params.group_size;
    let bits = params.bits;
    let base = g * n;
    // The group, read once, a word at a time.
    var vals: array<u32, 128>;
    if params.dtype == 1u {
        for (var i = 0u; i < n; i++) {
            vals[i] = src[base + i];
        }
    } else {
        for (var j = 0u; j < n / 2u; j++) {
            let word = src[base / 2u + j];
            if params.dtype == 3u {
                vals[2u * j] = word << 16u;
                vals[2u * j + 1u] = word & 0xFFFF0000u;
            } else {
                vals[2u * j] = f16_to_f32(word & 0xFFFFu);
                vals[2u * j + 1u] = f16_to_f32(word >> 16u);
            }
        }
    }
    var hi = INF | SIGN;
    var lo = INF;
    var all_plain = true;
    for (var i = 0u; i < n; i++) {
        let x = vals[i];
        hi = cmax(hi, x);
        lo = cmin(lo, x);
        all_plain = all_plain && plain(x);
    }
    let n_bins = (1u << bits) - 1u;
    let n_bins_f = bitcast<u32>(f32(n_bins));
    let sb = scale_bias(hi, lo, bits, n_bins_f);
    // The fast way when every value and the scale's reciprocal are normal numbers (or
    // zeros): (w - bias) and its product with 1 / scale in hardware, where WGSL rounds
    // them correctly, the product then within 2 ulp of the quotient (1e-4 of it for any
    // code that is not clamped), so it rounds to the quotient's code unless it lies that
    // close to a half. Otherwise, or when one does, the group is redone exactly.
    let r = f_div(0x3F800000u, sb.x);
    var exact = !plain(r) || (r & 0x7FFFFFFFu) == 0u || !all_plain;
    if !exact {
        exact = !pack_group(&vals, g, n, bits, sb, r, n_bins_f, true);
    }
    if exact {
        pack_group(&vals, g, n, bits, sb, r, n_bins_f, false);
    }
    dst[params.scales_at + 2u * g] = sb.x;
    dst[params.scales_at + 2u * g + 1u] = sb.y;
}

// A zero or a normal number: what WGSL's arithmetic handles as IEEE does.
fn plain(a: u32) -> bool {
    let e = (a >> 23u) & 0xFFu;
    return (e != 0u && e != 255u) || (a & 0x7FFFFFFFu) == 0u;
}

// Codes of group g (its values `vals`) packed into its words. `fast`: by the hardware
// product with the reciprocal `r`, giving up (false) at a value whose product lies within
// 1e-4 of a half; else exactly, by emulated division.
fn pack_group(vals: ptr<function, array<u32, 128>>, g: u32, n: u32, bits: u32, sb: vec2<u32>, r: u32, n_bins_f: u32, fast: bool) -> bool {
    // Words go straight out: a fast pass that gives up leaves some, which the exact pass
    // then writes over (this invocation alone writes the group's words).
    var acc = 0u;
    var filled = 0u;
    var w = g * (n * bits / 32u);
    for (var i = 0u; i < n; i++) {
        let x = (*vals)[i];
        var code = 0u;
        if fast {
            let a = (bitcast<f32>(x) - bitcast<f32>(sb.y)) * bitcast<f32>(r);
            // A finite product: WGSL's round (ties to even) and clamp are exact on it,
            // and so is a - round(a), its distance to the nearest integer.
            let rounded = round(a);
            if abs(a - rounded) >= 0.4999 {
                return false;
            }
            code = u32(clamp(rounded, 0.0, bitcast<f32>(n_bins_f)));
        } else {
            let v = f_rint(f_div(f_sub(x, sb.y), sb.x));
            // Clamped to [0, n_bins]; NaN survives both clamps and packs as 0.
            let c = cmin(cmax(v, 0u), n_bins_f);
            if !is_nan(c) {
                code = u32(bitcast<f32>(c));
            }
        }
        acc = acc | (code << filled);
        filled += bits;
        if filled >= 32u {
            dst[w] = acc;
            w += 1u;
            filled -= 32u;
            acc = select(0u, code >> (bits - filled), filled > 0u);
        }
    }
    return true;
}

