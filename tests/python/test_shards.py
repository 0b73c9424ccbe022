"""Sharded output read by the Python `safetensors` package and by MLX, as loaders do:
the index names every tensor's shard, every shard loads, and together they hold exactly
what a single-file conversion holds, each tensor aligned for zero-copy loading.

    cargo build && pytest tests/python/test_shards.py
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from test_frameworks import require

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
RELAYOUT = Path(os.environ.get("RELAYOUT_BIN", ROOT / "target" / "debug" / "relayout"))

ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# (input fixture, preset): a PyTorch zip, a sharded safetensors folder, a HF .bin.
CASES = [("small_cnn.pt", "flax"), ("sharded", "flax"), ("pytorch_model.bin", "mlx"),
         ("mixed.pt", "mlx")]


def relayout(*args):
    if not RELAYOUT.is_file():
        pytest.fail(f"no relayout binary at {RELAYOUT}: run `cargo build` or set RELAYOUT_BIN")
    run = subprocess.run([str(RELAYOUT), *map(str, args)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def header(path):
    """(header length, {name: entry}) of a safetensors file, parsed by hand."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def convert_both(fixture, preset, tmp_path, size):
    single = tmp_path / "single.safetensors"
    shards = tmp_path / "shards"
    relayout("convert", FIXTURES / fixture, single, "--preset", preset, "--device", "cpu", "-q")
    relayout("convert", FIXTURES / fixture, shards, "--preset", preset, "--device", "cpu", "-q",
             "--max-shard-size", size)
    return single, shards


@pytest.mark.parametrize("fixture,preset", CASES)
def test_shards_load_with_safetensors_and_equal_the_single_file(fixture, preset, tmp_path):
    single, shards = convert_both(fixture, preset, tmp_path, "2KB")
    want = load_file(single)
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert sorted(weight_map) == sorted(want)
    files = sorted(set(weight_map.values()))
    assert len(files) > 1, "the case should give several shards"
    assert sorted(p.name for p in shards.iterdir()) == files + ["model.safetensors.index.json"]
    got, total = {}, 0
    for name in files:
        path = shards / name
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            assert all(weight_map[k] == name for k in keys), name
            for k in keys:
                got[k] = f.get_tensor(k)
        # Aligned and without holes: every tensor starts at a multiple of its item size.
        n, entries = header(path)
        entries.pop("__metadata__", None)
        spans = sorted(tuple(e["data_offsets"]) for e in entries.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert path.stat().st_size == 8 + n + spans[-1][1]
        for k, e in entries.items():
            assert (8 + n + e["data_offsets"][0]) % ITEMSIZE[e["dtype"]] == 0, (name, k)
        total += spans[-1][1]
    assert index["metadata"]["total_size"] == total
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize("fixture,preset", CASES)
def test_mlx_loads_every_shard(fixture, preset, tmp_path):
    (mx,) = require("mlx.core")
    single, shards = convert_both(fixture, preset, tmp_path, "3KB")
    want = load_file(single)
    got = {}
    for path in sorted(shards.glob("model-*.safetensors")):
        got.update(mx.load(str(path)))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert np.array_equal(np.array(got[k]), v), k


def test_workers_and_merge_index_give_the_single_machine_folder(tmp_path):
    fixture = FIXTURES / "small_cnn.pt"
    one = tmp_path / "one"
    relayout("convert", fixture, one, "--preset", "flax", "--device", "cpu", "-q",
             "--max-shard-size", "2KB")
    many = tmp_path / "many"
    for i in range(3):
        env = dict(os.environ, JOB_COMPLETION_INDEX=str(i))
        run = subprocess.run([str(RELAYOUT), "convert", str(fixture), str(many), "--preset", "flax",
                              "--device", "cpu", "-q", "--max-shard-size", "2KB",
                              "--shard-from-env", "--shards", "3"],
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
    relayout("merge-index", many)
    assert sorted(p.name for p in many.iterdir()) == sorted(p.name for p in one.iterdir())
    for p in one.iterdir():
        assert (many / p.name).read_bytes() == p.read_bytes(), p.name
