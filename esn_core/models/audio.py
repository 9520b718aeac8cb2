"""Audio in and out of an adapter: source files as the models read them, speech as the
judges want it. What every adapter needs, kept once (DESIGN.md)."""

from __future__ import annotations

import math
import os

import numpy as np

JUDGE_RATE = 16_000  # what EVCOutput carries, what the audio encoders expect


def load_source(path: str | os.PathLike, rate: int = JUDGE_RATE) -> np.ndarray:
    """Mono float32 audio at ``rate`` (channels averaged, polyphase resampling)."""
    import soundfile as sf
    from scipy.signal import resample_poly

    try:
        audio, source_rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile's LibsndfileError and friends
        raise ValueError(f"cannot read source audio {os.fspath(path)}: {err}") from err
    audio = audio.mean(axis=1)
    if source_rate != rate:
        g = math.gcd(int(source_rate), int(rate))
        audio = resample_poly(audio, rate // g, int(source_rate) // g).astype(np.float32)
    return np.ascontiguousarray(audio, dtype=np.float32)


def to_16k(wave: np.ndarray, rate: int) -> np.ndarray:
    """A vocoder's waveform at ``rate`` as 16 kHz float32 for judging, clipped to [-1, 1]."""
    from scipy.signal import resample_poly

    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if rate != JUDGE_RATE and wave.size:
        g = math.gcd(int(rate), JUDGE_RATE)
        wave = resample_poly(wave, JUDGE_RATE // g, int(rate) // g)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)
