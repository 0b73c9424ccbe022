//! Model folders: the config, tokenizer and other files beside the weights reach a folder
//! output in the same commit, for every preset; links are followed, FIFOs refused,
//! `--no-copy-files`, `--force`, workers and `merge-index --from`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::common::*;
use serde_json::Value;

/// The files a model folder has beside its weights that a folder output receives.
const COPIED: [&str; 8] = [
    "LICENSE",
    "README.md",
    "config.json",
    "generation_config.json",
    "merges.txt",
    "modeling_x.py",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// A model folder in the layout of a Hugging Face cache snapshot: the weights and some
/// copied files are links into a `blobs` folder; beside them, files that are not copied
/// (hidden files, other weights, a subfolder, unknown names).
fn model_folder(root: &Path) -> PathBuf {
    let blobs = root.join("blobs");
    let dir = root.join("snapshot");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(dir.join("subfolder")).unwrap();
    std::fs::copy(fixture("mixed.safetensors"), blobs.join("w")).unwrap();
    std::os::unix::fs::symlink("../blobs/w", dir.join("model.safetensors")).unwrap();
    for (i, name) in COPIED.iter().enumerate() {
        let text = format!("{{\"file\": \"{name}\", \"n\": {i}}}\n");
        if i % 2 == 0 {
            let blob = blobs.join(format!("b{i}"));
            std::fs::write(&blob, text).unwrap();
            std::os::unix::fs::symlink(format!("../blobs/b{i}"), dir.join(name)).unwrap();
        } else {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }
    for name in [
        ".gitattributes",
        "notes.txt",
        "tf_model.h5",
        "training_args.bin",
        "model.safetensors.index.json.bak",
        "subfolder/config.json",
    ] {
        std::fs::write(dir.join(name), "not copied").unwrap();
    }
    dir
}

fn run(args: &[&OsStr]) -> (bool, String, String) {
    let out = relayout(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn convert_args<'a>(input: &'a Path, output: &'a Path, preset: &'a str) -> Vec<&'a OsStr> {
    vec![
        OsStr::new("convert"),
        input.as_os_str(),
        output.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new(preset),
        OsStr::new("--allow-unmatched"),
        OsStr::new("--device"),
        OsStr::new("cpu"),
    ]
}

#[test]
fn folder_outputs_receive_the_model_files_for_every_preset() {
    let root = scratch("model-folder-presets");
    let input = model_folder(&root);
    for preset in ["flax", "nnx", "mlx"] {
        let out = root.join(format!("out-{preset}"));
        let (ok, _, err) = run(&convert_args(&input, &out, preset));
        assert!(ok, "{preset}: {err}");
        let mut want: Vec<String> = COPIED.iter().map(|s| s.to_string()).collect();
        want.extend([
            "model.safetensors".into(),
            "model.safetensors.index.json".into(),
        ]);
        want.sort();
        assert_eq!(listing(&out), want, "{preset}");
        for name in COPIED {
            assert_eq!(
                std::fs::read(out.join(name)).unwrap(),
                std::fs::read(input.join(name)).unwrap(),
                "{preset}: {name}"
            );
            let meta = std::fs::symlink_metadata(out.join(name)).unwrap();
            assert!(
                meta.is_file(),
                "{preset}: {name} is a regular file, not a link"
            );
        }
    }
    // A file inside the folder, or its index, is the same model folder.
    let out = root.join("out-file-input");
    let model = input.join("model.safetensors");
    assert!(run(&convert_args(&model, &out, "mlx")).0);
    assert!(out.join("tokenizer.json").is_file());
    // One .safetensors file is not a folder: nothing is copied beside it.
    let one = root.join("one.safetensors");
    assert!(run(&convert_args(&input, &one, "mlx")).0);
    assert!(!root.join("config.json").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn no_copy_files_writes_only_the_weights() {
    let root = scratch("model-folder-no-copy");
    let input = model_folder(&root);
    let out = root.join("out");
    let mut args = convert_args(&input, &out, "mlx");
    args.push(OsStr::new("--no-copy-files"));
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");
    assert_eq!(
        listing(&out),
        ["model.safetensors", "model.safetensors.index.json"]
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn plan_and_json_list_the_copied_files() {
    let root = scratch("model-folder-plan");
    let input = model_folder(&root);
    let (ok, text, err) = run(&[
        OsStr::new("plan"),
        input.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx"),
        OsStr::new("--json"),
    ]);
    assert!(ok, "{err}");
    let plan: Value = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = plan["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, COPIED);
    let first = &plan["copied"][0];
    assert_eq!(
        first["bytes"].as_u64(),
        Some(std::fs::metadata(input.join("LICENSE")).unwrap().len())
    );
    assert_eq!(first["rewritten"], Value::Bool(false));
    // The source is where the link leads.
    assert!(first["source"].as_str().unwrap().contains("blobs"));
    let (ok, text, _) = run(&[
        OsStr::new("plan"),
        input.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx"),
    ]);
    assert!(ok);
    assert!(text.contains("8 file(s) of the model folder"), "{text}");
    assert!(text.contains("tokenizer_config.json"), "{text}");
    let out = root.join("out");
    let mut args = convert_args(&input, &out, "mlx");
    args.push(OsStr::new("--json"));
    let (ok, text, err) = run(&args);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&text).unwrap();
    let copied: Vec<String> = report["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = COPIED
        .iter()
        .map(|n| out.join(n).to_string_lossy().into_owned())
        .collect();
    assert_eq!(copied, want);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_existing_copy_is_refused_without_force_and_replaced_with_it() {
    let root = scratch("model-folder-force");
    let input = model_folder(&root);
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tokenizer.json"), "older").unwrap();
    let (ok, _, err) = run(&convert_args(&input, &out, "mlx"));
    assert!(!ok);
    assert!(
        err.contains("tokenizer.json") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        listing(&out),
        ["tokenizer.json"],
        "nothing else was written"
    );
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), b"older");
    let mut args = convert_args(&input, &out, "mlx");
    args.push(OsStr::new("--force"));
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(input.join("tokenizer.json")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_fifo_among_the_copied_names_is_refused_and_nothing_is_left() {
    let root = scratch("model-folder-fifo");
    let input = model_folder(&root);
    let fifo = input.join("vocab.json");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = root.join("out");
    let (ok, _, err) = run(&convert_args(&input, &out, "mlx"));
    assert!(!ok);
    assert!(
        err.contains("vocab.json") && err.contains("not a regular file"),
        "{err}"
    );
    assert!(!out.exists(), "the output folder was not left behind");
    // A FIFO under a name that is not copied is never opened.
    std::fs::remove_file(&fifo).unwrap();
    let other = input.join("unrelated.pipe");
    let c = std::ffi::CString::new(other.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(run(&convert_args(&input, &out, "mlx")).0);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_worker_that_completes_the_set_writes_the_files_and_merge_index_can() {
    let root = scratch("model-folder-workers");
    let input = model_folder(&root);
    let out = root.join("out");
    let worker = |i: usize| {
        let mut args: Vec<std::ffi::OsString> = convert_args(&input, &out, "mlx")
            .into_iter()
            .map(|s| s.to_os_string())
            .collect();
        args.extend(["--max-shard-size".into(), "2KB".into()]);
        args.extend(["--shard".into(), format!("{i}/2").into()]);
        let refs: Vec<&OsStr> = args.iter().map(|s| s.as_os_str()).collect();
        run(&refs)
    };
    let (ok, _, err) = worker(0);
    assert!(ok, "{err}");
    assert!(
        !out.join("config.json").exists(),
        "the set is not complete yet"
    );
    assert!(!out.join("model.safetensors.index.json").exists());
    let (ok, text, err) = worker(1);
    assert!(ok, "{err}");
    assert!(text.contains("copied from the model folder"), "{text}");
    for name in COPIED {
        assert!(out.join(name).is_file(), "{name}");
    }
    // A re-run finds everything in place and keeps it.
    assert!(worker(0).0);
    // merge-index --from writes the index and the files again, from the input.
    for name in COPIED {
        std::fs::remove_file(out.join(name)).unwrap();
    }
    std::fs::remove_file(out.join("model.safetensors.index.json")).unwrap();
    let (ok, text, err) = run(&[
        OsStr::new("merge-index"),
        out.as_os_str(),
        OsStr::new("--from"),
        input.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("mlx"),
    ]);
    assert!(ok, "{err}");
    assert!(text.contains("config.json"), "{text}");
    for name in COPIED {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(input.join(name)).unwrap(),
            "{name}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
