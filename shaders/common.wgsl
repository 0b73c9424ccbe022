// Helpers every kernel shares, assembled in front of each kernel's own source at load
// time (src/backend/gpu/source.rs); WGSL has no includes. Module-scope declarations may
// come in any order, so the bindings below use the `Params` each kernel declares: the
// uniform layouts differ between kernels, the bindings do not.
//
// Bindings (group 0), the same in every kernel:
//   0: uniform Params (the kernel's own struct)
//   1: storage, read       src: array<u32>  the source words
//   2: storage, read_write dst: array<u32>  the output words
// Word packing (little-endian bytes within a u32): elements of 1 and 2 bytes lie 4 and 2
// per word, element e in byte e & 3 or half e & 1 of word e >> 2 or e >> 1; nothing here
// interprets bits as floats.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

// Invocations of a 256-invocation workgroup.
const WG: u32 = 256u;

// The workgroup's linear id x + nx * (y + ny * z): the host spreads dispatches of more
// than 65535 workgroups over y and z.
fn linear_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}

// Source element s of `esize` (1, 2 or 4) bytes, in the low bits of the result.
fn src_elem(s: u32, esize: u32) -> u32 {
    if esize == 4u {
        return src[s];
    }
    if esize == 2u {
        return (src[s >> 1u] >> ((s & 1u) * 16u)) & 0xffffu;
    }
    return (src[s >> 2u] >> ((s & 3u) * 8u)) & 0xffu;
}

// The 32 x 32 tiles of transpose2d.wgsl and cast.wgsl's `transpose`, dispatched as 32 x 8
// invocations; workgroup memory rows of PITCH words keep transposed reads off one bank.
const TILE: u32 = 32u;
const PITCH: u32 = 33u;

// The tile an edge dispatch's workgroup x covers: the bottom strip (tile row full_y,
// edge_bottom tiles) first, then the right strip (tile column full_x).
fn edge_tile(x: u32, full_x: u32, full_y: u32, edge_bottom: u32) -> vec2<u32> {
    // Workgroup-uniform.
    let right = x >= edge_bottom;
    return select(vec2<u32>(x, full_y), vec2<u32>(full_x, x - edge_bottom), right);
}

// Row (c % hw) * inner + c / hw of a remapped plane's source column c: OIHW -> HWIO as one
// O x (I * H * W) transpose lands source column i * HW + s on output row s * I + i.
fn remap_row(c: u32, hw: u32, inner: u32) -> u32 {
    return (c % hw) * inner + c / hw;
}
