#!/usr/bin/env python3
"""PyTorch baselines for `zebra bench`: the same attention shapes through SDPA and
flex_attention, printed as the same JSON lines (name, impl, seq_len, threads, time_ms, gflops).

GFLOP/s count only visible (unmasked) score elements, 4 * head_dim FLOPs each, exactly as
`zebra bench` does, so the two outputs compare line by line.

Set up once (PyTorch is only needed for benchmarking, never by Zebra itself):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch numpy
    .venv-bench/bin/python bench/torch_baseline.py --seq-len 8192 --threads 2

Benchmarks (the first three by default): attention-local (flex_attention with a
sliding-window block mask, and SDPA with the dense window mask), attention-global (SDPA
causal, flex_attention causal), attention-per-head (windows of W, W/2, W/4 and W/8 keys by
head h % 4: flex_attention with a per-head block mask, SDPA with the dense per-head mask),
matmul (an f32 [T, 4096] x [4096, 4096] product: the
machine's practical FMA rate), train-zebra (training steps of examples/zebra_tiny.zb in
PyTorch eager: the same layers, GQA, RoPE, SwiGLU, tied embeddings, AdamW; global layers
through SDPA causal, local ones through SDPA with the window mask; --seq-len x --batch
tokens per step, reported in tokens per second).
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
    p.add_argument("--batch", type=int, default=4, help="sequences per training step")
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (it compiles with inductor)")
    return p.parse_args()


def visible_local(t, w):
    # Keys k with k <= q and q - k < w: min(q + 1, w) per query.
    return sum(min(q + 1, w) for q in range(t))


def per_head_windows(w, h):
    # Zebra's attention-per-head: windows of w >> (head % 4) keys.
    return [w >> (i % 4) for i in range(h)]


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


def train_zebra_tiny(args):
    """Training steps of zebra_tiny (examples/zebra_tiny.zb) in PyTorch eager."""
    import torch
    import torch.nn.functional as F

    vocab, dim, heads, kv_heads, head_dim, hidden = 256, 64, 4, 2, 16, 176
    layers, group, window, eps = 8, 4, 32, 1e-5

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    class Layer(torch.nn.Module):
        def __init__(self, is_global):
            super().__init__()
            self.is_global = is_global
            linear = lambda i, o: torch.nn.Linear(i, o, bias=False)
            self.q, self.k, self.v = linear(dim, heads * head_dim), linear(dim, kv_heads * head_dim), linear(dim, kv_heads * head_dim)
            self.o = linear(heads * head_dim, dim)
            self.gate, self.up, self.down = linear(dim, hidden), linear(dim, hidden), linear(hidden, dim)
            self.norm1 = torch.nn.Parameter(torch.ones(dim))
            self.norm2 = torch.nn.Parameter(torch.ones(dim))

        def forward(self, x, cos, sin, window_mask):
            b, t, _ = x.shape
            h = rms(x, self.norm1)
            q = self.q(h).view(b, t, heads, head_dim).transpose(1, 2)
            k = self.k(h).view(b, t, kv_heads, head_dim).transpose(1, 2)
            v = self.v(h).view(b, t, kv_heads, head_dim).transpose(1, 2)

            def rope(z):
                z1, z2 = z[..., : head_dim // 2], z[..., head_dim // 2 :]
                return z * cos + torch.cat([-z2, z1], -1) * sin

            q, k = rope(q), rope(k)
            k = k.repeat_interleave(heads // kv_heads, 1)
            v = v.repeat_interleave(heads // kv_heads, 1)
            if self.is_global:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, heads * head_dim))
            h = rms(x, self.norm2)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, dim)
            self.layers = torch.nn.ModuleList([Layer(i % group == 0) for i in range(layers)])
            self.norm = torch.nn.Parameter(torch.ones(dim))

        def forward(self, ids):
            t = ids.shape[1]
            pos = torch.arange(t)[:, None]
            angle = pos * 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)
            angle = torch.cat([angle, angle], -1)
            cos, sin = angle.cos(), angle.sin()
            qi, ki = torch.arange(t)[:, None], torch.arange(t)[None, :]
            window_mask = (ki <= qi) & (qi - ki < window)
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x, cos, sin, window_mask)
            return rms(x, self.norm) @ self.embed.weight.T

    model = Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    t, b = args.seq_len, args.batch
    ids = torch.randint(0, vocab, (b, t + 1))

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    ms = timed(step, args.repeats)
    print(json.dumps({
        "name": "train-zebra",
        "impl": "torch eager (SDPA, AdamW)",
        "seq_len": t,
        "batch": b,
        "threads": args.threads,
        "time_ms": ms,
        "tokens_per_s": b * t / (ms * 1e-3),
    }), flush=True)


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

    if "train-zebra" in args.names:
        train_zebra_tiny(args)
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
        if "attention-per-head" in args.names:
            spans = per_head_windows(w, h)
            flops = 4.0 * d * sum(visible_local(t, s) for s in spans)
            windows = torch.tensor(spans)
            if flex is not None:
                compiled, create_block_mask = flex

                def per_head(b, hh, qi, ki):
                    # A shift, not `windows[hh]`: PyTorch 2.15's CPU flex_attention fails to
                    # compile a mask that indexes a captured tensor.
                    return (ki <= qi) & (qi - ki < (w >> (hh % 4)))

                block_mask = create_block_mask(per_head, None, h, t, t, device="cpu")
                ms = timed(lambda: compiled(q, k, v, block_mask=block_mask), args.repeats)
                emit(args, "attention-per-head", "torch flex_attention (per-head block mask)", ms, flops, window=w)
            qi = torch.arange(t)[None, :, None]
            ki = torch.arange(t)[None, None, :]
            dense = (ki <= qi) & (qi - ki < windows[:, None, None])
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), args.repeats)
            emit(args, "attention-per-head", "torch sdpa (dense per-head mask)", ms, flops, window=w)
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
