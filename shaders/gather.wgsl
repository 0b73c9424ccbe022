// General N-d gather: output element e (row-major over `shape`) is source element
// `base + sum_k idx_k(e) * strides[k]` of the bound source window.
//
// Bindings (group 0):
//   0: uniform Params (layout shared with transpose.wgsl, see src/backend/gpu/kernel.rs)
//   1: storage, read       src: array<u32>  the source window
//   2: storage, read_write dst: array<u32>  the compact output
// Workgroup size: 256 x 1 x 1. The linear workgroup id is x + nx * (y + ny * z), so the
// host may spread more than 65535 workgroups over y and z.
// Word packing (little-endian bytes within a u32, override ESIZE):
//   ESIZE 1: 4 elements per word, element e is byte e & 3 of word e >> 2
//   ESIZE 2: 2 elements per word, element e is half e & 1 of word e >> 1
//   ESIZE 4: 1 element per word
//   ESIZE 8: 1 element per word pair (2e, 2e + 1)
// One invocation owns each output word (ESIZE <= 4) or word pair (ESIZE 8) and assembles
// it from the elements it gathers, so sub-word elements never race. Bits are only moved
// with shifts and masks; nothing is interpreted as a float.

override ESIZE: u32 = 4u;

struct Params {
    rank: u32,
    count: u32,
    base: u32,
    axis: u32,
    rows: u32,
    inner: u32,
    tiles_i: u32,
    tiles_j: u32,
    shape: array<vec4<u32>, 2>,
    strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

const WG: u32 = 256u;

fn src_index(e: u32) -> u32 {
    var rem = e;
    var off = params.base;
    var k = params.rank;
    loop {
        if k == 0u {
            break;
        }
        k = k - 1u;
        let n = params.shape[k >> 2u][k & 3u];
        off = off + (rem % n) * params.strides[k >> 2u][k & 3u];
        rem = rem / n;
    }
    return off;
}

// The element (ESIZE <= 4) at source element index s, in the low bits.
fn load_small(s: u32) -> u32 {
    if ESIZE == 4u {
        return src[s];
    }
    if ESIZE == 2u {
        return (src[s >> 1u] >> ((s & 1u) * 16u)) & 0xffffu;
    }
    return (src[s >> 2u] >> ((s & 3u) * 8u)) & 0xffu;
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    let w = group * WG + lid;
    if ESIZE == 8u {
        if w >= params.count {
            return;
        }
        let s = src_index(w);
        dst[2u * w] = src[2u * s];
        dst[2u * w + 1u] = src[2u * s + 1u];
        return;
    }
    let per = 4u / ESIZE;
    let first = w * per;
    if first >= params.count {
        return;
    }
    var word = 0u;
    for (var j = 0u; j < per; j = j + 1u) {
        let e = first + j;
        if e < params.count {
            word = word | (load_small(src_index(e)) << (j * 8u * ESIZE));
        }
    }
    dst[w] = word;
}
