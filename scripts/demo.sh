#!/usr/bin/env bash
# The main job: train the tiny Zebra model on the built-in recall (passkey) task, beside a
# local-only and a full-attention model of the same size trained the same way; evaluate all
# three side by side at the training length and beyond; generate with each. Everything is
# written under runs/demo/ (replaced on every run).
#
# ZEBRA_DEMO_STEPS sets the training steps per model (default 300, about 75 s each on a
# 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."

zebra=target/release/zebra
model=examples/zebra_tiny.zb
out=runs/demo
steps=${ZEBRA_DEMO_STEPS:-300}

step() { printf '\n== %s\n' "$*"; }

rm -rf "$out"
mkdir -p "$out"

step "zebra check $model"
$zebra check "$model"

step "zebra compile $model --emit opt (the fused attention kernels and their tile schedules)"
$zebra compile "$model" --emit opt -o "$out/zebra_tiny.opt.zir"
grep '^  kernel @' "$out/zebra_tiny.opt.zir" | sed 's/, block_q.*//'

# The recall task: a key (an uppercase letter) and its value (a digit) planted at a random
# point of a sequence of lowercase filler; at the end the key again, and the model must
# answer the value. A sliding window of 32 keys cannot see it once it is further back.
train=(--task recall --pairs 1 --steps "$steps" --seq-len 64 --batch 32 --lr 1e-2 --seed 1)
for kind in zebra local global; do
    case $kind in
        zebra) extra=() ;;
        *) extra=(--every-layer "$kind") ;;
    esac
    step "zebra train $model ${extra[*]} ${train[*]} --out $out/$kind"
    $zebra train "$model" "${extra[@]}" "${train[@]}" --out "$out/$kind"
done

step "zebra eval $out/zebra $out/local $out/global --task recall --context 64 256 512"
$zebra eval "$out/zebra" "$out/local" "$out/global" --task recall --context 64 256 512 --samples 128

filler="the herd walks along the river and eats grass while the sun sets over the wide plain "
prompt="a zebra has stripes Q7 $filler$filler$filler$filler Q"
for kind in zebra local; do
    step "zebra generate $out/$kind --prompt \"a zebra has stripes Q7 ...(${#prompt} bytes)... Q\" --max-tokens 1 --temperature 0"
    answer=$($zebra generate "$out/$kind" --prompt "$prompt" --max-tokens 1 --temperature 0 | tail -c 2)
    echo "the key Q was planted $(( ${#prompt} - 21 )) bytes before the query, with value 7; $kind answers: $answer"
done

long=$(for _ in $(seq 1 45); do printf '%s' "$filler"; done)
for kind in zebra global; do
    step "zebra generate $out/$kind --prompt (${#long} bytes) --max-tokens 64 --stats"
    $zebra generate "$out/$kind" --prompt "$long" --max-tokens 64 --seed 1 --stats >/dev/null
done

printf '\nDone. Checkpoints: %s/{zebra,local,global}/checkpoints/; loss curves: %s/*/loss.svg\n' "$out" "$out"
