// Batched 2-D transpose, the common case of every checkpoint conversion (Linear weights,
// OIHW -> HWIO). Output element (b, c, r) (r the innermost output axis) reads source
// element (b, r, c) (c the stride-1 source axis):
//   dst[b * ob + c * oc + r] = src[base + b * sb + r * sr + c]
// The host (src/backend/gpu/kernel.rs, `Plane2d`) turns every stride into word units, so
// the hot loop adds one step per row and nothing is unravelled on the device.
//
// Bindings (group 0), the layout every shader shares (declared in common.wgsl, which is
// assembled after this file):
//   0: uniform Params (own struct below; the buffer holds 24 words)
//   1: storage, read       src: array<u32>  the source window
//   2: storage, read_write dst: array<u32>  the compact output
// Workgroup size: 32 x 8 x 1. A workgroup moves one 32 x 32 tile of blocks (block columns
// 32x .. 32x + 31, block rows 32y .. 32y + 31) of batch z; invocation (tx, ty) moves
// block column tx of block rows ty, ty + 8, ty + 16, ty + 24 (staged: then block row tx
// of block columns ty + 8m out of workgroup memory).
// Two dispatches per plane (override EDGE): the interior tiles, which lie wholly inside the
// plane and run without a single bounds check (on CPU adapters every `if` costs its masked
// path), as workgroup grid (full_x, full_y, batch); then the partial tiles with guards, as
// grid (edge_tiles, 1, batch): the bottom strip (tile row full_y, edge_bottom tiles) and
// then the right strip (tile column full_x, rows 0 .. full_y - 1).
// Word packing (little-endian bytes within a u32, override ESIZE), K = elements per word:
//   ESIZE 4: a block is one word, PLANES 1.
//   ESIZE 8: a block is one element as a word pair (lo, hi), PLANES 2; both words go to
//            neighbouring output words.
//   ESIZE 2: a block is 2 x 2 elements: the words at one word column of source rows 2rb
//            and 2rb + 1 (a, b) become output rows 2cw and 2cw + 1 of word rb:
//            lo(a) | lo(b) << 16 and hi(a) | hi(b) << 16. PLANES 2.
//   ESIZE 1: a block is 4 x 4 bytes from 4 source rows, byte k of each going to output
//            row 4cw + k. PLANES 4.
// Every output word belongs to exactly one block, so no two invocations share a word; the
// host only picks this kernel when the output rows and batches start on words (r's extent,
// oc and ob multiples of K) and so does every source row relative to its batch (sr a
// multiple of K). Batches that start off the word grid (sb or base not a multiple of K:
// OIHW -> HWIO with an odd H*W) get the SHIFTED pipeline, which reads each source word as
// the funnel shift of two. Staged, workgroup memory holds the tile as PLANES planes of
// 32 x 33 words (pitch 33 keeps the transposed reads off one bank). Bits are only moved
// with shifts and masks, never interpreted as floats.

override ESIZE: u32 = 4u;
// Words a block spans: one per element row of the block (ESIZE <= 4) or the pair.
override PLANES: u32 = select(select(4u / ESIZE, 1u, ESIZE == 4u), 2u, ESIZE == 8u);
// Elements per source word K = 1 << KSHIFT (an 8-byte element counts as its two words).
override KSHIFT: u32 = select(select(0u, 1u, ESIZE == 2u), 2u, ESIZE == 1u);
// Stage the tile through workgroup memory so both the loads and the stores of a warp are
// contiguous (GPUs). Off, each block goes straight from registers to the output (CPU
// adapters, where every lane's access costs the same and staging doubles the memory ops).
override STAGED: bool = true;
// Some batch starts off the word grid: read words through `load`'s funnel shift. Its own
// pipeline, because on CPU adapters the untaken shift path still costs its masked loads.
override SHIFTED: bool = false;
// The partial tiles, with bounds checks (see the header).
override EDGE: bool = false;
// One plane whose output rows are permuted: source column c goes to output row
// (c % hw) * inner + c / hw. OIHW -> HWIO is then one O x (I * H * W) transpose, source
// column i * HW + s landing on output row s * I + i, rather than I batches of H * W
// columns each (which leave most of a 32-column tile idle when H * W is 9 or 1).
override REMAP: bool = false;

struct Params {
    // Block rows (rows of r divided by K) and source word columns of one batch.
    rows: u32,
    cols: u32,
    // Columns (c extent) in elements, to drop the output rows of a partial block.
    cols_elems: u32,
    // Source: window base and step per batch in elements (words for ESIZE 8); steps in
    // words per block row, plane and word column.
    s_base: u32,
    s_batch: u32,
    s_row: u32,
    s_plane: u32,
    s_col: u32,
    // Output words: steps per batch, word column, plane and block row.
    d_batch: u32,
    d_col: u32,
    d_plane: u32,
    d_row: u32,
    // Tiles wholly inside the plane along x and y, and tiles in the bottom edge strip.
    full_x: u32,
    full_y: u32,
    edge_bottom: u32,
    // REMAP: the period and the rows of the output row permutation.
    hw: u32,
    inner: u32,
}

const PLANE_WORDS: u32 = 1056u;
var<workgroup> tile: array<u32, 4224>;

// Source word i, or for a batch off the word grid the word starting `sh` bits into word i.
fn load(i: u32, sh: u32) -> u32 {
    if !SHIFTED || sh == 0u {
        return src[i];
    }
    // The high word may lie past the window only where its bits belong to elements past
    // the columns, which are never stored.
    return (src[i] >> sh) | (src[i + 1u] << (32u - sh));
}

// Plane p of the block whose source words (plane by plane) are w[0..PLANES].
fn shuffle(w: vec4<u32>, p: u32) -> u32 {
    if ESIZE == 2u {
        let sh = p * 16u;
        return ((w.x >> sh) & 0xffffu) | (((w.y >> sh) & 0xffffu) << 16u);
    }
    if ESIZE == 1u {
        let sh = p * 8u;
        return ((w.x >> sh) & 0xffu) | (((w.y >> sh) & 0xffu) << 8u)
            | (((w.z >> sh) & 0xffu) << 16u) | (((w.w >> sh) & 0xffu) << 24u);
    }
    return w[p];
}

// Output element row of plane p of word column c, compared with cols_elems.
fn out_row(c: u32, p: u32) -> u32 {
    return select(c * PLANES + p, c, ESIZE == 8u);
}

// Output word offset of plane p of word column col (block row 0 of batch 0).
fn dst_col(col: u32, p: u32) -> u32 {
    if !REMAP {
        return col * params.d_col + p * params.d_plane;
    }
    let c = out_row(col, p);
    let row = remap_row(c, params.hw, params.inner);
    if ESIZE == 8u {
        return row * params.d_col + p * params.d_plane;
    }
    return row * params.d_plane;
}

// The PLANES source words of the block at source word s.
fn load_block(s: u32, sh: u32) -> vec4<u32> {
    var w = vec4<u32>(0u);
    for (var p = 0u; p < PLANES; p = p + 1u) {
        w[p] = load(s + p * params.s_plane, sh);
    }
    return w;
}

// Interior tile straight from registers: no bounds checks at all.
fn direct_interior(t: vec2<u32>, z: u32, tx: u32, ty: u32, e: u32, sh: u32) {
    let col = t.x * TILE + tx;
    let row = t.y * TILE + ty;
    var s = (e >> KSHIFT) + col * params.s_col + row * params.s_row;
    var d = z * params.d_batch + row * params.d_row;
    let s_step = 8u * params.s_row;
    let d_step = 8u * params.d_row;
    // The column's plane offsets once: the compiler cannot hoist them past the stores
    // (it cannot tell the uniform block from the output), and REMAP's are divisions.
    var at = vec4<u32>(0u);
    for (var p = 0u; p < PLANES; p = p + 1u) {
        at[p] = dst_col(col, p);
    }
    for (var m = 0u; m < 4u; m = m + 1u) {
        let w = load_block(s, sh);
        for (var p = 0u; p < PLANES; p = p + 1u) {
            dst[d + at[p]] = shuffle(w, p);
        }
        s = s + s_step;
        d = d + d_step;
    }
}

// Partial tile straight from registers, every block and plane checked.
fn direct_edge(t: vec2<u32>, z: u32, tx: u32, ty: u32, e: u32, sh: u32) {
    let col = t.x * TILE + tx;
    if col >= params.cols {
        return;
    }
    let row0 = t.y * TILE + ty;
    var s = (e >> KSHIFT) + col * params.s_col + row0 * params.s_row;
    var d = z * params.d_batch + row0 * params.d_row;
    let s_step = 8u * params.s_row;
    let d_step = 8u * params.d_row;
    for (var m = 0u; m < 4u; m = m + 1u) {
        if row0 + 8u * m < params.rows {
            let w = load_block(s, sh);
            for (var p = 0u; p < PLANES; p = p + 1u) {
                if out_row(col, p) < params.cols_elems {
                    dst[d + dst_col(col, p)] = shuffle(w, p);
                }
            }
        }
        s = s + s_step;
        d = d + d_step;
    }
}

// Any tile through workgroup memory, with bounds checks (cheap on GPUs).
fn staged(t: vec2<u32>, z: u32, tx: u32, ty: u32, e: u32, sh: u32) {
    let col0 = t.x * TILE;
    let row0 = t.y * TILE;
    let col = col0 + tx;
    if col < params.cols {
        var s = (e >> KSHIFT) + col * params.s_col + (row0 + ty) * params.s_row;
        let step = 8u * params.s_row;
        for (var m = 0u; m < 4u; m = m + 1u) {
            if row0 + ty + 8u * m < params.rows {
                let w = load_block(s, sh);
                let slot = (ty + 8u * m) * PITCH + tx;
                for (var p = 0u; p < PLANES; p = p + 1u) {
                    tile[p * PLANE_WORDS + slot] = shuffle(w, p);
                }
            }
            s = s + step;
        }
    }
    workgroupBarrier();
    let row = row0 + tx;
    if row < params.rows {
        let d = z * params.d_batch + row * params.d_row;
        for (var m = 0u; m < 4u; m = m + 1u) {
            let c = col0 + ty + 8u * m;
            let slot = tx * PITCH + ty + 8u * m;
            for (var p = 0u; p < PLANES; p = p + 1u) {
                if out_row(c, p) < params.cols_elems {
                    dst[d + dst_col(c, p)] = tile[p * PLANE_WORDS + slot];
                }
            }
        }
    }
}

@compute @workgroup_size(32, 8, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    var t = wid.xy;
    if EDGE {
        t = edge_tile(wid.x, params.full_x, params.full_y, params.edge_bottom);
    }
    let e = params.s_base + wid.z * params.s_batch;
    let sh = (e & ((1u << KSHIFT) - 1u)) * 8u * ESIZE;
    if STAGED {
        staged(t, wid.z, lid.x, lid.y, e, sh);
    } else if EDGE {
        direct_edge(t, wid.z, lid.x, lid.y, e, sh);
    } else {
        direct_interior(t, wid.z, lid.x, lid.y, e, sh);
    }
}
