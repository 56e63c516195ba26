#!/usr/bin/env bash
# Runs every prepared example (scripts/gpu-prepare.sh) on the GPU through zebra-run and
# compares its logits with the CPU's; prints one JSON line per example.
# Usage: scripts/gpu-check.sh DIR [TOLERANCE]   (relative to the largest logit; default 1e-4)
set -uo pipefail
dir=${1:?usage: gpu-check.sh DIR [TOLERANCE]}
tolerance=${2:-1e-4}
run="$dir/zebra-run"
failed=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
for example in "$dir"/*/; do
    name=$(basename "$example")
    [ -d "$example/gpu" ] || continue
    if ! "$run" forward "$example/gpu" --device cuda --weights "$example/weights.safetensors" \
        --tokens "$dir/tokens.npy" --output "$example/gpu-logits.npy"; then
        echo "{\"example\": \"$name\", \"ok\": false, \"error\": \"the GPU run failed\"}"
        failed=1
        continue
    fi
    result=$("$run" diff "$example/gpu-logits.npy" "$example/cpu-logits.npy" --tolerance "$tolerance" 2>&1)
    status=$?
    echo "{\"example\": \"$name\", \"result\": $(echo "$result" | head -1)}"
    [ $status -eq 0 ] || failed=1
done
exit $failed
