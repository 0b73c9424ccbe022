//! Readers, converter, writer and CLI on the shipped fixtures.

use std::ffi::OsStr;
use std::path::Path;

use crate::common::*;
use relayout::backend::reference::Reference;
use relayout::backend::Backend;
use relayout::{
    convert, BackendOptions, Checkpoint, ConvertSpec, Converter, Device, Error, OpenOptions,
    RuleSet, WriteOptions,
};

fn cpu_spec(preset: &str) -> ConvertSpec {
    ConvertSpec::new().preset(preset).device(Device::Cpu)
}

#[test]
fn every_reader_matches_its_expected_twin() {
    let cases = [
        ("small_cnn.safetensors", "small_cnn.expected.safetensors"),
        ("mixed.safetensors", "mixed.expected.safetensors"),
        ("sharded", "sharded.expected.safetensors"),
        (
            "sharded/model.safetensors.index.json",
            "sharded.expected.safetensors",
        ),
        ("small_cnn.pt", "small_cnn.expected.safetensors"),
        ("mixed.pt", "mixed.expected.safetensors"),
        ("dtypes_views.pt", "dtypes_views.expected.safetensors"),
        (
            "nested_checkpoint.pt",
            "nested_checkpoint.expected.safetensors",
        ),
        ("pytorch_model.bin", "pytorch_model.expected.safetensors"),
        ("legacy_format.pt", "legacy_format.expected.safetensors"),
    ];
    for (input, expected) in cases {
        let ckpt = Checkpoint::open(fixture(input)).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_same_tensors(
            &materialise(&ckpt),
            &load_safetensors(&fixture(expected)),
            input,
        );
    }
}

#[test]
fn pt_and_safetensors_readers_give_the_same_tensors() {
    let pt = Checkpoint::open(fixture("small_cnn.pt")).unwrap();
    let st = Checkpoint::open(fixture("small_cnn.safetensors")).unwrap();
    assert_same_tensors(&materialise(&pt), &materialise(&st), "small_cnn");
}

#[test]
fn nested_checkpoint_state_dict_is_found_by_key_and_automatically() {
    let want = load_safetensors(&fixture("nested_checkpoint.expected.safetensors"));
    let by_key = Checkpoint::open_with(
        fixture("nested_checkpoint.pt"),
        &OpenOptions {
            key: Some("model".to_string()),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_same_tensors(&materialise(&by_key), &want, "--key model");
    let err = Checkpoint::open_with(
        fixture("nested_checkpoint.pt"),
        &OpenOptions {
            key: Some("nope".to_string()),
            ..OpenOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::NoStateDict { .. }), "{err}");
    assert!(err.to_string().contains("model"), "{err}");
}

#[test]
fn flax_preset_reproduces_the_numpy_reference_byte_for_byte() {
    let dir = scratch("flax");
    for (input, want) in [
        ("small_cnn.pt", "small_cnn.flax.safetensors"),
        ("small_cnn.safetensors", "small_cnn.flax.safetensors"),
        ("mixed.pt", "mixed.flax.safetensors"),
        ("mixed.safetensors", "mixed.flax.safetensors"),
    ] {
        let out = dir.join(format!("{input}.out.safetensors"));
        let report = convert(fixture(input), &out, &cpu_spec("flax"), &mut |_| {})
            .unwrap_or_else(|e| panic!("{input}: {e}"));
        let got = load_safetensors(&out);
        assert_eq!(report.tensors(), got.len());
        assert_same_tensors(&got, &load_safetensors(&fixture(want)), input);
    }
    // The sharded fixture has no flax twin: it must convert like its one-file twin.
    let sharded = dir.join("sharded.out.safetensors");
    let single = dir.join("single.out.safetensors");
    convert(fixture("sharded"), &sharded, &cpu_spec("flax"), &mut |_| {}).unwrap();
    let twin = fixture("sharded.expected.safetensors");
    convert(twin, &single, &cpu_spec("flax"), &mut |_| {}).unwrap();
    assert_same_tensors(
        &load_safetensors(&sharded),
        &load_safetensors(&single),
        "sharded",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn output_keeps_source_metadata_and_records_provenance() {
    let dir = scratch("meta");
    let out = dir.join("out.safetensors");
    convert(
        fixture("mixed.safetensors"),
        &out,
        &cpu_spec("mlx"),
        &mut |_| {},
    )
    .unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    let prov: serde_json::Value = serde_json::from_str(&meta["relayout"]).unwrap();
    assert_eq!(prov["preset"], "mlx");
    assert_eq!(prov["version"], env!("CARGO_PKG_VERSION"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn band_size_does_not_change_the_output() {
    let ckpt = Checkpoint::open(fixture("small_cnn.pt")).unwrap();
    let plan = RuleSet::preset("flax")
        .unwrap()
        .plan(ckpt.tensors())
        .unwrap();
    let dir = scratch("bands");
    let whole = dir.join("whole.safetensors");
    Converter::new(&ckpt, &plan, &Reference)
        .write_safetensors(&whole, &WriteOptions::default(), &mut |_| {})
        .unwrap();
    let want = std::fs::read(&whole).unwrap();
    // Bands of one element, of odd sizes straddling rows, and of exactly one row of the
    // largest conv, all take the splitting path.
    for band in [1, 3, 4, 7, 64, 100, 1000, 4096, 1 << 20] {
        let out = dir.join(format!("band{band}.safetensors"));
        let cpu = relayout::backend::cpu::Cpu::new();
        Converter::new(&ckpt, &plan, &cpu)
            .with_band_bytes(band)
            .write_safetensors(&out, &WriteOptions::default(), &mut |_| {})
            .unwrap();
        assert!(std::fs::read(&out).unwrap() == want, "band {band}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn streaming_api_hands_out_the_same_tensors_as_the_file() {
    let ckpt = Checkpoint::open(fixture("mixed.pt")).unwrap();
    let plan = RuleSet::preset("flax")
        .unwrap()
        .plan(ckpt.tensors())
        .unwrap();
    let mut got = std::collections::BTreeMap::new();
    Converter::new(&ckpt, &plan, &Reference)
        .with_band_bytes(5)
        .for_each(|entry, bytes| {
            got.insert(
                entry.target().to_string(),
                Tensor {
                    dtype: st_dtype_name(entry.dtype()),
                    shape: entry.target_shape().to_vec(),
                    bytes: bytes.to_vec(),
                },
            );
            Ok(())
        })
        .unwrap();
    assert_same_tensors(
        &got,
        &load_safetensors(&fixture("mixed.flax.safetensors")),
        "stream",
    );
}

#[test]
fn progress_reaches_every_tensor_and_byte() {
    let dir = scratch("progress");
    let mut last = relayout::Progress::default();
    let mut calls = 0;
    convert(
        fixture("small_cnn.safetensors"),
        dir.join("o.safetensors"),
        &cpu_spec("flax"),
        &mut |p| {
            assert!(p.bytes_done() >= last.bytes_done() && p.tensors_done() >= last.tensors_done());
            last = p;
            calls += 1;
        },
    )
    .unwrap();
    assert!(calls > last.tensors_total());
    assert_eq!(last.tensors_done(), last.tensors_total());
    assert_eq!(last.bytes_done(), last.bytes_total());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A backend that fails after `ok` calls, to check that failures leave nothing behind.
struct FailAfter {
    ok: std::sync::atomic::AtomicUsize,
}

impl Backend for FailAfter {
    fn name(&self) -> String {
        "fail-after".to_string()
    }
    fn gather(&self, g: &relayout::Gather, src: &[u8], dst: &mut [u8]) -> relayout::Result<()> {
        self.spend()?;
        Reference.gather(g, src, dst)
    }
    fn gather_cast(
        &self,
        g: &relayout::Gather,
        cast: relayout::layout::Cast,
        src: &[u8],
        dst: &mut [u8],
    ) -> relayout::Result<()> {
        self.spend()?;
        Reference.gather_cast(g, cast, src, dst)
    }
}

impl FailAfter {
    fn spend(&self) -> relayout::Result<()> {
        let left = self.ok.load(std::sync::atomic::Ordering::SeqCst);
        if left == 0 {
            return Err(Error::Gpu {
                detail: "device lost (simulated)".to_string(),
            });
        }
        self.ok.store(left - 1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn a_failure_mid_run_leaves_no_output_and_no_temporary_file() {
    let ckpt = Checkpoint::open(fixture("small_cnn.pt")).unwrap();
    let plan = RuleSet::preset("flax")
        .unwrap()
        .plan(ckpt.tensors())
        .unwrap();
    let dir = scratch("midfail");
    for ok in [0, 1, 5, 20] {
        let backend = FailAfter {
            ok: std::sync::atomic::AtomicUsize::new(ok),
        };
        let err = Converter::new(&ckpt, &plan, &backend)
            .write_safetensors(
                &dir.join("out.safetensors"),
                &WriteOptions::default(),
                &mut |_| {},
            )
            .unwrap_err();
        assert!(err.to_string().contains("device lost"), "{err}");
        assert!(
            listing(&dir).is_empty(),
            "after {ok} calls: {:?}",
            listing(&dir)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn existing_output_is_refused_unless_forced() {
    let dir = scratch("exists");
    let out = dir.join("out.safetensors");
    std::fs::write(&out, b"precious").unwrap();
    let err = convert(
        fixture("mixed.safetensors"),
        &out,
        &cpu_spec("flax"),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::OutputExists { .. }), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let mut spec = cpu_spec("flax");
    spec = spec.force(true);
    convert(fixture("mixed.safetensors"), &out, &spec, &mut |_| {}).unwrap();
    assert_eq!(load_safetensors(&out).len(), 13);
    assert_eq!(listing(&dir), ["out.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn output_that_is_the_input_is_refused_even_with_force() {
    let dir = scratch("same");
    let input = dir.join("m.safetensors");
    std::fs::copy(fixture("mixed.safetensors"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let mut spec = cpu_spec("flax");
    spec = spec.force(true);
    let err = convert(&input, &input, &spec, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::OutputIsInput { .. }), "{err}");
    assert_eq!(std::fs::read(&input).unwrap(), before);
    assert_eq!(listing(&dir), ["m.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn open_err(name: &str) -> Error {
    Checkpoint::open(fixture(name)).expect_err(name)
}

#[test]
fn broken_files_give_their_own_error_naming_the_file() {
    type Check = fn(&Error) -> bool;
    let cases: [(&str, Check); 4] = [
        ("truncated.safetensors", |e| {
            matches!(e, Error::Truncated { .. })
        }),
        ("header_too_large.safetensors", |e| {
            matches!(e, Error::HeaderTooLarge { .. })
        }),
        ("offsets_out_of_range.safetensors", |e| {
            matches!(e, Error::BadTensor { .. })
        }),
        ("not_a_checkpoint.pt", |e| {
            matches!(e, Error::UnknownFormat { .. })
        }),
    ];
    for (name, is_expected) in cases {
        let err = open_err(name);
        assert!(is_expected(&err), "{name}: {err:?}");
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
}

#[test]
fn malicious_pickle_is_refused_and_runs_nothing() {
    let marker = Path::new("/tmp/relayout_pwned");
    let _ = std::fs::remove_file(marker);
    let err = open_err("malicious.pt");
    assert!(
        matches!(&err, Error::ForbiddenGlobal { module, name, .. } if module == "posix" && name == "system"),
        "{err:?}"
    );
    assert!(!marker.exists());
}

#[test]
fn cli_errors_are_one_line_with_nonzero_exit_and_no_output_left() {
    let dir = scratch("cli-errors");
    for name in [
        "truncated.safetensors",
        "header_too_large.safetensors",
        "offsets_out_of_range.safetensors",
        "not_a_checkpoint.pt",
        "malicious.pt",
    ] {
        let out = dir.join("out.safetensors");
        let run = relayout(&[
            OsStr::new("convert"),
            fixture(name).as_os_str(),
            out.as_os_str(),
            OsStr::new("--preset"),
            OsStr::new("flax"),
            OsStr::new("--device"),
            OsStr::new("cpu"),
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{name}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(
            stderr.contains(name) && stderr.starts_with("relayout: error:"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(listing(&dir).is_empty(), "{name}: {:?}", listing(&dir));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_convert_inspect_plan_and_presets_work_end_to_end() {
    let dir = scratch("cli");
    let out = dir.join("cnn.flax.safetensors");
    let run = relayout(&[
        OsStr::new("convert"),
        fixture("small_cnn.pt").as_os_str(),
        out.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("flax"),
        OsStr::new("--device"),
        OsStr::new("cpu"),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary = String::from_utf8_lossy(&run.stdout);
    assert!(
        summary.contains("tensors") && summary.contains("GB/s"),
        "{summary}"
    );
    assert_same_tensors(
        &load_safetensors(&out),
        &load_safetensors(&fixture("small_cnn.flax.safetensors")),
        "cli",
    );

    let run = relayout(&[
        OsStr::new("inspect"),
        fixture("dtypes_views.pt").as_os_str(),
        OsStr::new("--json"),
    ]);
    assert!(run.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let entries = doc["entries"].as_array().unwrap();
    let entry = |n: &str| entries.iter().find(|e| e["name"] == n).unwrap().clone();
    assert_eq!(entry("view.transposed")["contiguous"], false);
    assert_eq!(entry("tied.a")["shares_storage"], true);
    assert_eq!(entry("f32")["shares_storage"], false);

    let run = relayout(&[
        OsStr::new("plan"),
        fixture("small_cnn.pt").as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("flax"),
        OsStr::new("--json"),
    ]);
    assert!(run.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let fc = doc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["source"] == "fc.weight")
        .unwrap()
        .clone();
    assert_eq!(fc["target"], "params.fc.kernel");
    assert_eq!(fc["target_shape"], serde_json::json!([16, 10]));
    assert_eq!(doc["dropped"].as_array().unwrap().len(), 7);

    let run = relayout(&[OsStr::new("presets")]);
    let listed = String::from_utf8_lossy(&run.stdout);
    assert!(listed.contains("flax") && listed.contains("mlx"));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("nnx") && l.contains("Flax NNX")),
        "{listed}"
    );
    let run = relayout(&[
        OsStr::new("presets"),
        OsStr::new("--show"),
        OsStr::new("flax"),
    ]);
    assert!(String::from_utf8_lossy(&run.stdout).contains("running_mean"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A copy of the sharded fixture whose index is rewritten by `edit`.
fn sharded_variant(test: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let dir = scratch(test);
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        std::fs::copy(fixture(&format!("sharded/{f}")), dir.join(f)).unwrap();
    }
    let index = fixture("sharded/model.safetensors.index.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(index).unwrap()).unwrap();
    edit(&mut json);
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

#[test]
fn sharded_checkpoints_are_checked_against_their_weight_map() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing",
            Box::new(|j| {
                j["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors".into();
            }),
            "in no shard",
        ),
        (
            "extra",
            Box::new(|j| {
                j["weight_map"]
                    .as_object_mut()
                    .unwrap()
                    .remove("conv1d.bias");
            }),
            "not in the weight_map",
        ),
        (
            "moved",
            Box::new(|j| {
                j["weight_map"]["conv1d.bias"] = "model-00002-of-00002.safetensors".into();
            }),
            "puts it in",
        ),
        (
            "escape",
            Box::new(|j| {
                j["weight_map"]["conv1d.bias"] = "../model-00001-of-00002.safetensors".into();
            }),
            "not a plain file name",
        ),
        (
            "no-map",
            Box::new(|j| {
                j.as_object_mut().unwrap().remove("weight_map");
            }),
            "weight_map",
        ),
    ];
    for (name, edit, needle) in cases {
        let index = sharded_variant(&format!("shard-{name}"), edit);
        let err = Checkpoint::open(&index).expect_err(name);
        assert!(matches!(err, Error::Shard { .. }), "{name}: {err:?}");
        assert!(err.to_string().contains(needle), "{name}: {err}");
        std::fs::remove_dir_all(index.parent().unwrap()).unwrap();
    }
}

#[test]
fn a_tensor_in_two_shards_is_an_error() {
    let index = sharded_variant("shard-dup", |j| {
        j["weight_map"]["conv1d.bias"] = "copy.safetensors".into();
    });
    let dir = index.parent().unwrap().to_path_buf();
    std::fs::copy(
        dir.join("model-00001-of-00002.safetensors"),
        dir.join("copy.safetensors"),
    )
    .unwrap();
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(err.to_string().contains("two shards"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_folder_needs_exactly_one_index() {
    let dir = scratch("no-index");
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(matches!(err, Error::Shard { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    std::fs::write(dir.join("a.index.json"), "{}").unwrap();
    std::fs::write(dir.join("b.index.json"), "{}").unwrap();
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(err.to_string().contains("2 index files"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_folder_with_one_unsharded_file_is_that_checkpoint() {
    let dir = scratch("single-file-folder");
    let want = materialise(&Checkpoint::open(fixture("small_cnn.pt")).unwrap());
    for (name, from) in [
        ("model.safetensors", "small_cnn.safetensors"),
        ("pytorch_model.bin", "small_cnn.pt"),
    ] {
        let sub = dir.join(name.replace('.', "_"));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::copy(fixture(from), sub.join(name)).unwrap();
        std::fs::write(sub.join("config.json"), "{}").unwrap();
        let ckpt = Checkpoint::open(&sub).unwrap();
        assert_eq!(ckpt.path(), sub.join(name));
        assert_same_tensors(&materialise(&ckpt), &want, name);
    }
    // Both at once is ambiguous.
    let both = dir.join("both");
    std::fs::create_dir_all(&both).unwrap();
    std::fs::copy(
        fixture("small_cnn.safetensors"),
        both.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(fixture("small_cnn.pt"), both.join("pytorch_model.bin")).unwrap();
    let err = Checkpoint::open(&both).unwrap_err();
    assert!(matches!(err, Error::Shard { .. }), "{err:?}");
    assert!(err.to_string().contains("both"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn fifos_are_refused_as_checkpoints_and_as_indexes_without_blocking() {
    let dir = scratch("fifo");
    let fifo = |name: &str| {
        let path = dir.join(name);
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file system entry.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        path
    };
    // Opening a FIFO for reading would block until a writer came: these must not.
    for path in [fifo("model.pt"), fifo("model.safetensors.index.json")] {
        let err = Checkpoint::open(&path).unwrap_err();
        assert!(
            err.to_string().contains("a FIFO, not a regular file"),
            "{}: {err}",
            path.display()
        );
    }
    // The folder's index is the FIFO: refused the same way.
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(err.to_string().contains("a FIFO"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_input_is_an_io_error_naming_it() {
    let err = Checkpoint::open(fixture("does-not-exist.pt")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("does-not-exist.pt"), "{err}");
}

#[test]
fn a_missing_input_names_the_file_and_its_os_error_once() {
    let missing = fixture("nonexist.pt");
    let run = relayout(&[OsStr::new("inspect"), missing.as_os_str()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("nonexist.pt"), "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
}

#[test]
fn unmatched_tensors_fail_the_conversion_unless_allowed() {
    let dir = scratch("unmatched");
    let rules = dir.join("weights-only.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"weights\"\nleaf = \"weight\"\ntarget = \"{name}\"\n",
    )
    .unwrap();
    let out = dir.join("out.safetensors");
    let mut spec = ConvertSpec::new().rule_file(&rules).device(Device::Cpu);
    let err = convert(fixture("mixed.pt"), &out, &spec, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::Unmatched { count: 6, .. }), "{err:?}");
    assert!(!out.exists());
    spec = spec.allow_unmatched(true);
    let report = convert(fixture("mixed.pt"), &out, &spec, &mut |_| {}).unwrap();
    assert_eq!((report.tensors(), report.unmatched()), (7, 6));
    let got = load_safetensors(&out);
    assert!(
        got.keys().all(|k| k.ends_with(".weight")),
        "{:?}",
        got.keys()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn convert_needs_a_preset_or_a_rule_file() {
    let err = convert(
        fixture("mixed.pt"),
        std::env::temp_dir().join("never-written.safetensors"),
        &ConvertSpec::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Rules { .. }), "{err:?}");
    let err = convert(
        fixture("mixed.pt"),
        std::env::temp_dir().join("never-written.safetensors"),
        &cpu_spec("keras2"),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnknownPreset { .. }), "{err:?}");
}

/// True when a GPU adapter is usable; with RELAYOUT_REQUIRE_GPU=1 its absence fails.
#[cfg(feature = "gpu")]
fn gpu_available() -> bool {
    let adapters = relayout::backend::gpu::list_adapters();
    let found = if adapters.is_empty() {
        Err("no adapter found")
    } else {
        Ok(())
    };
    gpu_or_skip(found).is_some()
}

/// Converts `input` with the CLI on `device`, returning the output bytes.
#[cfg(feature = "gpu")]
fn cli_convert(input: &Path, out: &Path, preset: &str, device: &str) -> Vec<u8> {
    let run = relayout(&[
        OsStr::new("convert"),
        input.as_os_str(),
        out.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new(preset),
        OsStr::new("--device"),
        OsStr::new(device),
        OsStr::new("--force"),
        OsStr::new("-q"),
    ]);
    assert!(
        run.status.success(),
        "{device} {}: {}",
        input.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read(out).unwrap()
}

#[cfg(feature = "gpu")]
#[test]
fn gpu_and_cpu_conversions_of_every_fixture_are_byte_identical() {
    if !gpu_available() {
        return;
    }
    let dir = scratch("gpu-vs-cpu");
    for input in [
        "small_cnn.pt",
        "small_cnn.safetensors",
        "mixed.pt",
        "mixed.safetensors",
        "dtypes_views.pt",
        "pytorch_model.bin",
        "sharded",
    ] {
        for preset in ["flax", "mlx"] {
            let cpu = cli_convert(&fixture(input), &dir.join("cpu.safetensors"), preset, "cpu");
            let gpu = cli_convert(&fixture(input), &dir.join("gpu.safetensors"), preset, "gpu");
            assert!(
                cpu == gpu,
                "{input} --preset {preset}: gpu and cpu files differ"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(feature = "gpu")]
#[test]
fn gpu_and_cpu_agree_on_a_tensor_larger_than_a_storage_binding() {
    if !gpu_available() {
        return;
    }
    use relayout::writer::{HeaderEntry, SafetensorsWriter};
    let dir = scratch("gpu-big");
    let input = dir.join("big.safetensors");
    // 137 MiB of f32: above lavapipe's 128 MiB binding limit and the default 128 MiB
    // WebGPU limit, so the GPU must chunk it; odd sizes so no tile divides it.
    let entries = [
        HeaderEntry::new("proj.weight", relayout::DType::F32, vec![5003, 7187]),
        HeaderEntry::new("conv.weight", relayout::DType::BF16, vec![67, 33, 3, 5]),
    ];
    let mut w = SafetensorsWriter::create(&input, &entries, &Default::default(), false).unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for e in &entries {
        let bytes: Vec<u8> = (0..e.bytes())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        w.write(&bytes).unwrap();
    }
    w.finish().unwrap();
    let cpu = cli_convert(&input, &dir.join("cpu.safetensors"), "flax", "cpu");
    let gpu = cli_convert(&input, &dir.join("gpu.safetensors"), "flax", "gpu");
    assert_eq!(cpu.len(), gpu.len());
    if let Some(i) = cpu.iter().zip(&gpu).position(|(a, b)| a != b) {
        panic!("gpu and cpu outputs differ first at byte {i}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_device_and_adapter_are_clear_errors() {
    let run = relayout(&[
        OsStr::new("convert"),
        fixture("mixed.pt").as_os_str(),
        OsStr::new("/tmp/never.safetensors"),
        OsStr::new("--preset"),
        OsStr::new("flax"),
        OsStr::new("--device"),
        OsStr::new("tpu"),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("tpu"));
    let err = relayout::backend::select(&BackendOptions::new(
        Device::Gpu,
        Some("no such adapter 1234".to_string()),
    ))
    .err()
    .expect("an adapter that does not exist");
    assert!(matches!(err, Error::DeviceUnavailable { .. }), "{err:?}");
}

#[test]
fn sharded_pytorch_bin_checkpoints_read_through_their_index() {
    let dir = scratch("shard-bin");
    std::fs::copy(
        fixture("pytorch_model.bin"),
        dir.join("pytorch_model-00001-of-00001.bin"),
    )
    .unwrap();
    let want = load_safetensors(&fixture("pytorch_model.expected.safetensors"));
    let map: serde_json::Map<String, serde_json::Value> = want
        .keys()
        .map(|k| (k.clone(), "pytorch_model-00001-of-00001.bin".into()))
        .collect();
    std::fs::write(
        dir.join("pytorch_model.bin.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": map }).to_string(),
    )
    .unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.format(), relayout::Format::ShardedPyTorch);
    assert_same_tensors(&materialise(&ckpt), &want, "sharded .bin");
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- h4: a headless run prints nothing of the drivers' on stderr ---

/// Runs the CLI without XDG_RUNTIME_DIR, as on a headless server.
fn relayout_headless(args: &[&OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_relayout"))
        .args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run relayout")
}

/// Mesa's device-select Vulkan layer used to print "error: XDG_RUNTIME_DIR is invalid or
/// not set in the environment." while adapters were enumerated, twice per enumeration.
#[test]
fn headless_runs_print_nothing_on_stderr() {
    let run = relayout_headless(&[OsStr::new("devices")]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "devices: {stderr}");
    assert!(stderr.is_empty(), "devices wrote to stderr: {stderr}");

    let dir = scratch("headless");
    let input = fixture("small_cnn.safetensors");
    // The GPU by name too, where one is built in and usable.
    #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
    let mut devices = vec!["auto"];
    #[cfg(feature = "gpu")]
    if gpu_available() {
        devices.push("gpu");
    }
    let mut outputs = Vec::new();
    for device in devices {
        let out = dir.join(format!("{device}.safetensors"));
        let run = relayout_headless(&[
            OsStr::new("convert"),
            input.as_os_str(),
            out.as_os_str(),
            OsStr::new("--preset"),
            OsStr::new("flax"),
            OsStr::new("--device"),
            OsStr::new(device),
            OsStr::new("-q"),
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "convert --device {device}: {stderr}");
        assert!(
            !stderr.contains("XDG_RUNTIME_DIR") && stderr.is_empty(),
            "convert --device {device} -q wrote to stderr: {stderr}"
        );
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert!(
        outputs.windows(2).all(|w| w[0] == w[1]),
        "auto and gpu differ"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GPT-2's Conv1D (c_attn, c_fc) decided by class with the README's module-types file:
/// no name warning, and the same bytes as the conversion without the file.
#[test]
fn gpt2_conv1d_by_module_types_plans_quietly_and_converts_to_the_same_bytes() {
    let dir = scratch("gpt2-conv1d");
    let mut rng = Rng::new(7);
    let tensors: Vec<(&str, Vec<usize>, Vec<u8>)> = [
        ("wte.weight", vec![20, 8]),
        ("h.0.attn.c_attn.weight", vec![8, 24]),
        ("h.0.attn.c_attn.bias", vec![24]),
        ("h.0.mlp.c_fc.weight", vec![8, 32]),
    ]
    .into_iter()
    .map(|(n, s)| {
        let bytes = rng.bytes(s.iter().product::<usize>() * 2);
        (n, s, bytes)
    })
    .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b);
            (n.to_string(), view.unwrap())
        })
        .collect();
    let input = dir.join("gpt2.safetensors");
    safetensors::serialize_to_file(views, None, &input).unwrap();
    let types = dir.join("types.json");
    std::fs::write(
        &types,
        r#"{"": "GPT2Model", "wte": "Embedding", "h.0": "GPT2Block", "h.0.attn": "GPT2Attention",
            "h.0.attn.c_attn": "Conv1D", "h.0.mlp": "GPT2MLP", "h.0.mlp.c_fc": "Conv1D"}"#,
    )
    .unwrap();
    let typed = [OsStr::new("--module-types"), types.as_os_str()];

    let plan = [
        OsStr::new("plan"),
        input.as_os_str(),
        OsStr::new("--preset"),
    ];
    let plan = relayout(&[&plan[..], &[OsStr::new("flax")], &typed].concat());
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(text.contains("conv1d-by-type"), "{text}");
    assert!(!text.contains("warning"), "{text}");

    let mut got = Vec::new();
    for extra in [&[][..], &typed[..]] {
        let out = dir.join(format!("out{}.safetensors", got.len()));
        let mut args = vec![
            OsStr::new("convert"),
            input.as_os_str(),
            out.as_os_str(),
            OsStr::new("--preset"),
            OsStr::new("flax"),
            OsStr::new("--device"),
            OsStr::new("cpu"),
            OsStr::new("-q"),
        ];
        args.extend_from_slice(extra);
        let run = relayout(&args);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        got.push(load_safetensors(&out));
    }
    assert_same_tensors(&got[1], &got[0], "with and without --module-types");
    assert_eq!(got[0]["params.h_0.attn.c_attn.kernel"].shape, vec![24, 8]);
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- end h4 ---
