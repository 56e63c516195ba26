"""Golden logits for scaled RoPE: Hugging Face transformers' LlamaForCausalLM (eager
attention, float64) on the golden tiny Llama's weights, with each RoPE scaling Zebra
computes (linear, llama3, yarn). Writes tests/fixtures/golden/{tokens_160,logits_rope_*}.npy.

    .venv-bench/bin/pip install torch numpy transformers safetensors
    .venv-bench/bin/python scripts/golden_rope_scaling.py
"""

import pathlib

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/golden"

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


def main():
    tokens = torch.randint(0, 64, (1, 160), generator=torch.Generator().manual_seed(160))
    np.save(GOLDEN / "tokens_160.npy", tokens.numpy().astype(np.int64))
    weights = load_file(str(GOLDEN / "tiny_llama.safetensors"))
    for name, scaling in SCALINGS.items():
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_hidden_layers=2,
            rms_norm_eps=1e-5,
            # YaRN's context: its original one times its factor.
            max_position_embeddings=256 if name == "yarn" else 1024,
            rope_parameters={"rope_theta": 10000.0, **scaling},
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
        model = LlamaForCausalLM(config).double().eval()
        missing, unexpected = model.load_state_dict(
            {k: v.double() for k, v in weights.items()}, strict=False
        )
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        with torch.no_grad():
            logits = model(tokens).logits
        np.save(GOLDEN / f"logits_rope_{name}.npy", logits.numpy())
        print(name, model.model.rotary_emb.inv_freq.tolist(), model.model.rotary_emb.attention_scaling)


if __name__ == "__main__":
    main()
