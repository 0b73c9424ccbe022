//! Strict verification end to end: `--expect` on `plan` and `convert`, and
//! `relayout verify`, on small_cnn.pt against expectations written by the real Flax
//! linen, Flax NNX and MLX code of tests/fixtures/expect/make_expectations.py.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::common::*;
use relayout::{convert, ConvertSpec, Device, Error};
use serde_json::{json, Value};

fn expectation(name: &str) -> PathBuf {
    fixture(&format!("expect/{name}"))
}

fn cli(args: &[&dyn AsRef<OsStr>]) -> std::process::Output {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    relayout(&refs)
}

fn plan(preset: &str, expect: &Path, extra: &[&str]) -> std::process::Output {
    let input = fixture("small_cnn.pt");
    let mut args: Vec<&dyn AsRef<OsStr>> =
        vec![&"plan", &input, &"--preset", &preset, &"--expect", &expect];
    args.extend(extra.iter().map(|a| a as &dyn AsRef<OsStr>));
    cli(&args)
}

fn convert_cli(preset: &str, out: &Path, expect: &Path, extra: &[&str]) -> std::process::Output {
    let input = fixture("small_cnn.pt");
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![
        &"convert",
        &input,
        &out,
        &"--preset",
        &preset,
        &"--device",
        &"cpu",
        &"--expect",
        &expect,
    ];
    args.extend(extra.iter().map(|a| a as &dyn AsRef<OsStr>));
    cli(&args)
}

fn verify(out: &Path, expect: &Path) -> std::process::Output {
    cli(&[&"verify", &out, &"--expect", &expect])
}

fn stderr(run: &std::process::Output) -> String {
    String::from_utf8_lossy(&run.stderr).into_owned()
}

fn assert_ok(run: &std::process::Output, what: &str) {
    assert!(run.status.success(), "{what}: {}", stderr(run));
}

/// Fails with exit 1, the report lines `want` on stderr, and a last line naming the
/// expectation file.
fn assert_report(run: &std::process::Output, expect: &Path, want: &[&str], what: &str) {
    let err = stderr(run);
    assert_eq!(run.status.code(), Some(1), "{what}: {err}");
    for line in want {
        assert!(
            err.lines().any(|l| l == *line),
            "{what}: no '{line}' in\n{err}"
        );
    }
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("relayout: error: ") && last.contains(&*expect.to_string_lossy()),
        "{what}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn expectations_written_by_flax_nnx_and_mlx_pass_plan_convert_and_verify() {
    let dir = scratch("verify-pass");
    let cases = [
        ("flax", expectation("small_cnn.linen.json")),
        ("flax", expectation("small_cnn.flax.msgpack")),
        ("flax", fixture("small_cnn.flax.safetensors")),
        ("nnx", expectation("small_cnn.nnx.json")),
        ("mlx", expectation("small_cnn.mlx.json")),
    ];
    for (preset, expect) in cases {
        let what = format!("{preset} {}", expect.display());
        assert_ok(&plan(preset, &expect, &[]), &what);
        assert_ok(&plan(preset, &expect, &["--json"]), &what);
        let out = dir.join(format!("{preset}.safetensors"));
        assert_ok(&convert_cli(preset, &out, &expect, &["--force"]), &what);
        let run = verify(&out, &expect);
        assert_ok(&run, &what);
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            format!("ok: 37 tensors match {}\n", expect.display()),
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The linen expectation with `edit` applied, written into `dir`.
fn edited(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> PathBuf {
    let text = std::fs::read_to_string(expectation("small_cnn.linen.json")).unwrap();
    let Value::Object(mut map) = serde_json::from_str(&text).unwrap() else {
        panic!("not an object");
    };
    edit(&mut map);
    let path = dir.join(name);
    std::fs::write(&path, Value::Object(map).to_string()).unwrap();
    path
}

#[test]
fn a_missing_unexpected_or_mismatched_tensor_fails_before_anything_is_written() {
    let dir = scratch("verify-fail");
    let expects = dir.join("expect");
    std::fs::create_dir_all(&expects).unwrap();
    let missing = edited(&expects, "missing.json", |m| {
        m.insert("params.head.kernel".into(), json!({"shape": [16, 10]}));
        m.insert("params.layer1_0.bn3.scale".into(), json!([16]));
        m.insert("params.layer1_0.bn3.bias".into(), json!([16]));
    });
    let unexpected = edited(&expects, "unexpected.json", |m| {
        m.retain(|k, _| !k.starts_with("batch_stats.") && !k.starts_with("params.fc."));
    });
    let mismatched = edited(&expects, "mismatched.json", |m| {
        m.insert(
            "params.fc.kernel".into(),
            json!({"shape": [10, 16], "dtype": "float32"}),
        );
        m.insert(
            "params.conv1.kernel".into(),
            json!({"shape": [7, 7, 3, 8], "dtype": "BF16"}),
        );
    });
    let linen = expectation("small_cnn.linen.json");
    let cases: [(&Path, &[&str], &[&str]); 4] = [
        (
            &missing,
            &[],
            &[
                "missing     params.head.kernel",
                "missing     params.layer1_0.bn3.{bias,scale}",
            ],
        ),
        (
            &unexpected,
            &[],
            &[
                "unexpected  batch_stats.* (14 tensors)",
                "unexpected  params.fc.{bias,kernel}",
            ],
        ),
        (
            &mismatched,
            &[],
            &[
                "mismatched  params.conv1.kernel: [7, 7, 3, 8] F32, expected [7, 7, 3, 8] BF16",
                "mismatched  params.fc.kernel: [16, 10] F32, expected [10, 16] F32 (same sizes, other axis order)",
            ],
        ),
        (
            &linen,
            &["--dtype", "bf16"],
            &[
                "mismatched  batch_stats.* (14 tensors): BF16, expected F32",
                "mismatched  params.* (23 tensors): BF16, expected F32",
            ],
        ),
    ];
    let out = dir.join("out.safetensors");
    for (expect, extra, lines) in cases {
        let what = expect.display().to_string();
        assert_report(&plan("flax", expect, extra), expect, lines, &what);
        assert_report(
            &convert_cli("flax", &out, expect, extra),
            expect,
            lines,
            &what,
        );
        assert_eq!(listing(&dir), ["expect"], "{what}: output left behind");
    }
    let run = convert_cli("flax", &out, &mismatched, &[]);
    assert!(
        stderr(&run).ends_with(
            " 0 missing, 0 unexpected and 2 mismatched tensor(s) against the 37 expected\n"
        ),
        "{}",
        stderr(&run)
    );

    // `verify` reports the same on an existing output, and leaves it alone.
    assert_ok(&convert_cli("flax", &out, &linen, &[]), "good");
    let before = std::fs::read(&out).unwrap();
    for (expect, _, lines) in cases.iter().take(3) {
        assert_report(&verify(&out, expect), expect, lines, "verify");
    }
    assert_eq!(std::fs::read(&out).unwrap(), before);
    // An output for another framework is told apart from this one.
    let mlx = expectation("small_cnn.mlx.json");
    assert_report(&verify(&out, &mlx), &mlx, &[], "mlx vs flax");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn library_convert_enforces_the_expectation_of_its_spec() {
    let dir = scratch("verify-lib");
    let out = dir.join("out.safetensors");
    let spec = |expect: PathBuf| {
        ConvertSpec::new()
            .preset("nnx")
            .device(Device::Cpu)
            .expect(expect)
    };
    let flax = expectation("small_cnn.linen.json");
    let err = convert(
        fixture("small_cnn.pt"),
        &out,
        &spec(flax.clone()),
        &mut |_| {},
    )
    .unwrap_err();
    let Error::Verify {
        file,
        missing,
        unexpected,
        report,
        ..
    } = &err
    else {
        panic!("expected Error::Verify, got {err:?}");
    };
    assert_eq!(file, &flax);
    assert_eq!((*missing, *unexpected), (37, 37));
    assert!(
        report.contains("missing     params.* (23 tensors)\n"),
        "{report}"
    );
    assert!(listing(&dir).is_empty());

    let nnx = expectation("small_cnn.nnx.json");
    let done = convert(
        fixture("small_cnn.pt"),
        &out,
        &spec(nnx.clone()),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(done.tensors(), 37);
    assert_eq!(relayout::verify_file(&out, &nnx).unwrap(), 37);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_malformed_or_absent_expectation_is_a_one_line_error_naming_it() {
    let dir = scratch("verify-bad-file");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "[1, 2, 3]").unwrap();
    let absent = dir.join("absent.json");
    let out = dir.join("out.safetensors");
    for expect in [&bad, &absent] {
        for run in [
            convert_cli("flax", &out, expect, &[]),
            plan("flax", expect, &[]),
            verify(&fixture("small_cnn.flax.safetensors"), expect),
        ] {
            let err = stderr(&run);
            assert_eq!(run.status.code(), Some(1), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(&*expect.to_string_lossy()), "{err}");
        }
    }
    let run = verify(&fixture("small_cnn.flax.safetensors"), &bad);
    assert!(
        stderr(&run).contains("not a valid expectation file: the top level is not a JSON object")
    );
    assert_eq!(listing(&dir), ["bad.json"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
