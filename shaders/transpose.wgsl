// Tiled transpose: a gather whose output is [outer.., I, inner..] where axis `axis` (I)
// reads the source with a small stride (1 for a transpose) and the flattened inner axes
// (J elements) do not. Output element (o, i, j) is at o*I*J + i*J + j and reads
//   base + sum_{k<axis} o_k*strides[k] + i*strides[axis] + sum_{k>axis} j_k*strides[k].
// A workgroup loads a TI x TJ tile walking i fastest (contiguous source reads) into
// workgroup memory and writes it walking j fastest (contiguous output writes).
//
// Bindings (group 0):
//   0: uniform Params (strided.wgsl's, shared with gather.wgsl; rows = I, inner = J,
//      tiles_i = ceil(I / TI), tiles_j = ceil(J / TJ), count = outer*I*J)
//   1: storage, read       src: array<u32>  the source window
//   2: storage, read_write dst: array<u32>  the compact output
// (declared in common.wgsl, which with strided.wgsl is assembled after this file)
// Workgroup size: 256 x 1 x 1, one tile per workgroup, linear workgroup id
// x + nx * (y + ny * z) = (o * tiles_i + ti) * tiles_j + tj.
// Tile (must match TILE_* in src/backend/gpu/kernel.rs), K = elements per word:
//   ESIZE 1: K 4, TI 16, TJ 128   ESIZE 2: K 2, TI 32, TJ 64
//   ESIZE 4: K 1, TI 32, TJ 32    ESIZE 8: K 1, TI 32, TJ 32 (each element a word pair)
// Workgroup memory holds one element per u32 (two for ESIZE 8) with a row pitch of
// TI + 1 so the column reads of the write phase do not hit one bank (conflict-free for
// K = 1, K-way for K > 1).
// Word packing as in gather.wgsl (little-endian bytes). For ESIZE 1 and 2 the host only
// uses this kernel when J is a multiple of K, so every output word lies in one tile row
// and exactly one invocation writes it. No float interpretation anywhere.

override ESIZE: u32 = 4u;

// Largest tile: ESIZE 1 (128 columns x 17) and ESIZE 8 (2 x 32 x 33) both fit.
var<workgroup> tile: array<u32, 2176>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let k_per = select(4u / ESIZE, 1u, ESIZE == 8u);
    // Powers of two, applied with shifts and masks: llvmpipe scalarises integer division.
    let ti_shift = select(5u, 4u, ESIZE == 1u);
    let ti_len = 1u << ti_shift;
    let tj_len = 32u * k_per;
    let pitch = ti_len + 1u;

    let group = linear_group(wid, nwg);
    let per_outer = params.tiles_i * params.tiles_j;
    let rows = params.rows;
    let inner = params.inner;
    if per_outer == 0u || rows == 0u || inner == 0u {
        return;
    }
    let o = group / per_outer;
    if o * rows * inner >= params.count {
        return;
    }
    let t = group % per_outer;
    let i0 = (t / params.tiles_j) * ti_len;
    let j0 = (t % params.tiles_j) * tj_len;
    let obase = params.base + axes_offset(o, 0u, params.axis);
    let si = stride_at(params.axis);
    // One inner axis (a plain or batched transpose): no index unravelling per element.
    let one_inner = params.rank == params.axis + 2u;
    let sj = stride_at(params.axis + 1u);

    let loads = ti_len * tj_len / WG;
    for (var m = 0u; m < loads; m = m + 1u) {
        let flat = lid + m * WG;
        let ii = flat & (ti_len - 1u);
        let jj = flat >> ti_shift;
        let i = i0 + ii;
        let j = j0 + jj;
        if i < rows && j < inner {
            var s = obase + i * si;
            if one_inner {
                s = s + j * sj;
            } else {
                s = s + axes_offset(j, params.axis + 1u, params.rank);
            }
            let slot = jj * pitch + ii;
            if ESIZE == 8u {
                tile[2u * slot] = src[2u * s];
                tile[2u * slot + 1u] = src[2u * s + 1u];
            } else {
                tile[slot] = src_elem(s, ESIZE);
            }
        }
    }
    workgroupBarrier();

    // 32 output words per tile row.
    let words_per_row = inner / k_per;
    let stores = ti_len * 32u / WG;
    for (var m = 0u; m < stores; m = m + 1u) {
        let flat = lid + m * WG;
        let wj = flat & 31u;
        let ii = flat >> 5u;
        let i = i0 + ii;
        let jw = (j0 >> (k_per >> 1u)) + wj;
        if i < rows && jw < words_per_row {
            let row_word = (o * rows + i) * words_per_row + jw;
            if ESIZE == 8u {
                let slot = wj * pitch + ii;
                dst[2u * row_word] = tile[2u * slot];
                dst[2u * row_word + 1u] = tile[2u * slot + 1u];
            } else {
                var word = 0u;
                for (var t2 = 0u; t2 < k_per; t2 = t2 + 1u) {
                    word = word | (tile[(wj * k_per + t2) * pitch + ii] << (t2 * 8u * ESIZE));
                }
                dst[row_word] = word;
            }
        }
    }
}
