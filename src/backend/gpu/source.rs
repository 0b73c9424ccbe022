//! The WGSL sources, all in one place. Each shader's header comment gives its bindings,
//! workgroup size and word packing.

/// General N-d gather (rank up to 8, any strides).
pub const GATHER: &str = include_str!("../../../shaders/gather.wgsl");
/// Tiled transpose for gathers whose stride-1 source axis is not the innermost.
pub const TRANSPOSE: &str = include_str!("../../../shaders/transpose.wgsl");
/// Batched 2-D transpose with word blocks, the common case.
pub const TRANSPOSE_2D: &str = include_str!("../../../shaders/transpose2d.wgsl");
/// Word copy, the baseline for benchmarks.
pub const COPY: &str = include_str!("../../../shaders/copy.wgsl");
/// Element conversions between f64, f32, f16 and bf16, on the bits.
pub const CAST: &str = include_str!("../../../shaders/cast.wgsl");

/// Every shader with its file name, for validation and error messages.
pub const ALL: [(&str, &str); 5] = [
    ("gather.wgsl", GATHER),
    ("transpose.wgsl", TRANSPOSE),
    ("transpose2d.wgsl", TRANSPOSE_2D),
    ("copy.wgsl", COPY),
    ("cast.wgsl", CAST),
];

#[cfg(test)]
mod tests {
    use super::ALL;

    #[test]
    fn every_shader_parses_and_validates_with_naga() {
        for (name, text) in ALL {
            let module = match naga::front::wgsl::parse_str(text) {
                Ok(m) => m,
                Err(e) => panic!("{name}: {}", e.emit_to_string(text)),
            };
            let mut validator = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::empty(),
            );
            if let Err(e) = validator.validate(&module) {
                panic!("{name}: {}", e.emit_to_string(text));
            }
            assert!(
                module.entry_points.iter().any(|ep| ep.name == "main"),
                "{name}: no entry point `main`"
            );
        }
    }

    #[test]
    fn every_shader_documents_bindings_workgroup_size_and_packing() {
        for (name, text) in ALL {
            for needle in ["Bindings", "Workgroup size", "packing"] {
                assert!(text.contains(needle), "{name}: header lacks '{needle}'");
            }
        }
    }
}
