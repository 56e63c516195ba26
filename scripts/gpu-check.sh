#!/usr/bin/env bash
# Runs every prepared example (scripts/gpu-prepare.sh) on the GPU through zebra-run and
# compares its logits with the CPU's (forward passes, decode steps against the KV caches,
# training steps, sampled generation) and, for the golden models, with the logits Hugging Face
# transformers computed; then the tensor-core attention kernels (scripts/gpu-attention.sh:
# checks, and the benchmark beside PyTorch). One JSON line per check; fails if any fails.
# The same examples compiled with --dtype bf16 (projections and attention on tensor cores,
# operands rounded to bf16, f32 accumulation) are compared with a bf16 tolerance: 2e-2 of the
# largest logit; on sm_90, zebra_tiny's forward pass and training steps and the benchmark
# model's forward pass also with their attentions on wgmma (--mma wgmma). Then the forward
# benchmark of a 492M-parameter model, f32 against bf16, its decoding after a long prompt
# and its training step in bf16.
# Usage: scripts/gpu-check.sh DIR [TOLERANCE]   (relative to the largest logit; default 1e-4)
# PARTS="attention model ..." runs only those parts (examples, golden, training, decode,
# generate, model, attention, tune), e.g. to spread the checks over several device calls.
set -uo pipefail
dir=${1:?usage: gpu-check.sh DIR [TOLERANCE]}
tolerance=${2:-1e-4}
bf16_tolerance=2e-2
run="$dir/zebra-run"
failed=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
# One JSON line: logits A against logits B for check NAME.
compare() {
    local result status
    result=$("$run" diff "$2" "$3" --tolerance "${4:-$tolerance}" 2>&1)
    status=$?
    echo "{\"example\": \"$1\", \"result\": $(echo "$result" | head -1)}"
    [ $status -eq 0 ] || failed=1
}
# Runs zebra-run with its arguments, for at most GPU_TIMEOUT seconds (default 120; a run
# takes seconds), so that a hang costs the device's time once.
gpu() {
    timeout "${GPU_TIMEOUT:-120}" "$run" "$@"
}
# Whether part NAME runs: those named in PARTS (default: all of them).
part() {
    [ -z "${PARTS:-}" ] || [[ " $PARTS " == *" $1 "* ]]
}
gpu_failed() {
    echo "{\"example\": \"$1\", \"ok\": false, \"error\": \"the GPU run failed\"}"
    failed=1
}
# Check NAME: a forward pass of EXAMPLE/VARIANT (with EXAMPLE's weights) on TOKENS, its
# logits (EXAMPLE/VARIANT-logits.npy) against REFERENCE within TOLERANCE; fails if the run
# does.
forward_check() {
    local name=$1 example=$2 variant=$3 tokens=$4 reference=$5 limit=${6:-$tolerance}
    if gpu forward "$example/$variant" --device cuda --weights "$example/weights.safetensors" \
        --tokens "$tokens" --output "$example/$variant-logits.npy"; then
        compare "$name" "$example/$variant-logits.npy" "$reference" "$limit"
    else
        gpu_failed "$name"
        return 1
    fi
}
if part examples; then
    for example in "$dir"/*/; do
        name=$(basename "$example")
        [ -f "$example/cpu-logits.npy" ] || continue
        forward_check "$name" "$example" gpu "$dir/tokens.npy" "$example/cpu-logits.npy" || continue
        forward_check "$name, bf16 tensor cores" "$example" gpu-bf16 "$dir/tokens.npy" \
            "$example/cpu-logits.npy" "$bf16_tolerance"
        if [ -d "$example/gpu-bf16-wgmma" ]; then
            forward_check "$name, bf16 tensor cores, wgmma attentions" "$example" gpu-bf16-wgmma \
                "$dir/tokens.npy" "$example/cpu-logits.npy" "$bf16_tolerance"
        fi
    done
fi
# The golden models against the logits Hugging Face transformers (PyTorch) computed.
if part golden; then
    for example in "$dir"/golden-*/; do
        name=$(basename "$example")
        forward_check "$name vs transformers" "$example" gpu "$example/tokens.npy" \
            "$example/hf-logits.npy"
        forward_check "$name, bf16 tensor cores, vs transformers" "$example" gpu-bf16 \
            "$example/tokens.npy" "$example/hf-logits.npy" "$bf16_tolerance"
    done
fi
# Five training steps on the GPU against the CPU's losses: f32 (within 10 x the tolerance,
# and the trained weights too), and bf16 on tensor cores (within the bf16 tolerance).
if part training; then
    for t in "$dir"/train-*/; do
        model=$(basename "$t" | sed 's/^train-//')
        for variant in gpu gpu-bf16 gpu-bf16-wgmma; do
            [ -d "$t/$variant" ] || continue
            name="training steps, $model"; limit=$(awk -v t="$tolerance" 'BEGIN {print t * 10}')
            if [ "$variant" = gpu-bf16 ]; then name="$name, bf16 tensor cores"; limit=$bf16_tolerance; fi
            if [ "$variant" = gpu-bf16-wgmma ]; then name="$name, bf16 tensor cores, wgmma attentions"; limit=$bf16_tolerance; fi
            if gpu train "$t/$variant" --device cuda --weights "$t/weights.safetensors" \
                --data "$t/corpus.txt" --steps 5 --seq-len 128 --batch 2 --lr 1e-3 \
                --out "$t/$variant-trained.safetensors" > "$t/$variant-losses.jsonl"; then
                losses() { grep -o '"loss":[^,]*' "$1" | cut -d: -f2; }
                worst=$(paste <(losses "$t/$variant-losses.jsonl") <(losses "$t/cpu-losses.jsonl") |
                    awk '{d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > w) w = r} END {print w + 0}')
                ok=$(awk -v w="$worst" -v t="$limit" 'BEGIN {print (w <= t) ? "true" : "false"}')
                echo "{\"example\": \"$name\", \"gpu\": [$(losses "$t/$variant-losses.jsonl" | paste -sd,)], \"cpu\": [$(losses "$t/cpu-losses.jsonl" | paste -sd,)], \"max_relative_diff\": $worst, \"ok\": $ok}"
                [ "$ok" = true ] || failed=1
                # The weights the GPU's optimizer left, against the CPU's (f32 only: bf16
                # rounding moves AdamW's sign-like first steps too much for a tight check).
                if [ "$variant" = gpu ]; then
                    compare "trained weights, $model" "$t/$variant-trained.safetensors" \
                        "$t/cpu-trained.safetensors" "$limit"
                fi
            else
                echo "{\"example\": \"$name\", \"ok\": false, \"error\": \"the GPU run failed\"}"
                failed=1
            fi
        done
    done
fi
# Teacher-forced decoding for one program per kind of KV cache: every step's logits.
if part decode; then
    for example in "$dir"/decode-*/; do
        name=$(basename "$example")
        if gpu decode "$example/gpu" --device cuda --weights "$example/weights.safetensors" \
            --tokens "$dir/tokens.npy" --prompt-len 40 --output "$example/gpu-decode-logits.npy"; then
            compare "$name" "$example/gpu-decode-logits.npy" "$example/cpu-decode-logits.npy"
        else
            gpu_failed "$name"
        fi
    done
fi
if part generate; then
    if [ -d "$dir/generate/gpu" ]; then
        # Teacher-forced decoding: every step's logits against the CPU's.
        if gpu decode "$dir/generate/gpu" --device cuda --weights "$dir/generate/weights.safetensors" \
            --tokens "$dir/tokens.npy" --prompt-len 40 --output "$dir/generate/gpu-decode-logits.npy"; then
            compare "decode steps" "$dir/generate/gpu-decode-logits.npy" "$dir/generate/cpu-decode-logits.npy"
        else
            gpu_failed "decode steps"
        fi
        if gpu decode "$dir/generate/gpu-bf16" --device cuda --weights "$dir/generate/weights.safetensors" \
            --tokens "$dir/tokens.npy" --prompt-len 40 --output "$dir/generate/gpu-bf16-decode-logits.npy"; then
            compare "decode steps, bf16 tensor cores" "$dir/generate/gpu-bf16-decode-logits.npy" "$dir/generate/cpu-decode-logits.npy" "$bf16_tolerance"
        else
            gpu_failed "decode steps, bf16 tensor cores"
        fi
        if gpu generate "$dir/generate/gpu" --device cuda --weights "$dir/generate/weights.safetensors" \
            --prompt "$(cat "$dir/generate/prompt.txt")" --max-tokens 200 --temperature 1 --seed 7 \
            > "$dir/generate/gpu.txt"; then
            if cmp -s "$dir/generate/gpu.txt" "$dir/generate/cpu.txt"; then
                echo '{"example": "sampled generation, 200 tokens, seed 7", "ok": true}'
            else
                echo '{"example": "sampled generation, 200 tokens, seed 7", "ok": false, "error": "the GPU wrote other tokens than the CPU"}'
                failed=1
            fi
        else
            echo '{"example": "sampled generation", "ok": false, "error": "the GPU run failed"}'
            failed=1
        fi
    fi
fi
# The forward benchmark: the median of 3 passes in f32 and in bf16, and their logits compared.
if part model; then
    if [ -d "$dir/model" ]; then
        for dtype in f32 bf16 bf16-wgmma; do
            [ -d "$dir/model/$dtype" ] || continue
            if ! GPU_TIMEOUT=300 gpu forward "$dir/model/$dtype" --device cuda --random-weights 1 \
                --tokens "$dir/model/tokens.npy" --output "$dir/model/$dtype-logits.npy" --repeat 3 --json; then
                gpu_failed "model benchmark, $dtype"
            fi
        done
        compare "model benchmark, bf16 against f32" "$dir/model/bf16-logits.npy" "$dir/model/f32-logits.npy" "$bf16_tolerance"
        if [ -d "$dir/model/bf16-wgmma" ]; then
            compare "model benchmark, bf16 with wgmma attentions against f32" \
                "$dir/model/bf16-wgmma-logits.npy" "$dir/model/f32-logits.npy" "$bf16_tolerance"
        fi
    fi
fi
# The decoding benchmark: 64 tokens (greedy, random weights) after a 4000-token prompt,
# bf16; zebra-run prints the decode steps' tokens per second.
if part model; then
    if [ -d "$dir/model/generate-bf16" ]; then
        prompt=$(yes "the herd walks along the river and eats grass while the sun sets over the wide plain." | head -c 4000)
        if ! GPU_TIMEOUT=300 gpu generate "$dir/model/generate-bf16" --device cuda --random-weights 1 \
            --prompt "$prompt" --max-tokens 64 --temperature 0 > /dev/null; then
            gpu_failed "decoding benchmark, bf16"
        fi
    fi
fi
# The training benchmark: three bf16 steps of the same model at T = 2048 (the recall task,
# random weights): one JSON line per step with its tokens per second.
if part model; then
    if [ -d "$dir/model/train-bf16" ]; then
        if ! GPU_TIMEOUT=300 gpu train "$dir/model/train-bf16" --device cuda --random-weights 1 \
            --steps 3 --seq-len 2048 --batch 1 --out "$dir/model/trained.safetensors"; then
            gpu_failed "training benchmark, bf16"
        fi
        rm -f "$dir/model/trained.safetensors"
    fi
fi
# The tensor-core attention kernels: checks, then the benchmark beside PyTorch.
if part attention; then
    if [ -d "$dir/attention" ]; then
        bash "$dir/gpu-attention.sh" "$dir" || failed=1
    fi
fi
# The tuning run of the benchmark shapes: every candidate timed and checked (DIR/tune/
# results.json, for `zebra tune --record DIR/tune` on the compiler's machine).
if part tune; then
    if [ -d "$dir/tune" ]; then
        timeout "${TUNE_TIMEOUT:-540}" "$run" tune "$dir/tune" --timeout 30 || failed=1
    fi
fi
exit $failed
