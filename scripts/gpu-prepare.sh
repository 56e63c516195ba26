#!/usr/bin/env bash
# Prepares a GPU check on this machine (which has the compiler) for a GPU machine (which
# needs nothing but its driver): the runtime-only binary, each example compiled for the GPU,
# its weights and tokens, and the CPU's logits to compare with; also packed as DIR.tar.gz.
# Then, on the GPU machine (after `tar xzf DIR.tar.gz` where only the archive was copied):
#   DIR/gpu-check.sh DIR
# Usage: scripts/gpu-prepare.sh [DIR] [sm_90|sm_80]   (default target/gpu-check, sm_90)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/gpu-check}
sm=${2:-sm_90}
cargo build --release --bin zebra
cargo build --profile dist -p zebra-run
zebra=target/release/zebra
# The kernels as the compiler chooses them by default: no tuning database's settings.
export ZEBRA_TUNING_DB=
rm -rf "$out"
mkdir -p "$out"
cp target/dist/zebra-run "$out/"
cp scripts/gpu-check.sh "$out/"
$zebra encode "A zebra model attends globally in one layer of each group and locally in the others; the rest of this prompt is filler to pass a few tiles of 64 positions: the herd walks along the river and eats grass while the sun sets over the wide plain." -o "$out/tokens.npy"
for file in examples/zebra_tiny.zb examples/attention/*.zb; do
    name=$(basename "$file" .zb)
    [ "$name" = document ] && continue   # needs a side input
    mkdir -p "$out/$name"
    $zebra init "$file" --seed 1 -o "$out/$name/weights.safetensors" >/dev/null
    $zebra compile "$file" --emit artifact --target "$sm" --max-seq-len 1024 -o "$out/$name/gpu" >/dev/null
    $zebra compile "$file" --emit artifact --target "$sm" --dtype bf16 --max-seq-len 1024 -o "$out/$name/gpu-bf16" >/dev/null
    if [ "$sm" = sm_90 ] && [ "$name" = zebra_tiny ]; then
        # Its attentions on wgmma (--mma wgmma: PTX for sm_90a).
        $zebra compile "$file" --emit artifact --target "$sm" --dtype bf16 --mma wgmma --max-seq-len 1024 -o "$out/$name/gpu-bf16-wgmma" >/dev/null
    fi
    $zebra run "$file" --weights "$out/$name/weights.safetensors" --tokens "$out/tokens.npy" \
        --output "$out/$name/cpu-logits.npy" >/dev/null
    echo "prepared $name"
done
# The golden models: logits that PyTorch (Hugging Face transformers) computed, to compare the
# GPU's with directly.
# (The scaled RoPEs and the Qwens were computed on 160 tokens, the Qwens on the weights
# with biases and QK-norm scales: tests/fixtures/golden/README.md.)
for file in tests/fixtures/golden/*.zb; do
    base=$(basename "$file" .zb)
    name=golden-$base
    tokens=tokens.npy
    weights=tiny_llama.safetensors
    case $base in rope_* | qwen*) tokens=tokens_160.npy ;; esac
    case $base in qwen*) weights=tiny_qwen.safetensors ;; esac
    mkdir -p "$out/$name"
    $zebra compile "$file" --emit artifact --target "$sm" --max-seq-len 256 -o "$out/$name/gpu" >/dev/null
    $zebra compile "$file" --emit artifact --target "$sm" --dtype bf16 --max-seq-len 256 -o "$out/$name/gpu-bf16" >/dev/null
    cp "tests/fixtures/golden/$weights" "$out/$name/weights.safetensors"
    cp "tests/fixtures/golden/$tokens" "$out/$name/tokens.npy"
    cp "tests/fixtures/golden/logits_$base.npy" "$out/$name/hf-logits.npy"
done
echo "prepared golden"

# Training steps: the same five steps on the GPU must give the CPU's losses, for zebra_tiny
# and for attentions whose backward needs more (a score modifier's derivative, ALiBi's
# per-head bias with GQA).
for file in examples/zebra_tiny.zb examples/attention/softcap.zb examples/attention/alibi.zb; do
    d="$out/train-$(basename "$file" .zb)"
    mkdir -p "$d"
    cp README.md "$d/corpus.txt"
    $zebra init "$file" --seed 3 -o "$d/weights.safetensors" >/dev/null
    $zebra compile "$file" --emit artifact --for train --target "$sm" --max-seq-len 256 -o "$d/gpu" >/dev/null
    $zebra compile "$file" --emit artifact --for train --target "$sm" --dtype bf16 --max-seq-len 256 -o "$d/gpu-bf16" >/dev/null
    if [ "$sm" = sm_90 ] && [ "$(basename "$file")" = zebra_tiny.zb ]; then
        $zebra compile "$file" --emit artifact --for train --target "$sm" --dtype bf16 --mma wgmma --max-seq-len 256 -o "$d/gpu-bf16-wgmma" >/dev/null
    fi
    $zebra compile "$file" --emit artifact --for train --max-seq-len 256 -o "$d/cpu" >/dev/null
    target/dist/zebra-run train "$d/cpu" --weights "$d/weights.safetensors" \
        --data "$d/corpus.txt" --steps 5 --seq-len 128 --batch 2 --lr 1e-3 \
        --out "$d/cpu-trained.safetensors" > "$d/cpu-losses.jsonl"
    rm -rf "$d/cpu"
done
echo "prepared training"

# Generation: sampling with a seed on the GPU must write what the CPU writes (200 tokens,
# past several wraps of the rings of 32).
mkdir -p "$out/generate"
$zebra init examples/zebra_tiny.zb --seed 4 -o "$out/generate/weights.safetensors" >/dev/null
$zebra compile examples/zebra_tiny.zb --emit artifact --for generate --target "$sm" --max-seq-len 512 -o "$out/generate/gpu" >/dev/null
$zebra compile examples/zebra_tiny.zb --emit artifact --for generate --target "$sm" --dtype bf16 --max-seq-len 512 -o "$out/generate/gpu-bf16" >/dev/null
$zebra compile examples/zebra_tiny.zb --emit artifact --for generate --max-seq-len 512 -o "$out/generate/cpu" >/dev/null
printf '%s' "the herd walks along the river and eats grass while the sun sets over the wide plain" > "$out/generate/prompt.txt"
target/dist/zebra-run generate "$out/generate/cpu" --weights "$out/generate/weights.safetensors" \
    --prompt "$(cat "$out/generate/prompt.txt")" --max-tokens 200 --temperature 1 --seed 7 2>/dev/null > "$out/generate/cpu.txt"
target/dist/zebra-run decode "$out/generate/cpu" --weights "$out/generate/weights.safetensors" \
    --tokens "$out/tokens.npy" --prompt-len 40 --output "$out/generate/cpu-decode-logits.npy"
rm -rf "$out/generate/cpu"
# Decode steps for each kind of KV cache: every key, a ring, sinks and a ring.
for name in causal sliding_window sinks; do
    d="$out/decode-$name"
    mkdir -p "$d"
    $zebra init "examples/attention/$name.zb" --seed 5 -o "$d/weights.safetensors" >/dev/null
    $zebra compile "examples/attention/$name.zb" --emit artifact --for generate --target "$sm" --max-seq-len 512 -o "$d/gpu" >/dev/null
    $zebra compile "examples/attention/$name.zb" --emit artifact --for generate --max-seq-len 512 -o "$d/cpu" >/dev/null
    target/dist/zebra-run decode "$d/cpu" --weights "$d/weights.safetensors" --tokens "$out/tokens.npy" --prompt-len 40 --output "$d/cpu-decode-logits.npy"
    rm -rf "$d/cpu"
done
echo "prepared generation"

# The forward benchmark: a 492M-parameter Zebra model at T = 4096, in f32 and in bf16 on
# tensor cores (random weights, made on the GPU machine: they are too large to carry).
mkdir -p "$out/model"
$zebra compile bench/gpu_model.zb --emit artifact --target "$sm" --max-seq-len 4096 -o "$out/model/f32" >/dev/null
$zebra compile bench/gpu_model.zb --emit artifact --target "$sm" --dtype bf16 --max-seq-len 4096 -o "$out/model/bf16" >/dev/null
if [ "$sm" = sm_90 ]; then
    # The same with its attentions on wgmma.
    $zebra compile bench/gpu_model.zb --emit artifact --target "$sm" --dtype bf16 --mma wgmma --max-seq-len 4096 -o "$out/model/bf16-wgmma" >/dev/null
fi
# Its decoding in bf16 after a 4000-token prompt (tokens per second; the decode steps'
# attentions on the block-per-KV-head kernel).
$zebra compile bench/gpu_model.zb --emit artifact --for generate --target "$sm" --dtype bf16 --max-seq-len 4160 -o "$out/model/generate-bf16" >/dev/null
# Its training step in bf16 (projections, attention and its backward on tensor cores).
$zebra compile bench/gpu_model.zb --emit artifact --for train --target "$sm" --dtype bf16 --max-seq-len 2048 -o "$out/model/train-bf16" >/dev/null
python3 - "$out/model/tokens.npy" <<'PY'
import struct, sys
# [1, 4096] int64 tokens, as .npy (no numpy needed).
header = "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 4096), }"
header += " " * (63 - (10 + len(header)) % 64) + "\n"
with open(sys.argv[1], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    f.write(b"".join(struct.pack("<q", (i * 7919) % 32000) for i in range(4096)))
PY
echo "prepared the model benchmark"

# Tensor-core attention kernels: every example's, one in f16, and the benchmark shapes.
cp scripts/gpu-attention.sh bench/torch_gpu_attention.py bench/gpu_attention_summary.py "$out/"
for file in examples/zebra_tiny.zb examples/attention/*.zb examples/models/*.zb bench/gpu_attention.zb; do
    name=$(basename "$file" .zb)
    [ "$name" = gpu_attention ] && name=bench
    $zebra compile "$file" --for attention --emit artifact --target "$sm" -o "$out/attention/$name" >/dev/null
done
$zebra compile examples/zebra_tiny.zb --for attention --dtype f16 --emit artifact --target "$sm" -o "$out/attention/zebra_tiny_f16" >/dev/null
# The benchmark shapes again with other kernels, to compare: 64 queries per tile on
# mma.sync (by 64 and by 32 keys); on sm_90, wgmma (two warpgroups, V read in place, 64
# and 128 keys per tile; one warpgroup, by 64 and by 32 keys; V transposed first).
$zebra compile bench/gpu_attention.zb --for attention --block-q 64 --emit artifact --target "$sm" -o "$out/attention/bench_bq64" >/dev/null
# 64 queries by 32 keys: 162 registers, three blocks a multiprocessor, and 94% or more of
# what the window's tiles compute visible.
$zebra compile bench/gpu_attention.zb --for attention --block-q 64 --block-k 32 --emit artifact --target "$sm" -o "$out/attention/bench_bq64_bk32" >/dev/null
if [ "$sm" = sm_90 ]; then
    # Every example's attentions on wgmma too, checked like the others.
    for file in examples/zebra_tiny.zb examples/attention/*.zb examples/models/*.zb; do
        name=$(basename "$file" .zb)
        $zebra compile "$file" --for attention --mma wgmma --emit artifact --target "$sm" -o "$out/attention/${name}_wgmma" >/dev/null
    done
    $zebra compile examples/zebra_tiny.zb --for attention --mma wgmma-vt --emit artifact --target "$sm" -o "$out/attention/zebra_tiny_wgmma_vt" >/dev/null
    $zebra compile examples/zebra_tiny.zb --for attention --mma wgmma --block-q 64 --emit artifact --target "$sm" -o "$out/attention/zebra_tiny_wgmma_bq64" >/dev/null
    $zebra compile bench/gpu_attention.zb --for attention --mma wgmma --emit artifact --target "$sm" -o "$out/attention/bench_wgmma" >/dev/null
    $zebra compile bench/gpu_attention.zb --for attention --mma wgmma --block-k 128 --emit artifact --target "$sm" -o "$out/attention/bench_wgmma_bk128" >/dev/null
    $zebra compile bench/gpu_attention.zb --for attention --mma wgmma --block-q 64 --emit artifact --target "$sm" -o "$out/attention/bench_wgmma_bq64" >/dev/null
    # One warpgroup by 32 keys: 152 registers and 48 KiB of shared memory, so three blocks a
    # multiprocessor, each a warpgroup on its own (no barrier ties one to another).
    $zebra compile bench/gpu_attention.zb --for attention --mma wgmma --block-q 64 --block-k 32 --emit artifact --target "$sm" -o "$out/attention/bench_wgmma_bq64_bk32" >/dev/null
    $zebra compile bench/gpu_attention.zb --for attention --mma wgmma-vt --emit artifact --target "$sm" -o "$out/attention/bench_wgmma_vt" >/dev/null
fi
echo "prepared attention"
# A tuning run of the benchmark shapes' attentions (every candidate setting of their kernels),
# for `zebra-run tune DIR/tune` there (gpu-check.sh's part `tune`); its results.json, brought
# back into DIR/tune here, is recorded with `zebra tune --record DIR/tune`.
$zebra tune bench/gpu_attention.zb --target "$sm" --seq-len 16384 --repeats 20 -o "$out/tune" >/dev/null
echo "prepared a tuning run"
du -sh "$out"
# The same as one compressed file (PTX compresses about threefold), for a device run, which
# carries at most 64 MiB of the working tree: there, `tar xzf DIR.tar.gz -C PARENT` first.
tar czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
du -sh "$out.tar.gz"
if [ "$(du -sb "$out.tar.gz" | cut -f1)" -gt $((64 * 1024 * 1024)) ]; then
    echo "warning: $out.tar.gz is over 64 MiB, more than a device run carries" >&2
fi
