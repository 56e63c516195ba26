#!/usr/bin/env bash
# Generation on the CPU of a model imported from a Hugging Face configuration (random
# weights), beside Hugging Face transformers on the same configuration: a prompt of PROMPT
# tokens prefilled, then TOKENS greedy decode steps against the KV cache; the best of three
# runs each, one JSON line each. Compiling is not timed (the kernel cache is warmed first).
# Usage: scripts/bench-generate.sh [PYTHON]   (PYTHON with torch and transformers; without
# it only Zebra runs). CONFIG (default bench/smollm/config.json: SmolLM-135M's shape),
# PROMPT (400), TOKENS (64) and THREADS (every core) change the run.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${CONFIG:-bench/smollm/config.json}
prompt_len=${PROMPT:-400}
tokens=${TOKENS:-64}
threads=${THREADS:-$(nproc)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet --bin zebra
zebra=target/release/zebra
"$zebra" import "$config" --name bench -o "$work/model.zb" 2>/dev/null
"$zebra" init "$work/model.zb" -o "$work/model.safetensors" >/dev/null
# The prompt: letters and spaces of this README (bytes as tokens), the same every run.
prompt=$(LC_ALL=C tr -dc 'a-z ' <README.md | head -c "$prompt_len" || true)
best_prefill=0 best_decode=0
for run in 0 1 2 3; do
    "$zebra" generate "$work/model.safetensors" --model-file "$work/model.zb" \
        --prompt "$prompt" --max-tokens "$tokens" --temperature 0 --threads "$threads" \
        --stats >/dev/null 2>"$work/stats"
    [ "$run" -eq 0 ] && continue # compiles the kernels
    prefill=$(sed -n 's/^prefill .*(\([0-9.]*\) tokens\/s)$/\1/p' "$work/stats")
    decode=$(sed -n 's/^decode .*(\([0-9.]*\) tokens\/s)$/\1/p' "$work/stats")
    if awk "BEGIN { exit !($prefill + 0 > $best_prefill + 0) }"; then best_prefill=$prefill; fi
    if awk "BEGIN { exit !($decode + 0 > $best_decode + 0) }"; then best_decode=$decode; fi
done
printf '{"name": "zebra", "prompt_tokens": %s, "prefill_tokens_per_s": %s, "decode_tokens_per_s": %s, "threads": %s}\n' \
    "$prompt_len" "$best_prefill" "$best_decode" "$threads"
if [ $# -ge 1 ]; then
    "$1" bench/hf_generate.py "$config" "$prompt_len" "$tokens" "$threads" 2>/dev/null
fi
