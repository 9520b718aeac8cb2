"""Decode steps through ``GraphedDecode`` (the hooks on fixed-address slots, as a CUDA graph
runs them) give the eager path's tokens, counts and steering, on CPU in its ``eager`` mode.

What only a GPU can check, the recorded graph replaying these same ops, the throughput
benchmark checks on the device (``benchmarks/qwen_omni_throughput.py --cuda-graphs``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from esn_core.hooks import Capture, HookEngine, Intervention
from esn_core.models.graphed_decode import GraphedDecode
from tiny_models import lm_group, tiny_qwen2

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
NEW = 6


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generate(model, cache, capture=True, interventions=None, graphed=False):
    ids, mask = _left_padded(PROMPTS)
    engine = HookEngine({"lm": lm_group(model)})
    runner = GraphedDecode(model.model, mode="eager") if graphed else None
    with engine.session(capture={"lm": Capture()} if capture else None,
                        interventions=interventions) as session:
        if runner is not None:
            with runner:
                out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0, cache_implementation=cache)
        else:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, cache_implementation=cache)
    return out, (session.counts("lm") if capture else None), runner


def _steer(method="steer", alpha=2.0):
    masks = (np.arange(0, 144, 5), np.arange(3, 144, 11), np.zeros(0, np.int64))
    return {"lm": Intervention(method, masks, (alpha, alpha / 2, alpha))}


@pytest.mark.parametrize("method", [None, "steer", "clamp", "deactivate", "add"])
def test_graphed_steps_count_and_intervene_as_the_eager_path(method):
    model = tiny_qwen2()
    plan = _steer(method, 0.5 if method == "add" else 2.0) if method else None
    out, counts, _ = _generate(model, None, interventions=plan)
    g_out, g_counts, runner = _generate(model, "static", interventions=plan, graphed=True)
    assert torch.equal(g_out, out)
    np.testing.assert_array_equal(g_counts.T, counts.T)
    np.testing.assert_array_equal(g_counts.K, counts.K)
    # every decode step but none of the prefill went through the slots
    assert runner.stats.replays == NEW - 1
    assert runner.stats.reasons == {"not a decode step": 1}
    assert runner.stats.captures == 1  # one key for the whole generate
    assert counts.T.min() < counts.T.max()  # one row ended early on the model's EOS


def test_steering_without_capture_and_the_session_restores_the_model():
    model = tiny_qwen2()
    plain, _, _ = _generate(model, None, capture=False)
    steered, _, _ = _generate(model, None, capture=False, interventions=_steer("deactivate"))
    g_steered, _, runner = _generate(model, "static", capture=False,
                                     interventions=_steer("deactivate"), graphed=True)
    assert not torch.equal(steered, plain), "the mask must change the greedy tokens"
    assert torch.equal(g_steered, steered)
    assert runner.stats.replays == NEW - 1
    assert "forward" not in vars(model.model)  # the runner took its wrapper off
    after, _, _ = _generate(model, None, capture=False)
    assert torch.equal(after, plain)


def test_one_runner_serves_sessions_one_after_another():
    """The slots outlive a session: the second session must start from zero counts and
    its own operands, not the first one's."""
    model = tiny_qwen2()
    ids, mask = _left_padded(PROMPTS)
    engine = HookEngine({"lm": lm_group(model)})
    runner = GraphedDecode(model.model, mode="eager")
    results = []
    with runner:
        for plan in (_steer("steer", 3.0), _steer("steer", 0.2)):
            with engine.session(capture={"lm": Capture()}, interventions=plan) as session:
                out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0, cache_implementation="static")
            results.append((out, session.counts("lm")))
    for (out, counts), plan in zip(results, (_steer("steer", 3.0), _steer("steer", 0.2))):
        eager_out, eager_counts, _ = _generate(model, None, interventions=plan)
        assert torch.equal(out, eager_out)
        np.testing.assert_array_equal(counts.K, eager_counts.K)
        np.testing.assert_array_equal(counts.T, eager_counts.T)


def test_calls_a_graph_cannot_serve_run_eagerly():
    model = tiny_qwen2()
    out, counts, _ = _generate(model, None)
    # a growing (dynamic) cache: every step eager, same result
    d_out, d_counts, runner = _generate(model, None, graphed=True)
    assert torch.equal(d_out, out)
    np.testing.assert_array_equal(d_counts.K, counts.K)
    assert runner.stats.replays == 0
    assert runner.stats.reasons == {"not a decode step": 1, "cache not static": NEW - 1}
    # moments cannot be kept on fixed slots: eager, and the moments are there
    ids, mask = _left_padded(PROMPTS)
    engine = HookEngine({"lm": lm_group(model)})
    runner = GraphedDecode(model.model, mode="eager")
    with engine.session(capture={"lm": Capture(moments=True)}) as session, runner:
        model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                       pad_token_id=0, cache_implementation="static")
    assert runner.stats.replays == 0
    assert runner.stats.reasons["hooks a graph cannot run"] == NEW - 1
    np.testing.assert_array_equal(session.counts("lm").K, counts.K)
    assert session.counts("lm").sum_a is not None


def test_cuda_mode_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        GraphedDecode(tiny_qwen2().model, mode="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")
@pytest.mark.parametrize("method", [None, "steer"])
def test_recorded_graphs_replay_what_the_fixed_slot_path_computes(method):
    """On a GPU: the recorded graphs give the tokens and counts of the same fixed-slot path
    run eagerly, and of the eager decode (float64, so the cache layout cannot matter)."""
    model = tiny_qwen2().cuda()
    ids, mask = (t.cuda() for t in _left_padded(PROMPTS))
    engine = HookEngine({"lm": lm_group(model)})
    plan = _steer(method) if method else None
    results = []
    for mode in (None, "eager", "cuda"):
        runner = GraphedDecode(model.model, mode=mode) if mode else None
        with engine.session(capture={"lm": Capture()}, interventions=plan) as session:
            with (runner if runner else contextlib.nullcontext()):
                out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0, cache_implementation="static" if mode else None,
                                     disable_compile=True)
        results.append((out.cpu(), session.counts("lm"), runner))
    (out, counts, _), *graphed = results
    for g_out, g_counts, runner in graphed:
        assert torch.equal(g_out, out)
        np.testing.assert_array_equal(g_counts.K, counts.K)
        np.testing.assert_array_equal(g_counts.T, counts.T)
        assert runner.stats.replays == NEW - 1
    assert graphed[1][2].steps[next(iter(graphed[1][2].steps))].graph is not None


@pytest.mark.parametrize("method", [None, "steer"])
def test_fused_silu_counting_in_graphed_steps_gives_the_eager_counts(monkeypatch, method):
    """``ESN_FUSED_COUNTING=1`` compiles SiLU and the count of a captured step into one kernel
    (CUDA's default, compiled for CPU here): the tokens and counts of the eager decode, with a
    row that ends early. Every layer of every replayed step must have taken that kernel."""
    from esn_core import fused_counting

    model = tiny_qwen2()
    plan = _steer(method) if method else None
    out, counts, _ = _generate(model, None, interventions=plan)
    monkeypatch.setenv("ESN_FUSED_COUNTING", "1")
    monkeypatch.setattr(fused_counting, "_failed", set())
    fused_steps = []
    real = fused_counting.silu_and_count_step

    def silu_and_count_step(*args):
        g = real(*args)
        fused_steps.append(g is not None)
        return g

    monkeypatch.setattr(fused_counting, "silu_and_count_step", silu_and_count_step)
    g_out, g_counts, runner = _generate(model, "static", interventions=plan, graphed=True)
    assert fused_steps == [True] * (runner.stats.replays * len(model.model.layers))
    assert runner.stats.replays == NEW - 1 and not fused_counting._failed
    assert torch.equal(g_out, out)
    np.testing.assert_array_equal(g_counts.T, counts.T)
    np.testing.assert_array_equal(g_counts.K, counts.K)
    assert counts.T.min() < counts.T.max()  # one row ended early on the model's EOS


def test_graph_slots_limits_follow_the_finished_rows_and_return_to_zero():
    """A step's limits are one ``where`` with finished rows; with none (no end token), 0s,
    rewritten only after an earlier step left a +inf (slots outlive sessions)."""
    from esn_core.hooks import GraphSlots, _GroupState

    model = tiny_qwen2()
    state = _GroupState(lm_group(model), Capture(), None)
    slots = GraphSlots(3)
    slots.allocate(state, 0, (True, None, False))
    limits = slots.limits[model]
    slots.set_limits(model, torch.tensor([[False], [True], [False]]))
    assert limits.flatten().tolist() == [0.0, float("inf"), 0.0]
    assert limits.dtype == model.model.layers[0].mlp.gate_proj.weight.dtype
    slots.set_limits(model, None)
    assert limits.flatten().tolist() == [0.0, 0.0, 0.0]
    limits.fill_(7.0)  # not written again while they are known to be 0
    slots.set_limits(model, None)
    assert limits.flatten().tolist() == [7.0, 7.0, 7.0]
