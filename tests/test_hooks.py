"""Hook engine: capture counts, interventions, folding, padding, restore."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from esn_core.hooks import (
    Capture,
    HookEngine,
    Intervention,
    MLPGroup,
    find_gated_mlps,
    folded_down_proj,
)
from tiny_models import lm_group, tiny_qwen2


class _Stack(nn.Module):
    """Two real Qwen2MLP layers applied in sequence (a bare MLP stack, no root)."""

    def __init__(self, hidden=6, inter=5):
        super().__init__()
        from transformers import Qwen2Config

        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=inter, hidden_act="silu")
        self.layers = nn.ModuleList([Qwen2MLP(cfg), Qwen2MLP(cfg)])
        for p in self.parameters():
            nn.init.normal_(p, 0, 1.0)
        self.double()

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _manual_mlp(mlp, x, fn):
    g = torch.nn.functional.silu(mlp.gate_proj(x))
    return mlp.down_proj(fn(g) * mlp.up_proj(x))


@pytest.fixture()
def stack():
    torch.manual_seed(3)
    return _Stack()


def test_find_gated_mlps_finds_every_decoder_layer_in_order():
    model = tiny_qwen2()
    mlps = find_gated_mlps(model)
    assert mlps == [layer.mlp for layer in model.model.layers]


def test_non_gated_module_is_rejected():
    with pytest.raises(TypeError, match="layer 0"):
        MLPGroup([nn.Linear(3, 3)])


@pytest.mark.parametrize(
    "method,alpha,formula",
    [
        ("steer", 0.5, lambda g, m: torch.where(m, 1.5 * g, g)),
        ("add", 0.25, lambda g, m: torch.where(m, g + 0.25, g)),
        ("clamp", 0.4, lambda g, m: torch.where(m, torch.clamp(g, min=0.4), g)),
        ("deactivate", 0.0, lambda g, m: torch.where(m, torch.zeros_like(g), g)),
    ],
)
def test_intervention_equals_formula_on_a_gated_mlp(stack, method, alpha, formula):
    mlp = stack.layers[0]
    group = MLPGroup([mlp])
    mask = np.array([1, 3])
    dims = torch.zeros(5, dtype=torch.bool)
    dims[mask] = True
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    engine = HookEngine({"lm": group})
    with engine.session(interventions={"lm": Intervention.uniform(method, mask, alpha, 2)}):
        got = mlp(x)
    want = _manual_mlp(mlp, x, lambda g: formula(g, dims))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and the hook really changed something
    assert not torch.allclose(got, mlp(x))


def test_per_row_masks_and_alphas_in_one_batch(stack):
    mlp = stack.layers[0]
    engine = HookEngine({"lm": MLPGroup([mlp])})
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    plan = Intervention("steer", (np.array([0]), np.array([], dtype=np.int64), np.array([2, 4])), (1.0, 7.0, 0.5))
    with engine.session(interventions={"lm": plan}):
        got = mlp(x)
    scale = torch.ones(3, 1, 5, dtype=torch.float64)
    scale[0, 0, 0] = 2.0
    scale[2, 0, [2, 4]] = 1.5
    want = _manual_mlp(mlp, x, lambda g: g * scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the empty-mask row is an untouched baseline, bit for bit
    assert torch.equal(got[1], mlp(x)[1])


def test_masks_span_layers_with_flat_indices(stack):
    engine = HookEngine({"lm": MLPGroup(list(stack.layers))})
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    # flat 6 = layer 1, neuron 1 (layers have 5 neurons each)
    with engine.session(interventions={"lm": Intervention.uniform("deactivate", np.array([6]), 0, 1)}):
        got = stack(x)
    h = stack.layers[0](x)

    def kill(g):
        g = g.clone()
        g[..., 1] = 0
        return g

    want = _manual_mlp(stack.layers[1], h, kill)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,alpha", [("steer", 1.0), ("steer", 0.3), ("deactivate", 0.0)])
def test_folding_equals_hooking_and_restores_weights_exactly(method, alpha):
    model = tiny_qwen2()
    group = lm_group(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = np.array([0, 5, 47, 48, 100, 143])
    ids = torch.tensor([[5, 9, 13, 21, 8]])
    engine = HookEngine({"lm": group})
    with engine.session(interventions={"lm": Intervention.uniform(method, mask, alpha, 1)}):
        hooked = model(ids).logits
    with folded_down_proj(group, mask, method, alpha):
        folded = model(ids).logits
    torch.testing.assert_close(folded, hooked, rtol=1e-10, atol=1e-10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_folding_refuses_nonlinear_methods():
    group = lm_group(tiny_qwen2())
    with pytest.raises(ValueError, match="clamp"):
        with folded_down_proj(group, np.array([1]), "clamp", 0.1):
            pass


def test_session_restores_the_model_exactly():
    model = tiny_qwen2()
    ids = torch.tensor([[3, 4, 5, 6]])
    plain = model(ids).logits
    acts = [layer.mlp.act_fn for layer in model.model.layers]
    tree = list(model.named_modules())
    hooks_before = [len(model._forward_pre_hooks)]
    engine = HookEngine({"lm": lm_group(model)})
    with engine.session(
        capture={"lm": Capture()},
        interventions={"lm": Intervention.uniform("add", np.arange(20), 3.0, 1)},
    ):
        changed = model(ids).logits
        # the hook shadows act_fn by attribute; the module tree is never edited
        assert list(model.named_modules()) == tree
        assert find_gated_mlps(model) == [layer.mlp for layer in model.model.layers]
        assert all(not isinstance(layer.mlp.act_fn, nn.Module) for layer in model.model.layers)
    assert not torch.allclose(changed, plain)
    assert [layer.mlp.act_fn for layer in model.model.layers] == acts
    assert all("act_fn" not in vars(layer.mlp) for layer in model.model.layers)
    assert [len(model._forward_pre_hooks)] == hooks_before
    assert torch.equal(model(ids).logits, plain)


def test_counts_equal_manual_count_of_positive_gate_activations():
    model = tiny_qwen2()
    ids = torch.tensor([[7, 8, 9, 10, 11, 12]])
    captured = []
    handles = [
        layer.mlp.act_fn.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
        for layer in model.model.layers
    ]
    model(ids)
    for h in handles:
        h.remove()
    want = torch.cat([(g[0] > 0).sum(0) for g in captured]).numpy()
    engine = HookEngine({"lm": lm_group(model)})
    with engine.session(capture={"lm": Capture()}) as s:
        model(ids)
    got = s.counts("lm")
    assert got.T.tolist() == [6]
    np.testing.assert_array_equal(got.K[0], want)
    assert 0 < want.sum() < 6 * 3 * 48  # both signs occur: the test can fail


def test_counting_from_gate_proj_sign_equals_counting_g_positive():
    model = tiny_qwen2()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    signs = []
    handles = [
        layer.mlp.gate_proj.register_forward_hook(lambda m, i, o: signs.append((o > 0).sum(1)))
        for layer in model.model.layers
    ]
    model(ids)
    for h in handles:
        h.remove()
    from_sign = torch.cat(signs, dim=1).numpy()
    engine = HookEngine({"lm": lm_group(model)})
    with engine.session(capture={"lm": Capture()}) as s:
        model(ids)
    np.testing.assert_array_equal(s.counts("lm").K, from_sign)


def test_moments_are_sums_of_activations_and_squares():
    model = tiny_qwen2()
    ids = torch.tensor([[4, 5, 6]])
    captured = []
    h = model.model.layers[1].mlp.act_fn.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    model(ids)
    h.remove()
    engine = HookEngine({"lm": lm_group(model)})
    with engine.session(capture={"lm": Capture(moments=True)}) as s:
        model(ids)
    res = s.counts("lm")
    g = captured[0][0].float()
    np.testing.assert_allclose(res.sum_a[0, 48:96], g.sum(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(res.sum_a2[0, 48:96], (g * g).sum(0).numpy(), rtol=1e-5)


def _single_counts(model, prompt, eos=(2,), new=6, count_positions="all"):
    engine = HookEngine({"lm": lm_group(model, eos)})
    with engine.session(capture={"lm": Capture(count_positions)}) as s:
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=0,
        )
    return s.counts("lm"), out[0, len(prompt):].tolist()


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_left_padded_generate_counts_equal_single_runs():
    model = tiny_qwen2()
    singles = [_single_counts(model, p) for p in PROMPTS]
    ids, mask = _left_padded(PROMPTS)
    engine = HookEngine({"lm": lm_group(model)})
    with engine.session(capture={"lm": Capture()}) as s:
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = s.counts("lm")
    for b, (single, tokens) in enumerate(singles):
        # every prompt position and every new token but the last is fed exactly once
        assert single.T[0] == len(PROMPTS[b]) + len(tokens) - 1
        assert got.T[b] == single.T[0]
        np.testing.assert_array_equal(got.K[b], single.K[0])
    assert {len(t) for _, t in singles} == {6, 2}, "one row ends early on the model's EOS"


@pytest.mark.parametrize("steered", [False, True])
def test_static_cache_generate_counts_and_steers_as_the_dynamic_cache_does(steered):
    """transformers' static-cache path (the one it compiles) hands the root prepared 4-D
    masks in a dict instead of the 2-D padding mask; counts, end tokens and steering must
    come out as on the default dynamic cache (left padding, a row ending early)."""
    model = tiny_qwen2()
    ids, mask = _left_padded(PROMPTS)
    engine = HookEngine({"lm": lm_group(model)})
    plan = {"lm": Intervention.uniform("steer", np.arange(0, 144, 7), 1.0, len(PROMPTS))}
    runs = {}
    for cache in (None, "static"):
        with engine.session(capture={"lm": Capture()}, interventions=plan if steered else None) as s:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, cache_implementation=cache)
        runs[cache] = (out, s.counts("lm"))
    (out, counts), (static_out, static_counts) = runs[None], runs["static"]
    assert torch.equal(static_out, out)
    np.testing.assert_array_equal(static_counts.T, counts.T)
    np.testing.assert_array_equal(static_counts.K, counts.K)
    assert counts.T[0] == len(PROMPTS[0]) + 6 - 1  # prompt + every new token but the last
    assert counts.T.min() < counts.T.max()  # one row ended early on the model's EOS


def test_padding_mask_reads_prepared_masks():
    from esn_core.hooks import _padding_mask

    two_d = torch.tensor([[0, 1, 1]])
    assert _padding_mask(two_d, 3, False) is two_d
    boolean = torch.tensor([[[[False, False, False, False],
                              [False, True, False, False],
                              [False, True, True, False]]]])  # keys: 3 prompt + 1 cache slot
    assert _padding_mask({"full_attention": boolean}, 3, False).tolist() == [[False, True, True]]
    additive = torch.where(boolean, 0.0, torch.finfo(torch.float32).min)
    assert _padding_mask(additive, 3, False).tolist() == [[False, True, True]]
    assert _padding_mask({"full_attention": None}, 3, False) is None
    with pytest.raises(ValueError, match="after the prefill"):
        _padding_mask(boolean, 3, True)


@pytest.mark.parametrize("buffer_bytes", [1, 1000, 2**28])
def test_rows_stop_counting_after_their_end_token(monkeypatch, buffer_bytes):
    # 1 byte: the decode step buffer is reduced every step; 1000: every few steps.
    monkeypatch.setattr("esn_core.hooks._Counter.BUFFER_BYTES", buffer_bytes)
    model = tiny_qwen2()
    _, tokens = _single_counts(model, PROMPTS[0], new=8)
    eos = tokens[2]  # row 0 ends at its third new token
    others = [_single_counts(model, p, new=8)[1] for p in PROMPTS[1:]]
    assert all(eos not in t for t in others), "pick a prompt set where only row 0 ends"
    assert eos not in tokens[:2]
    singles = [_single_counts(model, p, eos=(eos,), new=8)[0] for p in PROMPTS]
    assert singles[0].T[0] == len(PROMPTS[0]) + 3 - 1
    ids, mask = _left_padded(PROMPTS)
    engine = HookEngine({"lm": lm_group(model, (eos,))})
    with engine.session(capture={"lm": Capture()}) as s:
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                       eos_token_id=[eos], pad_token_id=0)
    got = s.counts("lm")
    for b, single in enumerate(singles):
        assert got.T[b] == single.T[0]
        np.testing.assert_array_equal(got.K[b], single.K[0])


def test_right_padded_forward_counts_equal_single_forwards():
    model = tiny_qwen2()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in PROMPTS])
    engine = HookEngine({"lm": lm_group(model)})
    with engine.session(capture={"lm": Capture()}) as s:
        model(input_ids=ids, attention_mask=mask)
    batch = s.counts("lm")
    for b, p in enumerate(PROMPTS):
        with engine.session(capture={"lm": Capture()}) as one:
            model(input_ids=torch.tensor([p]))
        assert batch.T[b] == len(p)
        np.testing.assert_array_equal(batch.K[b], one.counts("lm").K[0])


def test_generated_only_counts_exclude_the_prompt():
    model = tiny_qwen2()
    all_pos, _ = _single_counts(model, PROMPTS[0], new=5)
    gen, _ = _single_counts(model, PROMPTS[0], new=5, count_positions="generated")
    assert gen.T[0] == 5 - 1
    assert all_pos.T[0] == len(PROMPTS[0]) + 5 - 1
    assert (gen.K <= all_pos.K).all() and gen.K.sum() < all_pos.K.sum()


def test_per_row_batched_generation_is_token_identical_to_single_runs():
    model = tiny_qwen2()
    conditions = [
        ("steer", np.array([1, 2, 3, 50, 60, 100]), 2.0),
        ("steer", np.array([], dtype=np.int64), 0.0),
        ("steer", np.array([7, 70, 140]), 0.5),
    ]
    prompt = [5, 6, 7, 8]

    def run(rows):
        engine = HookEngine({"lm": lm_group(model)})
        plan = Intervention("steer", tuple(r[1] for r in rows), tuple(r[2] for r in rows))
        ids = torch.tensor([prompt] * len(rows))
        with engine.session(capture={"lm": Capture()}, interventions={"lm": plan}) as s:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 do_sample=False, pad_token_id=0)
        return out[:, len(prompt):], s.counts("lm")

    batch_tokens, batch_counts = run(conditions)
    singles = [run([c]) for c in conditions]
    for b, (tokens, counts) in enumerate(singles):
        assert _until_end(batch_tokens[b]) == tokens[0].tolist()
        np.testing.assert_array_equal(batch_counts.K[b], counts.K[0])
    # the interventions matter: not every row generated the same text
    assert len({tuple(t.tolist()) for t in batch_tokens}) > 1
    plain = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert _until_end(batch_tokens[1]) == plain[0, len(prompt):].tolist()


def _until_end(tokens, eos=2):
    tokens = tokens.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_interventions_apply_at_prefill_and_every_decode_step():
    model = tiny_qwen2()
    engine = HookEngine({"lm": lm_group(model)})
    plan = Intervention.uniform("deactivate", np.arange(48), 0, 1)  # all of layer 0
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen.append(float(i[0].abs().max()))
    )
    with engine.session(interventions={"lm": plan}):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    hook.remove()
    assert len(seen) == 4  # prefill + 3 decode steps
    assert seen == [0.0] * 4


def test_mask_rows_must_match_batch_and_indices_must_exist():
    model = tiny_qwen2()
    engine = HookEngine({"lm": lm_group(model)})
    with pytest.raises(ValueError, match="2 rows but the batch has 1"):
        with engine.session(interventions={"lm": Intervention.uniform("steer", np.array([1]), 1.0, 2)}):
            model(torch.tensor([[1, 2]]))
    with pytest.raises(IndexError, match="mask index"):
        with engine.session(interventions={"lm": Intervention.uniform("steer", np.array([144]), 1.0, 1)}):
            pass
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        Intervention.uniform("clamp", np.array([1]), -1.0, 1)
    with pytest.raises(ValueError, match="not one of"):
        Intervention.uniform("boost", np.array([1]), 1.0, 1)
    with pytest.raises(KeyError, match="unknown MLP group 'synth'"):
        with engine.session(capture={"synth": Capture()}):
            pass
    # a failed session still restores the model
    assert all("act_fn" not in vars(l.mlp) for l in model.model.layers)
    assert all(isinstance(l.mlp.act_fn, nn.Module) for l in model.model.layers)


def test_plain_silu_is_called_directly_and_anything_else_as_it_is():
    from torch.nn import functional as F
    from transformers.activations import ACT2FN

    from esn_core.hooks import SILU, plain_function

    x = torch.randn(4, 7)
    assert torch.equal(SILU(x), F.silu(x))  # the binding F.silu calls
    assert plain_function(nn.SiLU()) is SILU
    assert plain_function(ACT2FN["silu"]) is SILU  # transformers' own SiLU module
    for module in (nn.SiLU(inplace=True), nn.GELU(), ACT2FN["gelu_pytorch_tanh"]):
        assert plain_function(module) is module
    replaced = nn.SiLU()
    replaced.forward = lambda x: x * 2  # e.g. a hub kernel swapped in on the instance
    assert plain_function(replaced) is replaced
    hooked = nn.SiLU()
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert plain_function(hooked) is hooked
    everywhere = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        plain = nn.SiLU()
        assert plain_function(plain) is plain  # a hook on every module must still see it
    finally:
        everywhere.remove()
    assert plain_function(nn.SiLU()) is SILU


def test_a_gelu_model_is_hooked_through_its_own_activation():
    """A non-SiLU act_fn still runs as the model defines it: same logits, counts of its g."""
    model = tiny_qwen2(hidden_act="gelu_pytorch_tanh")
    ids = torch.tensor([[3, 9, 4, 7, 5]])
    seen = []
    handles = [l.mlp.act_fn.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
               for l in model.model.layers]
    with torch.no_grad():
        plain = model(ids).logits
    for h in handles:
        h.remove()
    engine = HookEngine({"lm": lm_group(model)})
    with torch.no_grad(), engine.session(capture={"lm": Capture()}) as session:
        hooked = model(ids).logits
    assert torch.equal(hooked, plain)
    expected = torch.cat([(g[0] > 0).sum(0) for g in seen]).numpy()
    np.testing.assert_array_equal(session.counts("lm").K[0], expected)


@pytest.mark.parametrize("steered", [False, True])
def test_generate_counts_equal_a_recording_of_every_activation(monkeypatch, steered):
    """Decode steps count through SiLU writing into the step buffer; the counts (and the
    moments) equal ``g`` recorded by plain forward hooks (before any intervention), and an
    intervention on top of that path leaves the generated tokens as the in-place path
    makes them."""
    from esn_core.hooks import _Counter

    model = tiny_qwen2()
    layers = len(model.model.layers)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    engine = HookEngine({"lm": lm_group(model, eos_token_ids=())})
    plan = Intervention("steer", (np.array([], dtype=np.int64), np.arange(0, 144, 3),
                                  np.arange(1, 144, 5)), (0.0, 1.5, 2.0))
    steer = {"lm": plan} if steered else None

    def generate():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, pad_token_id=0)

    # Reference: a forward hook sees g as act_fn computes it; with a hook on it the engine
    # calls the module itself (the generic path), so this run takes no shortcut.
    want = [torch.zeros(3, 48, dtype=torch.int64) for _ in range(layers)]
    want_a = [torch.zeros(3, 48, dtype=torch.float64) for _ in range(layers)]
    want_a2 = [torch.zeros(3, 48, dtype=torch.float64) for _ in range(layers)]

    def recorder(layer):
        def record(module, inputs, g):
            want[layer] += (g > 0).sum(dim=1)
            want_a[layer] += g.sum(dim=1)
            want_a2[layer] += (g * g).sum(dim=1)

        return record

    handles = [layer.mlp.act_fn.register_forward_hook(recorder(l))
               for l, layer in enumerate(model.model.layers)]
    with engine.session(interventions=steer):
        want_tokens = generate()
    for h in handles:
        h.remove()

    buffered = []
    original = _Counter.silu_into_step
    monkeypatch.setattr(_Counter, "silu_into_step",
                        lambda self, l, x: buffered.append(l) or original(self, l, x))
    with engine.session(capture={"lm": Capture(moments=True)}, interventions=steer) as s:
        tokens = generate()
    assert len(buffered) == 5 * layers  # every decode step of every layer took the path
    assert torch.equal(tokens, want_tokens)
    got = s.counts("lm")
    np.testing.assert_array_equal(got.T, [10, 10, 10])  # 5 prompt + 5 fed tokens
    np.testing.assert_array_equal(got.K, torch.cat(want, dim=1).numpy())
    np.testing.assert_allclose(got.sum_a, torch.cat(want_a, dim=1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum_a2, torch.cat(want_a2, dim=1).numpy(), rtol=1e-5, atol=1e-6)
    assert 0 < got.K.sum() < 10 * 3 * 144


@pytest.mark.parametrize("buffer_bytes", [1, 2**20])
def test_decode_steps_count_across_layers_of_different_widths(monkeypatch, buffer_bytes):
    """Layers of unequal width get one step buffer per run of equal widths; one-position
    calls (decode steps) count exactly what a recording of ``g`` sees."""
    monkeypatch.setattr("esn_core.hooks._Counter.BUFFER_BYTES", buffer_bytes)
    from transformers import Qwen2Config

    torch.manual_seed(3)
    mlps = nn.ModuleList([Qwen2MLP(Qwen2Config(hidden_size=6, intermediate_size=d))
                          for d in (5, 5, 7, 4)]).double()
    for p in mlps.parameters():
        nn.init.normal_(p, 0, 1.0)

    def forward(x):
        for mlp in mlps:
            x = mlp(x)
        return x

    steps = [torch.randn(3, 1, 6, dtype=torch.float64) for _ in range(5)]
    want = [torch.zeros(3, m.gate_proj.out_features, dtype=torch.int64) for m in mlps]

    def recorder(layer):
        def record(module, inputs, g):
            want[layer] += (g > 0).sum(dim=1)

        return record

    handles = [m.act_fn.register_forward_hook(recorder(l)) for l, m in enumerate(mlps)]
    with torch.no_grad():
        plain = [forward(x) for x in steps]
    for h in handles:
        h.remove()
    engine = HookEngine({"lm": MLPGroup(list(mlps))})
    with torch.no_grad(), engine.session(capture={"lm": Capture()}) as s:
        hooked = [forward(x) for x in steps]
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    got = s.counts("lm")
    np.testing.assert_array_equal(got.T, [5, 5, 5])
    np.testing.assert_array_equal(got.K, torch.cat(want, dim=1).numpy())
    assert 0 < got.K.sum() < 5 * 3 * 21


@pytest.mark.parametrize("method,alpha", [("steer", 0.75), ("add", 0.5), ("clamp", 0.3), ("deactivate", 0.0)])
def test_prefill_touching_only_masked_pairs_equals_the_dense_operand(monkeypatch, method, alpha):
    """Calls over many positions apply the mask by gather/scatter of the masked (row,
    neuron) pairs; the result is bit-identical to the dense ``[B, 1, D]`` operand and to
    the formula, per row, with a duplicated index applied once and an untouched row."""
    from esn_core.hooks import compile_operands

    torch.manual_seed(5)
    from transformers import Qwen2Config

    mlps = nn.ModuleList([Qwen2MLP(Qwen2Config(hidden_size=6, intermediate_size=d)) for d in (5, 7, 4)])
    for p in mlps.parameters():
        nn.init.normal_(p, 0, 1.0)
    engine = HookEngine({"lm": MLPGroup(list(mlps))})
    # flat indices: layer 0 = 0..4, layer 1 = 5..11, layer 2 = 12..15 (no row masks layer 2)
    masks = (np.array([1, 6, 6, 11]), np.array([], dtype=np.int64), np.array([0, 4, 5, 7, 8]))
    plan = Intervention(method, masks, (alpha, alpha, 2 * alpha))
    x = torch.randn(3, 9, 6)

    monkeypatch.setattr("esn_core.hooks.SPARSE_MIN_ELEMENTS", 0)  # pairs even for calls this small

    def forward(share, dtype):
        monkeypatch.setattr("esn_core.hooks.SPARSE_SHARE", share)
        hooked, plain = [], []
        h = x.to(dtype)
        with torch.inference_mode(), engine.session(interventions={"lm": plan}):
            for mlp in mlps.to(dtype):
                plain.append(torch.nn.functional.silu(mlp.gate_proj(h)))
                hooked.append(mlp.act_fn(mlp.gate_proj(h)).clone())
                h = mlp(h)
        return h, hooked, plain

    layout = engine.layout("lm")
    for share, paired in ((1.0, True), (0.0, False)):
        monkeypatch.setattr("esn_core.hooks.SPARSE_SHARE", share)
        operands = compile_operands(plan, layout, "cpu", torch.float64)
        assert [op.rows is not None for op in operands] == [paired, paired, False]
        assert operands[2].dense is None  # layer 2: nothing to do
        if paired:  # pairs of layer 1: row 0 neurons 1 (once) and 6; row 2 neurons 0, 2, 3
            assert operands[1].rows.tolist() == [0, 0, 2, 2, 2]
            assert operands[1].neurons.tolist() == [1, 6, 0, 2, 3]
    for dtype in (torch.bfloat16, torch.float64):
        sparse, g_sparse, g_plain = forward(1.0, dtype)
        dense, g_dense, _ = forward(0.0, dtype)
        assert torch.equal(sparse, dense)
        assert all(torch.equal(a, b) for a, b in zip(g_sparse, g_dense))
    # against the formula, layer by layer (float64)
    ops = {"steer": lambda g, a: (1 + a) * g, "add": lambda g, a: g + a,
           "clamp": lambda g, a: torch.clamp(g, min=a), "deactivate": lambda g, a: 0 * g}
    starts = (0, 5, 12)
    for layer, (got, g) in enumerate(zip(g_sparse, g_plain)):
        want = g.clone()
        for b, mask in enumerate(masks):
            for flat in set(mask.tolist()):
                if starts[layer] <= flat < starts[layer] + g.shape[-1]:
                    n = flat - starts[layer]
                    want[b, :, n] = ops[method](g[b, :, n], plan.row_alphas[b])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.equal(g_sparse[0], g_plain[0])  # the mask did something
    assert torch.equal(g_sparse[2], g_plain[2])  # no row masks layer 2: untouched


def test_small_calls_over_many_positions_take_the_broadcast(monkeypatch):
    """The gather/scatter of masked pairs is for large calls; a small prefill (batch 1) is
    cheaper as one broadcast, and a decode step (one position) always is."""
    from esn_core.hooks import SPARSE_MIN_ELEMENTS, LayerOperand

    def operand(dense_value):  # row 0's neuron 3 is masked; the dense operand says dense_value
        dense = torch.ones(2, 1, 1024)
        dense[0, 0, 3] = dense_value
        return LayerOperand("steer", 2, dense, torch.tensor([0]), torch.tensor([3]), torch.tensor([[2.0]]))

    positions = SPARSE_MIN_ELEMENTS // (2 * 1024)
    assert operand(2.0).touches_pairs(torch.empty(2, positions, 1024, device="meta"))
    assert not operand(2.0).touches_pairs(torch.empty(2, positions - 1, 1024, device="meta"))
    assert not operand(2.0).touches_pairs(torch.empty(2, 1, 1024, device="meta"))
    assert not LayerOperand("steer", 2, torch.ones(2, 1, 1024)).touches_pairs(
        torch.empty(2, positions, 1024, device="meta"))
    # Which path ran shows where the two operands disagree (they never do once compiled).
    g = torch.randn(2, 5, 1024)
    doubled = g.clone()
    doubled[0, :, 3] *= 2
    assert torch.equal(operand(2.0).apply(g.clone()), doubled)
    assert torch.equal(operand(1.0).apply(g.clone()), g)  # the broadcast, by the dense operand
    monkeypatch.setattr("esn_core.hooks.SPARSE_MIN_ELEMENTS", g.numel())
    assert torch.equal(operand(1.0).apply(g.clone()), doubled)  # the pairs


def test_sessions_nest_and_unwind_in_order():
    model = tiny_qwen2()
    ids = torch.tensor([[3, 4, 5, 6]])
    engine = HookEngine({"lm": lm_group(model)})
    with torch.no_grad():
        plain = model(ids).logits
        with engine.session(interventions={"lm": Intervention.uniform("add", np.arange(30), 2.0, 1)}):
            outer = model(ids).logits
            with engine.session(capture={"lm": Capture()}) as inner:
                both = model(ids).logits
            after_inner = model(ids).logits
        restored = model(ids).logits
    assert not torch.allclose(outer, plain)
    assert torch.equal(both, outer)  # the inner session observes; the outer still steers
    assert torch.equal(after_inner, outer)
    assert torch.equal(restored, plain)
    assert inner.counts("lm").T.tolist() == [4]
    assert all("act_fn" not in vars(layer.mlp) for layer in model.model.layers)


def test_a_paused_session_runs_plain_and_resumes_with_its_state():
    model = tiny_qwen2()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    other = torch.tensor([[11, 12, 13], [14, 15, 16]])
    engine = HookEngine({"lm": lm_group(model)})
    plan = Intervention("add", (np.arange(40), np.array([], dtype=np.int64)), (2.0, 0.0))
    with torch.no_grad():
        plain = model(ids).logits
        with engine.session(capture={"lm": Capture()}, interventions={"lm": plan}) as s:
            steered = model(ids).logits
            with s.paused():
                paused = model(other)  # neither counted nor steered
                paused_again = model(ids).logits
                assert all("act_fn" not in vars(layer.mlp) for layer in model.model.layers)
            model(ids[:, :1])
            resumed = model(ids).logits
    assert torch.equal(paused_again, plain)
    assert not torch.equal(steered, plain) and torch.equal(resumed[1], plain[1])
    assert torch.equal(resumed, steered)
    del paused
    # counts: as if the paused forwards had never run
    got = s.counts("lm")
    assert got.T.tolist() == [4 + 1 + 4, 4 + 1 + 4]
    with torch.no_grad(), engine.session(capture={"lm": Capture()}, interventions={"lm": plan}) as again:
        model(ids)
        model(ids[:, :1])
        model(ids)
    np.testing.assert_array_equal(got.K, again.counts("lm").K)


def test_pausing_is_refused_around_an_open_inner_session_and_never_rehooks_an_ended_one():
    model = tiny_qwen2()
    ids = torch.tensor([[3, 4, 5, 6]])
    engine = HookEngine({"lm": lm_group(model)})
    steer = {"lm": Intervention.uniform("add", np.arange(30), 2.0, 1)}
    with torch.no_grad():
        plain = model(ids).logits
        with engine.session(interventions=steer) as outer:
            steered = model(ids).logits
            with engine.session(capture={"lm": Capture()}) as inner:
                with pytest.raises(RuntimeError, match="opened inside this one"):
                    with outer.paused():
                        pass
                with inner.paused():  # the outer session still steers
                    assert torch.equal(model(ids).logits, steered)
                assert torch.equal(model(ids).logits, steered)
            assert inner.counts("lm").T.tolist() == [4]
        # a pause still open when its session ends: the model is restored and stays so
        with engine.session(interventions=steer) as s:
            pause = s.paused()
            pause.__enter__()
        pause.__exit__(None, None, None)
        assert torch.equal(model(ids).logits, plain)
        assert all("act_fn" not in vars(layer.mlp) for layer in model.model.layers)
        with pytest.raises(RuntimeError, match="ended"):
            with s.paused():
                pass


def test_byte_sums_count_past_255_positions_and_over_several_dims():
    from esn_core.hooks import _add_positive_counts

    g = torch.Generator().manual_seed(0)
    positive = torch.rand(2, 700, 3, generator=g) > 0.3  # 700 positions: three byte chunks
    K = torch.full((2, 3), 5, dtype=torch.int32)
    _add_positive_counts(K, positive, dim=1)
    assert torch.equal(K, 5 + positive.sum(dim=1, dtype=torch.int32))
    assert K.max() > 255
    steps = torch.rand(4, 9, 2, 1, 6, generator=g) > 0.5  # [layers, steps, B, 1, D]
    K = torch.zeros(2, 4, 6, dtype=torch.int32)
    _add_positive_counts(K, steps.transpose(0, 2), dim=(1, 3))
    assert torch.equal(K, steps.sum(dim=(1, 3)).transpose(0, 1).int())


def test_a_prompt_longer_than_255_positions_counts_exactly():
    model = tiny_qwen2()
    ids = torch.randint(3, 64, (2, 300), generator=torch.Generator().manual_seed(1))
    want = []
    handles = [layer.mlp.act_fn.register_forward_hook(
        lambda m, i, g: want.append((g > 0).sum(dim=1))) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    engine = HookEngine({"lm": lm_group(model)})
    with torch.no_grad(), engine.session(capture={"lm": Capture()}) as s:
        model(ids)
    counts = s.counts("lm")
    assert counts.T.tolist() == [300, 300] and counts.K.dtype == np.int32
    np.testing.assert_array_equal(counts.K, torch.cat(want, dim=1).numpy())  # two byte chunks


@pytest.mark.parametrize("method", ["steer", "add", "clamp", "deactivate"])
def test_a_decode_step_is_one_in_place_op_equal_to_the_formula(stack, monkeypatch, method):
    group = MLPGroup(list(stack.layers))  # widths 5 and 5: flat 0-4 layer 0, 5-9 layer 1
    masks = (np.array([1, 3]), np.array([], dtype=np.int64), np.array([0, 1, 2, 3, 4]))
    plan = Intervention(method, masks, (0.5, 0.0, 0.25))
    x = torch.randn(3, 1, 5, dtype=torch.float64)
    g = torch.nn.functional.silu(x)
    want = g.clone()
    for b, (mask, alpha) in enumerate(zip(masks, plan.row_alphas)):
        n = torch.as_tensor(mask)
        want[b, 0, n] = {"steer": (1 + alpha) * g[b, 0, n], "add": g[b, 0, n] + alpha,
                         "clamp": torch.clamp(g[b, 0, n], min=alpha),
                         "deactivate": 0 * g[b, 0, n]}[method]
    with HookEngine({"lm": group}).session(interventions={"lm": plan}) as session:
        state = next(iter(session._states.values()))
        monkeypatch.setattr(state, "_intervene", lambda *a: pytest.fail("left the decode path"))
        got = stack.layers[0].act_fn(x)
        untouched = stack.layers[1].act_fn(x)  # no row masks layer 1
        monkeypatch.undo()
        with pytest.raises(ValueError, match="3 rows but the batch has 2"):
            stack.layers[0].act_fn(x[:2])
        as_float32 = stack.layers[0].act_fn(x.float())  # operands recompiled for float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert torch.equal(got[1], g[1]) and torch.equal(untouched, g)
    torch.testing.assert_close(as_float32, want.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked staging needs CUDA")
def test_counts_reach_the_host_through_one_reused_pinned_buffer():
    from esn_core import hooks

    lm = torch.randint(0, 255, (6, 40), dtype=torch.uint8, device="cuda")
    synth = torch.randint(0, 255, (6, 9), dtype=torch.uint8, device="cuda")
    wide = torch.randint(0, 2**31 - 1, (3, 7), dtype=torch.int32, device="cuda")
    first = hooks._to_host(lm)
    buffer = hooks._PINNED[0].data_ptr()
    # the other group's shape, a smaller last batch and another dtype reuse the buffer
    for table in (synth, lm[:2], wide, lm):
        out = hooks._to_host(table)
        assert out.dtype == table.cpu().numpy().dtype
        np.testing.assert_array_equal(out, table.cpu().numpy())
        assert hooks._PINNED[0].data_ptr() == buffer
    np.testing.assert_array_equal(first, lm.cpu().numpy())  # an array of its own, not a view
    bigger = torch.ones(20, 40, dtype=torch.uint8, device="cuda")
    np.testing.assert_array_equal(hooks._to_host(bigger), np.ones((20, 40), np.uint8))
    assert hooks._PINNED[0].numel() >= 800 and len(hooks._PINNED) == 1


@pytest.mark.parametrize("buffer_bytes", [1, 2**20])  # every step flushed alone; 32 at once
def test_byte_counters_fold_into_int32_before_a_byte_overflows(monkeypatch, buffer_bytes):
    """The counter fed by hand: a 200-position prefill with padding, 150 decode steps in
    which rows finish at different steps, over layers of two widths (two step-buffer runs).
    Counts pass 255, so the byte counts fold into the int32 table mid-run; the result must
    equal the positives at the real positions, summed by numpy."""
    from esn_core.hooks import _Counter
    from esn_core.layout import NeuronLayout

    monkeypatch.setattr(_Counter, "BUFFER_BYTES", buffer_bytes)
    sizes, batch = (4, 4, 3), 3
    counter = _Counter(NeuronLayout(sizes), Capture())
    gen = torch.Generator().manual_seed(0)
    want = [np.zeros((batch, d), np.int64) for d in sizes]
    valid = torch.ones(batch, 200, dtype=torch.bool)
    valid[1, :30] = False  # left padding
    valid[2, :199] = False  # a row with one real prompt position
    counter.begin_positions(valid)
    for layer, d in enumerate(sizes):
        g = torch.randn(batch, 200, d, generator=gen) + 1.5  # ~93% positive
        counter.count(layer, g)
        want[layer] += ((g > 0) & valid[:, :, None]).sum(dim=1).numpy()
    finished = torch.zeros(batch, dtype=torch.bool)
    for step in range(150):
        if step in (40, 90):
            finished = finished.clone()
            finished[0 if step == 40 else 2] = True
        counter.begin_step(finished[:, None] if finished.any() else None, batch, "cpu")  # [B, 1], as the root hands it
        for layer, d in enumerate(sizes):
            x = torch.randn(batch, 1, d, generator=gen) + 1.5
            g = counter.silu_into_step(layer, x)
            want[layer] += ((g > 0)[:, 0] & ~finished[:, None]).numpy()
    got = counter.result()
    assert counter.wide_all is not None  # the bytes were folded at least once
    np.testing.assert_array_equal(got.T, [200 + 40, 170 + 150, 1 + 90])
    np.testing.assert_array_equal(got.K, np.concatenate(want, axis=1))
    assert got.K.dtype == np.int32 and got.K.max() > 255


def test_counts_that_fit_a_byte_leave_as_bytes_in_the_flat_order():
    from esn_core.hooks import _Counter
    from esn_core.layout import NeuronLayout

    counter = _Counter(NeuronLayout((2, 2, 3)), Capture())
    g = [torch.tensor([[[1.0, -1.0], [2.0, 3.0]]]), torch.tensor([[[-1.0, -2.0], [0.0, 5.0]]]),
         torch.tensor([[[1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]])]
    counter.begin_positions(torch.ones(1, 2, dtype=torch.bool), "all")
    for layer, activations in enumerate(g):
        counter.count(layer, activations)
    got = counter.result()
    assert counter.wide_all is None and got.K.dtype == np.uint8
    assert got.K.tolist() == [[2, 1, 0, 1, 2, 1, 0]] and got.T.tolist() == [2]


def _eos_run(model, eos, new=8):
    ids, mask = _left_padded(PROMPTS)
    engine = HookEngine({"lm": lm_group(model, (eos,))})
    with engine.session(capture={"lm": Capture()}) as s:
        model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                       eos_token_id=[eos], pad_token_id=0)
    return s.counts("lm")


@pytest.mark.parametrize("buffer_bytes", [1, 1000])
def test_fused_counting_gives_the_eager_counts(monkeypatch, buffer_bytes):
    """The compiled kernels (CUDA's path, compiled for CPU here by the same compiler) count a
    left-padded prefill and steps with a finished row exactly as the eager path does."""
    from esn_core import fused_counting

    monkeypatch.setattr("esn_core.hooks._Counter.BUFFER_BYTES", buffer_bytes)
    model = tiny_qwen2()
    eos = _single_counts(model, PROMPTS[0], new=8)[1][2]  # row 0 ends at its third new token
    monkeypatch.setenv("ESN_FUSED_COUNTING", "0")
    eager = _eos_run(model, eos)
    monkeypatch.setenv("ESN_FUSED_COUNTING", "1")
    monkeypatch.setattr(fused_counting, "_failed", set())
    monkeypatch.setattr(fused_counting, "_compiled", {})
    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: (compiled.append(f.__name__), real_compile(f, **kw))[1])
    fused = _eos_run(model, eos)
    assert not fused_counting._failed
    assert sorted(compiled) == ["_add_prefill_positives", "_add_step_positives"]
    np.testing.assert_array_equal(fused.T, eager.T)
    np.testing.assert_array_equal(fused.K, eager.K)
    assert eager.T.min() < eager.T.max() and eager.K.sum() > 0


def test_fused_counting_flushes_only_full_step_buffers(monkeypatch):
    """The kernels are compiled for exact shapes, so they get one shape a batch size: a full
    buffer's. A session's last, shorter flush is counted eagerly, with the same counts."""
    from esn_core import fused_counting

    model = tiny_qwen2()
    layout = HookEngine({"lm": lm_group(model)}).layout("lm")
    n_neurons, layers = layout.n_neurons, len(layout.layer_sizes)
    # Three steps of all three rows fit (the tiny model runs in float64).
    monkeypatch.setattr("esn_core.hooks._Counter.BUFFER_BYTES", 3 * len(PROMPTS) * n_neurons * 8)
    monkeypatch.setenv("ESN_FUSED_COUNTING", "0")
    eager = _eos_run(model, eos=-1)
    flushed = []

    def add_step_positives(counts, steps, limits):
        flushed.append(tuple(steps.shape))
        fused_counting._add_step_positives(counts, steps, limits)  # the kernel's own code, eager
        return True

    monkeypatch.setattr(fused_counting, "add_step_positives", add_step_positives)
    monkeypatch.setenv("ESN_FUSED_COUNTING", "1")
    got = _eos_run(model, eos=-1)
    # The prefill's logits give the first token: 7 decode steps, flushed as 3 + 3 + 1.
    assert flushed == [(layers, 3, len(PROMPTS), n_neurons // layers)] * 2
    np.testing.assert_array_equal(got.K, eager.K)
    np.testing.assert_array_equal(got.T, eager.T)


def test_fused_counting_compiles_past_dynamos_recompile_limit(monkeypatch):
    """One kernel per shape: a job's batch sizes, groups and kinds of step pass dynamo's
    limit (8; 2 here), which with ``fullgraph`` would be an error. Past our own limit the
    counting goes on eagerly, with a warning."""
    from esn_core import fused_counting

    monkeypatch.setenv("ESN_FUSED_COUNTING", "1")
    monkeypatch.setattr(fused_counting, "_failed", set())
    monkeypatch.setattr(fused_counting, "_compiled", {})
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(fused_counting, "RECOMPILE_LIMIT", 4)
    torch._dynamo.reset()  # this function's kernels compiled by earlier tests
    for batch in range(1, 6):
        steps = torch.arange(-6.0, 6.0).repeat(2, batch, 1)  # [L=2, B, D=12]: 5 positive (1..5)
        counts = torch.ones(2, batch, 12, dtype=torch.uint8)
        if batch <= 4:
            assert fused_counting.add_step_positives(counts, steps, None)
        else:
            with pytest.warns(RuntimeWarning, match=r"fused capture counting \(steps\)"):
                assert not fused_counting.add_step_positives(counts, steps, None)
            break
        assert counts.sum().item() == 2 * batch * (12 + 5)  # 1 each, +1 where g > 0 (1..5)
        assert fused_counting._failed == set()
    assert fused_counting._failed == {"steps"}


def test_fused_counting_falls_back_to_eager_with_a_warning(monkeypatch):
    from esn_core import fused_counting

    model = tiny_qwen2()
    monkeypatch.setenv("ESN_FUSED_COUNTING", "0")
    ids, mask = _left_padded(PROMPTS)
    engine = HookEngine({"lm": lm_group(model)})

    def counted():
        with engine.session(capture={"lm": Capture()}) as s:
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        return s.counts("lm")

    monkeypatch.setattr("esn_core.hooks._Counter.BUFFER_BYTES", 1)  # every flush full
    eager = counted()
    monkeypatch.setenv("ESN_FUSED_COUNTING", "1")
    monkeypatch.setattr(fused_counting, "_failed", set())
    monkeypatch.setattr(fused_counting, "_compiled", {})

    def no_compiler(function, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler found")
        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.warns(RuntimeWarning, match=r"fused capture counting \(prefill\).*no C\+\+ compiler"):
        got = counted()
    assert fused_counting._failed == {"prefill", "steps"}
    np.testing.assert_array_equal(got.K, eager.K)
    np.testing.assert_array_equal(got.T, eager.T)
    monkeypatch.setenv("ESN_FUSED_COUNTING", "yes")
    with pytest.raises(ValueError, match="ESN_FUSED_COUNTING must be auto, 0 or 1, got 'yes'"):
        counted()


def test_fused_silu_counting_counts_strictly_positive_g_of_live_rows(monkeypatch):
    """One decode step's SiLU and count (what a captured step runs): g is eager SiLU's to the
    last bit, and counts grow by g > 0 on live rows only (zero and negative activations do
    not count; a finished row's limit is +inf). The tiny model's shape: compiled once."""
    from esn_core import fused_counting
    from esn_core.hooks import SILU

    monkeypatch.setenv("ESN_FUSED_COUNTING", "1")
    monkeypatch.setattr(fused_counting, "_failed", set())
    x = torch.stack([torch.arange(-20.0, 28.0),  # 27 positive, one 0
                     torch.arange(0.0, 48.0),  # finished: none counts
                     -torch.arange(0.0, 48.0)],  # 0 and negatives: none
                    ).to(torch.float64)[:, None, :]
    x[0, 0, :3] = torch.tensor([-0.0, -1e-300, 1e-300], dtype=torch.float64)  # tiny signs: one counts
    limits = torch.tensor([0.0, torch.inf, 0.0], dtype=torch.float64).view(3, 1, 1)
    counts = torch.full((3, 1, 48), 2, dtype=torch.int32)
    g = fused_counting.silu_and_count_step(SILU, x, limits, counts)
    assert g is not None and not fused_counting._failed
    assert torch.equal(g, SILU(x)) and g.data_ptr() != x.data_ptr()
    assert (counts - 2).sum(dim=(1, 2)).tolist() == [28, 0, 0]
    assert counts[0, 0, :4].tolist() == [2, 2, 3, 2]  # -0, -tiny, +tiny, -17
    # Not fused: another function, autograd, or fused counting off.
    assert fused_counting.silu_and_count_step(torch.relu, x, limits, counts) is None
    assert fused_counting.silu_and_count_step(SILU, x.clone().requires_grad_(), limits, counts) is None
    monkeypatch.setenv("ESN_FUSED_COUNTING", "0")
    assert fused_counting.silu_and_count_step(SILU, x, limits, counts) is None
    assert (counts - 2).sum().item() == 28  # nothing added by the calls that did not fuse
