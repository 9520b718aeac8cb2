"""A small, real ESD-layout corpus rendered by espeak-ng: the embedded default's data.

``generate_demo_corpus`` writes exactly what the released ESD archive holds, so the same
reader (``esn_core.corpus``) serves both::

    <out>/Emotion Speech Dataset/<spk>/<spk>.txt                 id<TAB>text<TAB>Emotion
    <out>/Emotion Speech Dataset/<spk>/<Emotion>/<spk>_<id>.wav  16 kHz mono PCM16

Speakers are numbered ``0011`` upwards like ESD's English speakers; file ids follow ESD's
blocks (Neutral 000001.., Angry 000351.., Happy 000701.., Sad 001051.., Surprise 001401..),
and utterance index ``i`` is the same sentence for every speaker and emotion. Each speaker
is an espeak-ng voice variant with its own base-pitch offset; each emotion is a prosody
style from ``esn_core.styles``, jittered per utterance from a seed derived from
(seed, speaker, emotion, index), so a corpus is byte-identical for a seed whatever the
worker count.

``render_speech`` is the one synthesis function: the planted model calls it to speak.

espeak-ng 1.51 quirks (measured here, Debian build):

- SSML ``<prosody range="N%">`` works: percentages are relative to espeak's default range
  value 50 and saturate at 200 % (absolute 100): 200 %, 220 % and 300 % render
  byte-identical audio. Bare numbers (``range="85"``) are absolute on the 0-100 scale;
  keywords ``x-low``..``x-high`` are fixed values. The F0 spread (5th-95th percentile, in
  semitones) of one voice grows monotonically with the percentage, e.g. en-us+f4 at
  ``-p 50``: 25 % -> 1.2 st, 60 % -> 2.9, 100 % -> 4.8, 150 % -> 6.9, 200 % -> 8.9. A wider
  range also raises the median F0 (espeak widens the contour upwards from the base).
  So ``render_speech`` clamps the style's range to [0, 200] %; the ``surprise`` style's
  220 % therefore renders as 200 % (still the widest of the five styles).
- ``-p``, ``-s`` and ``-a`` given on the command line survive SSML mode (``-m``) and a
  ``<speak>`` root: SSML only overrides what its tags name.
- ``en-gb+<variant>`` silently ignores the variant (same bytes as plain ``en-gb``);
  ``en+<variant>``, ``en-us+<variant>`` and ``en-gb-x-rp+<variant>`` apply it.
- An unknown voice prints "The specified espeak-ng voice does not exist." and exits 1.
- Output level is linear in ``-a`` (RMS 0.061 at ``-a 60``, 0.150 at ``-a 150``) but the
  clipping point depends on the voice: en-us+f4 peaks at 0.93 with ``-a 150``, en+m7
  already at 0.97 with ``-a 90``. ``render_speech`` therefore passes
  ``AMPLITUDE_SCALE`` (0.5) × the style's amplitude: the styles' energy ratios are kept
  and no voice here reaches full scale (max peak 0.85, angry +10 %).
- Variants with ``roughness``/``flutter`` (m1, f1, f3) make alternate glottal periods
  unequal, which pulls autocorrelation F0 trackers an octave down; m1 is the worst and is
  not used here.
- ``--stdout`` writes a WAV whose RIFF and data sizes are the placeholder 0x7FFFF000
  (the stream length is unknown when the header is written); the data runs to the end.
- Output is always 22050 Hz mono PCM16; one short sentence renders in ~15 ms.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from esn_core.constants import EMOTIONS, ESD_FOLDERS, SAMPLE_RATE
from esn_core.styles import STYLES, EmotionStyle

logger = logging.getLogger(__name__)

ESPEAK = "espeak-ng"
ESD_DIRNAME = "Emotion Speech Dataset"
BLOCK = 350  # utterances per emotion block in ESD's file numbering
FIRST_SPEAKER = 11  # ESD's English speakers are 0011-0020

# espeak-ng's limits (see module docstring for the measurements behind them).
MAX_RANGE_PERCENT = 200.0
MAX_AMPLITUDE = 200.0  # the styles' amplitude scale (espeak's -a scale)
AMPLITUDE_SCALE = 0.5  # style amplitude -> espeak -a, keeps every voice below clipping


@dataclass(frozen=True)
class DemoSpeaker:
    voice: str
    pitch_offset: int  # added to every style's espeak pitch (0-99 scale)


# Distinct variants (all verified to apply, see docstring), alternating male/female, with
# pitch offsets so two speakers of one variant family still differ.
SPEAKER_VOICES: tuple[DemoSpeaker, ...] = (
    DemoSpeaker("en-us+m3", -4),
    DemoSpeaker("en-us+f4", 0),
    DemoSpeaker("en+m7", 5),
    DemoSpeaker("en-gb-x-rp+f2", -3),
    DemoSpeaker("en-us+m6", 2),
    DemoSpeaker("en-us+f1", 4),
    DemoSpeaker("en-029+m2", -2),
    DemoSpeaker("en-gb-x-rp+f5", -6),
    DemoSpeaker("en-gb-x-rp+m4", 7),
    DemoSpeaker("en+f4", 3),
)

# Short plain sentences, no digits (espeak would read them out in inconsistent ways).
SENTENCES: tuple[str, ...] = (
    "The little boat drifted across the quiet lake.",
    "She opened the window and let the cold air in.",
    "We walked home together after the long game.",
    "My brother found a key under the old mat.",
    "The train was late again this morning.",
    "Please put the green cup back on the shelf.",
    "He painted the fence a bright shade of blue.",
    "They planted roses along the garden wall.",
    "The dog chased a ball across the wet grass.",
    "I left my coat on the bus yesterday.",
    "The baker sold out of bread before noon.",
    "Our neighbours are moving to the coast.",
    "The children built a castle out of sand.",
    "She wrote a letter to her oldest friend.",
    "The lights went out during the storm.",
    "We have to finish the report by Friday.",
    "The cat slept all afternoon in the sun.",
    "He forgot to lock the back door.",
    "The market opens early on Saturday.",
    "A tall man waited by the station gate.",
    "The soup needs a little more salt.",
    "They watched the stars from the hill.",
    "The teacher read a story to the class.",
    "My phone fell into the swimming pool.",
    "The river rose after the heavy rain.",
    "She found a silver ring in the sand.",
    "We missed the last bus into town.",
    "The old clock stopped at midnight.",
    "He carried the boxes up the narrow stairs.",
    "The kettle is boiling in the kitchen.",
    "Our team won the match in the final minute.",
    "The museum is closed on Mondays.",
    "I saw a fox crossing the road tonight.",
    "The paint on the door is still wet.",
    "They sang songs around the camp fire.",
    "The letter arrived a week too late.",
    "She bought a red bicycle for the summer.",
    "The wind blew the hat right off his head.",
    "We need more chairs for the guests.",
    "The library has a new reading room.",
    "He cooked dinner for the whole family.",
    "The road to the village is very narrow.",
    "A small bird landed on the window sill.",
    "The meeting has been moved to next week.",
    "Her garden is full of yellow flowers.",
    "The ship sailed slowly out of the harbour.",
    "I lost my glasses somewhere in the house.",
    "The music was far too loud last night.",
    "They painted the kitchen a warm orange.",
    "The shop on the corner sells fresh fish.",
    "He climbed the mountain before sunrise.",
    "We shared a pizza after the film.",
    "The snow covered the cars in the street.",
    "She keeps her books in neat piles.",
    "The doctor will see you in a moment.",
    "Our flight was cancelled this evening.",
    "The apples in the basket are ripe.",
    "He whistled a tune on the way to work.",
    "The bridge was closed for repairs.",
    "They found the lost puppy in the park.",
    "The candle burned down to the very end.",
    "I will call you when the rain stops.",
)


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def _ssml(text: str, range_percent: float) -> str:
    return f'<speak><prosody range="{range_percent:.0f}%">{escape(text)}</prosody></speak>'


def _espeak_args(style: EmotionStyle, voice: str, pitch_offset: float) -> list[str]:
    pitch = int(round(min(99.0, max(0.0, style.pitch + pitch_offset))))
    rate = int(round(min(450.0, max(80.0, style.rate))))
    amplitude = int(round(AMPLITUDE_SCALE * min(MAX_AMPLITUDE, max(0.0, style.amplitude))))
    return [ESPEAK, "-m", "--stdout", "-v", voice, "-p", str(pitch), "-s", str(rate),
            "-a", str(amplitude)]


def _decode_espeak_wav(blob: bytes) -> tuple[np.ndarray, int]:
    """Parse espeak's streamed WAV (placeholder chunk sizes) into float32 samples."""
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise RuntimeError(f"espeak-ng did not return a WAV stream ({len(blob)} bytes)")
    pos, rate, channels = 12, None, None
    while pos + 8 <= len(blob):
        chunk, size = blob[pos:pos + 4], struct.unpack("<I", blob[pos + 4:pos + 8])[0]
        body = pos + 8
        if chunk == b"fmt ":
            fmt, channels, rate = struct.unpack("<HHI", blob[body:body + 8])
            bits = struct.unpack("<H", blob[body + 14:body + 16])[0]
            if fmt != 1 or bits != 16:
                raise RuntimeError(f"unexpected espeak-ng WAV format {fmt}/{bits} bit")
        elif chunk == b"data":
            if rate is None:
                raise RuntimeError("espeak-ng WAV stream has data before fmt")
            # The size field is a placeholder: the samples run to the end of the stream.
            data = blob[body:len(blob) - (len(blob) - body) % (2 * channels)]
            pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
            return pcm.mean(axis=1).astype(np.float32) / 32768.0, rate
        pos = body + size + (size & 1)
    raise RuntimeError("espeak-ng WAV stream has no data chunk")


def _to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return x.astype(np.float32)
    g = gcd(SAMPLE_RATE, rate)
    return resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)


def render_speech(text: str, style: EmotionStyle, voice: str, pitch_offset: float = 0) -> np.ndarray:
    """Speak ``text`` with an emotion ``style`` in an espeak-ng ``voice``.

    Returns float32 mono samples at 16 kHz in [-1, 1]. ``pitch_offset`` shifts espeak's
    0-99 base pitch (the speaker's identity); range is clamped to espeak's 0-200 %;
    amplitude (0-200) is scaled by ``AMPLITUDE_SCALE`` so no voice clips.
    Raises RuntimeError if espeak fails.
    """
    if not text.strip():
        raise ValueError("render_speech needs non-empty text")
    range_percent = min(MAX_RANGE_PERCENT, max(0.0, style.range))
    proc = subprocess.run(
        _espeak_args(style, voice, pitch_offset),
        input=_ssml(text, range_percent).encode("utf-8"),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        msg = proc.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"espeak-ng failed for voice {voice!r} (rc={proc.returncode}): {msg}")
    samples, rate = _decode_espeak_wav(proc.stdout)
    return np.clip(_to_16k(samples, rate), -1.0, 1.0)


def demo_speakers(n_speakers: int) -> dict[str, DemoSpeaker]:
    """ESD-style speaker ids ``0011``.. mapped to their voices."""
    if not 1 <= n_speakers <= len(SPEAKER_VOICES):
        raise ValueError(f"n_speakers must be in 1..{len(SPEAKER_VOICES)}, got {n_speakers}")
    return {f"{FIRST_SPEAKER + k:04d}": SPEAKER_VOICES[k] for k in range(n_speakers)}


def demo_sentences(n_utterances: int, seed: int) -> list[str]:
    """The sentence of each utterance index 1..n (shared by all speakers and emotions).

    A seeded permutation of ``SENTENCES``; beyond its length the list repeats.
    """
    if not 1 <= n_utterances <= BLOCK:
        raise ValueError(f"n_utterances must be in 1..{BLOCK}, got {n_utterances}")
    order = np.random.default_rng([seed, 0]).permutation(len(SENTENCES))
    return [SENTENCES[order[i % len(SENTENCES)]] for i in range(n_utterances)]


def file_id(emotion_folder: str, index: int) -> int:
    """ESD file number of utterance ``index`` (1-based) in an emotion folder."""
    return ESD_FOLDERS.index(emotion_folder) * BLOCK + index


@dataclass(frozen=True)
class _Job:
    path: Path
    text: str
    emotion: str
    voice: str
    pitch_offset: int
    seed: tuple[int, int, int, int]


def _utterance_style(emotion: str, seed: tuple[int, int, int, int]) -> EmotionStyle:
    # Seed per utterance, not per worker, so output does not depend on scheduling.
    return STYLES[emotion].jitter(np.random.default_rng(list(seed)))


def _render_job(job: _Job) -> float:
    audio = render_speech(job.text, _utterance_style(job.emotion, job.seed), job.voice,
                          job.pitch_offset)
    job.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.path.with_name(f".{job.path.name}.tmp")
    sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, job.path)
    return len(audio) / SAMPLE_RATE


def _transcript_lines(speaker: str, sentences: list[str]) -> list[str]:
    lines = []
    for folder in ESD_FOLDERS:
        for index, text in enumerate(sentences, start=1):
            lines.append(f"{speaker}_{file_id(folder, index):06d}\t{text}\t{folder}")
    return lines


def _jobs(root: Path, speakers: dict[str, DemoSpeaker], sentences: list[str], seed: int) -> list[_Job]:
    jobs = []
    for speaker, spk in speakers.items():
        for folder in ESD_FOLDERS:
            emotion = folder.lower()
            for index, text in enumerate(sentences, start=1):
                fid = file_id(folder, index)
                path = root / speaker / folder / f"{speaker}_{fid:06d}.wav"
                job_seed = (seed, int(speaker), EMOTIONS.index(emotion), index)
                jobs.append(_Job(path, text, emotion, spk.voice, spk.pitch_offset, job_seed))
    return jobs


def generate_demo_corpus(
    out_dir: str | os.PathLike,
    n_speakers: int = 5,
    n_utterances: int = 40,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Render an ESD-layout tree under ``out_dir``; return its ``Emotion Speech Dataset`` dir.

    ``n_speakers`` × 5 emotions × ``n_utterances`` wavs plus one transcript per speaker.
    Deterministic for ``seed`` (byte-identical for any ``workers``). Rendering runs in a
    process pool (threads measured slower: resampling and WAV writing hold the GIL);
    ``workers=1`` renders in-process.
    """
    if not espeak_available():
        raise RuntimeError(f"{ESPEAK} not found on PATH; install espeak-ng to build the demo corpus")
    root = Path(out_dir) / ESD_DIRNAME
    speakers = demo_speakers(n_speakers)
    sentences = demo_sentences(n_utterances, seed)
    for speaker in speakers:
        (root / speaker).mkdir(parents=True, exist_ok=True)
        lines = _transcript_lines(speaker, sentences)
        (root / speaker / f"{speaker}.txt").write_text("\n".join(lines) + "\n", encoding="ascii")
    jobs = _jobs(root, speakers, sentences, seed)
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    if workers == 1:
        total_s = sum(map(_render_job, jobs))
    else:
        chunk = max(1, len(jobs) // (4 * workers))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            total_s = sum(pool.map(_render_job, jobs, chunksize=chunk))
    logger.info("demo corpus: %d wavs (%.0f s of audio) for %d speakers in %.1f s with %d workers at %s",
                len(jobs), total_s, len(speakers), time.perf_counter() - start, workers, root)
    return root
