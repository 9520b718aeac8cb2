"""Packed decode attention equals the expanded (repeat_kv) path transformers 5.17 takes, and
switching a model to it changes neither its tokens nor its hooks' counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esn_core.hooks import Capture, HookEngine, MLPGroup, find_gated_mlps
from esn_core.models.decode_attention import (
    NAME, grouped_query_configs, packed_decode_attention, register, use_packed_decode_attention,
)


def _expanded(query, key, value, mask, scale):
    """What transformers 5.17 computes with a mask: key/value heads copied per query head."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


class _Layer(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups


def _operands(batch=3, kv_heads=2, groups=4, length=9, dim=8, positions=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, positions, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=torch.float64)
    return q, k, v


def _left_padding_mask(batch, length, heads=1):
    """Row b's first b keys are padding, as a left-padded batch's are."""
    keys = torch.arange(length)
    mask = keys[None, :] >= torch.arange(batch)[:, None]
    return mask[:, None, None, :].expand(batch, heads, 1, length).clone()


@pytest.mark.parametrize("kind", ["none", "bool shared", "bool per head", "per head, one for all rows",
                                  "additive"])
def test_a_decode_step_equals_the_expanded_path(kind):
    q, k, v = _operands()
    batch, heads, _, _ = q.shape
    mask = {"none": None,
            "bool shared": _left_padding_mask(batch, k.shape[2]),
            "bool per head": _left_padding_mask(batch, k.shape[2], heads),
            "per head, one for all rows": _left_padding_mask(1, k.shape[2], heads),
            "additive": torch.where(_left_padding_mask(batch, k.shape[2]), 0.0, -torch.inf).double()}[kind]
    if "per head" in kind:
        mask[0, 5, 0, :4] = False  # one head of one row sees fewer keys
    out, weights = packed_decode_attention(_Layer(4), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (batch, 1, heads, q.shape[-1]) and out.is_contiguous()
    torch.testing.assert_close(out, _expanded(q, k, v, mask, 0.3), rtol=0, atol=1e-13)


def test_padding_keys_do_not_reach_the_output():
    q, k, v = _operands()
    mask = _left_padding_mask(3, k.shape[2])
    before, _ = packed_decode_attention(_Layer(4), q, k, v, mask, scaling=None)
    k[2, :, :2], v[2, :, :2] = 1e3, -1e3  # row 2's two padding keys
    after, _ = packed_decode_attention(_Layer(4), q, k, v, mask, scaling=None)
    assert torch.equal(before, after)


def test_other_calls_go_to_transformers_sdpa_unchanged():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    stock = ALL_ATTENTION_FUNCTIONS["sdpa"]
    q, k, v = _operands(positions=4, length=4)  # a prefill
    layer = _Layer(4)
    layer.is_causal = True
    ours, _ = packed_decode_attention(layer, q, k, v, None, scaling=0.5)
    theirs, _ = stock(layer, q, k, v, None, scaling=0.5)
    assert torch.equal(ours, theirs)
    q1, k1, v1 = _operands(groups=1)  # no grouped heads
    assert torch.equal(packed_decode_attention(_Layer(1), q1, k1, v1, None)[0],
                       stock(_Layer(1), q1, k1, v1, None)[0])


def test_heads_that_do_not_group_are_refused_by_name():
    q, k, v = _operands(kv_heads=3, groups=2)
    with pytest.raises(ValueError, match="6 query heads do not group onto 3 key/value heads 4 at a time"):
        packed_decode_attention(_Layer(4), q, k, v, None)


def _tiny_qwen2(layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).double().eval()


def test_a_model_generates_the_same_tokens_scores_and_counts_with_either_attention():
    model = _tiny_qwen2()
    ids = torch.tensor([[0, 0, 5, 7, 9, 11], [3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    engine = HookEngine({"lm": MLPGroup(find_gated_mlps(model.model), root=model.model)})

    def run():
        with engine.session(capture={"lm": Capture()}) as session:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 min_new_tokens=12, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0)
        return out, session.counts("lm")

    stock, stock_counts = run()
    assert use_packed_decode_attention(model) == 1
    assert model.config._attn_implementation == NAME
    packed, packed_counts = run()
    assert torch.equal(stock.sequences, packed.sequences)
    torch.testing.assert_close(torch.stack(packed.scores), torch.stack(stock.scores), rtol=0, atol=1e-10)
    assert (stock_counts.K == packed_counts.K).all() and (stock_counts.T == packed_counts.T).all()
    # and back
    assert use_packed_decode_attention(model, on=False) == 1
    assert model.config._attn_implementation == "sdpa"


def test_a_decode_step_mask_is_made_on_the_device_where_sdpa_would_ask_the_host():
    """Unpadded rows: transformers' SDPA mask is left out after the host reads the padding
    mask's sum (a wait for the device at every decode step); ours is made, all keys let
    through, without reading anything. A prefill may still leave it out."""
    from pathlib import Path

    import transformers
    from sync_audit import SyncAudit
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    register()
    unpadded = torch.ones(2, 6, dtype=torch.bool)
    step = dict(batch_size=2, q_length=1, kv_length=6, q_offset=5, kv_offset=0,
                attention_mask=unpadded, allow_is_causal_skip=True, device="cpu")
    library = str(Path(transformers.__file__).parent)
    with SyncAudit(under=library) as stock_waits:
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**step) is None
    with SyncAudit(under=library) as our_waits:
        mask = ALL_MASK_ATTENTION_FUNCTIONS[NAME](**step)
    assert sum(stock_waits.sites.values()) == 1 and not our_waits.sites
    assert mask.shape == (2, 1, 1, 6) and mask.all()
    padded = unpadded.clone()
    padded[1, :2] = False
    torch.testing.assert_close(ALL_MASK_ATTENTION_FUNCTIONS[NAME](**{**step, "attention_mask": padded}),
                               ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**{**step, "attention_mask": padded}))
    prefill = {**step, "q_length": 6, "q_offset": 0}
    assert ALL_MASK_ATTENTION_FUNCTIONS[NAME](**prefill) is None


def test_an_unpadded_row_generates_the_same_with_the_decode_mask_made():
    model = _tiny_qwen2()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])

    def run():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              min_new_tokens=12, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0)

    stock = run()
    use_packed_decode_attention(model)
    packed = run()
    assert torch.equal(stock.sequences, packed.sequences)
    torch.testing.assert_close(torch.stack(packed.scores), torch.stack(stock.scores), rtol=0, atol=1e-10)


def test_only_grouped_query_decoders_on_sdpa_are_switched():
    model = _tiny_qwen2()
    assert grouped_query_configs(model) == [model.config]
    model.config._attn_implementation = "eager"
    assert use_packed_decode_attention(model) == 0 and model.config._attn_implementation == "eager"
    from transformers import Qwen2Config, Qwen2ForCausalLM

    plain = Qwen2ForCausalLM(Qwen2Config(vocab_size=11, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2))
    assert grouped_query_configs(plain) == [] and use_packed_decode_attention(plain) == 0
