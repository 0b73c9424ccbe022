#!/usr/bin/env python3
"""Prints criterion results as throughput next to their baselines, with the ratio.

usage: python3 benches/ratios.py [target/criterion]

Run after `cargo bench --bench cpu_kernels` and/or `cargo bench --bench gpu_kernels`.
Baselines: in a group, a benchmark named "X [… baseline]" is the baseline of every "X […]";
otherwise every benchmark whose name starts with "memcpy" is a baseline of the group.
Throughput uses the median time.
"""
import json, os, sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "criterion")


def load(group_dir):
    out = {}
    for d, _, files in os.walk(group_dir):
        if os.path.basename(d) != "new" or "benchmark.json" not in files:
            continue
        bench = json.load(open(os.path.join(d, "benchmark.json")))
        est = json.load(open(os.path.join(d, "estimates.json")))
        nbytes = (bench.get("throughput") or {}).get("Bytes")
        if not nbytes:
            continue
        secs = est["median"]["point_estimate"] / 1e9
        out[bench["function_id"]] = nbytes / secs / 2**30
    return out


for group in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    results = load(os.path.join(root, group))
    if not results:
        continue
    print(f"\n## {group}")
    print(f"{'benchmark':<52} {'GiB/s':>8}  ratio")
    memcpys = {k: v for k, v in results.items() if k.startswith("memcpy")}
    for name, gibs in sorted(results.items()):
        prefix = name.split(" [")[0]
        base = {k: v for k, v in results.items()
                if k != name and k.split(" [")[0] == prefix and "baseline" in k}
        if "baseline" in name or name.startswith("memcpy"):
            print(f"{name:<52} {gibs:8.2f}  (baseline)")
            continue
        base = base or memcpys
        ratios = ", ".join(f"{gibs / v:.2f}x {k}" for k, v in sorted(base.items()))
        print(f"{name:<52} {gibs:8.2f}  {ratios}")
