// General N-d gather: output element e (row-major over `shape`) is source element
// `base + sum_k idx_k(e) * strides[k]` of the bound source window.
//
// Bindings (group 0):
//   0: uniform Params (strided.wgsl's, shared with transpose.wgsl)
//   1: storage, read       src: array<u32>  the source window
//   2: storage, read_write dst: array<u32>  the compact output
// (declared in common.wgsl, which with strided.wgsl is assembled after this file)
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

fn src_index(e: u32) -> u32 {
    return params.base + axes_offset(e, 0u, params.rank);
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = linear_group(wid, nwg);
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
            word = word | (src_elem(src_index(e), ESIZE) << (j * 8u * ESIZE));
        }
    }
    dst[w] = word;
}
