"""The paper's judges, loaded offline: emotion2vec (funasr), the Qwen3-Omni LALM judge,
naturalness estimators (UTMOS, DNSMOS) and the judgement table the workflow writes.

Real loading and inference code runs on tiny random-weight checkpoints of the same classes
(``tiny_judges``), saved to a temporary directory and loaded the way a user's local copy is.
"""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import polars as pl
import pytest
import soundfile as sf
import torch

from esn_core import io
from esn_core.constants import EMOTIONS, SAMPLE_RATE
from esn_core.demo_corpus import espeak_available, render_speech
from esn_core.judges.base import EmotionJudge, Judgement
from esn_core.judges.emotion2vec import UNJUDGEABLE_PREFIX, Emotion2VecJudge
from esn_core.judges.labels import map_judge_label
from esn_core.judges.lalm_judge import (
    PROMPT,
    UNPARSEABLE_PREFIX,
    LALMJudge,
    _audio_token_count,
    check_held_out,
    parse_choice,
    same_model,
    verdict_of_answer,
)
from esn_core.judges.mos import DNSMOSEstimator, MOSEstimator, UTMOSEstimator, predict_paths
from esn_core.judges.registry import judgement_rows, load_judge, load_mos_estimator
from esn_core.styles import STYLES
from tiny_judges import E2V_LABELS, tiny_emotion2vec_dir, tiny_qwen3_omni_dir

SR = SAMPLE_RATE


def voiced(seconds: float = 2.4, f0: float = 140.0, syllables_per_s: float = 3.0) -> np.ndarray:
    """An espeak-like vowel train: gliding harmonic source through three formant resonators."""
    from scipy.signal import lfilter

    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t))) / SR
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    y = np.zeros_like(source)
    for fc, bw in ((700, 130), (1220, 70), (2600, 160)):
        r, th = np.exp(-np.pi * bw / SR), 2 * np.pi * fc / SR
        y += lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], source)
    y *= 0.5 * (1 - np.cos(2 * np.pi * syllables_per_s * t))
    return 0.3 * y / np.abs(y).max()


def write_wav(path, x: np.ndarray, rate: int = SR) -> str:
    sf.write(path, x, rate, subtype="PCM_16")
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[str]:
    """Two speech-like clips (one at 22.05 kHz, resampled on load) and one too short to judge.

    Lengths fill one DNSMOS window once looped (1.2 s -> 9.6 s, 1.15 s -> 9.2 s).
    """
    root = tmp_path_factory.mktemp("clips")
    from scipy.signal import resample_poly

    a = voiced(1.2, f0=120.0)
    b = resample_poly(voiced(1.15, f0=220.0, syllables_per_s=5.0), 441, 320)
    return [
        write_wav(root / "a.wav", a),
        write_wav(root / "b.wav", b, 22050),
        write_wav(root / "short.wav", a[:200]),
    ]


# ================================================================ emotion2vec


def test_emotion2vec_label_mapping_on_its_nine_labels():
    mapped = {raw: map_judge_label(raw) for raw in E2V_LABELS}
    assert mapped == {
        "生气/angry": "angry",
        "厌恶/disgusted": None,
        "恐惧/fearful": None,
        "开心/happy": "happy",
        "中立/neutral": "neutral",
        "其他/other": None,
        "难过/sad": "sad",
        "吃惊/surprised": "surprise",
        "<unk>": None,
    }


def test_emotion2vec_refuses_hub_ids_and_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*modelscope download iic/emotion2vec_plus_large"):
        Emotion2VecJudge("iic/emotion2vec_plus_large")
    (tmp_path / "config.yaml").write_text("model: Emotion2vec\n")
    with pytest.raises(FileNotFoundError, match=r"lacks model\.pt.*emotion2vec/emotion2vec_plus_large"):
        Emotion2VecJudge(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks tokens\.txt"):
        Emotion2VecJudge(tmp_path)


@pytest.fixture(scope="module")
def e2v_judge(tmp_path_factory) -> Emotion2VecJudge:
    return Emotion2VecJudge(tiny_emotion2vec_dir(tmp_path_factory.mktemp("e2v")), batch_size=2)


def test_emotion2vec_tiny_checkpoint_scores_every_clip(e2v_judge, clips):
    assert isinstance(e2v_judge, EmotionJudge)
    assert e2v_judge.labels == E2V_LABELS
    assert e2v_judge.min_samples == 400  # the released conv stack's receptive field
    scored = e2v_judge.judge_with_scores(clips, ["0011"] * len(clips))
    assert scored.labels == E2V_LABELS and scored.scores.shape == (3, 9)
    probs = scored.scores[:2]
    assert np.all(probs > 0) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for row, verdict in zip(probs, scored.judgements[:2]):
        raw = E2V_LABELS[int(np.argmax(row))]  # full argmax over the nine labels (SPEC §3)
        assert verdict == Judgement(label=map_judge_label(raw), raw_label=raw, score=pytest.approx(row.max()))
    # the 200-sample clip is below the receptive field: recorded, not guessed
    assert np.isnan(scored.scores[2]).all()
    short = scored.judgements[2]
    assert short.label is None and short.score == 0.0 and short.raw_label.startswith(UNJUDGEABLE_PREFIX)
    assert e2v_judge.judge(clips, ["0011"] * 3) == scored.judgements


def test_emotion2vec_batches_agree_with_single_clips(e2v_judge, clips):
    from esn_core.judges.base import load_audio_16k

    waves = [load_audio_16k(p) for p in clips[:2]]
    together = e2v_judge.predict_waveforms(waves)
    alone = np.vstack([e2v_judge.predict_waveforms([w]) for w in waves])
    np.testing.assert_allclose(together, alone, rtol=1e-5)


@pytest.mark.parametrize(
    "favour, label, configuration_json",
    [("吃惊/surprised", "surprise", False), ("其他/other", None, True), ("开心/happy", "happy", True)],
)
def test_emotion2vec_argmax_label_is_mapped(tmp_path, clips, favour, label, configuration_json):
    """A classifier biased to one label: every clip gets it, mapped per SPEC §3."""
    model_dir = tiny_emotion2vec_dir(tmp_path / "m", favour=favour, configuration_json=configuration_json)
    judge = Emotion2VecJudge(model_dir)
    verdicts = judge.judge(clips[:2], ["0011", "0012"])
    assert [v.raw_label for v in verdicts] == [favour, favour]
    assert [v.label for v in verdicts] == [label, label]
    assert all(v.score > 0.99 for v in verdicts)


def test_emotion2vec_loading_leaves_global_state_alone(tmp_path):
    model_dir = tiny_emotion2vec_dir(tmp_path / "m")
    threads = torch.get_num_threads()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    Emotion2VecJudge(model_dir)  # funasr reseeds every RNG to 0 and sets its own thread count
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.get_num_threads() == threads


# ================================================================ LALM judge: answers


@pytest.mark.parametrize(
    "text, emotion",
    [
        ("B", "happy"),
        ("b", "happy"),
        ("(B)", "happy"),
        ("**C**", "angry"),
        ("B) happy", "happy"),
        ("B. Happy", "happy"),
        ("(D) sad", "sad"),
        ("Happy.", "happy"),
        ("happy", "happy"),
        ("The answer is happy", "happy"),
        ("The answer is B", "happy"),
        ("The answer is b.", "happy"),
        ("Answer: E", "surprise"),
        ("answer: e", "surprise"),
        ("Option C because the pitch is high", "angry"),
        ("I think it's D.", "sad"),
        ("Surprised!", "surprise"),
        ("NEUTRAL", "neutral"),
        ("The speaker sounds angry.", "angry"),
        ("A happy voice.", "happy"),  # the article 'A' is not option A
        ("The answer is a happy voice", "happy"),
        ("A", "neutral"),
        (" E) surprise\n", "surprise"),
    ],
)
def test_parse_choice_reads_letters_and_words(text, emotion):
    assert parse_choice(text) == emotion


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        None,
        "F",
        "Other",
        "I don't know",
        "happy or sad",
        "B) sad",  # letter and word disagree
        "A. happy",
        "The speaker is happy and surprised",
        "not happy",
        "It isn't sad",
        "fearful",
        "�M/\x1c",
        "<|im_end|>",
    ],
)
def test_parse_choice_refuses_ambiguous_or_empty_answers(text):
    assert parse_choice(text) is None


def test_prompt_lists_the_five_emotions_with_letters():
    for letter, emotion in zip("ABCDE", EMOTIONS):
        assert f"{letter}) {emotion}" in PROMPT


def test_unparseable_answers_are_recorded_never_guessed():
    assert verdict_of_answer(" B) happy ", 0.7) == Judgement("happy", "B) happy", 0.7)
    bad = verdict_of_answer("happy or sad", 0.9)
    assert bad == Judgement(None, "<unparseable: 'happy or sad'>", 0.0)
    long = verdict_of_answer("x" * 500, 0.5)
    assert long.raw_label.startswith(UNPARSEABLE_PREFIX) and len(long.raw_label) < 220


# ================================================================ LALM judge: held out, files


def test_held_out_compares_paths_and_ids(tmp_path):
    model = tmp_path / "Qwen3-Omni-30B-A3B-Instruct"
    model.mkdir()
    link = tmp_path / "link"
    link.symlink_to(model)
    assert same_model(model, link)
    assert same_model(str(model) + "/", model)
    assert same_model("Qwen/Qwen3-Omni-30B-A3B-Instruct", "qwen/qwen3-omni-30b-a3b-instruct/")
    assert same_model(model, "Qwen/Qwen3-Omni-30B-A3B-Instruct")
    assert not same_model(model, "Qwen/Qwen2.5-Omni-7B")
    other = tmp_path / "other"
    other.mkdir()
    assert not same_model(model, other)
    with pytest.raises(ValueError, match="emotion judge must be held out"):
        check_held_out(link, model)
    check_held_out(model, None)
    check_held_out(model, other)


def test_lalm_judge_refuses_the_model_under_test_before_loading(tmp_path):
    with pytest.raises(ValueError, match="emotion judge must be held out"):
        LALMJudge(tmp_path, model_under_test=str(tmp_path))  # an empty dir: refused first
    with pytest.raises(ValueError, match="emotion judge must be held out"):
        load_judge({"kind": "lalm", "path": str(tmp_path)}, model_under_test=str(tmp_path))
    with pytest.raises(ValueError, match="emotion judge must be held out"):
        load_judge({"kind": "lalm", "path": str(tmp_path), "model_under_test": str(tmp_path)})


def test_lalm_judge_names_missing_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*hf download Qwen/Qwen3-Omni-30B-A3B-Instruct"):
        LALMJudge("Qwen/Qwen3-Omni-30B-A3B-Instruct")
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        LALMJudge(tmp_path)
    for name in ("config.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks the audio processor config \(preprocessor_config"):
        LALMJudge(tmp_path)
    (tmp_path / "processor_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        LALMJudge(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks weight shard model-00002-of-00002\.safetensors"):
        LALMJudge(tmp_path)


def test_audio_token_count_matches_transformers():
    from transformers.models.qwen3_omni_moe import processing_qwen3_omni_moe as proc

    lengths = torch.arange(1, 3001)
    expected = proc._get_feat_extract_output_lengths(lengths)
    assert torch.equal(_audio_token_count(lengths, 50), torch.as_tensor(expected))


# ================================================================ LALM judge: tiny Qwen3-Omni


@pytest.fixture(scope="module")
def lalm_judge(tmp_path_factory) -> LALMJudge:
    model_dir = tiny_qwen3_omni_dir(tmp_path_factory.mktemp("qwen3omni"))
    return LALMJudge(model_dir, batch_size=2, max_new_tokens=4, model_under_test="Qwen/Qwen2.5-Omni-7B")


def test_lalm_judge_loads_thinker_only(lalm_judge):
    assert isinstance(lalm_judge, EmotionJudge)
    assert not hasattr(lalm_judge.model, "talker") and not lalm_judge.model.has_talker
    assert lalm_judge.eos_token_ids == [lalm_judge.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_lalm_prompt_holds_one_audio_token_per_encoder_frame(lalm_judge):
    proc = lalm_judge.processor
    texts = proc.apply_chat_template([lalm_judge._conversation()] * 2, add_generation_prompt=True, tokenize=False)
    assert PROMPT in texts[0] and texts[0].endswith("<|im_start|>assistant\n")
    waves = [np.zeros(SR, np.float32), np.zeros(SR * 2 + 555, np.float32)]
    inputs = proc(text=texts, audio=waves, return_tensors="pt", padding=True)
    audio_id = proc.tokenizer.convert_tokens_to_ids("<|audio_pad|>")
    per_row = (inputs["input_ids"] == audio_id).sum(-1)
    expected = _audio_token_count(inputs["feature_attention_mask"].sum(-1), 50)
    assert per_row.tolist() == expected.tolist() and per_row[1] > per_row[0]
    assert (inputs["attention_mask"][0, : int(per_row[1] - per_row[0])] == 0).all()  # left padding


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="Qwen3OmniMoeProcessor needs torchvision"
)
def test_audio_prompt_processor_matches_qwen3_omni_processor(tmp_path):
    """Without torchvision the judge builds the processor's audio inputs itself: the same ones."""
    from transformers import Qwen3OmniMoeProcessor

    from esn_core.judges.lalm_judge import _AudioPromptProcessor

    model_dir = tiny_qwen3_omni_dir(tmp_path / "m", processor="full")
    real = Qwen3OmniMoeProcessor.from_pretrained(model_dir)
    mine = _AudioPromptProcessor(model_dir, n_window=50)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}, {"type": "text", "text": PROMPT}]}]
    texts = real.apply_chat_template([conv, conv], add_generation_prompt=True, tokenize=False)
    assert mine.apply_chat_template([conv, conv], add_generation_prompt=True, tokenize=False) == texts
    waves = [voiced(0.7), voiced(2.3)]
    a = real(text=texts, audio=waves, return_tensors="pt", padding=True)
    b = mine(text=texts, audio=waves, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "input_features", "feature_attention_mask"):
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_lalm_judge_reads_a_processor_saved_by_transformers_5(tmp_path, clips):
    """processor_config.json (feature extractor nested) + chat_template.jinja, no preprocessor_config."""
    model_dir = tiny_qwen3_omni_dir(tmp_path / "m", processor="nested")
    assert not (model_dir / "preprocessor_config.json").exists()
    judge = LALMJudge(model_dir, max_new_tokens=2)
    text = judge.processor.apply_chat_template([judge._conversation()], add_generation_prompt=True, tokenize=False)[0]
    assert text.startswith("<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>") and PROMPT in text
    verdicts = judge.judge(clips[:1], ["0011"])
    assert len(verdicts) == 1 and isinstance(verdicts[0], Judgement)


def test_lalm_judge_records_each_answer(lalm_judge, clips):
    results = lalm_judge.judge_with_answers(clips, ["0011"] * len(clips))
    assert len(results) == 3
    for verdict, text in results[:2]:
        assert isinstance(text, str)
        emotion = parse_choice(text)
        if emotion is None:  # random weights: almost surely gibberish, recorded as such
            assert verdict == Judgement(None, f"<unparseable: {text.strip()!r}>", 0.0)
        else:
            assert verdict.label == emotion and 0.0 < verdict.score <= 1.0
    assert results[0][0].raw_label.startswith(UNPARSEABLE_PREFIX)  # this seed's answer is gibberish
    short, text = results[2]
    assert text is None and short.label is None and short.raw_label.startswith(UNJUDGEABLE_PREFIX)
    assert lalm_judge.judge(clips, ["0011"] * 3) == [v for v, _ in results]  # greedy: reproducible


# ================================================================ naturalness


@pytest.fixture(scope="module")
def dnsmos() -> DNSMOSEstimator:
    return DNSMOSEstimator("ovrl")


def test_dnsmos_is_named_and_ranks_clean_over_degraded(dnsmos):
    rng = np.random.default_rng(0)
    clean = voiced()
    noisy = clean + rng.normal(0.0, 0.05, clean.size)
    clipped = np.clip(8 * clean, -0.3, 0.3)
    scores = dnsmos.predict([clean, noisy, clipped, clean[:100]])
    assert dnsmos.name == "dnsmos-p835-ovrl" and isinstance(dnsmos, MOSEstimator)
    assert np.all(np.isfinite(scores[:3])) and np.all((scores[:3] >= 1) & (scores[:3] <= 5))
    assert scores[0] > scores[1] + 0.3
    assert np.isnan(scores[3])  # too short to score: no made-up value
    assert DNSMOSEstimator("p808").name == "dnsmos-p808"
    with pytest.raises(ValueError, match="metric"):
        DNSMOSEstimator("mos")


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")
def test_dnsmos_on_espeak_speech_falls_with_noise(dnsmos, tmp_path):
    speech = render_speech("The bridge was closed for repairs last winter.", STYLES["neutral"], "en-us")
    speech = np.pad(speech, (0, max(0, int(2.4 * SR) - speech.size)))[: int(2.4 * SR)]  # one window
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 1.0, speech.size)
    at_snr = [speech + noise * np.std(speech) / 10 ** (snr / 20) for snr in (10, 0)]
    paths = [write_wav(tmp_path / f"{i}.wav", np.clip(x, -1, 1)) for i, x in enumerate([speech, *at_snr])]
    clean, snr10, snr0 = predict_paths(dnsmos, paths)
    assert clean > snr10 > snr0 and 1 <= snr0 and clean <= 5


def test_utmos_names_the_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"utmos_state_dict\.pt.*hf download Blinorot/UTMOS-PyTorch"):
        UTMOSEstimator(tmp_path / "utmos_state_dict.pt")


class _TinyScriptedUTMOS(torch.nn.Module):
    """Stands in for utmos_scripted.pt: same entry point (``score`` on a (1, T) tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(40.0))

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        return 1.0 + 4.0 * torch.sigmoid(self.scale * wavs.abs().mean(dim=-1) - 2.0)

    @torch.jit.export
    def score(self, wavs: torch.Tensor) -> torch.Tensor:
        return self.forward(wavs)


def test_utmos_torchscript_checkpoint(tmp_path):
    path = tmp_path / "utmos_scripted.pt"
    torch.jit.save(torch.jit.script(_TinyScriptedUTMOS()), str(path))
    est = UTMOSEstimator(path)
    assert est.name == "utmos22_strong"
    quiet, loud = 0.01 * voiced(), voiced()
    scores = est.predict([quiet, loud, loud[:10]])
    assert 1 < scores[0] < scores[1] < 5 and np.isnan(scores[2])


def test_utmos_state_dict_must_hold_every_weight(tmp_path):
    pytest.importorskip("utmos_pytorch")
    path = tmp_path / "utmos_state_dict.pt"
    torch.save({"feature_extractors.1.embedding.weight": torch.zeros(3, 128)}, path)
    with pytest.raises(ValueError, match="weight.*missing"):
        UTMOSEstimator(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable UTMOS state dict"):
        UTMOSEstimator(path)


def test_utmos_full_size_random_state_dict(tmp_path):
    """The real network (wav2vec2 base + BLSTM) from a saved state dict, as a Lightning ckpt."""
    utmos_torch = pytest.importorskip("utmos_pytorch.utmos_torch")
    with torch.device("meta"):
        shapes = utmos_torch.UTMOSModel().state_dict()
    gen = torch.Generator().manual_seed(0)
    state = {
        k: ((torch.rand(v.shape, generator=gen) - 0.5) * 0.05).half()
        if v.is_floating_point()
        else torch.zeros(v.shape, dtype=v.dtype)
        for k, v in shapes.items()
    }
    path = tmp_path / "epoch=3-step=7459.ckpt"
    torch.save({"state_dict": state}, path)
    del state
    est = load_mos_estimator({"kind": "utmos", "checkpoint": str(path)})  # the workflow's key
    scores = est.predict([voiced(0.5)])
    assert est.name == "utmos22_strong" and np.isfinite(scores).all()


# ================================================================ registry and judgement table


def test_load_judge_rejects_unknown_kinds_and_keys(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        load_judge({"kind": "whisper", "path": "x"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batchsize'\]"):
        load_judge({"kind": "emotion2vec", "path": "x", "batchsize": 4})
    with pytest.raises(ValueError, match="needs 'path' or 'model_dir'"):
        load_judge({"kind": "emotion2vec"})
    with pytest.raises(ValueError, match="two locations"):
        load_judge({"kind": "emotion2vec", "path": "a", "model_dir": "b"})
    with pytest.raises(ValueError, match="kind must be one of"):
        load_mos_estimator({"kind": "pesq"})
    assert load_mos_estimator(None) is None


def test_load_judge_builds_each_kind(tmp_path):
    from esn_core.judges.embedded import EmbeddedJudge
    from esn_core.judges.prosody import FEATURE_NAMES

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, len(FEATURE_NAMES)))
    labels = [EMOTIONS[i % 5] for i in range(20)]
    EmbeddedJudge().fit(x, ["0011"] * 20, labels, {"0011": x[:4]}).save(tmp_path / "judge.json")
    embedded = load_judge({"kind": "embedded", "path": str(tmp_path / "judge.json")})
    assert isinstance(embedded, EmbeddedJudge) and embedded.name == "embedded"

    e2v = load_judge({"kind": "emotion2vec", "model_dir": str(tiny_emotion2vec_dir(tmp_path / "e2v")),
                      "batch_size": 4, "name": "e2v-tiny"})  # as the workflow's judge spec reads
    assert isinstance(e2v, Emotion2VecJudge) and e2v.name == "e2v-tiny" and e2v.batch_size == 4
    assert isinstance(load_mos_estimator({"kind": "dnsmos", "metric": "sig"}), DNSMOSEstimator)


def test_judgement_rows_fill_the_declared_table(e2v_judge, dnsmos, clips, tmp_path):
    attempts = pl.DataFrame({
        "attempt_id": ["a1", "a2", "a3"],
        "audio_path": clips,
        "speaker": ["0011", "0012", "0011"],
        "reference_text": ["The cat sat on the mat.", "Twenty five apples.", "Hello there."],
        "decoded_text": ["the cat sat on a mat", "25 apples", ""],
        "target_emotion": ["happy", "sad", "angry"],
    })
    table = judgement_rows(e2v_judge, attempts, mos_estimator=dnsmos)
    assert table.columns[:10] == list(io.SCHEMAS["judgements"]) and table.columns[10:] == ["score_labels", "scores"]
    assert table["attempt_id"].to_list() == ["a1", "a2", "a3"]
    assert table["judge"].to_list() == ["emotion2vec"] * 3
    assert table["wer"].to_list() == pytest.approx([1 / 6, 0.0, 1.0])
    assert table["ref_words"].to_list() == [6, 2, 2] and table["word_errors"].to_list() == [1, 0, 2]
    verdicts = e2v_judge.judge(clips, ["0011"] * 3)
    assert table["label"].to_list() == [v.label for v in verdicts]
    assert table["raw_label"].to_list() == [v.raw_label for v in verdicts]
    assert table["mos_estimator"].to_list() == ["dnsmos-p835-ovrl"] * 3
    mos = table["mos"].to_list()
    assert all(1 <= m <= 5 for m in mos[:2]) and mos[2] is None  # 200 samples: unscorable
    assert table["score_labels"][0].to_list() == list(E2V_LABELS)
    assert sum(table["scores"][0].to_list()) == pytest.approx(1.0, abs=1e-5)
    assert table["scores"][2].to_list() == [None] * 9

    out = io.write_table(table.to_arrow(), tmp_path / "judgements.parquet", "judgements", {"judge": "emotion2vec"})
    assert io.read_table(out, "judgements").num_rows == 3

    plain = judgement_rows(e2v_judge, attempts.head(0))
    assert plain.height == 0 and plain.columns[:10] == list(io.SCHEMAS["judgements"])
    with pytest.raises(ValueError, match="lack column"):
        judgement_rows(e2v_judge, attempts.drop("decoded_text"))
    with pytest.raises(ValueError, match="unique"):
        judgement_rows(e2v_judge, pl.concat([attempts, attempts]))


def test_judgement_rows_without_estimator_leave_mos_null(lalm_judge, clips):
    attempts = pl.DataFrame({
        "attempt_id": ["x", "y"],
        "audio_path": clips[:2],
        "speaker": ["0011", "0011"],
        "reference_text": ["one two", "three"],
        "decoded_text": ["one two", "four"],
    })
    table = judgement_rows(lalm_judge, attempts)
    assert table.columns == list(io.SCHEMAS["judgements"])  # no score distribution for an LALM
    assert table["judge"].to_list() == ["qwen3-omni"] * 2
    assert table["mos"].null_count() == 2 and table["mos_estimator"].null_count() == 2
    assert table["wer"].to_list() == [0.0, 1.0]
