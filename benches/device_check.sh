#!/usr/bin/env bash
# The check to run the first time a real GPU machine is at hand, with only the files sent
# with it: the working tree plus target/device-pack/ from benches/device_pack.sh (no Rust
# toolchain, no network, no Vulkan loader needed there). Within about 6 minutes it
#   1. unpacks the Vulkan loader (and, where a driver ships no ICD file, writes one for
#      NVIDIA's libGLX_nvidia),
#   2. runs the GPU tests with RELAYOUT_REQUIRE_GPU=1 (a missing adapter fails them),
#   3. runs `relayout bench --device gpu --json`,
#   4. converts a generated 2 GiB checkpoint on the GPU and on the CPU, plain and with
#      --dtype bf16, checks the GPU's files are the CPU's byte for byte,
# and prints one table. Output files go to $OUT (the device tool's folder) when set.
#
# Usage: benches/device_check.sh [SIZE_MIB]    (default 2048; a small size rehearses it)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PACK=$ROOT/target/device-pack
SIZE_MIB=${1:-2048}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/relayout-device.XXXXXX")
RESULTS=${OUT:-$WORK/results}
mkdir -p "$RESULTS"
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
status=0
note() { echo "== $*" >&2; }

[ -x "$PACK/relayout" ] || { echo "device_check: no $PACK (run benches/device_pack.sh first)" >&2; exit 2; }

# 1. The loader, unless the system has one; an ICD for NVIDIA when none is registered.
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'; then
    mkdir -p "$WORK/loader"
    tar -xzf "$PACK/vulkan-loader.tar.gz" -C "$WORK/loader"
    lib=$(dirname "$(find "$WORK/loader" -name 'libvulkan.so.1*' | head -1)")
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    note "Vulkan loader from the pack: $lib"
fi
icds=$(ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null | wc -l)
if [ "$icds" -eq 0 ] && [ -z "${VK_ICD_FILENAMES:-}${VK_DRIVER_FILES:-}" ]; then
    glx=$(ldconfig -p 2>/dev/null | awk '/libGLX_nvidia.so.0/{print $NF; exit}')
    [ -z "$glx" ] && glx=$(find / -xdev -name 'libGLX_nvidia.so.0' 2>/dev/null | head -1)
    if [ -n "$glx" ]; then
        printf '{"file_format_version":"1.0.0","ICD":{"library_path":"%s","api_version":"1.3.0"}}\n' \
            "$glx" > "$WORK/nvidia_icd.json"
        export VK_DRIVER_FILES="$WORK/nvidia_icd.json" VK_ICD_FILENAMES="$WORK/nvidia_icd.json"
        note "no ICD registered: wrote one for $glx"
    fi
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$WORK/xdg}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

note "devices"
"$PACK/relayout" devices | tee "$RESULTS/devices.txt" >&2

# 2. The GPU tests, failing (not skipping) without an adapter.
note "GPU tests"
tests_started=$(date +%s)
RELAYOUT_REQUIRE_GPU=1 RELAYOUT_TEST_ROOT="$ROOT" "$PACK/it" gpu_backend:: backend_grid:: gpu_traffic:: \
    > "$RESULTS/gpu_tests.txt" 2>&1
tests_rc=$?
tests_line=$(grep -E '^test result' "$RESULTS/gpu_tests.txt" | tail -1)
[ "$tests_rc" -eq 0 ] || status=1
tests_s=$(( $(date +%s) - tests_started ))

# 3. The bench, on the GPU.
note "bench"
"$PACK/relayout" bench --device gpu --size 256MiB --dir "$WORK" --json > "$RESULTS/bench.json" 2> "$RESULTS/bench.err"
bench_rc=$?
[ "$bench_rc" -eq 0 ] || status=1

# 4. A generated checkpoint, converted on each device, plain and to bf16.
note "convert ${SIZE_MIB} MiB"
"$PACK/make_checkpoint" "$WORK/model.safetensors" "$SIZE_MIB" f32 >&2 || status=1
rows=()
peak() {  # runs "$@" with stdout to $1; prints its peak RSS in MiB (/usr/bin/time), or "-"
    local to=$1
    shift
    if [ -x /usr/bin/time ]; then
        /usr/bin/time -f '%M' -o "$WORK/rss" "$@" > "$to" && echo $(( $(tail -1 "$WORK/rss") / 1024 ))
    else
        "$@" > "$to" && echo "-"
    fi
}
for dtype in "" bf16; do
    for device in gpu cpu; do
        out="$WORK/out-$device${dtype:+-$dtype}.safetensors"
        args=(convert "$WORK/model.safetensors" "$out" --preset flax --device "$device" --force --json)
        [ -n "$dtype" ] && args+=(--dtype "$dtype")
        rss=$(peak "$WORK/report.json" "$PACK/relayout" "${args[@]}") || { status=1; rss="failed"; }
        report=$(python3 - "$WORK/report.json" <<'PY' 2>/dev/null || echo "- - -"
import json, sys
r = json.load(open(sys.argv[1]))
up = r["device_upload_bytes"] / max(r["bytes"], 1)
print(f'{r["seconds"]:.3f} {r["gb_per_s"]:.2f} {up:.2f}')
PY
)
        read -r secs gbps traffic <<< "$report"
        rows+=("| ${dtype:-source} | $device | $secs | $gbps | $rss | $traffic |")
        cp "$WORK/report.json" "$RESULTS/convert-$device${dtype:+-$dtype}.json"
    done
    a="$WORK/out-gpu${dtype:+-$dtype}.safetensors"
    b="$WORK/out-cpu${dtype:+-$dtype}.safetensors"
    if cmp -s "$a" "$b"; then same="identical"; else same="DIFFERENT"; status=1; fi
    rows+=("| ${dtype:-source} | gpu vs cpu | | | | $same |")
done

# The table.
adapter=$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1])).get("adapter") or {}; print(a.get("name","?"), "|", a.get("driver","?"), "|", a.get("backend","?"))' "$RESULTS/bench.json" 2>/dev/null || echo "?")
{
    echo "relayout device check: $(cat "$PACK/MANIFEST" | head -1)"
    echo "adapter: $adapter"
    echo "GPU tests: ${tests_line:-none ran} (rc $tests_rc, ${tests_s} s)"
    echo
    echo "| dtype | device | seconds | GB/s | peak RSS MiB | upload x output / result |"
    echo "| --- | --- | ---: | ---: | ---: | --- |"
    printf '%s\n' "${rows[@]}"
    echo
    echo "bench (relayout bench --device gpu --size 256MiB), rc $bench_rc:"
    python3 - "$RESULTS/bench.json" <<'PY' 2>/dev/null || echo "(no bench output; see bench.err)"
import json, sys
d = json.load(open(sys.argv[1]))
print("| group | case | GB/s | ratio | against |")
print("| --- | --- | ---: | ---: | --- |")
for r in d["results"]:
    ratio = "" if r["ratio"] is None else f'{r["ratio"]:.2f}'
    print(f'| {r["group"]} | {r["name"]} | {r["gb_per_s"]:.2f} | {ratio} | {r["baseline"] or ""} |')
PY
    echo
    echo "total $(( $(date +%s) - started )) s, status $status"
} | tee "$RESULTS/table.md"
exit "$status"
