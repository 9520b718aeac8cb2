"""ESD reader, split rule and espeak demo corpus."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import soundfile as sf

from esn_core import corpus
from esn_core.constants import ESD_FOLDERS
from esn_core.corpus import (
    CorpusError,
    SplitRule,
    assign_splits,
    decode_transcript,
    emotion_and_index,
    parse_transcript_line,
    read_esd,
    read_manifest,
    write_manifest,
)

ESD = "Emotion Speech Dataset"
TEXTS = ["The nine the eggs, I keep.", "I am going to the stadium.", "Dont ask me to carry an oily rag."]


# --------------------------------------------------------------------- tree builder


def tone(seconds: float = 0.1, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def transcript_lines(speaker: str, texts: list[str]) -> list[str]:
    return [f"{speaker}_{b * 350 + i:06d}\t{text}\t{folder}"
            for b, folder in enumerate(ESD_FOLDERS) for i, text in enumerate(texts, 1)]


def old_split_dir(index: int) -> str:
    # The older layout per emotion block: first 20 evaluation, next 30 test, rest train.
    return "evaluation" if index <= 20 else "test" if index <= 50 else "train"


def make_tree(base: Path, speakers=("0011",), texts=TEXTS, layout="flat",
              lines: dict[str, list[str]] | None = None, encoding="ascii") -> Path:
    """An ESD-like tree of short tones; returns the ``Emotion Speech Dataset`` folder."""
    root = base / ESD
    for speaker in speakers:
        spk_lines = (lines or {}).get(speaker, transcript_lines(speaker, texts))
        (root / speaker).mkdir(parents=True)
        (root / speaker / f"{speaker}.txt").write_bytes("\n".join(spk_lines).encode(encoding))
        for b, folder in enumerate(ESD_FOLDERS):
            for i in range(1, len(texts) + 1):
                sub = root / speaker / folder
                if layout == "split":
                    sub = sub / old_split_dir(i if i < 3 else 60)
                sub.mkdir(parents=True, exist_ok=True)
                sf.write(sub / f"{speaker}_{b * 350 + i:06d}.wav", tone(0.05 * i), 16000,
                         subtype="PCM_16")
    return root


def wav_path(root: Path, speaker: str, folder: str, number: int) -> Path:
    return next((root / speaker / folder).rglob(f"{speaker}_{number:06d}.wav"))


# ------------------------------------------------------------------------ reading


def test_flat_tree_rows_and_columns(tmp_path):
    root = make_tree(tmp_path, speakers=("0011", "0012"))
    m = read_esd(tmp_path)
    assert m.columns == list(corpus.io.SCHEMAS["manifest"])
    assert m.height == 2 * 5 * 3
    row = m.filter(pl.col("utterance_id") == "0012_000702").row(0, named=True)
    assert row["speaker"] == "0012" and row["emotion"] == "happy" and row["index"] == 2
    assert row["transcript"] == TEXTS[1] and row["reference_text"] == TEXTS[1]
    assert row["path"] == str((root / "0012" / "Happy" / "0012_000702.wav").resolve())
    assert row["duration_s"] == pytest.approx(0.1) and row["sample_rate"] == 16000


def test_both_layouts_give_the_same_manifest(tmp_path):
    make_tree(tmp_path / "flat", speakers=("0011", "0013"))
    make_tree(tmp_path / "split", speakers=("0011", "0013"), layout="split")
    flat, split = read_esd(tmp_path / "flat"), read_esd(tmp_path / "split")
    assert any("/evaluation/" in p for p in split["path"]) and any("/train/" in p for p in split["path"])
    drop_dirs = pl.col("path").str.split("/").list.last()
    assert flat.with_columns(drop_dirs).equals(split.with_columns(drop_dirs))


def test_root_may_be_the_esd_folder_or_its_parent(tmp_path):
    root = make_tree(tmp_path)
    assert read_esd(root).equals(read_esd(tmp_path))
    with pytest.raises(CorpusError, match="no ESD tree"):
        read_esd(tmp_path / ESD / "0011" / "Neutral")


def test_non_english_speakers_ignored_and_speakers_argument_restricts(tmp_path):
    make_tree(tmp_path, speakers=("0003", "0011", "0012", "0014"))
    assert read_esd(tmp_path)["speaker"].unique().sort().to_list() == ["0011", "0012", "0014"]
    assert read_esd(tmp_path, speakers=["12"])["speaker"].unique().to_list() == ["0012"]
    with pytest.raises(CorpusError, match="0015"):
        read_esd(tmp_path, speakers=["0015"])
    with pytest.raises(CorpusError, match="not an English"):
        read_esd(tmp_path, speakers=["0003"])


# -------------------------------------------------------------------- transcripts


@pytest.mark.parametrize("encoding", ["ascii", "utf-16", "latin-1", "utf-8"])
def test_transcript_encodings(tmp_path, encoding):
    texts = TEXTS if encoding == "ascii" else ["Café au lait, s'il vous plaît.", *TEXTS[1:]]
    raw = "\n".join(transcript_lines("0011", texts)).encode(encoding)
    if encoding == "utf-16":
        assert raw[:2] == b"\xff\xfe"  # Python writes the BOM, as ESD's UTF-16LE files have
    assert decode_transcript(raw).splitlines()[0] == f"0011_000001\t{texts[0]}\tNeutral"
    make_tree(tmp_path, texts=texts, encoding=encoding)
    m = read_esd(tmp_path)
    assert m.filter(pl.col("index") == 1)["reference_text"].unique().to_list() == [texts[0]]


@pytest.mark.parametrize("line", [
    "0015_000137\tThe nine the eggs, I keep.\tNeutral",
    "0015_000137 The nine the eggs, I keep.\tNeutral",   # space for the first tab
    "0015_000137\tThe nine the eggs, I keep. Neutral",   # space for the second tab
    "0015_000137 The nine the eggs, I keep. Neutral\r",  # both, with a CR
])
def test_transcript_line_with_space_instead_of_tab(line):
    parsed = parse_transcript_line(line)
    assert (parsed.utterance_id, parsed.text, parsed.emotion) == \
        ("0015_000137", "The nine the eggs, I keep.", "neutral")


def test_transcript_line_without_emotion_or_id():
    assert parse_transcript_line("0011_000004\tJust words.").text == "Just words."
    assert parse_transcript_line("0011_000004\tJust words.").emotion is None
    assert parse_transcript_line("ReadMe: speaker 11") is None
    assert parse_transcript_line("") is None


def test_space_separated_lines_read_in_the_tree(tmp_path):
    lines = transcript_lines("0011", TEXTS)
    lines[0] = lines[0].replace("\t", " ", 1)
    lines[4] = " ".join(lines[4].rsplit("\t", 1))
    make_tree(tmp_path, lines={"0011": lines})
    m = read_esd(tmp_path, strict=True)
    assert m.filter(pl.col("utterance_id") == "0011_000001")["transcript"].item() == TEXTS[0]
    assert m.filter(pl.col("utterance_id") == "0011_000352")["transcript"].item() == TEXTS[1]


def test_neutral_transcript_is_the_reference(tmp_path):
    lines = transcript_lines("0011", TEXTS)
    surprise_2 = lines.index(f"0011_001402\t{TEXTS[1]}\tSurprise")
    lines[surprise_2] = "0011_001402\tam going to the stadium.\tSurprise"
    make_tree(tmp_path, lines={"0011": lines})
    row = read_esd(tmp_path).filter(pl.col("utterance_id") == "0011_001402").row(0, named=True)
    assert row["transcript"] == "am going to the stadium."
    assert row["reference_text"] == TEXTS[1]


# ---------------------------------------------------------------- skips and errors


def test_missing_wav_is_skipped_with_count_or_strict_error(tmp_path, caplog):
    root = make_tree(tmp_path)
    (root / "0011" / "Sad" / "0011_001052.wav").unlink()
    (root / "0011" / "Angry" / "0011_000353.wav").unlink()
    with caplog.at_level(logging.WARNING, logger="esn_core.corpus"):
        m = read_esd(tmp_path)
    assert m.height == 13
    assert "0011_001052" not in m["utterance_id"].to_list()
    assert "skipped 2 item(s): listed in the transcript but no wav" in caplog.text
    with pytest.raises(CorpusError, match="0011_000353"):
        read_esd(tmp_path, strict=True)


def test_empty_and_unreadable_wavs_are_skipped(tmp_path, caplog):
    root = make_tree(tmp_path)
    sf.write(root / "0011" / "Happy" / "0011_000701.wav", np.zeros(0), 16000)
    (root / "0011" / "Happy" / "0011_000702.wav").write_bytes(b"")
    (root / "0011" / "Happy" / "0011_000703.wav").write_bytes(b"RIFF garbage")
    with caplog.at_level(logging.WARNING, logger="esn_core.corpus"):
        m = read_esd(tmp_path)
    assert m.height == 12 and "happy" not in m["emotion"].to_list()
    assert "skipped 3 item(s): empty or unreadable wav" in caplog.text
    with pytest.raises(CorpusError, match="empty or unreadable"):
        read_esd(tmp_path, strict=True)


def test_wav_without_transcript_line_is_skipped(tmp_path, caplog):
    lines = [ln for ln in transcript_lines("0011", TEXTS) if not ln.startswith("0011_000703")]
    make_tree(tmp_path, lines={"0011": lines})
    with caplog.at_level(logging.WARNING, logger="esn_core.corpus"):
        assert read_esd(tmp_path).height == 14
    assert "skipped 1 item(s): wav without a transcript line" in caplog.text


def test_lines_without_neutral_reference_contradicting_label_or_id(tmp_path, caplog):
    lines = [ln for ln in transcript_lines("0011", TEXTS) if not ln.startswith("0011_000003")]
    lines[lines.index(f"0011_000351\t{TEXTS[0]}\tAngry")] = f"0011_000351\t{TEXTS[0]}\tNeutral"
    make_tree(tmp_path, lines={"0011": ["Speaker 0011 transcript", *lines]})
    with caplog.at_level(logging.WARNING, logger="esn_core.corpus"):
        m = read_esd(tmp_path)
    # index 3: neutral wav has no line, the other four have no reference; 000351 mislabelled
    assert sorted(set(range(1, 4)) - set(m["index"])) == [3]
    assert m.height == 15 - 5 - 1
    assert "skipped 4 item(s): no Neutral transcript line" in caplog.text
    assert "skipped 1 item(s): transcript names another emotion" in caplog.text
    assert "skipped 1 item(s): transcript line without an utterance id" in caplog.text
    with pytest.raises(CorpusError, match="without an utterance id"):
        read_esd(tmp_path, strict=True)


def test_stereo_44k_wav_is_resampled_into_the_cache(tmp_path, caplog):
    root = make_tree(tmp_path)
    src = root / "0011" / "Angry" / "0011_000352.wav"
    sf.write(src, tone(0.5, 44100, channels=2), 44100, subtype="PCM_16")
    with pytest.raises(CorpusError, match="cache_dir"):
        read_esd(tmp_path)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="esn_core.corpus"):
        m = read_esd(tmp_path, cache_dir=cache)
    assert "resampled 1 wav(s)" in caplog.text
    row = m.filter(pl.col("utterance_id") == "0011_000352").row(0, named=True)
    assert Path(row["path"]) == (cache / "0011" / "angry" / "0011_000352.wav").resolve()
    info = sf.info(row["path"])
    assert (info.samplerate, info.channels, info.frames) == (16000, 1, 8000)
    assert row["duration_s"] == pytest.approx(0.5) and row["sample_rate"] == 16000
    audio, _ = sf.read(row["path"])
    assert np.abs(audio[1000:7000]).max() == pytest.approx(0.3, abs=0.01)  # level kept
    # A second read reuses the converted file.
    mtime = Path(row["path"]).stat().st_mtime_ns
    read_esd(tmp_path, cache_dir=cache)
    assert Path(row["path"]).stat().st_mtime_ns == mtime


def test_id_in_the_wrong_emotion_block_names_the_file(tmp_path):
    root = make_tree(tmp_path)
    wrong = root / "0011" / "Sad" / "0011_000360.wav"  # 360 is in the Angry block
    sf.write(wrong, tone(), 16000)
    with pytest.raises(CorpusError, match=r"0011_000360\.wav.*Angry block"):
        read_esd(tmp_path)


def test_badly_named_or_foreign_wavs_are_errors(tmp_path):
    root = make_tree(tmp_path)
    sf.write(root / "0011" / "Sad" / "0012_001051.wav", tone(), 16000)
    with pytest.raises(CorpusError, match="speaker 0012 inside speaker folder 0011"):
        read_esd(tmp_path)
    (root / "0011" / "Sad" / "0012_001051.wav").unlink()
    sf.write(root / "0011" / "Sad" / "take2.wav", tone(), 16000)
    with pytest.raises(CorpusError, match="take2.wav"):
        read_esd(tmp_path)


def test_duplicate_id_across_layouts_is_an_error(tmp_path):
    root = make_tree(tmp_path)
    (root / "0011" / "Sad" / "train").mkdir()
    sf.write(root / "0011" / "Sad" / "train" / "0011_001051.wav", tone(), 16000)
    with pytest.raises(CorpusError, match="0011_001051 also at"):
        read_esd(tmp_path)


def test_unknown_emotion_folder_is_an_error_naming_it(tmp_path):
    root = make_tree(tmp_path)
    (root / "0011" / "Fearful").mkdir()
    (root / "0011" / ".ipynb_checkpoints").mkdir()  # hidden folders are ignored
    with pytest.raises(CorpusError, match=r"0011/Fearful: unknown emotion folder"):
        read_esd(tmp_path)


def test_missing_transcript_is_an_error(tmp_path):
    root = make_tree(tmp_path)
    (root / "0011" / "0011.txt").unlink()
    with pytest.raises(CorpusError, match="0011.txt: transcript not found"):
        read_esd(tmp_path)


def test_manifest_roundtrip(tmp_path):
    make_tree(tmp_path / "tree")
    m = read_esd(tmp_path / "tree")
    out = write_manifest(m, tmp_path / "manifest.parquet", provenance={"source": "test"})
    assert read_manifest(out).equals(m)
    with pytest.raises(CorpusError, match="disgust"):
        write_manifest(m.with_columns(pl.lit("disgust").alias("emotion")), tmp_path / "bad.parquet")


# ---------------------------------------------------------------------- file ids


@pytest.mark.parametrize("number,expected", [
    (1, ("Neutral", 1)), (350, ("Neutral", 350)), (351, ("Angry", 1)),
    (1050, ("Happy", 350)), (1051, ("Sad", 1)), (1750, ("Surprise", 350)),
])
def test_emotion_and_index(number, expected):
    assert emotion_and_index(number) == expected


@pytest.mark.parametrize("number", [0, 1751])
def test_emotion_and_index_out_of_range(number):
    with pytest.raises(ValueError):
        emotion_and_index(number)


# ------------------------------------------------------------------------- splits


def synthetic_manifest(n_speakers: int, n_indices: int) -> pl.DataFrame:
    rows = [(f"{11 + s:04d}", e, i) for s in range(n_speakers)
            for e in ("neutral", "sad") for i in range(1, n_indices + 1)]
    return pl.DataFrame(rows, schema=["speaker", "emotion", "index"], orient="row")


def test_spec_rule_reproduces_table_1():
    m = assign_splits(synthetic_manifest(10, 350), SplitRule())
    counts = dict(m.filter(pl.col("emotion") == "neutral").group_by("split").len().iter_rows())
    # Table 1's per-speaker ranges give DEVELOPMENT 6*50 + 2*250 = 800; the table's printed
    # total 1100 is an arithmetic slip (its totals sum to 3800 > 10 * 350 sources).
    assert counts == {"identification": 1200, "development": 800, "test_seen": 800, "test_unseen": 700}
    assert sum(counts.values()) == 10 * 350
    roles = SplitRule().speaker_roles([f"{n:04d}" for n in range(20, 10, -1)])
    assert [s for s, r in roles.items() if r == "dev"] == ["0017", "0018"]
    assert [s for s, r in roles.items() if r == "unseen"] == ["0019", "0020"]
    # Parallel index -> same split for every emotion of a speaker.
    by_key = m.group_by("speaker", "index").agg(pl.col("split").n_unique())
    assert by_key["split"].max() == 1


def test_spec_rule_boundaries():
    rule = SplitRule()
    assert [rule.split_of("train", i) for i in (200, 201, 250, 251, 350)] == \
        ["identification", "development", "development", "test_seen", "test_seen"]
    assert [rule.split_of("dev", i) for i in (1, 250, 251)] == ["development", "development", "test_seen"]
    assert rule.split_of("unseen", 1) == "test_unseen"


def test_default_rule_is_chosen_from_the_max_index():
    assert SplitRule.for_demo(350) == SplitRule()
    full = assign_splits(synthetic_manifest(10, 350))
    assert full.equals(assign_splits(synthetic_manifest(10, 350), SplitRule()))


@pytest.mark.parametrize("n_speakers,roles", [
    (1, ["train"]), (2, ["train", "unseen"]), (3, ["train", "dev", "unseen"]),
    (4, ["train", "train", "dev", "unseen"]), (5, ["train"] * 3 + ["dev", "unseen"]),
    (10, ["train"] * 6 + ["dev"] * 2 + ["unseen"] * 2),
])
def test_speaker_roles_scale_with_speaker_count(n_speakers, roles):
    speakers = [f"{11 + k:04d}" for k in range(n_speakers)]
    assert list(SplitRule().speaker_roles(speakers).values()) == roles


@pytest.mark.parametrize("n_indices,cuts", [
    (40, (23, 29)), (10, (6, 7)), (3, (1, 2)), (2, (1, 2)), (1, (1, 2)), (350, (200, 250)),
])
def test_demo_rule_index_cuts(n_indices, cuts):
    rule = SplitRule.for_demo(n_indices)
    assert (rule.identification_end, rule.development_end) == cuts


def test_demo_rule_on_demo_sized_manifest():
    m = assign_splits(synthetic_manifest(5, 40))  # default demo: 5 speakers x 40
    counts = dict(m.filter(pl.col("emotion") == "neutral").group_by("split").len().iter_rows())
    assert counts == {"identification": 3 * 23, "development": 3 * 6 + 29,
                      "test_seen": 4 * 11, "test_unseen": 40}
    with pytest.raises(ValueError):
        SplitRule.for_demo(0)
    with pytest.raises(ValueError):
        SplitRule(dev_fraction=0.5, unseen_fraction=0.5)


# --------------------------------------------------------------- espeak demo corpus

demo_corpus = pytest.importorskip("esn_core.demo_corpus")
needs_espeak = pytest.mark.skipif(not demo_corpus.espeak_available(), reason="espeak-ng not installed")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@needs_espeak
def test_tiny_demo_corpus_reads_back_and_is_deterministic(tmp_path):
    root = demo_corpus.generate_demo_corpus(tmp_path / "a", n_speakers=2, n_utterances=3, seed=7)
    assert root == tmp_path / "a" / ESD
    m = read_esd(tmp_path / "a", strict=True)
    assert m.height == 2 * 5 * 3
    assert (m["transcript"] == m["reference_text"]).all()
    assert set(m["sample_rate"]) == {16000} and m["duration_s"].min() > 0.5
    assert dict(m.filter(pl.col("emotion") == "neutral").group_by("split").len().iter_rows()) == \
        {"identification": 1, "development": 1, "test_seen": 1, "test_unseen": 3}
    sentences = demo_corpus.demo_sentences(3, seed=7)
    assert m.filter(pl.col("utterance_id") == "0012_001403")["transcript"].item() == sentences[2]
    again = demo_corpus.generate_demo_corpus(tmp_path / "b", n_speakers=2, n_utterances=3, seed=7, workers=1)
    assert tree_digest(root) == tree_digest(again)


def f0_track(x: np.ndarray, sr: int = 16000, fmin: float = 50, fmax: float = 600) -> np.ndarray:
    """Voiced-frame F0 (Hz) by YIN's cumulative-mean-normalised difference, vectorised."""
    n, hop, lo, hi = int(0.04 * sr), int(0.01 * sr), int(sr / fmax), int(sr / fmin)
    starts = np.arange(0, len(x) - n - hi, hop)
    frames = np.stack([x[s:s + n + hi] for s in starts]).astype(np.float64)
    energy = np.sqrt((frames[:, :n] ** 2).mean(axis=1))
    frames = frames[energy > 0.3 * np.sqrt((x ** 2).mean())]
    d = np.stack([((frames[:, :n] - frames[:, t:t + n]) ** 2).sum(axis=1) for t in range(1, hi + 1)], 1)
    cmnd = d * np.arange(1, hi + 1) / np.maximum(np.cumsum(d, axis=1), 1e-12)
    f0 = []
    for row in cmnd:
        below = np.flatnonzero(row[lo - 1:] < 0.25)
        if below.size:
            k = lo - 1 + below[0]
            while k + 1 < hi and row[k + 1] < row[k]:
                k += 1
            f0.append(sr / (k + 1))
    return np.asarray(f0)


def spread_semitones(f0: np.ndarray) -> float:
    st = 12 * np.log2(f0)
    return float(np.percentile(st, 95) - np.percentile(st, 5))


@needs_espeak
def test_ssml_range_widens_pitch_and_offset_raises_it():
    text = "The little boat drifted across the quiet lake."
    base = demo_corpus.STYLES["neutral"]
    spreads = [spread_semitones(f0_track(demo_corpus.render_speech(text, replace(base, range=r), "en-us+f4")))
               for r in (25, 100, 200)]
    assert spreads[0] + 1.5 < spreads[1] and spreads[1] + 1.5 < spreads[2], spreads
    low = np.median(f0_track(demo_corpus.render_speech(text, base, "en-us+f4", pitch_offset=-15)))
    high = np.median(f0_track(demo_corpus.render_speech(text, base, "en-us+f4", pitch_offset=15)))
    assert high > 1.3 * low


@needs_espeak
def test_render_speech_output_and_errors():
    audio = demo_corpus.render_speech("Hello & <welcome> home.", demo_corpus.STYLES["angry"], "en+m7")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.5 < len(audio) / 16000 < 3 and 0.05 < np.abs(audio).max() < 1.0
    with pytest.raises(RuntimeError, match="nosuchvoice"):
        demo_corpus.render_speech("Hello.", demo_corpus.STYLES["sad"], "nosuchvoice")
    with pytest.raises(ValueError):
        demo_corpus.render_speech("  ", demo_corpus.STYLES["sad"], "en-us+f4")
