//! The op vocabulary end to end: split, slice, reshape and cast through plans, every
//! backend and every band size, checked against a naive oracle that indexes the source
//! by hand; and the CLI flags that drive them (`--set`, `--dtype`, `--module-types`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::{all_backends, listing, load_safetensors, relayout, scratch, Rng, Tensor};
use relayout::backend::cpu::Cpu;
use relayout::layout::cast::cast_slice;
use relayout::layout::Cast;
use relayout::{Checkpoint, Converter, DType, ModuleTypes, PlanOptions, RuleSet, WriteOptions};
use safetensors::tensor::TensorView;

/// Embed dim and heads of the attention in [`attention_checkpoint`] unless a test asks
/// for others.
const E: usize = 12;
const H: usize = 3;

/// f32 values with distinct, exactly representable bit patterns (no two equal), so a
/// wrong index shows.
fn values(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 + 1.0) * if rng.next() & 1 == 0 { 1.0 } else { -1.0 } / 64.0)
        .collect()
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Source tensors by name: shape and values.
type Sources = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Writes a safetensors file of f32 tensors.
fn write_checkpoint(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), le_bytes(v)))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write checkpoint");
}

/// A transformer-ish block: a packed nn.MultiheadAttention at `blocks.0.attn`, a
/// ConvTranspose2d called `up` (only a types file can tell), a Linear and a LayerNorm.
fn attention_checkpoint(dir: &Path) -> (PathBuf, Sources) {
    sized_attention_checkpoint(dir, E)
}

fn sized_attention_checkpoint(dir: &Path, e: usize) -> (PathBuf, Sources) {
    let mut rng = Rng::new(11 + e as u64);
    let list: Vec<(&str, Vec<usize>)> = vec![
        ("blocks.0.attn.in_proj_weight", vec![3 * e, e]),
        ("blocks.0.attn.in_proj_bias", vec![3 * e]),
        ("blocks.0.attn.out_proj.weight", vec![e, e]),
        ("blocks.0.attn.out_proj.bias", vec![e]),
        ("blocks.0.ln.weight", vec![e]),
        ("blocks.0.ln.bias", vec![e]),
        ("blocks.0.fc.weight", vec![2 * e, e]),
        ("up.weight", vec![5, 3, 2, 4]),
    ];
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = list
        .into_iter()
        .map(|(n, s)| {
            let len = s.iter().product();
            (n, s, values(&mut rng, len))
        })
        .collect();
    let path = dir.join(if e == E {
        "block.safetensors".to_string()
    } else {
        format!("block{e}.safetensors")
    });
    write_checkpoint(&path, &tensors);
    let map = tensors
        .into_iter()
        .map(|(n, s, v)| (n.to_string(), (s, v)))
        .collect();
    (path, map)
}

/// Naive oracle: `out[i0, i1, …] = src[f(i0, i1, …)]` over the row-major output shape.
fn build(shape: &[usize], f: impl Fn(&[usize]) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut idx = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(f(&idx));
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Tensor {
        dtype: "F32".to_string(),
        shape: shape.to_vec(),
        bytes: le_bytes(&out),
    }
}

/// What the flax preset must make of [`attention_checkpoint`], element by element from
/// the definitions of the Flax layers (not from the library's index math).
fn flax_expected(src: &Sources) -> BTreeMap<String, Tensor> {
    flax_expected_heads(src, H)
}

fn flax_expected_heads(src: &Sources, heads: usize) -> BTreeMap<String, Tensor> {
    let w = |n: &str| src[n].1.clone();
    let e = src["blocks.0.ln.weight"].0[0];
    let (big_e, h, d) = (e, heads, e / heads);
    let (in_w, in_b) = (
        w("blocks.0.attn.in_proj_weight"),
        w("blocks.0.attn.in_proj_bias"),
    );
    let (out_w, out_b) = (
        w("blocks.0.attn.out_proj.weight"),
        w("blocks.0.attn.out_proj.bias"),
    );
    let m = "params.blocks_0.attn";
    let mut want = BTreeMap::new();
    for (p, part) in ["query", "key", "value"].iter().enumerate() {
        // DenseGeneral kernel[i, h, d] multiplies input i into head h, feature d: torch's
        // row p·E + h·D + d, column i.
        want.insert(
            format!("{m}.{part}.kernel"),
            build(&[big_e, h, d], |x| {
                in_w[(p * big_e + x[1] * d + x[2]) * big_e + x[0]]
            }),
        );
        want.insert(
            format!("{m}.{part}.bias"),
            build(&[h, d], |x| in_b[p * big_e + x[0] * d + x[1]]),
        );
    }
    // out.kernel[h, d, o] = out_proj.weight[o, h·D + d].
    want.insert(
        format!("{m}.out.kernel"),
        build(&[h, d, big_e], |x| out_w[x[2] * big_e + x[0] * d + x[1]]),
    );
    want.insert(format!("{m}.out.bias"), build(&[big_e], |x| out_b[x[0]]));
    let ln_w = w("blocks.0.ln.weight");
    let ln_b = w("blocks.0.ln.bias");
    want.insert(
        "params.blocks_0.ln.scale".to_string(),
        build(&[big_e], |x| ln_w[x[0]]),
    );
    want.insert(
        "params.blocks_0.ln.bias".to_string(),
        build(&[big_e], |x| ln_b[x[0]]),
    );
    let fc = w("blocks.0.fc.weight");
    want.insert(
        "params.blocks_0.fc.kernel".to_string(),
        build(&[big_e, 2 * big_e], |x| fc[x[1] * big_e + x[0]]),
    );
    // ConvTranspose2d (I=5, O=3, 2, 4) -> (2, 4, O, I) for transpose_kernel=True.
    let up = w("up.weight");
    want.insert(
        "params.up.kernel".to_string(),
        build(&[2, 4, 3, 5], |x| {
            up[((x[3] * 3 + x[2]) * 2 + x[0]) * 4 + x[1]]
        }),
    );
    want
}

/// Writes `plan` of `ckpt` to `out` (replacing it) with every backend in bands of every
/// size in `bands`, and checks each file holds exactly `want`.
fn assert_every_backend_and_band(
    ckpt: &Checkpoint,
    plan: &relayout::Plan,
    backends: &[Box<dyn relayout::Backend>],
    bands: &[usize],
    out: &Path,
    want: &BTreeMap<String, Tensor>,
    what: &str,
) {
    let opts = WriteOptions {
        force: true,
        ..Default::default()
    };
    for backend in backends {
        for &band in bands {
            let on = format!("{what} on {} band {band}", backend.name());
            Converter::new(ckpt, plan, backend.as_ref())
                .with_band_bytes(band)
                .write_safetensors(out, &opts, &mut |_| {})
                .unwrap_or_else(|e| panic!("{on}: {e}"));
            assert_eq!(&load_safetensors(out), want, "{on}");
        }
    }
}

fn flax_options() -> PlanOptions {
    let mut opts = PlanOptions::default();
    opts.set("heads=3").unwrap();
    opts.module_types = Some(
        ModuleTypes::from_json(
            r#"{"": "Net", "up": "ConvTranspose2d", "blocks.0.attn": "MultiheadAttention"}"#,
            Path::new("types.json"),
        )
        .unwrap(),
    );
    opts
}

#[test]
fn attention_sizes_around_every_tile_match_on_every_backend() {
    let dir = scratch("ops-sizes");
    let backends = all_backends();
    // Embed dims below, at and above the 8/32/64-wide tiles; heads of 1, a few and E.
    for (e, heads) in [
        (1, 1),
        (8, 2),
        (31, 31),
        (32, 4),
        (33, 3),
        (64, 8),
        (65, 5),
        (130, 10),
    ] {
        let (input, src) = sized_attention_checkpoint(&dir, e);
        let want = flax_expected_heads(&src, heads);
        let ckpt = Checkpoint::open(&input).unwrap();
        let mut opts = flax_options();
        opts.set(&format!("heads={heads}")).unwrap();
        let plan = RuleSet::preset("flax")
            .unwrap()
            .plan_with(ckpt.tensors(), &opts)
            .unwrap();
        assert_every_backend_and_band(
            &ckpt,
            &plan,
            &backends,
            &[4 * e + 4, 1 << 20],
            &dir.join("sized.safetensors"),
            &want,
            &format!("E {e} heads {heads}"),
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn attention_and_conv_transpose_match_the_flax_layer_definitions_on_every_backend_and_band() {
    let dir = scratch("ops-flax");
    let (input, src) = attention_checkpoint(&dir);
    let want = flax_expected(&src);
    let ckpt = Checkpoint::open(&input).unwrap();
    let plan = RuleSet::preset("flax")
        .unwrap()
        .plan_with(ckpt.tensors(), &flax_options())
        .unwrap();
    assert!(plan.unmatched().is_empty());
    // Bands of one element up to whole tensors: splits straddle every part boundary.
    assert_every_backend_and_band(
        &ckpt,
        &plan,
        &all_backends(),
        &[1, 4, 12, 36, 100, 4096, 1 << 20],
        &dir.join("out.safetensors"),
        &want,
        "flax",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn casts_fused_with_split_and_permute_equal_the_cast_of_the_f32_result() {
    let dir = scratch("ops-cast");
    let (input, src) = attention_checkpoint(&dir);
    let want_f32 = flax_expected(&src);
    let ckpt = Checkpoint::open(&input).unwrap();
    for to in [DType::BF16, DType::F16] {
        let opts = PlanOptions {
            dtype: Some(to),
            ..flax_options()
        };
        let plan = RuleSet::preset("flax")
            .unwrap()
            .plan_with(ckpt.tensors(), &opts)
            .unwrap();
        let cast = Cast::new(DType::F32, to).unwrap().unwrap();
        let want: BTreeMap<String, Tensor> = want_f32
            .iter()
            .map(|(n, t)| {
                let mut bytes = vec![0u8; t.bytes.len() / 2];
                cast_slice(cast, &t.bytes, &mut bytes).unwrap();
                let dtype = format!("{to:?}");
                (
                    n.clone(),
                    Tensor {
                        dtype,
                        bytes,
                        shape: t.shape.clone(),
                    },
                )
            })
            .collect();
        assert_every_backend_and_band(
            &ckpt,
            &plan,
            &all_backends(),
            &[2, 6, 50, 1 << 20],
            &dir.join("cast.safetensors"),
            &want,
            &to.to_string(),
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn streaming_api_hands_out_split_and_cast_tensors() {
    let dir = scratch("ops-stream");
    let (input, src) = attention_checkpoint(&dir);
    let want = flax_expected(&src);
    let ckpt = Checkpoint::open(&input).unwrap();
    let plan = RuleSet::preset("flax")
        .unwrap()
        .plan_with(ckpt.tensors(), &flax_options())
        .unwrap();
    let mut seen = BTreeMap::new();
    Converter::new(&ckpt, &plan, &Cpu::new())
        .for_each(|entry, bytes| {
            seen.insert(entry.target().to_string(), bytes.to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(seen.len(), want.len());
    for (name, t) in &want {
        assert_eq!(seen[name], t.bytes, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(|a| a.into()).collect()
}

fn run(args: &[std::ffi::OsString]) -> std::process::Output {
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    relayout(&refs)
}

#[test]
fn cli_set_dtype_and_module_types_drive_the_conversion() {
    let dir = scratch("ops-cli");
    let (input, src) = attention_checkpoint(&dir);
    let types = dir.join("types.json");
    std::fs::write(&types, r#"{"": "Net", "up": "ConvTranspose2d"}"#).unwrap();
    let out = dir.join("out.safetensors");
    let base = |extra: &[&str]| {
        let mut a = vec![
            "convert".into(),
            input.clone().into_os_string(),
            out.clone().into_os_string(),
        ];
        a.extend(os(&["--preset", "flax", "--device", "cpu", "--force"]));
        a.extend(os(extra));
        a
    };
    // Without heads: one line naming the module and the flag, exit 1, nothing written.
    let o = run(&base(&["--module-types", types.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("nn.MultiheadAttention at 'blocks.0.attn': pass --set heads=H"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(listing(&dir), ["block.safetensors", "types.json"]);

    let o = run(&base(&[
        "--set",
        "heads=3",
        "--module-types",
        types.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(load_safetensors(&out), flax_expected(&src));

    let o = run(&base(&[
        "--set",
        "heads=3",
        "--module-types",
        types.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_safetensors(&out);
    assert!(got.values().all(|t| t.dtype == "BF16"));
    assert_eq!(got.len(), flax_expected(&src).len());

    // A bad --dtype and a broken types file are clear errors.
    let o = run(&base(&["--set", "heads=3", "--dtype", "f64"]));
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    std::fs::write(&types, "[]").unwrap();
    let o = run(&base(&[
        "--set",
        "heads=3",
        "--module-types",
        types.to_str().unwrap(),
    ]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("types.json: module types:"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_plan_shows_ops_name_warnings_and_shadowed_preset_rules() {
    let dir = scratch("ops-plan");
    let (input, _) = attention_checkpoint(&dir);
    let rules = dir.join("mine.toml");
    std::fs::write(
        &rules,
        r#"
[[rule]]
name = "all-deconv"
module_last = "up"
leaf = "weight"
target = "params.up.kernel"
perm = "I,O,*S -> *S,O,I"
"#,
    )
    .unwrap();
    let o = run(&[
        "plan".into(),
        input.clone().into_os_string(),
        "--preset".into(),
        "flax".into(),
        "--set".into(),
        "heads=3".into(),
        "--rules".into(),
        rules.clone().into_os_string(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("params.blocks_0.attn.key.kernel")
            && text.contains("slice[0:12..24] + permute[1, 0] + reshape[12, 3, 4]"),
        "{text}"
    );
    assert!(
        text.contains("warning: rank-2 weight taken as a Linear")
            && text.contains("blocks.0.fc.weight"),
        "{text}"
    );
    // The preset's conv rule only ever saw `up.weight`, which the user's rule took.
    assert!(
        text.contains("warning: preset flax rule 'conv-kernel' is unreachable"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The ```toml blocks of the README, in order.
fn readme_toml_blocks() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn readme_rule_file_example_works_as_written() {
    let blocks: Vec<String> = readme_toml_blocks()
        .into_iter()
        .filter(|b| b.starts_with("# my-rules.toml"))
        .collect();
    assert_eq!(blocks.len(), 1, "README toml blocks: {blocks:?}");
    let user = RuleSet::from_toml(&blocks[0], "README.md").unwrap();
    let rules = RuleSet::preset("flax").unwrap().layered(user);
    let info = |name: &str, shape: &[usize]| {
        relayout::TensorInfo::contiguous(name, DType::F32, shape.to_vec())
    };
    let tensors = [
        info("lm_head.weight", &[100, 16]),
        info("dec.upsample1.weight", &[8, 4, 3, 2]),
        info("blocks.0.attn.qkv.weight", &[24, 8]),
        info("blocks.0.attn.qkv.bias", &[24]),
    ];
    let err = rules.plan(&tensors).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("fused qkv at 'blocks.0.attn.qkv': pass --set heads=H"),
        "{err}"
    );
    let mut opts = PlanOptions {
        dtype: Some(DType::BF16),
        ..PlanOptions::default()
    };
    opts.set("heads=2").unwrap();
    let plan = rules.plan_with(&tensors, &opts).unwrap();
    let got: BTreeMap<&str, (&[usize], DType, Option<usize>)> = plan
        .entries()
        .iter()
        .map(|e| {
            (
                e.target(),
                (e.target_shape(), e.dtype(), e.slice().map(|s| s.start())),
            )
        })
        .collect();
    let want: BTreeMap<&str, (&[usize], DType, Option<usize>)> = BTreeMap::from([
        (
            "params.lm_head.embedding",
            (&[100, 16][..], DType::BF16, None),
        ),
        (
            "params.dec.upsample1.kernel",
            (&[3, 2, 4, 8][..], DType::BF16, None),
        ),
        (
            "params.blocks_0.attn.query.kernel",
            (&[8, 2, 4][..], DType::F32, Some(0)),
        ),
        (
            "params.blocks_0.attn.key.kernel",
            (&[8, 2, 4][..], DType::F32, Some(8)),
        ),
        (
            "params.blocks_0.attn.value.kernel",
            (&[8, 2, 4][..], DType::F32, Some(16)),
        ),
        (
            "params.blocks_0.attn.qkv.bias",
            (&[24][..], DType::BF16, None),
        ),
    ]);
    assert_eq!(got, want);
    assert_eq!(
        plan.entry_for("dec.upsample1.weight").unwrap().perm(),
        [2, 3, 1, 0]
    );
}

#[test]
fn readme_family_rule_file_example_stacks_and_checks_as_written() {
    let blocks: Vec<String> = readme_toml_blocks()
        .into_iter()
        .filter(|b| b.starts_with("# my_moe.toml"))
        .collect();
    assert_eq!(blocks.len(), 1, "README toml blocks: {blocks:?}");
    let family = RuleSet::from_toml(&blocks[0], "README.md").unwrap();
    assert_eq!(family.model_types(), ["my_moe"]);
    let rules = RuleSet::from_toml("[[rule]]\nname = \"keep\"\ntarget = \"{name}\"", "base")
        .unwrap()
        .layered(family);
    let info = |name: String, shape: &[usize]| {
        relayout::TensorInfo::contiguous(&name, DType::F32, shape.to_vec())
    };
    let mut tensors = Vec::new();
    for l in 0..2 {
        tensors.push(info(
            format!("model.layers.{l}.self_attn.q_proj.weight"),
            &[4, 4],
        ));
        tensors.push(info(
            format!("model.layers.{l}.self_attn.rotary_emb.inv_freq"),
            &[2],
        ));
        for e in 0..8 {
            tensors.push(info(
                format!("model.layers.{l}.moe.experts.{e}.w1.weight"),
                &[6, 4],
            ));
        }
    }
    let config = |text: &str| {
        relayout::model::ModelConfig::from_text(text, std::path::Path::new("config.json")).unwrap()
    };
    let opts = PlanOptions {
        config: Some(config(
            r#"{"model_type": "my_moe", "num_hidden_layers": 2}"#,
        )),
        ..PlanOptions::default()
    };
    let plan = rules.plan_with(&tensors, &opts).unwrap();
    let stacked = plan
        .entries()
        .iter()
        .find(|e| e.target() == "model.layers.1.moe.switch_mlp.w1.weight")
        .unwrap();
    assert_eq!(
        stacked.target_shape(),
        [8, 6, 4],
        "num_experts from config_defaults"
    );
    assert_eq!(plan.dropped().len(), 2);
    let opts = PlanOptions {
        config: Some(config(
            r#"{"model_type": "my_moe", "num_hidden_layers": 3}"#,
        )),
        ..PlanOptions::default()
    };
    let err = rules.plan_with(&tensors, &opts).unwrap_err().to_string();
    assert!(
        err.contains("num_hidden_layers") && err.contains("0, 1"),
        "{err}"
    );
}
