use std::collections::BTreeSet;
use std::path::Path;

use super::*;
use crate::dtype::DType;

const PATH: &str = "test.pt";

fn fixture(name: &str) -> Vec<u8> {
    let p = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn parse_bytes(bytes: &[u8], key: Option<&str>) -> Result<Parsed> {
    parse(Path::new(PATH), bytes, key)
}

fn parse_legacy_bytes(bytes: &[u8], key: Option<&str>) -> Result<Parsed> {
    parse_legacy(Path::new(PATH), bytes, key)
}

/// The parser `reader::parse_single` would pick for `bytes`.
fn parse_either(bytes: &[u8], key: Option<&str>) -> Result<Parsed> {
    if is_legacy(bytes) {
        parse_legacy_bytes(bytes, key)
    } else {
        parse_bytes(bytes, key)
    }
}

/// The naive oracle: walks `shape` row-major and reads element `offset + Σ i_k·stride_k`.
fn gather(map: &[u8], parsed: &Parsed, t: &TensorInfo) -> Vec<u8> {
    let size = t.dtype.size();
    let storage = &map[parsed.storages[t.storage].clone()];
    let numel: usize = t.shape.iter().product();
    let mut out = Vec::with_capacity(numel * size);
    for linear in 0..numel {
        let mut rem = linear;
        let mut src = t.offset;
        for (&n, &s) in t.shape.iter().zip(&t.strides).rev() {
            src += (rem % n) * s;
            rem /= n;
        }
        out.extend_from_slice(&storage[src * size..(src + 1) * size]);
    }
    out
}

/// Parses `pt` and checks every tensor against the contiguous twin `expected`; returns
/// the tensor names in file order.
fn check_against_expected(pt: &str, expected: &str, key: Option<&str>) -> Vec<String> {
    let map = fixture(pt);
    let parsed = parse_either(&map, key).unwrap_or_else(|e| panic!("{pt}: {e}"));
    let want_bytes = fixture(expected);
    let want = safetensors::SafeTensors::deserialize(&want_bytes).unwrap();
    let got_names: BTreeSet<&str> = parsed.tensors.iter().map(|t| t.name.as_str()).collect();
    let want_names: BTreeSet<&str> = want.names().into_iter().collect();
    assert_eq!(got_names, want_names, "{pt}: names");
    assert_eq!(
        got_names.len(),
        parsed.tensors.len(),
        "{pt}: duplicate names"
    );
    for t in &parsed.tensors {
        let w = want.tensor(&t.name).unwrap();
        assert_eq!(
            t.dtype.safetensors_name(),
            format!("{:?}", w.dtype()),
            "{}",
            t.name
        );
        assert_eq!(t.shape, w.shape(), "{}", t.name);
        assert_eq!(gather(&map, &parsed, t), w.data(), "{}: bytes", t.name);
    }
    for r in &parsed.storages {
        assert!(r.start <= r.end && r.end <= map.len());
    }
    parsed.tensors.iter().map(|t| t.name.clone()).collect()
}

#[test]
fn small_cnn_matches_its_expected_twin_in_file_order() {
    let names = check_against_expected("small_cnn.pt", "small_cnn.expected.safetensors", None);
    assert_eq!(
        &names[..6],
        [
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "bn1.running_mean",
            "bn1.running_var",
            "bn1.num_batches_tracked"
        ]
    );
    assert_eq!(names.last().map(String::as_str), Some("fc.bias"));
}

#[test]
fn mixed_matches_its_expected_twin() {
    check_against_expected("mixed.pt", "mixed.expected.safetensors", None);
}

#[test]
fn hugging_face_bin_matches_its_expected_twin() {
    check_against_expected(
        "pytorch_model.bin",
        "pytorch_model.expected.safetensors",
        None,
    );
}

#[test]
fn dtypes_and_views_match_expected_and_keep_their_strides() {
    let names =
        check_against_expected("dtypes_views.pt", "dtypes_views.expected.safetensors", None);
    let order = [
        "f64",
        "f32",
        "f16",
        "bf16",
        "i64",
        "i32",
        "i16",
        "i8",
        "u8",
        "bool",
        "scalar",
        "empty",
        "tied.a",
        "tied.b",
        "view.transposed",
        "view.offset",
        "view.strided",
        "channels_last",
    ];
    assert_eq!(names, order);
    let map = fixture("dtypes_views.pt");
    let p = parse_bytes(&map, None).unwrap();
    let t = |n: &str| p.tensors.iter().find(|t| t.name == n).unwrap().clone();
    // Views keep their storage: no copy, the same index, their own offset and strides.
    let base = t("tied.a");
    assert_eq!(t("tied.b").storage, base.storage);
    let tr = t("view.transposed");
    assert_eq!(
        (tr.storage, tr.shape, tr.strides),
        (base.storage, vec![10, 6], vec![1, 10])
    );
    let off = t("view.offset");
    assert_eq!(
        (off.storage, off.offset, off.shape),
        (base.storage, 20, vec![3, 10])
    );
    assert_eq!(t("view.strided").strides, vec![10, 3]);
    assert_eq!(t("channels_last").strides, vec![60, 1, 15, 3]);
    assert_eq!(t("scalar").shape, Vec::<usize>::new());
    assert_eq!(t("bf16").dtype, DType::BF16);
    assert_eq!(t("bool").dtype, DType::Bool);
    // Storages are ranges of the map, not copies: distinct per storage key.
    let used: BTreeSet<usize> = p.tensors.iter().map(|t| t.storage).collect();
    assert_eq!(used.len(), p.storages.len());
}

#[test]
fn nested_checkpoint_state_dict_is_found_automatically_and_by_key() {
    let auto = check_against_expected(
        "nested_checkpoint.pt",
        "nested_checkpoint.expected.safetensors",
        None,
    );
    let keyed = check_against_expected(
        "nested_checkpoint.pt",
        "nested_checkpoint.expected.safetensors",
        Some("model"),
    );
    assert_eq!(auto, keyed);
}

#[test]
fn wrong_key_gives_no_state_dict_listing_the_keys() {
    let map = fixture("nested_checkpoint.pt");
    match parse_bytes(&map, Some("weights")) {
        Err(Error::NoStateDict { detail, .. }) => {
            for k in ["'weights'", "'epoch'", "'model'", "'optimizer'"] {
                assert!(detail.contains(k), "{detail}");
            }
        }
        other => panic!("{other:?}"),
    }
    match parse_bytes(&map, Some("epoch")) {
        Err(Error::NoStateDict { detail, .. }) => assert!(detail.contains("int"), "{detail}"),
        other => panic!("{other:?}"),
    }
    match parse_bytes(&map, Some("optimizer")) {
        Err(Error::NoStateDict { detail, .. }) => assert!(detail.contains("'lr'"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malicious_pickle_is_refused_naming_posix_system_and_nothing_runs() {
    let marker = Path::new("/tmp/relayout_pwned");
    let _ = std::fs::remove_file(marker);
    let map = fixture("malicious.pt");
    match parse_bytes(&map, None) {
        Err(Error::ForbiddenGlobal { module, name, .. }) => {
            assert_eq!((module.as_str(), name.as_str()), ("posix", "system"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!marker.exists());
}

#[test]
fn legacy_format_is_recognised_and_not_taken_for_zip() {
    let legacy = fixture("legacy_format.pt");
    assert!(is_legacy(&legacy));
    assert!(!is_zip(&legacy));
    assert!(matches!(parse_bytes(&legacy, None), Err(Error::Zip { .. })));
    let zip = fixture("small_cnn.pt");
    assert!(is_zip(&zip));
    assert!(!is_legacy(&zip));
    assert!(matches!(
        parse_legacy_bytes(&zip, None),
        Err(Error::LegacyTorchFormat { .. })
    ));
    // Protocol 4 opens with a FRAME before the magic number.
    let mut framed = vec![0x80, 4, 0x95, 30, 0, 0, 0, 0, 0, 0, 0];
    framed.extend_from_slice(&legacy[2..]);
    assert!(is_legacy(&framed));
    assert!(!is_legacy(&legacy[..8]));
}

#[test]
fn legacy_format_matches_its_expected_twin() {
    let names = check_against_expected(
        "legacy_format.pt",
        "legacy_format.expected.safetensors",
        None,
    );
    assert_eq!(names, ["w", "b"]);
}

#[test]
fn legacy_storages_are_mapped_in_place_in_key_list_order() {
    let map = fixture("legacy_format.pt");
    let p = parse_legacy_bytes(&map, None).unwrap();
    // The key list names b's LongStorage first: its 8-byte count sits at 458, then 4
    // i64; w's count follows, then 15 f32 up to the end of the file.
    let range = |name: &str| {
        let t = p.tensors.iter().find(|t| t.name == name).unwrap();
        p.storages[t.storage].clone()
    };
    assert_eq!(range("b"), 466..498);
    assert_eq!(range("w"), 506..566);
    assert_eq!(map[458..466], 4u64.to_le_bytes());
    assert_eq!(map[498..506], 15u64.to_le_bytes());
}

#[test]
fn every_truncation_of_the_legacy_fixture_fails_without_panic() {
    let map = fixture("legacy_format.pt");
    // The last storage ends the file, so every shorter prefix lacks something.
    for len in 0..map.len() {
        assert!(
            parse_legacy_bytes(&map[..len], None).is_err(),
            "length {len}"
        );
    }
    assert!(parse_legacy_bytes(&map, None).is_ok());
}

#[test]
fn corruptions_of_the_legacy_fixture_never_panic() {
    let map = fixture("legacy_format.pt");
    let mut buf = map.clone();
    let (mut ok, mut tried) = (0usize, 0usize);
    for pos in 0..map.len() {
        for v in [map[pos] ^ 0x01, map[pos] ^ 0x80, 0xff, 0x00] {
            buf[pos] = v;
            tried += 1;
            if parse_legacy_bytes(&buf, None).is_ok() {
                ok += 1;
            }
        }
        buf[pos] = map[pos];
    }
    // Storage bytes and some names still parse; structural corruptions do not.
    assert!(ok > 0 && ok < tried, "{ok} of {tried}");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..5000 {
        let mut buf = map.clone();
        for _ in 0..1 + next() % 8 {
            let pos = (next() % buf.len() as u64) as usize;
            buf[pos] = next() as u8;
        }
        let _ = parse_legacy_bytes(&buf, None);
    }
}

#[test]
fn not_a_checkpoint_is_neither_zip_nor_legacy_and_fails_as_zip() {
    let map = fixture("not_a_checkpoint.pt");
    assert!(!is_zip(&map) && !is_legacy(&map));
    assert!(matches!(parse_bytes(&map, None), Err(Error::Zip { .. })));
    assert!(matches!(parse_bytes(&[], None), Err(Error::Zip { .. })));
}

#[test]
fn every_truncation_of_small_cnn_fails_without_panic() {
    let map = fixture("small_cnn.pt");
    // Every length near both ends (headers, EOCD), a stride through the middle.
    let lens = (0..300)
        .chain((300..map.len() - 300).step_by(101))
        .chain(map.len() - 300..map.len());
    for len in lens {
        assert!(parse_bytes(&map[..len], None).is_err(), "length {len}");
    }
    assert!(parse_bytes(&map, None).is_ok());
}

#[test]
fn single_byte_corruptions_of_mixed_never_panic() {
    let map = fixture("mixed.pt");
    let parsed = parse_bytes(&map, None).unwrap();
    let in_storage = |pos: usize| parsed.storages.iter().any(|r| r.contains(&pos));
    let mut buf = map.clone();
    let (mut ok, mut tried) = (0usize, 0usize);
    // Every byte of the zip structure and the pickle with a few replacements; storage
    // bytes are plain data, so a stride through them is enough.
    for pos in (0..map.len()).filter(|&p| !in_storage(p) || p % 61 == 0) {
        for v in [map[pos] ^ 0x01, map[pos] ^ 0x80, 0xff] {
            buf[pos] = v;
            tried += 1;
            if parse_bytes(&buf, None).is_ok() {
                ok += 1;
            }
        }
        buf[pos] = map[pos];
    }
    // Some corruptions (names, storage bytes) still parse; most structural ones do not.
    assert!(ok > 0 && ok < tried, "{ok} of {tried}");
}

#[test]
fn random_multi_byte_corruptions_of_dtypes_views_never_panic() {
    let map = fixture("dtypes_views.pt");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut buf = map.clone();
        for _ in 0..1 + next() % 8 {
            let pos = (next() % buf.len() as u64) as usize;
            buf[pos] = next() as u8;
        }
        let _ = parse_bytes(&buf, None);
    }
}

// ---- synthetic archives -----------------------------------------------------------------

/// One entry of a test zip.
struct ZipEntry {
    name: String,
    data: Vec<u8>,
    method: u16,
}

fn entry(name: &str, data: &[u8]) -> ZipEntry {
    ZipEntry {
        name: name.into(),
        data: data.into(),
        method: 0,
    }
}

/// Writes a zip archive, with zip64 records and extra fields everywhere when `zip64`.
fn write_zip(entries: &[ZipEntry], zip64: bool) -> Vec<u8> {
    const MAX32: u32 = u32::MAX;
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u64;
        let size = e.data.len() as u64;
        let (size32, offset32) = if zip64 {
            (MAX32, MAX32)
        } else {
            (size as u32, offset as u32)
        };
        let mut local_extra = Vec::new();
        let mut central_extra = Vec::new();
        if zip64 {
            local_extra.extend_from_slice(&1u16.to_le_bytes());
            local_extra.extend_from_slice(&16u16.to_le_bytes());
            local_extra.extend_from_slice(&size.to_le_bytes());
            local_extra.extend_from_slice(&size.to_le_bytes());
            central_extra.extend_from_slice(&1u16.to_le_bytes());
            central_extra.extend_from_slice(&24u16.to_le_bytes());
            central_extra.extend_from_slice(&size.to_le_bytes());
            central_extra.extend_from_slice(&size.to_le_bytes());
            central_extra.extend_from_slice(&offset.to_le_bytes());
        }
        // An unrelated extra record first, as torch's alignment padding is.
        let pad = [0x46, 0x42, 3, 0, 0, 0, 0];
        local_extra.splice(0..0, pad);
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0]);
        out.extend_from_slice(&e.method.to_le_bytes());
        out.extend_from_slice(&[0; 8]); // time, date, crc
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&(local_extra.len() as u16).to_le_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&local_extra);
        out.extend_from_slice(&e.data);

        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[45, 0, 45, 0, 0, 0]);
        central.extend_from_slice(&e.method.to_le_bytes());
        central.extend_from_slice(&[0; 8]);
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        central.extend_from_slice(&(central_extra.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 10]); // comment len, disk, attributes
        central.extend_from_slice(&offset32.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
        central.extend_from_slice(&central_extra);
    }
    let cd_offset = out.len() as u64;
    let cd_size = central.len() as u64;
    out.extend_from_slice(&central);
    let count = entries.len() as u64;
    if zip64 {
        let eocd64 = out.len() as u64;
        out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
        out.extend_from_slice(&44u64.to_le_bytes());
        out.extend_from_slice(&[45, 0, 45, 0]);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&cd_size.to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&eocd64.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
    }
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let (c16, s32, o32) = if zip64 {
        (u16::MAX, MAX32, MAX32)
    } else {
        (count as u16, cd_size as u32, cd_offset as u32)
    };
    out.extend_from_slice(&c16.to_le_bytes());
    out.extend_from_slice(&c16.to_le_bytes());
    out.extend_from_slice(&s32.to_le_bytes());
    out.extend_from_slice(&o32.to_le_bytes());
    let comment = b"written by the relayout tests";
    out.extend_from_slice(&(comment.len() as u16).to_le_bytes());
    out.extend_from_slice(comment);
    out
}

/// A tensor for [`state_dict_pickle`].
#[derive(Clone)]
struct Spec {
    name: &'static str,
    storage_type: &'static str,
    key: &'static str,
    numel: i64,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
    pid: Pid,
}

/// The persistent id [`Pickle::tensor`] writes for a storage.
#[derive(Clone, Copy)]
enum Pid {
    /// `('storage', type, key, location, numel)`.
    Zip,
    /// `('storage', type, key, location, numel, None)`.
    Legacy,
    /// `('storage', type, key, location, numel, (view_key, offset, numel))`.
    LegacyView(&'static str, i64, i64),
}

fn spec(name: &'static str, key: &'static str, shape: &[i64], stride: &[i64]) -> Spec {
    Spec {
        name,
        storage_type: "FloatStorage",
        key,
        numel: 24,
        offset: 0,
        shape: shape.into(),
        stride: stride.into(),
        pid: Pid::Zip,
    }
}

fn legacy_spec(name: &'static str, key: &'static str, shape: &[i64], stride: &[i64]) -> Spec {
    Spec {
        pid: Pid::Legacy,
        ..spec(name, key, shape, stride)
    }
}

/// A small pickle writer using either protocol 2 opcodes (as torch.save writes them) or
/// protocol 4 ones (FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE, LONG1).
struct Pickle {
    out: Vec<u8>,
    proto4: bool,
}

impl Pickle {
    fn new(proto4: bool) -> Pickle {
        let mut out = vec![0x80, if proto4 { 4 } else { 2 }];
        if proto4 {
            // The frame length is a hint only.
            out.extend_from_slice(&[0x95, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
        Pickle { out, proto4 }
    }
    fn op(&mut self, b: u8) -> &mut Self {
        self.out.push(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        if self.proto4 && s.len() < 256 {
            self.out.push(0x8c);
            self.out.push(s.len() as u8);
        } else {
            self.out.push(b'X');
            self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(s.as_bytes());
        if self.proto4 {
            self.out.push(0x94);
        }
        self
    }
    fn int(&mut self, i: i64) -> &mut Self {
        if self.proto4 || i32::try_from(i).is_err() {
            self.out.extend_from_slice(&[0x8a, 8]);
            self.out.extend_from_slice(&i.to_le_bytes());
        } else {
            self.out.push(b'J');
            self.out.extend_from_slice(&(i as i32).to_le_bytes());
        }
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        if self.proto4 {
            self.str(module).str(name).op(0x93).op(0x94)
        } else {
            self.out.push(b'c');
            self.out
                .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
            self
        }
    }
    fn ints(&mut self, v: &[i64]) -> &mut Self {
        self.op(b'(');
        for &i in v {
            self.int(i);
        }
        self.op(b't')
    }
    fn tensor(&mut self, t: &Spec) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
        self.op(b'(').str("storage").global("torch", t.storage_type);
        self.str(t.key).str("cpu").int(t.numel);
        match t.pid {
            Pid::Zip => {}
            Pid::Legacy => {
                self.op(b'N');
            }
            Pid::LegacyView(key, offset, numel) => {
                self.str(key).int(offset).int(numel).op(0x87);
            }
        }
        self.op(b't').op(b'Q');
        self.int(t.offset).ints(&t.shape).ints(&t.stride).op(0x89);
        self.global("collections", "OrderedDict").op(b')').op(b'R');
        self.op(b't').op(b'R')
    }
    fn state_dict(&mut self, tensors: &[Spec]) -> &mut Self {
        self.op(b'}').op(b'(');
        for t in tensors {
            self.str(t.name).tensor(t);
        }
        self.op(b'u')
    }
    fn finish(&mut self) -> Vec<u8> {
        self.op(b'.');
        std::mem::take(&mut self.out)
    }
}

fn floats(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

/// An archive `archive/` holding `pkl` and storages `(key, bytes)`.
fn archive(pkl: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries = vec![
        entry("archive/data.pkl", &pkl),
        entry("archive/byteorder", b"little"),
    ];
    for (k, d) in storages {
        entries.push(entry(&format!("archive/data/{k}"), d));
    }
    entries.push(entry("archive/version", b"3\n"));
    write_zip(&entries, false)
}

fn two_tensor_archive(proto4: bool) -> Vec<u8> {
    let mut b = spec("b", "0", &[2, 3], &[1, 4]);
    b.offset = 1;
    let pkl = Pickle::new(proto4)
        .state_dict(&[spec("a", "0", &[4, 6], &[6, 1]), b])
        .finish();
    archive(pkl, &[("0", floats(24))])
}

fn values(map: &[u8], p: &Parsed) -> Vec<(String, Vec<u8>)> {
    p.tensors
        .iter()
        .map(|t| (t.name.clone(), gather(map, p, t)))
        .collect()
}

#[test]
fn synthetic_archive_shares_one_storage_between_views() {
    let map = two_tensor_archive(false);
    let p = parse_bytes(&map, None).unwrap();
    assert_eq!(p.storages.len(), 1);
    assert_eq!(p.tensors[1].offset, 1);
    let b = &values(&map, &p)[1].1;
    let want: Vec<u8> = [1, 5, 9, 2, 6, 10]
        .iter()
        .flat_map(|&i| (i as f32).to_le_bytes())
        .collect();
    assert_eq!(*b, want);
}

#[test]
fn protocol_4_opcodes_read_like_protocol_2() {
    let m2 = two_tensor_archive(false);
    let m4 = two_tensor_archive(true);
    let p2 = parse_bytes(&m2, None).unwrap();
    let p4 = parse_bytes(&m4, None).unwrap();
    assert_eq!(p2.tensors, p4.tensors);
    assert_eq!(values(&m2, &p2), values(&m4, &p4));
}

#[test]
fn zip64_archive_reads_like_a_plain_one() {
    let plain = two_tensor_archive(false);
    let p = parse_bytes(&plain, None).unwrap();
    let pkl = Pickle::new(false)
        .state_dict(&[spec("a", "0", &[4, 6], &[6, 1]), {
            let mut b = spec("b", "0", &[2, 3], &[1, 4]);
            b.offset = 1;
            b
        }])
        .finish();
    let entries = [
        entry("archive/data.pkl", &pkl),
        entry("archive/data/0", &floats(24)),
    ];
    let map64 = write_zip(&entries, true);
    let p64 = parse_bytes(&map64, None).unwrap();
    assert_eq!(p.tensors, p64.tensors);
    assert_eq!(values(&plain, &p), values(&map64, &p64));
}

#[test]
fn parameters_unwrap_to_their_tensor() {
    let mut p = Pickle::new(false);
    p.op(b'}').str("w");
    p.global("torch._utils", "_rebuild_parameter").op(b'(');
    p.tensor(&spec("w", "0", &[24], &[1])).op(0x88);
    p.global("collections", "OrderedDict").op(b')').op(b'R');
    p.op(b't').op(b'R').op(b's');
    let map = archive(p.finish(), &[("0", floats(24))]);
    let parsed = parse_bytes(&map, None).unwrap();
    assert_eq!(parsed.tensors[0].shape, vec![24]);
}

#[test]
fn corrupt_eocd_is_a_zip_error() {
    let mut map = fixture("small_cnn.pt");
    let eocd = map.len() - 22;
    map[eocd] = b'X';
    match parse_bytes(&map, None) {
        Err(Error::Zip { detail, .. }) => assert!(detail.contains("end of central"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // torch writes zip64 records: a locator pointing past the end, then a zip64 record
    // whose central directory lies past the end.
    let good = fixture("small_cnn.pt");
    let locator = eocd - 20;
    assert_eq!(good[locator..locator + 4], [b'P', b'K', 6, 7]);
    let mut map = good.clone();
    map[locator + 8..locator + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(parse_bytes(&map, None), Err(Error::Zip { .. })));
    let eocd64 = locator - 56;
    let mut map = good.clone();
    map[eocd64 + 48..eocd64 + 56].copy_from_slice(&(1u64 << 40).to_le_bytes());
    match parse_bytes(&map, None) {
        Err(Error::Zip { detail, .. }) => assert!(detail.contains("central directory"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn compressed_storage_entry_is_refused_naming_it() {
    let pkl = Pickle::new(false)
        .state_dict(&[spec("a", "0", &[24], &[1])])
        .finish();
    let mut storage = entry("archive/data/0", &floats(24));
    storage.method = 8;
    let map = write_zip(&[entry("archive/data.pkl", &pkl), storage], false);
    match parse_bytes(&map, None) {
        Err(Error::Zip { detail, .. }) => {
            assert!(
                detail.contains("'archive/data/0'") && detail.contains("method 8"),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn storage_entry_shorter_than_its_numel_is_truncated() {
    let pkl = Pickle::new(false)
        .state_dict(&[spec("a", "0", &[4], &[1])])
        .finish();
    let map = archive(pkl, &[("0", floats(23))]);
    match parse_bytes(&map, None) {
        Err(Error::Truncated { detail, .. }) => {
            assert!(detail.contains("archive/data/0"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_storage_entry_is_a_zip_error() {
    let pkl = Pickle::new(false)
        .state_dict(&[spec("a", "7", &[4], &[1])])
        .finish();
    let map = archive(pkl, &[("0", floats(24))]);
    assert!(matches!(parse_bytes(&map, None), Err(Error::Zip { .. })));
}

fn bad_tensor(t: Spec) -> String {
    let map = archive(
        Pickle::new(false).state_dict(&[t]).finish(),
        &[("0", floats(24))],
    );
    match parse_bytes(&map, None) {
        Err(Error::BadTensor { tensor, detail, .. }) => {
            assert_eq!(tensor, "t");
            detail
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tensors_outside_their_storage_or_with_bad_sizes_are_bad_tensors() {
    // One element past the end of a 24-element storage.
    let mut t = spec("t", "0", &[5, 5], &[5, 1]);
    assert!(bad_tensor(t.clone()).contains("reaches element 25"));
    t.shape = vec![4, 6];
    t.stride = vec![6, 1];
    t.offset = 1;
    assert!(bad_tensor(t.clone()).contains("offset 1"));
    t.offset = -1;
    assert!(bad_tensor(t.clone()).contains("negative"));
    let t = spec("t", "0", &[2, 3], &[-1, 1]);
    assert!(bad_tensor(t).contains("negative"));
    let t = spec("t", "0", &[-2, 3], &[3, 1]);
    assert!(bad_tensor(t).contains("negative"));
    let t = spec("t", "0", &[1 << 40, 1 << 40], &[1, 1]);
    assert!(bad_tensor(t).contains("overflows"));
    let t = spec("t", "0", &[5, 2], &[1 << 62, 1]);
    assert!(bad_tensor(t).contains("overflows"));
    // An empty tensor reaches nothing, wherever it starts.
    let mut t = spec("t", "0", &[0, 4], &[4, 1]);
    t.offset = 1000;
    let map = archive(
        Pickle::new(false).state_dict(&[t]).finish(),
        &[("0", floats(24))],
    );
    assert!(parse_bytes(&map, None).is_ok());
}

#[test]
fn rank_above_the_limit_is_a_pickle_error() {
    let t = spec("t", "0", &[1; 33], &[1; 33]);
    let map = archive(
        Pickle::new(false).state_dict(&[t]).finish(),
        &[("0", floats(24))],
    );
    match parse_bytes(&map, None) {
        Err(Error::Pickle { detail, .. }) => assert!(detail.contains("rank 33"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

fn parse_pickle(pkl: Vec<u8>) -> Result<Parsed> {
    parse_bytes(&archive(pkl, &[("0", floats(24))]), None)
}

#[test]
fn forbidden_globals_are_refused_in_both_global_opcodes() {
    for proto4 in [false, true] {
        let mut p = Pickle::new(proto4);
        p.op(b'}').str("x").global("builtins", "eval");
        match parse_pickle(p.finish()) {
            Err(Error::ForbiddenGlobal { module, name, .. }) => {
                assert_eq!((module.as_str(), name.as_str()), ("builtins", "eval"))
            }
            other => panic!("{other:?}"),
        }
    }
    // A near miss of an allowed name is still refused.
    let mut p = Pickle::new(false);
    p.global("torch", "load");
    assert!(matches!(
        parse_pickle(p.finish()),
        Err(Error::ForbiddenGlobal { .. })
    ));
}

#[test]
fn quantized_and_sparse_rebuilds_are_unsupported_tensors() {
    let mut p = Pickle::new(false);
    p.global("torch._utils", "_rebuild_qtensor");
    match parse_pickle(p.finish()) {
        Err(Error::UnsupportedTensor { detail, .. }) => {
            assert!(detail.contains("_rebuild_qtensor"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn complex_storage_is_an_unsupported_dtype() {
    let mut t = spec("t", "0", &[2], &[1]);
    t.storage_type = "ComplexFloatStorage";
    match parse_pickle(Pickle::new(false).state_dict(&[t]).finish()) {
        Err(Error::UnsupportedDType { dtype, .. }) => {
            assert_eq!(dtype, "torch.ComplexFloatStorage")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_storage_type_maps_to_its_dtype() {
    let types = [
        ("DoubleStorage", DType::F64),
        ("FloatStorage", DType::F32),
        ("HalfStorage", DType::F16),
        ("BFloat16Storage", DType::BF16),
        ("LongStorage", DType::I64),
        ("IntStorage", DType::I32),
        ("ShortStorage", DType::I16),
        ("CharStorage", DType::I8),
        ("ByteStorage", DType::U8),
        ("BoolStorage", DType::Bool),
        ("Float8_e4m3fnStorage", DType::F8E4M3),
        ("Float8_e5m2Storage", DType::F8E5M2),
    ];
    for (ty, dtype) in types {
        let mut t = spec("t", "0", &[3], &[1]);
        t.storage_type = ty;
        t.numel = 3;
        let p = parse_pickle(Pickle::new(false).state_dict(&[t]).finish()).unwrap();
        assert_eq!(p.tensors[0].dtype, dtype, "{ty}");
        assert_eq!(p.storages[0].len(), 3 * dtype.size(), "{ty}");
    }
}

#[test]
fn pickle_limits_and_malformed_streams_are_pickle_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0x80, 2, b'(', b'('], "without STOP"),
        ([vec![0x80, 2], vec![b'('; 300]].concat(), "MARK"),
        (vec![0x80, 2, b'.'], "empty stack"),
        (vec![0x80, 2, b'h', 5, b'.'], "memo entry 5"),
        (vec![0x80, 2, b'X', 0, 1, 0, 0, b'a'], "runs past the end"),
        (vec![0x80, 2, b'X', 0xff, 0xff, 0xff, 0x7f], "exceeds"),
        (vec![0x80, 2, b'X', 2, 0, 0, 0, 0xff, 0xfe, b'.'], "UTF-8"),
        (vec![0x80, 2, b'I', b'1', b'\n', b'.'], "opcode 0x49"),
        (vec![0x80, 9, b'N', b'.'], "protocol 9"),
        (
            [vec![0x80, 2], vec![b'N'; (1 << 20) + 1]].concat(),
            "stack exceeds",
        ),
        (vec![0x80, 2, b'N', b'r', 0, 0, 0, 0x40, b'.'], "memo index"),
        (vec![0x80, 2, b'N', b'N', b't', b'.'], "no MARK"),
        (
            vec![0x80, 2, b'(', b'N', b'R', b'.'],
            "pop from an empty stack",
        ),
        (
            vec![0x80, 2, b'K', 1, b'K', 2, b'N', b's', b'.'],
            "SETITEM on a int",
        ),
        (vec![0x80, 2, b'N', b')', b'R', b'.'], "cannot call"),
        (vec![0x80, 2, b'N', b'Q', b'.'], "persistent id"),
    ];
    for (pkl, want) in cases {
        match pickle::load(Path::new(PATH), &pkl) {
            Err(Error::Pickle { detail, .. }) => {
                assert!(detail.contains(want), "{detail} / {want}")
            }
            other => panic!("{want}: {other:?}"),
        }
    }
}

#[test]
fn big_endian_byteorder_is_refused() {
    let pkl = Pickle::new(false)
        .state_dict(&[spec("a", "0", &[4], &[1])])
        .finish();
    let map = write_zip(
        &[
            entry("archive/data.pkl", &pkl),
            entry("archive/byteorder", b"big"),
            entry("archive/data/0", &floats(24)),
        ],
        false,
    );
    match parse_bytes(&map, None) {
        Err(Error::UnknownFormat { detail, .. }) => assert!(detail.contains("'big'"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicate_zip_entries_and_missing_data_pkl_are_refused() {
    let dup = write_zip(
        &[entry("a/data.pkl", b"."), entry("a/data.pkl", b".")],
        false,
    );
    assert!(matches!(parse_bytes(&dup, None), Err(Error::Zip { .. })));
    let none = write_zip(&[entry("a/other", b"x")], false);
    assert!(matches!(
        parse_bytes(&none, None),
        Err(Error::UnknownFormat { .. })
    ));
    let flat = write_zip(&[entry("data.pkl", b".")], false);
    assert!(matches!(
        parse_bytes(&flat, None),
        Err(Error::UnknownFormat { .. })
    ));
    let empty = write_zip(&[], false);
    assert!(matches!(
        parse_bytes(&empty, None),
        Err(Error::UnknownFormat { .. })
    ));
}

#[test]
fn several_state_dicts_need_a_key_and_non_dicts_have_none() {
    let mut p = Pickle::new(false);
    p.op(b'}').op(b'(');
    p.str("model").state_dict(&[spec("a", "0", &[4], &[1])]);
    p.str("ema").state_dict(&[spec("a", "0", &[4], &[1])]);
    p.str("step").int(3).op(b'u');
    let map = archive(p.finish(), &[("0", floats(24))]);
    match parse_bytes(&map, None) {
        Err(Error::NoStateDict { detail, .. }) => {
            assert!(
                detail.contains("'model', 'ema'") && !detail.contains("step"),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(parse_bytes(&map, Some("ema")).unwrap().tensors.len(), 1);

    let mut p = Pickle::new(false);
    p.op(b']');
    assert!(matches!(
        parse_pickle(p.finish()),
        Err(Error::NoStateDict { .. })
    ));
    let mut p = Pickle::new(false);
    p.op(b'}').str("lr").int(1).op(b's');
    match parse_pickle(p.finish()) {
        Err(Error::NoStateDict { detail, .. }) => assert!(detail.contains("'lr'"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn repeated_names_keep_the_first_position_and_the_last_value() {
    let pkl = Pickle::new(false)
        .state_dict(&[
            spec("a", "0", &[4], &[1]),
            spec("b", "0", &[2], &[1]),
            spec("a", "0", &[3], &[1]),
        ])
        .finish();
    let p = parse_pickle(pkl).unwrap();
    let got: Vec<(&str, &[usize])> = p
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(got, [("a", &[3][..]), ("b", &[2][..])]);
}

#[test]
fn storage_referenced_with_two_dtypes_is_a_pickle_error() {
    let mut b = spec("b", "0", &[2], &[1]);
    b.storage_type = "LongStorage";
    let pkl = Pickle::new(false)
        .state_dict(&[spec("a", "0", &[4], &[1]), b])
        .finish();
    assert!(matches!(parse_pickle(pkl), Err(Error::Pickle { .. })));
}

// ---- synthetic legacy files -------------------------------------------------------------

/// The magic number 0x1950a86a20f9469cfc6c as LONG1 writes it.
const LEGACY_MAGIC: [u8; 12] = [
    0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// One storage's data in a legacy file: its key in the key list, the element count
/// written before it, its bytes.
struct LegacyStorage {
    key: &'static str,
    count: u64,
    data: Vec<u8>,
}

fn legacy_storage(key: &'static str, data: Vec<u8>, element_size: usize) -> LegacyStorage {
    LegacyStorage {
        key,
        count: (data.len() / element_size) as u64,
        data,
    }
}

/// A legacy torch.save stream: magic number, protocol `version`, sys_info, `main`, the
/// key list and the storages, in that order.
fn legacy_file_with(
    version: u16,
    little_endian: bool,
    main: Vec<u8>,
    storages: &[LegacyStorage],
) -> Vec<u8> {
    let mut out = vec![0x80, 2];
    out.extend_from_slice(&LEGACY_MAGIC);
    out.extend_from_slice(&[b'.', 0x80, 2, b'M']);
    out.extend_from_slice(&version.to_le_bytes());
    out.push(b'.');
    let mut info = Pickle::new(false);
    info.op(b'}').op(b'(').str("protocol_version").int(1001);
    info.str("little_endian")
        .op(if little_endian { 0x88 } else { 0x89 });
    info.str("type_sizes").op(b'}').op(b'u');
    out.extend(info.finish());
    out.extend(main);
    let mut keys = Pickle::new(false);
    keys.op(b']').op(b'(');
    for s in storages {
        keys.str(s.key);
    }
    keys.op(b'e');
    out.extend(keys.finish());
    for s in storages {
        out.extend_from_slice(&s.count.to_le_bytes());
        out.extend_from_slice(&s.data);
    }
    out
}

fn legacy_file(main: Vec<u8>, storages: &[LegacyStorage]) -> Vec<u8> {
    legacy_file_with(1001, true, main, storages)
}

fn longs(n: usize) -> Vec<u8> {
    (0..n as i64)
        .flat_map(|i| (100 + i).to_le_bytes())
        .collect()
}

/// `a` (views of storage "1", 24 f32) and `n` (storage "0", 3 i64), whose data the key
/// list puts in the order "0", "1".
fn two_storage_legacy() -> Vec<u8> {
    let mut b = legacy_spec("b", "1", &[2, 3], &[1, 4]);
    b.offset = 1;
    let mut n = legacy_spec("n", "0", &[3], &[1]);
    n.storage_type = "LongStorage";
    n.numel = 3;
    let main = Pickle::new(false)
        .state_dict(&[legacy_spec("a", "1", &[4, 6], &[6, 1]), b, n])
        .finish();
    legacy_file(
        main,
        &[
            legacy_storage("0", longs(3), 8),
            legacy_storage("1", floats(24), 4),
        ],
    )
}

fn legacy_err(map: &[u8]) -> Error {
    match parse_legacy_bytes(map, None) {
        Err(e) => e,
        Ok(p) => panic!("parsed: {p:?}"),
    }
}

fn legacy_detail(map: &[u8]) -> String {
    match legacy_err(map) {
        Error::LegacyTorchFormat { detail, .. } => detail,
        other => panic!("{other:?}"),
    }
}

#[test]
fn synthetic_legacy_file_reads_views_and_dtypes_from_its_ranges() {
    let map = two_storage_legacy();
    let p = parse_legacy_bytes(&map, None).unwrap();
    assert_eq!(p.storages.len(), 2);
    let got = values(&map, &p);
    assert_eq!(got[0], ("a".to_string(), floats(24)));
    let b: Vec<u8> = [1, 5, 9, 2, 6, 10]
        .iter()
        .flat_map(|&i| (i as f32).to_le_bytes())
        .collect();
    assert_eq!(got[1], ("b".to_string(), b));
    assert_eq!(got[2], ("n".to_string(), longs(3)));
    assert_eq!(p.tensors[2].dtype, DType::I64);
    // Both ranges lie in the file, one after the other, after their counts.
    let [first, second] = [&p.storages[p.tensors[2].storage], &p.storages[0]];
    assert_eq!(first.end + 8, second.start);
    assert_eq!(second.end, map.len());
}

#[test]
fn legacy_protocol_4_and_python_2_strings_read_alike() {
    let want = parse_legacy_bytes(&two_storage_legacy(), None).unwrap();
    let main = Pickle::new(true)
        .state_dict(&[Spec {
            pid: Pid::Legacy,
            ..spec("a", "0", &[4, 6], &[6, 1])
        }])
        .finish();
    let map = legacy_file(main, &[legacy_storage("0", floats(24), 4)]);
    let p4 = parse_legacy_bytes(&map, None).unwrap();
    assert_eq!(p4.tensors[0], want.tensors[0]);
    // Python 2 pickled str keys as SHORT_BINSTRING; torch.load reads them as UTF-8.
    let mut p = Pickle::new(false);
    p.op(b'}').op(b'U').op(1).op(b'a');
    p.tensor(&legacy_spec("a", "0", &[4, 6], &[6, 1])).op(b's');
    let map = legacy_file(p.finish(), &[legacy_storage("0", floats(24), 4)]);
    assert_eq!(parse_legacy_bytes(&map, None).unwrap().tensors[0].name, "a");
}

#[test]
fn legacy_storage_views_start_at_their_offset_inside_the_root() {
    // A view of elements 4..16 of a 24-element storage; the tensor reads its 3x4 rows.
    let mut t = legacy_spec("v", "0", &[3, 4], &[4, 1]);
    t.pid = Pid::LegacyView("9", 4, 12);
    let mut whole = legacy_spec("w", "0", &[24], &[1]);
    whole.pid = Pid::Legacy;
    let main = Pickle::new(false).state_dict(&[t.clone(), whole]).finish();
    let map = legacy_file(main, &[legacy_storage("0", floats(24), 4)]);
    let p = parse_legacy_bytes(&map, None).unwrap();
    assert_eq!(p.storages.len(), 1);
    assert_eq!(p.tensors[0].offset, 4);
    assert_eq!(p.tensors[0].storage, p.tensors[1].storage);
    let want: Vec<u8> = (4..16).flat_map(|i| (i as f32).to_le_bytes()).collect();
    assert_eq!(values(&map, &p)[0].1, want);

    // A tensor reaching past its view is refused though the root is larger.
    let mut over = t.clone();
    over.shape = vec![4, 4];
    let main = Pickle::new(false).state_dict(&[over]).finish();
    let map = legacy_file(main, &[legacy_storage("0", floats(24), 4)]);
    match legacy_err(&map) {
        Error::BadTensor { detail, .. } => assert!(detail.contains("of 12 elements"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // A view reaching past its root is refused in the pickle.
    let mut outside = t;
    outside.pid = Pid::LegacyView("9", 20, 12);
    let main = Pickle::new(false).state_dict(&[outside]).finish();
    let map = legacy_file(main, &[legacy_storage("0", floats(24), 4)]);
    match legacy_err(&map) {
        Error::Pickle { detail, .. } => assert!(detail.contains("view '9'"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn legacy_storage_keys_listed_twice_missing_or_unknown_name_the_key() {
    let main = || {
        Pickle::new(false)
            .state_dict(&[legacy_spec("a", "k0", &[4], &[1])])
            .finish()
    };
    let s = |key| legacy_storage(key, floats(24), 4);
    let twice = legacy_file(main(), &[s("k0"), s("k0")]);
    assert!(legacy_detail(&twice).contains("'k0' is listed twice"));
    let missing = legacy_file(main(), &[]);
    assert!(legacy_detail(&missing).contains("'k0' is missing"));
    let unknown = legacy_file(main(), &[s("k0"), s("k9")]);
    assert!(legacy_detail(&unknown).contains("'k9' is listed"));
    let err = legacy_err(&twice).to_string();
    assert!(err.starts_with(PATH), "{err}");
}

#[test]
fn legacy_storage_counts_must_match_the_pickle_and_fit_in_the_file() {
    let main = |numel: i64| {
        let mut t = legacy_spec("a", "0", &[4], &[1]);
        t.numel = numel;
        Pickle::new(false).state_dict(&[t]).finish()
    };
    let mut wrong = legacy_storage("0", floats(24), 4);
    wrong.count = 23;
    let map = legacy_file(main(24), &[wrong]);
    assert!(legacy_detail(&map).contains("holds 23 elements"));
    // Counts the file cannot hold, up to ones whose byte size overflows.
    for numel in [25, 1 << 40, i64::MAX] {
        let mut s = legacy_storage("0", floats(24), 4);
        s.count = numel as u64;
        match legacy_err(&legacy_file(main(numel), &[s])) {
            Error::Truncated { detail, .. } => assert!(detail.contains("'0'"), "{detail}"),
            other => panic!("{numel}: {other:?}"),
        }
    }
    // The count itself cut off.
    let mut map = legacy_file(main(24), &[legacy_storage("0", floats(24), 4)]);
    map.truncate(map.len() - 24 * 4 - 3);
    assert!(matches!(legacy_err(&map), Error::Truncated { .. }));
}

#[test]
fn big_endian_legacy_files_are_refused_clearly() {
    let main = Pickle::new(false)
        .state_dict(&[legacy_spec("a", "0", &[4], &[1])])
        .finish();
    let map = legacy_file_with(1001, false, main, &[legacy_storage("0", floats(24), 4)]);
    match legacy_err(&map) {
        Error::UnknownFormat { detail, .. } => assert!(detail.contains("big-endian"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn legacy_header_pickles_are_checked() {
    let main = || {
        Pickle::new(false)
            .state_dict(&[legacy_spec("a", "0", &[4], &[1])])
            .finish()
    };
    let data = || [legacy_storage("0", floats(24), 4)];
    let map = legacy_file_with(1000, true, main(), &data());
    assert!(legacy_detail(&map).contains("protocol version 1000"));
    // A zip-style persistent id (no view metadata) is not the legacy one.
    let zip_pid = Pickle::new(false)
        .state_dict(&[spec("a", "0", &[4], &[1])])
        .finish();
    match legacy_err(&legacy_file(zip_pid, &data())) {
        Error::Pickle { detail, .. } => assert!(detail.contains("view_metadata"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // ... and the legacy one is not the zip one.
    let legacy_pid = Pickle::new(false)
        .state_dict(&[legacy_spec("a", "0", &[4], &[1])])
        .finish();
    assert!(matches!(
        parse_pickle(legacy_pid),
        Err(Error::Pickle { .. })
    ));
    // The main pickle has the zip format's allowlist.
    let mut p = Pickle::new(false);
    p.op(b'}').str("x").global("posix", "system");
    assert!(matches!(
        legacy_err(&legacy_file(p.finish(), &data())),
        Error::ForbiddenGlobal { .. }
    ));
}

// ---- VM memory --------------------------------------------------------------------------

/// Runs `pkl` as a data.pkl; returns the object and the bytes the VM counted.
fn vm_bytes(pkl: &[u8]) -> Result<usize> {
    let mut vm = pickle::Unpickler::new(Path::new(PATH), pkl, pickle::PersistentIds::Zip);
    vm.load_next()?;
    Ok(vm.vm_bytes())
}

fn over_budget(pkl: &[u8]) -> String {
    match vm_bytes(pkl) {
        Err(Error::Pickle { detail, .. }) => {
            assert!(detail.contains("exceed its limit of"), "{detail}");
            detail
        }
        other => panic!("{other:?}"),
    }
}

/// `n` repetitions of `unit` between a protocol 2 header and `tail`.
fn repeated(unit: &[u8], n: usize, tail: &[u8]) -> Vec<u8> {
    [&[0x80, 2][..], &unit.repeat(n), tail].concat()
}

#[test]
fn empty_dict_bomb_costs_the_vm_nothing_per_dict() {
    // 4 MiB of EMPTY_DICT, POP: each dict is a number, not an allocation.
    let bomb = repeated(b"}0", 2 << 20, b"N.");
    let used = vm_bytes(&bomb).unwrap();
    assert!(used < 1024, "{used} bytes for {} dicts", 2 << 20);
    // The same with lists and tuples.
    assert!(vm_bytes(&repeated(b"]0)0", 1 << 20, b"N.")).unwrap() < 1024);
}

#[test]
fn dict_items_are_counted_and_bounded_by_the_pickle_read() {
    // `}NNs0`: five bytes, one item, 40 bytes of VM: counted...
    let n = 1 << 16;
    let used = vm_bytes(&repeated(b"}NNs0", n, b"N.")).unwrap();
    assert!((40 * n..=2 * 40 * n + 4096).contains(&used), "{used}");
    // ...so enough of them hit the floor: 4M items want 160 MiB.
    let detail = over_budget(&repeated(b"}NNs0", 4 << 20, b"N."));
    assert!(
        detail.contains("128 MiB plus one byte per 4 bytes of pickle read, at most 1024 MiB"),
        "{detail}"
    );
}

#[test]
fn tuple_chains_and_huge_memos_hit_the_budget_not_the_allocator() {
    // TUPLE1 wraps the top in a tuple: one byte of pickle, one 16-byte item.
    let chain = [
        &[0x80, 2, b'N'][..],
        &repeated(b"\x85", 10 << 20, b".")[2..],
    ]
    .concat();
    over_budget(&chain);
    // MEMOIZE: one byte, one 16-byte memo entry (up to the memo's own limit).
    let memo = [
        &[0x80, 2, b'N'][..],
        &repeated(b"\x94", 10 << 20, b".")[2..],
    ]
    .concat();
    over_budget(&memo);
    // Below the floor both are fine and counted.
    let small = [&[0x80, 2, b'N'][..], &repeated(b"\x94", 1 << 20, b".")[2..]].concat();
    let used = vm_bytes(&small).unwrap();
    assert!(((16 << 20)..=(33 << 20)).contains(&used), "{used}");
}

#[test]
fn deep_nesting_neither_recurses_nor_escapes_the_budget() {
    // 500 000 lists, each appended into the one below: nesting that deep, built without
    // a single MARK, then dropped with the VM.
    let depth = 500_000;
    let mut pkl = repeated(b"]", depth, b"");
    pkl.extend(std::iter::repeat_n(b'a', depth - 1));
    pkl.push(b'.');
    let mut vm = pickle::Unpickler::new(Path::new(PATH), &pkl, pickle::PersistentIds::Zip);
    let root = vm.load_next().unwrap();
    assert_eq!(root.kind(), "list");
    assert!(vm.vm_bytes() <= 64 * depth, "{}", vm.vm_bytes());
    let un = vm.finish();
    assert_eq!(un.list(&root).unwrap().count(), 1);
    // Tuples nest as deep through TUPLE1, and MARKs stop at their limit.
    let tuples = [&[0x80, 2, b'N'][..], &repeated(b"\x85", depth, b".")[2..]].concat();
    assert!(vm_bytes(&tuples).is_ok());
    let marks = repeated(b"(", 257, b"");
    assert!(
        matches!(vm_bytes(&marks), Err(Error::Pickle { detail, .. }) if detail.contains("MARK"))
    );
}

#[test]
fn huge_strings_are_spans_of_the_pickle_and_never_copied() {
    // One 32 MiB string, memoized and pushed 100 000 times into a tuple.
    let text = vec![b'x'; 32 << 20];
    let mut pkl = vec![0x80, 2, b'X'];
    pkl.extend_from_slice(&(text.len() as u32).to_le_bytes());
    pkl.extend_from_slice(&text);
    pkl.extend_from_slice(&[b'q', 0, b'(']);
    pkl.extend(std::iter::repeat_n([b'h', 0], 100_000).flatten());
    pkl.extend_from_slice(b"t.");
    let used = vm_bytes(&pkl).unwrap();
    assert!(used < 8 << 20, "{used}");
    // Past the string limit, or past the end, it is an error before anything is read.
    for (n, want) in [
        ((64u64 << 20) + 1, "exceeds"),
        (1 << 62, "exceeds"),
        (1000, "runs past the end"),
    ] {
        let mut pkl = vec![0x80, 4, 0x8d];
        pkl.extend_from_slice(&n.to_le_bytes());
        match vm_bytes(&pkl) {
            Err(Error::Pickle { detail, .. }) => assert!(detail.contains(want), "{detail}"),
            other => panic!("{other:?}"),
        }
    }
}

/// The data.pkl torch.save writes for `n` (64, 64) f32 tensors, memo and all: shared
/// values memoized once and fetched with LONG_BINGET, six LONG_BINPUTs per tensor.
fn torch_shaped_pickle(n: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    let mut memo = 0u32;
    let mut put = |p: &mut Vec<u8>| {
        p.push(b'r');
        p.extend_from_slice(&memo.to_le_bytes());
        memo += 1;
    };
    let get = |p: &mut Vec<u8>, i: u32| {
        p.push(b'j');
        p.extend_from_slice(&i.to_le_bytes());
    };
    let text = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    };
    // Memo 0..=6: the values every tensor shares.
    let shared: [&[u8]; 7] = [
        b"ctorch._utils\n_rebuild_tensor_v2\n",
        b"X\x07\0\0\0storage",
        b"ctorch\nFloatStorage\n",
        b"X\x03\0\0\0cpu",
        b"(K@K@t",
        b"(K@K\x01t",
        b"ccollections\nOrderedDict\n",
    ];
    for v in shared {
        p.extend_from_slice(v);
        put(&mut p);
        p.push(b'0');
    }
    p.push(b'}');
    put(&mut p);
    p.push(b'(');
    for i in 0..n {
        if i > 0 && i % 1000 == 0 {
            p.extend_from_slice(b"u(");
        }
        text(
            &mut p,
            &format!("model.layers.{}.block.sub_{}.weight", i / 10, i % 10),
        );
        put(&mut p);
        get(&mut p, 0);
        p.extend_from_slice(b"((");
        get(&mut p, 1);
        get(&mut p, 2);
        text(&mut p, &i.to_string());
        put(&mut p);
        get(&mut p, 3);
        p.extend_from_slice(b"M\x00\x10t");
        put(&mut p);
        p.extend_from_slice(b"QK\x00");
        get(&mut p, 4);
        get(&mut p, 5);
        p.push(0x89);
        get(&mut p, 6);
        p.extend_from_slice(b")R");
        put(&mut p);
        p.push(b't');
        put(&mut p);
        p.push(b'R');
        put(&mut p);
    }
    p.extend_from_slice(b"u.");
    p
}

#[test]
fn torch_shaped_state_dicts_fit_the_floor_up_to_150_000_tensors() {
    // What the budget's floor is sized by: a torch state dict costs the VM 6 to 7 bytes
    // per byte of pickle.
    let pkl = torch_shaped_pickle(150_000);
    let used = vm_bytes(&pkl).unwrap();
    assert!(used <= 7 * pkl.len(), "{used} for {}", pkl.len());
    let (un, root) = pickle::load(Path::new(PATH), &pkl).unwrap();
    assert_eq!(un.dict(&root).unwrap().len(), 150_000);
    assert_eq!(un.storages.len(), 150_000);
}

#[test]
fn a_long_name_repeated_by_the_memo_is_read_once() {
    // 200 000 entries naming one 4 MiB string: reading it per entry would be 800 GB.
    let name = "n".repeat(4 << 20);
    let mut p = Pickle::new(false);
    p.op(b'}').op(b'(').str(&name).op(b'q').op(0);
    p.tensor(&spec("t", "0", &[24], &[1])).op(b'q').op(1);
    for _ in 1..200_000 {
        p.op(b'h').op(0).op(b'h').op(1);
    }
    p.op(b'u');
    let parsed = parse_pickle(p.finish()).unwrap();
    assert_eq!(parsed.tensors.len(), 1);
    assert_eq!(parsed.tensors[0].name.len(), 4 << 20);
}

#[test]
fn long_storage_keys_and_global_names_are_pickle_errors() {
    let key: &'static str = "7".repeat(257).leak();
    let pkl = Pickle::new(false)
        .state_dict(&[spec("a", key, &[4], &[1])])
        .finish();
    match parse_pickle(pkl) {
        Err(Error::Pickle { detail, .. }) => assert!(detail.contains("exceeds 256"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let mut p = Pickle::new(true);
    p.str(&"m".repeat(300)).str("x").op(0x93);
    match parse_pickle(p.finish()) {
        Err(Error::Pickle { detail, .. }) => assert!(detail.contains("STACK_GLOBAL"), "{detail}"),
        other => panic!("{other:?}"),
    }
}
