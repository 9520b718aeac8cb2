"""Qwen2.5-Omni adapter on a tiny checkpoint of the real transformers classes.

The checkpoint (thinker with audio encoder and vision tower, talker, token2wav, tokenizer,
feature extractor, speaker dictionary) is written once per session by tests/tiny_omni.py
and loaded through the adapter's real ``from_pretrained`` path. The adapter runs in
float64 so that a padded batch and a single run agree to the bit a greedy argmax or a
sign test could notice; token2wav runs in float32 as transformers forces it to.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from overlap_runs import assert_overlap_matches_sequential
from tiny_omni import build_tiny_omni, write_source

from esn_core.hooks import Capture, HookEngine, Intervention, find_gated_mlps
from esn_core.models.base import EVCRequest, load_adapter
from esn_core.models.qwen_omni import (
    SYSTEM_PROMPT,
    CheckpointError,
    QwenOmniAdapter,
    _initial_noise,
    _talker_mask,
    check_checkpoint,
    load_source,
    resolve_checkpoint,
    thinker_text_decoder,
    token2wav_batch,
)

TF_MAJOR = int(__import__("transformers").__version__.split(".")[0])
batched = pytest.mark.skipif(TF_MAJOR < 5, reason="transformers 4.x generates one row at a time")
SETTINGS = dict(device="cpu", max_new_tokens=5, talker_max_new_tokens=8, token2wav_steps=4)
BOTH = {"lm": Capture(), "synth": Capture()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: one intra-op thread is fastest, and immune to a busy machine's barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_omni(tmp_path_factory.mktemp("omni") / "Qwen2.5-Omni-tiny")


@pytest.fixture(scope="session")
def adapter(checkpoint) -> QwenOmniAdapter:
    return QwenOmniAdapter(checkpoint, dtype="float64", **SETTINGS)


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sources")
    # Different lengths, so a batch is left padded and carries different audio-token counts.
    return [write_source(folder / f"src{i}.wav", s, i) for i, s in enumerate((0.45, 0.7, 0.55))]


def requests(sources, emotions=("happy", "sad", "angry"), seed=11) -> list[EVCRequest]:
    return [
        EVCRequest(f"att{i}", str(src), "unused", "0011", emotion, seed + i)
        for i, (src, emotion) in enumerate(zip(sources, emotions))
    ]


def run(adapter, reqs, capture=BOTH, interventions=None):
    engine = HookEngine(adapter.groups())
    with engine.session(capture=capture, interventions=interventions) as session:
        outputs = adapter.convert(reqs)
    return outputs, session


def assert_rows_equal(batched, session, b, single, single_session):
    assert batched.decoded_text == single.decoded_text
    assert batched.n_positions == single.n_positions
    np.testing.assert_array_equal(batched.waveform, single.waveform)
    for group in ("lm", "synth"):
        counts, alone = session.counts(group), single_session.counts(group)
        assert counts.T[b] == alone.T[0], group
        np.testing.assert_array_equal(counts.K[b], alone.K[0], err_msg=group)


# ---------------------------------------------------------------------------- loading


def test_loads_the_real_classes_from_a_saved_checkpoint(adapter, checkpoint):
    from transformers import Qwen2_5OmniForConditionalGeneration

    assert isinstance(adapter.model, Qwen2_5OmniForConditionalGeneration)
    assert adapter.path == checkpoint
    assert set(adapter.model.speaker_map) == {"Chelsie", "Ethan"}
    assert adapter.speaker == "Chelsie"
    assert adapter.model.thinker.dtype == torch.float64
    assert next(adapter.model.token2wav.parameters()).dtype == torch.float32
    # Sharded weights, as the real checkpoint: every shard is named by the index.
    assert len(list(checkpoint.glob("model-*.safetensors"))) > 1


def test_missing_checkpoint_files_are_named_with_how_to_get_them(checkpoint, tmp_path):
    broken = tmp_path / "omni"
    shutil.copytree(checkpoint, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    (broken / "spk_dict.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        QwenOmniAdapter(broken, **SETTINGS)
    message = str(err.value)
    assert shard.name in message and "spk_dict.pt" in message
    assert "huggingface-cli download Qwen/Qwen2.5-Omni-7B --local-dir" in message
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json"):
        (broken / name).unlink()
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            check_checkpoint(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_hub_id_offline_and_uncached_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set") as err:
        resolve_checkpoint("esn-tests/no-such-omni")
    assert "huggingface-cli download esn-tests/no-such-omni" in str(err.value)


def test_registry_builds_the_adapter_in_bfloat16(checkpoint, sources):
    bf16 = load_adapter("qwen2_5_omni", path=str(checkpoint), dtype="bfloat16", **SETTINGS)
    assert isinstance(bf16, QwenOmniAdapter)
    assert bf16.model.thinker.dtype == torch.bfloat16
    (out,) = bf16.convert(requests(sources[:1]))
    assert out.waveform.size > 0 and np.isfinite(out.waveform).all()


# ---------------------------------------------------------------------------- prompt


def test_prompt_is_system_prompt_then_audio_then_instruction(adapter):
    happy, sad = adapter.prompt("happy"), adapter.prompt("sad")
    assert SYSTEM_PROMPT in happy
    assert happy.index(SYSTEM_PROMPT) < happy.index("<|audio_bos|><|AUDIO|><|audio_eos|>")
    assert happy.index("<|AUDIO|>") < happy.index(adapter.instruction("happy"))
    assert happy.endswith("<|im_start|>assistant\n")
    # Emotion-agnostic: the two prompts differ only where the emotion is named.
    assert happy.replace("happy", "sad") == sad


def test_templates_come_from_config(checkpoint):
    with pytest.raises(ValueError, match="emotion"):
        QwenOmniAdapter(checkpoint, instruction_template="Say it {mood}.", **SETTINGS)
    custom = QwenOmniAdapter(
        checkpoint, system_prompt="SYS", instruction_template="Say it as {emotion}.", **SETTINGS
    )
    prompt = custom.prompt("angry")
    assert "SYS" in prompt and "Say it as angry." in prompt and SYSTEM_PROMPT not in prompt


def test_sources_are_read_as_16k_mono(tmp_path):
    rate = 22_050
    t = np.arange(rate // 2) / rate
    stereo = np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 200 * t)], axis=1)
    sf.write(tmp_path / "stereo.wav", 0.5 * stereo, rate)
    audio = load_source(tmp_path / "stereo.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size == 8000  # 0.5 s at 16 kHz


# ---------------------------------------------------------------------------- groups


def test_groups_are_the_text_decoder_and_talker_only(adapter):
    thinker, talker = adapter.model.thinker, adapter.model.talker
    groups = adapter.groups()
    decoder = thinker_text_decoder(thinker)
    text_layers = adapter.model.config.thinker_config.text_config.num_hidden_layers
    assert groups["lm"].mlps == [layer.mlp for layer in decoder.layers]
    assert len(groups["lm"].mlps) == text_layers
    assert groups["synth"].mlps == [layer.mlp for layer in talker.model.layers]
    assert groups["lm"].root is thinker and groups["synth"].root is talker
    # The vision tower has gated MLPs too, and the audio encoder has MLPs: none is hooked.
    vision = {id(m) for m in find_gated_mlps(thinker.get_submodule(_tower(thinker, "visual")))}
    audio = {id(m) for m in thinker.get_submodule(_tower(thinker, "audio_tower")).modules()}
    assert vision, "the tiny vision tower should have gated MLPs"
    hooked = {id(m) for g in groups.values() for m in g.mlps}
    assert not hooked & vision and not hooked & audio
    assert set(groups["lm"].eos_token_ids) >= {adapter.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert set(groups["synth"].eos_token_ids) == {talker.codec_eos_token, talker.codec_pad_token}


def _tower(thinker, name: str) -> str:
    (path,) = [n for n, _ in thinker.named_modules() if n.split(".")[-1] == name]
    return path


# ---------------------------------------------------------------------------- generation


@batched
def test_batch_generates_text_and_16k_speech(adapter, sources):
    reqs = requests(sources)
    outputs, session = run(adapter, reqs)
    assert [o.attempt_id for o in outputs] == [r.attempt_id for r in reqs]
    lm, synth = session.counts("lm"), session.counts("synth")
    for b, out in enumerate(outputs):
        assert isinstance(out.decoded_text, str) and "<|" not in out.decoded_text
        assert out.sample_rate == 16_000
        assert out.waveform.dtype == np.float32 and out.waveform.size > 0
        assert np.isfinite(out.waveform).all() and np.abs(out.waveform).max() <= 1.0
        assert np.abs(out.waveform).max() > 0
        # n_positions is the thinker's real positions, exactly what the lm hook counted.
        assert out.n_positions == lm.T[b]
    assert (lm.T > 0).all() and (synth.T > 0).all()
    assert lm.K.shape == (3, adapter.groups()["lm"].layout.n_neurons)
    assert lm.K.sum(axis=1).min() > 0 and synth.K.sum(axis=1).min() > 0
    assert (lm.K <= lm.T[:, None]).all() and (synth.K <= synth.T[:, None]).all()


@batched
def test_generation_is_deterministic_and_seeds_only_move_the_vocoder(adapter, sources):
    reqs = requests(sources[:2])
    first, _ = run(adapter, reqs)
    again, _ = run(adapter, reqs)
    reseeded, _ = run(adapter, requests(sources[:2], seed=99))
    for a, b, c in zip(first, again, reseeded):
        np.testing.assert_array_equal(a.waveform, b.waveform)
        assert a.decoded_text == b.decoded_text == c.decoded_text
        assert a.waveform.shape == c.waveform.shape and not np.array_equal(a.waveform, c.waveform)


@batched
def test_batched_rows_equal_single_runs(adapter, sources):
    reqs = requests(sources)
    batched, session = run(adapter, reqs)
    for b, request in enumerate(reqs):
        (single,), alone = run(adapter, [request])
        assert_rows_equal(batched[b], session, b, single, alone)


@batched
def test_rows_that_stop_early_equal_single_runs(checkpoint, adapter, sources):
    """A row whose answer ends while the others go on: text, counts and speech still match."""
    reqs = requests(sources[:2])
    inputs = adapter.prepare(reqs)
    sequences, _ = adapter.generate(inputs, [r.seed for r in reqs])
    answers = sequences[:, inputs["input_ids"].shape[1] :].tolist()
    # A token that row 0 produces mid-answer (first time) and row 1 never does ends row 0.
    stop = next(t for i, t in enumerate(answers[0][1:-1], 1) if t not in answers[1] + answers[0][:i])
    stopping = QwenOmniAdapter(checkpoint, dtype="float64", stop_token_ids=[stop], **SETTINGS)
    (_, full1), full_session = run(adapter, reqs)
    batched, session = run(stopping, reqs)
    assert session.counts("lm").T[0] < full_session.counts("lm").T[0]
    assert batched[1].decoded_text == full1.decoded_text
    assert session.counts("lm").T[1] == full_session.counts("lm").T[1]
    for b, request in enumerate(reqs):
        (single,), alone = run(stopping, [request])
        assert_rows_equal(batched[b], session, b, single, alone)


@batched
def test_interventions_fire_on_both_groups_per_row(adapter, sources):
    reqs = requests(sources[:2])
    baseline, base_session = run(adapter, reqs)
    groups = adapter.groups()
    n_lm, n_synth = (groups[g].layout.n_neurons for g in ("lm", "synth"))
    lm_mask = np.arange(0, n_lm, 2)
    synth_mask = np.arange(0, n_synth, 2)
    # Row 0 steered in both groups, row 1 untouched: one batch mixes conditions.
    plan = {
        "lm": Intervention("steer", (lm_mask, np.array([], dtype=np.int64)), (2.0, 0.0)),
        "synth": Intervention("deactivate", (synth_mask, np.array([], dtype=np.int64)), (0.0, 0.0)),
    }
    steered, session = run(adapter, reqs, interventions=plan)
    # Row 1 had empty masks: bit for bit the baseline.
    assert_rows_equal(steered[1], session, 1, baseline[1], _RowView(base_session, 1))
    # Row 0 changed in the thinker (later layers see steered inputs) and in the talker.
    assert not np.array_equal(session.counts("lm").K[0], base_session.counts("lm").K[0])
    assert not np.array_equal(steered[0].waveform, baseline[0].waveform)
    # The same condition alone gives the same row.
    single_plan = {g: Intervention(p.method, p.row_masks[:1], p.row_alphas[:1]) for g, p in plan.items()}
    (single,), alone = run(adapter, reqs[:1], interventions=single_plan)
    assert_rows_equal(steered[0], session, 0, single, alone)
    # A synth-only intervention leaves the thinker's text and counts alone.
    synth_only, synth_session = run(adapter, reqs, interventions={"synth": plan["synth"]})
    assert synth_only[0].decoded_text == baseline[0].decoded_text
    np.testing.assert_array_equal(synth_session.counts("lm").K, base_session.counts("lm").K)
    assert not np.array_equal(synth_only[0].waveform, baseline[0].waveform)


def test_cuda_graphs_option_gives_the_eager_decode_exactly(checkpoint, adapter, sources):
    """``cuda_graphs``: thinker and talker decode on static caches through GraphedDecode
    (its fixed-slot path; CPU records no graph) equal the default path in text, speech,
    positions and counts, steered rows included."""
    graphed = QwenOmniAdapter(checkpoint, dtype="float64", cuda_graphs=True, **SETTINGS)
    reqs = requests(sources)
    groups = adapter.groups()
    n_lm, n_synth = (groups[g].layout.n_neurons for g in ("lm", "synth"))
    empty = np.array([], dtype=np.int64)
    plan = {
        "lm": Intervention("steer", (np.arange(0, n_lm, 3), empty, empty), (2.0, 0.0, 0.0)),
        "synth": Intervention("clamp", (empty, np.arange(1, n_synth, 4), empty), (0.0, 0.5, 0.0)),
    }
    for interventions in (None, plan):
        expected, session = run(adapter, reqs, interventions=interventions)
        got, graphed_session = run(graphed, reqs, interventions=interventions)
        for b in range(len(reqs)):
            assert_rows_equal(got[b], graphed_session, b, expected[b], _RowView(session, b))
    thinker, talker = graphed._graph_runners
    # every decode step of both stacks went through the fixed slots; prefills did not
    assert thinker.stats.replays > 0 and talker.stats.replays > 0
    # one recording per hook plan: the next batch reuses the caches and their recordings
    assert thinker.stats.captures == talker.stats.captures == 2
    run(graphed, reqs)
    assert thinker.stats.captures == talker.stats.captures == 2
    assert set(thinker.stats.reasons) == set(talker.stats.reasons) == {"not a decode step"}


@batched
@pytest.mark.parametrize("graphs", [False, True], ids=["eager decode", "cuda_graphs path"])
def test_late_stop_check_gives_the_every_step_check_exactly(checkpoint, sources, graphs):
    """``late_stop_check`` (on by default): thinker and talker each learn a step late that
    their last row ended, run that step and drop it; text, speech, positions and counts are
    those of the check read every step, a steered row's too."""
    reqs = requests(sources[:2])
    adapter = QwenOmniAdapter(checkpoint, dtype="float64", cuda_graphs=graphs, **SETTINGS)
    prompt = adapter.prepare(reqs)["input_ids"].shape[1]
    answers = adapter.generate_codes(adapter.prepare(reqs), [1, 2])[0][0][:, prompt:].tolist()
    # End both answers early (row b at its token b + 1), then both code streams: a code
    # that row 0 makes mid-way and row 1 before its last step becomes the talker's end token.
    adapter = QwenOmniAdapter(checkpoint, dtype="float64", cuda_graphs=graphs,
                              stop_token_ids=[answers[0][1], answers[1][2]], **SETTINGS)
    codes = [c["code"][0].tolist() for c in adapter.generate_codes(adapter.prepare(reqs), [1, 2])[1]]
    adapter.model.talker.codec_eos_token = next(c for c in codes[0][1:-1] if c in codes[1][:-1])
    adapter._groups = adapter._find_groups()  # the synth group's end tokens follow
    n_lm = adapter.groups()["lm"].layout.n_neurons
    steer = {"lm": Intervention("steer", (np.arange(0, n_lm, 3), np.array([], dtype=np.int64)), (2.0, 0.0))}
    forwards = {"thinker": 0, "talker": 0}

    def counted(part):
        def count(*_):
            forwards[part] += 1
        return getattr(adapter.model, part).register_forward_pre_hook(count)

    def counted_run(interventions):
        forwards.update(thinker=0, talker=0)
        return run(adapter, reqs, interventions=interventions), dict(forwards)

    handles = [counted("thinker"), counted("talker")]
    try:
        results = {}
        for late in (False, True):
            adapter.late_stop_check = late
            results[late] = [counted_run(None), counted_run(steer)]
    finally:
        for handle in handles:
            handle.remove()
    for ((expected, session), every), ((got, got_session), late) in zip(results[False], results[True]):
        for b in range(len(reqs)):
            assert_rows_equal(got[b], got_session, b, expected[b], _RowView(session, b))
        assert all(every[part] <= late[part] <= every[part] + 1 for part in late), (every, late)
    # Unsteered, every row ends before its cap: one extra thinker and talker step each.
    (_, every), (_, late) = results[False][0], results[True][0]
    assert late == {"thinker": every["thinker"] + 1, "talker": every["talker"] + 1}, (every, late)


class _RowView:
    """A session seen as a one-row session of its row ``b`` (for assert_rows_equal)."""

    def __init__(self, session, b):
        self.session, self.b = session, b

    def counts(self, group):
        full = self.session.counts(group)
        return type(full)(K=full.K[self.b : self.b + 1], T=full.T[self.b : self.b + 1], layout=full.layout)


def test_talker_gets_back_the_all_ones_mask_generate_dropped():
    embeds = torch.zeros(2, 5, 3)
    _, kwargs = _talker_mask(None, (), {"inputs_embeds": embeds, "attention_mask": None})
    assert kwargs["attention_mask"].shape == (2, 5) and kwargs["attention_mask"].all()

    class Cache:
        def get_seq_length(self):
            return 7

    _, kwargs = _talker_mask(None, (), {"input_ids": torch.zeros(2, 1, dtype=torch.long), "cache": Cache()})
    assert kwargs["attention_mask"].shape == (2, 8)
    given = torch.tensor([[0, 1, 1]])
    assert _talker_mask(None, (), {"input_ids": torch.zeros(1, 3), "attention_mask": given}) is None


def test_transformers_4_refuses_batches_of_more_than_one(adapter, sources, monkeypatch):
    from esn_core.models import qwen_omni

    monkeypatch.setattr(qwen_omni, "_transformers_major", lambda: 4)
    with pytest.raises(RuntimeError, match="transformers >= 5.17"):
        adapter.convert(requests(sources[:2]))
    assert adapter.convert([]) == []


# ---------------------------------------------------------------------------- pipeline


@batched
def test_pipeline_samples_with_the_adapter_batch_size_invariant(adapter, sources, tmp_path):
    import polars as pl

    from esn_core.pipeline import plan_attempts, sample_attempts

    table = pl.DataFrame({
        "utterance_id": ["0011_000001", "0011_000002"], "speaker": ["0011", "0011"],
        "split": ["identification"] * 2, "reference_text": ["one", "two"],
        "path": [str(p) for p in sources[:2]],
    })
    plan = plan_attempts(table, ("happy", "sad"), seed=3)
    runs = {
        size: sample_attempts(adapter, plan, tmp_path / f"b{size}", batch_size=size,
                              capture={"lm": Capture(), "synth": Capture()}, progress=False)
        for size in (3, 4)
    }
    (attempts, counts), (attempts4, counts4) = runs[3], runs[4]
    assert attempts["n_positions"].to_list() == counts["lm"].T.tolist()
    assert attempts["decoded_text"].to_list() == attempts4["decoded_text"].to_list()
    for group in ("lm", "synth"):
        np.testing.assert_array_equal(counts[group].K, counts4[group].K)
        np.testing.assert_array_equal(counts[group].T, counts4[group].T)
    for path in attempts["audio_path"].to_list():
        audio, rate = sf.read(path)
        assert rate == 16_000 and audio.size > 0


@pytest.fixture
def overlapping(adapter):
    """The session's adapter with ``overlap_speech`` on for one test."""
    adapter.overlap_speech = True
    yield adapter
    adapter.overlap_speech = False


def _sources_table(sources):
    import polars as pl

    return pl.DataFrame({
        "utterance_id": [f"0011_00000{i}" for i in range(1, 4)], "speaker": ["0011"] * 3,
        "split": ["identification"] * 3, "reference_text": ["one", "two", "three"],
        "path": [str(p) for p in sources],
    })


@batched
def test_overlapped_speech_gives_the_sequential_run_exactly(adapter, sources, tmp_path):
    assert_overlap_matches_sequential(adapter, sources, tmp_path)


@batched
def test_a_token2wav_error_on_the_worker_fails_the_run_naming_it(overlapping, sources, tmp_path, monkeypatch):
    from esn_core import pipeline

    def broken(calls, seeds):
        raise RuntimeError("token2wav ran out of memory")

    monkeypatch.setattr(overlapping, "speak", broken)
    plan = pipeline.plan_attempts(_sources_table(sources), ("happy",), seed=3)
    with pytest.raises(RuntimeError, match="token2wav ran out of memory"):
        pipeline.sample_attempts(overlapping, plan, tmp_path / "audio", batch_size=1, progress=False)
    assert not (tmp_path / "audio").exists() or not any((tmp_path / "audio").iterdir())  # no wav of a failed run


@batched
def test_token2wav_calls_from_another_thread_are_run_not_recorded(adapter, sources):
    """While one thread's generate records token2wav's calls, the worker's own token2wav
    calls (an earlier batch speaking) run as usual, and its noise draw is its own."""
    inputs = adapter.prepare(requests(sources[:1]))
    _, calls, seeds = adapter.generate_codes(inputs, [5])
    token2wav = adapter.model.token2wav  # the module generate_codes patches (float32)

    def speak():
        return token2wav_batch(token2wav, calls, seeds, dtype=torch.float32)[0]

    alone = speak()
    spoken = []
    original = adapter.model.talker.generate

    def talker_then_worker(*args, **kwargs):
        assert "forward" in vars(token2wav)  # the recorder is in place now
        worker = threading.Thread(target=lambda: spoken.append(speak()))
        worker.start()
        worker.join()
        return original(*args, **kwargs)

    adapter.model.talker.generate = talker_then_worker
    try:
        _, recorded, _ = adapter.generate_codes(inputs, [5])
    finally:
        del adapter.model.talker.generate
    assert len(recorded) == 1  # only this thread's call
    torch.testing.assert_close(spoken[0], alone, rtol=0, atol=0)


def test_initial_noise_serves_only_the_thread_that_asked():
    noise = torch.arange(6.0).reshape(1, 2, 3)
    got = []
    with _initial_noise(noise):
        other = threading.Thread(target=lambda: got.append(torch.randn(1, 2, 3)))
        other.start()
        other.join()
        assert got[0] is not noise
        assert torch.randn([1, 2, 3]) is noise


@batched
def test_from_model_wraps_a_model_in_memory(adapter, sources):
    bare = QwenOmniAdapter.from_model(adapter.model, speaker="Ethan", max_new_tokens=3,
                                      talker_max_new_tokens=4, token2wav_steps=2,
                                      stop_token_ids=adapter.thinker_eos)
    assert bare.groups()["lm"].mlps == adapter.groups()["lm"].mlps
    assert set(bare.thinker_eos) == set(adapter.thinker_eos)
    with pytest.raises(RuntimeError, match="without a processor"):
        bare.prompt("happy")
    inputs = adapter.prepare(requests(sources[:2]))
    sequences, waves = bare.generate(inputs, [1, 2], thinker_min_new_tokens=3)
    assert sequences.shape[1] == inputs["input_ids"].shape[1] + 3
    assert len(waves) == 2 and all(w.numel() > 0 for w in waves)
    with pytest.raises(ValueError, match="speaker 'Nobody'"):
        QwenOmniAdapter.from_model(adapter.model, speaker="Nobody")


# ---------------------------------------------------------------------------- token2wav


class _CountCalls:
    """An instance-level wrapper of ``module.forward`` (as the benchmark's timer installs)."""

    def __init__(self, module):
        self.module, self.rows = module, []
        self.inner = module.forward
        module.forward = self

    def __call__(self, code, *args, **kwargs):
        self.rows.append(code.shape[0])
        return self.inner(code, *args, **kwargs)

    def remove(self):
        del self.module.forward


def _token2wav_calls(token2wav, speaker, lengths, dtype, seed=5):
    codes = torch.Generator().manual_seed(seed)
    n_codes = token2wav.config.dit_config.num_embeds
    return [{"code": torch.randint(0, n_codes, (1, n), generator=codes),
             "conditioning": speaker["cond"].to(dtype).reshape(1, -1),
             "reference_mel": speaker["ref_mel"].to(dtype), "num_steps": 3} for n in lengths]


def _per_row(token2wav, calls, seeds):
    """The per-row path: seed, then transformers' token2wav on one row (what generate does)."""
    alone = []
    for call, seed in zip(calls, seeds):
        torch.manual_seed(seed)
        with torch.no_grad():
            alone.append(token2wav(call["code"], conditioning=call["conditioning"],
                                   reference_mel=call["reference_mel"], num_steps=3).reshape(-1))
    return alone


def _snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    error = (reference.double() - other.double()).pow(2).sum()
    return float("inf") if error == 0 else float(10 * torch.log10(reference.double().pow(2).sum() / error))


LENGTHS, SEEDS = (7, 9, 7, 7, 9, 4), (3, 1, 4, 1, 5, 9)


def test_equal_length_buckets_equal_the_per_row_path_bit_for_bit(adapter):
    import copy

    token2wav = copy.deepcopy(adapter.model.token2wav).double()
    calls = _token2wav_calls(token2wav, adapter.model.speaker_map["Chelsie"], LENGTHS, torch.float64)
    alone = _per_row(token2wav, calls, SEEDS)
    counter = _CountCalls(token2wav)
    try:
        batched = token2wav_batch(token2wav, calls, SEEDS, max_rows=2, ragged=False)
    finally:
        counter.remove()
    # Buckets by code length: 7 -> rows 0, 2, 3 (2 + 1 with max_rows=2), 9 -> 1, 4; 4 -> 5.
    assert sorted(counter.rows) == [1, 1, 2, 2]
    for row, (one, many) in enumerate(zip(alone, batched)):
        assert many.shape == one.shape and many.dtype == torch.float32, row
        assert torch.equal(many, one.float()), row
    # The caller's RNG stream does not matter, the seeds do.
    torch.manual_seed(1234)
    again = token2wav_batch(token2wav, calls, SEEDS, ragged=False)
    assert all(torch.equal(a, b) for a, b in zip(again, batched))
    other = token2wav_batch(token2wav, calls, [s + 1 for s in SEEDS], ragged=False)
    assert not torch.equal(other[0], batched[0])


def test_token2wav_never_waits_for_the_device_per_ode_step(adapter):
    """transformers' RK4 solver reads time points back from the device four times a step;
    token2wav_batch integrates the same steps without (``token2wav_solver``; bit for bit:
    the test above compares with transformers' own). 6 steps wait as often as 3, in our code
    and in transformers'."""
    import copy

    import transformers
    from sync_audit import SyncAudit

    token2wav = copy.deepcopy(adapter.model.token2wav).float()
    under = ("esn_core", str(Path(transformers.__file__).parent))
    seen = []
    for steps in (3, 6):
        calls = [{**call, "num_steps": steps} for call in _token2wav_calls(
            token2wav, adapter.model.speaker_map["Chelsie"], (7, 9, 4), torch.float32)]
        with SyncAudit(under=under) as audit:
            token2wav_batch(token2wav, calls, (3, 1, 4), max_rows=3)
        seen.append((audit.sites, audit.uploads))
    assert seen[0] == seen[1], seen


@pytest.mark.parametrize("dtype, min_snr_db", [(torch.float64, 250.0), (torch.float32, 100.0)])
def test_ragged_token2wav_equals_the_per_row_path(adapter, dtype, min_snr_db):
    """Rows of different code lengths in one call, each equal to its single-row decode.

    Measured here (CPU): float64 bit for bit (SNR infinite); float32 max |diff| ~1e-10 at a
    waveform RMS of ~8e-5 (SNR ~128 dB), the rounding of kernels run at another shape.
    """
    import copy

    token2wav = copy.deepcopy(adapter.model.token2wav).to(dtype)
    calls = _token2wav_calls(token2wav, adapter.model.speaker_map["Chelsie"], LENGTHS, dtype)
    alone = _per_row(token2wav, calls, SEEDS)
    counter = _CountCalls(token2wav)
    try:
        batched = token2wav_batch(token2wav, calls, SEEDS, max_rows=2)
    finally:
        counter.remove()
    # Longest first, two rows a call: (9, 9), (7, 7), (7, 4): three calls, one of them ragged.
    assert counter.rows == [2, 2, 2]
    for row, (one, many) in enumerate(zip(alone, batched)):
        assert many.shape == one.shape and many.dtype == torch.float32, row
        assert _snr_db(one.float(), many) >= min_snr_db, (row, _snr_db(one.float(), many))
    everything = token2wav_batch(token2wav, calls, SEEDS, max_rows=6)  # one call, 4..9 codes
    for row, (one, many) in enumerate(zip(alone, everything)):
        assert _snr_db(one.float(), many) >= min_snr_db, (row, _snr_db(one.float(), many))


def test_ragged_token2wav_without_the_masks_reads_the_padding(adapter, monkeypatch):
    """The DiT's key mask and BigVGAN's refills are both needed: each removed alone, the
    shorter row of a ragged call moves away from its single-row decode."""
    import contextlib
    import copy

    import esn_core.models.qwen_omni as qwen_omni

    token2wav = copy.deepcopy(adapter.model.token2wav).double()
    calls = _token2wav_calls(token2wav, adapter.model.speaker_map["Chelsie"], (9, 4), torch.float64)
    alone = _per_row(token2wav, calls, SEEDS[:2])
    for part in ("_dit_block_diff", "ragged_time_axis"):
        with monkeypatch.context() as patch:
            patch.setattr(qwen_omni, part, lambda *a, **k: contextlib.nullcontext())
            short = token2wav_batch(token2wav, calls, SEEDS[:2])[1]
        assert _snr_db(alone[1].float(), short) < 200, part
    assert _snr_db(alone[1].float(), token2wav_batch(token2wav, calls, SEEDS[:2])[1]) >= 250


def test_dit_mask_built_once_for_all_heads_gives_the_per_head_attention(adapter, monkeypatch):
    """SDPA gets one [rows, 1, steps, steps] mask and broadcasts it over the heads: the
    waveforms equal those of transformers' per-head masks bit for bit, ragged or not."""
    import copy

    token2wav = copy.deepcopy(adapter.model.token2wav).double()
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(tuple(kwargs["attn_mask"].shape))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    heads = token2wav.code2wav_dit_model.num_attention_heads
    for lengths in ((9, 4, 6), (5, 5)):
        calls = _token2wav_calls(token2wav, adapter.model.speaker_map["Chelsie"], lengths, torch.float64)
        masks.clear()
        shared = token2wav_batch(token2wav, calls, SEEDS[:len(lengths)])
        assert masks and all(m[1] == 1 for m in masks), masks
        masks.clear()
        per_head = token2wav_batch(token2wav, calls, SEEDS[:len(lengths)], shared_mask=False)
        assert masks and all(m[1] == heads for m in masks), masks
        for a, b in zip(shared, per_head):
            assert torch.equal(a, b), lengths


def test_initial_noise_is_handed_over_once_and_checked():
    noise = torch.arange(6.0).reshape(1, 2, 3)
    original = torch.randn
    with _initial_noise(noise):
        assert torch.randn(4).shape == (4,)  # other shapes draw as usual
        assert torch.randn([1, 2, 3]) is noise
        assert torch.randn is original  # removed at the draw
        assert not torch.equal(torch.randn(1, 2, 3), noise)
    assert torch.randn is original
    with pytest.raises(RuntimeError, match="token2wav_batch_size: 1"), _initial_noise(noise):
        pass
    assert torch.randn is original


@batched
def test_generate_decodes_equal_length_rows_in_one_token2wav_call(adapter, sources):
    inputs = adapter.prepare(requests(sources))
    seeds = [7, 8, 9]
    fixed = {"talker_min_new_tokens": SETTINGS["talker_max_new_tokens"]}  # equal code lengths
    per_row = QwenOmniAdapter.from_model(adapter.model, adapter.processor, token2wav_batch_size=1,
                                         **{k: v for k, v in SETTINGS.items() if k != "device"})
    counter = _CountCalls(adapter._token2wav())  # the float64 copy speak runs
    try:
        sequences, waves = adapter.generate(inputs, seeds, **fixed)
        assert counter.rows == [3]
        counter.rows.clear()
        sequences1, waves1 = per_row.generate(inputs, seeds, **fixed)
        assert counter.rows == [1, 1, 1]
    finally:
        counter.remove()
    assert "forward" not in vars(adapter.model.token2wav)  # the recorder is gone
    assert next(adapter.model.token2wav.parameters()).dtype == torch.float32
    assert torch.equal(sequences, sequences1)
    for one, many in zip(waves1, waves):
        assert torch.equal(many, one)


@batched
def test_generate_decodes_rows_of_different_code_lengths_in_one_call(adapter, sources):
    """Rows whose speech ends at different steps share one token2wav call, equal to per-row."""
    import sys

    from transformers import LogitsProcessorList

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from workloads import ForcedLengths

    inputs = adapter.prepare(requests(sources))
    seeds, lengths = [7, 8, 9], [3, 7, 5]

    def forced():
        return {"talker_logits_processor": LogitsProcessorList(
            [ForcedLengths(lengths, adapter.talker_eos)])}

    per_row = QwenOmniAdapter.from_model(adapter.model, adapter.processor, token2wav_batch_size=1,
                                         **{k: v for k, v in SETTINGS.items() if k != "device"})
    counter = _CountCalls(adapter._token2wav())  # the float64 copy speak runs
    try:
        sequences, waves = adapter.generate(inputs, seeds, **forced())
        assert counter.rows == [3]
        counter.rows.clear()
        sequences1, waves1 = per_row.generate(inputs, seeds, **forced())
        assert counter.rows == [1, 1, 1]
    finally:
        counter.remove()
    assert torch.equal(sequences, sequences1)
    per_code = waves[0].numel() // lengths[0]
    assert [w.numel() for w in waves] == [n * per_code for n in lengths]
    for one, many in zip(waves1, waves):
        assert torch.equal(many, one)  # float64 token2wav (the fixture's dtype): bit for bit


@batched
@pytest.mark.parametrize("tf32, during", [(True, "high"), (False, "highest")])
def test_token2wav_matrix_products_use_tf32_only_while_it_runs(adapter, sources, tf32, during):
    inputs = adapter.prepare(requests(sources)[:1])
    chosen = QwenOmniAdapter.from_model(adapter.model, adapter.processor, token2wav_tf32=tf32,
                                        **{k: v for k, v in SETTINGS.items() if k != "device"})
    seen = []
    token2wav = adapter._token2wav()  # the float64 copy speak runs
    inner = token2wav.forward
    token2wav.forward = lambda *a, **k: (seen.append(torch.get_float32_matmul_precision()),
                                         inner(*a, **k))[1]
    try:
        chosen.generate(inputs, [3])
    finally:
        del token2wav.forward
    assert seen == [during]
    assert torch.get_float32_matmul_precision() == "highest"  # restored


@batched
@pytest.mark.parametrize("overlap, during", [(True, "high"), (False, "highest")])
def test_decode_holds_token2wav_precision_only_when_speech_runs_beside_it(adapter, sources,
                                                                          overlap, during):
    """With overlap_speech a token2wav on the worker shares the one process-wide precision
    with the decode, so the decode holds it from start to end: its float32 products never
    change precision in mid-run. Without overlap the decode runs at the caller's."""
    inputs = adapter.prepare(requests(sources)[:1])
    chosen = QwenOmniAdapter.from_model(adapter.model, adapter.processor, overlap_speech=overlap,
                                        **{k: v for k, v in SETTINGS.items() if k != "device"})
    seen = []
    handle = adapter.model.thinker.register_forward_pre_hook(
        lambda *_: seen.append(torch.get_float32_matmul_precision()))
    try:
        chosen.generate_codes(inputs, [3])
    finally:
        handle.remove()
    assert seen and set(seen) == {during}
    assert torch.get_float32_matmul_precision() == "highest"


def test_float32_precision_is_shared_by_threads_and_put_back_by_the_last():
    """Two threads hold "high" with overlapping spans: it stays set until the last leaves,
    then the previous precision is back; another precision while one is held is refused."""
    import threading

    from esn_core.models.qwen_omni import float32_matmul_precision

    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with float32_matmul_precision("high"):
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with float32_matmul_precision("high"):
            second_in.set()
            first_out.wait(5)
            seen["after the first left"] = torch.get_float32_matmul_precision()
            try:
                with float32_matmul_precision("medium"):
                    pass
            except RuntimeError as error:
                seen["refused"] = str(error)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    before = torch.get_float32_matmul_precision()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"after the first left": "high", "refused": "float32 matmul precision "
                    "'medium' asked for while another thread holds 'high'"}
    assert torch.get_float32_matmul_precision() == before == "highest"
    with float32_matmul_precision(None):  # None: nothing held, nothing changed
        assert torch.get_float32_matmul_precision() == "highest"
