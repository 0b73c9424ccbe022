//! Hostile inputs and hostile events: size bombs, malformed headers, reserved names,
//! inputs that change under the map, a disk that fills up. Each must end in a clean
//! error naming the file, exit 1 from the binary, and nothing left behind.

use std::ffi::OsStr;
use std::path::Path;

use crate::common::*;
use relayout::backend::cpu::Cpu;
use relayout::{Checkpoint, Converter, Error, OpenOptions, RuleSet, WriteOptions};

fn hostile(name: &str) -> std::path::PathBuf {
    fixture(&format!("hostile/{name}"))
}

fn os<P: AsRef<OsStr> + ?Sized>(p: &P) -> &OsStr {
    p.as_ref()
}

/// Runs the binary, expecting exit 1, one error line containing every needle, and no
/// panic.
fn fails(args: &[&OsStr], needles: &[&str]) {
    let out = relayout(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: '{stderr}' lacks '{n}'");
    }
}

/// Identity rules for any tensor.
fn keep_rules(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("keep.toml");
    std::fs::write(&p, "[[rule]]\nname = \"keep\"\ntarget = \"{name}\"\n").unwrap();
    p
}

#[test]
fn a_stride_0_size_bomb_is_refused_before_anything_is_written() {
    let dir = scratch("bomb");
    let rules = keep_rules(&dir);
    let out = dir.join("out.safetensors");
    let bomb = hostile("expand_bomb.pt");
    for cmd in [
        vec![os("inspect"), os(&bomb)],
        vec![os("plan"), os(&bomb), os("-r"), os(&rules)],
        vec![os("convert"), os(&bomb), os(&out), os("-r"), os(&rules)],
    ] {
        fails(&cmd, &["expand_bomb.pt", "tensor 'w'", "--allow-expand"]);
    }
    // Allowed, it is still 4 TiB: refused by the free space check, nothing written.
    fails(
        &[
            os("convert"),
            os(&bomb),
            os(&out),
            os("-r"),
            os(&rules),
            os("--allow-expand"),
        ],
        &["needs 4.0 TiB", "free"],
    );
    assert_eq!(listing(&dir), ["keep.toml"]);
    // Two views of 2^63 bytes each: no overflow anywhere, a clean error with or without
    // --allow-expand.
    let overflow = hostile("expand_overflow.pt");
    for allow in [false, true] {
        let mut args = vec![os("convert"), os(&overflow), os(&out), os("-r"), os(&rules)];
        if allow {
            args.push(os("--allow-expand"));
        }
        fails(&args, &["overflows 2^63 bytes"]);
    }
    assert_eq!(listing(&dir), ["keep.toml"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_modest_expansion_converts_to_its_repeated_rows() {
    let ckpt = Checkpoint::open(hostile("expand_modest.pt")).unwrap();
    let plan = RuleSet::from_toml("[[rule]]\nname = \"keep\"\ntarget = \"{name}\"\n", "test")
        .unwrap()
        .plan(ckpt.tensors())
        .unwrap();
    let mut got = Vec::new();
    Converter::new(&ckpt, &plan, &Cpu::new())
        .for_each(|_, bytes| {
            got.extend_from_slice(bytes);
            Ok(())
        })
        .unwrap();
    let row: Vec<u8> = (0..1024).flat_map(|i| (i as f32).to_le_bytes()).collect();
    assert_eq!(got, row.repeat(16));
}

#[test]
fn malformed_safetensors_headers_are_refused_naming_the_problem() {
    for (file, needle) in [
        ("zero_overflow.safetensors", "overflows 2^63 bytes"),
        ("duplicate_key.safetensors", "the key 'w' appears twice"),
        ("hole.safetensors", "hole of 2 bytes"),
        ("trailing.safetensors", "3 bytes follow the last tensor"),
    ] {
        let path = hostile(file);
        let err = Checkpoint::open(&path).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(file) && text.contains(needle),
            "{file}: {text}"
        );
        fails(&[os("inspect"), os(&path)], &[file, needle]);
    }
}

#[test]
fn a_target_named_like_the_metadata_is_a_plan_error_naming_its_source() {
    let dir = scratch("meta-key");
    let out = dir.join("out.safetensors");
    let input = hostile("metadata_key.pt");
    for preset in ["mlx", "flax"] {
        let rules = keep_rules(&dir);
        fails(
            &[
                os("convert"),
                os(&input),
                os(&out),
                os("--preset"),
                os(preset),
                os("-r"),
                os(&rules),
            ],
            &["'__metadata__'", "cannot hold"],
        );
    }
    assert_eq!(listing(&dir), ["keep.toml"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn an_index_that_is_a_link_to_a_device_is_refused_without_reading_it() {
    let dir = scratch("index-link");
    let index = dir.join("model.safetensors.index.json");
    std::os::unix::fs::symlink("/dev/zero", &index).unwrap();
    for path in [index.as_path(), dir.as_path()] {
        let err = Checkpoint::open(path).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn transposing_plan(ckpt: &Checkpoint) -> relayout::Plan {
    RuleSet::from_toml(
        "[[rule]]\nname = \"t\"\ntarget = \"{name}\"\nperm = \"O,I -> I,O\"\n",
        "test",
    )
    .unwrap()
    .plan(ckpt.tensors())
    .unwrap()
}

#[test]
fn an_input_truncated_under_the_map_is_an_error_not_a_crash() {
    let dir = scratch("truncated");
    let input = dir.join("in.safetensors");
    big_input(&input, 6);
    let ckpt = Checkpoint::open(&input).unwrap();
    let plan = transposing_plan(&ckpt);
    let out = dir.join("out.safetensors");
    let mut bands = 0;
    // After the first band, the file loses its second half: reading there would raise
    // SIGBUS.
    let result = Converter::new(&ckpt, &plan, &Cpu::new())
        .with_band_bytes(1 << 20)
        .write_safetensors(&out, &WriteOptions::default(), &mut |_| {
            bands += 1;
            if bands == 2 {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&input)
                    .unwrap();
                f.set_len(12 << 20).unwrap();
            }
        });
    match result {
        Err(Error::InputChanged { path, detail }) => {
            assert_eq!(path, input);
            assert!(detail.contains("shrank"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&dir), ["in.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_input_overwritten_in_place_is_refused_before_the_commit() {
    let dir = scratch("overwritten");
    let input = dir.join("in.safetensors");
    big_input(&input, 2);
    // An old modification time, so the overwrite below changes it whatever the file
    // system's timestamp granularity.
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
    std::fs::File::options()
        .write(true)
        .open(&input)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let ckpt = Checkpoint::open(&input).unwrap();
    let plan = transposing_plan(&ckpt);
    let out = dir.join("out.safetensors");
    let mut calls = 0;
    let result = Converter::new(&ckpt, &plan, &Cpu::new())
        .with_band_bytes(1 << 20)
        .write_safetensors(&out, &WriteOptions::default(), &mut |_| {
            calls += 1;
            if calls == 2 {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&input)
                    .unwrap();
                f.write_all_at(&[0xEE; 4096], 4 << 20).unwrap();
            }
        });
    match result {
        Err(Error::InputChanged { path, detail }) => {
            assert_eq!(path, input);
            assert!(detail.contains("written"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&dir), ["in.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_free_space_check_names_what_is_needed_and_what_is_free() {
    let ckpt = Checkpoint::open_with(
        hostile("expand_bomb.pt"),
        &OpenOptions {
            allow_expand: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let plan = RuleSet::from_toml("[[rule]]\nname = \"keep\"\ntarget = \"{name}\"\n", "test")
        .unwrap()
        .plan(ckpt.tensors())
        .unwrap();
    let dir = scratch("space");
    let cpu = Cpu::new();
    for out in [dir.join("out.safetensors"), dir.join("shards")] {
        let converter = Converter::new(&ckpt, &plan, &cpu);
        let result = if out.extension().is_some() {
            converter.write_safetensors(&out, &WriteOptions::default(), &mut |_| {})
        } else {
            let shard = relayout::ShardOptions {
                max_shard_bytes: 1 << 30,
                worker: None,
            };
            converter.write_sharded(&out, &shard, &WriteOptions::default(), &mut |_| {})
        };
        match result {
            Err(e @ Error::NoSpace { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("needs 4.0 TiB") && text.contains("free"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
mod binary {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    fn convert_cmd(input: &Path, out: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayout"));
        let rules = out.parent().unwrap().join("t.toml");
        std::fs::write(
            &rules,
            "[[rule]]\nname = \"t\"\ntarget = \"{name}\"\nperm = \"O,I -> I,O\"\n",
        )
        .unwrap();
        cmd.arg("convert")
            .arg(input)
            .arg(out)
            .arg("-r")
            .arg(rules)
            // The naive backend is slow enough to be caught mid-way.
            .args(["--device", "reference", "-q"])
            .stderr(Stdio::piped());
        cmd
    }

    #[test]
    fn an_input_truncated_while_the_binary_converts_it_is_an_error() {
        let dir = scratch("bin-truncated");
        let input = dir.join("in.safetensors");
        big_input(&input, 48);
        let out_dir = dir.join("out");
        std::fs::create_dir_all(&out_dir).unwrap();
        let child = convert_cmd(&input, &out_dir.join("out.safetensors"))
            .spawn()
            .unwrap();
        wait_until_writing(child.id(), &out_dir);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&input)
            .unwrap()
            .set_len(100 << 20)
            .unwrap();
        let done = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        // Whether the fault or the final identity check sees it first, the run fails.
        assert_eq!(done.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("input changed while reading"), "{stderr}");
        assert_eq!(listing(&out_dir), ["t.toml"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sigkill_mid_write_leaves_nothing_visible() {
        let dir = scratch("bin-kill");
        let input = dir.join("in.safetensors");
        big_input(&input, 48);
        for out in ["out.safetensors", "shards"] {
            let out_dir = dir.join("out");
            std::fs::create_dir_all(&out_dir).unwrap();
            let out = out_dir.join(out);
            let mut cmd = convert_cmd(&input, &out);
            if out.extension().is_none() {
                // Into the existing folder (so the test can watch it) as 40 MB shards.
                cmd.args(["--max-shard-size", "40MB"]);
                std::fs::create_dir_all(&out).unwrap();
            }
            let mut child = cmd.spawn().unwrap();
            let watched = if out.is_dir() {
                out.clone()
            } else {
                out_dir.clone()
            };
            wait_until_writing(child.id(), &watched);
            child.kill().unwrap();
            child.wait().unwrap();
            let left: Vec<String> = listing(&out_dir)
                .into_iter()
                .filter(|n| n != "t.toml" && n != "shards")
                .collect();
            assert!(left.is_empty(), "{out:?}: {left:?}");
            if out.is_dir() {
                assert!(listing(&out).is_empty(), "{:?}", listing(&out));
            }
            std::fs::remove_dir_all(&out_dir).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_disk_that_fills_up_mid_write_leaves_nothing() {
        let dir = scratch("bin-full");
        let input = dir.join("in.safetensors");
        big_input(&input, 8);
        let mut cmd = convert_cmd(&input, &dir.join("out.safetensors"));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Files may not grow past 5 MiB: writes then fail with EFBIG, as on a
                // full disk, instead of killing the process with SIGXFSZ.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: 5 << 20,
                    rlim_max: 5 << 20,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let done = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("relayout: error:"), "{stderr}");
        assert_eq!(listing(&dir), ["in.safetensors", "t.toml"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
