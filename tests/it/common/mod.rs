//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use relayout::backend::cpu::Cpu;
use relayout::backend::reference::Reference;
use relayout::backend::Backend;
use relayout::writer::{HeaderEntry, SafetensorsWriter};
use relayout::{Checkpoint, DType};

/// A fixture shipped in tests/fixtures: of the checkout the tests were built in, or of
/// `RELAYOUT_TEST_ROOT` when the test binary runs elsewhere (benches/device_check.sh).
pub fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("RELAYOUT_TEST_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    root.join("tests/fixtures").join(name)
}

/// A fresh, empty folder for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relayout-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Names of the files in `dir`.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A tensor as stored in a file: dtype name, shape, contiguous bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Every tensor of a safetensors file, read with the `safetensors` crate.
pub fn load_safetensors(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                Tensor {
                    dtype: format!("{:?}", view.dtype()),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            )
        })
        .collect()
}

/// Every tensor of a checkpoint, materialised contiguous by the reference backend.
pub fn materialise(ckpt: &Checkpoint) -> BTreeMap<String, Tensor> {
    ckpt.tensors()
        .iter()
        .map(|t| {
            let perm: Vec<usize> = (0..t.shape().len()).collect();
            let g = ckpt.layout_op(t, &perm).expect("op").simplify();
            let mut out = vec![0xA5; g.out_bytes()];
            Reference
                .gather(&g, ckpt.storage_bytes(t), &mut out)
                .expect("gather");
            (
                t.name().to_string(),
                Tensor {
                    dtype: st_dtype_name(t.dtype()),
                    shape: t.shape().to_vec(),
                    bytes: out,
                },
            )
        })
        .collect()
}

/// The `safetensors` crate's Debug name of a dtype, to compare with [`load_safetensors`].
pub fn st_dtype_name(d: DType) -> String {
    d.safetensors_name().to_string()
}

/// Asserts two tensor maps are equal, naming the first difference.
pub fn assert_same_tensors(
    got: &BTreeMap<String, Tensor>,
    want: &BTreeMap<String, Tensor>,
    what: &str,
) {
    let got_names: Vec<&String> = got.keys().collect();
    let want_names: Vec<&String> = want.keys().collect();
    assert_eq!(got_names, want_names, "{what}: tensor names differ");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.dtype, w.dtype, "{what}: dtype of {name}");
        assert_eq!(g.shape, w.shape, "{what}: shape of {name}");
        if let Some(i) = g.bytes.iter().zip(&w.bytes).position(|(a, b)| a != b) {
            panic!(
                "{what}: bytes of {name} differ first at byte {i}: {} != {}",
                g.bytes[i], w.bytes[i]
            );
        }
        assert_eq!(
            g.bytes.len(),
            w.bytes.len(),
            "{what}: byte length of {name}"
        );
    }
}

/// Runs the `relayout` binary.
pub fn relayout(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_relayout"))
        .args(args)
        .output()
        .expect("run relayout")
}

/// xorshift64*: deterministic test data, no dependency.
pub struct Rng(pub u64);

impl Rng {
    /// A generator whose state is never zero, from any seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Reference, the CPU, and (when an adapter opens) the GPU with its default chunks and
/// with chunks forced down to 4 KiB, so tensors cross chunk boundaries.
pub fn all_backends() -> Vec<Box<dyn Backend>> {
    #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
    let mut list: Vec<Box<dyn Backend>> = vec![Box::new(Reference), Box::new(Cpu::new())];
    #[cfg(feature = "gpu")]
    for max_chunk_bytes in [None, Some(4096)] {
        let gpu = relayout::backend::gpu::Gpu::new(&{
            let opts = relayout::backend::gpu::GpuOptions::new(None, true);
            match max_chunk_bytes {
                Some(n) => opts.with_max_chunk_bytes(n),
                None => opts,
            }
        });
        if let Some(g) = gpu_or_skip(gpu) {
            list.push(Box::new(g));
        }
    }
    list
}

/// Waits until process `pid` is writing an output in `dir`: a named temporary file
/// (`*.tmp`) exists there, or (Linux) the process holds an unnamed one (`O_TMPFILE`,
/// shown by /proc as `DIR/#INODE (deleted)`). The state is observed, not waited for by
/// time; panics after two minutes.
pub fn wait_until_writing(pid: u32, dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    loop {
        let named = std::fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            })
            .unwrap_or(false);
        let unnamed = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|r| {
                r.flatten().any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|t| {
                        let t = t.to_string_lossy();
                        t.starts_with(&*canonical.to_string_lossy()) && t.ends_with(" (deleted)")
                    })
                })
            })
            .unwrap_or(false);
        if named || unnamed {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} never started writing in {}",
            dir.display()
        );
        std::thread::yield_now();
    }
}

/// Writes a safetensors checkpoint of `n` f32 (1024, 1024) matrices (4 MiB each) of
/// random bytes, generated and written one matrix at a time.
pub fn big_input(path: &Path, n: usize) {
    use relayout::writer::{HeaderEntry, SafetensorsWriter};
    let header: Vec<HeaderEntry> = (0..n)
        .map(|i| HeaderEntry::new(format!("layer{i}.weight"), DType::F32, vec![1024, 1024]))
        .collect();
    let mut w =
        SafetensorsWriter::create(path, &header, &BTreeMap::new(), false).expect("create input");
    let mut rng = Rng::new(5);
    for _ in &header {
        w.write(&rng.bytes(4 << 20)).expect("write input");
    }
    w.finish().expect("finish input");
}

/// Whether the GPU tests must run: `RELAYOUT_REQUIRE_GPU=1` (CI, device checks). Any
/// other value, or none, lets them skip where no adapter opens.
pub fn gpu_required() -> bool {
    std::env::var("RELAYOUT_REQUIRE_GPU").as_deref() == Ok("1")
}

/// The one GPU gate: what opening a GPU gave, or `None` (the caller skips, with a note)
/// when it failed; a failure when [`gpu_required`].
pub fn gpu_or_skip<T, E: std::fmt::Display>(opened: Result<T, E>) -> Option<T> {
    match opened {
        Ok(gpu) => Some(gpu),
        Err(e) if gpu_required() => panic!("RELAYOUT_REQUIRE_GPU=1 but no GPU opened: {e}"),
        Err(e) => {
            eprintln!("no GPU, skipping: {e}");
            None
        }
    }
}

/// Writes `tensors` (name, dtype, shape) as a safetensors file of random bytes (NaNs,
/// infinities and subnormals included).
pub fn random_checkpoint(path: &Path, tensors: &[(String, DType, Vec<usize>)], seed: u64) {
    let entries: Vec<HeaderEntry> = tensors
        .iter()
        .map(|(n, d, s)| HeaderEntry::new(n.clone(), *d, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &entries, &BTreeMap::new(), true).unwrap();
    let mut rng = Rng::new(seed);
    for e in &entries {
        w.write(&rng.bytes(e.bytes())).unwrap();
    }
    w.finish().unwrap();
}
