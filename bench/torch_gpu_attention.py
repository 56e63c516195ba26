#!/usr/bin/env python3
"""PyTorch's side of the GPU attention benchmark and check (scripts/gpu-check.sh runs it).

Benchmark (default): bf16, batch 1, the same shapes as `zebra-run attention` on
bench/gpu_attention.zb: the global causal attention through SDPA's flash backend and through
flex_attention, the local sliding-window attention through flex_attention with its block mask.
One JSON line each (name, impl, seq_len, heads, head_dim, time_ms, tflops), TFLOP/s counting
4 * head_dim FLOPs per visible score element, as zebra-run does.

Check (--compare DIR): DIR holds what `zebra-run attention --save DIR` wrote per kernel (q, k,
v, out and the mask of head 0, as f32 .npy); for each kernel without a score modifier, PyTorch
computes the attention in f32 from the same bf16 inputs with the same mask, and the line
reports Zebra's largest difference from it beside that of PyTorch's own bf16 SDPA.
"""

import argparse
import json
import os
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--compare", metavar="DIR", help="compare saved zebra-run outputs instead")
    p.add_argument("--artifact", metavar="DIR", help="the attention artifact of --compare (for the masks' heads)")
    return p.parse_args()


def timed(torch, fn, repeats):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def bench(args, torch):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t, h, d, w = args.seq_len, args.heads, args.head_dim, args.window
    device = torch.cuda.get_device_name(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    visible = {
        "attention-global": t * (t + 1) // 2 * h,
        "attention-local": sum(min(i + 1, w) for i in range(t)) * h,
    }

    def emit(name, impl, ms, error=None):
        record = {"name": name, "impl": impl, "device": device, "dtype": "bf16", "seq_len": t, "heads": h, "head_dim": d}
        if error is None:
            record["time_ms"] = ms
            record["tflops"] = visible[name] * 4 * d / (ms * 1e-3) / 1e12
        else:
            record["error"] = error
        print(json.dumps(record), flush=True)

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = timed(torch, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats)
        emit("attention-global", "sdpa-flash", ms)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        emit("attention-global", "sdpa-flash", None, str(e).splitlines()[0])
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)

        def causal(b, hh, qi, ki):
            return ki <= qi

        def local(b, hh, qi, ki):
            return (ki <= qi) & (qi - ki < w)

        for name, mask_mod in [("attention-global", causal), ("attention-local", local)]:
            block_mask = create_block_mask(mask_mod, None, None, t, t, device="cuda")
            ms = timed(torch, lambda: flex(q, k, v, block_mask=block_mask), args.repeats)
            emit(name, "flex", ms)
    except Exception as e:  # noqa: BLE001
        emit("attention-local", "flex", None, str(e).splitlines()[0])


def compare(args, torch):
    import numpy as np
    import torch.nn.functional as F

    scores = {}
    if args.artifact:
        with open(os.path.join(args.artifact, "attention.json")) as f:
            for kernel in json.load(f)["kernels"]:
                scores[kernel["name"]] = kernel
    failed = False
    for name in sorted(os.listdir(args.compare)):
        folder = os.path.join(args.compare, name)
        kernel = scores.get(name, {})
        if kernel.get("score") or "h" in kernel.get("mask", "") or kernel.get("sides"):
            print(json.dumps({"kernel": name, "skipped": "a score modifier, a per-head mask or side inputs: checked against zebra-run's f64 reference only"}))
            continue
        load = lambda n: torch.from_numpy(np.load(os.path.join(folder, n + ".npy"))).cuda()  # noqa: E731
        q, k, v, out, mask = load("q"), load("k"), load("v"), load("out"), load("mask") > 0.5
        heads, kv_heads = q.shape[1], k.shape[1]
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        scale = kernel.get("scale", 1.0 / q.shape[-1] ** 0.5)
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        # Rows that see no key: PyTorch gives NaN, Zebra zeros (its convention).
        empty = ~mask.any(dim=-1)
        reference = torch.where(empty[None, None, :, None], torch.zeros_like(reference), reference)
        torch_bf16 = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, scale=scale).float()
        torch_bf16 = torch.where(empty[None, None, :, None], torch.zeros_like(torch_bf16), torch_bf16)
        zebra_error = (out - reference).abs().max().item()
        torch_error = (torch_bf16 - reference).abs().max().item()
        ok = zebra_error <= max(2.0 * torch_error, 1e-2)
        failed |= not ok
        print(json.dumps({"kernel": name, "max_abs_diff_vs_torch_f32": zebra_error, "torch_bf16_max_abs_diff": torch_error, "ok": ok}))
    return failed


def main():
    args = parse_args()
    try:
        import torch
    except ImportError:
        print(json.dumps({"skipped": "PyTorch is not installed"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "PyTorch sees no GPU"}))
        return 0
    if args.compare:
        return 1 if compare(args, torch) else 0
    bench(args, torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
