"""Each preset against real framework layers: relayout's output loaded into Flax linen,
Flax NNX and MLX models and run on the input PyTorch was run on.

The checkpoints, module-types files and PyTorch's input/output pairs in
`tests/fixtures/frameworks/` were made once by `make_frameworks.py` there (torch is not
needed here). The models are written in each framework in `linen_models.py`,
`nnx_models.py` and `mlx_models.py`; every one is loaded strictly: the converted file
must hold exactly the model's variables, with their shapes and dtypes.

    pip install -r tests/python/requirements.txt
    cargo build && pytest tests/python

`RELAYOUT_BIN` names the binary (default `target/debug/relayout`). A framework that is not
installed is skipped, unless `RELAYOUT_REQUIRE_FRAMEWORKS=1` (CI), which fails instead.
"""

import importlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "frameworks"
RELAYOUT = Path(os.environ.get("RELAYOUT_BIN", ROOT / "target" / "debug" / "relayout"))
REQUIRE = os.environ.get("RELAYOUT_REQUIRE_FRAMEWORKS") == "1"

# float32 end to end; the differences are summation order (max seen: 1.5e-6).
ATOL, RTOL = 1e-5, 1e-4

HEADS = {"vit_block": 4, "transformer_encoder": 4, "convtranspose_decoder": None}
NAMES = list(HEADS)
# preset -> (module with the framework models, packages it needs)
FRAMEWORKS = {
    "flax": ("linen_models", ["jax", "flax"]),
    "nnx": ("nnx_models", ["jax", "flax"]),
    "mlx": ("mlx_models", ["mlx.core"]),
}
PRESETS = list(FRAMEWORKS)


# The README quotes these three: each writes what `--expect` reads.


def expect_from_flax(model, *inputs):
    """{name: {"shape", "dtype"}} of a Flax linen model's variables, nothing computed."""
    import jax
    from flax import traverse_util

    variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    flat = traverse_util.flatten_dict(variables, sep=".")
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()}


def expect_from_nnx(model):
    """The same for a Flax NNX model (list indices are integers in its state paths)."""
    from flax import nnx, traverse_util

    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))  # no RNG state
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    return {".".join(map(str, k)): {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()}


def expect_from_mlx(model):
    """The same for an MLX model."""
    from mlx.utils import tree_flatten

    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("mlx.core.")}
        for k, v in tree_flatten(model.parameters())
    }


def require(*packages):
    """Imports the packages, or skips the test (fails under RELAYOUT_REQUIRE_FRAMEWORKS=1)."""
    modules = []
    for package in packages:
        try:
            modules.append(importlib.import_module(package))
        except ImportError as e:
            message = f"{package} is not importable ({e})"
            if REQUIRE:
                pytest.fail(f"{message}; RELAYOUT_REQUIRE_FRAMEWORKS=1 wants every framework")
            pytest.skip(message)
    return modules


def framework(preset):
    """The module of model definitions for a preset's framework (skips without it)."""
    module, packages = FRAMEWORKS[preset]
    require(*packages)
    return importlib.import_module(module)


def relayout(*args):
    if not RELAYOUT.is_file():
        pytest.fail(f"no relayout binary at {RELAYOUT}: run `cargo build` or set RELAYOUT_BIN")
    return subprocess.run([str(RELAYOUT), *map(str, args)], capture_output=True, text=True)


def run_convert(name, preset, out, *extra, types=True):
    """`relayout convert` of fixture `name`, with its head count and types file."""
    args = ["convert", FIXTURES / f"{name}.pt", out, "--preset", preset, "--force", "-q", *extra]
    if HEADS[name]:
        args += ["--set", f"heads={HEADS[name]}"]
    if types:
        args += ["--module-types", FIXTURES / f"{name}.types.json"]
    return relayout(*args)


def convert(name, preset, out, *extra, types=True):
    """As `run_convert`; returns the output path or fails the test with relayout's error."""
    run = run_convert(name, preset, out, *extra, types=types)
    assert run.returncode == 0, f"{' '.join(map(str, run.args[1:]))}: {run.stderr}"
    return out


def io(name):
    """PyTorch's input and output; images go NCHW -> NHWC as Flax and MLX take them."""
    pair = load_file(str(FIXTURES / f"{name}.io.safetensors"))
    x, y = pair["x"], pair["y"]
    if x.ndim == 4:
        x, y = x.transpose(0, 2, 3, 1), y.transpose(0, 2, 3, 1)
    return x, y


def signature(tensors):
    """{name: (shape, dtype)} of numpy arrays."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}


def expected_signature(expect):
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in expect.items()}


def assert_loads_strictly(weights, expect):
    """The converted tensors are exactly the model's variables, shapes and dtypes."""
    got, want = signature(weights), expected_signature(expect)
    problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - got.keys())]
    problems += [f"not in the model: {k} {got[k]}" for k in sorted(got.keys() - want.keys())]
    problems += [f"{k}: {got[k]}, model wants {want[k]}" for k in sorted(got.keys() & want.keys()) if got[k] != want[k]]
    assert not problems, "; ".join(problems)


def run_flax(models, name, path, x):
    """Loads flat `params.*`/`batch_stats.*` tensors into the linen model strictly, runs it."""
    import jax.numpy as jnp
    from flax import traverse_util

    model = models.build(name)
    weights = load_file(str(path))
    assert_loads_strictly(weights, expect_from_flax(model, x))
    variables = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in weights.items()}, sep=".")
    return np.asarray(model.apply(variables, x))


def run_nnx(models, name, path, x):
    import jax.numpy as jnp
    from flax import nnx, traverse_util

    model = models.build(name)
    weights = load_file(str(path))
    assert_loads_strictly(weights, expect_from_nnx(model))
    flat = {tuple(int(p) if p.isdigit() else p for p in k.split(".")): jnp.asarray(v) for k, v in weights.items()}
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    return np.asarray(nnx.merge(graphdef, state)(x))


def run_mlx(models, name, path, x):
    import mlx.core as mx

    model = models.build(name)
    # MLX's own reader parses relayout's file; load_weights checks names and shapes.
    assert_loads_strictly({k: np.array(v) for k, v in mx.load(str(path)).items()}, expect_from_mlx(model))
    model.load_weights(str(path), strict=True)
    return np.array(model(mx.array(x)))


RUN = {"flax": run_flax, "nnx": run_nnx, "mlx": run_mlx}


def assert_matches_torch(got, y, what):
    err = float(np.abs(got - y).max())
    assert np.allclose(got, y, atol=ATOL, rtol=RTOL), f"{what}: max |framework - torch| = {err:.3g}"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", NAMES)
def test_converted_model_reproduces_torch_output(name, preset, tmp_path):
    models = framework(preset)
    out = convert(name, preset, tmp_path / "out.safetensors")
    x, y = io(name)
    got = RUN[preset](models, name, out, x)
    assert_matches_torch(got, y, f"{name} --preset {preset}")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["vit_block", "transformer_encoder"])
def test_attention_models_need_no_types_file(name, preset, tmp_path):
    # MultiheadAttention is told by its tensors (in_proj_weight), Linear by rank and name.
    models = framework(preset)
    out = convert(name, preset, tmp_path / "out.safetensors", types=False)
    x, y = io(name)
    got = RUN[preset](models, name, out, x)
    assert_matches_torch(got, y, f"{name} --preset {preset}, no --module-types")


@pytest.mark.parametrize("preset", ["flax", "nnx"])
def test_flax_conv_transpose_kernel_is_the_conv_permutation_so_types_change_nothing(preset, tmp_path):
    # torch ConvTranspose (I, O, *S) -> (*S, O, I) is the Conv rule's (O, I, *S) -> (*S, I, O)
    # with the first two axes renamed: `up2`, a Conv by name, still gets the right kernel.
    with_types = load_file(str(convert("convtranspose_decoder", preset, tmp_path / "with.safetensors")))
    without = load_file(str(convert("convtranspose_decoder", preset, tmp_path / "without.safetensors", types=False)))
    assert signature(with_types) == signature(without)
    for k in with_types:
        assert with_types[k].tobytes() == without[k].tobytes(), k


def test_mlx_conv_transpose_without_types_file_fails_to_load(tmp_path):
    # Without the types file `up2` is a Conv by name and gets (O, *S, I) read as a Conv's
    # (out=6, kh, kw, in=4); mlx.nn.ConvTranspose2d(6, 4, 3) holds (4, 3, 3, 6).
    models = framework("mlx")
    out = convert("convtranspose_decoder", "mlx", tmp_path / "out.safetensors", types=False)
    weights = load_file(str(out))
    assert weights["deconv1.weight"].shape == (6, 3, 2, 8)  # recognised by its name
    assert weights["up2.weight"].shape == (6, 3, 3, 4)
    model = models.build("convtranspose_decoder")
    with pytest.raises(ValueError, match="up2.weight"):
        model.load_weights(str(out), strict=True)


def test_attention_without_heads_is_an_error_for_flax(tmp_path):
    out = tmp_path / "out.safetensors"
    run = relayout("convert", FIXTURES / "vit_block.pt", out, "--preset", "flax", "-q")
    assert run.returncode != 0
    assert "pass --set heads=H" in run.stderr
    assert not out.exists()


def test_bf16_output_equals_ml_dtypes_rounding_of_f32_output(tmp_path):
    # Round to nearest even on the bits, as `np.float32(...).astype(ml_dtypes.bfloat16)`.
    (ml_dtypes,) = require("ml_dtypes")
    f32 = load_file(str(convert("transformer_encoder", "flax", tmp_path / "f32.safetensors")))
    bf16 = load_file(str(convert("transformer_encoder", "flax", tmp_path / "bf16.safetensors", "--dtype", "bf16")))
    assert {k: v.shape for k, v in bf16.items()} == {k: v.shape for k, v in f32.items()}
    for k, v in bf16.items():
        assert v.dtype == ml_dtypes.bfloat16, k
        assert not np.isnan(f32[k]).any()
        want = f32[k].astype(ml_dtypes.bfloat16).view(np.uint16)
        np.testing.assert_array_equal(v.view(np.uint16), want, err_msg=k)


def expectation(preset, name):
    """What the framework model expects, by the README's snippet for that framework."""
    models = framework(preset)
    model = models.build(name)
    if preset == "flax":
        return expect_from_flax(model, io(name)[0])
    if preset == "nnx":
        return expect_from_nnx(model)
    return expect_from_mlx(model)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", NAMES)
def test_expect_file_from_the_framework_model_accepts_the_conversion(name, preset, tmp_path):
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps(expectation(preset, name)))
    out = convert(name, preset, tmp_path / "out.safetensors", "--expect", expect)
    assert_loads_strictly(load_file(str(out)), json.loads(expect.read_text()))


@pytest.mark.parametrize("preset", PRESETS)
def test_expect_file_missing_a_tensor_fails_and_writes_nothing(preset, tmp_path):
    name = "transformer_encoder"
    want = expectation(preset, name)
    del want[sorted(want)[0]]
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps(want))
    out = tmp_path / "out.safetensors"
    run = run_convert(name, preset, out, "--expect", expect)
    assert run.returncode == 1, run.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [expect]


@pytest.mark.parametrize("preset", PRESETS)
def test_expect_file_with_a_wrong_shape_fails_and_writes_nothing(preset, tmp_path):
    name = "convtranspose_decoder"
    want = expectation(preset, name)
    first = sorted(k for k in want if len(want[k]["shape"]) == 4)[0]
    want[first]["shape"] = want[first]["shape"][::-1]
    assert want[first]["shape"] != want[first]["shape"][::-1]
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps(want))
    out = tmp_path / "out.safetensors"
    run = run_convert(name, preset, out, "--expect", expect)
    assert run.returncode == 1, run.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", NAMES)
def test_expect_accepts_flax_msgpack_written_by_flax_serialization(name, tmp_path):
    # A checkpoint of the target model as Flax writes it is an expectation too.
    models = framework("flax")
    import jax
    from flax import serialization

    x, _ = io(name)
    expect = tmp_path / "model.msgpack"
    expect.write_bytes(serialization.to_bytes(models.build(name).init(jax.random.key(0), x)))
    convert(name, "flax", tmp_path / "out.safetensors", "--expect", expect)


@pytest.mark.parametrize("name", NAMES)
def test_expect_accepts_safetensors_written_by_mlx(name, tmp_path):
    # Without metadata MLX writes `"__metadata__": null`, which the safetensors package reads.
    models = framework("mlx")
    import mlx.core as mx
    from mlx.utils import tree_flatten

    expect = tmp_path / "model.safetensors"
    mx.save_safetensors(str(expect), dict(tree_flatten(models.build(name).parameters())))
    convert(name, "mlx", tmp_path / "out.safetensors", "--expect", expect)


@pytest.mark.parametrize("preset", PRESETS)
def test_verify_checks_a_written_file_against_the_framework_model(preset, tmp_path):
    name = "convtranspose_decoder"
    want = expectation(preset, name)
    out = convert(name, preset, tmp_path / "out.safetensors")
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps(want))
    run = relayout("verify", out, "--expect", expect)
    assert run.returncode == 0, run.stderr
    missing = sorted(want)[-1]
    del want[missing]
    expect.write_text(json.dumps(want))
    run = relayout("verify", out, "--expect", expect)
    assert run.returncode == 1
    assert missing in run.stderr + run.stdout
