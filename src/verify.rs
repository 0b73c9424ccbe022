//! Strict verification: the tensor names, shapes and dtypes a target model expects,
//! checked against a plan before anything is written, or against a written file. The
//! expectation files themselves are read by [`crate::reader::expect`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::reader::expect::{self, join, Want};
use crate::reader::Checkpoint;

/// A fully missing module whose tensors are all direct leaves is listed leaf by leaf up
/// to this many leaves, and summarised as `module.* (N tensors)` beyond.
const MAX_BRACE_LEAVES: usize = 8;
/// Report lines shown per kind (missing, unexpected, mismatched) before `… and N more`.
const MAX_REPORT_LINES: usize = 100;

/// What a target model expects: tensor name → shape and, optionally, dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectation {
    path: PathBuf,
    tensors: expect::Tensors,
}

impl Expectation {
    /// Reads an expectation file: JSON, safetensors or Flax msgpack, told by the
    /// extension (`.json`, `.safetensors`, `.msgpack`) or else by the first bytes.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Expectation> {
        let path = path.as_ref();
        let tensors = expect::read(path)?;
        Ok(Expectation {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The file the expectation was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tensors expected.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Compares actual tensors, `(name, dtype, shape)`, with the expectation.
    pub fn check<'a, I>(&self, actual: I) -> VerifyReport
    where
        I: IntoIterator<Item = (&'a str, DType, &'a [usize])>,
    {
        let actual: BTreeMap<&str, (DType, &[usize])> = actual
            .into_iter()
            .map(|(name, dtype, shape)| (name, (dtype, shape)))
            .collect();
        let mut report = VerifyReport {
            file: self.path.clone(),
            expected: self.tensors.len(),
            ..VerifyReport::default()
        };
        for (name, want) in &self.tensors {
            let Some(&(dtype, shape)) = actual.get(name.as_str()) else {
                report.missing.push(name.clone());
                continue;
            };
            let dtype_ok = match &want.dtype {
                None => true,
                Some(Want::Known(d)) => *d == dtype,
                Some(Want::Other(_)) => false,
            };
            if dtype_ok && want.shape == shape {
                report.matched += 1;
            } else {
                report.mismatched.push(Mismatch {
                    name: name.clone(),
                    dtype,
                    shape: shape.to_vec(),
                    expected_dtype: want.dtype.as_ref().map(Want::to_string),
                    expected_shape: want.shape.clone(),
                });
            }
        }
        report.unexpected = actual
            .keys()
            .filter(|n| !self.tensors.contains_key(**n))
            .map(|n| n.to_string())
            .collect();
        let expected_names = || self.tensors.keys().map(String::as_str);
        report.missing_lines = group(expected_names(), &report.missing);
        report.unexpected_lines = group(actual.keys().copied(), &report.unexpected);
        // A shape mismatch is one line; tensors whose dtype alone differs, the same way,
        // are grouped like missing ones (a forgotten `--dtype` is then a line or two).
        let mut by_dtype: BTreeMap<(DType, Option<&str>), Vec<String>> = BTreeMap::new();
        for m in &report.mismatched {
            if m.shape == m.expected_shape {
                let key = (m.dtype, m.expected_dtype.as_deref());
                by_dtype.entry(key).or_default().push(m.name.clone());
            } else {
                report.mismatched_lines.push(m.to_string());
            }
        }
        let by_name: BTreeMap<&str, &Mismatch> = report
            .mismatched
            .iter()
            .map(|m| (m.name.as_str(), m))
            .collect();
        for ((dtype, want), names) in &by_dtype {
            for line in group(expected_names(), names) {
                // A line that is one tensor's name shows that tensor in full.
                report
                    .mismatched_lines
                    .push(match by_name.get(line.as_str()) {
                        Some(m) => m.to_string(),
                        None => format!("{line}: {dtype}, expected {}", want.unwrap_or("-")),
                    });
            }
        }
        report
    }

    /// Compares the output a plan would write (its entries' targets, dtypes and
    /// target shapes) with the expectation.
    pub fn check_plan(&self, plan: &Plan) -> VerifyReport {
        self.check(
            plan.entries
                .iter()
                .map(|e| (e.target.as_str(), e.dtype, e.target_shape.as_slice())),
        )
    }

    /// Compares the tensors of an open checkpoint with the expectation.
    pub fn check_checkpoint(&self, ckpt: &Checkpoint) -> VerifyReport {
        self.check(
            ckpt.tensors()
                .iter()
                .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice())),
        )
    }
}

/// Checks the tensors of an existing file (any checkpoint relayout reads, in practice
/// a converted safetensors file; only its header is read) against the expectation file
/// `expect`; returns the number of tensors that match, all of them.
pub fn verify_file(output: impl AsRef<Path>, expect: impl AsRef<Path>) -> Result<usize> {
    verify_report(output, expect)?.into_result()
}

/// Compares the checkpoint at `output` against the expectation file `expect`, as
/// [`verify_file`], and returns what it found either way (`verify --json`): an error
/// only when a file cannot be read.
pub fn verify_report(output: impl AsRef<Path>, expect: impl AsRef<Path>) -> Result<VerifyReport> {
    let expectation = Expectation::from_file(expect)?;
    let ckpt = Checkpoint::open(output)?;
    Ok(expectation.check_checkpoint(&ckpt))
}

/// A tensor present on both sides with a different shape or dtype.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    /// The expected dtype as the expectation names it; `None` when it gives none.
    pub(crate) expected_dtype: Option<String>,
    pub(crate) expected_shape: Vec<usize>,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl Mismatch {
    /// Tensor name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its dtype in the checked file or plan.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Its shape in the checked file or plan.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The expected dtype as the expectation names it; `None` when it gives none.
    pub fn expected_dtype(&self) -> Option<&str> {
        self.expected_dtype.as_deref()
    }

    /// The shape the expectation gives.
    pub fn expected_shape(&self) -> &[usize] {
        &self.expected_shape
    }
}

/// `name: [16, 10] F32, expected [10, 16] F32`, with a hint when only the axis order
/// differs.
impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {:?} {}, expected {:?}",
            self.name, self.shape, self.dtype, self.expected_shape
        )?;
        if let Some(d) = &self.expected_dtype {
            write!(f, " {d}")?;
        }
        let mut got = self.shape.clone();
        let mut want = self.expected_shape.clone();
        got.sort_unstable();
        want.sort_unstable();
        if got == want && self.shape != self.expected_shape {
            f.write_str(" (same sizes, other axis order)")?;
        }
        Ok(())
    }
}

/// The outcome of a comparison: what is missing, unexpected and mismatched. Its
/// `Display` is the grouped report, one line per module where whole modules differ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    file: PathBuf,
    expected: usize,
    matched: usize,
    missing: Vec<String>,
    unexpected: Vec<String>,
    mismatched: Vec<Mismatch>,
    missing_lines: Vec<String>,
    unexpected_lines: Vec<String>,
    mismatched_lines: Vec<String>,
}

impl VerifyReport {
    /// True when every expected tensor is there with its shape and dtype, and no other.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// The expectation file compared against.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Expected tensors found with their shape and dtype.
    pub fn matched(&self) -> usize {
        self.matched
    }

    /// Number of tensors the expectation lists.
    pub fn expected(&self) -> usize {
        self.expected
    }

    /// Expected tensors that are not there, sorted.
    pub fn missing(&self) -> &[String] {
        &self.missing
    }

    /// Tensors there that the expectation does not list, sorted.
    pub fn unexpected(&self) -> &[String] {
        &self.unexpected
    }

    /// Tensors on both sides whose shape or dtype differ, sorted by name.
    pub fn mismatched(&self) -> &[Mismatch] {
        &self.mismatched
    }

    /// `Ok(matched)` when the comparison found nothing wrong, else [`Error::Verify`].
    pub fn into_result(self) -> Result<usize> {
        if self.is_ok() {
            Ok(self.matched)
        } else {
            Err(Error::Verify {
                file: self.file.clone(),
                missing: self.missing.len(),
                unexpected: self.unexpected.len(),
                mismatched: self.mismatched.len(),
                expected: self.expected,
                report: self.to_string(),
            })
        }
    }
}

/// `{file, ok, expected, matched, missing, unexpected, mismatched, report}`, `report`
/// being the grouped text of `Display`.
impl serde::Serialize for VerifyReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            #[serde(serialize_with = "crate::report::path_text")]
            file: &'a Path,
            ok: bool,
            expected: usize,
            matched: usize,
            missing: &'a [String],
            unexpected: &'a [String],
            mismatched: &'a [Mismatch],
            report: String,
        }
        Doc {
            file: &self.file,
            ok: self.is_ok(),
            expected: self.expected,
            matched: self.matched,
            missing: &self.missing,
            unexpected: &self.unexpected,
            mismatched: &self.mismatched,
            report: self.to_string(),
        }
        .serialize(s)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (label, lines) in [
            ("missing", &self.missing_lines),
            ("unexpected", &self.unexpected_lines),
            ("mismatched", &self.mismatched_lines),
        ] {
            for line in lines.iter().take(MAX_REPORT_LINES) {
                writeln!(f, "{label:<11} {line}")?;
            }
            if lines.len() > MAX_REPORT_LINES {
                writeln!(
                    f,
                    "{label:<11} … and {} more line(s)",
                    lines.len() - MAX_REPORT_LINES
                )?;
            }
        }
        Ok(())
    }
}

/// One node of the name tree of one side: `total` tensors at or below it, `flagged`
/// of them in the list being reported.
#[derive(Default)]
struct Node<'a> {
    children: BTreeMap<&'a str, Node<'a>>,
    /// `Some(flagged)` when a tensor has this node's exact name.
    tensor: Option<bool>,
    total: usize,
    flagged: usize,
}

/// Report lines for the `flagged` names among `all`: the flagged leaves of one module
/// on one line (`m.{a,b}`), a module whose tensors are all flagged on one line.
fn group<'a>(all: impl Iterator<Item = &'a str>, flagged: &[String]) -> Vec<String> {
    let flagged: BTreeSet<&str> = flagged.iter().map(String::as_str).collect();
    let mut root = Node::default();
    for name in all {
        let hit = flagged.contains(name);
        let mut node = &mut root;
        for part in name.split('.') {
            node.total += 1;
            node.flagged += usize::from(hit);
            node = node.children.entry(part).or_default();
        }
        node.total += 1;
        node.flagged += usize::from(hit);
        node.tensor = Some(hit);
    }
    let mut lines = Vec::new();
    emit(&root, "", &mut lines);
    lines
}

/// Lines for the flagged tensors below `node` (named `path`), which is not wholly
/// flagged or is the root.
fn emit(node: &Node<'_>, path: &str, out: &mut Vec<String>) {
    let mut leaves = Vec::new();
    let mut below = Vec::new();
    for (&part, child) in &node.children {
        if child.flagged == 0 {
            continue;
        }
        if child.tensor == Some(true) {
            leaves.push(part);
        }
        // The tensors strictly below `child`, which may itself be a tensor too.
        let sub_total = child.total - usize::from(child.tensor.is_some());
        let sub_flagged = child.flagged - usize::from(child.tensor == Some(true));
        if sub_flagged == 0 {
            continue;
        }
        let name = join(path, part);
        if sub_flagged < sub_total {
            emit(child, &name, &mut below);
        } else {
            below.push(whole(child, name, sub_flagged));
        }
    }
    if !leaves.is_empty() {
        out.push(braced(path, &leaves));
    }
    out.append(&mut below);
}

/// The line for a module `name` whose `count` tensors below it are all flagged: down a
/// chain of single submodules, then its leaves by name if few, else a count.
fn whole(node: &Node<'_>, name: String, count: usize) -> String {
    if let [(part, only)] = node.children.iter().collect::<Vec<_>>().as_slice() {
        if only.tensor.is_none() {
            return whole(only, join(&name, part), count);
        }
    }
    if node.children.len() <= MAX_BRACE_LEAVES
        && node.children.values().all(|c| c.children.is_empty())
    {
        let parts: Vec<&str> = node.children.keys().copied().collect();
        braced(&name, &parts)
    } else {
        format!("{name}.* ({count} tensors)")
    }
}

/// `m.a`, `m.{a,b}`, or `a, b` at the top level.
fn braced(path: &str, parts: &[&str]) -> String {
    match parts {
        [one] => join(path, one),
        _ if path.is_empty() => parts.join(", "),
        _ => format!("{path}.{{{}}}", parts.join(",")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::expect::tests::want;
    use crate::reader::expect::Expected;

    fn expectation(entries: &[(&str, &[usize], Option<DType>)]) -> Expectation {
        Expectation {
            path: PathBuf::from("want.json"),
            tensors: entries
                .iter()
                .map(|(n, s, d)| (n.to_string(), want(s, *d)))
                .collect(),
        }
    }

    #[test]
    fn a_matching_list_passes_and_dtype_is_compared_only_when_given() {
        let e = expectation(&[("a.w", &[2, 3], Some(DType::F32)), ("a.b", &[3], None)]);
        let r = e.check([
            ("a.w", DType::F32, &[2usize, 3][..]),
            ("a.b", DType::BF16, &[3][..]),
        ]);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.matched(), 2);
        assert_eq!(r.to_string(), "");
        assert_eq!(r.into_result().unwrap(), 2);
    }

    #[test]
    fn missing_leaves_of_one_module_share_a_line_and_whole_modules_are_one_line() {
        let mut entries: Vec<(String, Vec<usize>)> = vec![
            ("params.fc.kernel".into(), vec![16, 10]),
            ("params.fc.bias".into(), vec![10]),
            ("params.bn.scale".into(), vec![8]),
            ("params.bn.mean".into(), vec![8]),
            ("params.bn.var".into(), vec![8]),
            ("params.top".into(), vec![1]),
            ("top".into(), vec![1]),
            ("other".into(), vec![1]),
        ];
        for i in 0..3 {
            for leaf in ["conv.kernel", "bn.scale", "bn.bias"] {
                entries.push((format!("params.layer{i}.{leaf}"), vec![4]));
            }
        }
        for i in 0..9 {
            entries.push((format!("params.wide.w{i}"), vec![1]));
        }
        let list: Vec<(&str, &[usize], Option<DType>)> = entries
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice(), None))
            .collect();
        let e = expectation(&list);
        let present = [
            "params.bn.scale",
            "params.layer0.conv.kernel",
            "params.layer0.bn.scale",
            "params.layer0.bn.bias",
            "params.layer2.conv.kernel",
            "params.top",
            "other",
        ];
        let actual: Vec<(&str, DType, &[usize])> = entries
            .iter()
            .filter(|(n, _)| present.contains(&n.as_str()))
            .map(|(n, s)| (n.as_str(), DType::F32, s.as_slice()))
            .collect();
        let r = e.check(actual);
        assert_eq!(r.missing().len(), entries.len() - present.len());
        assert_eq!(
            r.to_string(),
            "missing     top\n\
             missing     params.bn.{mean,var}\n\
             missing     params.fc.{bias,kernel}\n\
             missing     params.layer1.* (3 tensors)\n\
             missing     params.layer2.bn.{bias,scale}\n\
             missing     params.wide.* (9 tensors)\n"
        );
    }

    #[test]
    fn unexpected_tensors_group_like_missing_ones_and_mismatches_show_both_sides() {
        let e = expectation(&[
            ("params.fc.kernel", &[16, 10], Some(DType::F32)),
            ("params.fc.bias", &[10], Some(DType::F32)),
            ("params.x", &[2], None),
            ("params.m.a", &[2], Some(DType::F32)),
            ("params.m.b", &[2], Some(DType::F32)),
            ("params.n.a", &[2], Some(DType::F32)),
            ("params.n.b", &[2], Some(DType::F32)),
        ]);
        let mut odd = Expectation::clone(&e);
        odd.tensors.insert(
            "params.q".into(),
            Expected {
                shape: vec![1],
                dtype: Some(Want::Other("uint32".into())),
            },
        );
        let r = odd.check([
            ("params.fc.kernel", DType::F32, &[10usize, 16][..]),
            ("params.fc.bias", DType::BF16, &[10][..]),
            ("params.x", DType::F16, &[3][..]),
            ("params.q", DType::U8, &[1][..]),
            ("batch_stats.bn.mean", DType::F32, &[8][..]),
            ("batch_stats.bn.var", DType::F32, &[8][..]),
            ("params.m.a", DType::BF16, &[2][..]),
            ("params.m.b", DType::BF16, &[2][..]),
            ("params.n.a", DType::BF16, &[2][..]),
            ("params.n.b", DType::F16, &[2][..]),
        ]);
        assert_eq!(r.unexpected().len(), 2);
        assert_eq!(r.mismatched().len(), 8);
        // Shape mismatches first, one line each; then dtype-only ones, grouped.
        assert_eq!(
            r.to_string(),
            "unexpected  batch_stats.bn.{mean,var}\n\
             mismatched  params.fc.kernel: [10, 16] F32, expected [16, 10] F32 (same sizes, other axis order)\n\
             mismatched  params.x: [3] F16, expected [2]\n\
             mismatched  params.n.b: [2] F16, expected [2] F32\n\
             mismatched  params.fc.bias: [10] BF16, expected [10] F32\n\
             mismatched  params.m.{a,b}: BF16, expected F32\n\
             mismatched  params.n.a: [2] BF16, expected [2] F32\n\
             mismatched  params.q: [1] U8, expected [1] uint32\n"
        );
        let err = r.into_result().unwrap_err();
        assert!(matches!(err, Error::Verify { .. }));
        assert_eq!(
            err.to_string(),
            "want.json: 0 missing, 2 unexpected and 8 mismatched tensor(s) against the 8 expected"
        );
    }

    #[test]
    fn a_name_that_is_both_a_tensor_and_a_module_is_grouped_on_both_counts() {
        let e = expectation(&[
            ("a.b", &[1], None),
            ("a.b.c", &[1], None),
            ("a.b.d", &[1], None),
            ("x.y", &[1], None),
            ("x.y.z", &[1], None),
        ]);
        let r = e.check([
            ("a.b", DType::F32, &[1usize][..]),
            ("x.y.z", DType::F32, &[1][..]),
        ]);
        assert_eq!(r.missing(), ["a.b.c", "a.b.d", "x.y"]);
        assert_eq!(r.to_string(), "missing     a.b.{c,d}\nmissing     x.y\n");
    }

    #[test]
    fn a_long_report_is_cut_after_the_line_limit_per_kind() {
        let names: Vec<String> = (0..MAX_REPORT_LINES + 5)
            .map(|i| format!("m{i}.w"))
            .collect();
        let e = expectation(&[]);
        let r = e.check(names.iter().map(|n| (n.as_str(), DType::F32, &[][..])));
        let text = r.to_string();
        assert_eq!(text.lines().count(), MAX_REPORT_LINES + 1);
        assert!(
            text.ends_with("unexpected  … and 5 more line(s)\n"),
            "{text}"
        );
    }

    #[test]
    fn a_plan_is_checked_by_its_targets_dtypes_and_target_shapes() {
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/small_cnn.pt");
        let ckpt = Checkpoint::open(fixture).unwrap();
        let plan = crate::rules::RuleSet::preset("flax")
            .unwrap()
            .plan(ckpt.tensors())
            .unwrap();
        let mut e = Expectation {
            path: PathBuf::from("want.json"),
            tensors: plan
                .entries
                .iter()
                .map(|p| (p.target.clone(), want(&p.target_shape, Some(p.dtype))))
                .collect(),
        };
        assert_eq!(
            e.check_plan(&plan).into_result().unwrap(),
            plan.entries.len()
        );
        e.tensors
            .get_mut("params.fc.kernel")
            .unwrap()
            .shape
            .reverse();
        let r = e.check_plan(&plan);
        assert_eq!(r.mismatched().len(), 1);
        assert_eq!(r.mismatched()[0].shape, [16, 10]);
    }
}
