#!/usr/bin/env python3
"""End-to-end benchmark: `relayout convert --preset flax` against `cp` + `sync` of the same
file, and relayout's peak RSS at two checkpoint sizes.

usage: python3 benches/convert_vs_cp.py [--dir DIR] [--time-mib 2048] [--rss-mib 1024,4096]
                                        [--runs 5] [--device cpu] [--dtype f32] [--cast bf16]
                                        [--shard-size 500MB]

Both commands read a checkpoint that is in the page cache (it is read once first) and
write to the same disk; the copy is fsynced by `sync FILE`, as relayout fsyncs its
output. Runs alternate between the two so drift in the machine affects both alike; the
medians and their ratio are printed. Peak RSS comes from wait4() of the relayout process.

With --shard-size, a third command joins the alternation: the same conversion into a
folder of shards of that size (`--max-shard-size`), and the ratio sharded / single file
is printed with the sharded run's peak RSS.
"""
import argparse, os, shutil, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    """Runs cmd, returns (seconds, peak RSS in MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"command failed ({status}): {' '.join(cmd)}")
    return dt, usage.ru_maxrss / 1024.0


def make(path, mib, dtype):
    if not os.path.exists(path):
        subprocess.check_call([os.path.join(ROOT, "target/release/examples/make_checkpoint"),
                               path, str(mib), dtype])
    with open(path, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(ROOT, "target/bench-data"))
    ap.add_argument("--time-mib", type=int, default=2048)
    ap.add_argument("--rss-mib", default="1024,4096")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", help="dtype of the generated checkpoint")
    ap.add_argument("--cast", default=None, help="convert with --dtype CAST (bf16, f16, f32)")
    ap.add_argument("--shard-size", default=None,
                    help="also convert into a folder of shards of this size (e.g. 500MB)")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    subprocess.check_call(["cargo", "build", "--release", "-q", "--bin", "relayout",
                           "--example", "make_checkpoint"], cwd=ROOT)
    relayout = os.path.join(ROOT, "target/release/relayout")
    out = os.path.join(a.dir, "out.safetensors")

    def convert(src):
        cast = ["--dtype", a.cast] if a.cast else []
        return run([relayout, "convert", src, out, "--preset", "flax", "--device", a.device,
                    "--force", "-q"] + cast)

    shards = os.path.join(a.dir, "out-shards")

    def convert_sharded(src):
        cast = ["--dtype", a.cast] if a.cast else []
        return run([relayout, "convert", src, shards, "--preset", "flax", "--device", a.device,
                    "--max-shard-size", a.shard_size, "--force", "-q"] + cast)

    def copy(src):
        return run(["sh", "-c", f'cp "{src}" "{out}" && sync "{out}"'])

    def raw_write(src):
        # The disk's floor: the same byte count written with O_DIRECT, nothing read.
        mib = os.path.getsize(src) // 2**20
        return run(["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={mib}", "oflag=direct", "status=none"])

    src = os.path.join(a.dir, f"ck{a.time_mib}m-{a.dtype}.safetensors")
    make(src, a.time_mib, a.dtype)
    size = os.path.getsize(src)
    cp_t, rl_t, rl_rss, sh_t, sh_rss, dd_t = [], [], [], [], [], []
    commands = [(raw_write, dd_t, []), (copy, cp_t, []), (convert, rl_t, rl_rss)]
    if a.shard_size:
        commands.append((convert_sharded, sh_t, sh_rss))
    for _ in range(a.runs):
        for fn, acc, rss_acc in commands:
            if os.path.exists(out):
                os.remove(out)
            shutil.rmtree(shards, ignore_errors=True)
            t, rss = fn(src)
            acc.append(t)
            rss_acc.append(rss)
    n_shards = len(os.listdir(shards)) - 1 if a.shard_size else 0
    if os.path.exists(out):
        os.remove(out)
    shutil.rmtree(shards, ignore_errors=True)
    cp_m, rl_m = statistics.median(cp_t), statistics.median(rl_t)
    cast = f", converted to {a.cast}" if a.cast else ""
    print(f"checkpoint: {size / 2**30:.2f} GiB {a.dtype}{cast}, {a.runs} alternating runs, device {a.device}")
    print(f"cp + sync        median {cp_m:6.2f} s  ({size / cp_m / 1e9:5.2f} GB/s)  runs {' '.join(f'{t:.2f}' for t in cp_t)}")
    print(f"relayout convert median {rl_m:6.2f} s  ({size / rl_m / 1e9:5.2f} GB/s)  runs {' '.join(f'{t:.2f}' for t in rl_t)}")
    dd_m = statistics.median(dd_t)
    print(f"dd O_DIRECT write median {dd_m:6.2f} s  ({size / dd_m / 1e9:5.2f} GB/s)  runs {' '.join(f'{t:.2f}' for t in dd_t)}")
    print(f"ratio convert / cp: {rl_m / cp_m:.2f}  (target <= 1.3)")
    print(f"ratio convert / raw O_DIRECT write of the same bytes: {rl_m / dd_m:.2f}  (target <= 1.1)")
    print(f"peak RSS at {a.time_mib} MiB: {max(rl_rss):.0f} MiB")
    if a.shard_size:
        sh_m = statistics.median(sh_t)
        print(f"sharded convert  median {sh_m:6.2f} s  ({size / sh_m / 1e9:5.2f} GB/s)  runs {' '.join(f'{t:.2f}' for t in sh_t)}"
              f"  ({n_shards} shards of <= {a.shard_size})")
        print(f"ratio sharded / single file: {sh_m / rl_m:.2f}  (target <= 1.1); sharded peak RSS {max(sh_rss):.0f} MiB")

    rss = {}
    for mib in [int(x) for x in a.rss_mib.split(",") if x]:
        path = os.path.join(a.dir, f"ck{mib}m-{a.dtype}.safetensors")
        make(path, mib, a.dtype)
        if os.path.exists(out):
            os.remove(out)
        _, rss[mib] = convert(path)
        os.remove(out)
        print(f"peak RSS converting {os.path.getsize(path) / 2**30:.2f} GiB: {rss[mib]:.0f} MiB")
    if len(rss) >= 2:
        lo, hi = min(rss), max(rss)
        print(f"RSS ratio {hi} MiB / {lo} MiB checkpoint: {rss[hi] / rss[lo]:.2f}  (target 1.00 +- 0.10, <= 512 MiB)")


if __name__ == "__main__":
    main()
