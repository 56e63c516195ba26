#!/usr/bin/env bash
# Fuzzes what users hand Zebra with cargo-fuzz, N seconds per target (default 60):
#   check    the frontend (parser, checker, lowering), seeded with every example and fixture;
#   graph    the IR's text parser, verifier and printer, seeded with the IR of the examples;
#   weights  safetensors weights and .npy inputs, seeded with small valid files.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (default: every target)
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP enables them on the pinned stable
# toolchain. A crash, a timeout (5 s an input) or an allocation past 2 GiB stops it with the
# input under fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(check graph weights)
for target in "${targets[@]}"; do
    corpus=fuzz/corpus/$target
    mkdir -p "$corpus"
    case $target in
        check)
            # Named by their paths: examples and fixtures may share a file name.
            for file in examples/*.zb examples/*/*.zb tests/fixtures/*/*.zb; do
                cp "$file" "$corpus/${file//\//_}"
            done
            ;;
        graph)
            cp tests/fixtures/zir/*.zir "$corpus"/
            cargo build --release --quiet --bin zebra
            for file in examples/zebra_tiny.zb examples/attention/*.zb; do
                name=$(basename "$file" .zb)
                target/release/zebra compile "$file" --emit ir -o "$corpus/$name.zir" >/dev/null
                target/release/zebra compile "$file" --emit opt -o "$corpus/$name-opt.zir" >/dev/null
            done
            ;;
        weights)
            cp tests/fixtures/golden/tokens.npy tests/fixtures/golden/logits_all_causal.npy "$corpus"/
            python3 - "$corpus/small.safetensors" <<'PY'
import json, struct, sys
header = json.dumps({
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]},
}).encode()
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1, 2) + b"\x80\x3f\x00\x40")
PY
            ;;
        *) echo "fuzz.sh: no target $target (check, graph, weights)" >&2; exit 2 ;;
    esac
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 -max_len=8192)
done
