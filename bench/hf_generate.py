"""Hugging Face transformers' generation speed on the CPU, for `scripts/bench-generate.sh`:
a Llama of CONFIG (random weights) prefills PROMPT random byte tokens (the logits of the last
only, as transformers' generate() does), then decodes TOKENS greedily with its KV cache, one
token a step; the best of three runs, as JSON.

Usage: python bench/hf_generate.py CONFIG PROMPT TOKENS THREADS
"""

import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    config_path, prompt_len, tokens, threads = sys.argv[1], *map(int, sys.argv[2:5])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    settings = json.load(open(config_path))
    settings.pop("architectures", None)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    prompt = torch.randint(0, 256, (1, prompt_len))
    best = None
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            # As transformers' own generate(): the prompt's last logits only.
            out = model(prompt, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - start
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode = time.perf_counter() - start
            if best is None or prefill + decode < best[0] + best[1]:
                best = (prefill, decode)
    prefill, decode = best
    print(json.dumps({
        "name": "transformers",
        "prompt_tokens": prompt_len,
        "prefill_tokens_per_s": prompt_len / prefill,
        "decode_tokens_per_s": (tokens - 1) / decode,
        "threads": threads,
        "versions": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
    }))


if __name__ == "__main__":
    main()
