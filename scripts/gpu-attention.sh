#!/usr/bin/env bash
# The tensor-core attention kernels on the GPU (prepared by scripts/gpu-prepare.sh under
# DIR/attention): every example's attentions checked against an f64 reference at a length
# that is not a multiple of the tiles, then the benchmark shapes (bench/gpu_attention.zb:
# bf16, batch 1, 32 heads, head dim 128, T = 16384, a window of 1024) timed beside PyTorch's
# SDPA (flash backend) and flex_attention, and checked against PyTorch at T = 1024; the
# other kernels of the benchmark shapes (bench_*: other tiles, wgmma on sm_90) are timed
# and checked the same way, one JSON line each with the variant's name.
# One JSON line per result; fails if any check fails.
# Usage: scripts/gpu-attention.sh DIR [SEQ_LEN]
set -uo pipefail
dir=${1:?usage: gpu-attention.sh DIR [SEQ_LEN]}
seq_len=${2:-16384}
run="$dir/zebra-run"
python=${PYTHON:-python3}
failed=0
for artifact in "$dir"/attention/*/; do
    name=$(basename "$artifact")
    case "$name" in bench*) continue ;; esac
    while read -r line; do
        echo "{\"example\": \"$name\", \"result\": $line}"
    done < <(timeout 120 "$run" attention "$artifact" --seq-len 1000 --batch 2 --repeats 3 --check-rows 48 2>&1 || echo "{\"ok\": false, \"error\": \"zebra-run attention failed\"}")
done | tee "$dir/attention-checks.jsonl"
grep -q '"ok": *false\|"ok":false\|"error"' "$dir/attention-checks.jsonl" && failed=1
bench="$dir/attention/bench"
if [ -d "$bench" ]; then
    for variant in "$dir"/attention/bench*/; do
        name=$(basename "$variant")
        while read -r line; do
            echo "{\"variant\": \"$name\", \"result\": $line}"
        done < <(timeout 120 "$run" attention "$variant" --seq-len "$seq_len" --repeats 20 --check-rows 8 2>&1 || echo "{\"ok\": false, \"error\": \"zebra-run attention failed\"}")
    done | tee "$dir/attention-bench.jsonl"
    grep -q '"ok": *false\|"ok":false\|"error"' "$dir/attention-bench.jsonl" && failed=1
    if command -v "$python" >/dev/null; then
        "$python" "$dir/torch_gpu_attention.py" --seq-len "$seq_len" || true
        saved=$(mktemp -d)
        if "$run" attention "$bench" --seq-len 1024 --repeats 1 --check-rows 8 --save "$saved" >/dev/null; then
            "$python" "$dir/torch_gpu_attention.py" --compare "$saved" --artifact "$bench" || failed=1
        fi
        rm -rf "$saved"
    else
        echo '{"skipped": "no python3 for the PyTorch comparison"}'
    fi
fi
exit $failed
