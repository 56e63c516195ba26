#!/usr/bin/env bash
# The main job: check the bundled Zebra model, compile it to the graph IR, give it weights,
# and run a prompt through the reference interpreter. Writes everything under runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

zebra=target/release/zebra
model=examples/zebra_tiny.zb
out=runs/demo
mkdir -p "$out"

step() { printf '\n== %s\n' "$*"; }

step "zebra check $model"
$zebra check "$model"

step "zebra compile $model --emit ir -o $out/zebra_tiny.zir"
$zebra compile "$model" --emit ir -o "$out/zebra_tiny.zir"
nodes=$(grep -c ' = ' "$out/zebra_tiny.zir")
masks=$(grep -o 'mask {expr = "[^"]*"}' "$out/zebra_tiny.zir" | sort | uniq -c | sed 's/^ */  /')
echo "graph IR: $nodes nodes; the attention masks:"
echo "$masks"

step "zebra init $model --seed 0 -o $out/weights.safetensors"
$zebra init "$model" --seed 0 -o "$out/weights.safetensors"

prompt="A zebra model attends globally in one layer of each group and locally in the others."
step "zebra encode \"$prompt\" -o $out/tokens.npy"
$zebra encode "$prompt" -o "$out/tokens.npy"

step "zebra run $model --weights $out/weights.safetensors --tokens $out/tokens.npy --output $out/logits.npy"
$zebra run "$model" --weights "$out/weights.safetensors" --tokens "$out/tokens.npy" --output "$out/logits.npy"

printf '\nDone. The IR, weights, tokens and logits are in %s/.\n' "$out"
