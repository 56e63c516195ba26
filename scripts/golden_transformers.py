"""Golden logits from Hugging Face transformers (eager attention, float64) on the golden tiny
Llama's weights, for what `zebra import` reads beyond a plain Llama: each RoPE scaling Zebra
computes (linear, llama3, yarn) on LlamaForCausalLM, SmolLM3's NoPE layer with a sliding
window, and Ministral's interleaved sliding and full layers (`layer_types`). Writes
tests/fixtures/golden/{tokens_160,logits_rope_*,logits_smollm3,logits_ministral}.npy.

    .venv-bench/bin/pip install torch numpy transformers safetensors
    .venv-bench/bin/python scripts/golden_transformers.py
"""

import pathlib

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
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


def logits(model, weights, tokens, name):
    model = model.double().eval()
    missing, unexpected = model.load_state_dict(
        {k: v.double() for k, v in weights.items()}, strict=False
    )
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
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


if __name__ == "__main__":
    main()
