"""Quantized output (`--quantize`) against `mlx_lm.convert(quantize=True)` itself (mlx and
mlx-lm pinned, installed from PyPI, no torch): for a tiny random model of every family of
the `mlx-lm` preset, in the modes, bit widths, group sizes and recipe mlx-lm offers,
relayout's folder and mlx-lm's hold the same tensors byte for byte and the same
config.json as JSON (per-layer entries included), and `mlx_lm.load` generates the same
tokens from both. `relayout.load_mlx(..., quantize=True)` gives the same arrays and the
`quantization` object to build the model with.

    cargo build && pip install ./python && pytest tests/python/test_mlx_lm_quantized.py
"""

import json

import pytest

from test_frameworks import require
from test_mlx_lm import (assert_same_tensors, hf_models, mlx_lm_convert, raw,
                         relayout_convert, tensors, tokens)

# (case, model_type, write_model keywords, mlx-lm's convert keywords). Every family at
# least once; affine at 4 and 8 bits in groups of 64, 32 and (on a wider model) 128;
# every MX/NV mode; the mixed_3_6 recipe; a bf16 cast before quantizing.
WIDE = {"hidden_size": 128, "intermediate_size": 256}
CASES = [
    ("llama-affine4", "llama", {}, {}),
    ("mistral-affine8", "mistral", {}, dict(q_bits=8)),
    ("qwen2-affine4-g32", "qwen2", dict(tied_lm_head=True), dict(q_group_size=32)),
    ("qwen3-affine8-g128", "qwen3", dict(config_extra=WIDE), dict(q_bits=8, q_group_size=128)),
    ("gemma2-mxfp4", "gemma2", {}, dict(q_mode="mxfp4")),
    ("gemma3_text-mxfp8", "gemma3_text", {}, dict(q_mode="mxfp8")),
    ("phi3-nvfp4", "phi3", {}, dict(q_mode="nvfp4")),
    ("starcoder2-affine4-bf16", "starcoder2", {}, dict(dtype="bfloat16")),
    ("olmo2-mixed_3_6", "olmo2", {}, dict(quant_predicate="mixed_3_6")),
    ("mixtral-mixed_3_6-g32", "mixtral", {}, dict(quant_predicate="mixed_3_6", q_group_size=32)),
    ("mixtral-mxfp4", "mixtral", {}, dict(q_mode="mxfp4")),
    ("qwen3_moe-affine4", "qwen3_moe", {}, {}),
    ("qwen3_moe-nvfp4", "qwen3_moe", {}, dict(q_mode="nvfp4")),
    ("gpt2-affine8-g32", "gpt2", {}, dict(q_bits=8, q_group_size=32)),
]

FLAGS = {"q_bits": "--q-bits", "q_group_size": "--q-group-size", "q_mode": "--q-mode",
         "quant_predicate": "--quant-predicate", "dtype": "--dtype"}


def flags(kw):
    out = ["--quantize"]
    for k, v in kw.items():
        out += [FLAGS[k], str(v)]
    return out


@pytest.mark.parametrize("case,model_type,model_kw,q_kw", CASES, ids=[c[0] for c in CASES])
def test_quantized_output_is_what_mlx_lm_convert_q_writes(case, model_type, model_kw, q_kw,
                                                          tmp_path):
    require("mlx.core", "mlx_lm", "tokenizers")
    src = tmp_path / "hf"
    hf_models.write_model(src, model_type, **model_kw)
    ours, theirs = tmp_path / "relayout", tmp_path / "mlx_lm"
    relayout_convert(src, ours, *flags(q_kw))
    mlx_lm_convert(src, theirs, quantize=True, **q_kw)
    assert_same_tensors(ours, theirs)
    config = [json.loads((d / "config.json").read_text()) for d in (ours, theirs)]
    assert config[0] == config[1]
    assert config[0]["quantization"] == config[0]["quantization_config"]
    t, _ = tensors(ours)
    assert any(k.endswith(".scales") for k in t), "nothing was quantized"
    assert tokens(ours) == tokens(theirs)


def test_a_weight_whose_last_dimension_is_not_whole_groups_stays_whole(tmp_path):
    """intermediate_size 96: down_proj's rows are not whole groups of 64, in both tools."""
    require("mlx.core", "mlx_lm", "tokenizers")
    src = tmp_path / "hf"
    hf_models.write_model(src, "llama")
    ours = tmp_path / "relayout"
    relayout_convert(src, ours, "--quantize")
    t, _ = tensors(ours)
    assert "model.layers.0.mlp.down_proj.scales" not in t
    assert str(t["model.layers.0.mlp.down_proj.weight"].dtype) == "mlx.core.float32"
    assert "model.layers.0.mlp.up_proj.scales" in t
    import relayout

    plan = relayout.plan(src, "mlx-lm", quantize=True)
    down = next(e for e in plan.entries if e.target == "model.layers.0.mlp.down_proj.weight")
    assert "96 is not a multiple of the group size 64" in down.kept_whole


def test_load_mlx_quantized_returns_the_arrays_and_the_quantization_to_build_the_model(tmp_path):
    require("mlx.core", "mlx_lm", "tokenizers")
    import mlx.core as mx
    import mlx.nn as nn
    import relayout
    from mlx_lm.utils import _get_classes, load_model

    src = tmp_path / "hf"
    hf_models.write_model(src, "qwen3_moe")
    weights = relayout.load_mlx(src, preset="mlx-lm", quantize=True, q_bits=8, device="cpu")
    theirs = tmp_path / "mlx_lm"
    mlx_lm_convert(src, theirs, quantize=True, q_bits=8)
    want, _ = tensors(theirs)
    assert sorted(weights) == sorted(want)
    for k, a in weights.items():
        assert raw(a) == raw(want[k]), k
    config = json.loads((theirs / "config.json").read_text())
    assert weights.quantization == config["quantization"]
    # Build the quantized model from the returned config, as mlx_lm.load_model does.
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    q = weights.quantization

    def predicate(path, module):
        if path in q:
            return q[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q["mode"],
                class_predicate=predicate)
    model.load_weights(list(weights.items()), strict=True)
    reference, _ = load_model(theirs)
    x = mx.array([[1, 2, 3, 4]])
    assert mx.array_equal(model(x), reference(x)).item()
    # relayout.load gives the NumPy arrays of the same bytes.
    flat = relayout.load(src, "mlx-lm", quantize=True, q_bits=8, device="cpu")
    assert flat["model.layers.0.mlp.switch_mlp.up_proj.weight"].dtype.name == "uint32"
    assert bytes(flat["model.embed_tokens.scales"].view("uint8")) == raw(want["model.embed_tokens.scales"])


def test_python_refuses_what_the_cli_refuses(tmp_path):
    require("mlx.core", "mlx_lm", "tokenizers")
    import relayout

    src = tmp_path / "hf"
    hf_models.write_model(src, "llama")
    with pytest.raises(ValueError, match="only apply with --quantize"):
        relayout.load(src, "mlx-lm", q_bits=4)
    with pytest.raises(ValueError, match=r"\[32, 64, 128\]"):
        relayout.load(src, "mlx-lm", quantize=True, q_group_size=48)
    with pytest.raises(ValueError, match="affine"):
        relayout.plan(src, "mlx-lm", quantize=True, q_mode="nvfp4", quant_predicate="mixed_3_6")
    with pytest.raises(relayout.Error, match="mlx-lm"):
        relayout.load(src, "mlx", quantize=True)
