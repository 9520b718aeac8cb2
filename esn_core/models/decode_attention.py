"""Decode-step attention that reads each key/value head once, not once per query head.

All three LALMs use grouped-query attention in their decoders (Qwen2.5-Omni's thinker 28
query heads on 4 key/value heads, Kimi-Audio's 28 on 4, MiniCPM-o 4.5's Qwen3 32 on 8).
Whenever a mask is passed, which a batch of left-padded rows or a static KV cache always
does, transformers before 5.23 (5.17 on our GPU machine) serves SDPA by ``repeat_kv``: a copy
of the whole cache expanded to one key/value head per query head, every layer, every decode
step. By arithmetic, at batch 256 with ~300 cached positions and Kimi-Audio's shapes that is
~2.2 GB written and read per layer, ~75 GB over its 34 layers: five times the 15 GB of
weights the step reads (``benchmarks/decode_attention.py`` times it).

A decode step has one query position, so the ``g`` query heads sharing a key/value head can
stand in for ``g`` query positions of that head: query ``[B, H, 1, D]`` viewed as
``[B, H_kv, g, D]`` attends to the cache as it is. Every score and weighted sum is the same
dot product over the same operands; only how the kernel tiles them changes (tests: equal to
the expanded path within float rounding, float64 on CPU). transformers 5.23 and later pack
masked decode steps the same way themselves (their ``pack_gqa``).

``use_packed_decode_attention(model)`` switches the grouped-query decoders of ``model`` to
this function; every other call (prefill, models without grouped heads, dropout, position
biases) goes to transformers' own SDPA unchanged.

The decode step's mask is made on the device, always (``decode_step_mask``). transformers
leaves it out where no row is padded, and to know that it reads the padding mask's sum on
the host, a wait for the device at every decode step on a dynamic cache (the eager decode;
a static cache never skips). With the mask made, the host queues the next step while the
device runs this one; the mask of a row with no padding lets every key through, so the
outputs are those of no mask.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "esn_sdpa"  # the attention implementation's name in transformers' registries
STOCK = "sdpa"


def _stock():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[STOCK]


def packed_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; returns ``([B, 1, H, D], None)``."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    batch, heads, positions, dim = query.shape
    mask_ok = attention_mask is None or (
        attention_mask.dim() == 4 and attention_mask.shape[2] == 1
        and attention_mask.shape[1] in (1, heads))
    if (positions != 1 or groups == 1 or dropout or not mask_ok
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions")):
        return _stock()(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, is_causal=is_causal, **kwargs)
    kv_heads = key.shape[1]
    if kv_heads * groups != heads:
        raise ValueError(f"{heads} query heads do not group onto {kv_heads} key/value heads "
                         f"{groups} at a time")
    # Query head h reads key/value head h // groups (repeat_kv's order).
    packed = query.reshape(batch, kv_heads, groups, dim)
    if attention_mask is not None and attention_mask.shape[1] == heads:
        attention_mask = attention_mask.reshape(attention_mask.shape[0], kv_heads, groups,
                                                attention_mask.shape[-1])
    out = nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, scale=scaling, is_causal=False)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def decode_step_mask(*args, q_length: int | None = None, allow_is_causal_skip: bool = True,
                     **kwargs):
    """SDPA's mask, made on the device for a decode step (one query position) instead of
    left out after asking the host whether any row is padded (see module doc)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if q_length == 1:
        allow_is_causal_skip = False
    return ALL_MASK_ATTENTION_FUNCTIONS[STOCK](*args, q_length=q_length,
                                              allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def register() -> None:
    """Make ``NAME`` known to transformers: this attention, and SDPA's mask format with the
    decode step's mask always made (``decode_step_mask``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_decode_attention)
    AttentionMaskInterface.register(NAME, decode_step_mask)


def grouped_query_configs(model: nn.Module) -> list:
    """The configs of ``model``'s attention modules that group query heads (each once)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if int(getattr(module, "num_key_value_groups", 1) or 1) > 1 and config is not None:
            configs[id(config)] = config
    return list(configs.values())


def use_packed_decode_attention(model: nn.Module, on: bool = True) -> int:
    """Switch ``model``'s grouped-query decoders running SDPA to the packed decode step
    (``on``), or back to transformers' SDPA; returns how many configs were switched.

    Attention and mask creation read ``config._attn_implementation`` at every call, so this
    takes effect on a loaded model. Decoders on another implementation (eager, flash) are
    left alone.
    """
    register()
    switched = 0
    source, target = (STOCK, NAME) if on else (NAME, STOCK)
    for config in grouped_query_configs(model):
        if getattr(config, "_attn_implementation", None) == source:
            config._attn_implementation = target
            switched += 1
    return switched
