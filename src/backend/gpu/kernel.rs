//! The compute pipelines, which one runs a piece, and the uniform block they read.

use crate::error::{Error, Result};
use crate::layout::Gather;

use super::source;

/// Invocations per workgroup of every shader (`@workgroup_size(256)`).
pub const WORKGROUP: u64 = 256;
/// Output words one copy-kernel workgroup moves (4 per invocation).
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
    /// transpose.wgsl around the stride-1 axis `axis`.
    Transpose { axis: usize },
    /// copy.wgsl (benchmarks only).
    Copy,
}

/// The tiled transpose runs when the innermost output axis does not read the source
/// contiguously but an outer axis does; sub-word elements additionally need whole words
/// per output row so no two workgroups share a word.
pub fn choose(g: &Gather) -> KernelKind {
    let rank = g.shape.len();
    if rank < 2 || g.strides[rank - 1] == 1 {
        return KernelKind::Gather;
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

/// The uniform block and the workgroup count of one dispatch.
pub struct Dispatch {
    pub params: [u32; PARAMS_WORDS],
    pub groups: u64,
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Gpu {
        detail: format!("{what} {v} does not fit the shaders' 32-bit indices"),
    })
}

/// Encodes `g` (offset relative to the bound window, rank at most 8) for `kind`.
/// `Copy` reads `g.out_bytes()` rounded up to words.
pub fn dispatch(g: &Gather, kind: KernelKind) -> Result<Dispatch> {
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
            words.div_ceil(COPY_WORDS_PER_GROUP)
        }
    };
    Ok(Dispatch { params: p, groups })
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
    copy: wgpu::ComputePipeline,
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
    pub fn new(device: &wgpu::Device) -> Kernels {
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
        let copy_module = module("copy.wgsl", source::COPY);
        let pipeline = |m: &wgpu::ShaderModule, label: &str, constants: &[(&str, f64)]| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: Some(&pipeline_layout),
                module: m,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    // Every tile slot is written before it is read (or not read at all);
                    // zeroing cost ~20x on GL.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        };
        let per_size = |m: &wgpu::ShaderModule, label: &str| {
            [1.0, 2.0, 4.0, 8.0].map(|es| pipeline(m, label, &[("ESIZE", es)]))
        };
        Kernels {
            gather: per_size(&gather_module, "gather"),
            transpose: per_size(&transpose_module, "transpose"),
            copy: pipeline(&copy_module, "copy", &[]),
            layout,
        }
    }

    pub fn pipeline(&self, kind: KernelKind, elem_size: usize) -> &wgpu::ComputePipeline {
        let i = size_index(elem_size);
        match kind {
            KernelKind::Gather => &self.gather[i],
            KernelKind::Transpose { .. } => &self.transpose[i],
            KernelKind::Copy => &self.copy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transpose_picks_the_tiled_kernel_and_a_row_copy_the_gather_kernel() {
        let t = Gather::from_parts(4, vec![5, 7], vec![1, 5], 0);
        assert_eq!(choose(&t), KernelKind::Transpose { axis: 0 });
        let rows = Gather::from_parts(4, vec![5, 7], vec![9, 1], 0);
        assert_eq!(choose(&rows), KernelKind::Gather);
        // Odd rows of bytes would share words between tiles.
        let odd = Gather::from_parts(1, vec![5, 7], vec![1, 5], 0);
        assert_eq!(choose(&odd), KernelKind::Gather);
        let even = Gather::from_parts(1, vec![5, 8], vec![1, 5], 0);
        assert_eq!(choose(&even), KernelKind::Transpose { axis: 0 });
        // OIHW -> HWIO: [HW, I, O] with strides [1, HW, I*HW].
        let conv = Gather::from_parts(2, vec![9, 4, 6], vec![1, 9, 36], 0);
        assert_eq!(choose(&conv), KernelKind::Transpose { axis: 0 });
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
