// Plain word copy, the baseline the gather kernels are measured against: dst[w] = src[w]
// for w < params.count (count in words here, not elements).
//
// Bindings (group 0), identical to the other shaders (declared in common.wgsl, which is
// assembled after this file):
//   0: uniform Params (only `count` is read)
//   1: storage, read       src: array<u32>
//   2: storage, read_write dst: array<u32>
// Workgroup size: 32 x 8 x 1 and 4 * PLANES words per invocation, 1024 * PLANES words per
// workgroup: the dispatch shape of transpose2d.wgsl (a 32 x 32 block tile, 4 block rows of
// PLANES words per invocation), so a kernel-vs-copy ratio compares the same number of
// invocations, workgroups and loads/stores per invocation, and differs only in where the
// words go. Words are strided by 256 within a workgroup so neighbouring invocations touch
// neighbouring words. Linear workgroup id x + nx * (y + ny * z).
// Word packing: none, words are moved whole (override PLANES = 1, 2 or 4 by element size
// as in transpose2d.wgsl).

override PLANES: u32 = 1u;

struct Params {
    rank: u32,
    count: u32,
}

@compute @workgroup_size(32, 8, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let per = 4u * PLANES;
    let group = linear_group(wid, nwg);
    let first = group * WG * per + lid;
    for (var m = 0u; m < per; m = m + 1u) {
        let w = first + m * WG;
        if w < params.count {
            dst[w] = src[w];
        }
    }
}
