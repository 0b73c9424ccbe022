//! `relayout bench`: the table and the JSON it prints, on the CPU and (when an adapter
//! opens) the GPU, with a small size so the test is quick; nothing is left behind.

use crate::common::*;

fn bench(device: &str, dir: &std::path::Path) -> serde_json::Value {
    let run = relayout(&[
        "bench".as_ref(),
        "--device".as_ref(),
        device.as_ref(),
        "--size".as_ref(),
        "1MiB".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).expect("one JSON object")
}

#[test]
fn bench_measures_every_group_and_cleans_up() {
    let dir = scratch("bench");
    let mut devices = vec!["cpu"];
    if cfg!(feature = "gpu") && gpu_required() {
        devices.push("gpu");
    }
    for device in devices {
        let doc = bench(device, &dir);
        assert_eq!(doc["size_bytes"], 1 << 20);
        let rows = doc["results"].as_array().unwrap();
        let names = |group: &str| -> Vec<String> {
            rows.iter()
                .filter(|r| r["group"] == group)
                .map(|r| r["name"].as_str().unwrap().to_string())
                .collect()
        };
        for r in rows {
            assert!(r["gb_per_s"].as_f64().unwrap() > 0.0, "{r}");
            if let Some(x) = r["ratio"].as_f64() {
                assert!(x > 0.0, "{r}");
            }
        }
        let cpu = names("cpu kernel");
        assert!(cpu.iter().any(|n| n.starts_with("memcpy")), "{cpu:?}");
        for case in [
            "transpose F32",
            "transpose BF16",
            "transpose U8",
            "OIHW->HWIO F32",
        ] {
            assert!(cpu.iter().any(|n| n.starts_with(case)), "{case}: {cpu:?}");
        }
        let e2e = names("end to end");
        assert!(e2e.iter().any(|n| n.contains("--device cpu")), "{e2e:?}");
        if device == "gpu" {
            assert!(doc["adapter"]["name"].is_string());
            assert_eq!(names("transfer").len(), 2);
            let gpu = names("gpu kernel");
            for case in [
                "copy",
                "transpose F32",
                "transpose BF16",
                "transpose U8",
                "OIHW->HWIO BF16",
                "cast F32->BF16",
            ] {
                assert!(gpu.iter().any(|n| n.starts_with(case)), "{case}: {gpu:?}");
            }
            assert!(e2e.iter().any(|n| n.contains("--device gpu")), "{e2e:?}");
        } else {
            assert!(doc["adapter"].is_null());
            assert!(names("gpu kernel").is_empty());
        }
        // The generated checkpoint and its conversions are gone.
        assert_eq!(listing(&dir), Vec::<String>::new());
    }
    // The table: a header naming the adapter, then one markdown row per measurement.
    let run = relayout(&[
        "bench".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--size".as_ref(),
        "1MiB".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(table.contains("adapter: none (CPU only)"), "{table}");
    assert!(
        table.contains("| group | case | GB/s | ratio | against |"),
        "{table}"
    );
    assert!(
        table.contains("| cpu kernel | memcpy (1 thread) |"),
        "{table}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
