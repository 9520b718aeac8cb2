"""Tiny models of the real transformers classes, for tests (random weights, seeded)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from esn_core.hooks import MLPGroup


def tiny_qwen2(seed: int = 0, layers: int = 3, dtype=torch.float64,
               hidden_act: str = "silu") -> Qwen2ForCausalLM:
    """A 3-layer Qwen2ForCausalLM (vocab 64, width 32, 48 gate neurons per layer).

    float64 so that padded and unpadded runs agree to the last bit that a sign test or a
    greedy argmax could notice.
    """
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act=hidden_act,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    # Widen the weights so that activations spread over both signs and logits are decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def lm_group(model, eos_token_ids=None) -> MLPGroup:
    """The decoder MLPs, positions announced by the CausalLM that ``generate`` calls."""
    if eos_token_ids is None:
        eos_token_ids = (model.generation_config.eos_token_id,)
    return MLPGroup.under(model.model, position_root=model, eos_token_ids=eos_token_ids)
