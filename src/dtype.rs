//! Element types a checkpoint can hold.

use std::fmt;

/// The element types relayout reads and writes. Layout ops only move bytes, so the
/// dtype matters for element size and for the name written into the output header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
    /// Packed quantized words (mlx's quantized weights).
    U32,
}

impl DType {
    /// Every dtype, in the order used for reports.
    pub const ALL: [DType; 13] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::U32,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool | DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// Every name of this dtype. The one table of dtype names: each reader, writer
    /// and front end goes through it, so two spellings of a dtype cannot drift apart.
    const fn names(self) -> Names {
        // (safetensors, NumPy names with the one it prints first, torch storage, cast)
        let (safetensors, numpy, torch_storage, cast): (_, &[&str], _, _) = match self {
            DType::F64 => ("F64", &["float64"], "DoubleStorage", None),
            DType::F32 => ("F32", &["float32"], "FloatStorage", Some("f32")),
            DType::F16 => ("F16", &["float16"], "HalfStorage", Some("f16")),
            DType::BF16 => ("BF16", &["bfloat16"], "BFloat16Storage", Some("bf16")),
            DType::I64 => ("I64", &["int64"], "LongStorage", None),
            DType::I32 => ("I32", &["int32"], "IntStorage", None),
            DType::I16 => ("I16", &["int16"], "ShortStorage", None),
            DType::I8 => ("I8", &["int8"], "CharStorage", None),
            DType::U8 => ("U8", &["uint8"], "ByteStorage", None),
            DType::Bool => ("BOOL", &["bool", "bool_"], "BoolStorage", None),
            DType::F8E4M3 => ("F8_E4M3", &["float8_e4m3fn"], "Float8_e4m3fnStorage", None),
            DType::F8E5M2 => ("F8_E5M2", &["float8_e5m2"], "Float8_e5m2Storage", None),
            DType::U32 => ("U32", &["uint32"], "UInt32Storage", None),
        };
        Names {
            safetensors,
            numpy,
            torch_storage,
            cast,
        }
    }

    /// The name the safetensors header uses (and the Python binding reports).
    pub fn safetensors_name(self) -> &'static str {
        self.names().safetensors
    }

    /// Parses a safetensors header dtype name.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// The NumPy (and JAX, MLX, ml_dtypes) name: `float32`, `bfloat16`.
    pub fn numpy_name(self) -> &'static str {
        // Every row lists at least one NumPy name (checked by the tests).
        self.names().numpy.first().copied().unwrap_or("")
    }

    /// True for the dtypes NumPy itself lacks, which `ml_dtypes` provides under
    /// [`DType::numpy_name`] (bfloat16, the float8s).
    pub fn needs_ml_dtypes(self) -> bool {
        matches!(self, DType::BF16 | DType::F8E4M3 | DType::F8E5M2)
    }

    /// Parses a NumPy dtype name, aliases such as `bool_` included.
    pub fn from_numpy_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.names().numpy.contains(&name))
    }

    /// The storage class `torch.save` pickles for this dtype: `torch.FloatStorage`
    /// without the module.
    pub fn torch_storage_name(self) -> &'static str {
        self.names().torch_storage
    }

    /// Parses a storage class name (`FloatStorage`).
    pub fn from_torch_storage_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.torch_storage_name() == name)
    }

    /// The short name `--dtype`, a rule's `dtype` and the Python binding's `dtype=`
    /// take (`bf16`): only the floating dtypes a conversion may cast to have one.
    pub fn cast_name(self) -> Option<&'static str> {
        self.names().cast
    }

    /// Parses a cast name (`bf16`, `f16`, `f32`), lowercase as written.
    pub fn from_cast_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.cast_name() == Some(name))
    }
}

/// One row of the dtype name table.
struct Names {
    safetensors: &'static str,
    numpy: &'static [&'static str],
    torch_storage: &'static str,
    cast: Option<&'static str>,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_through_every_naming() {
        let mut cast = Vec::new();
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert!(!d.numpy_name().is_empty(), "{d:?}");
            for name in d.names().numpy {
                assert_eq!(DType::from_numpy_name(name), Some(d), "{name}");
            }
            assert_eq!(
                DType::from_torch_storage_name(d.torch_storage_name()),
                Some(d)
            );
            if let Some(name) = d.cast_name() {
                assert_eq!(DType::from_cast_name(name), Some(d), "{name}");
                cast.push(name);
            }
            assert_eq!(d.to_string(), d.safetensors_name());
        }
        // `--dtype` and the rule files document exactly these three.
        assert_eq!(cast, ["f32", "f16", "bf16"]);
        assert_eq!(DType::from_numpy_name("bool_"), Some(DType::Bool));
        assert_eq!(DType::from_safetensors_name("F4"), None);
        assert_eq!(DType::from_safetensors_name("float32"), None);
        assert_eq!(DType::from_numpy_name("F32"), None);
        assert_eq!(DType::from_cast_name("BF16"), None);
        assert_eq!(DType::from_cast_name("f64"), None);
        assert_eq!(DType::from_torch_storage_name("Storage"), None);
    }

    #[test]
    fn no_name_means_two_dtypes() {
        for (i, a) in DType::ALL.into_iter().enumerate() {
            for b in DType::ALL.into_iter().skip(i + 1) {
                let (na, nb) = (a.names(), b.names());
                assert_ne!(na.safetensors, nb.safetensors);
                assert_ne!(na.torch_storage, nb.torch_storage);
                assert!(na.numpy.iter().all(|n| !nb.numpy.contains(n)));
                assert!(na.cast.is_none() || na.cast != nb.cast);
            }
        }
    }
}
