"""The planted LALM: checkpoint round trip, hookable groups, batching, decoding, ground truth.

The end-to-end known-answer test (selectors find the planted neurons, steering works on
unseen speakers) is tests/test_known_answer.py; here each property of the model itself is
checked directly.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from esn_core.constants import TARGETS
from esn_core.demo_corpus import SENTENCES, SPEAKER_VOICES, espeak_available
from esn_core.hooks import Capture, HookEngine, Intervention
from esn_core.io import SCHEMAS
from esn_core.judges.wer import attempt_wer, corpus_wer
from esn_core.models.base import EVCRequest, LALMAdapter, adapter_names, load_adapter
from esn_core.models.planted import (
    FAMILIES,
    GENERIC,
    PlantedAdapter,
    PlantedLALM,
    lm_layout,
    plant_model,
    planted_ground_truth,
    speaker_voice,
)
from esn_core.select import masks_from_table

PER_EMOTION = 12


@pytest.fixture(scope="module")
def model() -> PlantedLALM:
    return plant_model(seed=0, per_emotion=PER_EMOTION)


@pytest.fixture(scope="module")
def adapter(model) -> PlantedAdapter:
    return PlantedAdapter(model=model)


@pytest.fixture(scope="module")
def planted(model) -> dict[str, np.ndarray]:
    masks = masks_from_table(planted_ground_truth(model), lm_layout(model.config))
    return {e: m.indices for e, m in masks.items()}


def requests_for(target: str, sentences=SENTENCES, speaker: str = "0011") -> list[EVCRequest]:
    return [EVCRequest(f"{target}-{i}", "", s, speaker, target, i) for i, s in enumerate(sentences)]


# ---------------------------------------------------------------------------- checkpoint


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PlantedAdapter(path=tmp_path / "ckpt").model
    # transformers must not re-initialise any planted tensor on load
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert loaded.config.planted == model.config.planted
    assert loaded.config.families == model.config.families
    assert loaded.config.readout_scale == model.config.readout_scale
    reqs = requests_for("sad", SENTENCES[:8])
    a, mask = PlantedAdapter(model=model).forward(reqs)
    b, _ = PlantedAdapter(model=loaded).forward(reqs)
    assert torch.equal(a.hidden, b.hidden)
    assert torch.equal(a.strengths, b.strengths)
    assert torch.equal(a.rate_factor, b.rate_factor)


def test_blank_model_is_not_the_planted_one(model):
    blank = PlantedLALM(model.config)
    assert torch.count_nonzero(blank.lm.layers[3].mlp.gate_proj.weight) == 0


def test_checkpoint_missing_a_tensor_is_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path / "ckpt")
    weights = next((tmp_path / "ckpt").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors.pop("lm.layers.4.mlp.gate_proj.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        PlantedAdapter(path=tmp_path / "ckpt")


def test_registry_loads_by_name(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    adapter = load_adapter("planted", path=tmp_path / "ckpt")
    assert isinstance(adapter, LALMAdapter) and adapter.name == "planted"
    assert "planted" in adapter_names()
    with pytest.raises(KeyError, match="unknown LALM adapter"):
        load_adapter("no-such-model")


# ---------------------------------------------------------------------------- groups


def test_groups_are_found_by_structure(adapter, model):
    engine = HookEngine(adapter.groups())
    assert engine.layout("lm").layer_sizes == (128,) * 8
    assert engine.layout("synth").layer_sizes == (64,) * 2
    assert engine.layout("lm") == lm_layout(model.config)


def family_cells(model, name: str, emotion: str) -> np.ndarray:
    cells = np.asarray(model.config.families[name][emotion]).reshape(-1, 2)
    return lm_layout(model.config).flat_index(cells[:, 0], cells[:, 1])


@pytest.fixture(scope="module")
def probabilities(adapter) -> dict[str, np.ndarray]:
    """P(g > 0) per lm neuron for each target, over the demo sentences."""
    engine = HookEngine(adapter.groups())
    P = {}
    for target in TARGETS:
        with engine.session(capture={"lm": Capture()}) as session:
            adapter.forward(requests_for(target))
        counts = session.counts("lm")
        P[target] = counts.K.sum(axis=0) / counts.T.sum()
    return P


def test_every_family_fires_as_its_table_says(model, probabilities):
    P = probabilities
    for family in FAMILIES:
        for emotion in model.config.families[family.name]:
            idx = family_cells(model, family.name, emotion)
            own = [t for t in TARGETS if t == emotion or emotion == GENERIC]
            others = [t for t in TARGETS if t not in own]
            got_on = np.mean([P[t][idx] for t in own], axis=0)
            assert np.all(np.abs(got_on - family.p_on) <= 0.1), (family.name, emotion, got_on)
            if others:
                got_off = np.mean([P[t][idx] for t in others], axis=0)
                assert np.all(np.abs(got_off - family.p_off) <= 0.1), (family.name, emotion, got_off)


def test_planted_causal_neurons_are_strong_then_rare(model, planted):
    for e in TARGETS:
        expected = np.concatenate([family_cells(model, "strong", e), family_cells(model, "rare", e)])
        np.testing.assert_array_equal(planted[e], expected)
    sizes = {f: len(model.config.families[f]["happy"]) for f in ("strong", "rare", "correlated", "anti")}
    assert sizes == {"strong": 8, "rare": 4, "correlated": 3, "anti": 1}
    assert len(model.config.families["generic"][GENERIC]) == 3


def test_random_neurons_fire_about_half_the_time(model, probabilities):
    written = np.concatenate([family_cells(model, f, e) for f, owned in model.config.families.items()
                              for e in owned])
    rest = np.setdiff1d(np.arange(len(probabilities["happy"])), written)
    assert 0.45 <= np.mean([probabilities[t][rest].mean() for t in TARGETS]) <= 0.55


def test_distractors_are_causally_inert(adapter, model):
    engine = HookEngine(adapter.groups())
    inert = np.concatenate([family_cells(model, f, e) for f in ("correlated", "anti", "generic")
                            for e in model.config.families[f]])
    for target in TARGETS:
        reqs = requests_for(target)
        base, _ = adapter.forward(reqs)
        for method, alpha in (("steer", 8.0), ("deactivate", 0.0)):
            with engine.session(interventions={"lm": Intervention.uniform(method, inert, alpha, len(reqs))}):
                out, _ = adapter.forward(reqs)
            assert torch.equal(out.hidden, base.hidden), (target, method)


def test_plant_model_refuses_bad_family_sizes():
    with pytest.raises(ValueError, match="unknown or derived families.*'strong'"):
        plant_model(family_sizes={"strong": 3})
    with pytest.raises(ValueError, match="rare <= per_emotion"):
        plant_model(per_emotion=2, family_sizes={"rare": 3})


# ---------------------------------------------------------------------------- batching


def mixed_requests() -> list[EVCRequest]:
    return [
        EVCRequest("a", "", SENTENCES[0], "0011", "happy", 1),
        EVCRequest("b", "", SENTENCES[5], "0013", "sad", 2),
        EVCRequest("c", "", "He forgot to lock the door.", "9999", "surprise", 3),
        EVCRequest("d", "", SENTENCES[12], "0012", "angry", 4),
    ]


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_batched_convert_equals_single_converts(adapter, planted):
    reqs = mixed_requests()
    masks = (planted["happy"], np.empty(0, np.int64), planted["surprise"], planted["sad"])
    engine = HookEngine(adapter.groups())

    def run(rows, row_masks):
        plan = Intervention("steer", tuple(row_masks), (1.0,) * len(rows))
        with engine.session(capture={"lm": Capture(), "synth": Capture()},
                            interventions={"lm": plan}) as session:
            outputs = adapter.convert(rows)
        return outputs, session.counts("lm"), session.counts("synth")

    batch, lm_counts, synth_counts = run(reqs, masks)
    for b, (req, mask) in enumerate(zip(reqs, masks)):
        (single,), lm_one, synth_one = run([req], [mask])
        assert single.decoded_text == batch[b].decoded_text
        assert single.n_positions == batch[b].n_positions == lm_one.T[0]
        assert np.array_equal(single.waveform, batch[b].waveform)
        assert np.array_equal(lm_one.K[0], lm_counts.K[b])
        assert np.array_equal(synth_one.K[0], synth_counts.K[b])


def test_padding_positions_are_not_counted(adapter):
    reqs = mixed_requests()
    with HookEngine(adapter.groups()).session(capture={"lm": Capture()}) as session:
        _, mask = adapter.forward(reqs)
    assert session.counts("lm").T.tolist() == mask.sum(dim=1).tolist()
    assert session.counts("lm").T.tolist() == [len(r.transcript.split()) + 3 for r in reqs]


# ---------------------------------------------------------------------------- decoding


def wers(adapter, reqs, engine=None, plan=None) -> tuple[float, list[float]]:
    if plan is None:
        texts = adapter.decoded_texts(reqs)
    else:
        with engine.session(interventions={"lm": plan}):
            texts = adapter.decoded_texts(reqs)
    refs = [r.transcript for r in reqs]
    return corpus_wer(refs, texts), [attempt_wer(r, t) for r, t in zip(refs, texts)]


def test_baseline_wer_is_small_but_nonzero(adapter):
    reqs = [r for t in TARGETS for r in requests_for(t)]
    corpus, per_attempt = wers(adapter, reqs)
    assert 0.005 <= corpus <= 0.06, corpus
    failing = np.mean(np.asarray(per_attempt) > 0.15)
    assert 0.0 < failing <= 0.15, failing  # the WER filter matters, but rarely


def test_strong_steering_garbles_words(adapter, planted):
    engine = HookEngine(adapter.groups())
    for target in TARGETS:
        reqs = requests_for(target)
        base, _ = wers(adapter, reqs)
        plan = Intervention.uniform("steer", planted[target], 8.0, len(reqs))
        steered, _ = wers(adapter, reqs, engine, plan)
        assert steered >= base + 0.04, (target, base, steered)


def test_unknown_words_decode_as_deletions(adapter):
    (text,) = adapter.decoded_texts([EVCRequest("x", "", "The zyzzyva slept.", "0011", "sad", 0)])
    assert text.split()[0] == "the" and "zyzzyva" not in text


# ---------------------------------------------------------------------------- emotion path


def test_steering_and_deactivation_move_the_strength(adapter, planted):
    engine = HookEngine(adapter.groups())
    for k, target in enumerate(TARGETS):
        reqs = requests_for(target)
        base, _ = adapter.forward(reqs)
        with engine.session(interventions={"lm": Intervention.uniform("steer", planted[target], 1.0, len(reqs))}):
            up, _ = adapter.forward(reqs)
        with engine.session(interventions={"lm": Intervention.uniform("deactivate", planted[target], 0.0, len(reqs))}):
            down, _ = adapter.forward(reqs)
        s0, s1, s2 = (o.strengths[:, k].mean().item() for o in (base, up, down))
        assert 0.2 < s0 < 0.95 and s1 > s0 + 0.1 and s2 < s0 - 0.2, (target, s0, s1, s2)
        others = [j for j in range(len(TARGETS)) if j != k]
        assert base.strengths[:, others].max() < 0.1  # other emotions stay off


def test_baseline_strength_differs_by_emotion(adapter):
    means = {t: adapter.forward(requests_for(t))[0].strengths[:, k].mean().item()
             for k, t in enumerate(TARGETS)}
    assert means["sad"] > means["happy"] > means["angry"]  # sad easy, angry hard (logits)


def test_talker_holds_no_emotion_signal(adapter):
    engine = HookEngine(adapter.groups())
    reqs = requests_for("happy")
    base, _ = adapter.forward(reqs)
    every_synth = np.arange(engine.layout("synth").n_neurons)
    with engine.session(interventions={"synth": Intervention.uniform("steer", every_synth, 8.0, len(reqs))}):
        steered, _ = adapter.forward(reqs)
    assert torch.equal(base.token_ids, steered.token_ids)
    assert torch.equal(base.strengths, steered.strengths)
    span = adapter.model.config.talker_rate_span
    for out in (base, steered):
        assert torch.all((out.rate_factor - 1).abs() <= span)


# ---------------------------------------------------------------------------- ground truth


def test_ground_truth_table(model):
    table = planted_ground_truth(model)
    assert isinstance(table, pa.Table)
    assert table.column_names == list(SCHEMAS["masks"])
    assert table.num_rows == PER_EMOTION * len(TARGETS)
    layers = np.asarray(table.column("layer"))
    assert layers.min() >= 8 // 3 and layers.max() <= 7  # middle to late layers
    assert len(set(np.unique(layers))) >= 5  # spread, not piled in one layer
    cells = set(zip(layers.tolist(), table.column("neuron").to_pylist()))
    assert len(cells) == table.num_rows  # no neuron planted twice
    assert set(table.column("score").to_pylist()) == {1.0}
    emotions = np.asarray(table.column("emotion").to_pylist())
    for e in TARGETS:
        assert sorted(np.asarray(table.column("rank"))[emotions == e]) == list(range(1, PER_EMOTION + 1))


def test_unknown_speakers_get_a_stable_demo_voice():
    assert speaker_voice("0011") == SPEAKER_VOICES[0]
    assert speaker_voice("speaker-x") == speaker_voice("speaker-x")
    assert speaker_voice("speaker-x") in SPEAKER_VOICES
