"""The three views of the voice prompt that Step-Audio2's Token2wav conditions on, written on
torch + librosa's filterbanks (torchaudio is not used: no CPU build for our torch on PyPI):

- ``vocoder_mel``: 80-bin log-mel at 24 kHz, 480-sample hop (the flow's mel space, 50 Hz);
- ``tokenizer_log_mel``: Whisper-style 128-bin log-mel at 16 kHz, 160 hop (the S3 tokenizer's input);
- ``kaldi_fbank``: Kaldi-compatible 80-bin log filterbank at 16 kHz (CAM++'s input).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from librosa.filters import mel as librosa_mel
from torch.nn import functional as F


@lru_cache(maxsize=8)
def _slaney_mel(sr: int, n_fft: int, n_mels: int, fmax: float | None) -> torch.Tensor:
    return torch.from_numpy(librosa_mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0, fmax=fmax)).float()


def vocoder_mel(wav_24k: torch.Tensor) -> torch.Tensor:
    """(samples,) float at 24 kHz -> (frames, 80) natural-log mel, frames = samples // 480."""
    n_fft, hop = 1920, 480
    pad = (n_fft - hop) // 2
    y = F.pad(wav_24k[None, None], (pad, pad), mode="reflect")[0]
    spec = torch.stft(y, n_fft, hop, n_fft, window=torch.hann_window(n_fft), center=False, return_complex=True)
    magnitude = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    mel = _slaney_mel(24000, n_fft, 80, 8000.0) @ magnitude[0]
    return torch.log(mel.clamp(min=1e-5)).T


def tokenizer_log_mel(wav_16k: torch.Tensor) -> torch.Tensor:
    """(samples,) at 16 kHz -> (128, frames) Whisper log-mel (log10, 8 dB floor, (x+4)/4)."""
    spec = torch.stft(wav_16k, 400, 160, window=torch.hann_window(400), return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = _slaney_mel(16000, 400, 128, None) @ power
    log = mel.clamp(min=1e-10).log10()
    return (torch.maximum(log, log.max() - 8.0) + 4.0) / 4.0


@lru_cache(maxsize=4)
def _kaldi_mel_banks(n_mels: int, n_fft: int, sr: int, low: float = 20.0) -> torch.Tensor:
    """Triangles equally spaced on Kaldi's mel scale (1127 ln(1 + f/700)), (n_mels, n_fft//2 + 1)."""
    to_mel = lambda f: 1127.0 * np.log1p(np.asarray(f) / 700.0)  # noqa: E731
    lo, hi = to_mel(low), to_mel(sr / 2)
    delta = (hi - lo) / (n_mels + 1)
    bin_mel = to_mel(np.arange(n_fft // 2) * sr / n_fft)
    banks = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        up = (bin_mel - left) / (center - left)
        down = (right - bin_mel) / (right - center)
        banks[m, : n_fft // 2] = np.maximum(0.0, np.minimum(up, down))
    return torch.from_numpy(banks).float()


def kaldi_fbank(wav_16k: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Kaldi ``compute-fbank`` defaults with dither 0: 25 ms Povey windows every 10 ms (edges
    snipped), DC removed, pre-emphasis 0.97, 512-point power spectrum, log mel -> (frames, n_mels)."""
    sr, win, hop, n_fft = 16000, 400, 160, 512
    if wav_16k.numel() < win:
        raise ValueError(f"voice prompt too short for a filterbank: {wav_16k.numel()} samples < {win}")
    frames = wav_16k.unfold(0, win, hop).double()
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    povey = (0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(win, dtype=torch.float64) / (win - 1))) ** 0.85
    power = torch.fft.rfft(frames * povey, n=n_fft).abs() ** 2
    mel = power.float() @ _kaldi_mel_banks(n_mels, n_fft, sr).T
    return mel.clamp(min=torch.finfo(torch.float32).eps).log()
