"""Integrated loudness (ITU-R BS.1770-4) and loudness normalisation of listening-test clips.

The measure is short and ours: K-weighting (a high shelf, then a high-pass, both biquads
designed for the clip's own sample rate), mean square over 400 ms blocks with 75 % overlap,
an absolute gate at -70 LKFS and a relative gate 10 LU below the ungated mean. Mono only:
the pipeline's speech is mono. The reference check (BS.1770: a 0 dBFS 997 Hz sine reads
-3.01 LKFS) is in ``tests/test_human.py``; it holds to 0.01 LU here, where pyloudnorm 0.2.0
(tried as the dependency) reads -3.05 on the same sine.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import lfilter

TARGET_LUFS = -23.0  # EBU R 128 programme loudness
PEAK_CEILING = 10 ** (-1.0 / 20)  # -1 dBFS: never clip when raising a quiet clip

# BS.1770's filter stages, as analogue prototypes (centre frequency Hz, Q, gain dB).
_SHELF = (1681.974450955533, 0.7071752369554196, 3.999843853973347)
_HIGHPASS = (38.13547087602444, 0.5003270373238773)


def _k_weighting(rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    f0, q, gain = _SHELF
    k = math.tan(math.pi * f0 / rate)
    vh = 10 ** (gain / 20)
    vb = vh ** 0.4996667741545416
    a0 = 1 + k / q + k * k
    shelf_b = np.array([vh + vb * k / q + k * k, 2 * (k * k - vh), vh - vb * k / q + k * k]) / a0
    shelf_a = np.array([a0, 2 * (k * k - 1), 1 - k / q + k * k]) / a0
    f0, q = _HIGHPASS
    k = math.tan(math.pi * f0 / rate)
    a0 = 1 + k / q + k * k
    hp_b = np.array([1.0, -2.0, 1.0])
    hp_a = np.array([a0, 2 * (k * k - 1), 1 - k / q + k * k]) / a0
    return [(shelf_b, shelf_a), (hp_b, hp_a)]


def integrated_loudness(samples: np.ndarray, rate: int) -> float:
    """Gated integrated loudness of a mono signal in LUFS (-inf for silence)."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("integrated_loudness: empty signal")
    for b, a in _k_weighting(rate):
        x = lfilter(b, a, x)
    block, step = int(round(0.4 * rate)), int(round(0.1 * rate))
    if x.size <= block:  # shorter than one gating block: the whole clip is the block
        powers = np.array([np.mean(x * x)])
    else:
        starts = np.arange(0, x.size - block + 1, step)
        csum = np.concatenate([[0.0], np.cumsum(x * x)])
        powers = (csum[starts + block] - csum[starts]) / block
    with np.errstate(divide="ignore"):
        loud = -0.691 + 10 * np.log10(powers)
    gated = powers[loud > -70.0]
    if gated.size == 0:
        return -math.inf
    relative = -0.691 + 10 * math.log10(gated.mean()) - 10.0
    with np.errstate(divide="ignore"):
        final = gated[-0.691 + 10 * np.log10(gated) > relative]
    return -0.691 + 10 * math.log10(final.mean())


def normalise(samples: np.ndarray, rate: int, target: float = TARGET_LUFS) -> tuple[np.ndarray, float]:
    """``samples`` scaled to ``target`` LUFS, lowered further if the peak would pass -1 dBFS.

    Returns the scaled signal and the gain applied in dB. A silent clip is returned as is.
    """
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    loud = integrated_loudness(x, rate)
    if not math.isfinite(loud):
        return x.astype(np.float32), 0.0
    gain = 10 ** ((target - loud) / 20)
    peak = float(np.max(np.abs(x))) * gain
    if peak > PEAK_CEILING:
        gain *= PEAK_CEILING / peak
    return (x * gain).astype(np.float32), 20 * math.log10(gain)
