"""Prosodic features of one utterance: the acoustic front end of the embedded judge.

Input is a mono float waveform (16 kHz by default; other rates are resampled). Analysis
runs on 40 ms frames with a 10 ms hop, all frames at once (numpy FFTs), so a 3-s clip
costs ~10 ms on one core:

- F0: YIN (cumulative mean normalised difference, first dip under a threshold, parabolic
  refinement) over 60-500 Hz, computed at 8 kHz; a frame is voiced if the dip is deep
  enough and the frame is active. Onset frames whose YIN window is still silent, and
  frames an octave off the utterance median (YIN's octave slips), are unvoiced. Pitch is
  reported in semitones re 100 Hz, so a voice's pitch level is an additive offset that
  per-speaker normalisation can remove.
- Energy: frame RMS in dBFS; a frame is *active* if it lies within ``ACTIVE_RANGE_DB`` of
  the loudest frame (relative, so scaling the signal shifts every dB feature equally).
- Rate: active-speech duration, syllable-like peaks of the band-limited energy envelope
  per active second, voiced fraction, pause fraction.
- Spectrum: centroid and a high/low band tilt over active frames.

``extract_features`` never raises on silence, clicks or clips shorter than a frame: it
returns finite placeholder values and ``reliable=False`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import find_peaks, resample_poly

from esn_core.constants import SAMPLE_RATE

FRAME_S = 0.040
HOP_S = 0.010
F0_MIN_HZ = 60.0
F0_MAX_HZ = 500.0
F0_REF_HZ = 100.0
# YIN runs on a 2x decimated signal: 4x less work, and F0 <= 500 Hz stays far below 4 kHz.
PITCH_RATE = 8000
# YIN: a dip of the normalised difference below this marks a periodic (voiced) frame.
YIN_THRESHOLD = 0.2
# YIN's comparison window must carry at least this share of the frame's mean power.
ONSET_POWER_RATIO = 0.1
# Voiced frames further than this from the utterance's median pitch are octave errors.
OCTAVE_ERROR_ST = 10.0
# Frames quieter than (loudest frame - this) are pauses / background.
ACTIVE_RANGE_DB = 35.0
# Absolute floor (dBFS): digital near-silence is never speech, however it is scaled.
ABSOLUTE_FLOOR_DB = -80.0
SILENCE_DB = -120.0
# Syllable nuclei: envelope peaks this prominent (dB) and this far apart (s).
SYLLABLE_PROMINENCE_DB = 6.0
SYLLABLE_MIN_GAP_S = 0.08
SYLLABLE_BAND_HZ = (300.0, 2500.0)
TILT_SPLIT_HZ = 1000.0
TILT_TOP_HZ = 4000.0
# Below these a clip's features are placeholders, not measurements.
MIN_ACTIVE_S = 0.10
MIN_VOICED_FRAMES = 5

FEATURE_NAMES: tuple[str, ...] = (
    "f0_mean_st",
    "f0_std_st",
    "f0_range_st",
    "f0_delta_st",
    "energy_mean_db",
    "energy_std_db",
    "energy_range_db",
    "active_duration_s",
    "syllable_rate_hz",
    "voiced_fraction",
    "pause_fraction",
    "spectral_centroid_hz",
    "spectral_tilt_db",
)


@dataclass(frozen=True)
class FrameAnalysis:
    """Per-frame measurements (one entry per 10 ms hop)."""

    f0_hz: np.ndarray  # 0 where unvoiced
    aperiodicity: np.ndarray  # YIN's normalised difference at the chosen lag
    voiced: np.ndarray  # bool
    active: np.ndarray  # bool
    energy_db: np.ndarray
    band_db: np.ndarray  # syllable-band energy, dB
    centroid_hz: np.ndarray
    tilt_db: np.ndarray
    hop_s: float


@dataclass(frozen=True)
class ProsodicFeatures:
    """One utterance's feature vector in ``FEATURE_NAMES`` order, and whether to trust it."""

    values: np.ndarray
    reliable: bool
    reason: str = ""

    def as_dict(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(FEATURE_NAMES, self.values)}


def hz_to_semitones(hz: np.ndarray | float) -> np.ndarray:
    """Semitones re ``F0_REF_HZ`` (100 Hz -> 0, 200 Hz -> 12)."""
    return 12.0 * np.log2(np.asarray(hz, dtype=np.float64) / F0_REF_HZ)


def as_mono_16k(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float64 mono at ``SAMPLE_RATE``; non-finite samples become 0 (never propagate NaN)."""
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim == 2:  # (samples, channels), soundfile's layout
        x = x.mean(axis=1)
    if x.ndim != 1:
        raise ValueError(f"expected a mono or (samples, channels) waveform, got shape {x.shape}")
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if sample_rate != SAMPLE_RATE:
        g = np.gcd(int(sample_rate), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g)
    return x


def _frames(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
    """(n_frames, frame) strided view; clips shorter than a frame are zero-padded to one."""
    if len(x) < frame:
        x = np.pad(x, (0, frame - len(x)))
    n = 1 + (len(x) - frame) // hop
    return np.lib.stride_tricks.sliding_window_view(x, frame)[::hop][:n]


def _yin(frames: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (f0_hz, aperiodicity) by YIN, vectorised over frames.

    Aperiodicity is the normalised difference at the chosen lag: near 0 for a clean
    periodic frame, >= ``YIN_THRESHOLD`` when no lag qualifies.
    """
    frame_len = frames.shape[1]
    tau_min = int(np.floor(sr / F0_MAX_HZ))
    tau_max = int(np.ceil(sr / F0_MIN_HZ))
    window = frame_len - tau_max - 2
    # r[tau] = sum_{j<W} x[j] x[j+tau] by FFT; j + tau < frame_len, so a frame-long FFT
    # never wraps for the lags read here.
    head = np.fft.rfft(frames[:, :window], frame_len)
    full = np.fft.rfft(frames, frame_len)
    r = np.fft.irfft(np.conj(head) * full, frame_len)[:, : tau_max + 2]
    # Window energies at every lag from one running sum per frame.
    cs = np.cumsum(frames[:, : window + tau_max + 2] ** 2, axis=1)
    cs = np.concatenate([np.zeros((len(frames), 1)), cs], axis=1)
    taus = np.arange(tau_max + 2)
    energy_shifted = cs[:, taus + window] - cs[:, taus]
    diff = np.maximum(cs[:, [window]] + energy_shifted - 2.0 * r, 0.0)
    diff[:, 0] = 0.0
    running = np.cumsum(diff[:, 1:], axis=1)
    cmnd = np.ones_like(diff)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = diff[:, 1:] * taus[1:] / running
    cmnd[:, 1:] = np.where(running > 0, ratio, 1.0)

    # First local minimum below threshold = YIN's "first dip", which avoids sub-octaves.
    mid = cmnd[:, tau_min : tau_max + 1]
    left = cmnd[:, tau_min - 1 : tau_max]
    right = cmnd[:, tau_min + 1 : tau_max + 2]
    dips = (mid <= left) & (mid <= right) & (mid < YIN_THRESHOLD)
    best = np.where(dips.any(axis=1), dips.argmax(axis=1), mid.argmin(axis=1))
    rows = np.arange(len(frames))
    tau = best + tau_min
    a, b, c = cmnd[rows, tau - 1], cmnd[rows, tau], cmnd[rows, tau + 1]
    curvature = a - 2.0 * b + c
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(curvature > 0, 0.5 * (a - c) / curvature, 0.0)
    f0 = sr / (tau + np.clip(shift, -0.5, 0.5))
    # A frame whose YIN window is (near) silent, e.g. a speech onset after digital zeros,
    # compares silence with silence and looks perfectly periodic: call it aperiodic.
    head_power = cs[:, window] / window
    frame_power = cs[:, -1] / (cs.shape[1] - 1)
    onset = head_power < ONSET_POWER_RATIO * frame_power
    return f0, np.where(onset, 1.0, b)


def _pitch(x: np.ndarray, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """YIN at ``PITCH_RATE`` on the frames of the 16 kHz analysis (same count and hop)."""
    factor = SAMPLE_RATE // PITCH_RATE
    low = resample_poly(x, 1, factor) if len(x) else x
    frames = _frames(low, int(round(FRAME_S * PITCH_RATE)), int(round(HOP_S * PITCH_RATE)))
    return _yin(frames[:n_frames], PITCH_RATE)


def _drop_octave_errors(f0_hz: np.ndarray, voiced: np.ndarray) -> np.ndarray:
    """Unvoice frames about an octave or more off the utterance's median pitch.

    YIN's rare octave slips land ~12 st away; real contours here stay within ~9 st of the
    median, so they would otherwise dominate the F0 range and std.
    """
    if not voiced.any():
        return voiced
    st = hz_to_semitones(np.where(voiced, f0_hz, F0_REF_HZ))
    median = np.median(st[voiced])
    return voiced & (np.abs(st - median) <= OCTAVE_ERROR_ST)


def _spectra(frames: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Hann-windowed power spectra and their bin frequencies."""
    spec = np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1)) ** 2
    return spec, np.fft.rfftfreq(frames.shape[1], 1.0 / sr)


def _band_power(spec: np.ndarray, freqs: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return spec[:, (freqs >= lo) & (freqs < hi)].sum(axis=1)


def _db(power: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(power, 10.0 ** (SILENCE_DB / 10.0)))


def analyse_frames(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> FrameAnalysis:
    """All per-frame measurements of a waveform (see the module docstring)."""
    x = as_mono_16k(waveform, sample_rate)
    x = x - x.mean() if len(x) else x
    sr = SAMPLE_RATE
    frames = _frames(x, int(round(FRAME_S * sr)), int(round(HOP_S * sr)))

    energy_db = _db(np.mean(frames**2, axis=1))
    loudest = energy_db.max()
    active = (energy_db > loudest - ACTIVE_RANGE_DB) & (energy_db > ABSOLUTE_FLOOR_DB)
    f0, aperiodicity = _pitch(x, len(frames))
    voiced = _drop_octave_errors(f0, (aperiodicity < YIN_THRESHOLD) & active)
    spec, freqs = _spectra(frames, sr)
    total = spec.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        centroid = np.where(total > 0, (spec * freqs).sum(axis=1) / total, 0.0)
    low = _band_power(spec, freqs, 0.0, TILT_SPLIT_HZ)
    high = _band_power(spec, freqs, TILT_SPLIT_HZ, TILT_TOP_HZ)
    return FrameAnalysis(
        f0_hz=np.where(voiced, f0, 0.0),
        aperiodicity=aperiodicity,
        voiced=voiced,
        active=active,
        energy_db=energy_db,
        band_db=_db(_band_power(spec, freqs, *SYLLABLE_BAND_HZ)),
        centroid_hz=centroid,
        tilt_db=_db(high) - _db(low),
        hop_s=HOP_S,
    )


def f0_track(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """(f0_hz per 10 ms frame, 0 where unvoiced; voiced mask)."""
    frames = analyse_frames(waveform, sample_rate)
    return frames.f0_hz, frames.voiced


def _f0_stats(fa: FrameAnalysis) -> list[float]:
    st = hz_to_semitones(fa.f0_hz[fa.voiced])
    p5, p95 = np.percentile(st, [5, 95])
    # Frame-to-frame pitch movement within voiced runs; clipped so octave slips don't dominate.
    both = fa.voiced[1:] & fa.voiced[:-1]
    track = hz_to_semitones(np.where(fa.voiced, fa.f0_hz, F0_REF_HZ))
    deltas = np.abs(np.diff(track))[both]
    delta = float(np.minimum(deltas, 2.0).mean()) if deltas.size else 0.0
    return [float(st.mean()), float(st.std()), float(p95 - p5), delta]


def _syllable_rate(fa: FrameAnalysis, active_s: float) -> float:
    """Prominent peaks of the smoothed band envelope, on active frames, per active second.

    Measured here on espeak renders, peaks >= 6 dB on active frames track tempo better
    than weaker peaks or voiced-only peaks (which follow the text more than the rate).
    """
    kernel = np.hanning(7)
    envelope = np.convolve(fa.band_db, kernel / kernel.sum(), mode="same")
    gap = max(1, int(round(SYLLABLE_MIN_GAP_S / fa.hop_s)))
    peaks, _ = find_peaks(envelope, prominence=SYLLABLE_PROMINENCE_DB, distance=gap)
    nuclei = peaks[fa.active[peaks]]
    return len(nuclei) / active_s


def _pause_fraction(active: np.ndarray) -> float:
    """Share of inactive frames between the first and the last active frame."""
    idx = np.flatnonzero(active)
    span = active[idx[0] : idx[-1] + 1]
    return float(1.0 - span.mean())


def _placeholder(reason: str, partial: dict[str, float] | None = None) -> ProsodicFeatures:
    """Finite stand-in values for a clip that cannot be measured."""
    values = dict.fromkeys(FEATURE_NAMES, 0.0)
    values["energy_mean_db"] = SILENCE_DB
    values.update(partial or {})
    return ProsodicFeatures(np.array([values[n] for n in FEATURE_NAMES]), False, reason)


def extract_features(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> ProsodicFeatures:
    """The prosodic feature vector of one utterance (``FEATURE_NAMES`` order)."""
    fa = analyse_frames(waveform, sample_rate)
    n_active = int(fa.active.sum())
    active_s = n_active * fa.hop_s
    if n_active == 0:
        return _placeholder("silent")
    e = fa.energy_db[fa.active]
    e5, e95 = np.percentile(e, [5, 95])
    measured = {
        "energy_mean_db": float(e.mean()),
        "energy_std_db": float(e.std()),
        "energy_range_db": float(e95 - e5),
        "active_duration_s": active_s,
        "voiced_fraction": float(fa.voiced.sum() / n_active),
        "pause_fraction": _pause_fraction(fa.active),
        "spectral_centroid_hz": float(fa.centroid_hz[fa.active].mean()),
        "spectral_tilt_db": float(fa.tilt_db[fa.active].mean()),
    }
    if active_s < MIN_ACTIVE_S:
        return _placeholder(f"too short: {active_s:.2f} s of active signal", measured)
    if fa.voiced.sum() < MIN_VOICED_FRAMES:
        return _placeholder("no voiced frames", measured)
    f0 = dict(zip(FEATURE_NAMES[:4], _f0_stats(fa)))
    measured["syllable_rate_hz"] = _syllable_rate(fa, active_s)
    values = np.array([{**measured, **f0}[n] for n in FEATURE_NAMES], dtype=np.float64)
    return ProsodicFeatures(values, True)
