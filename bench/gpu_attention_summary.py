#!/usr/bin/env python3
"""Sums up the GPU attention benchmark (scripts/gpu-attention.sh runs it last).

Reads Zebra's lines (`{"variant": NAME, "result": {...}}`, one per kernel of each variant of
bench/gpu_attention.zb, as `zebra-run attention` printed them) and PyTorch's
(`{"name": "attention-local", "impl": "flex", "time_ms": ...}`, from torch_gpu_attention.py),
and prints one JSON line per attention: the fastest Zebra variant whose check passed, its
time beside PyTorch's, the ratios (PyTorch's time over Zebra's: above 1, Zebra is faster),
whether the target is met (global: at least 0.6x SDPA's flash backend; local: at least 1x
flex_attention with its block mask), and every variant, fastest first. Variants that failed
their check or did not run are listed with the reason and never chosen.

Usage: gpu_attention_summary.py ZEBRA.jsonl TORCH.jsonl
Only the standard library: it runs wherever the benchmark ran.
"""

import json
import sys

# Per attention of the benchmark: PyTorch's implementation the target compares with, and
# the ratio to reach.
TARGETS = {"global": ("sdpa-flash", 0.6), "local": ("flex", 1.0)}


def read_lines(path):
    """The JSON objects of a file of JSON lines; other lines (messages) are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def summarize(zebra, torch):
    """One summary per attention of TARGETS, from the records of both sides."""
    variants = {}
    # What a variant that did not run printed (zebra-run's errors, as gpu-attention.sh wraps
    # them), to say why.
    messages = {}
    for record in zebra:
        name, result = record.get("variant"), record.get("result")
        if name is None or not isinstance(result, dict):
            continue
        if "message" in result:
            messages.setdefault(name, []).append(str(result["message"]))
            continue
        kind = result.get("name")
        if kind in TARGETS:
            entry = {"variant": name, "time_ms": result.get("time_ms"), "ok": result.get("ok") is True}
            if not entry["ok"]:
                entry["why"] = result.get("error") or f"check failed (worst error {result.get('worst_error')})"
            variants.setdefault(kind, []).append(entry)
        elif result.get("ok") is False or "error" in result:
            # A variant that did not run says so once for both attentions.
            why = "; ".join([str(result.get("error") or "did not run")] + messages.get(name, []))
            for k in TARGETS:
                variants.setdefault(k, []).append({"variant": name, "time_ms": None, "ok": False, "why": why})
    theirs = {}
    for record in torch:
        name, impl, ms = record.get("name"), record.get("impl"), record.get("time_ms")
        if name and impl and isinstance(ms, (int, float)):
            theirs.setdefault(name.removeprefix("attention-"), {})[impl] = ms
    summaries = []
    for kind, (against, target) in TARGETS.items():
        runs = variants.get(kind, [])
        passed = sorted((r for r in runs if r["ok"] and isinstance(r["time_ms"], (int, float))), key=lambda r: r["time_ms"])
        failed = [r for r in runs if r not in passed]
        summary = {"summary": f"attention-{kind}", "against": against, "target": target}
        pytorch = theirs.get(kind, {})
        summary["pytorch_ms"] = pytorch
        if passed:
            best = passed[0]
            summary["best"] = best["variant"]
            summary["time_ms"] = best["time_ms"]
            summary["ratios"] = {impl: round(ms / best["time_ms"], 3) for impl, ms in sorted(pytorch.items())}
            ratio = summary["ratios"].get(against)
            summary["met"] = None if ratio is None else ratio >= target
        else:
            summary["best"] = None
            summary["met"] = False
        summary["variants"] = passed + failed
        summaries.append(summary)
    return summaries


def main(argv):
    if len(argv) != 3:
        print("usage: gpu_attention_summary.py ZEBRA.jsonl TORCH.jsonl", file=sys.stderr)
        return 2
    try:
        zebra, torch = read_lines(argv[1]), read_lines(argv[2])
    except OSError as e:
        print(f"gpu_attention_summary.py: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    for summary in summarize(zebra, torch):
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
