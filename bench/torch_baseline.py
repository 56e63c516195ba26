#!/usr/bin/env python3
"""PyTorch baselines for `zebra bench`: the same attention shapes through SDPA and
flex_attention, printed as the same JSON lines (name, impl, seq_len, threads, time_ms, gflops).

GFLOP/s count only visible (unmasked) score elements, 4 * head_dim FLOPs each, exactly as
`zebra bench` does, so the two outputs compare line by line.

Set up once (PyTorch is only needed for benchmarking, never by Zebra itself):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch numpy
    .venv-bench/bin/python bench/torch_baseline.py --seq-len 8192 --threads 2

Benchmarks (all by default): attention-local (flex_attention with a sliding-window block mask,
and SDPA with the dense window mask), attention-global (SDPA causal, flex_attention causal),
matmul (an f32 [T, 4096] x [4096, 4096] product: the machine's practical FMA rate).
"""

import argparse
import json
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=["attention-local", "attention-global", "matmul"])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (it compiles with inductor)")
    return p.parse_args()


def visible_local(t, w):
    # Keys k with k <= q and q - k < w: min(q + 1, w) per query.
    return sum(min(q + 1, w) for q in range(t))


def visible_global(t):
    return t * (t + 1) // 2


def timed(fn, repeats):
    fn()  # warm-up (and compilation, for flex_attention)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def emit(args, name, impl, time_ms, flops, **extra):
    record = {
        "name": name,
        "impl": impl,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "time_ms": time_ms,
        "gflops": flops / (time_ms * 1e-3) / 1e9,
    }
    record.update(extra)
    print(json.dumps(record), flush=True)


def main():
    args = parse_args()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t, h, d, w = args.seq_len, args.heads, args.head_dim, args.window
    q, k, v = (torch.rand(1, h, t, d) * 2 - 1 for _ in range(3))
    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = (torch.compile(flex_attention), create_block_mask)
        except Exception as error:  # an old PyTorch: report and go on with SDPA
            print(f"flex_attention unavailable: {error}", file=sys.stderr)

    with torch.no_grad():
        if "attention-local" in args.names:
            flops = 4.0 * d * h * visible_local(t, w)
            if flex is not None:
                compiled, create_block_mask = flex

                def window(b, hh, qi, ki):
                    return (ki <= qi) & (qi - ki < w)

                block_mask = create_block_mask(window, None, None, t, t, device="cpu")
                ms = timed(lambda: compiled(q, k, v, block_mask=block_mask), args.repeats)
                emit(args, "attention-local", "torch flex_attention (block mask)", ms, flops, window=w)
            qi = torch.arange(t)[:, None]
            ki = torch.arange(t)[None, :]
            dense = (ki <= qi) & (qi - ki < w)
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), args.repeats)
            emit(args, "attention-local", "torch sdpa (dense window mask)", ms, flops, window=w)
        if "attention-global" in args.names:
            flops = 4.0 * d * h * visible_global(t)
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats)
            emit(args, "attention-global", "torch sdpa (causal)", ms, flops)
            if flex is not None:
                compiled, create_block_mask = flex

                def causal(b, hh, qi, ki):
                    return ki <= qi

                block_mask = create_block_mask(causal, None, None, t, t, device="cpu")
                ms = timed(lambda: compiled(q, k, v, block_mask=block_mask), args.repeats)
                emit(args, "attention-global", "torch flex_attention (block mask)", ms, flops)
        if "matmul" in args.names:
            a = torch.rand(t, 4096)
            b = torch.rand(4096, 4096)
            ms = timed(lambda: a @ b, args.repeats)
            emit(args, "matmul", "torch matmul (f32)", ms, 2.0 * t * 4096 * 4096)


if __name__ == "__main__":
    main()
