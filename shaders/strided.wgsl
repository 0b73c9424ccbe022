// The uniform block and axis walk of the strided kernels, gather.wgsl and transpose.wgsl,
// assembled after common.wgsl and before either kernel (src/backend/gpu/source.rs). Shapes
// and strides are in elements, up to rank 8, packed four per vec4 (uniform arrays need a
// 16-byte stride); the host fills them (src/backend/gpu/kernel.rs).

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

fn shape_at(k: u32) -> u32 {
    return params.shape[k >> 2u][k & 3u];
}

fn stride_at(k: u32) -> u32 {
    return params.strides[k >> 2u][k & 3u];
}

// Source offset of index i unravelled row-major over axes lo .. hi - 1 (the last fastest);
// i must be below the product of their extents.
fn axes_offset(i: u32, lo: u32, hi: u32) -> u32 {
    var rem = i;
    var off = 0u;
    var k = hi;
    loop {
        if k <= lo {
            break;
        }
        k = k - 1u;
        let n = shape_at(k);
        off = off + (rem % n) * stride_at(k);
        rem = rem / n;
    }
    return off;
}
