#!/usr/bin/env python3
"""`relayout.load(..., preset="flax")` against what users write today: the `safetensors`
package's NumPy loader, then the same renames and transposes in NumPy, each made
contiguous. Prints the time ratio and both peak RSS figures.

usage: python benches/python_load.py [--dir DIR] [--mib 2048] [--runs 3] [--device cpu]

Needs the package (`pip install ./python`) and `safetensors` in the running Python. The
checkpoint is written by the `make_checkpoint` example (a realistic mix of embedding,
attention, MLP, conv and norm tensors, f32), once, into DIR. Each measurement runs in a
fresh interpreter (so peak RSS is that load's alone), the two ways alternating, and the
medians are compared. Both produce exactly the same arrays: the baseline follows
relayout's own plan (names, slices, permutations), computed before its clock starts, and
the outputs' checksums must agree.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Both children print one JSON line: seconds, output bytes, peak RSS (MiB), checksum.
COMMON = r"""
import json, resource, sys, time, zlib
import numpy as np

def finish(t0, arrays):
    dt = time.perf_counter() - t0
    total = sum(a.nbytes for a in arrays.values())
    # A checksum of a strided sample, so both ways are seen to build the same arrays.
    crc = 0
    for k in sorted(arrays):
        a = arrays[k]
        assert a.flags.c_contiguous
        crc = zlib.crc32(k.encode(), crc)
        crc = zlib.crc32(a.reshape(-1)[:: max(1, a.size // 4096)].tobytes(), crc)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": dt, "bytes": total, "rss_mib": rss, "crc": crc}))
"""

RELAYOUT = COMMON + r"""
import relayout
src, device = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
arrays = relayout.load(src, "flax", device=device)
finish(t0, arrays)
"""

BASELINE = COMMON + r"""
import relayout
from safetensors.numpy import load_file
src = sys.argv[1]
plan = relayout.plan(src, "flax")          # the renames and layouts, outside the clock
t0 = time.perf_counter()
tensors = load_file(src)
arrays = {}
for e in plan.entries:
    a = tensors[e.source]
    if e.slice is not None:
        axis, start, n = e.slice
        a = a[(slice(None),) * axis + (slice(start, start + n),)]
    arrays[e.target] = np.ascontiguousarray(a.transpose(e.perm)).reshape(e.target_shape)
del tensors
finish(t0, arrays)
"""


def child(program, *args):
    out = subprocess.run([sys.executable, "-c", program, *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmark child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    a = ap.parse_args()

    path = os.path.join(a.dir, f"relayout-bench-py-{a.mib}.safetensors")
    if not os.path.exists(path):
        subprocess.check_call(["cargo", "build", "--release", "--example", "make_checkpoint"], cwd=ROOT)
        tool = os.path.join(ROOT, "target", "release", "examples", "make_checkpoint")
        subprocess.check_call([tool, path, str(a.mib), "f32"])
    size = os.path.getsize(path)
    print(f"checkpoint: {path} ({size / 2**30:.2f} GiB, f32), preset flax, device {a.device}")

    ours, base = [], []
    for i in range(a.runs):
        ours.append(child(RELAYOUT, path, a.device))
        base.append(child(BASELINE, path))
        print(f"run {i + 1}: relayout.load {ours[-1]['seconds']:.2f} s, {ours[-1]['rss_mib']:.0f} MiB; "
              f"safetensors+numpy {base[-1]['seconds']:.2f} s, {base[-1]['rss_mib']:.0f} MiB")
    if {r["crc"] for r in ours + base} != {ours[0]["crc"]}:
        sys.exit("the two ways built different arrays")
    t_ours = statistics.median(r["seconds"] for r in ours)
    t_base = statistics.median(r["seconds"] for r in base)
    out_mib = ours[0]["bytes"] / 2**20
    rss_ours = max(r["rss_mib"] for r in ours)
    rss_base = max(r["rss_mib"] for r in base)
    print(f"median: relayout.load {t_ours:.2f} s ({ours[0]['bytes'] / t_ours / 1e9:.2f} GB/s), "
          f"safetensors+numpy {t_base:.2f} s")
    print(f"speed ratio safetensors+numpy / relayout.load: {t_base / t_ours:.2f}  (target >= 4)")
    print(f"peak RSS: relayout.load {rss_ours:.0f} MiB = output {out_mib:.0f} MiB + {rss_ours - out_mib:.0f} MiB "
          f"(target <= output + 256); safetensors+numpy {rss_base:.0f} MiB ({rss_base / (size / 2**20):.2f}x the checkpoint)")


if __name__ == "__main__":
    main()
