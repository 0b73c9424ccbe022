#!/usr/bin/env python3
"""Benchmark (not in CI) of quantized conversion (`relayout convert --preset mlx-lm
--quantize`), in two parts:

1. memory: a generated Llama-shaped bf16 checkpoint larger than this machine's memory
   (--big-gb, default 32 GB, in 5 GB shards) converted to 4-bit affine; prints the time
   and peak RSS and fails when the RSS passes --max-rss-mib (default 512).
2. speed: a 2 GiB Llama-shaped bf16 checkpoint quantized by relayout and by
   `python -m mlx_lm convert -q` (--python: a Python with mlx-lm), each run its own
   process, runs alternating, medians of --runs with peak RSS from wait4(); then the two
   folders are compared tensor by tensor (bytes) with mlx.

Run it with a Python that has numpy and tokenizers (for the generated tokenizer), e.g.
the one with mlx-lm.

usage: PY benches/quantize_vs_mlx_lm.py [--dir DIR] [--big-gb 32] [--runs 3]
                                             [--python PY] [--skip-big] [--skip-small]
"""
import argparse, json, os, shutil, statistics, struct, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD = 5 * 10**9


def run(cmd):
    """Runs cmd, returns (seconds, peak RSS in MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"command failed ({status}): {' '.join(map(str, cmd))}\n{proc.stderr.read().decode()}")
    return dt, usage.ru_maxrss / 1024.0


def llama(hidden, ff, vocab, layers):
    """(name, shape) of a Llama-shaped model, grouped-query attention with 4x fewer kv."""
    t = [("model.embed_tokens.weight", (vocab, hidden)), ("model.norm.weight", (hidden,)),
         ("lm_head.weight", (vocab, hidden))]
    for l in range(layers):
        p = f"model.layers.{l}"
        t += [(f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
              (f"{p}.self_attn.k_proj.weight", (hidden // 4, hidden)),
              (f"{p}.self_attn.v_proj.weight", (hidden // 4, hidden)),
              (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
              (f"{p}.mlp.gate_proj.weight", (ff, hidden)),
              (f"{p}.mlp.up_proj.weight", (ff, hidden)),
              (f"{p}.mlp.down_proj.weight", (hidden, ff)),
              (f"{p}.input_layernorm.weight", (hidden,)),
              (f"{p}.post_attention_layernorm.weight", (hidden,))]
    return t


def nbytes(shape):
    n = 2
    for d in shape:
        n *= d
    return n


def write_safetensors(path, items, block):
    header, at = {}, 0
    for name, shape in items:
        n = nbytes(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        left = at
        while left:
            k = min(left, len(block))
            f.write(block[:k])
            left -= k


def make_model(folder, hidden, ff, vocab, layers):
    """The checkpoint in shards of at most 5 GB with its index, config and a tokenizer
    (kept from an earlier run when complete)."""
    sys.path.insert(0, str(ROOT / "tests" / "python"))
    import hf_models  # a tiny byte-level BPE tokenizer, as the tests build it

    if (folder / "config.json").exists():
        if not (folder / "tokenizer.json").exists():
            hf_models.write_tokenizer(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    # Random bf16 values in [-1, 1): sign, exponent 0x70..0x7E, any mantissa.
    block = bytearray(os.urandom(16 << 20))
    for i in range(1, len(block), 2):
        block[i] = (block[i] & 0x80) | (0x38 + block[i] % 7)
    block = bytes(block)
    shards, cur, size = [], [], 0
    for name, shape in llama(hidden, ff, vocab, layers):
        if cur and size + nbytes(shape) > SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes(shape)
    shards.append(cur)
    weight_map, total = {}, 0
    for k, items in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, items, block)
        for name, shape in items:
            weight_map[name] = file
            total += nbytes(shape)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 512,
        "rms_norm_eps": 1e-5, "vocab_size": vocab, "rope_theta": 5e5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "max_position_embeddings": 8192,
    }))
    hf_models.write_tokenizer(folder)


def size_of(folder):
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


COMPARE = """
import sys, mlx.core as mx
from pathlib import Path
def load(d):
    out = {}
    for f in sorted(Path(d).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
assert sorted(a) == sorted(b), "tensor names differ"
bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
       or bytes(memoryview(a[k].view(mx.uint8))) != bytes(memoryview(b[k].view(mx.uint8)))]
print(f"{len(a)} tensors, {len(bad)} differ", *bad[:5])
sys.exit(1 if bad else 0)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(ROOT / "target/bench-data"))
    ap.add_argument("--big-gb", type=float, default=32)
    ap.add_argument("--max-rss-mib", type=float, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--python", default=None, help="a Python with mlx-lm installed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs")
    a = ap.parse_args()
    base = Path(a.dir)
    subprocess.check_call(["cargo", "build", "--release", "-q", "--bin", "relayout"], cwd=ROOT)
    relayout = str(ROOT / "target/release/relayout")
    status = 0

    def quantize(src, dst):
        shutil.rmtree(dst, ignore_errors=True)
        return run([relayout, "convert", str(src), str(dst), "--preset", "mlx-lm",
                    "--device", a.device, "--quantize", "-q"])

    if not a.skip_big:
        # Llama-3-8B's widths; as many layers as make --big-gb.
        hidden, ff, vocab = 4096, 14336, 32000
        per_layer = sum(nbytes(s) for _, s in llama(hidden, ff, vocab, 1)) - 2 * nbytes((vocab, hidden))
        layers = int((a.big_gb * 1e9 - 2 * nbytes((vocab, hidden))) // per_layer) + 1
        src = base / f"llama-{layers}l-bf16"
        make_model(src, hidden, ff, vocab, layers)
        out = base / "big-q4"
        dt, rss = quantize(src, out)
        size, q = size_of(src), size_of(out)
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        print(f"large: {size / 1e9:.1f} GB bf16 ({size / 2**30:.1f} GiB, this machine has "
              f"{mem / 2**30:.1f} GiB of memory), {layers} layers -> {q / 1e9:.1f} GB 4-bit: "
              f"{dt:.1f} s ({size / dt / 1e9:.2f} GB/s of input), peak RSS {rss:.0f} MiB")
        if rss > a.max_rss_mib:
            print(f"FAIL: peak RSS {rss:.0f} MiB > {a.max_rss_mib:.0f} MiB")
            status = 1
        shutil.rmtree(out, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)

    if not a.skip_small:
        hidden, ff, vocab, layers = 2048, 5632, 32000, 21
        src = base / f"llama-{layers}l-2g-bf16"
        make_model(src, hidden, ff, vocab, layers)
        for f in src.glob("*.safetensors"):  # every run starts from the page cache
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
        ours, theirs = base / "small-relayout-q4", base / "small-mlx-lm-q4"
        cmds = {"relayout convert --quantize": lambda: quantize(src, ours)}
        if a.python:
            def mlx_lm():
                shutil.rmtree(theirs, ignore_errors=True)
                return run([a.python, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                            "--mlx-path", str(theirs), "-q"])
            cmds["mlx_lm convert -q"] = mlx_lm
        results = {k: [] for k in cmds}
        for _ in range(a.runs):
            for k, f in cmds.items():
                results[k].append(f())
        size = size_of(src)
        print(f"2 GiB: {size / 2**30:.2f} GiB bf16, {layers} layers, 4-bit affine, "
              f"medians of {a.runs}")
        print(f"{'command':<32} {'seconds':>8} {'peak RSS MiB':>13}")
        med = {}
        for k, r in results.items():
            med[k] = (statistics.median(x[0] for x in r), statistics.median(x[1] for x in r))
            print(f"{k:<32} {med[k][0]:8.2f} {med[k][1]:13.0f}")
        if a.python:
            t, m = med["relayout convert --quantize"], med["mlx_lm convert -q"]
            print(f"mlx_lm convert -q / relayout: {m[0] / t[0]:.1f}x the time, "
                  f"{m[1] / t[1]:.1f}x the peak RSS")
            same = subprocess.run([a.python, "-c", COMPARE, str(ours), str(theirs)],
                                  capture_output=True, text=True)
            print("outputs compared:", same.stdout.strip() or same.stderr.strip()[-500:])
            status |= same.returncode
        for p in (ours, theirs):
            shutil.rmtree(p, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
