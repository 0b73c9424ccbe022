// Element conversion between floating formats, on the bits. WGSL fixes no rounding mode
// for f16 and lets implementations assume there are no NaNs or infinities, so no float
// arithmetic is used anywhere; every backend thus writes the same bytes.
//
// Two entry points share the conversions:
//   main:      dst = convert(src) for params.count contiguous elements (the second pass
//              after a gather kernel, or a contiguous tensor cast straight from its upload)
//   transpose: a batched 2-D transpose fused with the conversion, so a tensor that is both
//              transposed and cast crosses device memory once:
//              dst[b * ob + row(c) * oc + r] = convert(src[s_base + b * sb + r * sr + c])
//              for b < batch, c < cols, r < rows, every stride in elements; row(c) is c, or
//              (c % hw) * inner + c / hw for OIHW -> HWIO as one remapped plane (as
//              transpose2d.wgsl's REMAP). Source elements are read one by one, so the source
//              needs no word alignment; the host picks it only when output rows are whole
//              words (rows, oc and ob multiples of the target's elements per word).
//
// Semantics are PyTorch's tensor.to(): round to nearest, ties to even; subnormals kept
// and rounded, never flushed; overflow to +-inf; f64 to f16/bf16 through f32 (two
// roundings); f16/bf16 to f32 exact. NaN: narrowing gives the target's quiet NaN with the
// source sign (bf16 0x7FC0, f16 0x7E00, f32 0x7FC00000); widening keeps every bit.
//
// Bindings (group 0), identical to the other shaders (declared in common.wgsl, which is
// assembled after this file):
//   0: uniform Params (main reads `count`, in elements; transpose the rest)
//   1: storage, read       src: array<u32>, the gathered (main) or source (transpose) elements
//   2: storage, read_write dst: array<u32>, the converted elements
// Workgroup size: main 256 x 1 x 1, WORDS (4) output words per invocation, 256 words
// apart, linear workgroup id x + nx * (y + ny * z) (dispatches over 65535 groups spread
// over y and z). transpose 32 x 8 x 1: one workgroup per tile of 32 columns x 32 output
// words of batch z (interior and edge tiles in two dispatches, see EDGE); invocation
// (tx, ty) converts column tx of output words ty + 8m, m < 4, and stores them straight
// (CPU adapters) or, STAGED, through workgroup memory (32 x 33 words) so that the
// stores of neighbouring invocations are neighbouring words too (GPUs).
// Word packing: little-endian. 16-bit elements two per word (element 2w in the low half
// of word w), f32 one per word, f64 as a word pair (low word first). An invocation owns
// its output word, so 16-bit outputs never race; the high half of a last odd word is 0.
// Overrides: FROM (0 f64, 1 f32, 2 f16, 3 bf16), TO (1 f32, 2 f16, 3 bf16), STAGED, EDGE.
override FROM: u32 = 1u;
override TO: u32 = 3u;
// transpose: stage tiles through workgroup memory (see the header).
override STAGED: bool = true;
// transpose: the partial tiles, with bounds checks, as transpose2d.wgsl's EDGE: the
// interior tiles run as grid (full_x, full_y, batch) without a single check, then the
// bottom strip (tile row full_y) and the right strip (tile column full_x) as grid
// (edge tiles, 1, batch).
override EDGE: bool = false;
// Target elements per output word.
override PER_WORD: u32 = select(2u, 1u, TO == 1u);

// Output words per invocation: fewer, busier invocations (as copy.wgsl has).
const WORDS: u32 = 4u;

struct Params {
    rank: u32,
    // main: elements to convert.
    count: u32,
    // transpose: output words per output row (rows / PER_WORD), and columns.
    row_words: u32,
    cols: u32,
    // Source element of (b, r = 0, c = 0) for b = 0, and its steps per batch and row.
    s_base: u32,
    s_batch: u32,
    s_row: u32,
    // Output words per batch and per output row.
    d_batch: u32,
    d_row: u32,
    // The output row permutation: period (1 for none) and rows per period.
    hw: u32,
    inner: u32,
    // Tiles wholly inside the plane along x and y, and tiles in the bottom edge strip.
    full_x: u32,
    full_y: u32,
    edge_bottom: u32,
    // NaN bits: 0 torch's (above), 1 mlx's astype: any NaN to bf16 0x7FC0, to f16 from
    // f32/bf16 0x7D00 with the sign, f16 to f32 the payload with the quiet bit set.
    nan_mode: u32,
}

const F64: u32 = 0u;
const F32: u32 = 1u;
const F16: u32 = 2u;
const BF16: u32 = 3u;

// Round to nearest even of v >> s, 1 <= s <= 31.
fn rne_shift32(v: u32, s: u32) -> u32 {
    let q = v >> s;
    let r = v & ((1u << s) - 1u);
    let half = 1u << (s - 1u);
    let up = r > half || (r == half && (q & 1u) == 1u);
    return q + select(0u, 1u, up);
}

// Round to nearest even of the 64-bit (hi, lo) >> s, 1 <= s <= 63, for results that fit
// a u32.
fn rne_shift64(hi: u32, lo: u32, s: u32) -> u32 {
    var q: u32;
    var above: bool;
    var tie: bool;
    if (s > 32u) {
        let t = s - 32u;
        q = hi >> t;
        let r = hi & ((1u << t) - 1u);
        let half = 1u << (t - 1u);
        above = r > half || (r == half && lo != 0u);
        tie = r == half && lo == 0u;
    } else if (s == 32u) {
        q = hi;
        above = lo > 0x80000000u;
        tie = lo == 0x80000000u;
    } else {
        q = (hi << (32u - s)) | (lo >> s);
        let r = lo & ((1u << s) - 1u);
        let half = 1u << (s - 1u);
        above = r > half;
        tie = r == half;
    }
    let up = above || (tie && (q & 1u) == 1u);
    return q + select(0u, 1u, up);
}

fn f64_to_f32(lo: u32, hi: u32) -> u32 {
    let sign = hi & 0x80000000u;
    let e = (hi >> 20u) & 0x7FFu;
    let m_hi = hi & 0xFFFFFu;
    if (e == 0x7FFu) {
        if (m_hi != 0u || lo != 0u) {
            return sign | 0x7FC00000u;
        }
        return sign | 0x7F800000u;
    }
    if (e == 0u) {
        // Below 2^-1022: far under half of f32's smallest subnormal.
        return sign;
    }
    // f32 biased exponent; the significand with its implicit bit is (hi', lo).
    let ef = i32(e) - 896;
    if (ef >= 255) {
        return sign | 0x7F800000u;
    }
    let sig_hi = m_hi | 0x100000u;
    var bits: u32;
    if (ef >= 1) {
        // The carry of a round-up moves into the exponent, up to infinity.
        bits = (u32(ef - 1) << 23u) + rne_shift64(sig_hi, lo, 29u);
    } else {
        let s = u32(30 - ef);
        bits = select(0u, rne_shift64(sig_hi, lo, s), s <= 63u);
    }
    return sign | min(bits, 0x7F800000u);
}

fn f32_to_bf16(x: u32) -> u32 {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return ((x >> 16u) & 0x8000u) | 0x7FC0u;
    }
    return (x + 0x7FFFu + ((x >> 16u) & 1u)) >> 16u;
}

fn f32_to_f16(x: u32) -> u32 {
    let sign = (x >> 16u) & 0x8000u;
    let a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) {
        return sign | 0x7E00u;
    }
    if (a >= 0x47800000u) {
        // 2^16 and above (infinity included) is beyond f16 whatever the rounding.
        return sign | 0x7C00u;
    }
    let e = i32(a >> 23u) - 112;
    let sig = (a & 0x7FFFFFu) | 0x800000u;
    if (e >= 1) {
        return sign | ((u32(e - 1) << 10u) + rne_shift32(sig, 13u));
    }
    let s = u32(14 - e);
    if (s >= 32u || (a >> 23u) == 0u) {
        return sign;
    }
    return sign | rne_shift32(sig, s);
}

// Element i of the source as f32 bits (f16 and bf16 widened exactly, f64 rounded once).
fn load_f32(i: u32) -> u32 {
    switch FROM {
        case 0u: {
            return f64_to_f32(src[2u * i], src[2u * i + 1u]);
        }
        case 2u: {
            return f16_to_f32(src_elem(i, 2u));
        }
        case 3u: {
            return (src_elem(i, 2u)) << 16u;
        }
        default: {
            return src[i];
        }
    }
}

// A 16-bit result with mlx's NaN when params.nan_mode asks for it.
fn nan16(r: u32) -> u32 {
    if (params.nan_mode == 0u) {
        return r;
    }
    if (TO == BF16 && (r & 0x7FFFu) > 0x7F80u) {
        return 0x7FC0u;
    }
    if (TO == F16 && (r & 0x7FFFu) > 0x7C00u) {
        return (r & 0x8000u) | 0x7D00u;
    }
    return r;
}

// An f32 result with mlx's NaN when params.nan_mode asks for it (f16 sources only).
fn nan32(r: u32) -> u32 {
    if (params.nan_mode != 0u && FROM == F16 && (r & 0x7FFFFFFFu) > 0x7F800000u) {
        return r | 0x00400000u;
    }
    return r;
}

// Element i converted to a 16-bit target.
fn half_of(i: u32) -> u32 {
    if (FROM == TO) {
        // Unused: the host never builds a cast to the same format.
        return src_elem(i, 2u);
    }
    let x = load_f32(i);
    if (TO == F16) {
        return nan16(f32_to_f16(x));
    }
    return nan16(f32_to_bf16(x));
}

// Converts the elements of output word w.
fn convert_word(w: u32) {
    let n = params.count;
    if (TO == F32) {
        if (w < n) {
            dst[w] = nan32(load_f32(w));
        }
        return;
    }
    let first = 2u * w;
    if (first >= n) {
        return;
    }
    var word = half_of(first);
    if (first + 1u < n) {
        word = word | (half_of(first + 1u) << 16u);
    }
    dst[w] = word;
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = linear_group(wg, groups);
    // WORDS words per invocation, WG apart, so neighbouring invocations touch
    // neighbouring words.
    let base = group * (WG * WORDS) + lid;
    for (var k = 0u; k < WORDS; k = k + 1u) {
        convert_word(base + k * WG);
    }
}

// Source element i converted to the target's bits.
fn convert_one(i: u32) -> u32 {
    let x = load_f32(i);
    if (TO == F32) {
        return nan32(x);
    }
    if (TO == F16) {
        return nan16(f32_to_f16(x));
    }
    return nan16(f32_to_bf16(x));
}

// Output word w of column c, whose batch starts at source element e: rows w * PER_WORD
// and up.
fn transposed_word(e: u32, c: u32, w: u32) -> u32 {
    let i = e + w * PER_WORD * params.s_row + c;
    var word = convert_one(i);
    if (PER_WORD == 2u) {
        word = word | (convert_one(i + params.s_row) << 16u);
    }
    return word;
}

// Output word offset of word w of column c in batch b.
fn transposed_at(b: u32, c: u32, w: u32) -> u32 {
    var row = c;
    if (params.hw != 1u) {
        row = remap_row(c, params.hw, params.inner);
    }
    return b * params.d_batch + row * params.d_row + w;
}

var<workgroup> tile: array<u32, 1056>;

@compute @workgroup_size(32, 8, 1)
fn transpose(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    var t = wid.xy;
    if (EDGE) {
        t = edge_tile(wid.x, params.full_x, params.full_y, params.edge_bottom);
    }
    let c0 = t.x * TILE;
    let w0 = t.y * TILE;
    let b = wid.z;
    let e = params.s_base + b * params.s_batch;
    if (STAGED) {
        transpose_staged(b, e, c0, w0, lid.x, lid.y);
    } else if (EDGE) {
        let c = c0 + lid.x;
        if (c < params.cols) {
            for (var m = 0u; m < 4u; m = m + 1u) {
                let w = w0 + lid.y + 8u * m;
                if (w < params.row_words) {
                    dst[transposed_at(b, c, w)] = transposed_word(e, c, w);
                }
            }
        }
    } else {
        // An interior tile: no bounds checks (each costs its masked path on CPU adapters).
        let c = c0 + lid.x;
        for (var m = 0u; m < 4u; m = m + 1u) {
            let w = w0 + lid.y + 8u * m;
            dst[transposed_at(b, c, w)] = transposed_word(e, c, w);
        }
    }
}

fn transpose_staged(b: u32, e: u32, c0: u32, w0: u32, tx: u32, ty: u32) {
    let c = c0 + tx;
    // Loads walk the source's stride-1 columns across the invocations.
    if (c < params.cols) {
        for (var m = 0u; m < 4u; m = m + 1u) {
            let w = w0 + ty + 8u * m;
            if (w < params.row_words) {
                tile[(ty + 8u * m) * PITCH + tx] = transposed_word(e, c, w);
            }
        }
    }
    workgroupBarrier();
    // Stores walk the output rows' words across the invocations.
    let w = w0 + tx;
    if (w < params.row_words) {
        for (var m = 0u; m < 4u; m = m + 1u) {
            let col = c0 + ty + 8u * m;
            if (col < params.cols) {
                dst[transposed_at(b, col, w)] = tile[tx * PITCH + ty + 8u * m];
            }
        }
    }
}
