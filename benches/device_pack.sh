#!/usr/bin/env bash
# Builds what benches/device_check.sh needs on a GPU machine that has no Rust toolchain,
# no network and no Vulkan loader: one ignored folder, target/device-pack/ (under 64 MiB),
# to send with the working tree. Run here, on a machine with cargo and apt.
#
# Usage: benches/device_pack.sh        then send target/device-pack with the tree and run
#        benches/device_check.sh there.
#
# It holds: `relayout` (release, stripped), `it` (the integration-test binary, release,
# stripped, with the GPU tests), `make_checkpoint` (the benchmark checkpoint generator),
# the Vulkan loader's Debian package and its files as a tarball, and what was packed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/device-pack
rm -rf "$OUT"
mkdir -p "$OUT"

echo "building release binaries" >&2
cargo build --release --bin relayout --example make_checkpoint
# The test binary: the path cargo reports for the `it` target.
IT=$(cargo test --release --no-run --test it --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "it" and m.get("executable"):
        print(m["executable"])')
[ -n "$IT" ] || { echo "device_pack: no test binary found" >&2; exit 1; }
strip -o "$OUT/relayout" target/release/relayout
strip -o "$OUT/make_checkpoint" target/release/examples/make_checkpoint
strip -o "$OUT/it" "$IT"

# The Vulkan loader (libvulkan.so.1): the GPU driver brings its ICD, not always the loader.
(
    cd "$OUT"
    apt-get download libvulkan1 >/dev/null 2>&1 || { echo "device_pack: apt-get download libvulkan1 failed" >&2; exit 1; }
    deb=$(ls libvulkan1_*.deb)
    mkdir -p loader
    dpkg-deb -x "$deb" loader
    tar -czf vulkan-loader.tar.gz -C loader .
    rm -rf loader
)

{
    echo "packed $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')"
    ls -l "$OUT"
} > "$OUT/MANIFEST"
total=$(du -sb "$OUT" | cut -f1)
echo "target/device-pack: $((total / 1048576)) MiB" >&2
if [ "$total" -gt $((64 << 20)) ]; then
    echo "device_pack: over 64 MiB" >&2
    exit 1
fi
