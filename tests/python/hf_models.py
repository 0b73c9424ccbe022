"""Tiny random models in Hugging Face's layout, one per family of the `mlx-lm` preset,
written without torch: the parameter names and shapes come from mlx-lm's own model class
for the config, turned back into the layout `transformers` saves (what each family's
`sanitize()` undoes: experts one by one, GPT-2's Conv1D weights (in, out) and names
without the `model.` prefix, the attention mask buffer, rotary frequencies, a tied
`lm_head`). Tokenizers are tiny byte-level BPEs built with `tokenizers`.
"""

import json
from pathlib import Path

import numpy as np

VOCAB = 320
EOS = "<|endoftext|>"

_BASE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
}

# model_type -> (config beyond _BASE, architectures).
CONFIGS = {
    "llama": ({"tie_word_embeddings": False}, "LlamaForCausalLM"),
    "mistral": ({"tie_word_embeddings": False}, "MistralForCausalLM"),
    "qwen2": ({"tie_word_embeddings": True}, "Qwen2ForCausalLM"),
    "qwen3": ({"tie_word_embeddings": True, "head_dim": 16}, "Qwen3ForCausalLM"),
    "gemma2": (
        {"head_dim": 16, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
         "final_logit_softcapping": 30.0, "sliding_window": 64},
        "Gemma2ForCausalLM",
    ),
    "gemma3_text": (
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64,
         "sliding_window_pattern": 2},
        "Gemma3ForCausalLM",
    ),
    "phi3": ({"tie_word_embeddings": False}, "Phi3ForCausalLM"),
    "starcoder2": ({"tie_word_embeddings": True, "norm_epsilon": 1e-5}, "Starcoder2ForCausalLM"),
    "olmo2": ({"tie_word_embeddings": False}, "Olmo2ForCausalLM"),
    "mixtral": (
        {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
        "MixtralForCausalLM",
    ),
    "qwen3_moe": (
        {"num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
         "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 32,
         "head_dim": 16, "tie_word_embeddings": False, "norm_topk_prob": True},
        "Qwen3MoeForCausalLM",
    ),
    "gpt2": (
        {"n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128,
         "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
        "GPT2LMHeadModel",
    ),
}


def config_for(model_type, torch_dtype="float32", **extra):
    """A config.json for `model_type`, as transformers writes one (with `_name_or_path`,
    which mlx-lm drops)."""
    own, arch = CONFIGS[model_type]
    cfg = {} if model_type == "gpt2" else dict(_BASE)
    if model_type == "gpt2":
        cfg["vocab_size"] = VOCAB
    cfg.update(own)
    cfg.update({
        "model_type": model_type,
        "architectures": [arch],
        "_name_or_path": f"tiny-{model_type}",
        "torch_dtype": torch_dtype,
        "bos_token_id": 0,
        "eos_token_id": 0,
    })
    cfg.update(extra)
    return cfg


def write_tokenizer(folder: Path):
    """A byte-level BPE trained on a few sentences; every family's tokenizer here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog", "hello world, relayout converts"]
    tok.train_from_iterator(text * 50, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
        "unk_token": EOS, "model_max_length": 128,
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}))


def mlx_parameters(config):
    """mlx-lm's parameter names and shapes for `config` (its model class, no weights)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def hf_tensors(config, seed=0, dtype=np.float32, tied_lm_head=False, inv_freq=False):
    """The model's random tensors in Hugging Face's names and layouts, as float arrays."""
    rng = np.random.default_rng(seed)
    mt = config["model_type"]

    def rand(shape, name):
        if name.endswith("norm.weight") or ".ln_" in name or name.endswith("layernorm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
        return (0.08 * rng.standard_normal(shape)).astype(dtype)

    out = {}
    for name, shape in mlx_parameters(config).items():
        a = rand(shape, name)
        if ".switch_mlp." in name:
            # One tensor per expert, as the Hub's checkpoints hold them.
            proj = name.split(".switch_mlp.")[1].split(".")[0]
            prefix = name.split(".switch_mlp.")[0]
            if mt == "mixtral":
                hf = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
                for e in range(shape[0]):
                    out[f"{prefix}.experts.{e}.{hf}.weight"] = a[e]
            else:
                for e in range(shape[0]):
                    out[f"{prefix}.experts.{e}.{proj}.weight"] = a[e]
            continue
        if mt == "gpt2":
            name = name[len("model."):]
            if name.split(".")[-2] in ("c_attn", "c_proj", "c_fc") and name.endswith("weight"):
                a = np.ascontiguousarray(a.T)
        out[name] = a
    if mt == "gpt2":
        n = config["n_ctx"]
        mask = np.tril(np.ones((n, n), dtype=np.float32)).reshape(1, 1, n, n).astype(dtype)
        for i in range(config["n_layer"]):
            out[f"h.{i}.attn.bias"] = mask
    if inv_freq:
        half = config["hidden_size"] // config["num_attention_heads"] // 2
        freqs = (1.0 / (10000.0 ** (np.arange(half) / half))).astype(np.float32)
        for i in range(config["num_hidden_layers"]):
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = freqs
    if tied_lm_head:
        embed = "wte.weight" if mt == "gpt2" else "model.embed_tokens.weight"
        out["lm_head.weight"] = out[embed].copy()
    return out


def save_safetensors(path: Path, tensors, dtype="float32"):
    """Writes the tensors with mlx (which writes bf16 without ml_dtypes)."""
    import mlx.core as mx

    target = getattr(mx, dtype)
    mx.save_safetensors(
        str(path), {k: mx.array(v).astype(target) for k, v in tensors.items()},
        metadata={"format": "pt"},
    )


def write_model(folder: Path, model_type, *, source_dtype="float32", torch_dtype="float32",
                shards=1, tied_lm_head=False, inv_freq=False, seed=0, config_extra=None):
    """A whole model folder: config, generation config, tokenizer, weights in `shards`
    safetensors files (with an index when more than one)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = config_for(model_type, torch_dtype, **(config_extra or {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": [0], "max_new_tokens": 8})
    )
    write_tokenizer(folder)
    tensors = hf_tensors(config, seed=seed, tied_lm_head=tied_lm_head, inv_freq=inv_freq)
    names = sorted(tensors)
    if shards == 1:
        save_safetensors(folder / "model.safetensors", tensors, source_dtype)
        return config
    weight_map = {}
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_safetensors(folder / file, part, source_dtype)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return config
