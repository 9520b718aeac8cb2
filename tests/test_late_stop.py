"""``late_stop``: transformers' ``generate`` reads "every row finished?" one step late and
gives the same outputs as reading it every step, with one extra step that it drops."""

from __future__ import annotations

import pytest
import torch

from esn_core.models.late_stop import LateFlag, late_stop_checks

transformers = pytest.importorskip("transformers")
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache  # noqa: E402

generation = pytest.importorskip("transformers.generation.utils")
if not hasattr(generation, "StopCheck"):
    pytest.skip("this transformers has no stop-check object (before 5.17)", allow_module_level=True)

IDS = torch.tensor([[0, 0, 5, 7, 9], [3, 4, 5, 6, 7], [1, 2, 3, 4, 5]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_a_late_flag_returns_each_flag_one_push_later():
    flag = LateFlag(torch.device("cpu"))
    pushed = [False, True, False, True, True]
    got = [flag.push(torch.tensor(value)) for value in pushed]
    assert got == [False] + pushed[:-1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval().double()


def generate(model, forwards=None, **kwargs):
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1)) if forwards is not None else None
    try:
        return model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=20, do_sample=False,
                              pad_token_id=0, **kwargs)
    finally:
        if handle is not None:
            handle.remove()


@pytest.fixture(scope="module")
def early_ends(model):
    """End tokens that end every row before the 20-token cap, at different steps."""
    answers = generate(model)[:, IDS.shape[1]:].tolist()
    # Row b's token b + 2 ends it, or an earlier one that is another row's end token.
    ends = sorted({row[b + 2] for b, row in enumerate(answers)})
    stops = [min(i for i, t in enumerate(row) if t in ends) for row in answers]
    assert max(stops) < 19 and len(set(stops)) > 1, (answers, ends)
    return ends


def _cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values")


def test_generate_reads_late_and_returns_what_it_returns_reading_every_step(model, early_ends):
    extra = dict(eos_token_id=early_ends, return_dict_in_generate=True, output_scores=True,
                 output_logits=True, output_hidden_states=True)
    every, late = [], []
    expected = generate(model, every, **extra)
    with late_stop_checks():
        got = generate(model, late, **extra)
    # one more decode step ran (the host learnt of the end a step late) and was dropped
    assert len(late) == len(every) + 1
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == expected.sequences.shape[1] - IDS.shape[1]
    for name in ("scores", "logits"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(got, name), getattr(expected, name)))
    assert len(got.hidden_states) == len(expected.hidden_states)
    assert all(torch.equal(a[-1], b[-1]) for a, b in zip(got.hidden_states, expected.hidden_states))
    # the returned cache dropped the extra step's keys and values
    assert _cache(got).get_seq_length() == _cache(expected).get_seq_length()
    assert torch.equal(_cache(got).layers[0].keys, _cache(expected).layers[0].keys)


def test_at_the_length_cap_no_extra_step_runs(model):
    every, late = [], []
    expected = generate(model, every)  # no end token: every row runs to the cap
    with late_stop_checks():
        got = generate(model, late)
    assert torch.equal(got, expected) and len(late) == len(every) == 20


def test_a_static_cache_defers_only_when_declared_disposable(model, early_ends):
    expected = generate(model, eos_token_id=early_ends)
    for disposable, extra_steps in ((False, 0), (True, 1)):
        cache = StaticCache(config=model.config, max_cache_len=64)
        every, late = [], []
        generate(model, every, eos_token_id=early_ends)
        with late_stop_checks([cache] if disposable else []):
            got = generate(model, late, eos_token_id=early_ends, **{"cache": cache} if
                           "cache" in __import__("inspect").signature(model.forward).parameters
                           else {"past_key_values": cache})
        assert torch.equal(got, expected)
        # a static cache cannot drop a step: unless its owner resets it anyway, every step
        assert len(late) == len(every) + extra_steps


def test_a_streamer_still_gets_each_token_on_its_step(model, early_ends):
    class Tokens:
        def __init__(self):
            self.got = []

        def put(self, value):
            self.got.append(value.clone())

        def end(self):
            pass

    every, late = Tokens(), Tokens()
    generate(model, streamer=every, eos_token_id=early_ends)
    with late_stop_checks():
        generate(model, streamer=late, eos_token_id=early_ends)
    assert len(late.got) == len(every.got) and all(torch.equal(a, b) for a, b in zip(late.got, every.got))


def test_the_context_puts_transformers_own_check_back_after_nesting_and_errors(model):
    own = generation.DeferredStopCheck
    cache = StaticCache(config=model.config, max_cache_len=8)
    with late_stop_checks([cache]):
        with late_stop_checks([cache]):
            assert generation.DeferredStopCheck is not own
        assert generation.DeferredStopCheck is not own
        # the outer context still holds the cache disposable
        assert generation.DeferredStopCheck.is_supported(torch.device("cpu"), cache, True, False)
    assert generation.DeferredStopCheck is own
    with pytest.raises(RuntimeError, match="inside"):
        with late_stop_checks():
            raise RuntimeError("inside")
    assert generation.DeferredStopCheck is own


def test_a_generate_on_another_thread_keeps_transformers_own_check_meanwhile(model, early_ends):
    """The module name is swapped process-wide, but only threads inside a context defer: a
    ``generate`` on another thread runs exactly as without the context (no extra step)."""
    import threading

    every = []
    expected = generate(model, every, eos_token_id=early_ends)
    inside, outside = threading.Event(), threading.Event()
    got = {}

    def elsewhere():
        inside.wait(timeout=60)
        forwards = []
        got["sequences"] = generate(model, forwards, eos_token_id=early_ends)
        got["forwards"] = len(forwards)
        outside.set()

    own = generation.DeferredStopCheck
    worker = threading.Thread(target=elsewhere)
    worker.start()
    late = []
    with late_stop_checks():
        inside.set()
        assert outside.wait(timeout=120), "the other thread's generate did not finish"
        assert generation.DeferredStopCheck is not own  # the name was ours all along
        generate(model, late, eos_token_id=early_ends)
    worker.join()
    assert got["forwards"] == len(every)  # read every step there
    assert torch.equal(got["sequences"], expected)
    assert len(late) == len(every) + 1  # read late here, the same context open
