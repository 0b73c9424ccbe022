//! One report per command: the CLI's `--json` is the library's report struct serialized,
//! key for key and value for value (the Python package is checked against the CLI in
//! tests/python/test_package.py).

use std::ffi::{OsStr, OsString};

use relayout::{
    convert, open_and_plan, verify_report, Checkpoint, ConvertSpec, Device, InspectReport,
    OutputLayout, PlanReport,
};
use serde_json::Value;

use crate::common::{fixture, relayout, scratch};

fn cli_json(args: &[&dyn AsRef<OsStr>]) -> (bool, Value) {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let run = relayout(&refs);
    let doc = serde_json::from_slice(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        )
    });
    (run.status.success(), doc)
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().expect("an object").keys().cloned().collect()
}

#[test]
fn plan_json_is_the_plan_report_sharded_or_not() {
    let input = fixture("mixed.pt");
    let spec = ConvertSpec::new().preset("flax").allow_unmatched(true);
    let (ckpt, plan) = open_and_plan(&input, &spec).unwrap();

    let (ok, one) = cli_json(&[&"plan", &input, &"--preset", &"flax", &"--json"]);
    assert!(ok);
    let want = serde_json::to_value(PlanReport::new(&ckpt, &plan, None, None).unwrap()).unwrap();
    assert_eq!(one, want);
    assert!(one["shards"].is_null() && one["entries"][0]["shard"].is_null());

    let (ok, sharded) = cli_json(&[
        &"plan",
        &input,
        &"--preset",
        &"flax",
        &"--max-shard-size",
        &"2KB",
        &"--shards",
        &"2",
        &"--json",
    ]);
    assert!(ok);
    let layout = OutputLayout::sharded(&plan, 2000).unwrap();
    let want = PlanReport::new(&ckpt, &plan, Some(2000), Some(2)).unwrap();
    assert_eq!(sharded, serde_json::to_value(&want).unwrap());
    // The same keys either way: a script never meets a missing one.
    assert_eq!(keys(&one), keys(&sharded));
    let shards = want.shards().unwrap();
    assert!(shards.len() > 1);
    assert_eq!(
        shards.iter().map(|s| s.worker()).collect::<Vec<_>>(),
        (0..shards.len()).map(|k| Some(k % 2)).collect::<Vec<_>>()
    );
    assert!(want.entries().iter().all(|e| e.shard().is_some()));
    assert_eq!(want.total_size(), Some(layout.total_bytes()));
    // Each entry's bytes are what the converter writes for it.
    for (row, entry) in want.entries().iter().zip(plan.entries()) {
        assert_eq!(
            row.bytes(),
            relayout::Converter::entry_bytes(entry).unwrap() as u64
        );
        assert_eq!(
            (row.target(), row.op().to_string()),
            (entry.target(), entry.describe_op())
        );
    }
}

#[test]
fn inspect_json_is_the_inspect_report() {
    for name in ["mixed.pt", "dtypes_views.pt", "sharded"] {
        let input = fixture(name);
        let (ok, got) = cli_json(&[&"inspect", &input, &"--json"]);
        assert!(ok, "{name}");
        let ckpt = Checkpoint::open(&input).unwrap();
        let want = InspectReport::new(&ckpt);
        assert_eq!(got, serde_json::to_value(&want).unwrap(), "{name}");
        let by_dtype: u64 = want.bytes_by_dtype().values().sum();
        assert_eq!(want.bytes(), by_dtype);
        assert_eq!(
            want.bytes(),
            want.entries().iter().map(|t| t.bytes()).sum::<u64>(),
            "{name}"
        );
    }
}

#[test]
fn convert_json_is_the_convert_report() {
    let dir = scratch("reports-convert");
    let input = fixture("mixed.pt");
    let out = dir.join("shards");
    let (ok, got) = cli_json(&[
        &"convert",
        &input,
        &out,
        &"--preset",
        &"flax",
        &"--device",
        &"cpu",
        &"--max-shard-size",
        &"2KB",
        &"--json",
    ]);
    assert!(ok);
    let spec = ConvertSpec::new()
        .preset("flax")
        .device(Device::Cpu)
        .max_shard_size(Some(2000))
        .force(true);
    let report = convert(&input, &out, &spec, &mut |_| {}).unwrap();
    let mut want = serde_json::to_value(&report).unwrap();
    assert_eq!(keys(&got), keys(&want));
    // A run's time is its own; everything else is the same.
    for k in ["seconds", "gb_per_s"] {
        assert!(got[k].as_f64().unwrap() >= 0.0, "{k}");
        want[k] = got[k].clone();
    }
    assert_eq!(got, want);
    assert_eq!(got["input"], input.display().to_string());
    assert_eq!(got["shards_present"], got["shards"]);
    let gbps = report.bytes() as f64 / report.seconds() / 1e9;
    assert!((report.gb_per_s() - gbps).abs() <= 1e-9 * gbps.max(1.0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn verify_json_reports_a_mismatch_and_exits_non_zero() {
    let dir = scratch("reports-verify");
    let out = dir.join("cnn.safetensors");
    let spec = ConvertSpec::new().preset("flax").device(Device::Cpu);
    convert(fixture("small_cnn.pt"), &out, &spec, &mut |_| {}).unwrap();
    let expect = fixture("expect/small_cnn.mlx.json");

    let (ok, got) = cli_json(&[&"verify", &out, &"--expect", &expect, &"--json"]);
    assert!(!ok, "a mismatch exits non-zero");
    let want = verify_report(&out, &expect).unwrap();
    assert!(!want.is_ok());
    assert_eq!(got, serde_json::to_value(&want).unwrap());
    assert_eq!(got["ok"], false);
    assert_eq!(
        got["missing"].as_array().unwrap().len(),
        want.missing().len()
    );
    assert!(got["report"].as_str().unwrap().contains("missing"));

    let linen = fixture("expect/small_cnn.linen.json");
    let (ok, got) = cli_json(&[&"verify", &out, &"--expect", &linen, &"--json"]);
    assert!(ok);
    assert_eq!(got["ok"], true);
    assert_eq!(got["matched"], got["expected"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
