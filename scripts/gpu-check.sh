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
    [ -f "$example/cpu-logits.npy" ] || continue
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
if [ -d "$dir/train/gpu" ]; then
    if "$run" train "$dir/train/gpu" --device cuda --weights "$dir/train/weights.safetensors" \
        --data "$dir/train/corpus.txt" --steps 5 --seq-len 128 --batch 2 --lr 1e-3 \
        --out "$dir/train/gpu-trained.safetensors" > "$dir/train/gpu-losses.jsonl"; then
        losses() { grep -o '"loss":[^,]*' "$1" | cut -d: -f2; }
        worst=$(paste <(losses "$dir/train/gpu-losses.jsonl") <(losses "$dir/train/cpu-losses.jsonl") |
            awk '{d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > w) w = r} END {print w + 0}')
        ok=$(awk -v w="$worst" -v t="$tolerance" 'BEGIN {print (w <= t * 10) ? "true" : "false"}')
        echo "{\"example\": \"training steps\", \"gpu\": [$(losses "$dir/train/gpu-losses.jsonl" | paste -sd,)], \"cpu\": [$(losses "$dir/train/cpu-losses.jsonl" | paste -sd,)], \"max_relative_diff\": $worst, \"ok\": $ok}"
        [ "$ok" = true ] || failed=1
    else
        echo '{"example": "training steps", "ok": false, "error": "the GPU run failed"}'
        failed=1
    fi
fi
exit $failed
