//! The WGSL sources, all in one place. Each shader's header comment gives its bindings,
//! workgroup size and word packing.

/// A kernel's module source: its own file (header comment first, so line numbers in
/// errors are the file's), then the shared files it names, then common.wgsl. WGSL has no
/// includes, and module-scope declarations may come in any order, so concatenation is
/// the whole linker.
macro_rules! assemble {
    ($($file:literal),+) => {
        concat!(
            $(include_str!(concat!("../../../shaders/", $file)), "\n",)+
            include_str!("../../../shaders/common.wgsl"),
        )
    };
}

/// General N-d gather (rank up to 8, any strides).
pub const GATHER: &str = assemble!("gather.wgsl", "strided.wgsl");
/// Tiled transpose for gathers whose stride-1 source axis is not the innermost.
pub const TRANSPOSE: &str = assemble!("transpose.wgsl", "strided.wgsl");
/// Batched 2-D transpose with word blocks, the common case.
pub const TRANSPOSE_2D: &str = assemble!("transpose2d.wgsl");
/// Word copy, the baseline for benchmarks.
pub const COPY: &str = assemble!("copy.wgsl");
/// Element conversions between f64, f32, f16 and bf16, on the bits.
pub const CAST: &str = assemble!("cast.wgsl", "floats.wgsl");
/// mlx's affine quantization of whole groups, float arithmetic emulated on the bits.
pub const QUANTIZE: &str = assemble!("quantize.wgsl", "floats.wgsl");

/// Every kernel's assembled source with its own file's name, for validation and error
/// messages.
pub const ALL: [(&str, &str); 6] = [
    ("gather.wgsl", GATHER),
    ("transpose.wgsl", TRANSPOSE),
    ("transpose2d.wgsl", TRANSPOSE_2D),
    ("copy.wgsl", COPY),
    ("cast.wgsl", CAST),
    ("quantize.wgsl", QUANTIZE),
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
            // The kernel's own header, which leads its assembled source.
            let header: Vec<&str> = text.lines().take_while(|l| l.starts_with("//")).collect();
            let header = header.join("\n");
            for needle in ["Bindings", "Workgroup size", "packing"] {
                assert!(header.contains(needle), "{name}: header lacks '{needle}'");
            }
        }
    }
}
