#!/usr/bin/env bash
# Coverage-guided fuzzing of the readers, the rule language and the layout code
# (cargo-fuzz, libFuzzer, AddressSanitizer). Builds every target, seeds
# fuzz/corpus/<target>/ from tests/fixtures (fuzz/seed.sh) and runs each target for
# SECONDS. Exits non-zero when any target finds a crash, panic, timeout or OOM; its input
# is then in fuzz/artifacts/<target>/ and the log in fuzz/target/logs/<target>.log.
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]   (SECONDS per target, default 20; all targets)
# Env:   FUZZ_ARGS  extra libFuzzer flags (e.g. "-use_value_profile=1")
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET="${1:-20}"
shift || true
TARGETS=(safetensors_header zip pickle sharded_index rules checkpoint)
[ $# -gt 0 ] && TARGETS=("$@")

# Longest input per target: a whole fixture checkpoint for the file formats, a few KiB
# of text or pickle otherwise.
max_len() {
    case "$1" in
    safetensors_header | zip | checkpoint) echo 65536 ;;
    *) echo 16384 ;;
    esac
}

# Dictionaries (fuzz/dict/*.dict) each target's input is made of.
dicts() {
    case "$1" in
    safetensors_header) echo json safetensors_header ;;
    zip) echo zip ;;
    pickle) echo pickle ;;
    sharded_index) echo json sharded_index safetensors_header ;;
    rules) echo rules ;;
    checkpoint) echo json safetensors_header zip pickle ;;
    esac
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: the nightly Rust toolchain is missing; cargo-fuzz needs it (sanitizers," >&2
    echo "coverage instrumentation). Install it with: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

cargo +nightly fuzz build
./seed.sh "$(max_len checkpoint)"

mkdir -p target/logs target/dict
# Scratch files of the targets (src/fuzzing.rs) go here, not into the shared temp dir,
# since a crashed input cannot remove its own; in memory where there is a tmpfs, as
# creating and removing a folder per input on a journaled disk takes milliseconds.
SCRATCH_BASE="${TMPDIR:-/tmp}"
[ -d /dev/shm ] && [ -w /dev/shm ] && SCRATCH_BASE=/dev/shm
SCRATCH="$(mktemp -d "$SCRATCH_BASE/relayout-fuzz.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

# A libFuzzer final statistic, summed over the log (one line per worker).
stat() { sed -n "s/^stat::$1: *//p" "$log" | awk '{s += $1} END {print s + 0}'; }

failed=()
printf '%-20s %12s %8s %8s %8s %8s %6s  %s\n' target executions exec/s cov ft corpus wall result
for t in "${TARGETS[@]}"; do
    dict="target/dict/$t.dict"
    for d in $(dicts "$t"); do cat "dict/$d.dict"; done >"$dict"
    log="target/logs/$t.log"
    rc=0
    start=$(date +%s)
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    TMPDIR="$SCRATCH" cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$t")" \
        -rss_limit_mb=2048 -timeout=10 -dict="$dict" -print_final_stats=1 \
        ${FUZZ_ARGS:-} >"$log" 2>&1 || rc=$?
    wall=$(($(date +%s) - start))
    last_cov="$(grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -n 1 || true)"
    read -r _ cov _ ft _ corp <<<"${last_cov:-cov: - ft: - corp: -}"
    result=ok
    if [ "$rc" -ne 0 ]; then
        result="FAILED (exit $rc, see fuzz/$log)"
        failed+=("$t")
    fi
    printf '%-20s %12s %8s %8s %8s %8s %5ss  %s\n' "$t" "$(stat number_of_executed_units)" \
        "$(stat average_exec_per_sec)" "$cov" "$ft" "$corp" "$wall" "$result"
done

if [ ${#failed[@]} -gt 0 ]; then
    for t in "${failed[@]}"; do
        echo
        echo "=== $t (whole log: fuzz/target/logs/$t.log) ==="
        # The panic or sanitizer report, the crate's own frames and the saved input.
        grep -E -A1 "panicked at|ERROR: |^SUMMARY:|Test unit written|#[0-9]+ 0x[0-9a-f]+ in .*relayout" \
            "target/logs/$t.log" | grep -v -- "^--$" | cut -c1-300 | head -n 40
    done
    echo "fuzz/run.sh: ${failed[*]} failed" >&2
    exit 1
fi
