#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ from tests/fixtures, fuzz/seeds/<target>/ and
# tests/fixtures/fuzz/<target>-*.bin (the inputs of past crashes). Adds to a corpus, never
# removes from it, so inputs found by earlier runs are kept. Seeds longer than the
# target's -max_len (run.sh) are skipped: truncated, they would only test the truncation
# errors.
# Usage: fuzz/seed.sh [MAX_LEN]   (default 65536)
set -euo pipefail
cd "$(dirname "$0")"
MAX_LEN="${1:-65536}"
FIXTURES=../tests/fixtures
PYTHON="$(command -v python3 || true)"

seed() { # seed TARGET FILE [NAME]
    local dir="corpus/$1" name="${3:-$(basename "$2")}"
    mkdir -p "$dir"
    if [ "$(wc -c <"$2")" -le "$MAX_LEN" ]; then
        cp "$2" "$dir/seed-$name"
    fi
}

for t in safetensors_header zip pickle sharded_index rules checkpoint; do
    mkdir -p "corpus/$t"
done

while IFS= read -r f; do
    case "$f" in
    *.safetensors)
        seed safetensors_header "$f"
        seed checkpoint "$f"
        ;;
    *.pt | *.pth | *.bin)
        seed zip "$f"
        seed checkpoint "$f"
        ;;
    esac
done < <(find "$FIXTURES" -type f \( -name '*.safetensors' -o -name '*.pt' -o -name '*.pth' -o -name '*.bin' \) -not -path '*/fuzz/*' | sort)

for f in ../src/rules/presets/*.toml; do
    seed rules "$f"
done
seed sharded_index "$FIXTURES/sharded/model.safetensors.index.json"

# Hand-written seeds for what no fixture holds (rule files that transpose, split and cast
# every dtype).
for dir in seeds/*/; do
    for f in "$dir"*; do
        [ -f "$f" ] && seed "$(basename "$dir")" "$f"
    done
done

# Crash inputs of earlier runs, kept as regression tests: each seeds its own target.
if [ -d "$FIXTURES/fuzz" ]; then
    for f in "$FIXTURES"/fuzz/*.bin; do
        [ -e "$f" ] || continue
        target="$(basename "$f" | sed 's/-.*//')"
        [ -d "corpus/$target" ] && seed "$target" "$f"
    done
fi

if [ -z "$PYTHON" ]; then
    echo "fuzz/seed.sh: no python3; the pickle and sharded_index corpora get fewer seeds" >&2
    exit 0
fi
# The data.pkl of every torch.save zip; an index whose weight map also names
# extra.safetensors, given after the NUL that ends the index (see sharded_index.rs); and a
# safetensors file with conv kernels and dense weights of every dtype but F32, so the
# flax preset's transposes run on 1-, 2- and 8-byte elements (the fixtures are all F32).
"$PYTHON" - "$FIXTURES" "$MAX_LEN" <<'PY'
import json, os, struct, sys, zipfile

fixtures, max_len = sys.argv[1], int(sys.argv[2])
for root, _, files in os.walk(fixtures):
    for name in sorted(files):
        path = os.path.join(root, name)
        if not name.endswith((".pt", ".pth", ".bin")) or "/fuzz" in root:
            continue
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError):
            continue
        for entry in archive.namelist():
            if entry.endswith("/data.pkl"):
                data = archive.read(entry)
                if len(data) <= max_len:
                    with open(f"corpus/pickle/seed-{name}.pkl", "wb") as f:
                        f.write(data)

with open(os.path.join(fixtures, "sharded", "model.safetensors.index.json")) as f:
    index = json.load(f)
index["weight_map"]["extra.w"] = "extra.safetensors"
header = json.dumps({"extra.w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
shard = struct.pack("<Q", len(header)) + header + bytes(range(24))
with open("corpus/sharded_index/seed-extra-shard", "wb") as f:
    f.write(json.dumps(index).encode() + b"\0" + shard)

sizes = {"F64": 8, "I64": 8, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
header, offset = {}, 0
for dtype, size in sizes.items():
    for name, shape in [("conv", [4, 3, 3, 2]), ("fc", [5, 3])]:
        n = size
        for d in shape:
            n *= d
        header[f"{name}_{dtype.lower()}.weight"] = {
            "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]
        }
        offset += n
text = json.dumps(header).encode()
text += b" " * (-len(text) % 8)
data = bytes((i * 37) % 251 for i in range(offset))
with open("corpus/checkpoint/seed-every-dtype.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + data)
PY
