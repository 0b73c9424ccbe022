//! Sharded output: the split, the files' layout, the index, workers on many processes,
//! `merge-index`, and what a failure or an interrupt leaves behind.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::common::*;
use relayout::backend::cpu::Cpu;
use relayout::shard::{shard_name, INDEX_NAME};
use relayout::writer::{HeaderEntry, SafetensorsWriter};
use relayout::{
    rule_set, Checkpoint, Converter, DType, Error, Interrupt, OutputKind, Plan, PlanOptions,
    ShardOptions, Worker, WriteOptions,
};
use serde_json::Value;

/// Rank-2 tensors are transposed, everything else copied, names kept: every tensor of a
/// generated checkpoint is mapped, whatever its dtype.
const RULES: &str = r#"
[[rule]]
name = "t2"
rank = 2
target = "out.{name}"
perm = "O,I -> I,O"

[[rule]]
name = "keep"
target = "out.{name}"
"#;

/// Tensors of every element size in a mixed order, some empty, with random bytes.
fn generated(seed: u64, count: usize) -> Vec<(HeaderEntry, Vec<u8>)> {
    let dtypes = [
        DType::F32,
        DType::BF16,
        DType::U8,
        DType::I64,
        DType::F16,
        DType::F64,
        DType::I32,
        DType::Bool,
    ];
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|i| {
            let dtype = dtypes[rng.below(dtypes.len())];
            let shape = match i % 5 {
                0 => vec![1 + rng.below(60), 1 + rng.below(70)],
                1 => vec![1 + rng.below(300)],
                2 => vec![1 + rng.below(9), 1 + rng.below(7), 1 + rng.below(5)],
                3 if i % 3 == 0 => vec![0, 3],
                3 => vec![],
                _ => vec![1 + rng.below(40), 1 + rng.below(40)],
            };
            let e = HeaderEntry::new(format!("blk{:02}.t{i}", (count - i) % 17), dtype, shape);
            let mut bytes = rng.bytes(e.bytes());
            if dtype == DType::Bool {
                bytes.iter_mut().for_each(|b| *b &= 1);
            }
            (e, bytes)
        })
        .collect()
}

/// Writes `tensors` as a Hugging Face style sharded checkpoint of `parts` files in `dir`.
fn write_sharded_input(dir: &Path, tensors: &[(HeaderEntry, Vec<u8>)], parts: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let per = tensors.len().div_ceil(parts);
    let mut weight_map = BTreeMap::new();
    for (k, chunk) in tensors.chunks(per).enumerate() {
        let name = shard_name(k + 1, parts);
        let header: Vec<HeaderEntry> = chunk.iter().map(|(e, _)| e.clone()).collect();
        let mut w =
            SafetensorsWriter::create(&dir.join(&name), &header, &BTreeMap::new(), false).unwrap();
        for (e, bytes) in chunk {
            w.write(bytes).unwrap();
            weight_map.insert(e.name().to_string(), name.clone());
        }
        w.finish().unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_NAME), index.to_string()).unwrap();
}

fn rules_file(dir: &Path) -> PathBuf {
    let path = dir.join("rules.toml");
    std::fs::write(&path, RULES).unwrap();
    path
}

fn planned(ckpt: &Checkpoint, rules: &Path) -> Plan {
    rule_set(None, &[rules.to_path_buf()])
        .unwrap()
        .plan_with(ckpt.tensors(), &PlanOptions::default())
        .unwrap()
}

/// `(name, dtype, start, end)` of one header entry.
type Placed = (String, String, u64, u64);

/// The header of a safetensors file: its length, its entries by offset, its metadata.
fn header_of(path: &Path) -> (u64, Vec<Placed>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let json: Value = serde_json::from_slice(&bytes[8..8 + n as usize]).unwrap();
    let mut entries = Vec::new();
    let mut meta = BTreeMap::new();
    for (name, v) in json.as_object().unwrap() {
        if name == "__metadata__" {
            for (k, v) in v.as_object().unwrap() {
                meta.insert(k.clone(), v.as_str().unwrap().to_string());
            }
            continue;
        }
        let off = v["data_offsets"].as_array().unwrap();
        entries.push((
            name.clone(),
            v["dtype"].as_str().unwrap().to_string(),
            off[0].as_u64().unwrap(),
            off[1].as_u64().unwrap(),
        ));
    }
    entries.sort_by_key(|e| (e.2, e.3));
    (n, entries, meta)
}

fn elem_size(st_name: &str) -> u64 {
    DType::from_safetensors_name(st_name).unwrap().size() as u64
}

/// Asserts the layout every output file must have: tensors by descending element size,
/// then name; each at an absolute offset that is a multiple of its element size; no
/// holes; the file ends with the last tensor.
fn assert_aligned_and_sorted(path: &Path) {
    let (n, entries, _) = header_of(path);
    assert_eq!(n % 8, 0, "{}: header length {n}", path.display());
    let mut at = 0;
    for (name, dtype, start, end) in &entries {
        assert_eq!(*start, at, "{}: hole before {name}", path.display());
        assert_eq!(
            (8 + n + start) % elem_size(dtype),
            0,
            "{}: {name} ({dtype}) at absolute offset {}",
            path.display(),
            8 + n + start
        );
        at = *end;
    }
    let order: Vec<(u64, &String)> = entries
        .iter()
        .map(|(name, dtype, _, _)| (u64::MAX - elem_size(dtype), name))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "{}: tensor order", path.display());
    assert_eq!(std::fs::metadata(path).unwrap().len(), 8 + n + at);
}

/// The naive split: walk the plan in order, open a new shard when the next tensor
/// would overflow a non-empty one.
fn greedy_oracle(plan: &Plan, max: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut fill = 0u64;
    for e in plan.entries() {
        let b = e.target_shape().iter().product::<usize>() as u64 * e.dtype().size() as u64;
        if !shards.last().unwrap().is_empty() && fill + b > max {
            shards.push(Vec::new());
            fill = 0;
        }
        shards.last_mut().unwrap().push(e.target().to_string());
        fill += b;
    }
    shards
}

fn materialised_dir(dir: &Path) -> BTreeMap<String, Tensor> {
    materialise(&Checkpoint::open(dir).unwrap())
}

#[test]
fn shards_hold_exactly_what_one_file_holds_split_greedily_and_aligned() {
    let dir = scratch("split");
    let input = dir.join("in");
    write_sharded_input(&input, &generated(11, 60), 3);
    let rules = rules_file(&dir);
    let ckpt = Checkpoint::open(&input).unwrap();
    let plan = planned(&ckpt, &rules);
    let cpu = Cpu::new();
    let single = dir.join("single.safetensors");
    Converter::new(&ckpt, &plan, &cpu)
        .write_safetensors(&single, &WriteOptions::default(), &mut |_| {})
        .unwrap();
    assert_aligned_and_sorted(&single);
    let want = load_safetensors(&single);
    let largest = plan
        .entries()
        .iter()
        .map(|e| e.target_shape().iter().product::<usize>() * e.dtype().size())
        .max()
        .unwrap() as u64;
    let total: u64 = want.values().map(|t| t.bytes.len() as u64).sum();
    // One tensor per shard, below and at the largest tensor, a few shards, one shard.
    for max in [1, largest - 1, largest, total / 7, total / 2, total + 1] {
        let out = dir.join(format!("out-{max}"));
        let shard = ShardOptions {
            max_shard_bytes: max,
            worker: None,
        };
        // Small bands, so tensors cross bands and shards cross blocks.
        let report = Converter::new(&ckpt, &plan, &cpu)
            .with_band_bytes(4099)
            .write_sharded(&out, &shard, &WriteOptions::default(), &mut |_| {})
            .unwrap();
        let oracle = greedy_oracle(&plan, max);
        let n = oracle.len();
        assert_eq!(report.shards(), n, "max {max}");
        assert_eq!(report.outputs().len(), n);
        let mut names: Vec<String> = (1..=n).map(|k| shard_name(k, n)).collect();
        names.push(INDEX_NAME.to_string());
        names.sort();
        assert_eq!(
            listing(&out),
            names,
            "max {max}: nothing else in the folder"
        );

        let index: Value =
            serde_json::from_slice(&std::fs::read(out.join(INDEX_NAME)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), plan.entries().len());
        let mut got = BTreeMap::new();
        for (k, members) in oracle.iter().enumerate() {
            let file = out.join(shard_name(k + 1, n));
            assert_aligned_and_sorted(&file);
            let (_, entries, meta) = header_of(&file);
            let mut in_file: Vec<&String> = entries.iter().map(|e| &e.0).collect();
            in_file.sort();
            let mut expected: Vec<&String> = members.iter().collect();
            expected.sort();
            assert_eq!(in_file, expected, "max {max}: shard {}", k + 1);
            for name in members {
                assert_eq!(map[name].as_str(), Some(shard_name(k + 1, n).as_str()));
            }
            assert!(meta.contains_key("relayout_shard"), "max {max}: set tag");
            got.extend(load_safetensors(&file));
            if members.len() > 1 {
                let bytes: u64 = entries.iter().map(|e| e.3 - e.2).sum();
                assert!(bytes <= max, "max {max}: shard {} holds {bytes}", k + 1);
            }
        }
        assert_same_tensors(&got, &want, &format!("max {max}"));
        // Read back as a checkpoint: the round trip through relayout's own reader.
        let back = materialised_dir(&out);
        assert_same_tensors(
            &back,
            &materialise(&Checkpoint::open(&single).unwrap()),
            "read back",
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `relayout convert IN OUT -r RULES --max-shard-size SIZE --device cpu -q`, which must
/// succeed.
fn convert_sharded(input: &Path, out: &Path, rules: &Path, size: &str) {
    run_ok(&[
        os("convert"),
        os(input),
        os(out),
        os("-r"),
        os(rules),
        os("--max-shard-size"),
        os(size),
        os("--device"),
        os("cpu"),
        os("-q"),
    ]);
}

fn run_ok(args: &[&OsStr]) -> String {
    let out = relayout(args);
    assert!(
        out.status.success(),
        "relayout {:?}: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn os<P: AsRef<OsStr> + ?Sized>(p: &P) -> &OsStr {
    p.as_ref()
}

#[test]
fn the_cli_writes_shards_that_plan_predicts_and_reads_them_back() {
    let dir = scratch("cli-shards");
    let input = dir.join("in");
    write_sharded_input(&input, &generated(5, 40), 2);
    let rules = rules_file(&dir);
    let out = dir.join("out");
    convert_sharded(&input, &out, &rules, "4KB");
    let plan: Value = serde_json::from_str(&run_ok(&[
        os("plan"),
        os(&input),
        os("-r"),
        os(&rules),
        os("--max-shard-size"),
        os("4KB"),
        os("--shards"),
        os("3"),
        os("--json"),
    ]))
    .unwrap();
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join(INDEX_NAME)).unwrap()).unwrap();
    let entries = plan["entries"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        index["weight_map"].as_object().unwrap().len()
    );
    for e in entries {
        let target = e["target"].as_str().unwrap();
        assert_eq!(e["shard"], index["weight_map"][target], "{target}");
    }
    let shards = plan["shards"].as_array().unwrap();
    assert_eq!(plan["max_workers"].as_u64(), Some(shards.len() as u64));
    assert!(shards.len() > 3, "the grid needs more shards than workers");
    for (k, s) in shards.iter().enumerate() {
        assert_eq!(s["worker"].as_u64(), Some((k % 3) as u64));
    }
    // Output as input: inspect, plan and convert read the folder.
    let inspected: Value =
        serde_json::from_str(&run_ok(&[os("inspect"), os(&out), os("--json")])).unwrap();
    assert_eq!(inspected["tensors"].as_u64(), Some(entries.len() as u64));
    let replanned: Value = serde_json::from_str(&run_ok(&[
        os("plan"),
        os(&out),
        os("-r"),
        os(&rules),
        os("--json"),
    ]))
    .unwrap();
    assert_eq!(
        replanned["entries"].as_array().unwrap().len(),
        entries.len()
    );
    let again = dir.join("again.safetensors");
    run_ok(&[
        os("convert"),
        os(&out),
        os(&again),
        os("-r"),
        os(&rules),
        os("--device"),
        os("cpu"),
        os("-q"),
    ]);
    assert_eq!(load_safetensors(&again).len(), entries.len());
    // Shard options with a .safetensors path are a mistake, not a silent single file.
    let bad = relayout(&[
        os("convert"),
        os(&input),
        os(&dir.join("x.safetensors")),
        os("-r"),
        os(&rules),
        os("--max-shard-size"),
        os("1MB"),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("folder"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_existing_set_is_refused_unless_forced_and_then_replaced_whole() {
    let dir = scratch("replace");
    let input = dir.join("in");
    write_sharded_input(&input, &generated(8, 30), 2);
    let rules = rules_file(&dir);
    let out = dir.join("out");
    let convert = |size: &str, force: bool| {
        let mut args = vec![
            os("convert"),
            os(&input),
            os(&out),
            os("-r"),
            os(&rules),
            os("--max-shard-size"),
            os(size),
            os("--device"),
            os("cpu"),
            os("-q"),
        ];
        if force {
            args.push(os("--force"));
        }
        relayout(&args)
    };
    assert!(convert("2KB", false).status.success());
    let small = listing(&out);
    assert!(small.len() > 3);
    let refused = convert("1MB", false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert_eq!(listing(&out), small, "a refused run changes nothing");
    assert!(convert("1MB", true).status.success());
    // The old set of another count is gone: only the new one and its index are left.
    assert_eq!(listing(&out), [shard_name(1, 1), INDEX_NAME.to_string()]);
    // Converting a folder into itself is refused: the index would replace the input's.
    let inplace = relayout(&[
        os("convert"),
        os(&out),
        os(&out),
        os("-r"),
        os(&rules),
        os("--force"),
    ]);
    assert!(!inplace.status.success());
    assert!(String::from_utf8_lossy(&inplace.stderr).contains("is the input"));
    assert_eq!(listing(&out), [shard_name(1, 1), INDEX_NAME.to_string()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn output_kind_follows_the_path_and_the_options() {
    let dir = scratch("kind");
    let w = Worker::new(0, 2).ok();
    let file = |p: &Path, m, w| OutputKind::for_path(p, m, w);
    assert_eq!(
        file(&dir.join("a.safetensors"), None, None).unwrap(),
        OutputKind::File
    );
    assert_eq!(
        file(&dir.join("A.SafeTensors"), None, None).unwrap(),
        OutputKind::File
    );
    let shards = |m: u64, worker| {
        OutputKind::Shards(ShardOptions {
            max_shard_bytes: m,
            worker,
        })
    };
    assert_eq!(
        file(&dir.join("out"), None, None).unwrap(),
        shards(5_000_000_000, None)
    );
    assert_eq!(
        file(&dir.join("out.st"), None, None).unwrap(),
        shards(5_000_000_000, None)
    );
    // An existing folder whose name ends in .safetensors is a folder.
    std::fs::create_dir_all(dir.join("d.safetensors")).unwrap();
    assert_eq!(
        file(&dir.join("d.safetensors"), Some(9), None).unwrap(),
        shards(9, None)
    );
    assert_eq!(file(&dir, None, None).unwrap(), shards(5_000_000_000, None));
    let slash = PathBuf::from(format!("{}/new/", dir.display()));
    assert_eq!(
        file(&slash, None, None).unwrap(),
        shards(5_000_000_000, None)
    );
    assert_eq!(file(&dir.join("new"), Some(7), w).unwrap(), shards(7, w));
    assert!(file(&dir.join("a.safetensors"), Some(7), None).is_err());
    assert!(file(&dir.join("a.safetensors"), None, w).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts `convert --shard i/N`.
fn spawn_worker(input: &Path, rules: &Path, out: &Path, i: usize, n: usize) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_relayout"))
        .arg("convert")
        .arg(input)
        .arg(out)
        .arg("-r")
        .arg(rules)
        .args(["--max-shard-size", "3KB", "--device", "cpu", "-q"])
        .arg("--shard")
        .arg(format!("{i}/{n}"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Starts one worker process per worker, all at once.
fn spawn_workers(input: &Path, rules: &Path, out: &Path, n: usize) -> Vec<std::process::Child> {
    (0..n)
        .map(|i| spawn_worker(input, rules, out, i, n))
        .collect()
}

/// Every file of `dir` with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    listing(dir)
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect()
}

fn assert_same_files(got: &Path, want: &Path, what: &str) {
    let (got, want) = (contents(got), contents(want));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: files"
    );
    for (name, bytes) in &want {
        assert!(got[name] == *bytes, "{what}: {name} differs");
    }
}

/// A generated sharded input, its rules, and the single-machine sharded conversion.
fn worker_fixture(test: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = scratch(test);
    let input = dir.join("in");
    write_sharded_input(&input, &generated(23, 90), 4);
    let rules = rules_file(&dir);
    let single = dir.join("single");
    convert_sharded(&input, &single, &rules, "3KB");
    let n = listing(&single).len() - 1;
    assert!(n >= 14, "{n} shards: the test needs two per worker");
    (dir, input, rules, single)
}

#[test]
fn workers_in_parallel_produce_the_single_machine_bytes() {
    let (dir, input, rules, single) = worker_fixture("workers");
    for n in [1, 3, 7] {
        let out = dir.join(format!("out-{n}"));
        for child in spawn_workers(&input, &rules, &out, n) {
            let done = child.wait_with_output().unwrap();
            assert!(
                done.status.success(),
                "{}",
                String::from_utf8_lossy(&done.stderr)
            );
        }
        // The last worker to finish wrote the index; merging again changes nothing.
        assert_same_files(&out, &single, &format!("{n} workers"));
        run_ok(&[os("merge-index"), os(&out)]);
        assert_same_files(&out, &single, &format!("{n} workers, merged again"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The PID of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn a_killed_worker_run_again_gives_the_same_result_and_no_debris() {
    let (dir, input, rules, single) = worker_fixture("killed");
    let out = dir.join("out");
    // Killed at whatever point it has reached: every outcome must heal on a re-run.
    let mut workers = spawn_workers(&input, &rules, &out, 2);
    workers[0].kill().unwrap();
    workers[0].wait().unwrap();
    let w1 = workers.pop().unwrap().wait_with_output().unwrap();
    assert!(w1.status.success());
    for child in spawn_workers(&input, &rules, &out, 2) {
        assert!(child.wait_with_output().unwrap().status.success());
    }
    assert_same_files(&out, &single, "after a kill and a re-run");

    // What a kill leaves, exactly: a shard missing and its temporary file, named for the
    // dead process. A temporary file of another machine sharing the folder stays.
    let lost = shard_name(3, listing(&single).len() - 1);
    std::fs::remove_file(out.join(&lost)).unwrap();
    std::fs::remove_file(out.join(INDEX_NAME)).unwrap();
    let debris = relayout::writer::AtomicFile::temp_name(&out.join(&lost), dead_pid());
    std::fs::write(&debris, b"half a shard").unwrap();
    let foreign = format!(".{lost}.relayout-1@another-host.tmp");
    std::fs::write(out.join(&foreign), b"someone else's").unwrap();
    let err = relayout(&[os("merge-index"), os(&out)]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains(&lost));
    assert!(
        !out.join(INDEX_NAME).exists(),
        "no index for an incomplete set"
    );
    // Shard 3 (0-based 2) belongs to worker 0 of 2.
    let rerun = spawn_worker(&input, &rules, &out, 0, 2)
        .wait_with_output()
        .unwrap();
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    std::fs::remove_file(out.join(&foreign)).unwrap();
    assert_same_files(&out, &single, "after the debris of a kill");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merge_index_refuses_missing_foreign_stale_and_damaged_shards() {
    let (dir, input, rules, single) = worker_fixture("merge");
    let n = listing(&single).len() - 1;
    let fresh = |name: &str| {
        let out = dir.join(name);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        for (file, bytes) in contents(&single) {
            if file != INDEX_NAME {
                std::fs::write(out.join(file), bytes).unwrap();
            }
        }
        out
    };
    let refused = |out: &Path, needle: &str| {
        let run = relayout(&[os("merge-index"), os(out)]);
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(!run.status.success(), "merge-index accepted: {needle}");
        assert!(stderr.contains(needle), "{stderr} lacks {needle}");
        assert!(
            !out.join(INDEX_NAME).exists(),
            "an index was written: {needle}"
        );
    };
    // Complete: the index is the single machine's.
    let out = fresh("ok");
    run_ok(&[os("merge-index"), os(&out)]);
    assert_same_files(&out, &single, "merged copy");

    let out = fresh("missing");
    std::fs::remove_file(out.join(shard_name(n, n))).unwrap();
    std::fs::remove_file(out.join(shard_name(2, n))).unwrap();
    refused(&out, &shard_name(2, n));

    let out = fresh("two-sets");
    std::fs::write(out.join(shard_name(1, n + 1)), b"x").unwrap();
    refused(&out, "different sets");

    // A shard of another conversion (other rules: same names and count, other shapes).
    let other = dir.join("other");
    let other_rules = dir.join("other.toml");
    std::fs::write(&other_rules, RULES.replace("perm = \"O,I -> I,O\"", "")).unwrap();
    convert_sharded(&input, &other, &other_rules, "3KB");
    assert_eq!(listing(&other).len() - 1, n);
    let out = fresh("stale");
    let swapped = shard_name(1, n);
    std::fs::copy(other.join(&swapped), out.join(&swapped)).unwrap();
    refused(&out, &swapped);

    // A worker finding another conversion's shard in its place refuses it unless forced.
    let run = spawn_worker(&input, &rules, &out, 0, n)
        .wait_with_output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--force"));

    // Truncated: the size no longer matches the header.
    let out = fresh("truncated");
    let victim = out.join(shard_name(2, n));
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    refused(&out, &shard_name(2, n));

    let out = fresh("empty");
    for f in listing(&out) {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    refused(&out, "no model-");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_interrupt_or_failure_at_any_point_leaves_nothing() {
    let dir = scratch("interrupt");
    let input = dir.join("in.safetensors");
    let tensors = generated(3, 30);
    let header: Vec<HeaderEntry> = tensors.iter().map(|(e, _)| e.clone()).collect();
    let mut w = SafetensorsWriter::create(&input, &header, &BTreeMap::new(), false).unwrap();
    for (_, b) in &tensors {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
    let rules = rules_file(&dir);
    let ckpt = Checkpoint::open(&input).unwrap();
    let plan = planned(&ckpt, &rules);
    let cpu = Cpu::new();
    let before = listing(&dir);
    let mut events = 0;
    Converter::new(&ckpt, &plan, &cpu)
        .with_band_bytes(1000)
        .write_sharded(
            &dir.join("count"),
            &ShardOptions {
                max_shard_bytes: 2000,
                worker: None,
            },
            &WriteOptions::default(),
            &mut |_| events += 1,
        )
        .unwrap();
    std::fs::remove_dir_all(dir.join("count")).unwrap();
    // Stop after every progress event in turn: inside tensors, between tensors, between
    // shards, before the commit. The folder was created by the run and goes too.
    for stop_at in 0..events {
        for target in ["new-folder", "file.safetensors"] {
            let out = dir.join(target);
            let interrupt = Interrupt::new();
            let opts = WriteOptions {
                interrupt: Some(interrupt.clone()),
                ..WriteOptions::default()
            };
            let mut seen = 0;
            let mut progress = |_| {
                if seen == stop_at {
                    interrupt.raise(15);
                }
                seen += 1;
            };
            let converter = Converter::new(&ckpt, &plan, &cpu).with_band_bytes(1000);
            let result = if target.ends_with(".safetensors") {
                converter.write_safetensors(&out, &opts, &mut progress)
            } else {
                let shard = ShardOptions {
                    max_shard_bytes: 2000,
                    worker: None,
                };
                converter.write_sharded(&out, &shard, &opts, &mut progress)
            };
            match result {
                Err(Error::Interrupted { code: 15 }) => {}
                other => panic!("stop at {stop_at} of {events}, {target}: {other:?}"),
            }
            assert_eq!(listing(&dir), before, "stop at {stop_at}, {target}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn ctrl_c_and_sigterm_stop_the_binary_cleanly() {
    let dir = scratch("signals");
    let input = dir.join("in.safetensors");
    big_input(&input, 64);
    let rules = rules_file(&dir);
    for (signal, code, out) in [
        (libc::SIGINT, 130, "out.safetensors"),
        (libc::SIGTERM, 143, "out.safetensors"),
        (libc::SIGINT, 130, "shards"),
    ] {
        let out = dir.join(out);
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_relayout"));
        cmd.arg("convert")
            .arg(&input)
            .arg(&out)
            .arg("-r")
            .arg(&rules)
            // The naive backend is slow enough to be caught writing.
            .args(["--device", "reference", "-q"])
            .stderr(std::process::Stdio::piped());
        if !out.to_string_lossy().ends_with(".safetensors") {
            cmd.args(["--max-shard-size", "100MiB"]);
        }
        let child = cmd.spawn().unwrap();
        // The run creates the shard folder; until then, it writes nowhere.
        let watched = if out.to_string_lossy().ends_with(".safetensors") {
            dir.clone()
        } else {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !out.is_dir() {
                assert!(std::time::Instant::now() < deadline, "no output folder");
                std::thread::yield_now();
            }
            out.clone()
        };
        wait_until_writing(child.id(), &watched);
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let done = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert_eq!(
            listing(&dir),
            ["in.safetensors", "rules.toml"],
            "{}",
            out.display()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn a_fifo_named_as_a_shard_or_the_folders_checkpoint_is_refused_without_blocking() {
    let dir = scratch("fifo-shard");
    let mkfifo = |path: &Path| {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file system entry.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    let input = dir.join("in");
    write_sharded_input(&input, &generated(2, 6), 2);
    let victim = input.join(shard_name(2, 2));
    std::fs::remove_file(&victim).unwrap();
    mkfifo(&victim);
    let err = Checkpoint::open(&input).unwrap_err();
    assert!(err.to_string().contains("a FIFO"), "{err}");
    let single = dir.join("single");
    std::fs::create_dir_all(&single).unwrap();
    mkfifo(&single.join("model.safetensors"));
    let err = Checkpoint::open(&single).unwrap_err();
    assert!(err.to_string().contains("a FIFO"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One shard is `model.safetensors`, as Hugging Face and mlx-lm write it, and the index
/// is written all the same; workers, `merge-index` and the readers take the set as any
/// other. A set of several keeps the `model-0000k-of-0000N` names.
#[test]
fn one_shard_is_model_safetensors_with_its_index() {
    let dir = scratch("one-shard");
    let input = dir.join("in");
    let tensors = generated(5, 12);
    write_sharded_input(&input, &tensors, 2);
    let rules = rules_file(&dir);
    let one = dir.join("one");
    convert_sharded(&input, &one, &rules, "5GB");
    assert_eq!(
        listing(&one),
        ["model.safetensors", "model.safetensors.index.json"]
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), tensors.len());
    assert!(map.values().all(|v| v == "model.safetensors"));
    // Read back through the folder, the index and the file: the same tensors.
    let whole = materialised_dir(&one);
    assert_eq!(whole.len(), tensors.len());
    for path in [
        one.join("model.safetensors.index.json"),
        one.join("model.safetensors"),
    ] {
        let ckpt = Checkpoint::open(&path).unwrap();
        assert_eq!(
            crate::common::materialise(&ckpt),
            whole,
            "{}",
            path.display()
        );
    }
    // A worker that is the only one writes the same set, and merging it changes nothing.
    let worker = dir.join("worker");
    run_ok(&[
        os("convert"),
        os(&input),
        os(&worker),
        os("-r"),
        os(&rules),
        os("--max-shard-size"),
        os("5GB"),
        os("--shard"),
        os("0/1"),
        os("--device"),
        os("cpu"),
        os("-q"),
    ]);
    run_ok(&[os("merge-index"), os(&worker)]);
    assert_eq!(listing(&worker), listing(&one));
    assert_eq!(
        std::fs::read(worker.join("model.safetensors.index.json")).unwrap(),
        std::fs::read(one.join("model.safetensors.index.json")).unwrap()
    );
    // Several shards keep their numbered names.
    let many = dir.join("many");
    convert_sharded(&input, &many, &rules, "3KB");
    let names = listing(&many);
    assert!(names.len() > 2 && !names.contains(&"model.safetensors".to_string()));
    assert!(names.contains(&format!(
        "model-00001-of-{:05}.safetensors",
        names.len() - 1
    )));
    std::fs::remove_dir_all(&dir).unwrap();
}
