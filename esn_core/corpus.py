"""ESD tree -> manifest (SPEC §8): one row per English utterance, with its split.

``read_esd`` walks a released ESD tree (the ``Emotion Speech Dataset`` folder or its
parent), English speakers 0011-0020 only, and returns a polars DataFrame with the
``manifest`` columns of ``esn_core.io``; ``write_manifest`` stores it.

What the reader accepts (the real archive's quirks, see ``shared/notes/esd.md``):

- both layouts: flat ``<spk>/<Emotion>/<spk>_<id>.wav`` and the older
  ``<spk>/<Emotion>/{train,evaluation,test}/<spk>_<id>.wav`` (same manifest either way);
- transcripts ``<spk>/<spk>.txt`` in ASCII/UTF-8, UTF-16 with BOM, or Latin-1;
- transcript lines ``id<TAB>text<TAB>Emotion`` where a space replaces either tab;
- fewer than 350 utterances per emotion (the demo corpus): the index comes from the id.

File ids run 000001-001750 in blocks of 350 (Neutral, Angry, Happy, Sad, Surprise);
``index = id - 350 * block`` is parallel across emotions, and ``reference_text`` (the WER
reference) is always the *Neutral* transcript of that speaker and index, because ESD's
emotional transcripts sometimes drop a word.

Errors (``CorpusError``, always, naming the file or folder): a wav whose id lies in
another emotion's block; a wav named unlike ``<spk>_<6 digits>.wav`` or for another
speaker; the same id twice; an emotion folder that is not one of ESD's five (a wrong or
mixed-up tree is better stopped than half-read; hidden folders are ignored); a speaker
without transcript. Skips (counted in one ``logger.warning`` each; ``CorpusError`` when
``strict=True``): a transcript line whose wav is absent, a wav without transcript line,
an empty or unreadable wav, a row with no Neutral transcript line, an unparseable
transcript line, a line whose emotion label contradicts its id block. Wavs that are not 16 kHz mono are resampled with
``scipy.signal.resample_poly`` (channels averaged) into ``cache_dir``, counted in the log,
and the manifest points at the converted file.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from math import floor, gcd
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import polars as pl
import soundfile as sf
from scipy.signal import resample_poly

from esn_core import io
from esn_core.constants import EMOTIONS, ESD_FOLDERS, SAMPLE_RATE

logger = logging.getLogger(__name__)

ESD_DIRNAME = "Emotion Speech Dataset"
ENGLISH_SPEAKERS: tuple[str, ...] = tuple(f"{n:04d}" for n in range(11, 21))
BLOCK = 350  # utterances per emotion in ESD (and the file-id block size)
SPLIT_DIRS = ("train", "evaluation", "test")  # older layout's subfolders
SPLITS = ("identification", "development", "test_seen", "test_unseen")

_ID_TOKEN = re.compile(r"^(\d{4})_(\d{6})$")
_WAV_NAME = re.compile(r"^(\d{4})_(\d{6})\.wav$", re.IGNORECASE)
_FOLDER_TO_EMOTION = {f.lower(): f.lower() for f in ESD_FOLDERS}

MANIFEST_COLUMNS = list(io.SCHEMAS["manifest"])


class CorpusError(ValueError):
    """An ESD tree the reader refuses; the message names the file or folder."""


# ---------------------------------------------------------------------------- splits


def _round_half_up(x: float) -> int:
    return int(floor(x + 0.5))


@dataclass(frozen=True)
class SplitRule:
    """Which (speaker position, utterance index) goes to which split (SPEC §8, Table 1).

    Speakers are sorted; the *last* ``unseen_fraction`` of them are unseen (S9-S10), the
    ``dev_fraction`` before those are development speakers (S7-S8), the rest are training
    speakers (S1-S6). Counts are ``round(fraction * n)`` (half up), except that with two
    or more speakers at least one is unseen, and with three or more at least one is a
    development speaker, so every split stays non-empty in a small demo.

    Training speakers: index ``1..identification_end`` -> identification,
    ``..development_end`` -> development, the rest -> test_seen. Development speakers:
    ``1..development_end`` -> development, the rest -> test_seen. Unseen speakers: all
    -> test_unseen. Defaults reproduce Table 1 for ESD's 10 speakers x 350 indices.
    """

    dev_fraction: float = 0.2
    unseen_fraction: float = 0.2
    identification_end: int = 200
    development_end: int = 250

    def __post_init__(self) -> None:
        if not (0 <= self.dev_fraction and 0 <= self.unseen_fraction
                and self.dev_fraction + self.unseen_fraction < 1):
            raise ValueError(f"speaker fractions must be >= 0 and sum below 1: {self}")
        if not 1 <= self.identification_end < self.development_end:
            raise ValueError(f"need 1 <= identification_end < development_end: {self}")

    @classmethod
    def for_demo(cls, n_indices: int) -> "SplitRule":
        """The SPEC rule scaled to ``n_indices`` utterances per emotion.

        Index cuts keep Table 1's proportions (200/350, 250/350), rounded half up and
        nudged so that, from 3 indices on, identification, development and test_seen
        each get >= 1 index. ``for_demo(350)`` equals ``SplitRule()``.
        """
        if n_indices < 1:
            raise ValueError(f"a split rule needs at least 1 index per emotion, got {n_indices}")
        ident = max(1, min(_round_half_up(200 / BLOCK * n_indices), n_indices - 2))
        dev = max(ident + 1, min(_round_half_up(250 / BLOCK * n_indices), n_indices - 1))
        return cls(identification_end=ident, development_end=dev)

    def speaker_roles(self, speakers: Iterable[str]) -> dict[str, str]:
        """Sorted speakers -> 'train' | 'dev' | 'unseen'."""
        ordered = sorted(set(speakers))
        n = len(ordered)
        n_unseen = _round_half_up(self.unseen_fraction * n)
        n_dev = _round_half_up(self.dev_fraction * n)
        if n >= 2 and self.unseen_fraction > 0:
            n_unseen = max(1, n_unseen)
        if n >= 3 and self.dev_fraction > 0:
            n_dev = max(1, n_dev)
        # Training keeps at least one speaker: development gives way first.
        n_unseen = min(n_unseen, max(n - 1, 0))
        n_dev = min(n_dev, max(n - 1 - n_unseen, 0))
        n_train = n - n_dev - n_unseen
        roles = ["train"] * n_train + ["dev"] * n_dev + ["unseen"] * n_unseen
        return dict(zip(ordered, roles))

    def split_of(self, role: str, index: int) -> str:
        if role == "unseen":
            return "test_unseen"
        if role == "train" and index <= self.identification_end:
            return "identification"
        if index <= self.development_end:
            return "development"
        return "test_seen"


def assign_splits(manifest: pl.DataFrame, rule: SplitRule | None = None) -> pl.DataFrame:
    """Set the ``split`` column from ``speaker`` and ``index`` (over the speakers present).

    ``rule=None`` uses ``SplitRule.for_demo(max index present)``, which is the SPEC rule
    for a full ESD tree (max index 350).
    """
    if manifest.is_empty():
        return manifest.with_columns(pl.lit(None, dtype=pl.String).alias("split"))
    if rule is None:
        rule = SplitRule.for_demo(int(manifest["index"].max()))
    roles = rule.speaker_roles(manifest["speaker"].to_list())
    logger.info("split rule %s; speaker roles %s", rule, roles)
    splits = [rule.split_of(roles[s], int(i))
              for s, i in zip(manifest["speaker"].to_list(), manifest["index"].to_list())]
    return manifest.with_columns(pl.Series("split", splits, dtype=pl.String))


# ---------------------------------------------------------------------- file ids


def emotion_and_index(file_number: int) -> tuple[str, int]:
    """ESD file number (1..1750) -> (emotion folder, utterance index 1..350)."""
    if not 1 <= file_number <= BLOCK * len(ESD_FOLDERS):
        raise ValueError(f"ESD file number {file_number} outside 1..{BLOCK * len(ESD_FOLDERS)}")
    block = (file_number - 1) // BLOCK
    return ESD_FOLDERS[block], file_number - block * BLOCK


# -------------------------------------------------------------------- transcripts


def decode_transcript(raw: bytes) -> str:
    """Bytes of an ESD transcript -> text: BOM -> UTF-16, else UTF-8, else Latin-1."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # never fails: every byte is a Latin-1 character


@dataclass(frozen=True)
class TranscriptLine:
    utterance_id: str
    text: str
    emotion: str | None  # lowercase, when the line names one


def parse_transcript_line(line: str) -> TranscriptLine | None:
    """``id<TAB>text<TAB>Emotion`` with either tab possibly a space; None if no id.

    The id is the first whitespace token matching ``\\d{4}_\\d{6}``; the emotion is the
    last token if it names an ESD emotion; the text is what lies between, stripped.
    """
    tokens = line.strip().split(None, 1)
    if not tokens or not _ID_TOKEN.match(tokens[0]):
        return None
    rest = tokens[1].strip() if len(tokens) > 1 else ""
    emotion = None
    head_last = rest.rsplit(None, 1)
    if head_last and head_last[-1].lower() in _FOLDER_TO_EMOTION:
        emotion = head_last[-1].lower()
        rest = head_last[0] if len(head_last) == 2 else ""
    return TranscriptLine(tokens[0], rest.strip(), emotion)


def read_transcript(path: Path) -> tuple[dict[str, TranscriptLine], int]:
    """Parse a speaker's transcript: (id -> line, number of unparseable non-blank lines)."""
    lines: dict[str, TranscriptLine] = {}
    bad = 0
    for number, raw_line in enumerate(decode_transcript(path.read_bytes()).splitlines(), 1):
        if not raw_line.strip():
            continue
        parsed = parse_transcript_line(raw_line)
        if parsed is None:
            bad += 1
            logger.debug("%s:%d: no utterance id in %r", path, number, raw_line)
            continue
        if parsed.utterance_id in lines and lines[parsed.utterance_id] != parsed:
            raise CorpusError(f"{path}:{number}: utterance {parsed.utterance_id} listed twice "
                              "with different text")
        lines[parsed.utterance_id] = parsed
    return lines, bad


# ------------------------------------------------------------------------- tree


def find_esd_root(root: str | os.PathLike) -> Path:
    """The folder holding the speaker folders: ``root`` or ``root/Emotion Speech Dataset``."""
    root = Path(root)
    if (root / ESD_DIRNAME).is_dir():
        return root / ESD_DIRNAME
    if root.is_dir() and any(_is_speaker_dir(p) for p in root.iterdir()):
        return root
    raise CorpusError(f"{root}: no ESD tree here (expected '{ESD_DIRNAME}/' or speaker "
                      "folders 0011-0020)")


def _is_speaker_dir(path: Path) -> bool:
    return path.is_dir() and re.fullmatch(r"\d{4}", path.name) is not None


def _english_speakers(esd_root: Path, wanted: Iterable[str] | None) -> list[str]:
    present = sorted(p.name for p in esd_root.iterdir() if _is_speaker_dir(p)
                     and p.name in ENGLISH_SPEAKERS)
    if wanted is None:
        if not present:
            raise CorpusError(f"{esd_root}: no English speaker folder (0011-0020)")
        return present
    wanted = sorted({f"{int(s):04d}" for s in wanted})
    for speaker in wanted:
        if speaker not in ENGLISH_SPEAKERS:
            raise CorpusError(f"speaker {speaker} is not an English ESD speaker (0011-0020)")
        if speaker not in present:
            raise CorpusError(f"{esd_root / speaker}: speaker folder not found")
    return wanted


def _emotion_dirs(speaker_dir: Path) -> list[Path]:
    dirs = []
    for child in sorted(speaker_dir.iterdir()):
        if not child.is_dir() or child.name.startswith((".", "__")):
            continue
        if child.name.lower() not in _FOLDER_TO_EMOTION:
            raise CorpusError(f"{child}: unknown emotion folder {child.name!r}; "
                              f"ESD has {', '.join(ESD_FOLDERS)}")
        dirs.append(child)
    return dirs


def _wav_files(emotion_dir: Path) -> Iterator[Path]:
    """Wavs of one emotion folder, flat or in the older train/evaluation/test folders."""
    for child in sorted(emotion_dir.iterdir()):
        if child.is_file() and child.suffix.lower() == ".wav":
            yield child
        elif child.is_dir() and child.name.lower() in SPLIT_DIRS:
            yield from sorted(p for p in child.iterdir()
                              if p.is_file() and p.suffix.lower() == ".wav")


def _wav_id(path: Path, speaker: str, emotion_dir: Path) -> tuple[str, int]:
    """Check a wav's name and id block against its folder; return (utterance id, index)."""
    match = _WAV_NAME.match(path.name)
    if match is None:
        raise CorpusError(f"{path}: wav name is not <speaker>_<6 digits>.wav")
    if match.group(1) != speaker:
        raise CorpusError(f"{path}: file of speaker {match.group(1)} inside speaker folder {speaker}")
    number = int(match.group(2))
    try:
        folder, index = emotion_and_index(number)
    except ValueError as exc:
        raise CorpusError(f"{path}: {exc}") from None
    if folder.lower() != emotion_dir.name.lower():
        raise CorpusError(f"{path}: id {number:06d} belongs to the {folder} block "
                          f"({ESD_FOLDERS.index(folder) * BLOCK + 1:06d}-"
                          f"{(ESD_FOLDERS.index(folder) + 1) * BLOCK:06d}), "
                          f"not to folder {emotion_dir.name}")
    return f"{speaker}_{number:06d}", index


def _speaker_wavs(speaker_dir: Path) -> dict[str, tuple[Path, str, int]]:
    """utterance id -> (wav path, emotion, index) for one speaker."""
    found: dict[str, tuple[Path, str, int]] = {}
    for emotion_dir in _emotion_dirs(speaker_dir):
        for wav in _wav_files(emotion_dir):
            utt, index = _wav_id(wav, speaker_dir.name, emotion_dir)
            if utt in found:
                raise CorpusError(f"{wav}: utterance {utt} also at {found[utt][0]}")
            found[utt] = (wav, emotion_dir.name.lower(), index)
    return found


# ------------------------------------------------------------------------- audio


def _audio_info(path: Path) -> Any | None:
    """soundfile's header info, or None for an unreadable or empty file."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError, EOFError):
        return None
    return info if info.frames > 0 and info.samplerate > 0 else None


def resample_to_16k_mono(src: Path, dst: Path) -> Path:
    """Write ``src`` as 16 kHz mono PCM16 at ``dst`` (channels averaged, polyphase)."""
    audio, rate = sf.read(str(src), dtype="float64", always_2d=True)
    mono = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(SAMPLE_RATE, rate)
        mono = resample_poly(mono, SAMPLE_RATE // g, rate // g)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    sf.write(str(tmp), np.clip(mono, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, dst)
    return dst


def _cached_conversion(src: Path, speaker: str, emotion: str, cache_dir: Path) -> Path:
    dst = cache_dir / speaker / emotion / src.name
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        info = _audio_info(dst)
        if info is not None and info.samplerate == SAMPLE_RATE and info.channels == 1:
            return dst
    return resample_to_16k_mono(src, dst)


# ---------------------------------------------------------------------- manifest


class _Skips:
    """Counts of skipped items per reason; raises at once in strict mode."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, what: str) -> None:
        if self.strict:
            raise CorpusError(f"{what}: {reason} (strict mode)")
        self.counts[reason] += 1
        self.examples.setdefault(reason, what)

    def log(self) -> None:
        for reason, count in sorted(self.counts.items()):
            logger.warning("skipped %d item(s): %s (e.g. %s)", count, reason, self.examples[reason])


def _speaker_rows(speaker_dir: Path, cache_dir: Path | None, skips: _Skips,
                  converted: Counter[str]) -> list[dict]:
    speaker = speaker_dir.name
    transcript_path = speaker_dir / f"{speaker}.txt"
    if not transcript_path.is_file():
        raise CorpusError(f"{transcript_path}: transcript not found")
    lines, bad_lines = read_transcript(transcript_path)
    for _ in range(bad_lines):
        skips.skip("transcript line without an utterance id", str(transcript_path))
    wavs = _speaker_wavs(speaker_dir)

    rows = []
    for utt, line in sorted(lines.items()):
        if not utt.startswith(f"{speaker}_"):
            raise CorpusError(f"{transcript_path}: line for {utt} in speaker {speaker}'s transcript")
        if utt not in wavs:
            folder, _ = emotion_and_index(int(utt[5:]))
            skips.skip("listed in the transcript but no wav", str(speaker_dir / folder / f"{utt}.wav"))
    for utt, (wav, emotion, index) in sorted(wavs.items()):
        line = lines.get(utt)
        if line is None:
            skips.skip("wav without a transcript line", str(wav))
            continue
        if line.emotion is not None and line.emotion != emotion:
            skips.skip(f"transcript names another emotion than the id block ({emotion})", str(wav))
            continue
        neutral = lines.get(f"{speaker}_{index:06d}")
        if neutral is None:
            skips.skip("no Neutral transcript line for the reference", str(wav))
            continue
        info = _audio_info(wav)
        if info is None:
            skips.skip("empty or unreadable wav", str(wav))
            continue
        path = wav
        if info.samplerate != SAMPLE_RATE or info.channels != 1:
            if cache_dir is None:
                raise CorpusError(f"{wav}: {info.samplerate} Hz, {info.channels} channel(s) "
                                  "needs resampling; pass cache_dir")
            path = _cached_conversion(wav, speaker, emotion, cache_dir)
            converted[f"{info.samplerate} Hz/{info.channels} ch"] += 1
            info = _audio_info(path)
        rows.append({
            "utterance_id": utt,
            "speaker": speaker,
            "emotion": emotion,
            "index": index,
            "transcript": line.text,
            "reference_text": neutral.text,
            "path": str(path.resolve()),
            "duration_s": info.frames / info.samplerate,
            "sample_rate": info.samplerate,
        })
    return rows


def read_esd(
    root: str | os.PathLike,
    speakers: Iterable[str] | None = None,
    *,
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    rule: SplitRule | None = None,
) -> pl.DataFrame:
    """Read an ESD tree into a manifest DataFrame (``io.SCHEMAS['manifest']`` columns).

    ``speakers`` restricts to some English speakers; splits are assigned over the
    speakers read (``assign_splits``). ``cache_dir`` receives 16 kHz mono copies of wavs
    that are not (required only if such wavs exist). See the module docstring for what
    is an error and what a counted skip.
    """
    esd_root = find_esd_root(root)
    chosen = _english_speakers(esd_root, speakers)
    cache = Path(cache_dir) if cache_dir is not None else None
    skips, converted = _Skips(strict), Counter()
    rows = []
    for speaker in chosen:
        rows.extend(_speaker_rows(esd_root / speaker, cache, skips, converted))
    skips.log()
    if converted:
        logger.warning("resampled %d wav(s) to 16 kHz mono into %s: %s", sum(converted.values()),
                       cache, dict(converted))
    manifest = pl.DataFrame(rows, schema={c: _polars_type(c) for c in MANIFEST_COLUMNS[:-1]})
    manifest = assign_splits(manifest.sort("utterance_id"), rule)
    logger.info("manifest: %d utterances, %d speakers from %s", manifest.height, len(chosen), esd_root)
    return manifest.select(MANIFEST_COLUMNS)


def _polars_type(column: str) -> pl.DataType:
    return {"index": pl.Int32, "sample_rate": pl.Int32, "duration_s": pl.Float64}.get(column, pl.String)


# Provenance key recording what relative wav paths in a manifest are relative to.
PATHS_RELATIVE_TO = "paths_relative_to"
MANIFEST_FOLDER = "manifest folder"


def write_manifest(manifest: pl.DataFrame, path: str | os.PathLike,
                   provenance: dict | None = None) -> Path:
    """Store a manifest as the declared ``manifest`` Parquet table (atomic, with provenance).

    Wavs inside the manifest's folder (the demo tree, resampled copies under ``results/``)
    are stored relative to that folder, so a copied results tree reads its own audio; wavs
    elsewhere (an ESD tree on a shared disk) stay absolute. ``read_manifest`` resolves both.
    """
    unknown = set(manifest["emotion"].unique().to_list()) - set(EMOTIONS)
    if unknown:
        raise CorpusError(f"manifest has emotions outside {EMOTIONS}: {sorted(unknown)}")
    folder = Path(path).parent.resolve()
    stored = manifest.with_columns(
        pl.Series("path", [_relative_if_inside(p, folder) for p in manifest["path"].to_list()], dtype=pl.String))
    return io.write_table(stored.select(MANIFEST_COLUMNS).to_arrow(), path, "manifest",
                          provenance={**(provenance or {}), PATHS_RELATIVE_TO: MANIFEST_FOLDER})


def _relative_if_inside(path: str, folder: Path) -> str:
    resolved = Path(path).resolve()
    return resolved.relative_to(folder).as_posix() if resolved.is_relative_to(folder) else str(resolved)


def read_manifest(path: str | os.PathLike) -> pl.DataFrame:
    """A manifest with absolute wav paths (relative ones joined to the manifest's folder)."""
    manifest = io.read_frame(path, "manifest")
    folder = Path(path).parent.resolve()
    return manifest.with_columns(
        pl.Series("path", [str(folder / p) for p in manifest["path"].to_list()], dtype=pl.String))
