"""Prosodic features, the softmax regression and the embedded acoustic emotion judge.

Features are checked on synthetic signals whose answers are known (tones, chirps, gated
harmonic complexes); the regression on separable data and against finite differences;
the judge end to end on espeak-ng speech rendered with the emotion STYLES, calibrated on
two voices and scored on a third it never saw.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import polars as pl
import pytest
import soundfile as sf

from esn_core.constants import EMOTIONS, SAMPLE_RATE
from esn_core.judges.base import EmotionJudge, Judgement, load_audio_16k
from esn_core.judges.embedded import (
    EmbeddedJudge,
    UnknownSpeakerError,
    fit_softmax,
    softmax_loss_and_grad,
    softmax_probs,
)
from esn_core.judges.prosody import FEATURE_NAMES, extract_features, f0_track, hz_to_semitones
from esn_core.styles import STYLES
from esn_core.demo_corpus import SENTENCES as DEMO_SENTENCES

SR = SAMPLE_RATE


def feature(x: np.ndarray, name: str, sample_rate: int = SR) -> float:
    return float(extract_features(x, sample_rate).values[FEATURE_NAMES.index(name)])


def tone(hz: float, seconds: float = 3.0, amp: float = 0.3, sample_rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return amp * np.sin(2 * np.pi * hz * t)


def log_chirp(f_start: float, f_end: float, seconds: float = 3.0) -> np.ndarray:
    """Exponential sweep: pitch in semitones rises linearly in time."""
    t = np.arange(int(seconds * SR)) / SR
    k = np.log(f_end / f_start) / seconds
    return 0.3 * np.sin(2 * np.pi * f_start * (np.exp(k * t) - 1) / k)


def syllable_train(rate_hz: float, seconds: float = 3.0, f0: float = 150.0) -> np.ndarray:
    """A harmonic complex whose loudness swells ``rate_hz`` times a second (20 dB dips)."""
    t = np.arange(int(seconds * SR)) / SR
    carrier = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 20))
    swell = 0.1 + 0.9 * (0.5 - 0.5 * np.cos(2 * np.pi * rate_hz * t)) ** 2
    return 0.1 * carrier * swell


# ---------------------------------------------------------------- prosodic features


def test_feature_vector_matches_names():
    feats = extract_features(tone(200))
    assert feats.values.shape == (len(FEATURE_NAMES),)
    assert list(feats.as_dict()) == list(FEATURE_NAMES)


def test_pure_tone_pitch_is_known():
    x = tone(200.0)
    f0, voiced = f0_track(x)
    assert voiced.mean() > 0.95
    assert np.allclose(f0[voiced], 200.0, rtol=0.02)
    assert feature(x, "f0_mean_st") == pytest.approx(12.0, abs=0.05)  # 200 Hz = 12 st re 100 Hz
    assert feature(x, "f0_std_st") < 0.01
    assert feature(x, "voiced_fraction") > 0.95


@pytest.mark.parametrize("hz", [65.0, 110.0, 330.0, 480.0])
def test_pitch_across_the_search_range(hz):
    f0, voiced = f0_track(tone(hz, seconds=1.0))
    assert np.median(f0[voiced]) == pytest.approx(hz, rel=0.01)


def test_other_sample_rates_are_resampled():
    x = tone(200.0, sample_rate=22050)
    assert feature(x, "f0_mean_st", sample_rate=22050) == pytest.approx(12.0, abs=0.05)


def test_octave_chirp_spans_twelve_semitones():
    x = log_chirp(150.0, 300.0)
    f0, voiced = f0_track(x)
    st = hz_to_semitones(f0[voiced])
    # Frame centres run from 20 ms to 2.98 s, where the sweep is at these pitches.
    first = hz_to_semitones(150.0) + 12.0 * 0.02 / 3.0
    last = hz_to_semitones(150.0) + 12.0 * 2.98 / 3.0
    assert st.min() == pytest.approx(first, abs=0.2)
    assert st.max() == pytest.approx(last, abs=0.2)
    # p95 - p5 of a linear ramp is 90 % of its extent: 0.9 x ~11.9 st.
    assert feature(x, "f0_range_st") == pytest.approx(0.9 * (last - first), abs=0.3)


@pytest.mark.parametrize("rate", [3.0, 5.0])
def test_syllable_rate_counts_loudness_swells(rate):
    x = syllable_train(rate)
    peaks = feature(x, "syllable_rate_hz") * feature(x, "active_duration_s")
    assert abs(peaks - rate * 3.0) <= 1.0


def test_doubling_amplitude_adds_six_db_and_nothing_else():
    x = syllable_train(4.0)
    base, loud = extract_features(x).as_dict(), extract_features(2.0 * x).as_dict()
    assert loud["energy_mean_db"] - base["energy_mean_db"] == pytest.approx(20 * np.log10(2), abs=1e-6)
    for name in ("f0_mean_st", "f0_range_st", "energy_std_db", "active_duration_s", "syllable_rate_hz"):
        assert loud[name] == pytest.approx(base[name], abs=1e-6)


@pytest.mark.parametrize(
    "signal, reason",
    [
        (np.zeros(SR), "silent"),
        (np.zeros(10), "silent"),
        (np.zeros(0), "silent"),
        (tone(200.0, seconds=0.05), "too short"),
        (np.random.default_rng(0).normal(0, 0.1, SR), "no voiced"),
    ],
)
def test_unmeasurable_clips_are_flagged_and_finite(signal, reason):
    feats = extract_features(signal)
    assert not feats.reliable
    assert reason in feats.reason
    assert np.all(np.isfinite(feats.values))


def test_non_finite_samples_do_not_propagate():
    x = tone(200.0)
    x[1000:1100] = np.nan
    x[5000] = np.inf
    feats = extract_features(x)
    assert feats.reliable and np.all(np.isfinite(feats.values))


def test_three_seconds_are_analysed_in_milliseconds():
    x = log_chirp(150.0, 300.0)
    extract_features(x)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        extract_features(x)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.05


# ---------------------------------------------------------------- softmax regression


def separable_blobs(rng: np.random.Generator, n_per_class: int = 30) -> tuple[np.ndarray, np.ndarray]:
    centres = np.array([[0, 0, 0], [6, 0, 0], [0, 6, 0], [0, 0, 6], [6, 6, 6]], dtype=float)
    x = np.concatenate([c + rng.normal(0, 0.4, (n_per_class, 3)) for c in centres])
    return x, np.repeat(np.arange(5), n_per_class)


def test_softmax_separates_separable_data():
    rng = np.random.default_rng(1)
    x, y = separable_blobs(rng)
    weights, bias = fit_softmax(x, y, n_classes=5, l2=1e-4)
    assert np.all(softmax_probs(x, weights, bias).argmax(axis=1) == y)
    fresh_x, fresh_y = separable_blobs(rng)
    assert np.all(softmax_probs(fresh_x, weights, bias).argmax(axis=1) == fresh_y)


def test_softmax_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 5, 40)
    theta = rng.normal(size=(4 + 1) * 5)
    _, grad = softmax_loss_and_grad(theta, x, y, l2=0.3)
    eps = 1e-6
    numeric = np.array([
        (softmax_loss_and_grad(theta + eps * e, x, y, 0.3)[0]
         - softmax_loss_and_grad(theta - eps * e, x, y, 0.3)[0]) / (2 * eps)
        for e in np.eye(theta.size)
    ])
    assert np.allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def synthetic_prosody(rng, speaker_shift: float, n: int = 12):
    """Prosody rows whose f0 carries the emotion plus a per-speaker pitch offset."""
    rows, labels = [], []
    for k, emotion in enumerate(EMOTIONS):
        block = rng.normal(0, 0.3, (n, len(FEATURE_NAMES)))
        block[:, 0] += 3.0 * k + speaker_shift  # f0_mean_st
        rows.append(block)
        labels += [emotion] * n
    return np.concatenate(rows), labels


def fit_two_voices(rng, speaker_scale: str = "pooled") -> EmbeddedJudge:
    train, speakers, labels, refs = [], [], [], {}
    for spk, shift in (("low", 0.0), ("high", 12.0)):
        rows, labs = synthetic_prosody(rng, shift)
        train.append(rows)
        speakers += [spk] * len(rows)
        labels += labs
        refs[spk] = rows[: len(rows) // 5]  # the neutral block
    return EmbeddedJudge(speaker_scale=speaker_scale).fit(np.concatenate(train), speakers, labels, refs)


def test_per_speaker_normalisation_removes_voice_pitch():
    rng = np.random.default_rng(3)
    judge = fit_two_voices(rng)
    test_rows, test_labels = synthetic_prosody(rng, -7.0)
    judge.add_speaker_reference_features("new", test_rows[: len(test_rows) // 5])
    predicted, probs = judge.predict_features(test_rows, ["new"] * len(test_rows))
    assert predicted == test_labels
    assert np.allclose(probs.sum(axis=1), 1.0)
    # Shifting a voice and its reference together changes nothing.
    judge.add_speaker_reference_features("new+5", test_rows[: len(test_rows) // 5] + 5.0)
    _, shifted = judge.predict_features(test_rows + 5.0, ["new+5"] * len(test_rows))
    assert np.allclose(shifted, probs)


# ---------------------------------------------------------------- end to end on espeak speech

SENTENCES = DEMO_SENTENCES[:8]  # the demo corpus's own sentences
# (voice, espeak pitch offset): two male voices of different accents calibrate; the held-out
# speaker is a female voice far above both, which raw (unnormalised) features misjudge.
VOICES = {"s1": ("en-us+m3", -6), "s2": ("en-gb-x-rp+m4", 2), "s3": ("en-us+f4", 8)}


def render(text: str, style, voice: str, pitch_offset: int) -> np.ndarray:
    from esn_core.demo_corpus import render_speech

    return render_speech(text, style, voice, pitch_offset)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pl.DataFrame:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    out = tmp_path_factory.mktemp("espeak")
    rng = np.random.default_rng(7)
    rows = []
    for spk, (voice, offset) in VOICES.items():
        for emotion in EMOTIONS:
            for i, text in enumerate(SENTENCES):
                path = out / f"{spk}_{emotion}_{i}.wav"
                sf.write(path, render(text, STYLES[emotion].jitter(rng), voice, offset), SR)
                rows.append({"path": str(path), "speaker": spk, "emotion": emotion, "index": i + 1})
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def judge(corpus) -> EmbeddedJudge:
    return EmbeddedJudge.calibrate(corpus, ["s1", "s2"])


def test_held_out_speaker_accuracy(judge, corpus):
    report = judge.held_out_report(corpus, ["s3"])
    print(f"held-out speaker accuracy {report['accuracy']:.3f} on n={report['n']}: {report['confusion']}")
    assert report["n"] == 5 * len(SENTENCES) - 4  # 4 of 8 neutral clips serve as reference
    assert np.sum(report["confusion"]) == report["n"]
    assert report["accuracy"] >= 0.85


def test_calibration_speakers_are_refused_as_held_out(judge, corpus):
    with pytest.raises(ValueError, match="s1"):
        judge.held_out_report(corpus, ["s1"])


def test_save_load_round_trip_predicts_identically(judge, corpus, tmp_path):
    paths = corpus.filter(pl.col("speaker") == "s1")["path"].to_list()[::4]
    speakers = ["s1"] * len(paths)
    target = tmp_path / "nested" / "judge.json"
    judge.save(target)
    assert [p.name for p in target.parent.iterdir()] == ["judge.json"]  # no temp file left
    blob = json.loads(target.read_text())
    assert blob["version"] == 1 and blob["feature_names"] == list(judge.features)
    assert target.stat().st_size < 20_000
    loaded = EmbeddedJudge.load(target)
    labels, probs = judge.predict(paths, speakers)
    labels2, probs2 = loaded.predict(paths, speakers)
    assert labels == labels2 and np.array_equal(probs, probs2)


def test_speaker_scale_absorbs_a_more_expressive_voice():
    """With speaker_scale='speaker', stretching a voice and its reference about the
    neutral mean (a speaker twice as variable) leaves the verdicts unchanged."""
    rng = np.random.default_rng(4)
    judge = fit_two_voices(rng, speaker_scale="speaker")
    rows, _ = synthetic_prosody(rng, 3.0, n=200)  # a long reference: shrinkage negligible
    neutral = rows[:200]
    stretched = neutral.mean(axis=0) + 2.0 * (rows - neutral.mean(axis=0))
    judge.add_speaker_reference_features("calm", neutral)
    judge.add_speaker_reference_features("lively", stretched[:200])
    calm, _ = judge.predict_features(rows, ["calm"] * len(rows))
    lively, _ = judge.predict_features(stretched, ["lively"] * len(rows))
    assert np.mean(np.array(calm) == np.array(lively)) >= 0.98  # shrinkage moves a few
    z_calm = judge.normalise(rows, ["calm"] * len(rows))
    z_lively = judge.normalise(stretched, ["lively"] * len(rows))
    assert np.allclose(z_lively, z_calm, rtol=0.02, atol=0.02)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="pitch_mean"):
        EmbeddedJudge(features=["pitch_mean"])
    with pytest.raises(ValueError, match="speaker_scale"):
        EmbeddedJudge(speaker_scale="global")
    with pytest.raises(RuntimeError, match="not fitted"):
        EmbeddedJudge().predict_features(np.zeros((1, len(FEATURE_NAMES))), ["s1"])


def test_load_refuses_other_formats(tmp_path):
    bad = tmp_path / "judge.json"
    bad.write_text(json.dumps({"format": "esn_core.embedded_judge", "version": 99}))
    with pytest.raises(ValueError, match="version"):
        EmbeddedJudge.load(bad)


def test_unknown_speaker_is_named(judge, corpus):
    path = corpus["path"][0]
    with pytest.raises(UnknownSpeakerError, match="'s9'"):
        judge.predict([path], ["s9"])
    with pytest.raises(UnknownSpeakerError, match="s9"):
        judge.judge([path], ["s9"])


def test_new_speaker_from_neutral_waveforms(judge, corpus, tmp_path):
    fresh = EmbeddedJudge.load(judge.save(tmp_path / "judge.json"))  # leave the fixture alone
    s3 = corpus.filter(pl.col("speaker") == "s3")
    neutral = [load_audio_16k(p) for p in s3.filter(pl.col("emotion") == "neutral")["path"]]
    fresh.add_speaker_reference("s3", neutral)
    clips = s3.filter(pl.col("index") == 2)
    labels, probs = fresh.predict([load_audio_16k(p) for p in clips["path"]], ["s3"] * clips.height)
    assert probs.shape == (clips.height, len(EMOTIONS))
    assert np.mean(np.array(labels) == clips["emotion"].to_numpy()) >= 0.8


def test_judge_interface(judge, corpus, tmp_path):
    assert isinstance(judge, EmotionJudge) and judge.name == "embedded"
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(SR, dtype=np.float32), SR)
    row = corpus.filter((pl.col("speaker") == "s1") & (pl.col("emotion") == "sad")).row(0, named=True)
    verdicts = judge.judge([row["path"], str(silent)], ["s1", "s1"])
    assert all(isinstance(v, Judgement) for v in verdicts)
    assert verdicts[0].label in EMOTIONS and verdicts[0].raw_label == verdicts[0].label
    assert 0.2 <= verdicts[0].score <= 1.0
    assert verdicts[1].label is None and "silent" in verdicts[1].raw_label and verdicts[1].score == 0.0
