//! The compute pipelines, which one runs a piece, and the uniform block they read.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{Cast, Gather};

use super::source;

/// Invocations per workgroup of every shader (`@workgroup_size(256)`).
pub const WORKGROUP: u64 = 256;
/// Output words one copy-kernel workgroup moves per plane (4 per invocation), as many
/// as one transpose2d.wgsl tile.
pub const COPY_WORDS_PER_GROUP: u64 = 1024;

/// Tile rows (I) and columns (J) of transpose.wgsl by element size; must match the
/// shader's `ti_len` / `tj_len`.
pub fn tile(elem_size: usize) -> (u64, u64) {
    match elem_size {
        1 => (16, 128),
        2 => (32, 64),
        _ => (32, 32),
    }
}

/// Elements per output word (word pairs count as one element).
fn per_word(elem_size: usize) -> usize {
    match elem_size {
        1 => 4,
        2 => 2,
        _ => 1,
    }
}

/// Which shader runs a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// gather.wgsl, any strides.
    Gather,
    /// transpose2d.wgsl: a batched 2-D transpose ([`Plane2d`]); `shifted` when some
    /// batch of sub-word elements starts off the word grid.
    Transpose2d { shifted: bool, remap: bool },
    /// transpose.wgsl around the stride-1 axis `axis`, for the rank-4+ transposes
    /// transpose2d.wgsl does not take.
    Transpose { axis: usize },
    /// copy.wgsl (benchmarks only).
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    Copy,
    /// cast.wgsl over contiguous elements: the second pass of a converting gather.
    Cast(Cast),
    /// cast.wgsl's `transpose` entry point: a batched 2-D transpose and the conversion in
    /// one pass ([`Plane2d::for_cast`]).
    TransposeCast(Cast),
    /// quantize.wgsl over contiguous gathered values ([`quantize_dispatch`]).
    Quantize,
}

/// The most workgroups per dispatch dimension every device offers (the WebGPU minimum);
/// transpose2d.wgsl maps its tiles straight onto x, y and z, so it needs them to fit.
const MIN_GROUPS_PER_DIM: usize = 65535;

/// A gather that is a batched 2-D transpose, in elements:
/// `out[b * ob + c * oc + r] = src[offset + b * sb + r * sr + c]`, `b < batch`,
/// `c < cols`, `r < rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plane2d {
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    pub sb: usize,
    pub sr: usize,
    pub ob: usize,
    pub oc: usize,
    pub offset: usize,
    /// Output row permutation (transpose2d.wgsl's REMAP): source column `c` goes to output
    /// row `(c % hw) * inner + c / hw`; `hw == 0` for none.
    pub hw: usize,
    pub inner: usize,
}

impl Plane2d {
    /// Recognises `[c, r]` with strides `[1, sr]`, and the batched forms `[b, c, r]`
    /// (strides `[sb, 1, sr]`) and `[c, b, r]` (strides `[1, sb, sr]`, which is what
    /// OIHW -> HWIO simplifies to: `[HW, I, O]`).
    pub fn of(g: &Gather) -> Option<Plane2d> {
        let k = per_word(g.elem_size);
        let p = Plane2d::recognise(g, g.offset % k == 0)?;
        // Sub-word elements: output rows must be whole words starting on words, so each
        // output word is one block's, and source rows must keep their batch's alignment
        // (the kernel shifts a batch that starts off the word grid).
        let aligned = [p.rows, p.sr, p.oc, p.ob].iter().all(|v| v % k == 0);
        // The edge pass lines up a bottom and a right strip along x.
        let tiles_fit = p.batch <= MIN_GROUPS_PER_DIM
            && (p.rows / k).div_ceil(TILE2D) + p.cols.div_ceil(k).div_ceil(TILE2D)
                <= MIN_GROUPS_PER_DIM;
        (aligned && tiles_fit).then_some(p)
    }

    /// The plane of a gather that cast.wgsl's `transpose` entry point runs fused with a
    /// conversion into `to`: it reads source elements one by one, so only the output
    /// rows must be whole words of the target (each word then belongs to one invocation),
    /// and the tile grid must fit the device's dispatch limit.
    pub fn for_cast(g: &Gather, to: DType, max_groups: u32) -> Option<Plane2d> {
        let k = per_word(to.size());
        let p = Plane2d::recognise(g, true)?;
        let aligned = [p.rows, p.oc, p.ob].iter().all(|v| v % k == 0);
        let max = (max_groups as usize).min(MIN_GROUPS_PER_DIM);
        // As for transpose2d.wgsl, the edge pass lines up a bottom and a right strip
        // along x, so both tile counts together must fit one dimension.
        let fits = p.batch <= max && p.cols.div_ceil(TILE2D) + (p.rows / k).div_ceil(TILE2D) <= max;
        (aligned && fits).then_some(p)
    }

    /// The plane shapes, before any kernel's alignment rules; `remap_ok` allows the
    /// remapped single plane for narrow batches.
    fn recognise(g: &Gather, remap_ok: bool) -> Option<Plane2d> {
        let (s, t) = (&g.shape, &g.strides);
        let p = match (s.as_slice(), t.as_slice()) {
            (&[c, r], &[1, sr]) => Plane2d {
                batch: 1,
                rows: r,
                cols: c,
                sb: 0,
                sr,
                ob: 0,
                oc: r,
                offset: g.offset,
                hw: 0,
                inner: 0,
            },
            (&[b, c, r], &[sb, 1, sr]) => Plane2d {
                batch: b,
                rows: r,
                cols: c,
                sb,
                sr,
                ob: c.checked_mul(r)?,
                oc: r,
                offset: g.offset,
                hw: 0,
                inner: 0,
            },
            // Narrow batches that tile the source rows (sb == c, OIHW -> HWIO): one plane
            // of c * b columns whose output rows are permuted, so whole tiles do work.
            (&[c, b, r], &[1, sb, sr]) if sb == c && c < TILE2D && remap_ok => Plane2d {
                batch: 1,
                rows: r,
                cols: c.checked_mul(b)?,
                sb: 0,
                sr,
                ob: 0,
                oc: r,
                offset: g.offset,
                hw: c,
                inner: b,
            },
            (&[c, b, r], &[1, sb, sr]) => Plane2d {
                batch: b,
                rows: r,
                cols: c,
                sb,
                sr,
                ob: r,
                oc: b.checked_mul(r)?,
                offset: g.offset,
                hw: 0,
                inner: 0,
            },
            _ => return None,
        };
        (p.sr != 1).then_some(p)
    }
}

/// Block rows and columns of one transpose2d.wgsl workgroup tile.
const TILE2D: usize = 32;

/// Words of workgroup memory a block spans in transpose2d.wgsl and copy.wgsl (`PLANES`).
fn planes(elem_size: usize) -> usize {
    match elem_size {
        1 => 4,
        2 | 8 => 2,
        _ => 1,
    }
}

/// Batched 2-D transposes get their own kernel; other gathers with a stride-1 axis that
/// is not the innermost get the general tiled transpose (sub-word elements only with
/// whole words per output row, so no two workgroups share a word); the rest the gather.
pub fn choose(g: &Gather) -> KernelKind {
    let rank = g.shape.len();
    if rank < 2 || g.strides[rank - 1] == 1 {
        return KernelKind::Gather;
    }
    if let Some(p) = Plane2d::of(g) {
        let k = per_word(g.elem_size);
        let shifted = p.offset % k != 0 || (p.batch > 1 && p.sb % k != 0);
        return KernelKind::Transpose2d {
            shifted,
            remap: p.hw > 0,
        };
    }
    let Some(axis) = (0..rank - 1).rev().find(|&k| g.strides[k] == 1) else {
        return KernelKind::Gather;
    };
    let inner: usize = g.shape[axis + 1..].iter().product();
    if inner % per_word(g.elem_size) != 0 {
        return KernelKind::Gather;
    }
    KernelKind::Transpose { axis }
}

/// Size of the uniform block (`struct Params` in the shaders), in u32.
pub const PARAMS_WORDS: usize = 24;

/// Which pipeline of a kernel a pass runs: transpose2d.wgsl's partial tiles have their
/// own (see its header); every other kernel has only `Main`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Main,
    Edge,
}

/// The uniform block and the passes (pipeline part, workgroups) of one dispatch; passes
/// with no workgroups are left out.
pub struct Dispatch {
    pub params: [u32; PARAMS_WORDS],
    pub passes: Vec<(Part, (u32, u32, u32))>,
}

fn passes(list: &[(Part, (u32, u32, u32))]) -> Vec<(Part, (u32, u32, u32))> {
    list.iter()
        .copied()
        .filter(|(_, (x, y, z))| *x > 0 && *y > 0 && *z > 0)
        .collect()
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Gpu {
        detail: format!("{what} {v} does not fit the shaders' 32-bit indices"),
    })
}

/// Encodes `g` (offset relative to the bound window, rank at most 8) for `kind`, with at
/// most `max_groups` workgroups per dimension. `Copy` reads `g.out_bytes()` rounded up
/// to words.
pub fn dispatch(g: &Gather, kind: KernelKind, max_groups: u32) -> Result<Dispatch> {
    match kind {
        KernelKind::Transpose2d { .. } => return dispatch_2d(g),
        KernelKind::Cast(c) => return cast_dispatch(g.len(), c, max_groups),
        KernelKind::TransposeCast(c) => return transpose_cast_dispatch(g, c, max_groups),
        _ => {}
    }
    let (shape, strides) = if g.shape.is_empty() {
        (vec![1], vec![1])
    } else {
        (g.shape.clone(), g.strides.clone())
    };
    if shape.len() > super::chunk::MAX_RANK {
        return Err(Error::Gpu {
            detail: format!("rank {} exceeds the shaders' 8 axes", shape.len()),
        });
    }
    let mut p = [0u32; PARAMS_WORDS];
    p[0] = to_u32(shape.len(), "rank")?;
    p[1] = to_u32(g.len(), "element count")?;
    p[2] = to_u32(g.offset, "window offset")?;
    for (k, (&n, &s)) in shape.iter().zip(&strides).enumerate() {
        p[8 + k] = to_u32(n, "axis length")?;
        p[16 + k] = to_u32(s, "stride")?;
    }
    let count = g.len() as u64;
    let groups = match kind {
        KernelKind::Gather => {
            let items = if g.elem_size == 8 {
                count
            } else {
                count.div_ceil(per_word(g.elem_size) as u64)
            };
            items.div_ceil(WORKGROUP)
        }
        KernelKind::Transpose { axis } => {
            let (ti, tj) = tile(g.elem_size);
            let rows = shape[axis];
            let inner: usize = shape[axis + 1..].iter().product();
            let outer: usize = shape[..axis].iter().product();
            let tiles_i = (rows as u64).div_ceil(ti);
            let tiles_j = (inner as u64).div_ceil(tj);
            p[3] = to_u32(axis, "axis")?;
            p[4] = to_u32(rows, "rows")?;
            p[5] = to_u32(inner, "inner length")?;
            p[6] = to_u32(tiles_i as usize, "tile rows")?;
            p[7] = to_u32(tiles_j as usize, "tile columns")?;
            outer as u64 * tiles_i * tiles_j
        }
        KernelKind::Copy => {
            let words = (g.out_bytes() as u64).div_ceil(4);
            p[1] = to_u32(words as usize, "word count")?;
            words.div_ceil(COPY_WORDS_PER_GROUP * planes(g.elem_size) as u64)
        }
        KernelKind::Quantize => {
            return Err(Error::Gpu {
                detail: "quantize.wgsl is dispatched by quantize_dispatch".to_string(),
            })
        }
        KernelKind::Transpose2d { .. } | KernelKind::Cast(_) | KernelKind::TransposeCast(_) => 0,
    };
    Ok(Dispatch {
        params: p,
        passes: passes(&[(Part::Main, split_groups(groups, max_groups)?)]),
    })
}

/// quantize.wgsl over `values` contiguous values of `op.dtype()` (whole groups), one
/// group per invocation: the packed words first, then a (scale, bias) pair of f32 bits
/// per group. Returns the dispatch and the output's size in words.
pub fn quantize_dispatch(
    values: usize,
    op: &crate::layout::quant::Quantize,
    max_groups: u32,
) -> Result<(Dispatch, usize)> {
    let q = op.quant();
    let groups = values / q.group_size();
    let packed = groups * q.words_per_group();
    let words = packed + 2 * groups;
    let dtype = match op.dtype() {
        DType::F32 => 1,
        DType::F16 => 2,
        _ => 3,
    };
    let mut p = [0u32; PARAMS_WORDS];
    p[..5].copy_from_slice(&[
        to_u32(groups, "group count")?,
        to_u32(q.group_size(), "group size")?,
        q.bits(),
        dtype,
        to_u32(packed, "packed words")?,
    ]);
    to_u32(words, "output words")?;
    let workgroups = (groups as u64).div_ceil(WORKGROUP);
    Ok((
        Dispatch {
            params: p,
            passes: passes(&[(Part::Main, split_groups(workgroups, max_groups)?)]),
        },
        words,
    ))
}

/// transpose2d.wgsl's uniform block: every stride in words, per block row / column /
/// plane (see the shader header), and one workgroup per tile and batch.
fn dispatch_2d(g: &Gather) -> Result<Dispatch> {
    let Some(t) = Plane2d::of(g) else {
        return Err(Error::Gpu {
            detail: format!("{g:?} is not a batched 2-D transpose"),
        });
    };
    let k = per_word(g.elem_size);
    // Element strides to word strides; 8-byte elements are word pairs.
    let w = |v: usize| if g.elem_size == 8 { 2 * v } else { v / k };
    // The batch base stays in elements: the kernel splits it into word and shift.
    let e = |v: usize| if g.elem_size == 8 { 2 * v } else { v };
    let (s_plane, d_plane, d_row, s_col) = match g.elem_size {
        8 => (1, 1, 2, 2),
        _ => (t.sr / k, t.oc / k, 1, 1),
    };
    // A block row is K source rows (one for ESIZE 4 and 8).
    let s_row = if g.elem_size == 8 { 2 * t.sr } else { t.sr };
    let d_col = if g.elem_size == 8 { 2 * t.oc } else { t.oc };
    let rows = t.rows / k;
    let cols = t.cols.div_ceil(k);
    // A tile needs no guard when all its word columns hold only real columns.
    let grid = TileGrid::new(cols, t.cols / k, rows);
    let (full_x, full_y, edge_bottom) = (grid.full_x, grid.full_y, grid.edge_bottom);
    let values = [
        (rows, "block rows"),
        (cols, "word columns"),
        (t.cols, "columns"),
        (e(t.offset), "window offset"),
        (e(t.sb), "batch stride"),
        (s_row, "row stride"),
        (s_plane, "plane stride"),
        (s_col, "column stride"),
        (w(t.ob), "output batch stride"),
        (d_col, "output row stride"),
        (d_plane, "output plane stride"),
        (d_row, "output block stride"),
        (full_x, "full tile columns"),
        (full_y, "full tile rows"),
        (edge_bottom, "bottom edge tiles"),
        (t.hw.max(1), "remap period"),
        (t.inner, "remap rows"),
    ];
    let mut p = [0u32; PARAMS_WORDS];
    for (slot, (v, what)) in p.iter_mut().zip(values) {
        *slot = to_u32(v, what)?;
    }
    grid.dispatch(p, t.batch)
}

/// The tiles of a plane of 32 x 32 tiles (transpose2d.wgsl and cast.wgsl's `transpose`):
/// the interior ones, wholly inside the plane, run without bounds checks as one
/// dispatch; the bottom strip and then the right strip run checked as a second.
struct TileGrid {
    full_x: usize,
    full_y: usize,
    edge_bottom: usize,
    edge_right: usize,
}

impl TileGrid {
    /// `cols` columns (units of the x axis), of which the first `full_cols` need no
    /// check, and `rows` rows.
    fn new(cols: usize, full_cols: usize, rows: usize) -> TileGrid {
        let (tiles_x, tiles_y) = (cols.div_ceil(TILE2D), rows.div_ceil(TILE2D));
        let (full_x, full_y) = (full_cols / TILE2D, rows / TILE2D);
        TileGrid {
            full_x,
            full_y,
            edge_bottom: if full_y < tiles_y { tiles_x } else { 0 },
            edge_right: if full_x < tiles_x { full_y } else { 0 },
        }
    }

    /// Both passes over `batch` planes with the uniform block `params`.
    fn dispatch(&self, params: [u32; PARAMS_WORDS], batch: usize) -> Result<Dispatch> {
        let batch = to_u32(batch, "batch")?;
        let interior = (
            to_u32(self.full_x, "tile columns")?,
            to_u32(self.full_y, "tile rows")?,
            batch,
        );
        let edge_tiles = self.edge_bottom + self.edge_right;
        let edge = (to_u32(edge_tiles, "edge tiles")?, 1, batch);
        Ok(Dispatch {
            params,
            passes: passes(&[(Part::Main, interior), (Part::Edge, edge)]),
        })
    }
}

/// The fused transpose-and-convert of `g` into `c.to()` (cast.wgsl's `transpose`), when
/// `g` is a plane it takes on this device.
pub fn fused_cast(g: &Gather, c: Cast, max_groups: u32) -> Option<KernelKind> {
    Plane2d::for_cast(g, c.to(), max_groups).map(|_| KernelKind::TransposeCast(c))
}

/// cast.wgsl's `transpose` uniform block (see its `Params`): strides in source elements
/// and output words, one workgroup per tile of 32 columns x 32 output words per batch.
fn transpose_cast_dispatch(g: &Gather, c: Cast, max_groups: u32) -> Result<Dispatch> {
    let Some(t) = Plane2d::for_cast(g, c.to(), max_groups) else {
        return Err(Error::Gpu {
            detail: format!("{g:?} is not a plane the fused transpose-cast takes"),
        });
    };
    let k = per_word(c.to().size());
    let row_words = t.rows / k;
    let grid = TileGrid::new(t.cols, t.cols, row_words);
    let values = [
        (row_words, "output row words"),
        (t.cols, "columns"),
        (t.offset, "window offset"),
        (t.sb, "batch stride"),
        (t.sr, "row stride"),
        (t.ob / k, "output batch stride"),
        (t.oc / k, "output row stride"),
        (t.hw.max(1), "remap period"),
        (t.inner, "remap rows"),
        (grid.full_x, "full tile columns"),
        (grid.full_y, "full tile rows"),
        (grid.edge_bottom, "bottom edge tiles"),
    ];
    let mut p = [0u32; PARAMS_WORDS];
    for (slot, (v, what)) in p[2..].iter_mut().zip(values) {
        *slot = to_u32(v, what)?;
    }
    p[CAST_NAN_WORD] = nan_code(c);
    // Every source element index, and for f64 its word index, must fit a u32.
    let last = g.src_extent().saturating_mul(c.from().size() / 4);
    to_u32(last.max(g.src_extent()), "source extent")?;
    grid.dispatch(p, t.batch)
}

/// Spreads `groups` workgroups over x, y and z, each at most `max_per_dim`; the shaders
/// rebuild the linear id and skip the overshoot.
pub fn split_groups(groups: u64, max_per_dim: u32) -> Result<(u32, u32, u32)> {
    let max = u64::from(max_per_dim.max(1));
    if groups == 0 {
        return Ok((0, 0, 0));
    }
    let x = groups.min(max);
    let rest = groups.div_ceil(x);
    let y = rest.min(max);
    let z = rest.div_ceil(y);
    if z > max {
        return Err(Error::Gpu {
            detail: format!("{groups} workgroups exceed the device's dispatch limits"),
        });
    }
    // All three are at most `max`, which came from a u32.
    Ok((x as u32, y as u32, z as u32))
}

/// The pipelines of every shader and element size, sharing one bind group layout:
/// 0 uniform params, 1 read-only source words, 2 read-write output words.
pub struct Kernels {
    pub layout: wgpu::BindGroupLayout,
    gather: [wgpu::ComputePipeline; 4],
    transpose: [wgpu::ComputePipeline; 4],
    /// Indexed by shifted, edge, element size.
    transpose_2d: [[[wgpu::ComputePipeline; 4]; 2]; 3],
    copy: [wgpu::ComputePipeline; 4],
    /// cast.wgsl, indexed by [`cast_index`].
    cast: [wgpu::ComputePipeline; CASTS],
    /// cast.wgsl's fused `transpose` entry point, indexed by edge, [`cast_index`].
    transpose_cast: [[wgpu::ComputePipeline; CASTS]; 2],
    /// quantize.wgsl: affine groups, one per invocation.
    quantize: wgpu::ComputePipeline,
}

/// The uniform word of cast.wgsl's `nan_mode`: 0 torch's NaN bits, 1 mlx's.
const CAST_NAN_WORD: usize = 14;

fn nan_code(c: Cast) -> u32 {
    u32::from(c.nan() == crate::layout::cast::NanPolicy::Mlx)
}

/// Output words one cast.wgsl invocation converts (its `WORDS`).
const CAST_WORDS: u64 = 4;

/// Conversions cast.wgsl compiles: from F64, F32, F16 or BF16 to F32, F16 or BF16.
const CASTS: usize = 12;

/// cast.wgsl's code of a format (its `FROM` / `TO` overrides).
fn cast_code(d: DType) -> usize {
    match d {
        DType::F64 => 0,
        DType::F32 => 1,
        DType::F16 => 2,
        _ => 3,
    }
}

/// The pipeline slot of a conversion: `from * 3 + (to - 1)`; same-format slots are
/// built but never used (a [`Cast`] never has from == to).
fn cast_index(c: Cast) -> usize {
    cast_code(c.from()) * 3 + cast_code(c.to()) - 1
}

/// The uniform block and workgroups of a cast of `count` elements into `to`-sized
/// elements: one invocation per [`CAST_WORDS`] output words.
pub fn cast_dispatch(count: usize, c: Cast, max_groups: u32) -> Result<Dispatch> {
    let to = c.to();
    let mut p = [0u32; PARAMS_WORDS];
    p[1] = to_u32(count, "element count")?;
    p[CAST_NAN_WORD] = nan_code(c);
    let words = (count as u64 * to.size() as u64).div_ceil(4);
    Ok(Dispatch {
        params: p,
        passes: passes(&[(
            Part::Main,
            split_groups(words.div_ceil(WORKGROUP * CAST_WORDS), max_groups)?,
        )]),
    })
}

fn size_index(elem_size: usize) -> usize {
    match elem_size {
        1 => 0,
        2 => 1,
        4 => 2,
        _ => 3,
    }
}

impl Kernels {
    /// `staged`: transpose2d.wgsl moves tiles through workgroup memory (GPUs) rather than
    /// straight from registers (CPU adapters).
    pub fn new(device: &wgpu::Device, staged: bool) -> Kernels {
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("relayout"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
                storage(1, true),
                storage(2, false),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("relayout"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = |name: &str, text: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(text.into()),
            })
        };
        let gather_module = module("gather.wgsl", source::GATHER);
        let transpose_module = module("transpose.wgsl", source::TRANSPOSE);
        let transpose_2d_module = module("transpose2d.wgsl", source::TRANSPOSE_2D);
        let copy_module = module("copy.wgsl", source::COPY);
        let cast_module = module("cast.wgsl", source::CAST);
        let quantize_module = module("quantize.wgsl", source::QUANTIZE);
        let entry =
            |m: &wgpu::ShaderModule, label: &str, entry: &str, constants: &[(&str, f64)]| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(label),
                    layout: Some(&pipeline_layout),
                    module: m,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        // Every tile slot is written before it is read (or not read at all);
                        // zeroing cost ~20x on GL.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
            };
        let pipeline = |m: &wgpu::ShaderModule, label: &str, constants: &[(&str, f64)]| {
            entry(m, label, "main", constants)
        };
        let staged = if staged { 1.0 } else { 0.0 };
        let per_size = |m: &wgpu::ShaderModule, label: &str| {
            [1.0, 2.0, 4.0, 8.0].map(|es| pipeline(m, label, &[("ESIZE", es)]))
        };
        Kernels {
            gather: per_size(&gather_module, "gather"),
            transpose: per_size(&transpose_module, "transpose"),
            // Plain, shifted, remapped (a remapped plane is one batch on the word grid).
            transpose_2d: [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)].map(|(shifted, remap)| {
                [0.0, 1.0].map(|edge| {
                    [1.0, 2.0, 4.0, 8.0].map(|es| {
                        let constants = [
                            ("ESIZE", es),
                            ("STAGED", staged),
                            ("SHIFTED", shifted),
                            ("EDGE", edge),
                            ("REMAP", remap),
                        ];
                        pipeline(&transpose_2d_module, "transpose2d", &constants)
                    })
                })
            }),
            copy: [1, 2, 4, 8]
                .map(|es| pipeline(&copy_module, "copy", &[("PLANES", planes(es) as f64)])),
            cast: std::array::from_fn(|i| {
                let (from, to) = (i / 3, i % 3 + 1);
                pipeline(
                    &cast_module,
                    "cast",
                    &[("FROM", from as f64), ("TO", to as f64)],
                )
            }),
            transpose_cast: [0.0, 1.0].map(|edge| {
                std::array::from_fn(|i| {
                    let (from, to) = (i / 3, i % 3 + 1);
                    let constants = [
                        ("FROM", from as f64),
                        ("TO", to as f64),
                        ("STAGED", staged),
                        ("EDGE", edge),
                    ];
                    entry(&cast_module, "transpose cast", "transpose", &constants)
                })
            }),
            quantize: pipeline(&quantize_module, "quantize", &[]),
            layout,
        }
    }

    pub fn pipeline(
        &self,
        kind: KernelKind,
        elem_size: usize,
        part: Part,
    ) -> &wgpu::ComputePipeline {
        let i = size_index(elem_size);
        match kind {
            KernelKind::Gather => &self.gather[i],
            KernelKind::Transpose { .. } => &self.transpose[i],
            KernelKind::Transpose2d { shifted, remap } => {
                let variant = if remap { 2 } else { usize::from(shifted) };
                &self.transpose_2d[variant][usize::from(part == Part::Edge)][i]
            }
            KernelKind::Copy => &self.copy[i],
            KernelKind::Cast(c) => &self.cast[cast_index(c)],
            KernelKind::TransposeCast(c) => {
                &self.transpose_cast[usize::from(part == Part::Edge)][cast_index(c)]
            }
            KernelKind::Quantize => &self.quantize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_2d_transposes_pick_transpose2d_and_the_rest_fall_back() {
        let t = Gather::from_parts(4, vec![5, 7], vec![1, 5], 0);
        assert_eq!(
            choose(&t),
            KernelKind::Transpose2d {
                shifted: false,
                remap: false
            }
        );
        let rows = Gather::from_parts(4, vec![5, 7], vec![9, 1], 0);
        assert_eq!(choose(&rows), KernelKind::Gather);
        // Odd rows of bytes would share output words between blocks.
        let odd = Gather::from_parts(1, vec![5, 7], vec![1, 5], 0);
        assert_eq!(choose(&odd), KernelKind::Gather);
        let even = Gather::from_parts(1, vec![5, 8], vec![1, 8], 0);
        assert_eq!(
            choose(&even),
            KernelKind::Transpose2d {
                shifted: false,
                remap: false
            }
        );
        // A source row pitch off the word grid: the general tiled kernel.
        let pitch = Gather::from_parts(2, vec![5, 8], vec![1, 7], 0);
        assert_eq!(choose(&pitch), KernelKind::Transpose { axis: 0 });
        // An offset off the word grid is a shifted batch.
        let offset = Gather::from_parts(2, vec![5, 8], vec![1, 8], 1);
        assert_eq!(
            choose(&offset),
            KernelKind::Transpose2d {
                shifted: true,
                remap: false
            }
        );
        // OIHW -> HWIO: [HW, I, O] with strides [1, HW, I*HW] is one O x (I*HW) plane
        // with its output rows permuted, on the word grid even for an odd H*W.
        let conv = Gather::from_parts(2, vec![9, 4, 6], vec![1, 9, 36], 0);
        let remapped = KernelKind::Transpose2d {
            shifted: false,
            remap: true,
        };
        assert_eq!(choose(&conv), remapped);
        assert_eq!(
            Plane2d::of(&conv),
            Some(Plane2d {
                batch: 1,
                rows: 6,
                cols: 36,
                sb: 0,
                sr: 36,
                ob: 0,
                oc: 6,
                offset: 0,
                hw: 9,
                inner: 4,
            })
        );
        // Off the word grid, or batches that do not tile the rows: I batches, shifted.
        let shifted = KernelKind::Transpose2d {
            shifted: true,
            remap: false,
        };
        let off = Gather::from_parts(2, vec![9, 4, 6], vec![1, 9, 36], 1);
        assert_eq!(choose(&off), shifted);
        let gaps = Gather::from_parts(2, vec![9, 4, 6], vec![1, 11, 44], 0);
        assert_eq!(choose(&gaps), shifted);
        // Batch outermost: [B, C, R] with strides [sB, 1, sR].
        let batched = Gather::from_parts(8, vec![3, 5, 7], vec![40, 1, 5], 0);
        assert_eq!(
            choose(&batched),
            KernelKind::Transpose2d {
                shifted: false,
                remap: false
            }
        );
        // Two batch axes: the general tiled kernel.
        let rank4 = Gather::from_parts(4, vec![2, 3, 5, 7], vec![200, 40, 1, 5], 0);
        assert_eq!(choose(&rank4), KernelKind::Transpose { axis: 2 });
    }

    #[test]
    fn a_plane_wider_than_the_dispatch_limit_is_not_a_transpose2d() {
        let wide = Gather::from_parts(4, vec![32 * 65535 + 1, 2], vec![1, 32 * 65535 + 1], 0);
        assert_eq!(choose(&wide), KernelKind::Transpose { axis: 0 });
    }

    #[test]
    fn a_fused_cast_plane_whose_edge_strips_exceed_the_dispatch_limit_is_refused() {
        let c = Cast::new(DType::F32, DType::BF16)
            .ok()
            .flatten()
            .expect("cast");
        // 60000 tile columns and 10000 tile rows of words: each fits 65535, the bottom
        // and right edge strips together (one dispatch dimension) do not.
        let cols = 32 * 60_000 + 1;
        let big = Gather::from_parts(4, vec![cols, 64 * 10_000], vec![1, cols], 0);
        assert_eq!(fused_cast(&big, c, 65535), None);
        assert!(transpose_cast_dispatch(&big, c, 65535).is_err());
        // One tile row: 60001 tiles along x in the edge pass, within the limit.
        let fits = Gather::from_parts(4, vec![cols, 2], vec![1, cols], 0);
        assert_eq!(
            fused_cast(&fits, c, 65535),
            Some(KernelKind::TransposeCast(c))
        );
        let d = transpose_cast_dispatch(&fits, c, 65535).expect("dispatch");
        assert!(d
            .passes
            .iter()
            .all(|(_, (x, y, z))| *x <= 65535 && *y <= 65535 && *z <= 65535));
    }

    #[test]
    fn dispatches_beyond_the_per_dimension_limit_spread_over_y_and_z() {
        assert_eq!(split_groups(0, 65535).ok(), Some((0, 0, 0)));
        assert_eq!(split_groups(5, 65535).ok(), Some((5, 1, 1)));
        assert_eq!(split_groups(65536, 65535).ok(), Some((65535, 2, 1)));
        let (x, y, z) = split_groups(10, 3).unwrap_or_default();
        assert!(u64::from(x) * u64::from(y) * u64::from(z) >= 10);
        assert!(x <= 3 && y <= 3 && z <= 3);
        assert!(split_groups(28, 3).is_err());
    }
}
