"""Golden logits from Hugging Face transformers (eager attention, float64) on the golden tiny
Llama's weights, for what `zebra import` reads beyond a plain Llama: each RoPE scaling Zebra
computes (linear, llama3, yarn) on LlamaForCausalLM, SmolLM3's NoPE layer with a sliding
window, Ministral's interleaved sliding and full layers (`layer_types`), Qwen2's Q, K and V
biases (with a sliding layer) and Qwen3's QK-norm (with biases on all four projections).
Writes tests/fixtures/golden/{tokens_160,logits_rope_*,logits_smollm3,logits_ministral,
logits_qwen2,logits_qwen3}.npy and tiny_qwen.safetensors (the tiny Llama's weights plus
random biases and QK-norm scales).

    .venv-bench/bin/pip install torch numpy transformers safetensors
    .venv-bench/bin/python scripts/golden_transformers.py
"""

import pathlib

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/golden"

# The golden tiny Llama's shape (tests/fixtures/golden/README.md).
SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attn_implementation="eager",
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

SCALINGS = {
    # Every frequency divided by 4.
    "linear": {"rope_type": "linear", "factor": 4.0},
    # Head dim 8 has wavelengths 6.3, 63, 628 and 6283: one kept (below 200 / 4), one
    # blended, two divided by 8 (above 200).
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 200,
    },
    # The ramp runs over pairs 0 to 2: pair 0 kept, pair 1 half, pairs 2 and 3 divided; cos
    # and sin multiplied by 0.1 ln 4 + 1.
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def logits(model, weights, tokens, name, unused=()):
    model = model.double().eval()
    missing, unexpected = model.load_state_dict(
        {k: v.double() for k, v in weights.items()}, strict=False
    )
    assert all(any(u in k for u in unused) for k in unexpected), unexpected
    assert all("rotary" in m for m in missing), missing
    with torch.no_grad():
        out = model(tokens).logits
    np.save(GOLDEN / f"logits_{name}.npy", out.numpy())


def main():
    tokens = torch.randint(0, 64, (1, 160), generator=torch.Generator().manual_seed(160))
    np.save(GOLDEN / "tokens_160.npy", tokens.numpy().astype(np.int64))
    weights = load_file(str(GOLDEN / "tiny_llama.safetensors"))
    for name, scaling in SCALINGS.items():
        config = LlamaConfig(
            **SHAPE,
            head_dim=8,
            # YaRN's context: its original one times its factor.
            max_position_embeddings=256 if name == "yarn" else 1024,
            rope_parameters={"rope_theta": 10000.0, **scaling},
        )
        model = LlamaForCausalLM(config)
        logits(model, weights, tokens, f"rope_{name}")
        print(name, model.model.rotary_emb.inv_freq.tolist(), model.model.rotary_emb.attention_scaling)
    # SmolLM3: every second layer without RoPE (layer 1), and that layer a window of 4.
    smollm3 = SmolLM3Config(
        **SHAPE,
        max_position_embeddings=1024,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        no_rope_layer_interval=2,
        use_sliding_window=True,
        sliding_window=4,
    )
    print("smollm3", smollm3.no_rope_layers, smollm3.layer_types)
    logits(SmolLM3ForCausalLM(smollm3), weights, tokens, "smollm3")
    # Ministral: layer 0 a window of 4, layer 1 full.
    ministral = MinistralConfig(
        **SHAPE,
        head_dim=8,
        max_position_embeddings=1024,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    )
    logits(MinistralForCausalLM(ministral), weights, tokens, "ministral")

    # Biases on the four projections and QK-norm scales, drawn once for both Qwens.
    generator = torch.Generator().manual_seed(2)
    qwen = dict(weights)
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}.self_attn"
        for proj, size in [("q", 32), ("k", 16), ("v", 16), ("o", 32)]:
            qwen[f"{p}.{proj}_proj.bias"] = 0.5 * torch.randn(size, generator=generator)
        for norm in ["q_norm", "k_norm"]:
            qwen[f"{p}.{norm}.weight"] = 1.0 + 0.3 * torch.randn(8, generator=generator)
    save_file({k: v.float().contiguous() for k, v in qwen.items()},
              str(GOLDEN / "tiny_qwen.safetensors"))
    # Qwen2: biases on Q, K and V; layer 1 (from `max_window_layers` on) a window of 4.
    qwen2 = Qwen2Config(
        **SHAPE,
        max_position_embeddings=1024,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    print("qwen2", qwen2.layer_types)
    logits(Qwen2ForCausalLM(qwen2), qwen, tokens, "qwen2", unused=("o_proj.bias", "_norm."))
    # Qwen3: QK-norm, and biases on all four projections (`attention_bias`).
    qwen3 = Qwen3Config(
        **SHAPE,
        head_dim=8,
        max_position_embeddings=1024,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        attention_bias=True,
    )
    logits(Qwen3ForCausalLM(qwen3), qwen, tokens, "qwen3")


if __name__ == "__main__":
    main()
