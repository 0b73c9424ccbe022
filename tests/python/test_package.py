"""The Python package (`pip install ./python`): `relayout.load`, `load_flax`, `load_mlx`,
`convert`, `plan`, `inspect`, `devices`, its exceptions, threads and Ctrl-C.

Every conversion is checked against the CLI's output byte for byte, and the framework
loaders against PyTorch's own outputs recorded as fixtures (torch is never installed
here; `tests/fixtures/python/make_small_cnn_io.py` and
`tests/fixtures/frameworks/make_frameworks.py` made them).

    pip install ./python -r tests/python/requirements.txt
    cargo build && pytest tests/python

The package must be importable; under `RELAYOUT_REQUIRE_FRAMEWORKS=1` (CI) a missing
framework fails instead of skipping, and `RELAYOUT_REQUIRE_GPU=1` makes the GPU cases
fail rather than skip when no adapter is found.
"""

import dataclasses
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from test_frameworks import (
    FIXTURES as FRAMEWORK_FIXTURES,
    HEADS,
    PRESETS,
    assert_loads_strictly,
    assert_matches_torch,
    expect_from_flax,
    expect_from_mlx,
    expect_from_nnx,
    framework,
    io,
    relayout as cli,
    require,
)

if os.environ.get("RELAYOUT_REQUIRE_FRAMEWORKS") == "1":
    import relayout  # CI installs the package: a failed import is a failure
else:
    relayout = pytest.importorskip("relayout")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
REQUIRE_GPU = os.environ.get("RELAYOUT_REQUIRE_GPU") == "1"

# Every checkpoint fixture a user could point `load` at (paths relative to tests/fixtures).
CHECKPOINTS = [
    "small_cnn.pt",
    "small_cnn.safetensors",
    "mixed.pt",
    "mixed.safetensors",
    "dtypes_views.pt",
    "nested_checkpoint.pt",
    "legacy_format.pt",
    "pytorch_model.bin",
    "sharded",
    "sharded/model.safetensors.index.json",
    "frameworks/vit_block.pt",
    "frameworks/transformer_encoder.pt",
    "frameworks/convtranspose_decoder.pt",
]


def has_gpu():
    return any(d.kind == "gpu" for d in relayout.devices())


DEVICES = ["cpu", "gpu"]


def need_device(device):
    if device == "gpu" and not has_gpu():
        if REQUIRE_GPU:
            pytest.fail("no GPU adapter, and RELAYOUT_REQUIRE_GPU=1")
        pytest.skip("no GPU adapter")


def read_safetensors(path):
    """{name: (dtype, shape, bytes)} of a safetensors file, parsed by hand (bf16 and f8
    included, whatever the installed packages support)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    return {
        k: (v["dtype"], tuple(v["shape"]), data[v["data_offsets"][0] : v["data_offsets"][1]])
        for k, v in header.items()
    }


def options(checkpoint):
    """The rule options a fixture needs (head counts, module types), as CLI arguments
    and as `load` keywords."""
    name = Path(checkpoint).stem
    args, kw = [], {}
    if checkpoint.startswith("frameworks/"):
        if HEADS.get(name):
            args += ["--set", f"heads={HEADS[name]}"]
            kw["set"] = {"heads": HEADS[name]}
        types = FRAMEWORK_FIXTURES / f"{name}.types.json"
        args += ["--module-types", types]
        kw["module_types"] = types
    return args, kw


def assert_same_as_file(arrays, path):
    """The arrays hold exactly the tensors of a safetensors file: names, dtypes, shapes,
    bytes; every array C-contiguous and writable."""
    want = read_safetensors(path)
    assert list(arrays) == list(arrays)  # dict order is the plan's
    assert sorted(arrays) == sorted(want)
    for k, a in arrays.items():
        dtype, shape, data = want[k]
        assert relayout.numpy_dtype(dtype) == a.dtype, k
        assert a.shape == shape, k
        assert a.flags.c_contiguous and a.flags.writeable and a.flags.owndata, k
        assert a.tobytes() == data, f"{k}: bytes differ from the CLI's"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_load_equals_the_cli_output_byte_for_byte(checkpoint, preset, device, tmp_path):
    need_device(device)
    src = FIXTURES / checkpoint
    args, kw = options(checkpoint)
    out = tmp_path / "cli.safetensors"
    run = cli("convert", src, out, "--preset", preset, "--device", device, "--allow-unmatched", "-q", *args)
    assert run.returncode == 0, run.stderr
    arrays = relayout.load(src, preset, device=device, allow_unmatched=True, **kw)
    assert_same_as_file(arrays, out)


@pytest.mark.parametrize("dtype", ["bf16", "f16", "float32"])
@pytest.mark.parametrize("device", DEVICES)
def test_load_with_dtype_equals_the_cli_output(dtype, device, tmp_path):
    need_device(device)
    require("ml_dtypes")
    src = FIXTURES / "mixed.pt"
    out = tmp_path / "cli.safetensors"
    cli_dtype = {"float32": "f32"}.get(dtype, dtype)
    run = cli("convert", src, out, "--preset", "flax", "--device", device, "--dtype", cli_dtype, "-q")
    assert run.returncode == 0, run.stderr
    arrays = relayout.load(str(src), "flax", dtype=dtype, device=device)
    assert_same_as_file(arrays, out)


@pytest.mark.parametrize("checkpoint", ["small_cnn.pt", "dtypes_views.pt", "sharded"])
def test_load_fails_exactly_when_the_cli_fails(checkpoint, tmp_path):
    # Without allow_unmatched: the same verdict, and the same message.
    src = FIXTURES / checkpoint
    for preset in PRESETS:
        run = cli("convert", src, tmp_path / f"{preset}.safetensors", "--preset", preset, "-q")
        if run.returncode == 0:
            relayout.load(src, preset)
            continue
        with pytest.raises(relayout.Error) as e:
            relayout.load(src, preset)
        assert str(e.value) in run.stderr


def test_small_cnn_in_flax_linen_reproduces_torch():
    """A real Flax linen ResNet stem + stage, applied to `load_flax(small_cnn.pt)`, gives
    the logits PyTorch computed for the same weights and input."""
    jax, flax = require("jax", "flax")
    import flax.linen as nn
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    bn = lambda name: nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)  # noqa: E731

    class Block(nn.Module):
        features: int
        stride: int

        @nn.compact
        def __call__(self, x):
            s = (self.stride, self.stride)
            out = nn.Conv(self.features, (3, 3), s, padding=1, use_bias=False, name="conv1")(x)
            out = nn.relu(bn("bn1")(out))
            out = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv2")(out)
            out = bn("bn2")(out)
            short = nn.Conv(self.features, (1, 1), s, padding=0, use_bias=False, name="downsample_0")(x)
            return nn.relu(out + bn("downsample_1")(short))

    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (7, 7), (2, 2), padding=3, use_bias=False, name="conv1")(x)
            x = nn.relu(bn("bn1")(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
            x = Block(16, 2, name="layer1_0")(x)
            x = Block(16, 1, name="layer1_1")(x)
            return nn.Dense(10, name="fc")(x.mean(axis=(1, 2)))

    pair = load_file(str(FIXTURES / "python" / "small_cnn.io.safetensors"))
    x = pair["x"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    model = SmallCNN()
    variables = relayout.load_flax(FIXTURES / "small_cnn.pt")
    assert set(variables) == {"params", "batch_stats"}
    assert isinstance(variables["params"]["conv1"]["kernel"], jax.Array)
    # Exactly the model's variables, shapes and dtypes.
    from flax import traverse_util

    flat = traverse_util.flatten_dict(variables, sep=".")
    assert_loads_strictly({k: np.asarray(v) for k, v in flat.items()}, expect_from_flax(model, x))
    y = np.asarray(model.apply(variables, jnp.asarray(x)))
    assert_matches_torch(y, pair["y"], "small_cnn via relayout.load_flax")
    # as_jax=False: the same tree of NumPy arrays.
    plain = relayout.load_flax(FIXTURES / "small_cnn.pt", as_jax=False)
    assert isinstance(plain["params"]["conv1"]["kernel"], np.ndarray)
    np.testing.assert_array_equal(np.asarray(variables["params"]["fc"]["kernel"]), plain["params"]["fc"]["kernel"])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(HEADS))
def test_framework_loaders_reproduce_torch(name, preset):
    """load_flax (linen and NNX) and load_mlx feed the framework models straight, no file
    in between; the models give PyTorch's outputs."""
    models = framework(preset)
    x, y = io(name)
    model = models.build(name)
    kw = {"module_types": FRAMEWORK_FIXTURES / f"{name}.types.json"}
    if HEADS[name]:
        kw["set"] = {"heads": HEADS[name]}
    src = FRAMEWORK_FIXTURES / f"{name}.pt"
    if preset == "flax":
        variables = relayout.load_flax(src, **kw)
        got = np.asarray(model.apply(variables, x))
    elif preset == "nnx":
        from flax import nnx

        state_dict = relayout.load_flax(src, "nnx", **kw)
        graphdef, state = nnx.split(model)
        nnx.replace_by_pure_dict(state, state_dict)
        got = np.asarray(nnx.merge(graphdef, state)(x))
    else:
        import mlx.core as mx

        weights = relayout.load_mlx(src, **kw)
        assert all(isinstance(v, mx.array) for v in weights.values())
        assert_loads_strictly({k: np.array(v) for k, v in weights.items()}, expect_from_mlx(model))
        model.load_weights(list(weights.items()), strict=True)
        got = np.array(model(mx.array(x)))
    assert_matches_torch(got, y, f"{name} via the package, preset {preset}")


def test_load_mlx_bfloat16_keeps_the_bits():
    require("mlx.core", "ml_dtypes")
    import mlx.core as mx

    src = FRAMEWORK_FIXTURES / "transformer_encoder.pt"
    kw = {"set": {"heads": 4}, "dtype": "bf16"}
    weights = relayout.load_mlx(src, **kw)
    arrays = relayout.load(src, "mlx", **kw)
    assert list(weights) == list(arrays)
    for k, a in arrays.items():
        assert weights[k].dtype == mx.bfloat16, k
        assert np.array(weights[k].view(mx.uint16)).tobytes() == a.tobytes(), k


def test_nnx_state_uses_integer_list_indices():
    require("jax", "flax")
    state = relayout.load_flax(FRAMEWORK_FIXTURES / "transformer_encoder.pt", "nnx", set={"heads": 4}, as_jax=False)
    flat_keys = []

    def walk(node, path):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            else:
                flat_keys.append(path + (k,))

    walk(state, ())
    assert any(isinstance(p, int) for key in flat_keys for p in key)
    assert all(isinstance(p, (int, str)) for key in flat_keys for p in key)


def test_convert_writes_the_cli_file_and_reports(tmp_path):
    src = FIXTURES / "small_cnn.pt"
    by_cli, by_py = tmp_path / "cli.safetensors", tmp_path / "py.safetensors"
    run = cli("convert", src, by_cli, "--preset", "flax", "--device", "cpu", "-q")
    assert run.returncode == 0, run.stderr
    seen = []
    report = relayout.convert(src, by_py, "flax", device="cpu", progress=seen.append)
    assert by_py.read_bytes() == by_cli.read_bytes()
    assert report.tensors == len(read_safetensors(by_py)) and report.outputs == [str(by_py)]
    assert report.bytes == sum(len(v[2]) for v in read_safetensors(by_py).values())
    assert report.backend.startswith("cpu") and report.shards == 0
    assert seen and seen[-1].bytes_done == seen[-1].bytes_total == report.bytes
    assert seen[-1].tensors_done == seen[-1].tensors_total == report.tensors
    # An existing output is refused, and left as it was.
    with pytest.raises(relayout.OutputExistsError) as e:
        relayout.convert(src, by_py, "flax")
    assert isinstance(e.value, FileExistsError) and e.value.path == str(by_py)
    assert by_py.read_bytes() == by_cli.read_bytes()
    relayout.convert(src, by_py, "mlx", force=True)
    assert by_py.read_bytes() != by_cli.read_bytes()


def test_convert_to_a_folder_writes_shards_like_the_cli(tmp_path):
    src = FIXTURES / "mixed.pt"
    run = cli("convert", src, tmp_path / "cli", "--preset", "flax", "--max-shard-size", "2KB", "-q")
    assert run.returncode == 0, run.stderr
    report = relayout.convert(src, tmp_path / "py", "flax", max_shard_size="2KB")
    cli_files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert sorted(p.name for p in (tmp_path / "py").iterdir()) == cli_files
    for name in cli_files:
        assert (tmp_path / "py" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    assert report.shards == len(cli_files) - 1 > 1
    assert report.index == str(tmp_path / "py" / "model.safetensors.index.json")
    # The folder loads back as one checkpoint.
    back = relayout.load(tmp_path / "py", None, rules=[write_identity_rules(tmp_path)])
    assert sorted(back) == sorted(json.loads(Path(report.index).read_text())["weight_map"])


def write_identity_rules(tmp_path):
    rules = tmp_path / "identity.toml"
    rules.write_text('[[rule]]\nname = "keep"\ntarget = "{name}"\n')
    return rules


def test_plan_and_inspect_agree_with_the_cli():
    src = FIXTURES / "mixed.pt"
    plan = relayout.plan(src, "flax")
    run = cli("plan", src, "--preset", "flax", "--json")
    assert run.returncode == 0, run.stderr
    want = json.loads(run.stdout)
    assert [(e.source, e.target, list(e.target_shape)) for e in plan.entries] == [
        (e["source"], e["target"], e["target_shape"]) for e in want["entries"]
    ]
    loaded = relayout.load(src, "flax")
    assert [e.target for e in plan.entries] == list(loaded)
    assert plan.nbytes == sum(a.nbytes for a in loaded.values())
    assert all(e.rule for e in plan.entries)

    tensors = relayout.inspect(src)
    run = cli("inspect", src, "--json")
    assert run.returncode == 0, run.stderr
    want = json.loads(run.stdout)
    rows = want["entries"]
    assert [(t.name, list(t.shape), t.dtype) for t in tensors] == [
        (r["name"], r["shape"], r["dtype"]) for r in rows
    ]


def _plain(value):
    """A report object as the JSON the CLI prints: dataclasses and Slice as objects,
    tuples as lists."""
    if isinstance(value, relayout.Slice):
        return value._asdict()
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def test_reports_have_the_cli_keys_and_values(tmp_path):
    """Every report object of the package is the CLI's --json object: the same keys from
    the same library struct, and the same values."""
    src = FIXTURES / "mixed.pt"
    # plan, sharded with workers (every optional part of the report present)
    plan = relayout.plan(src, "flax", max_shard_size="2KB", shards=2)
    run = cli("plan", src, "--preset", "flax", "--max-shard-size", "2KB", "--shards", "2", "--json")
    assert run.returncode == 0, run.stderr
    want = json.loads(run.stdout)
    assert plan.shards and all(e.shard for e in plan.entries)
    assert _plain(plan) == want
    # and one file: the same keys, the shard parts null
    run = cli("plan", src, "--preset", "flax", "--json")
    one = json.loads(run.stdout)
    assert set(one) == {f.name for f in dataclasses.fields(relayout.Plan)}
    assert one["shards"] is None and _plain(relayout.plan(src, "flax")) == one

    # inspect
    run = cli("inspect", src, "--json")
    assert run.returncode == 0, run.stderr
    want = json.loads(run.stdout)
    assert _plain(relayout.inspect(src)) == want["entries"]

    # convert: what differs between two runs is the time and the paths
    run = cli("convert", src, tmp_path / "cli", "--preset", "flax", "--max-shard-size", "2KB",
              "--device", "cpu", "--json")
    assert run.returncode == 0, run.stderr
    want = json.loads(run.stdout)
    report = relayout.convert(src, tmp_path / "py", "flax", device="cpu", max_shard_size="2KB")
    got = _plain(report)
    assert set(got) == set(want) >= {"shards_present", "gb_per_s", "input", "output"}
    same = {k for k in want if k not in ("seconds", "gb_per_s", "output", "outputs", "index")}
    assert {k: got[k] for k in same} == {k: want[k] for k in same}
    assert got["shards_present"] == got["shards"] > 1 and got["gb_per_s"] > 0
    assert [Path(p).name for p in got["outputs"]] == [Path(p).name for p in want["outputs"]]

    # verify, a mismatch: the report either way, the CLI exits 1
    expect = FIXTURES / "expect" / "small_cnn.mlx.json"
    out = tmp_path / "cnn.safetensors"
    relayout.convert(FIXTURES / "small_cnn.pt", out, "flax", device="cpu")
    run = cli("verify", out, "--expect", expect, "--json")
    assert run.returncode == 1
    want = json.loads(run.stdout)
    got = relayout.verify(out, expect)
    assert not got.ok and got.report and _plain(got) == want
    relayout.convert(FIXTURES / "small_cnn.pt", out, "mlx", device="cpu", force=True)
    assert relayout.verify(out, expect).ok


def test_paths_keys_and_index_files():
    nested = relayout.load(FIXTURES / "nested_checkpoint.pt", "flax", key="model", device="cpu")
    auto = relayout.load(str(FIXTURES / "nested_checkpoint.pt"), "flax", device="cpu")
    assert {k: v.tobytes() for k, v in nested.items()} == {k: v.tobytes() for k, v in auto.items()}
    with pytest.raises(relayout.FormatError):
        relayout.load(FIXTURES / "nested_checkpoint.pt", "flax", key="optimizer")
    folder = relayout.load(FIXTURES / "sharded", "flax", allow_unmatched=True)
    index = relayout.load(FIXTURES / "sharded" / "model.safetensors.index.json", "flax", allow_unmatched=True)
    assert {k: v.tobytes() for k, v in folder.items()} == {k: v.tobytes() for k, v in index.items()}


# Hostile and broken inputs: the exception class, the file in the message, nothing leaked.
BROKEN = [
    ("malicious.pt", relayout.ForbiddenGlobalError, "ForbiddenGlobal"),
    ("truncated.safetensors", relayout.FormatError, "Truncated"),
    ("header_too_large.safetensors", relayout.FormatError, None),
    ("offsets_out_of_range.safetensors", relayout.FormatError, None),
    ("not_a_checkpoint.pt", relayout.FormatError, None),
] + [(f"hostile/{p.name}", relayout.FormatError, None) for p in sorted((FIXTURES / "hostile").glob("*.pt"))]


def open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def mapped(path):
    if not os.path.exists("/proc/self/maps"):
        return 0
    return Path("/proc/self/maps").read_text().count(str(path))


@pytest.mark.parametrize("name,cls,kind", BROKEN)
def test_broken_and_hostile_files_raise_their_class_and_leak_nothing(name, cls, kind, tmp_path):
    src = FIXTURES / name
    run = cli("convert", src, tmp_path / "out.safetensors", "--preset", "flax", "--allow-unmatched", "-q")
    if run.returncode == 0:
        # A hostile file the CLI accepts (a modest, legal expansion) loads the same.
        assert_same_as_file(relayout.load(src, "flax", allow_unmatched=True), tmp_path / "out.safetensors")
        return
    fds = open_fds()
    for _ in range(20):
        with pytest.raises(cls) as e:
            relayout.load(src, "flax", allow_unmatched=True)
        assert isinstance(e.value, relayout.Error)
        assert e.value.path == str(src) and str(src) in str(e.value)
        assert str(e.value) in run.stderr
        if kind:
            assert e.value.kind == kind
        with pytest.raises(cls):
            relayout.convert(src, tmp_path / "py.safetensors", "flax", allow_unmatched=True)
    assert open_fds() == fds
    assert mapped(src) == 0
    assert [p.name for p in tmp_path.iterdir()] == []
    assert not Path("/tmp/relayout_pwned").exists()


def test_rule_plan_and_device_errors_have_their_classes(tmp_path):
    src = FIXTURES / "small_cnn.pt"
    with pytest.raises(relayout.RulesError, match="unknown preset 'keras9'"):
        relayout.load(src, "keras9")
    only_fc = tmp_path / "only_fc.toml"
    only_fc.write_text('[[rule]]\nname = "fc"\nmodule = "fc"\ntarget = "{name}"\n')
    with pytest.raises(relayout.UnmatchedError) as e:
        relayout.load(src, None, rules=only_fc)
    assert isinstance(e.value, relayout.PlanError) and e.value.kind == "Unmatched"
    assert sorted(relayout.load(src, None, rules=[only_fc], allow_unmatched=True)) == ["fc.bias", "fc.weight"]
    with pytest.raises(relayout.RulesError, match="heads"):
        relayout.load(FRAMEWORK_FIXTURES / "vit_block.pt", "flax")
    with pytest.raises(relayout.IOError) as e:
        relayout.load(tmp_path / "missing.pt", "flax")
    assert isinstance(e.value, OSError) and e.value.errno == 2
    assert str(tmp_path / "missing.pt") in str(e.value)
    with pytest.raises(ValueError, match="device"):
        relayout.load(src, "flax", device="tpu")
    want = {"nope": {"shape": [1], "dtype": "float32"}}
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps(want))
    with pytest.raises(relayout.VerifyError):
        relayout.load(src, "flax", expect=expect)
    if not has_gpu():
        with pytest.raises(relayout.GPUError):
            relayout.load(src, "flax", device="gpu")


def test_a_load_larger_than_memory_is_refused_before_any_array_exists(tmp_path):
    # The 4 TiB stride-0 bomb, expansion allowed: planned, then refused by size.
    rules = write_identity_rules(tmp_path)
    bomb = FIXTURES / "hostile" / "expand_bomb.pt"
    with pytest.raises(relayout.FormatError, match="allow-expand"):
        relayout.load(bomb, None, rules=rules)
    with pytest.raises(relayout.OutOfMemoryError, match="4096.0 GiB") as e:
        relayout.load(bomb, None, rules=rules, allow_expand=True)
    assert isinstance(e.value, MemoryError) and str(bomb) in str(e.value)


def test_bfloat16_without_ml_dtypes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` now fails
    with pytest.raises(relayout.MissingDependencyError, match="ml_dtypes"):
        relayout.load(FIXTURES / "small_cnn.pt", "flax", dtype="bf16")
    assert isinstance(relayout.MissingDependencyError("x"), ImportError)
    # f32 needs nothing more.
    relayout.load(FIXTURES / "small_cnn.pt", "flax")


def test_threads_load_concurrently_and_agree():
    checkpoints = ["small_cnn.pt", "mixed.pt", "pytorch_model.bin", "sharded"]
    alone = {c: relayout.load(FIXTURES / c, "mlx", allow_unmatched=True) for c in checkpoints}
    results, errors = {}, []

    def work(i):
        try:
            c = checkpoints[i % len(checkpoints)]
            results[i] = (c, relayout.load(FIXTURES / c, "mlx", allow_unmatched=True, device="cpu"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 16
    for c, arrays in results.values():
        assert {k: v.tobytes() for k, v in arrays.items()} == {k: v.tobytes() for k, v in alone[c].items()}


def test_progress_callable_and_tqdm_bar(capsys):
    seen = []
    arrays = relayout.load(FIXTURES / "mixed.pt", "flax", progress=seen.append)
    total = sum(a.nbytes for a in arrays.values())
    # The callable hears the latest counts whenever the waiting thread wakes, and the end.
    assert seen[-1] == relayout.Progress(len(arrays), len(arrays), total, total)
    assert all(a.bytes_done <= b.bytes_done and a.tensors_done <= b.tensors_done for a, b in zip(seen, seen[1:]))
    require("tqdm")
    relayout.load(FIXTURES / "mixed.pt", "flax", progress=True)
    assert "relayout load" in capsys.readouterr().err

    def fail(_):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        relayout.load(FIXTURES / "mixed.pt", "flax", progress=fail)


INTERRUPTED = r"""
import os, signal, sys, threading
import relayout

src, out = sys.argv[1], sys.argv[2]
started = threading.Event()
seen = []

def progress(p):
    seen.append(p)
    if p.bytes_done > 0:
        started.set()

def ctrl_c():
    started.wait()
    os.kill(os.getpid(), signal.SIGINT)   # what Ctrl-C in a terminal does

threading.Thread(target=ctrl_c, daemon=True).start()
try:
    if out == "-":
        relayout.load(src, "flax", device="cpu", progress=progress)
    else:
        relayout.convert(src, out, "flax", device="cpu", progress=progress)
except KeyboardInterrupt:
    last = seen[-1]
    print(f"interrupted {last.bytes_done} {last.bytes_total}")
    sys.exit(0)
print("finished")
sys.exit(1)
"""


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory):
    """512 MiB of f32 Linear weights, written with NumPy (transposed by the flax preset)."""
    path = tmp_path_factory.mktemp("large") / "large.safetensors"
    rng = np.random.default_rng(5)
    block = rng.standard_normal((4096, 4096), dtype=np.float32)
    header, offset = {}, 0
    names = [f"layers.{i}.weight" for i in range(8)]
    for name in names:
        header[name] = {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [offset, offset + block.nbytes]}
        offset += block.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in names:
            f.write(block.tobytes())
    return path


@pytest.mark.parametrize("mode", ["load", "convert"])
def test_ctrl_c_stops_a_large_load_promptly_and_leaves_nothing(mode, large_checkpoint, tmp_path):
    out = "-" if mode == "load" else str(tmp_path / "out.safetensors")
    run = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, str(large_checkpoint), out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    _, done, total = run.stdout.split()
    # Stopped well before the end: at most a few 32 MiB bands after the signal.
    assert int(total) == 8 * 4096 * 4096 * 4
    assert int(done) < int(total) // 2, run.stdout
    assert list(tmp_path.iterdir()) == []


def test_stubs_type_check(tmp_path):
    """The package's annotations and `_native.pyi` let a typed script pass mypy --strict."""
    require("mypy")
    usage = Path(__file__).with_name("typed_usage.py")
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path), str(usage)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # The package's own sources (with the extension's stub) pass too.
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path), "-p", "relayout"],
        capture_output=True,
        text=True,
        cwd=ROOT / "python",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # And a wrong call is caught.
    bad = tmp_path / "bad.py"
    bad.write_text("import relayout\nx: int = relayout.load('a.pt', 'flax')\n")
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path), str(bad)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "Incompatible types" in run.stdout, run.stdout
