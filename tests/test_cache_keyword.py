"""Which keyword a transformers module takes its KV cache under (5.17: past_key_values; 5.2x: cache)."""

from __future__ import annotations

import inspect

import torch


def test_cache_keyword_reads_the_forward_signature_through_wrappers():
    from esn_core.models.cache_keyword import cache_keyword

    def new_style(input_ids=None, cache=None):
        pass

    def old_style(input_ids=None, past_key_values=None):
        pass

    class Wrapper:  # as the benchmarks' forced-ends wrappers: plain callables over a model
        def __init__(self, inner):
            self.__wrapped__ = inner

        def __call__(self, **inputs):
            pass

    class Module(torch.nn.Module):
        forward = staticmethod(old_style)

    assert cache_keyword(new_style) == "cache" and cache_keyword(old_style) == "past_key_values"
    assert cache_keyword(Wrapper(new_style)) == "cache"
    assert cache_keyword(Module()) == cache_keyword(Module) == "past_key_values"
    from transformers import Qwen3ForCausalLM  # this transformers' own answer

    want = "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"
    assert cache_keyword(Qwen3ForCausalLM) == want
