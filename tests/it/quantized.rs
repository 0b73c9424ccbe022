//! Quantized output (`--quantize`): every backend gives the oracle's bytes (the
//! reference backend quantizes with `Quant::quantize`, itself checked against
//! `mx.quantize`'s recorded output) at every band size, mode, dtype and layout (a
//! transposed source, stacked experts); the files keep every tensor aligned, odd
//! one-byte scales included, sharded or not, by workers or not; the flags mlx-lm users
//! type are refused with the reason; the rule language's `quantize` key lands in
//! `config.json`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::common::*;
use relayout::{
    open_and_plan, ConvertSpec, Converter, DType, Plan, QuantMode, QuantizeOptions, Recipe,
};
use serde_json::{json, Value};

/// A Llama-shaped folder (2 layers) whose vocabulary of 37 gives the embedding an odd
/// number of 32-groups (74, so its one-byte MX scales are not whole words), whose
/// down_proj rows (96) are not whole 64-groups, plus one Mixtral-style layer of
/// experts written as a second family when `experts` is set. Values are random bits:
/// NaNs, infinities and subnormals included.
fn llama(dir: &Path, dtype: DType) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (vocab, hidden, ff) = (37, 64, 96);
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![vocab, hidden]),
        ("model.norm.weight".to_string(), vec![hidden]),
        ("lm_head.weight".to_string(), vec![vocab, hidden]),
    ];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj", vec![hidden, hidden]),
            ("self_attn.k_proj", vec![32, hidden]),
            ("self_attn.v_proj", vec![32, hidden]),
            ("self_attn.o_proj", vec![hidden, hidden]),
            ("mlp.gate_proj", vec![ff, hidden]),
            ("mlp.up_proj", vec![ff, hidden]),
            ("mlp.down_proj", vec![hidden, ff]),
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
        ] {
            t.push((format!("{p}.{n}.weight"), s));
        }
    }
    write_checkpoint(&dir.join("model.safetensors"), &t, dtype, 11);
    let config = json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "tie_word_embeddings": false,
        "torch_dtype": dtype.numpy_name(),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

/// A Mixtral-shaped folder: one layer of 3 experts (w1/w3 (64, 32), w2 (32, 64)).
fn mixtral(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![40, 32]),
        ("model.norm.weight".to_string(), vec![32]),
        ("lm_head.weight".to_string(), vec![40, 32]),
        (
            "model.layers.0.block_sparse_moe.gate.weight".to_string(),
            vec![3, 32],
        ),
        (
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            vec![32, 32],
        ),
    ];
    for e in 0..3 {
        let x = format!("model.layers.0.block_sparse_moe.experts.{e}");
        t.push((format!("{x}.w1.weight"), vec![64, 32]));
        t.push((format!("{x}.w2.weight"), vec![32, 64]));
        t.push((format!("{x}.w3.weight"), vec![64, 32]));
    }
    write_checkpoint(&dir.join("model.safetensors"), &t, DType::BF16, 5);
    let config = json!({
        "model_type": "mixtral",
        "num_hidden_layers": 1,
        "num_local_experts": 3,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

/// [`random_checkpoint`] of one dtype.
fn write_checkpoint(path: &Path, tensors: &[(String, Vec<usize>)], dtype: DType, seed: u64) {
    let typed: Vec<(String, DType, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s)| (n.clone(), dtype, s.clone()))
        .collect();
    random_checkpoint(path, &typed, seed);
}

/// Every output tensor of the plan, converted by `backend` at `band` bytes per call.
fn fill(
    ckpt: &relayout::Checkpoint,
    plan: &Plan,
    backend: &dyn relayout::Backend,
    band: usize,
) -> BTreeMap<String, Tensor> {
    let outputs: Vec<_> = plan.entries().iter().flat_map(|e| e.outputs()).collect();
    let mut bufs: Vec<Vec<u8>> = outputs
        .iter()
        .map(|t| vec![0xA5; t.shape.iter().product::<usize>() * t.dtype.size()])
        .collect();
    let mut dsts: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    Converter::new(ckpt, plan, backend)
        .with_band_bytes(band)
        .fill(&mut dsts, &mut |_| {})
        .unwrap();
    outputs
        .into_iter()
        .zip(bufs)
        .map(|(t, bytes)| {
            let tensor = Tensor {
                dtype: st_dtype_name(t.dtype),
                shape: t.shape,
                bytes,
            };
            (t.name, tensor)
        })
        .collect()
}

fn spec(q: QuantizeOptions, dtype: Option<&str>) -> ConvertSpec {
    let spec = ConvertSpec::new().preset("mlx-lm").quantize(Some(q));
    match dtype {
        Some(d) => spec.dtype_name(d).unwrap(),
        None => spec,
    }
}

fn options(mode: QuantMode, bits: Option<u32>, group: Option<usize>) -> QuantizeOptions {
    QuantizeOptions {
        mode,
        bits,
        group_size: group,
        recipe: None,
    }
}

/// Transposes one projection and keeps its name: the quantization then reads a strided
/// source, fused with the gather.
const TRANSPOSE_RULES: &str = r#"
[[rule]]
name = "transposed"
tensor = "model.layers.{layer}.mlp.up_proj.weight"
perm = [1, 0]
target = "{name}"
"#;

#[test]
fn quantized_tensors_equal_the_oracle_on_every_backend_band_mode_and_dtype() {
    let dir = scratch("quantized-grid");
    let f32_model = llama(&dir.join("f32"), DType::F32);
    let bf16_model = llama(&dir.join("bf16"), DType::BF16);
    let moe = mixtral(&dir.join("moe"));
    let rules = dir.join("transpose.toml");
    std::fs::write(&rules, TRANSPOSE_RULES).unwrap();
    let cases = [
        (options(QuantMode::Affine, None, None), None),
        (options(QuantMode::Affine, Some(3), Some(32)), Some("bf16")),
        (options(QuantMode::Affine, Some(8), Some(32)), Some("f16")),
        (options(QuantMode::Affine, Some(1), Some(32)), None),
        (options(QuantMode::Affine, Some(5), Some(64)), Some("bf16")),
        (options(QuantMode::Mxfp4, None, None), None),
        (options(QuantMode::Mxfp8, None, None), Some("bf16")),
        (options(QuantMode::Nvfp4, None, None), Some("f16")),
        (
            QuantizeOptions {
                recipe: Some(Recipe::Mixed3_6),
                group_size: Some(32),
                ..Default::default()
            },
            None,
        ),
    ];
    let backends = all_backends();
    let mut quantized = 0;
    for (k, (q, dtype)) in cases.iter().enumerate() {
        for (model, with_rules) in [(&f32_model, false), (&bf16_model, true), (&moe, false)] {
            let mut s = spec(*q, *dtype);
            if with_rules {
                s = s.rule_file(&rules);
            }
            let (ckpt, plan) = open_and_plan(model, &s).unwrap();
            quantized += plan
                .entries()
                .iter()
                .filter(|e| e.quant().is_some())
                .count();
            let want = fill(
                &ckpt,
                &plan,
                &relayout::backend::reference::Reference,
                1 << 20,
            );
            for b in &backends {
                for band in [1, 96, 4096, 1 << 20] {
                    let got = fill(&ckpt, &plan, b.as_ref(), band);
                    let what = format!(
                        "case {k} {} on {} at band {band}",
                        model.display(),
                        b.name()
                    );
                    assert_same_tensors(&got, &want, &what);
                }
            }
        }
    }
    assert!(quantized > 100, "the grid quantizes {quantized} tensors");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The safetensors header of `path`: (name, dtype, start offset in the data).
fn offsets(path: &Path) -> Vec<(String, String, usize)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "{}: header not padded to 8", path.display());
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            (
                k.clone(),
                v["dtype"].as_str().unwrap().to_string(),
                v["data_offsets"][0].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn elem_size(st_dtype: &str) -> usize {
    match st_dtype {
        "F64" | "I64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" => 2,
        _ => 1,
    }
}

/// Every tensor of every `model*.safetensors` in `dir`, each checked to start at a
/// multiple of its element size.
fn aligned_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut all = BTreeMap::new();
    for name in listing(dir) {
        if !(name.starts_with("model") && name.ends_with(".safetensors")) {
            continue;
        }
        let path = dir.join(&name);
        for (t, dtype, at) in offsets(&path) {
            assert_eq!(
                at % elem_size(&dtype),
                0,
                "{name}: {t} ({dtype}) starts at {at}"
            );
        }
        all.extend(load_safetensors(&path));
    }
    all
}

fn run(args: &[&OsStr]) -> (bool, String) {
    let out = relayout(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn quantized_files_keep_every_tensor_aligned_in_one_file_shards_and_workers() {
    let dir = scratch("quantized-files");
    let model = llama(&dir.join("hf"), DType::F32);
    for (mode, dtype) in [
        ("mxfp8", "bf16"),
        ("mxfp4", "f32"),
        ("affine", "f16"),
        ("nvfp4", "bf16"),
    ] {
        let q = options(QuantMode::parse(mode).unwrap(), None, None);
        let (ckpt, plan) = open_and_plan(&model, &spec(q, Some(dtype))).unwrap();
        let want = fill(
            &ckpt,
            &plan,
            &relayout::backend::reference::Reference,
            1 << 20,
        );
        if mode == "mxfp8" {
            // 37 rows of two groups: 74 one-byte scales, not whole words.
            assert_eq!(want["model.embed_tokens.scales"].bytes.len(), 74);
        }
        let common = [
            "convert",
            "--preset",
            "mlx-lm",
            "--device",
            "cpu",
            "--quantize",
            "--q-mode",
            mode,
            "--dtype",
            dtype,
            "-q",
        ];
        for (tag, extra) in [
            ("one", vec![]),
            ("shards", vec!["--max-shard-size", "20KB"]),
            ("tiny-shards", vec!["--max-shard-size", "1"]),
        ] {
            let out = dir.join(format!("{mode}-{tag}"));
            let mut args: Vec<&OsStr> = common.iter().map(OsStr::new).collect();
            args.insert(1, model.as_os_str());
            args.insert(2, out.as_os_str());
            args.extend(extra.iter().map(OsStr::new));
            let (ok, err) = run(&args);
            assert!(ok, "{mode} {tag}: {err}");
            let got = aligned_tensors(&out);
            let plain: BTreeMap<String, Tensor> = got.into_iter().collect();
            assert_same_tensors(&plain, &want, &format!("{mode} {tag}"));
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(config["quantization"], config["quantization_config"]);
            assert_eq!(config["quantization"]["mode"], mode);
        }
        // Two workers, then the index: the same tensors.
        let out = dir.join(format!("{mode}-workers"));
        for w in ["0/2", "1/2"] {
            let mut args: Vec<&OsStr> = common.iter().map(OsStr::new).collect();
            args.insert(1, model.as_os_str());
            args.insert(2, out.as_os_str());
            args.extend(["--max-shard-size", "20KB", "--shard", w].map(OsStr::new));
            let (ok, err) = run(&args);
            assert!(ok, "{mode} worker {w}: {err}");
        }
        assert!(out.join("model.safetensors.index.json").exists());
        assert_same_tensors(&aligned_tensors(&out), &want, &format!("{mode} workers"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quantization_flags_are_refused_before_any_work_with_the_reason() {
    let dir = scratch("quantized-refusals");
    let model = llama(&dir.join("hf"), DType::F32);
    let out = dir.join("out");
    let cases: [(&[&str], &[&str]); 9] = [
        (
            &["--q-bits", "4"],
            &["--q-bits", "--quantize", "-q is --quiet"],
        ),
        (
            &["--quant-predicate", "mixed_3_6"],
            &["--quant-predicate", "--quantize"],
        ),
        (
            &["--quantize", "--q-bits", "7"],
            &["affine", "[1, 2, 3, 4, 5, 6, 8]", "7"],
        ),
        (
            &["--quantize", "--q-group-size", "48"],
            &["[32, 64, 128]", "48"],
        ),
        (
            &["--quantize", "--q-mode", "mxfp4", "--q-bits", "8"],
            &["mxfp4", "group size 32 and 4 bits"],
        ),
        (
            &["--quantize", "--q-mode", "nvfp4", "--q-group-size", "32"],
            &["nvfp4", "16"],
        ),
        (
            &["--quantize", "--q-mode", "int4"],
            &["int4", "affine, mxfp4, nvfp4, mxfp8"],
        ),
        (
            &[
                "--quantize",
                "--q-mode",
                "mxfp8",
                "--quant-predicate",
                "mixed_3_6",
            ],
            &[
                "mixed_3_6",
                "affine",
                "Quant predicates only support 'affine' quantization.",
            ],
        ),
        (
            &["--quantize", "--quant-predicate", "mixed_9_9"],
            &["mixed_9_9", "mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6"],
        ),
    ];
    for (flags, needles) in cases {
        for cmd in ["convert", "plan"] {
            let mut args: Vec<&OsStr> = vec![OsStr::new(cmd), model.as_os_str()];
            if cmd == "convert" {
                args.push(out.as_os_str());
            }
            args.extend(["--preset", "mlx-lm"].map(OsStr::new));
            args.extend(flags.iter().map(OsStr::new));
            let (ok, err) = run(&args);
            assert!(!ok, "{flags:?} was accepted");
            for n in needles {
                assert!(err.contains(n), "{flags:?}: '{n}' not in: {err}");
            }
            assert!(!err.contains("panicked"), "{err}");
            assert!(!out.exists(), "{flags:?} left {}", out.display());
        }
    }
    // --quantize takes the mlx-lm preset only.
    let (ok, err) = run(&[
        OsStr::new("convert"),
        model.as_os_str(),
        out.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx"),
        OsStr::new("--quantize"),
    ]);
    assert!(
        !ok && err.contains("mlx-lm") && err.contains("'mlx'"),
        "{err}"
    );
    assert!(!out.exists());
    // A recipe on a model without down_proj (GPT-2) fails as mlx-lm's does.
    let gpt2 = dir.join("gpt2");
    std::fs::create_dir_all(&gpt2).unwrap();
    let mut t = vec![
        ("h.0.ln_1.weight".to_string(), vec![32]),
        ("h.0.attn.c_attn.weight".to_string(), vec![32, 96]),
        ("h.0.attn.c_proj.weight".to_string(), vec![32, 32]),
        ("h.0.mlp.c_fc.weight".to_string(), vec![32, 128]),
        ("h.0.mlp.c_proj.weight".to_string(), vec![128, 32]),
    ];
    t.push(("wte.weight".to_string(), vec![40, 32]));
    write_checkpoint(&gpt2.join("model.safetensors"), &t, DType::F32, 3);
    let config = json!({"model_type": "gpt2", "n_layer": 1, "tie_word_embeddings": true});
    std::fs::write(gpt2.join("config.json"), config.to_string()).unwrap();
    let (ok, err) = run(&[
        OsStr::new("plan"),
        gpt2.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx-lm"),
        OsStr::new("--quantize"),
        OsStr::new("--quant-predicate"),
        OsStr::new("mixed_3_4"),
    ]);
    assert!(
        !ok && err.contains("Model does not have expected keys for mixed quant."),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A user's predicate in the rule language: one projection left whole, one at 8 bits.
const PREDICATE_RULES: &str = r#"
[[rule]]
name = "whole-q"
tensor = "model.layers.{layer}.self_attn.q_proj.weight"
target = "{name}"
quantize = false

[[rule]]
name = "wide-v"
tensor = "model.layers.{layer}.self_attn.v_proj.weight"
target = "{name}"
quantize = { bits = 8, group_size = 32 }
"#;

#[test]
fn the_rule_languages_quantize_key_is_the_predicate_config_json_records() {
    let dir = scratch("quantized-rules");
    let model = llama(&dir.join("hf"), DType::F32);
    let rules = dir.join("predicate.toml");
    std::fs::write(&rules, PREDICATE_RULES).unwrap();
    let s = spec(QuantizeOptions::default(), None).rule_file(&rules);
    let (_, plan) = open_and_plan(&model, &s).unwrap();
    let q = plan.quantization().unwrap();
    assert_eq!(q["group_size"], 64);
    assert_eq!(q["bits"], 4);
    assert_eq!(q["mode"], "affine");
    for l in 0..2 {
        let v = format!("model.layers.{l}.self_attn.v_proj");
        assert_eq!(q[&v], json!({"bits": 8, "group_size": 32}));
        assert!(q
            .get(format!("model.layers.{l}.self_attn.q_proj"))
            .is_none());
    }
    let by_target = |t: &str| plan.entries().iter().find(|e| e.target() == t).unwrap();
    let q0 = by_target("model.layers.0.self_attn.q_proj.weight");
    assert!(q0.quant().is_none());
    assert!(
        q0.kept_whole().unwrap().contains("quantize = false"),
        "{:?}",
        q0.kept_whole()
    );
    let down = by_target("model.layers.0.mlp.down_proj.weight");
    assert!(down.quant().is_none());
    assert!(down
        .kept_whole()
        .unwrap()
        .contains("96 is not a multiple of the group size 64"));
    let v0 = by_target("model.layers.0.self_attn.v_proj.weight");
    assert_eq!(
        (v0.quant().unwrap().bits(), v0.quant().unwrap().group_size()),
        (8, 32)
    );
    let names: Vec<String> = v0.outputs().into_iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.v_proj.scales",
            "model.layers.0.self_attn.v_proj.biases"
        ]
    );
    // plan shows the op and why a weight stays whole; plan --json carries both.
    let out = relayout(&[
        OsStr::new("plan"),
        model.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx-lm"),
        OsStr::new("-r"),
        rules.as_os_str(),
        OsStr::new("--quantize"),
        OsStr::new("--json"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(&report["quantization"], q);
    let row = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["target"] == "model.layers.1.self_attn.v_proj.weight")
        .unwrap();
    assert_eq!(
        row["quantize"],
        json!({"mode": "affine", "bits": 8, "group_size": 32})
    );
    assert_eq!(row["quant_config"], json!({"bits": 8, "group_size": 32}));
    assert_eq!(row["outputs"][0]["dtype"], "U32");
    let text = relayout(&[
        OsStr::new("plan"),
        model.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx-lm"),
        OsStr::new("-r"),
        rules.as_os_str(),
        OsStr::new("--quantize"),
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("quantize affine 8-bit g32 [wide-v]"),
        "{text}"
    );
    assert!(
        text.contains("(left whole: rule 'whole-q' sets quantize = false)"),
        "{text}"
    );
    // A bad quantize key is a rules error naming the rule.
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"x\"\ntarget = \"{name}\"\nquantize = { bits = 7 }\n",
    )
    .unwrap();
    let err = open_and_plan(&model, &s).unwrap_err().to_string();
    assert!(err.contains("x") && err.contains("bits"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Hostile f32 values as bits: NaNs of both signs and several payloads, infinities,
/// subnormals, zeros of both signs, the largest finite values, equal runs, values whose
/// differences round at a tie, and plain weights, in runs of 16 so whole groups of one
/// kind occur too.
fn hostile_f32(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n * 4);
    let mut kind = 0;
    for i in 0..n {
        if i % 16 == 0 {
            kind = rng.below(9);
        }
        let r = rng.next();
        let plain = f32::from_bits(0x3800_0000 | (r as u32 & 0x007F_FFFF))
            * if r & 1 << 40 != 0 { -1.0 } else { 1.0 };
        let v: u32 = match (kind, r % 211) {
            (_, 0) => 0x7FC0_0000 | (r >> 32) as u32 & 0x003F_FFFF,
            (_, 1) => 0xFF80_0001 | (r >> 32) as u32 & 0x003F_FFFF,
            (_, 2) => 0x7F80_0000,
            (_, 3) => 0xFF80_0000,
            (0, _) => 0x3E80_0000,
            (1, _) => [0, 0x8000_0000][(r >> 33) as usize & 1],
            (2, _) => (r >> 20) as u32 & 0x807F_FFFF,
            (3, _) => 0x7F7F_FFFF ^ ((r >> 31) as u32 & 0x8000_0001),
            (4, _) if r % 7 == 0 => 0x4700_0000,
            (5, _) => [0, 0x8000_0000, 0x3F80_0000][(r >> 33) as usize % 3],
            // ±(1 + a few ulps): extremes whose difference is a tie to round.
            (6, _) => 0x3F80_0000 | (r >> 32) as u32 & 0x8000_0007,
            _ => plain.to_bits(),
        };
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The GPU's quantize kernel (and the CPU's fast path) against the oracle, byte for
/// byte, for every affine bit width and group size, f32/f16/bf16 values (the 16-bit ones
/// made by the gather's own cast), row-major and transposed, over group counts that cross
/// the words of a group, the 256 groups of a workgroup and the chunks of a band.
#[test]
fn the_quantize_kernels_give_the_oracles_bytes_over_a_hostile_grid() {
    use relayout::layout::cast::Cast;
    use relayout::layout::quant::{Quant, QuantMode, Quantize, AFFINE_BITS, AFFINE_GROUP_SIZES};
    use relayout::Gather;
    let reference = relayout::backend::reference::Reference;
    let backends = all_backends();
    let mut checked = 0;
    for (i, &g) in AFFINE_GROUP_SIZES.iter().enumerate() {
        for &bits in &AFFINE_BITS {
            for (j, groups) in [1usize, 3, 255, 257, 600].into_iter().enumerate() {
                let src = hostile_f32(groups * g, (i * 100 + j) as u64 + u64::from(bits));
                for (dtype, transposed) in [
                    (DType::F32, false),
                    (DType::BF16, false),
                    (DType::F16, true),
                    (DType::F32, true),
                ] {
                    let q = Quant::new(QuantMode::Affine, Some(bits), Some(g)).unwrap();
                    let op = Quantize::new(q, dtype).unwrap();
                    let cast = Cast::new(DType::F32, dtype).unwrap();
                    let n = groups * g;
                    // Transposed: the (cols, rows) source read column by column.
                    let (rows, cols) = if groups % 3 == 0 {
                        (3, n / 3)
                    } else {
                        (groups, g)
                    };
                    let gather = if transposed {
                        Gather::from_parts(4, vec![rows, cols], vec![1, rows], 0)
                    } else {
                        Gather::from_parts(4, vec![rows, cols], vec![cols, 1], 0)
                    };
                    let run = |b: &dyn relayout::Backend| {
                        let mut outs: Vec<Vec<u8>> = (0..op.output_count())
                            .map(|k| vec![0xA5; op.output_bytes(k, n).unwrap()])
                            .collect();
                        let mut dsts: Vec<&mut [u8]> =
                            outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                        b.gather_quantize(&gather, cast, &op, &src, &mut dsts)
                            .unwrap();
                        outs
                    };
                    let want = run(&reference);
                    for b in &backends {
                        let got = run(b.as_ref());
                        for (k, (x, y)) in got.iter().zip(&want).enumerate() {
                            if let Some(at) = x.iter().zip(y).position(|(a, b)| a != b) {
                                panic!(
                                    "{}: g{g} b{bits} x{groups} {dtype} transposed={transposed}: output {k} differs at byte {at}",
                                    b.name()
                                );
                            }
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3 * 7 * 5 * 4);
}

/// Groups where multiplying by the scale's reciprocal rounds to another code than the
/// division does (found by searching with NumPy's f32): the GPU's fast path must notice
/// them and take the exact one.
#[test]
fn codes_where_the_reciprocal_rounds_otherwise_are_the_divisions() {
    use relayout::layout::quant::{Quant, QuantMode, Quantize};
    use relayout::Gather;
    let pairs: [(u32, u32); 8] = [
        (0x3f9e09e5, 0x3e9875f8),
        (0x3dc6d0d6, 0x3d9ea9ac),
        (0x3f8869c5, 0x3cde8a46),
        (0x3f29d3a5, 0x3ef869c9),
        (0x3c366d27, 0x3bc07123),
        (0x3f7f93ab, 0x3e9153f7),
        (0x3f8f1498, 0x3eef074c),
        (0x3fbf320f, 0x3d89f5ea),
    ];
    // One group of 32 per pair: 0 and M set the scale (M / -255, bias M), then x.
    let mut src = Vec::new();
    for (m, x) in pairs {
        src.extend_from_slice(&0u32.to_le_bytes());
        src.extend_from_slice(&m.to_le_bytes());
        for _ in 0..30 {
            src.extend_from_slice(&x.to_le_bytes());
        }
    }
    let q = Quant::new(QuantMode::Affine, Some(8), Some(32)).unwrap();
    let op = Quantize::new(q, DType::F32).unwrap();
    let g = Gather::from_parts(4, vec![pairs.len(), 32], vec![32, 1], 0);
    let run = |b: &dyn relayout::Backend| {
        let mut outs: Vec<Vec<u8>> = (0..3)
            .map(|k| vec![0xA5; op.output_bytes(k, 32 * pairs.len()).unwrap()])
            .collect();
        let mut dsts: Vec<&mut [u8]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        b.gather_quantize(&g, None, &op, &src, &mut dsts).unwrap();
        outs
    };
    let want = run(&relayout::backend::reference::Reference);
    for b in all_backends() {
        assert_eq!(run(b.as_ref()), want, "{}", b.name());
    }
}
