// Plain word copy, the baseline the gather kernels are measured against: dst[w] = src[w]
// for w < params.count (count in words here, not elements).
//
// Bindings (group 0), identical to gather.wgsl and transpose.wgsl:
//   0: uniform Params (only `count` is read)
//   1: storage, read       src: array<u32>
//   2: storage, read_write dst: array<u32>
// Workgroup size: 256 x 1 x 1, 1024 words per workgroup (4 per invocation, strided by 256
// so neighbouring invocations touch neighbouring words), the dispatch shape of the 4-byte
// tiled transpose. Linear workgroup id x + nx * (y + ny * z).
// Word packing: none, words are moved whole.

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
const PER: u32 = 4u;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    let first = group * WG * PER + lid;
    for (var m = 0u; m < PER; m = m + 1u) {
        let w = first + m * WG;
        if w < params.count {
            dst[w] = src[w];
        }
    }
}
