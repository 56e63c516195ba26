#!/usr/bin/env bash
# The tensor-core attention kernels on the GPU (prepared by scripts/gpu-prepare.sh under
# DIR/attention): first the benchmark shapes (bench/gpu_attention.zb: bf16, batch 1, 32
# heads, head dim 128, T = 16384, a window of 1024) timed beside PyTorch's SDPA (flash
# backend) and flex_attention, and checked against PyTorch at T = 1024; the other kernels
# of the benchmark shapes (bench_*: other tiles, wgmma on sm_90) timed and checked the same
# way, one JSON line each with the variant's name, and a summary line per attention (the
# fastest variant that passed its check, its ratios to PyTorch, whether the target is met);
# then every example's attentions checked against an f64 reference at a length that is not
# a multiple of the tiles. The timings come first, so that a device run cut short still
# brings them back.
# One JSON line per result; fails if any check fails.
# Usage: scripts/gpu-attention.sh DIR [SEQ_LEN]
set -uo pipefail
dir=${1:?usage: gpu-attention.sh DIR [SEQ_LEN]}
seq_len=${2:-16384}
run="$dir/zebra-run"
python=${PYTHON:-python3}
failed=0
# Runs one artifact's kernels (KIND DIR FLAGS...), one JSON line each as {KIND: name,
# result}. A run gets 60 s (a normal one takes seconds); a wgmma kernel that runs out of
# time (a hang) skips the wgmma kernels after it, so that one bug does not spend the
# device's time on every variant. Lines that are not JSON (errors) come as {"message"}.
wgmma_hung=$(mktemp)
trap 'rm -f "$wgmma_hung"' EXIT
attention() {
    local kind=$1 artifact=$2 name out rc
    shift 2
    name=$(basename "$artifact")
    if [ -s "$wgmma_hung" ] && [[ $name == *wgmma* ]]; then
        echo "{\"$kind\": \"$name\", \"result\": {\"ok\": false, \"error\": \"skipped: an earlier wgmma kernel ran out of time\"}}"
        return
    fi
    out=$(timeout "${ATTENTION_TIMEOUT:-60}" "$run" attention "$artifact" "$@" 2>&1)
    rc=$?
    if [ $rc -ne 0 ]; then
        [ $rc -eq 124 ] && [[ $name == *wgmma* ]] && echo "$name" > "$wgmma_hung"
        out+=$'\n'"{\"ok\": false, \"error\": \"zebra-run attention failed (exit $rc)\"}"
    fi
    while read -r line; do
        [ -z "$line" ] && continue
        if [[ $line != \{* ]]; then
            line=${line//\\/\\\\}
            line="{\"message\": \"${line//\"/\\\"}\"}"
        fi
        echo "{\"$kind\": \"$name\", \"result\": $line}"
    done <<< "$out"
}
bench="$dir/attention/bench"
if [ -d "$bench" ]; then
    for variant in "$dir"/attention/bench*/; do
        attention variant "$variant" --seq-len "$seq_len" --repeats 20 --check-rows 8
    done | tee "$dir/attention-bench.jsonl"
    grep -q '"ok": *false\|"ok":false\|"error"' "$dir/attention-bench.jsonl" && failed=1
    if command -v "$python" >/dev/null; then
        "$python" "$dir/torch_gpu_attention.py" --seq-len "$seq_len" | tee "$dir/attention-torch.jsonl"
        # The fastest variant that passed its check, per attention, against the targets.
        "$python" "$dir/gpu_attention_summary.py" "$dir/attention-bench.jsonl" \
            "$dir/attention-torch.jsonl" || true
        saved=$(mktemp -d)
        if "$run" attention "$bench" --seq-len 1024 --repeats 1 --check-rows 8 --save "$saved" >/dev/null; then
            "$python" "$dir/torch_gpu_attention.py" --compare "$saved" --artifact "$bench" || failed=1
        fi
        rm -rf "$saved"
    else
        echo '{"skipped": "no python3 for the PyTorch comparison"}'
    fi
fi
for artifact in "$dir"/attention/*/; do
    name=$(basename "$artifact")
    case "$name" in bench*) continue ;; esac
    attention example "$artifact" --seq-len 1000 --batch 2 --repeats 3 --check-rows 48
done | tee "$dir/attention-checks.jsonl"
grep -q '"ok": *false\|"ok":false\|"error"' "$dir/attention-checks.jsonl" && failed=1
exit $failed
