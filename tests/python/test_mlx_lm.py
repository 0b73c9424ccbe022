"""The `mlx-lm` preset against `mlx_lm.convert` itself (mlx-lm installed from PyPI, no
torch): for a tiny random model of every family, relayout's folder and mlx-lm's hold the
same tensors (names, dtypes, shapes, bytes), the same config.json as JSON and the same
index metadata; the tokenizer and generation files are the source's; and `mlx_lm.load`
generates the same tokens from both folders.

    cargo build && pip install ./python && pytest tests/python/test_mlx_lm.py
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_frameworks import require

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hf_models  # noqa: E402

ROOT = HERE.parents[1]
RELAYOUT = Path(os.environ.get("RELAYOUT_BIN", ROOT / "target" / "debug" / "relayout"))

# (case, model_type, write_model keywords): one variant per family, the others spread
# over them: dtypes from config.json, shards, tied embeddings, rotary buffers, experts.
CASES = [
    ("llama-bf16-sharded", "llama",
     dict(torch_dtype="bfloat16", shards=3, inv_freq=True)),
    ("mistral", "mistral", {}),
    ("qwen2-tied", "qwen2", dict(tied_lm_head=True, inv_freq=True)),
    ("qwen3-f16", "qwen3", dict(source_dtype="float16", torch_dtype="float16")),
    ("gemma2", "gemma2", {}),
    ("gemma3_text", "gemma3_text", {}),
    ("phi3", "phi3", {}),
    ("starcoder2", "starcoder2", {}),
    ("olmo2", "olmo2", dict(inv_freq=True)),
    ("mixtral", "mixtral", {}),
    ("mixtral-tied-bf16", "mixtral",
     dict(source_dtype="bfloat16", torch_dtype="bfloat16", tied_lm_head=True,
          config_extra={"tie_word_embeddings": True})),
    ("qwen3_moe-sharded", "qwen3_moe", dict(shards=2)),
    ("gpt2", "gpt2", {}),
]

COPIED = ["generation_config.json", "special_tokens_map.json", "tokenizer.json",
          "tokenizer_config.json"]


def mlx_lm_convert(src, dst, **kw):
    from mlx_lm import convert

    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src), str(dst), **kw)


def relayout_convert(src, dst, *args):
    run = subprocess.run(
        [str(RELAYOUT), "convert", str(src), str(dst), "--preset", "mlx-lm", "--device",
         "cpu", "-q", *args],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    return run


def tensors(folder):
    import mlx.core as mx

    out, meta = {}, {}
    for f in sorted(folder.glob("model*.safetensors")):
        arrays, m = mx.load(str(f), return_metadata=True)
        out.update(arrays)
        meta[f.name] = m
    return out, meta


def raw(a):
    import mlx.core as mx

    return bytes(memoryview(a.view(mx.uint8))) if a.size else b""


def assert_same_tensors(a, b):
    ta, _ = tensors(a)
    tb, _ = tensors(b)
    assert sorted(ta) == sorted(tb), (sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta)))
    for k in ta:
        x, y = ta[k], tb[k]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), k
        assert raw(x) == raw(y), f"{k}: bytes differ"


def tokens(folder, prompt="the quick brown", n=8):
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(str(folder))
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n,
                                              sampler=make_sampler(temp=0.0))]


@pytest.mark.parametrize("case,model_type,kw", CASES, ids=[c[0] for c in CASES])
def test_relayout_writes_what_mlx_lm_convert_writes(case, model_type, kw, tmp_path):
    require("mlx.core", "mlx_lm", "tokenizers")
    src = tmp_path / "hf"
    hf_models.write_model(src, model_type, **kw)
    ours, theirs = tmp_path / "relayout", tmp_path / "mlx_lm"
    relayout_convert(src, ours)
    mlx_lm_convert(src, theirs)
    assert_same_tensors(ours, theirs)
    assert json.loads((ours / "config.json").read_text()) == json.loads(
        (theirs / "config.json").read_text())
    index = [json.loads((d / "model.safetensors.index.json").read_text()) for d in (ours, theirs)]
    assert index[0]["metadata"] == index[1]["metadata"]
    assert sorted(index[0]["weight_map"]) == sorted(index[1]["weight_map"])
    for name in COPIED:
        assert (ours / name).read_bytes() == (src / name).read_bytes(), name
    _, meta = tensors(ours)
    assert all(m.get("format") == "mlx" for m in meta.values()), meta
    if kw.get("source_dtype", "float32") == "float32" and kw.get("torch_dtype", "float32") == "float32":
        # mlx's CPU backend runs the MoE gathers in float32 only.
        assert tokens(ours) == tokens(theirs)


def test_dtype_flags_match_mlx_lm_and_nan_bits_follow_mlx(tmp_path):
    """--dtype in mlx-lm's spelling gives mlx-lm's tensors; NaNs of every sign and payload
    cast as mlx's astype casts them (0x7FC0 to bf16)."""
    require("mlx.core", "mlx_lm", "tokenizers")
    import mlx.core as mx
    import numpy as np

    src = tmp_path / "hf"
    hf_models.write_model(src, "llama", torch_dtype="float32")
    weights = dict(mx.load(str(src / "model.safetensors")))
    bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FA00000, 0x80000001,
                     0x00000001, 0x7F7FFFFF, 0xFF800000], dtype=np.uint32)
    w = np.array(weights["model.norm.weight"])
    w.view(np.uint32)[: bits.size] = bits
    weights["model.norm.weight"] = mx.array(w)
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "pt"})
    for dtype in ["bfloat16", "float16"]:
        ours, theirs = tmp_path / f"r-{dtype}", tmp_path / f"m-{dtype}"
        relayout_convert(src, ours, "--dtype", dtype)
        mlx_lm_convert(src, theirs, dtype=dtype)
        assert_same_tensors(ours, theirs)
    # --dtype source keeps the source's even where the config declares another.
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg))
    kept = tmp_path / "kept"
    relayout_convert(src, kept, "--dtype", "source")
    t, _ = tensors(kept)
    assert all(a.dtype == mx.float32 for a in t.values())


def test_load_mlx_returns_names_and_arrays_ready_for_load_weights(tmp_path):
    require("mlx.core", "mlx_lm", "tokenizers")
    import relayout
    from mlx_lm.utils import load_model

    src = tmp_path / "hf"
    hf_models.write_model(src, "mixtral")
    weights = relayout.load_mlx(src, preset="mlx-lm")
    theirs = tmp_path / "mlx_lm"
    mlx_lm_convert(src, theirs)
    model, _ = load_model(theirs)
    want, _ = tensors(theirs)
    assert sorted(weights) == sorted(want)
    for k, a in weights.items():
        assert raw(a) == raw(want[k]), k
    model.load_weights(list(weights.items()), strict=True)


def test_python_convert_copies_the_model_files_unless_told_not_to(tmp_path):
    require("mlx.core", "mlx_lm", "tokenizers")
    import relayout

    src = tmp_path / "hf"
    hf_models.write_model(src, "qwen3")
    out = tmp_path / "out"
    report = relayout.convert(src, out, "mlx-lm", device="cpu")
    assert sorted(Path(p).name for p in report.copied) == sorted(["config.json", *COPIED])
    plan = relayout.plan(src, "mlx-lm")
    assert [f.name for f in plan.copied] == sorted(["config.json", *COPIED])
    assert [f.name for f in plan.copied if f.rewritten] == ["config.json"]
    bare = tmp_path / "bare"
    report = relayout.convert(src, bare, "mlx-lm", device="cpu", copy_files=False)
    assert report.copied == []
    assert sorted(p.name for p in bare.iterdir()) == ["model.safetensors",
                                                      "model.safetensors.index.json"]


def test_the_readme_expectation_snippet_passes_for_every_family(tmp_path):
    """The README's --expect recipe: the parameter tree of a model mlx-lm loaded, as JSON."""
    require("mlx.core", "mlx_lm", "tokenizers")
    from mlx.utils import tree_flatten
    from mlx_lm import load

    for model_type in hf_models.CONFIGS:
        src = tmp_path / model_type
        hf_models.write_model(src, model_type)
        theirs = tmp_path / f"{model_type}-mlx"
        mlx_lm_convert(src, theirs)
        model, _ = load(str(theirs))
        expect = {k: {"shape": list(v.shape), "dtype": str(v.dtype).split(".")[-1]}
                  for k, v in tree_flatten(model.parameters())}
        path = tmp_path / f"{model_type}.json"
        path.write_text(json.dumps(expect))
        run = subprocess.run(
            [str(RELAYOUT), "plan", str(src), "--preset", "mlx-lm", "--expect", str(path)],
            capture_output=True, text=True,
        )
        assert run.returncode == 0, (model_type, run.stderr)
        shutil.rmtree(theirs)


def test_a_torch_bin_folder_converts_to_what_mlx_lm_makes_of_its_safetensors_copy(tmp_path):
    """mlx-lm reads only safetensors: it converts a safetensors copy of the same weights,
    relayout the `pytorch_model.bin` (written as torch.save writes it, without torch)."""
    require("mlx.core", "mlx_lm", "tokenizers", "safetensors")
    src = tmp_path / "hf"
    hf_models.write_model(src, "qwen2", torch_dtype="bfloat16", tied_lm_head=True)
    bin_dir = tmp_path / "hf-bin"
    bin_dir.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bin_dir / f.name)
    subprocess.run([sys.executable, str(HERE / "torch_bin.py"), str(src / "model.safetensors"),
                    str(bin_dir / "pytorch_model.bin")], check=True)
    ours, theirs = tmp_path / "relayout", tmp_path / "mlx_lm"
    relayout_convert(bin_dir, ours)
    mlx_lm_convert(src, theirs)
    assert_same_tensors(ours, theirs)
    assert json.loads((ours / "config.json").read_text()) == json.loads(
        (theirs / "config.json").read_text())
