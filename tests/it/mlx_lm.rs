//! The stack op from the rule language to the bytes on every backend, its plan errors,
//! and the `mlx-lm` preset's handling of config.json: the family by `model_type`, the
//! config's dtype, ties, and hostile configs refused with nothing written.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::common::*;
use relayout::{open_and_plan, ConvertSpec, Converter, DType, Plan};
use serde_json::Value;

/// A Mixtral-shaped folder: `layers` layers of `experts` experts, each expert's w1/w3
/// (ff, hidden) and w2 (hidden, ff), plus attention and norms.
fn mixtral(dir: &Path, layers: usize, experts: usize, config: Value, dtype: DType) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (hidden, ff) = (24, 40);
    let mut t = vec![
        (
            "model.embed_tokens.weight".to_string(),
            dtype,
            vec![50, hidden],
        ),
        ("model.norm.weight".to_string(), dtype, vec![hidden]),
        ("lm_head.weight".to_string(), dtype, vec![50, hidden]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            dtype,
            vec![hidden, hidden],
        ));
        t.push((
            format!("{p}.block_sparse_moe.gate.weight"),
            dtype,
            vec![experts, hidden],
        ));
        for e in 0..experts {
            let x = format!("{p}.block_sparse_moe.experts.{e}");
            t.push((format!("{x}.w1.weight"), dtype, vec![ff, hidden]));
            t.push((format!("{x}.w2.weight"), dtype, vec![hidden, ff]));
            t.push((format!("{x}.w3.weight"), dtype, vec![ff, hidden]));
        }
    }
    random_checkpoint(&dir.join("model.safetensors"), &t, 7);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

fn mixtral_config(layers: usize, experts: usize) -> Value {
    serde_json::json!({
        "model_type": "mixtral",
        "num_hidden_layers": layers,
        "num_local_experts": experts,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "_name_or_path": "x",
    })
}

fn run(args: &[&OsStr]) -> (bool, String, String) {
    let out = relayout(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every entry's bytes, converted by `backend` at `band` bytes per call.
fn convert_all(
    ckpt: &relayout::Checkpoint,
    plan: &Plan,
    backend: &dyn relayout::Backend,
    band: usize,
) -> Vec<Vec<u8>> {
    let conv = Converter::new(ckpt, plan, backend).with_band_bytes(band);
    let mut bufs: Vec<Vec<u8>> = plan
        .entries()
        .iter()
        .map(|e| vec![0xA5; Converter::entry_bytes(e).unwrap()])
        .collect();
    let mut dsts: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    conv.fill(&mut dsts, &mut |_| {}).unwrap();
    bufs
}

/// A user rule file that stacks experts transposed and cast with mlx's NaN bits: the
/// stack combined with a permute and a cast.
const STACK_RULES: &str = r#"
[output]
nan = "mlx"

[[rule]]
name = "experts-t"
tensor = "model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
stack = { index = "e", count = "{config.num_local_experts}" }
perm = [1, 0]
dtype = "bf16"
target = "stacked.{layer}.{w}"

[[rule]]
name = "keep"
target = "{name}"
"#;

/// The same experts one by one: the oracle the stacked targets must equal, part by part.
const ONE_BY_ONE_RULES: &str = r#"
[output]
nan = "mlx"

[[rule]]
name = "experts-t"
tensor = "model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
perm = [1, 0]
dtype = "bf16"
target = "single.{layer}.{w}.{e}"

[[rule]]
name = "keep"
target = "{name}"
"#;

#[test]
fn stacked_targets_equal_their_parts_converted_alone_on_every_backend_and_band() {
    let root = scratch("stack-backends");
    let dir = mixtral(&root.join("m"), 2, 5, mixtral_config(2, 5), DType::F32);
    let rules = root.join("stack.toml");
    std::fs::write(&rules, STACK_RULES).unwrap();
    let single = root.join("single.toml");
    std::fs::write(&single, ONE_BY_ONE_RULES).unwrap();
    let spec = |f: &Path| ConvertSpec::new().rule_file(f).copy_files(false);
    let (ckpt, plan) = open_and_plan(&dir, &spec(&rules)).unwrap();
    let (ckpt1, plan1) = open_and_plan(&dir, &spec(&single)).unwrap();
    let stacked: Vec<_> = plan
        .entries()
        .iter()
        .filter(|e| !e.stack().is_empty())
        .collect();
    assert_eq!(stacked.len(), 6, "3 projections in each of 2 layers");
    let w1 = plan
        .entries()
        .iter()
        .find(|e| e.target() == "stacked.1.w1")
        .unwrap();
    assert_eq!(w1.target_shape(), [5, 24, 40]);
    assert_eq!(
        w1.describe_op(),
        "stack[0..5] + permute[1, 0] + cast F32->BF16"
    );
    let names: Vec<&str> = w1.stack().iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names[3],
        "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    );
    let reference = relayout::backend::reference::Reference;
    let alone = convert_all(&ckpt1, &plan1, &reference, 1 << 20);
    let part = |target: &str| -> &Vec<u8> {
        let i = plan1
            .entries()
            .iter()
            .position(|e| e.target() == target)
            .unwrap();
        &alone[i]
    };
    let mut want = Vec::new();
    for e in plan.entries() {
        if e.stack().is_empty() {
            want.push(part(e.target()).clone());
            continue;
        }
        let (layer, w) = e.target()["stacked.".len()..].split_once('.').unwrap();
        let mut bytes = Vec::new();
        for k in 0..5 {
            bytes.extend_from_slice(part(&format!("single.{layer}.{w}.{k}")));
        }
        want.push(bytes);
    }
    for backend in all_backends() {
        // One element, an odd band that cuts parts mid-row, one part, several parts.
        for band in [2, 94, 1920, 24 * 40 * 2, 1 << 20] {
            let got = convert_all(&ckpt, &plan, backend.as_ref(), band);
            for ((e, g), w) in plan.entries().iter().zip(&got).zip(&want) {
                assert!(
                    g == w,
                    "{} band {band}: {} differs",
                    backend.name(),
                    e.target()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn plan_and_plan_json_show_the_stack() {
    let root = scratch("stack-plan");
    let dir = mixtral(&root.join("m"), 1, 8, mixtral_config(1, 8), DType::BF16);
    let (ok, text, err) = run(&[
        OsStr::new("plan"),
        dir.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx-lm"),
    ]);
    assert!(ok, "{err}");
    assert!(
        text.contains("model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"),
        "{text}"
    );
    assert!(text.contains("stack[0..8]"), "{text}");
    let (ok, text, err) = run(&[
        OsStr::new("plan"),
        dir.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx-lm"),
        OsStr::new("--json"),
    ]);
    assert!(ok, "{err}");
    let plan: Value = serde_json::from_str(&text).unwrap();
    let row = plan["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["target"] == "model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight")
        .unwrap();
    assert_eq!(row["target_shape"], serde_json::json!([8, 24, 40]));
    assert_eq!(row["stack"].as_array().unwrap().len(), 8);
    assert_eq!(
        row["stack"][7],
        "model.layers.0.block_sparse_moe.experts.7.w2.weight"
    );
    assert!(row["op"].as_str().unwrap().starts_with("stack[0..8]"));
    let _ = std::fs::remove_dir_all(&root);
}

fn plan_error(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![OsStr::new("plan"), dir.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let (ok, _, err) = run(&args);
    assert!(!ok, "planned without an error");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_missing_repeated_or_differently_shaped_expert_is_a_plan_error_naming_it() {
    let root = scratch("stack-errors");
    let preset = ["--preset", "mlx-lm"];
    // The config counts 6 experts, the tensors hold 4.
    let dir = mixtral(
        &root.join("missing"),
        1,
        4,
        mixtral_config(1, 6),
        DType::F32,
    );
    let err = plan_error(&dir, &preset);
    assert!(
        err.contains("switch_mlp") && err.contains("missing: index 4, 5"),
        "{err}"
    );
    // Expert 3 given twice, as "3" and "03".
    let dir = root.join("repeated");
    mixtral(&dir, 1, 4, mixtral_config(1, 4), DType::F32);
    let mut t: Vec<(String, DType, Vec<usize>)> = Vec::new();
    let ckpt = relayout::Checkpoint::open(dir.join("model.safetensors")).unwrap();
    for info in ckpt.tensors() {
        t.push((info.name().to_string(), info.dtype(), info.shape().to_vec()));
    }
    drop(ckpt);
    t.push((
        "model.layers.0.block_sparse_moe.experts.03.w1.weight".into(),
        DType::F32,
        vec![40, 24],
    ));
    random_checkpoint(&dir.join("model.safetensors"), &t, 3);
    let err = plan_error(&dir, &preset);
    assert!(
        err.contains("index 3 is given twice") && err.contains("experts.03.w1"),
        "{err}"
    );
    // Expert 2's w2 has another shape.
    let dir = root.join("shape");
    mixtral(&dir, 1, 4, mixtral_config(1, 4), DType::F32);
    for e in &mut t {
        if e.0 == "model.layers.0.block_sparse_moe.experts.2.w2.weight" {
            e.2 = vec![24, 39];
        }
    }
    t.retain(|e| !e.0.contains("experts.03"));
    random_checkpoint(&dir.join("model.safetensors"), &t, 3);
    let err = plan_error(&dir, &preset);
    assert!(
        err.contains("experts.2.w2.weight") && err.contains("must be alike"),
        "{err}"
    );
    // An index that is not a number.
    t.retain(|e| !e.0.contains("experts.2.w2"));
    t.push((
        "model.layers.0.block_sparse_moe.experts.x.w2.weight".into(),
        DType::F32,
        vec![24, 40],
    ));
    random_checkpoint(&dir.join("model.safetensors"), &t, 3);
    let err = plan_error(&dir, &preset);
    assert!(
        err.contains("experts.x.w2") && err.contains("not an integer"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Converting `dir` into a fresh folder fails with a message holding every `needles`, and
/// leaves no output folder.
fn refused(dir: &Path, needles: &[&str]) {
    let out = dir.with_extension("out");
    let (ok, _, err) = run(&[
        OsStr::new("convert"),
        dir.as_os_str(),
        out.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx-lm"),
        OsStr::new("--device"),
        OsStr::new("cpu"),
    ]);
    assert!(!ok, "converted");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "'{n}' not in: {err}");
    }
    assert!(!out.exists(), "an output was left behind");
}

#[test]
fn hostile_configs_are_clear_errors_that_leave_nothing() {
    let root = scratch("hostile-config");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "dup",
            r#"{"model_type": "mixtral", "num_local_experts": 2, "num_local_experts": 2}"#.into(),
            vec!["config.json", "num_local_experts", "twice"],
        ),
        (
            "nan",
            r#"{"model_type": "mixtral", "rope_theta": NaN}"#.into(),
            vec!["config.json", "rope_theta", "NaN"],
        ),
        (
            "deep",
            format!(
                r#"{{"model_type": "mixtral", "x": {}1{}}}"#,
                "[".repeat(5000),
                "]".repeat(5000)
            ),
            vec!["config.json", "deeper"],
        ),
        (
            "type",
            r#"{"model_type": ["mixtral"]}"#.into(),
            vec!["config.json", "model_type", "not a string"],
        ),
        (
            "unknown",
            r#"{"model_type": "mamba9"}"#.into(),
            vec!["mamba9", "llama", "qwen3_moe", "--rules"],
        ),
        (
            "none",
            r#"{"hidden_size": 8}"#.into(),
            vec!["config.json", "model_type", "families"],
        ),
        (
            "experts",
            mixtral_config(2, 9).to_string(),
            vec!["switch_mlp", "missing"],
        ),
        (
            "layers",
            mixtral_config(3, 2).to_string(),
            vec!["num_hidden_layers", "= 3", "0, 1"],
        ),
        (
            "count",
            r#"{"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": -2}"#.into(),
            vec!["config.json", "num_local_experts", "not a positive integer"],
        ),
        (
            "huge",
            format!(
                r#"{{"model_type": "mixtral", "pad": "{}"}}"#,
                "x".repeat(5 << 20)
            ),
            vec!["config.json", "larger than the limit"],
        ),
    ];
    for (name, text, needles) in cases {
        let dir = mixtral(&root.join(name), 2, 2, mixtral_config(2, 2), DType::F32);
        std::fs::write(dir.join("config.json"), text).unwrap();
        refused(&dir, &needles);
    }
    // No config.json at all.
    let dir = mixtral(&root.join("absent"), 2, 2, mixtral_config(2, 2), DType::F32);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    refused(&dir, &["config.json", "is missing", "families"]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_rule_file_supplies_a_family_for_another_model_type() {
    let root = scratch("own-family");
    let dir = mixtral(&root.join("m"), 1, 2, mixtral_config(1, 2), DType::F32);
    let mut cfg = mixtral_config(1, 2);
    cfg["model_type"] = "my_moe".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let rules = root.join("my_moe.toml");
    std::fs::write(
        &rules,
        r#"
model_types = ["my_moe"]

[[rule]]
name = "experts"
tensor = "model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
stack = { index = "e", count = "{config.num_local_experts}" }
target = "model.layers.{layer}.moe.{w}"
"#,
    )
    .unwrap();
    let out = root.join("out");
    let (ok, _, err) = run(&[
        OsStr::new("convert"),
        dir.as_os_str(),
        out.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx-lm"),
        OsStr::new("--rules"),
        rules.as_os_str(),
        OsStr::new("--device"),
        OsStr::new("cpu"),
    ]);
    assert!(ok, "{err}");
    let t = load_safetensors(&out.join("model.safetensors"));
    assert_eq!(t["model.layers.0.moe.w2"].shape, [2, 24, 40]);
    // The config's dtype, the mlx-lm config.json and the format metadata still apply.
    assert_eq!(t["model.norm.weight"].dtype, "BF16");
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(written.get("_name_or_path").is_none());
    let ckpt = relayout::Checkpoint::open(out.join("model.safetensors")).unwrap();
    assert_eq!(
        ckpt.metadata().get("format").map(String::as_str),
        Some("mlx")
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn plan_says_where_the_dtype_comes_from_and_why_a_tensor_is_dropped() {
    let root = scratch("dtype-ties");
    let mut cfg = mixtral_config(1, 2);
    cfg["tie_word_embeddings"] = true.into();
    let dir = mixtral(&root.join("m"), 1, 2, cfg, DType::F32);
    let plan = |extra: &[&str]| {
        let mut args = vec![
            OsStr::new("plan"),
            dir.as_os_str(),
            OsStr::new("--preset"),
            OsStr::new("mlx-lm"),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let (ok, text, err) = run(&args);
        assert!(ok, "{err}");
        text
    };
    let text = plan(&[]);
    assert!(
        text.contains("output dtype: bfloat16 from config.json 'torch_dtype'"),
        "{text}"
    );
    assert!(text.contains("cast F32->BF16"), "{text}");
    assert!(
        text.contains("lm_head.weight") && text.contains("dropped (tied-lm-head)"),
        "{text}"
    );
    let text = plan(&["--dtype", "source"]);
    assert!(
        !text.contains("cast F32->BF16") && !text.contains("output dtype"),
        "{text}"
    );
    let text = plan(&["--dtype", "float16"]);
    assert!(text.contains("cast F32->F16"), "{text}");
    let _ = std::fs::remove_dir_all(&root);
}
