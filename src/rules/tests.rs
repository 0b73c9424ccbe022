use std::collections::BTreeMap;
use std::path::PathBuf;

use safetensors::SafeTensors;

use super::*;
use crate::layout::contiguous_strides;

fn info(name: &str, dtype: DType, shape: &[usize]) -> TensorInfo {
    TensorInfo {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        strides: contiguous_strides(shape),
        offset: 0,
        storage: 0,
    }
}

fn f32s(list: &[(&str, &[usize])]) -> Vec<TensorInfo> {
    list.iter().map(|(n, s)| info(n, DType::F32, s)).collect()
}

fn flax() -> RuleSet {
    RuleSet::preset("flax").unwrap()
}

/// Target name → (perm, target shape) of every entry.
fn targets(plan: &Plan) -> BTreeMap<String, (Vec<usize>, Vec<usize>)> {
    plan.entries
        .iter()
        .map(|e| (e.target.clone(), (e.perm.clone(), e.target_shape.clone())))
        .collect()
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dtype_of(view: &safetensors::tensor::TensorView<'_>) -> DType {
    let name = format!("{:?}", view.dtype());
    DType::from_safetensors_name(&name).unwrap_or_else(|| panic!("dtype {name}"))
}

/// Naive oracle: output element at multi-index `o` is the source element at the
/// index whose axis `perm[k]` is `o[k]`.
fn permute_bytes(src: &[u8], shape: &[usize], perm: &[usize], elem: usize) -> Vec<u8> {
    let strides = contiguous_strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n * elem);
    let mut idx = vec![0usize; out_shape.len()];
    for _ in 0..n {
        let s: usize = idx.iter().zip(perm).map(|(&i, &p)| i * strides[p]).sum();
        out.extend_from_slice(&src[s * elem..(s + 1) * elem]);
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < out_shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

/// Plans `source` with the flax preset and checks names, dtypes, shapes and, through
/// the naive permute, every byte against the reference converter's output.
fn check_flax_fixture(source: &str, expected: &str) -> Plan {
    let src_bytes = fixture(source);
    let want_bytes = fixture(expected);
    let src = SafeTensors::deserialize(&src_bytes).unwrap();
    let want = SafeTensors::deserialize(&want_bytes).unwrap();
    let tensors: Vec<TensorInfo> = src
        .iter()
        .enumerate()
        .map(|(i, (name, view))| TensorInfo {
            storage: i,
            ..info(name, dtype_of(&view), view.shape())
        })
        .collect();
    let plan = flax().plan(&tensors).unwrap();
    assert!(plan.unmatched.is_empty(), "{:?}", plan.unmatched);

    let got: BTreeMap<String, (DType, Vec<usize>)> = plan
        .entries
        .iter()
        .map(|e| (e.target.clone(), (e.dtype, e.target_shape.clone())))
        .collect();
    let expect: BTreeMap<String, (DType, Vec<usize>)> = want
        .iter()
        .map(|(n, v)| (n.to_string(), (dtype_of(&v), v.shape().to_vec())))
        .collect();
    assert_eq!(got, expect);
    assert_eq!(got.len(), plan.entries.len(), "two entries share a target");

    for (i, e) in plan.entries.iter().enumerate() {
        if i > 0 {
            assert!(
                plan.entries[i - 1].source < e.source,
                "entries out of source order"
            );
        }
        assert_eq!(tensors[e.source].name, e.source_name);
        assert_eq!(e.source_shape, tensors[e.source].shape);
        let from = src.tensor(&e.source_name).unwrap();
        let to = want.tensor(&e.target).unwrap();
        let permuted = permute_bytes(from.data(), from.shape(), &e.perm, e.dtype.size());
        assert!(
            permuted == to.data(),
            "{} -> {}: bytes differ",
            e.source_name,
            e.target
        );
    }
    plan
}

#[test]
fn flax_preset_reproduces_small_cnn_fixture_names_shapes_and_bytes() {
    let plan = check_flax_fixture("small_cnn.safetensors", "small_cnn.flax.safetensors");
    let conv = plan.entry_for("conv1.weight").unwrap();
    assert_eq!(
        (conv.target.as_str(), conv.rule.as_str()),
        ("params.conv1.kernel", "conv-kernel")
    );
    assert_eq!(conv.perm, vec![2, 3, 1, 0]);
    assert_eq!(conv.target_shape, vec![7, 7, 3, 8]);
    let fc = plan.entry_for("fc.weight").unwrap();
    assert_eq!(
        (fc.target.as_str(), fc.perm.clone()),
        ("params.fc.kernel", vec![1, 0])
    );
    let ds = plan.entry_for("layer1.0.downsample.1.running_var").unwrap();
    assert_eq!(ds.target, "batch_stats.layer1_0.downsample_1.var");
    let bn = plan.entry_for("layer1.1.bn2.weight").unwrap();
    assert_eq!(bn.target, "params.layer1_1.bn2.scale");
    let counters: Vec<&Skipped> = plan.dropped.iter().collect();
    assert_eq!(counters.len(), 7);
    assert!(counters
        .iter()
        .all(|s| s.name.ends_with(".num_batches_tracked") && s.reason == "drop-bn-counter"));
    assert_eq!(plan.sources, vec!["preset flax".to_string()]);
}

#[test]
fn flax_preset_reproduces_mixed_fixture_names_shapes_and_bytes() {
    let plan = check_flax_fixture("mixed.safetensors", "mixed.flax.safetensors");
    let emb = plan.entry_for("tok_embed.weight").unwrap();
    assert_eq!(emb.target, "params.tok_embed.embedding");
    assert!(emb.is_identity());
    let c3 = plan.entry_for("conv3d.weight").unwrap();
    assert_eq!(c3.perm, vec![2, 3, 4, 1, 0]);
    assert_eq!(c3.target_shape, vec![3, 2, 5, 3, 4]);
    assert_eq!(
        plan.entry_for("blocks.1.weight").unwrap().target,
        "params.blocks_1.kernel"
    );
    assert!(plan.dropped.is_empty());
}

#[test]
fn subnet_with_2d_weight_is_not_a_batchnorm_and_nothing_overwrites() {
    let tensors = f32s(&[
        ("subnet.weight", &[4, 3]),
        ("subnet.bias", &[4]),
        ("encoder.layer.weight", &[5, 4]),
        ("encoder.layer.bias", &[5]),
        ("head.weight", &[2, 5]),
        ("head.bias", &[2]),
        ("bn1.weight", &[3]),
        ("bn1.bias", &[3]),
        ("bn1.running_mean", &[3]),
        ("bn1.running_var", &[3]),
        ("subnet_bn.weight", &[6, 6]),
    ]);
    let plan = flax().plan(&tensors).unwrap();
    let t = targets(&plan);
    assert_eq!(plan.entries.len(), tensors.len());
    assert_eq!(t.len(), tensors.len());
    assert_eq!(t["params.subnet.kernel"], (vec![1, 0], vec![3, 4]));
    assert_eq!(t["params.subnet.bias"], (vec![0], vec![4]));
    assert_eq!(t["params.subnet_bn.kernel"], (vec![1, 0], vec![6, 6]));
    assert_eq!(t["params.encoder.layer.kernel"], (vec![1, 0], vec![4, 5]));
    assert_eq!(t["params.bn1.scale"], (vec![0], vec![3]));
    assert_eq!(t["batch_stats.bn1.mean"], (vec![0], vec![3]));
    assert_eq!(t["batch_stats.bn1.var"], (vec![0], vec![3]));
    assert_eq!(
        plan.entry_for("subnet.weight").unwrap().rule,
        "linear-kernel"
    );
}

#[test]
fn embedding_tables_keep_layout_by_last_component_only() {
    let tensors = f32s(&[
        ("tok_embed.weight", &[50, 12]),
        ("transformer.wte.weight", &[40, 8]),
        ("transformer.wpe.weight", &[16, 8]),
        ("embed.proj.weight", &[3, 8]),
        ("embedder.0.weight", &[3, 8]),
        ("gpt_neox.embed_in.weight", &[40, 8]),
        ("embed_out.weight", &[40, 8]),
    ]);
    let plan = flax().plan(&tensors).unwrap();
    let t = targets(&plan);
    assert_eq!(t["params.tok_embed.embedding"], (vec![0, 1], vec![50, 12]));
    assert_eq!(
        t["params.transformer.wte.embedding"],
        (vec![0, 1], vec![40, 8])
    );
    assert_eq!(
        t["params.gpt_neox.embed_in.embedding"],
        (vec![0, 1], vec![40, 8])
    );
    // GPT-NeoX's LM head: "embed" is in its name, but it is not on the list.
    assert_eq!(t["params.embed_out.kernel"], (vec![1, 0], vec![8, 40]));
    // Both decisions were made from names, and plan says so.
    for name in ["tok_embed.weight", "embed_out.weight"] {
        let w = plan.entry_for(name).unwrap().warning.as_deref().unwrap();
        assert!(w.contains("--module-types"), "{w}");
    }
    assert_eq!(
        t["params.transformer.wpe.embedding"],
        (vec![0, 1], vec![16, 8])
    );
    // The substring sits in an earlier component (or the index after it): a Linear.
    assert_eq!(t["params.embed.proj.kernel"], (vec![1, 0], vec![8, 3]));
    assert_eq!(t["params.embedder_0.kernel"], (vec![1, 0], vec![8, 3]));
}

#[test]
fn conv3d_non_cubic_kernel_moves_spatial_axes_in_order() {
    let plan = flax()
        .plan(&f32s(&[("c.weight", &[4, 3, 3, 2, 5])]))
        .unwrap();
    assert_eq!(
        targets(&plan)["params.c.kernel"],
        (vec![2, 3, 4, 1, 0], vec![3, 2, 5, 3, 4])
    );
}

#[test]
fn conv1d_kernel_becomes_width_in_out() {
    let plan = flax().plan(&f32s(&[("c.weight", &[6, 12, 5])])).unwrap();
    assert_eq!(
        targets(&plan)["params.c.kernel"],
        (vec![2, 1, 0], vec![5, 12, 6])
    );
}

#[test]
fn top_level_names_get_no_leading_or_doubled_dot() {
    let tensors = f32s(&[("weight", &[3, 2]), ("bias", &[3]), ("scale", &[])]);
    let plan = flax().plan(&tensors).unwrap();
    let names: Vec<&str> = plan.entries.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(names, ["params.kernel", "params.bias", "params.scale"]);
    let plan = RuleSet::preset("mlx").unwrap().plan(&tensors).unwrap();
    let names: Vec<&str> = plan.entries.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(names, ["weight", "bias", "scale"]);
}

#[test]
fn digit_components_merge_into_the_previous_one() {
    let tensors = f32s(&[
        ("layers.0.1.fc.weight", &[2, 3]),
        ("0.weight", &[4]),
        ("0.1.bias", &[4]),
        ("a.10.b2.0.bias", &[4]),
    ]);
    let plan = flax().plan(&tensors).unwrap();
    let names: Vec<&str> = plan.entries.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(
        names,
        [
            "params.layers_0_1.fc.kernel",
            "params.0.scale",
            "params.0_1.bias",
            "params.a_10.b2_0.bias"
        ]
    );
}

#[test]
fn two_sources_mapping_to_one_target_is_a_collision_naming_both() {
    let tensors = f32s(&[("a_0.bias", &[2]), ("a.0.bias", &[2])]);
    match flax().plan(&tensors) {
        Err(Error::TargetCollision {
            first,
            second,
            target,
        }) => {
            assert_eq!((first.as_str(), second.as_str()), ("a_0.bias", "a.0.bias"));
            assert_eq!(target, "params.a_0.bias");
        }
        other => panic!("expected a collision, got {other:?}"),
    }
}

const USER_RULES: &str = r#"
description = "t5-like: shared is an embedding; decoder upsamplers are ConvTranspose"

[[rule]]
name = "shared-embedding"
module = "shared"
leaf = "weight"
target = "params.shared.embedding"

[[rule]]
name = "conv-transpose"
description = "ConvTranspose stores (in, out, *kernel)"
module = "**.up*"
leaf = "weight"
rank = { min = 3 }
target = "params.{module_merged}.kernel"
perm = "I,O,*S -> *S,I,O"
"#;

#[test]
fn layered_user_rules_override_chosen_tensors_and_leave_the_rest_to_the_preset() {
    let user = RuleSet::from_toml(USER_RULES, "user.toml").unwrap();
    let rules = flax().layered(user);
    assert_eq!(rules.sources(), ["preset flax", "user.toml"]);
    let tensors = f32s(&[
        ("shared.weight", &[100, 16]),
        ("decoder.up1.weight", &[8, 4, 3, 2]),
        ("decoder.conv.weight", &[8, 4, 3, 2]),
        ("lm_head.weight", &[100, 16]),
    ]);
    let plan = rules.plan(&tensors).unwrap();
    let t = targets(&plan);
    assert_eq!(t["params.shared.embedding"], (vec![0, 1], vec![100, 16]));
    assert_eq!(
        t["params.decoder.up1.kernel"],
        (vec![2, 3, 0, 1], vec![3, 2, 8, 4])
    );
    assert_eq!(
        t["params.decoder.conv.kernel"],
        (vec![2, 3, 1, 0], vec![3, 2, 4, 8])
    );
    assert_eq!(t["params.lm_head.kernel"], (vec![1, 0], vec![16, 100]));
    assert_eq!(
        plan.entry_for("decoder.up1.weight").unwrap().rule,
        "conv-transpose"
    );
    assert_eq!(plan.sources, ["preset flax", "user.toml"]);
    // The preset's by-name embedding rule only ever matched `shared.weight`, which the
    // user's rule took: plan reports it unreachable. Nothing else is.
    assert_eq!(plan.unreachable.len(), 1, "{:?}", plan.unreachable);
    assert!(
        plan.unreachable[0].starts_with("preset flax rule 'embedding' is unreachable")
            && plan.unreachable[0].contains("'shared.weight' by 'shared-embedding'"),
        "{:?}",
        plan.unreachable
    );
    // Without the user file the preset takes `up1` for a Conv: its name says nothing.
    let plain = flax().plan(&tensors).unwrap();
    assert!(plain.unreachable.is_empty());
    assert_eq!(
        targets(&plain)["params.decoder.up1.kernel"],
        (vec![2, 3, 1, 0], vec![3, 2, 4, 8])
    );
}

fn rules_error(text: &str) -> (String, String) {
    match RuleSet::from_toml(text, "my-rules.toml") {
        Err(Error::Rules { origin, detail }) => (origin, detail),
        other => panic!("expected Error::Rules for {text:?}, got {other:?}"),
    }
}

#[test]
fn malformed_toml_is_a_rules_error_with_origin_and_line() {
    let (origin, detail) = rules_error("[[rule]]\nname = \"x\"\ntarget = \n");
    assert_eq!(origin, "my-rules.toml");
    assert!(detail.starts_with("line 3"), "{detail}");
    let err = RuleSet::from_toml("[[rule]\n", "my-rules.toml").unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("rules my-rules.toml: line 1"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn bad_perm_patterns_are_rules_errors_at_their_line() {
    for bad in [
        "\"O,I\"",
        "\"O,I -> I\"",
        "\"O,I -> I,X\"",
        "\"*A,*B -> *B,*A\"",
        "[0, 0]",
        "[1, -1]",
        "3",
    ] {
        let text = format!("[[rule]]\nname = \"r\"\ntarget = \"{{name}}\"\nperm = {bad}\n");
        let (origin, detail) = rules_error(&text);
        assert_eq!(origin, "my-rules.toml");
        assert!(detail.starts_with("line 4"), "{bad}: {detail}");
    }
}

#[test]
fn invalid_rule_contents_are_rules_errors_naming_the_problem() {
    let cases: [(&str, &str); 11] = [
        (
            "[[rule]]\nname = \"r\"\nleaff = \"w\"\ntarget = \"x\"",
            "leaff",
        ),
        ("[[rule]]\nname = \"r\"\ntarget = \"{nope}\"", "nope"),
        ("[[rule]]\nname = \"r\"\nleaf = \"w\"", "needs 'target"),
        (
            "[[rule]]\nname = \"r\"\ndrop = true\ntarget = \"x\"",
            "drop",
        ),
        (
            "[[rule]]\nname = \"r\"\ndtype = \"f31\"\ntarget = \"x\"",
            "f31",
        ),
        (
            "[[rule]]\nname = \"r\"\nrank = { min = 3, max = 2 }\ntarget = \"x\"",
            "min 3",
        ),
        (
            "[[rule]]\nname = \"r\"\nrank = -1\ntarget = \"x\"",
            "negative",
        ),
        (
            "[[rule]]\nname = \"r\"\nrank = { least = 1 }\ntarget = \"x\"",
            "least",
        ),
        (
            "[[rule]]\nname = \"r\"\nmodule = \"a**\"\ntarget = \"x\"",
            "**",
        ),
        (
            "[[rule]]\nname = \"r\"\nmodule_last = \"a.b\"\ntarget = \"x\"",
            "a.b",
        ),
        (
            "[[rule]]\nname = \"r\"\ntarget = \"x\"\n[[rule]]\nname = \"r\"\ntarget = \"y\"",
            "earlier",
        ),
    ];
    for (text, needle) in cases {
        let (origin, detail) = rules_error(text);
        assert_eq!(origin, "my-rules.toml");
        assert!(detail.contains(needle), "{text:?}: {detail}");
        assert!(detail.starts_with("line "), "{text:?}: {detail}");
    }
    let (_, detail) = rules_error(
        "[[rule]]\nname = \"a\"\ntarget = \"x\"\n\n[[rule]]\nname = \"\"\ntarget = \"x\"",
    );
    assert!(
        detail.contains("line 5") && detail.contains("name is empty"),
        "{detail}"
    );
}

#[test]
fn perm_that_does_not_fit_the_rank_names_tensor_and_rule() {
    let rules = RuleSet::from_toml(
        "[[rule]]\nname = \"swap\"\ntarget = \"{name}\"\nperm = \"A,B -> B,A\"",
        "swap.toml",
    )
    .unwrap();
    match rules.plan(&f32s(&[("ok", &[2, 3]), ("x.cube", &[2, 3, 4])])) {
        Err(Error::Rules { origin, detail }) => {
            assert_eq!(origin, "swap.toml");
            assert!(
                detail.contains("'swap'") && detail.contains("'x.cube'"),
                "{detail}"
            );
            assert!(detail.contains("rank 3"), "{detail}");
        }
        other => panic!("expected Error::Rules, got {other:?}"),
    }
    let list = RuleSet::from_toml(
        "[[rule]]\nname = \"l\"\ntarget = \"{name}\"\nperm = [1, 0]",
        "l",
    )
    .unwrap();
    assert!(matches!(
        list.plan(&f32s(&[("v", &[3])])),
        Err(Error::Rules { .. })
    ));
}

#[test]
fn target_that_renders_empty_is_a_rules_error() {
    let rules =
        RuleSet::from_toml("[[rule]]\nname = \"m\"\ntarget = \"{module}\"", "m.toml").unwrap();
    assert_eq!(
        rules.plan(&f32s(&[("a.b", &[1])])).unwrap().entries[0].target,
        "a"
    );
    match rules.plan(&f32s(&[("top", &[1])])) {
        Err(Error::Rules { detail, .. }) => assert!(detail.contains("'top'"), "{detail}"),
        other => panic!("expected Error::Rules, got {other:?}"),
    }
}

#[test]
fn tensors_no_rule_matches_are_reported_as_unmatched() {
    let rules = RuleSet::from_toml(
        "[[rule]]\nname = \"only-weights\"\nleaf = \"weight\"\ntarget = \"{name}\"",
        "partial.toml",
    )
    .unwrap();
    let plan = rules
        .plan(&f32s(&[("a.weight", &[2]), ("a.bias", &[2]), ("b", &[1])]))
        .unwrap();
    assert_eq!(plan.entries.len(), 1);
    let unmatched: Vec<(usize, &str, &str)> = plan
        .unmatched
        .iter()
        .map(|s| (s.source, s.name.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(
        unmatched,
        [
            (1, "a.bias", "no rule matched"),
            (2, "b", "no rule matched")
        ]
    );
    match plan.require_all_matched() {
        Err(Error::Unmatched { count, first }) => {
            assert_eq!((count, first.as_str()), (2, "a.bias"))
        }
        other => panic!("expected Error::Unmatched, got {other:?}"),
    }
    assert!(flax()
        .plan(&f32s(&[("a.bias", &[2])]))
        .unwrap()
        .require_all_matched()
        .is_ok());
}

#[test]
fn mlx_preset_moves_conv_channels_last_and_keeps_names() {
    let mut tensors = f32s(&[
        ("conv1.weight", &[8, 3, 7, 7]),
        ("conv1d.weight", &[6, 12, 5]),
        ("conv3d.weight", &[4, 3, 3, 2, 5]),
        ("fc.weight", &[10, 16]),
        ("bn1.weight", &[8]),
        ("bn1.running_mean", &[8]),
        ("bn1.running_var", &[8]),
        ("emb.weight", &[50, 12]),
    ]);
    tensors.push(info("bn1.num_batches_tracked", DType::I64, &[]));
    let plan = RuleSet::preset("mlx").unwrap().plan(&tensors).unwrap();
    let t = targets(&plan);
    assert_eq!(t["conv1.weight"], (vec![0, 2, 3, 1], vec![8, 7, 7, 3]));
    assert_eq!(t["conv1d.weight"], (vec![0, 2, 1], vec![6, 5, 12]));
    assert_eq!(
        t["conv3d.weight"],
        (vec![0, 2, 3, 4, 1], vec![4, 3, 2, 5, 3])
    );
    assert_eq!(t["fc.weight"], (vec![0, 1], vec![10, 16]));
    assert_eq!(t["bn1.running_var"], (vec![0], vec![8]));
    assert_eq!(t["emb.weight"], (vec![0, 1], vec![50, 12]));
    assert_eq!(t.len(), 8);
    assert_eq!(plan.dropped.len(), 1);
    assert_eq!(plan.dropped[0].source, 8);
    assert_eq!(plan.sources, ["preset mlx"]);
}

#[test]
fn unknown_preset_lists_the_available_ones() {
    match RuleSet::preset("keras") {
        Err(Error::UnknownPreset { name, available }) => {
            assert_eq!(name, "keras");
            assert_eq!(available, "flax, nnx, mlx, mlx-lm");
        }
        other => panic!("expected UnknownPreset, got {other:?}"),
    }
}

#[test]
fn every_preset_parses_and_its_source_is_embedded() {
    assert_eq!(RuleSet::preset_names(), ["flax", "nnx", "mlx", "mlx-lm"]);
    for name in RuleSet::preset_names() {
        let text = RuleSet::preset_source(name).unwrap();
        assert!(text.contains("[[rule]]"));
        let set = RuleSet::preset(name).unwrap();
        assert!(!set.rules().is_empty());
        assert!(set
            .rules()
            .iter()
            .all(|r| r.origin() == format!("preset {name}")));
    }
    assert!(RuleSet::preset_source("nope").is_none());
    let flax = flax();
    let conv = flax
        .rules()
        .iter()
        .find(|r| r.name() == "conv-kernel")
        .unwrap();
    assert!(conv.description().contains("ConvNd"));
}

#[test]
fn conditions_dtype_module_glob_last_glob_lacks_and_rank_bounds() {
    let text = r#"
[[rule]]
name = "half"
source_dtype = ["F16", "bf16"]
target = "half.{name}"

[[rule]]
name = "downsample"
module = "**.downsample.*"
target = "ds.{module_merged}.{leaf}"

[[rule]]
name = "convs"
module_last = ["conv?", "proj*"]
rank = { max = 2 }
target = "small.{leaf}.{module}"

[[rule]]
name = "no-stats"
module_lacks = ["running_mean", "running_var"]
leaf = ["weight", "bias"]
target = "plain.{name}"

[[rule]]
name = "top"
module = ""
target = "top.{leaf}"
"#;
    let rules = RuleSet::from_toml(text, "c.toml").unwrap();
    let mut tensors = f32s(&[
        ("l.0.downsample.1.weight", &[4]),
        ("l.0.downsample.weight", &[4]),
        ("b.conv1.weight", &[4, 4]),
        ("b.conv12.weight", &[4, 4]),
        ("b.projection.weight", &[4, 4, 1]),
        ("bn.weight", &[4]),
        ("bn.running_mean", &[4]),
        ("z", &[1]),
    ]);
    tensors.push(info("h.weight", DType::BF16, &[2, 2]));
    let plan = rules.plan(&tensors).unwrap();
    let rule_of: BTreeMap<&str, (&str, &str)> = plan
        .entries
        .iter()
        .map(|e| (e.source_name.as_str(), (e.rule.as_str(), e.target.as_str())))
        .collect();
    assert_eq!(
        rule_of["l.0.downsample.1.weight"],
        ("downsample", "ds.l_0.downsample_1.weight")
    );
    assert_eq!(
        rule_of["l.0.downsample.weight"],
        ("no-stats", "plain.l.0.downsample.weight")
    );
    assert_eq!(rule_of["b.conv1.weight"], ("convs", "small.weight.b.conv1"));
    assert_eq!(
        rule_of["b.conv12.weight"],
        ("no-stats", "plain.b.conv12.weight")
    );
    assert_eq!(
        rule_of["b.projection.weight"],
        ("no-stats", "plain.b.projection.weight")
    );
    assert_eq!(rule_of["z"], ("top", "top.z"));
    assert_eq!(rule_of["h.weight"], ("half", "half.h.weight"));
    let unmatched: Vec<&str> = plan.unmatched.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(unmatched, ["bn.weight", "bn.running_mean"]);
}

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("relayout-rules-{}-{tag}", std::process::id()))
}

#[test]
fn from_file_reads_rules_and_reports_io_size_and_encoding_errors() {
    let path = temp_path("ok.toml");
    std::fs::write(&path, USER_RULES).unwrap();
    let set = RuleSet::from_file(&path).unwrap();
    assert_eq!(set.sources(), [path.display().to_string()]);
    assert_eq!(set.rules().len(), 2);
    std::fs::remove_file(&path).unwrap();

    match RuleSet::from_file(&path) {
        Err(Error::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected Error::Io, got {other:?}"),
    }

    let big = temp_path("big.toml");
    let filler = "# padding\n".repeat((MAX_RULE_FILE_BYTES / 10 + 1) as usize);
    std::fs::write(&big, filler).unwrap();
    let got = RuleSet::from_file(&big);
    std::fs::remove_file(&big).unwrap();
    match got {
        Err(Error::Rules { origin, detail }) => {
            assert_eq!(origin, big.display().to_string());
            assert!(detail.contains("limit"), "{detail}");
        }
        other => panic!("expected Error::Rules, got {other:?}"),
    }

    let bin = temp_path("bin.toml");
    std::fs::write(&bin, b"name = \"\xff\"").unwrap();
    let got = RuleSet::from_file(&bin);
    std::fs::remove_file(&bin).unwrap();
    match got {
        Err(Error::Rules { detail, .. }) => assert!(detail.contains("UTF-8"), "{detail}"),
        other => panic!("expected Error::Rules, got {other:?}"),
    }
}

#[test]
fn a_rule_without_conditions_matches_everything_and_first_match_wins() {
    let rules = RuleSet::from_toml(
        "[[rule]]\nname = \"first\"\ntarget = \"a.{name}\"\n[[rule]]\nname = \"second\"\ntarget = \"b.{name}\"",
        "o.toml",
    )
    .unwrap();
    let plan = rules.plan(&f32s(&[("x.y", &[1])])).unwrap();
    assert_eq!(plan.entries[0].target, "a.x.y");
    assert_eq!(plan.entries[0].rule, "first");
    let empty = RuleSet::from_toml("", "empty.toml").unwrap();
    assert_eq!(
        empty.plan(&f32s(&[("x", &[1])])).unwrap().unmatched.len(),
        1
    );
}

fn opts(vars: &[(&str, &str)]) -> PlanOptions {
    PlanOptions {
        vars: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..PlanOptions::default()
    }
}

/// The tensors of a packed `nn.MultiheadAttention` at `m`, embed dim 8.
fn mha(m: &str) -> Vec<TensorInfo> {
    f32s(&[
        (&format!("{m}.in_proj_weight"), &[24, 8]),
        (&format!("{m}.in_proj_bias"), &[24]),
        (&format!("{m}.out_proj.weight"), &[8, 8]),
        (&format!("{m}.out_proj.bias"), &[8]),
    ])
}

/// (slice as axis, start, len; perm; target shape) of one entry.
type Op = (Option<(usize, usize, usize)>, Vec<usize>, Vec<usize>);

/// Target → its op.
fn ops(plan: &Plan) -> BTreeMap<String, Op> {
    plan.entries
        .iter()
        .map(|e| {
            (
                e.target.clone(),
                (
                    e.slice.map(|s| (s.axis, s.start, s.len)),
                    e.perm.clone(),
                    e.target_shape.clone(),
                ),
            )
        })
        .collect()
}

#[test]
fn flax_attention_splits_transposes_and_reshapes_into_heads() {
    let plan = flax()
        .plan_with(&mha("enc.layers.0.attn"), &opts(&[("heads", "2")]))
        .unwrap();
    let t = ops(&plan);
    let m = "params.enc.layers_0.attn";
    for (i, part) in ["query", "key", "value"].iter().enumerate() {
        assert_eq!(
            t[&format!("{m}.{part}.kernel")],
            (Some((0, 8 * i, 8)), vec![1, 0], vec![8, 2, 4]),
            "{part}"
        );
        assert_eq!(
            t[&format!("{m}.{part}.bias")],
            (Some((0, 8 * i, 8)), vec![0], vec![2, 4]),
            "{part}"
        );
    }
    assert_eq!(
        t[&format!("{m}.out.kernel")],
        (None, vec![1, 0], vec![2, 4, 8])
    );
    assert_eq!(t[&format!("{m}.out.bias")], (None, vec![0], vec![8]));
    assert_eq!(plan.entries.len(), 8);
    // NNX: the same names without the collection, the list index kept.
    let plan = RuleSet::preset("nnx")
        .unwrap()
        .plan_with(&mha("enc.layers.0.attn"), &opts(&[("heads", "4")]))
        .unwrap();
    let t = ops(&plan);
    assert_eq!(
        t["enc.layers.0.attn.key.kernel"],
        (Some((0, 8, 8)), vec![1, 0], vec![8, 4, 2])
    );
    assert_eq!(
        t["enc.layers.0.attn.out.kernel"],
        (None, vec![1, 0], vec![4, 2, 8])
    );
}

#[test]
fn flax_attention_without_heads_says_which_module_and_what_to_pass() {
    for preset in ["flax", "nnx"] {
        let err = RuleSet::preset(preset)
            .unwrap()
            .plan(&mha("vit.encoder.layer.3.attention"))
            .unwrap_err();
        assert!(matches!(err, Error::MissingVariable { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(
                "nn.MultiheadAttention at 'vit.encoder.layer.3.attention': pass --set heads=H"
            ),
            "{err}"
        );
    }
    // Heads that do not divide E, or that are not a number, are plan errors.
    for heads in ["3", "zero", "0"] {
        let err = flax()
            .plan_with(&mha("a"), &opts(&[("heads", heads)]))
            .unwrap_err();
        assert!(matches!(err, Error::Rules { .. }), "{heads}: {err:?}");
    }
}

#[test]
fn mlx_attention_splits_into_the_three_projections_unchanged() {
    let plan = RuleSet::preset("mlx").unwrap().plan(&mha("attn")).unwrap();
    let t = ops(&plan);
    for (i, part) in ["query_proj", "key_proj", "value_proj"].iter().enumerate() {
        assert_eq!(
            t[&format!("attn.{part}.weight")],
            (Some((0, 8 * i, 8)), vec![0, 1], vec![8, 8])
        );
        assert_eq!(
            t[&format!("attn.{part}.bias")],
            (Some((0, 8 * i, 8)), vec![0], vec![8])
        );
    }
    assert_eq!(t["attn.out_proj.weight"], (None, vec![0, 1], vec![8, 8]));
    assert_eq!(t["attn.out_proj.bias"], (None, vec![0], vec![8]));
}

#[test]
fn conv_transpose_is_told_by_name_or_by_module_type() {
    let tensors = f32s(&[
        ("dec.deconv1.weight", &[8, 6, 3, 2]),
        ("dec.DeConv2.weight", &[8, 6, 3, 2]),
        ("dec.up_conv_transpose.weight", &[8, 6, 3, 2]),
        ("dec.up2.weight", &[8, 6, 3, 2]),
        ("dec.conv.weight", &[8, 6, 3, 2]),
    ]);
    let mlx = RuleSet::preset("mlx").unwrap();
    let by_name = ops(&mlx.plan(&tensors).unwrap());
    // (I, O, *S) -> (O, *S, I) for ConvTranspose, (O, I, *S) -> (O, *S, I) for Conv.
    for name in ["dec.deconv1", "dec.DeConv2", "dec.up_conv_transpose"] {
        assert_eq!(
            by_name[&format!("{name}.weight")].1,
            vec![1, 2, 3, 0],
            "{name}"
        );
    }
    assert_eq!(by_name["dec.up2.weight"].1, vec![0, 2, 3, 1]);
    assert_eq!(by_name["dec.conv.weight"].1, vec![0, 2, 3, 1]);
    // The types file decides, even against a name.
    let types = ModuleTypes::from_json(
        r#"{"": "Decoder", "dec.up2": "ConvTranspose2d", "dec.deconv1": "Conv2d"}"#,
        Path::new("types.json"),
    )
    .unwrap();
    let typed = PlanOptions {
        module_types: Some(types),
        ..PlanOptions::default()
    };
    let t = ops(&mlx.plan_with(&tensors, &typed).unwrap());
    assert_eq!(
        t["dec.up2.weight"],
        (None, vec![1, 2, 3, 0], vec![6, 3, 2, 8])
    );
    assert_eq!(t["dec.deconv1.weight"].1, vec![0, 2, 3, 1]);
    // Flax: (*S, O, I), the kernel of ConvTranspose(transpose_kernel=True).
    let t = ops(&flax().plan_with(&tensors, &typed).unwrap());
    assert_eq!(
        t["params.dec.up2.kernel"],
        (None, vec![2, 3, 1, 0], vec![3, 2, 6, 8])
    );
}

#[test]
fn module_types_decide_linear_against_embedding_names_without_warnings() {
    let tensors = f32s(&[("embed_out.weight", &[40, 8]), ("shared.weight", &[40, 8])]);
    let types = ModuleTypes::from_json(
        r#"{"embed_out": "Linear", "shared": "Embedding"}"#,
        Path::new("t.json"),
    )
    .unwrap();
    let plan = flax()
        .plan_with(
            &tensors,
            &PlanOptions {
                module_types: Some(types),
                ..PlanOptions::default()
            },
        )
        .unwrap();
    let t = targets(&plan);
    assert_eq!(t["params.embed_out.kernel"], (vec![1, 0], vec![8, 40]));
    assert_eq!(t["params.shared.embedding"], (vec![0, 1], vec![40, 8]));
    assert!(plan.entries.iter().all(|e| e.warning.is_none()));
    // A types file that is not a JSON object of strings names the file.
    for bad in ["[1, 2]", r#"{"a": 3}"#, "{"] {
        let err = ModuleTypes::from_json(bad, Path::new("bad.json")).unwrap_err();
        assert!(matches!(err, Error::ModuleTypes { .. }), "{bad}: {err:?}");
        assert!(
            err.to_string().starts_with("bad.json: module types:"),
            "{err}"
        );
    }
}

#[test]
fn dtype_applies_to_floating_tensors_only_and_a_rule_dtype_wins() {
    let mut tensors = f32s(&[("a.weight", &[2, 3]), ("b.weight", &[2, 3])]);
    tensors.push(info("steps", DType::I64, &[]));
    tensors.push(info("h", DType::BF16, &[4]));
    tensors.push(info("q", DType::F8E4M3, &[4]));
    let user = RuleSet::from_toml(
        r#"
[[rule]]
name = "keep-b-f32"
module = "b"
target = "b.{leaf}"
dtype = "f32"
"#,
        "user.toml",
    )
    .unwrap();
    let rules = RuleSet::preset("mlx").unwrap().layered(user);
    let plan = rules
        .plan_with(
            &tensors,
            &PlanOptions {
                dtype: Some(DType::F16),
                ..PlanOptions::default()
            },
        )
        .unwrap();
    let dtype_of = |n: &str| {
        let e = plan.entry_for(n).unwrap();
        (e.source_dtype, e.dtype)
    };
    assert_eq!(dtype_of("a.weight"), (DType::F32, DType::F16));
    assert_eq!(dtype_of("b.weight"), (DType::F32, DType::F32));
    assert_eq!(dtype_of("steps"), (DType::I64, DType::I64));
    assert_eq!(dtype_of("h"), (DType::BF16, DType::F16));
    assert_eq!(dtype_of("q"), (DType::F8E4M3, DType::F8E4M3));
    assert_eq!(
        plan.entry_for("a.weight").unwrap().describe_op(),
        "cast F32->F16"
    );
    assert_eq!(PlanOptions::parse_dtype("BF16").unwrap(), DType::BF16);
    assert!(PlanOptions::parse_dtype("f64").is_err());
    // NumPy's names of the castable dtypes, and no other dtype by its NumPy name.
    assert_eq!(PlanOptions::parse_dtype("bfloat16").unwrap(), DType::BF16);
    assert_eq!(PlanOptions::parse_dtype("Float16").unwrap(), DType::F16);
    assert_eq!(PlanOptions::parse_dtype("float32").unwrap(), DType::F32);
    for other in ["float64", "int8", "bool", "half", "float"] {
        assert!(PlanOptions::parse_dtype(other).is_err(), "{other}");
    }
    let mut o = PlanOptions::default();
    assert!(o.set("heads=12").is_ok() && o.vars["heads"] == "12");
    assert!(o.set("=3").is_err() && o.set("heads").is_err());
}

#[test]
fn split_reshape_and_requires_in_a_user_rule_file() {
    let text = r#"
[[rule]]
name = "qkv"
leaf = "qkv"
split = { axis = -1, parts = ["q", "k", "v"] }
perm = "A,B -> B,A"
reshape = "2, -1, A"
requires = { n = "qkv at '{module}' needs --set n=…" }
warn = "split {name}"
target = "{module}.{part}"
"#;
    let rules = RuleSet::from_toml(text, "u.toml").unwrap();
    let tensors = f32s(&[("m.qkv", &[5, 12])]);
    let err = rules.plan(&tensors).unwrap_err();
    assert_eq!(
        err.to_string(),
        "qkv at 'm' needs --set n=… (rule 'qkv' needs variable 'n')"
    );
    let plan = rules.plan_with(&tensors, &opts(&[("n", "1")])).unwrap();
    let t = ops(&plan);
    assert_eq!(t["m.k"], (Some((1, 4, 4)), vec![1, 0], vec![2, 2, 5]));
    assert_eq!(plan.entries[0].warning.as_deref(), Some("split m.qkv"));
    assert_eq!(
        plan.entries[2].describe_op(),
        "slice[1:8..12] + permute[1, 0] + reshape[2, 2, 5]"
    );
    // An axis that does not divide, a reshape that does not fit, an axis out of range.
    for (shape, why) in [
        (vec![5, 13], "does not split into 3 equal parts"),
        (vec![5, 9], "elements do not divide"),
        (vec![12], "split axis -1"),
    ] {
        let err = rules
            .plan_with(&f32s(&[("m.qkv", &shape)]), &opts(&[("n", "1")]))
            .unwrap_err();
        let text = err.to_string();
        let ok = text.contains(why) || (why == "split axis -1" && text.contains("perm"));
        assert!(ok, "{shape:?}: {text}");
    }
}

#[test]
fn malformed_split_reshape_and_dtype_keys_are_errors_at_their_line() {
    for (text, needle) in [
        (
            "[[rule]]\nname = \"r\"\nsplit = { axis = 0, parts = [\"a\", \"b\"] }\ntarget = \"x\"",
            "{part}",
        ),
        (
            "[[rule]]\nname = \"r\"\nsplit = { axis = 0, parts = [\"a\"] }\ntarget = \"x.{part}\"",
            "two parts",
        ),
        (
            "[[rule]]\nname = \"r\"\nsplit = { axis = 0, parts = [\"a\", \"a\"] }\ntarget = \"x.{part}\"",
            "named twice",
        ),
        ("[[rule]]\nname = \"r\"\ntarget = \"x.{part}\"", "needs a 'split'"),
        (
            "[[rule]]\nname = \"r\"\nreshape = \"-1, -1\"\ntarget = \"x\"",
            "more than one -1",
        ),
        (
            "[[rule]]\nname = \"r\"\nreshape = \"a+b\"\ntarget = \"x\"",
            "not an axis name",
        ),
        (
            "[[rule]]\nname = \"r\"\ndtype = \"F32\"\ntarget = \"x\"",
            "source_dtype",
        ),
        (
            "[[rule]]\nname = \"r\"\ndtype = [\"f32\"]\ntarget = \"x\"",
            "source_dtype",
        ),
        (
            "[[rule]]\nname = \"r\"\ndrop = true\nreshape = \"1\"",
            "drop",
        ),
    ] {
        let (origin, detail) = rules_error(text);
        assert_eq!(origin, "my-rules.toml");
        assert!(detail.contains(needle), "{text:?}: {detail}");
        assert!(detail.starts_with("line "), "{detail}");
    }
}

#[test]
fn every_preset_rule_has_a_description() {
    for name in RuleSet::preset_names() {
        for rule in RuleSet::preset(name).unwrap().rules() {
            assert!(
                !rule.description().is_empty(),
                "preset {name}: rule '{}' has no description",
                rule.name()
            );
        }
    }
}

/// GPT-2 as transformers writes it: Conv1D weights are (in, out), so their shape cannot
/// tell them from a Linear's (out, in); the class can.
fn gpt2_block() -> (Vec<TensorInfo>, ModuleTypes) {
    let tensors = f32s(&[
        ("wte.weight", &[50, 8]),
        ("h.0.ln_1.weight", &[8]),
        ("h.0.attn.c_attn.weight", &[8, 24]),
        ("h.0.attn.c_proj.weight", &[8, 8]),
        ("h.0.mlp.c_fc.weight", &[8, 32]),
        ("h.0.mlp.c_proj.weight", &[32, 8]),
        ("h.0.mlp.gate.weight", &[8, 8]),
    ]);
    // The README's one-liner on GPT2Model, plus a class no preset knows.
    let types = ModuleTypes::from_json(
        r#"{"": "GPT2Model", "wte": "Embedding", "h.0": "GPT2Block",
            "h.0.ln_1": "LayerNorm", "h.0.attn": "GPT2Attention",
            "h.0.attn.c_attn": "Conv1D", "h.0.attn.c_proj": "Conv1D",
            "h.0.mlp": "GPT2MLP", "h.0.mlp.c_fc": "Conv1D", "h.0.mlp.c_proj": "Conv1D",
            "h.0.mlp.gate": "MyGate"}"#,
        Path::new("types.json"),
    )
    .unwrap();
    (tensors, types)
}

#[test]
fn conv1d_is_recognised_by_class_and_keeps_the_transpose_of_the_untyped_plan() {
    let (tensors, types) = gpt2_block();
    let typed = PlanOptions {
        module_types: Some(types),
        ..PlanOptions::default()
    };
    for preset in ["flax", "nnx"] {
        let rules = RuleSet::preset(preset).unwrap();
        let by_name = rules.plan(&tensors).unwrap();
        let by_class = rules.plan_with(&tensors, &typed).unwrap();
        for name in [
            "h.0.attn.c_attn.weight",
            "h.0.attn.c_proj.weight",
            "h.0.mlp.c_fc.weight",
            "h.0.mlp.c_proj.weight",
        ] {
            let (old, new) = (
                by_name.entry_for(name).unwrap(),
                by_class.entry_for(name).unwrap(),
            );
            assert_eq!(new.rule, "conv1d-by-type", "{preset} {name}");
            assert_eq!(new.warning, None, "{preset} {name}");
            // The same op as before, so the same bytes: (in, out) to FlaxConv1D's (out, in).
            assert_eq!(
                (&new.target, &new.perm, &new.target_shape),
                (&old.target, &old.perm, &old.target_shape),
                "{preset} {name}"
            );
            assert_eq!(new.perm, vec![1, 0]);
        }
        assert_eq!(
            by_class
                .entry_for("h.0.attn.c_attn.weight")
                .unwrap()
                .target_shape,
            vec![24, 8]
        );
    }
}

#[test]
fn name_warnings_never_advise_module_types_when_it_was_given() {
    let (tensors, types) = gpt2_block();
    for preset in ["flax", "nnx"] {
        let rules = RuleSet::preset(preset).unwrap();
        let untyped = rules.plan(&tensors).unwrap();
        let w = untyped
            .entry_for("h.0.mlp.gate.weight")
            .unwrap()
            .warning
            .clone();
        assert!(w.unwrap().contains("pass --module-types"), "{preset}");
        let typed = rules
            .plan_with(
                &tensors,
                &PlanOptions {
                    module_types: Some(types.clone()),
                    ..PlanOptions::default()
                },
            )
            .unwrap();
        // Only the class no preset knows is still decided by name, and says so.
        let warned: Vec<(&str, &str)> = typed
            .entries
            .iter()
            .filter_map(|e| Some((e.source_name.as_str(), e.warning.as_deref()?)))
            .collect();
        assert_eq!(warned.len(), 1, "{preset}: {warned:?}");
        assert_eq!(warned[0].0, "h.0.mlp.gate.weight");
        assert!(
            warned[0].1.contains("taken as a Linear") && !warned[0].1.contains("pass --"),
            "{preset}: {}",
            warned[0].1
        );
    }
    // A rule file's own pair of notes.
    let rules = RuleSet::from_toml(
        "[[rule]]\nname = \"r\"\ntarget = \"{name}\"\nwarn = \"a\"\nwarn_with_module_types = \"b\"",
        "user.toml",
    )
    .unwrap();
    let plan = rules.plan(&tensors).unwrap();
    assert!(plan
        .entries
        .iter()
        .all(|e| e.warning.as_deref() == Some("a")));
    let plan = rules
        .plan_with(
            &tensors,
            &PlanOptions {
                module_types: Some(types),
                ..PlanOptions::default()
            },
        )
        .unwrap();
    assert!(plan
        .entries
        .iter()
        .all(|e| e.warning.as_deref() == Some("b")));
}

#[test]
fn every_mlx_lm_family_parses_and_no_two_serve_one_model_type() {
    let mut seen = std::collections::HashMap::new();
    for (name, text) in MLX_LM_FAMILIES {
        let set = RuleSet::from_toml(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!set.model_types().is_empty(), "{name} serves no model_type");
        for t in set.model_types() {
            assert!(
                seen.insert(t.clone(), name).is_none(),
                "{t} is served twice"
            );
        }
    }
    assert_eq!(
        RuleSet::families(MLX_LM_PRESET).len(),
        MLX_LM_FAMILIES.len()
    );
    assert!(RuleSet::families("flax").is_empty());
}

#[test]
fn rule_file_syntax_of_stacks_captures_and_config_is_checked_where_written() {
    let bad = [
        // A stack index that the tensor pattern does not capture.
        "[[rule]]\nname = \"s\"\ntensor = \"a.{x}.w\"\nstack = { index = \"e\", count = 2 }\ntarget = \"t\"",
        // A target that names the stack index: every part its own target.
        "[[rule]]\nname = \"s\"\ntensor = \"a.{e}.w\"\nstack = { index = \"e\", count = 2 }\ntarget = \"t.{e}\"",
        // A capture the rule has not got.
        "[[rule]]\nname = \"s\"\ntensor = \"a.{e}.w\"\ntarget = \"t.{f}\"",
        "[[rule]]\nname = \"s\"\ntensor = \"a.{e}.w\"\nstack = { index = \"e\", count = 0 }\ntarget = \"t\"",
        "[[rule]]\nname = \"s\"\ntensor = [\"a.{e}.w\", \"b.{f}.w\"]\ntarget = \"t\"",
        "[[rule]]\nname = \"s\"\ndrop = true\nstack = { index = \"e\", count = 2 }",
        "[output]\nnan = \"numpy\"",
        "[output]\nconfig = \"hf\"",
        "[[count]]\ntensor = \"a.{x}.w\"\nindex = \"y\"\ncount = 2",
    ];
    for text in bad {
        assert!(
            RuleSet::from_toml(text, "t.toml").is_err(),
            "accepted:\n{text}"
        );
    }
}

#[test]
fn stacks_collect_by_target_in_index_order_and_take_counts_from_variables() {
    let rules = RuleSet::from_toml(
        r#"
[[rule]]
name = "s"
tensor = "l.{layer}.e.{e}.w"
stack = { index = "e", count = "{n}" }
target = "l.{layer}.stacked"
"#,
        "t.toml",
    )
    .unwrap();
    // Indices out of order, two layers interleaved.
    let tensors = f32s(&[
        ("l.0.e.2.w", &[3, 4]),
        ("l.1.e.0.w", &[3, 4]),
        ("l.0.e.0.w", &[3, 4]),
        ("l.0.e.1.w", &[3, 4]),
        ("l.1.e.2.w", &[3, 4]),
        ("l.1.e.1.w", &[3, 4]),
    ]);
    let mut opts = PlanOptions::default();
    assert!(rules
        .plan_with(&tensors, &opts)
        .unwrap_err()
        .to_string()
        .contains("--set n="));
    opts.set("n=3").unwrap();
    let plan = rules.plan_with(&tensors, &opts).unwrap();
    assert_eq!(plan.entries.len(), 2);
    let l0 = &plan.entries[0];
    assert_eq!(l0.target, "l.0.stacked");
    assert_eq!(l0.target_shape, [3, 3, 4]);
    let order: Vec<&str> = l0.stack.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(order, ["l.0.e.0.w", "l.0.e.1.w", "l.0.e.2.w"]);
    assert_eq!(l0.sources(), [2, 3, 0]);
    opts.set("n=4").unwrap();
    let e = rules.plan_with(&tensors, &opts).unwrap_err().to_string();
    assert!(e.contains("missing: index 3"), "{e}");
    opts.set("n=99").unwrap();
    let e = rules.plan_with(&tensors, &opts).unwrap_err().to_string();
    assert!(e.contains("more than the 6 tensors"), "{e}");
}
