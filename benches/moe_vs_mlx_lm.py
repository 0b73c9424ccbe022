#!/usr/bin/env python3
"""Benchmark (not in CI): a generated Mixtral-shaped checkpoint (8 experts per layer, bf16,
Hugging Face's per-expert layout) converted by `relayout convert --preset mlx-lm` and by
`python -m mlx_lm convert`, against the raw O_DIRECT write of the same number of bytes.

usage: python3 benches/moe_vs_mlx_lm.py [--dir DIR] [--layers 12] [--runs 3]
                                        [--python PY] [--device cpu]

PY is a Python with mlx-lm installed (and no torch, as on a Mac or a fresh venv); without
it the mlx-lm rows are skipped. Each command is its own process; runs alternate between
the commands so drift affects all alike; medians of --runs are printed, with peak RSS from
wait4(). The input is read once first, so every run starts from the page cache.
"""
import argparse, json, os, shutil, statistics, struct, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, FF, EXPERTS, VOCAB = 1024, 3584, 8, 4096


def run(cmd, env=None):
    """Runs cmd, returns (seconds, peak RSS in MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"command failed ({status}): {' '.join(cmd)}")
    return dt, usage.ru_maxrss / 1024.0


def tensors(layers):
    t = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)),
         ("lm_head.weight", (VOCAB, HIDDEN))]
    for l in range(layers):
        p = f"model.layers.{l}"
        for n in ("q_proj", "o_proj"):
            t.append((f"{p}.self_attn.{n}.weight", (HIDDEN, HIDDEN)))
        for n in ("k_proj", "v_proj"):
            t.append((f"{p}.self_attn.{n}.weight", (HIDDEN // 4, HIDDEN)))
        t.append((f"{p}.input_layernorm.weight", (HIDDEN,)))
        t.append((f"{p}.post_attention_layernorm.weight", (HIDDEN,)))
        t.append((f"{p}.block_sparse_moe.gate.weight", (EXPERTS, HIDDEN)))
        for e in range(EXPERTS):
            x = f"{p}.block_sparse_moe.experts.{e}"
            t.append((f"{x}.w1.weight", (FF, HIDDEN)))
            t.append((f"{x}.w2.weight", (HIDDEN, FF)))
            t.append((f"{x}.w3.weight", (FF, HIDDEN)))
    return t


def write_safetensors(path, items):
    """bf16 tensors of small random values (no NaN or inf), written without numpy."""
    header, at = {}, 0
    for name, shape in items:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    # A random block of bf16 values in [-1, 1): sign, exponent 0x70..0x7E, any mantissa.
    block = bytearray(os.urandom(1 << 20))
    for i in range(1, len(block), 2):
        block[i] = (block[i] & 0x80) | (0x38 + block[i] % 7)
    block = bytes(block)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        left = at
        while left:
            k = min(left, len(block))
            f.write(block[:k])
            left -= k


def make_model(folder, layers):
    if (folder / "model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", tensors(layers))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
        "hidden_size": HIDDEN, "intermediate_size": FF, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 4, "num_local_experts": EXPERTS,
        "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "vocab_size": VOCAB,
        "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096,
    }))
    sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
    try:
        import hf_models  # a tiny byte-level BPE, as the tests build it

        hf_models.write_tokenizer(folder)
    except ImportError:
        sys.exit("the tokenizer needs the `tokenizers` package: pip install tokenizers")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(ROOT, "target/bench-data"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--python", default=None, help="a Python with mlx-lm installed")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    from pathlib import Path

    base = Path(a.dir)
    src = base / f"mixtral-{a.layers}l"
    make_model(src, a.layers)
    with open(src / "model.safetensors", "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    size = (src / "model.safetensors").stat().st_size
    subprocess.check_call(["cargo", "build", "--release", "-q", "--bin", "relayout"], cwd=ROOT)
    relayout = os.path.join(ROOT, "target/release/relayout")
    ours, theirs, raw = base / "moe-relayout", base / "moe-mlx-lm", base / "moe-raw"

    def convert():
        shutil.rmtree(ours, ignore_errors=True)
        return run([relayout, "convert", str(src), str(ours), "--preset", "mlx-lm",
                    "--device", a.device, "-q"])

    def mlx_lm():
        shutil.rmtree(theirs, ignore_errors=True)
        return run([a.python, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                    "--mlx-path", str(theirs)])

    def raw_write():
        mib = size // 2**20
        return run(["dd", "if=/dev/zero", f"of={raw}", "bs=1M", f"count={mib}",
                    "oflag=direct", "status=none"])

    cmds = {"relayout convert --preset mlx-lm": convert, "raw O_DIRECT write": raw_write}
    if a.python:
        cmds["mlx_lm convert"] = mlx_lm
    results = {k: [] for k in cmds}
    for _ in range(a.runs):
        for k, f in cmds.items():
            results[k].append(f())
    print(f"input: {size / 2**30:.2f} GiB bf16, {a.layers} layers x {EXPERTS} experts, "
          f"medians of {a.runs}")
    print(f"{'command':<36} {'seconds':>8} {'peak RSS MiB':>13}")
    med = {}
    for k, r in results.items():
        med[k] = (statistics.median(x[0] for x in r), statistics.median(x[1] for x in r))
        print(f"{k:<36} {med[k][0]:8.2f} {med[k][1]:13.0f}")
    t = med["relayout convert --preset mlx-lm"][0]
    print(f"relayout / raw O_DIRECT write: {t / med['raw O_DIRECT write'][0]:.2f}x")
    if "mlx_lm convert" in med:
        print(f"mlx_lm convert / relayout: {med['mlx_lm convert'][0] / t:.1f}x")
    for p in (ours, theirs, raw):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
