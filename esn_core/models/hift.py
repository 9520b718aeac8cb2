"""HiFT (CosyVoice's neural-source-filter HiFi-GAN with an iSTFT head), the whole-utterance
mel -> 24 kHz vocoder that Step-Audio2's Token2wav runs (``hift_original.pt``, keys under
``generator.``). An F0 predictor drives a harmonic sine source; the source's STFT is fused
into each upsampling stage; the last conv predicts log-magnitude and phase for an iSTFT.
Every random draw (source phase, source noise) takes the caller's ``torch.Generator``.
Weight-normed convs use ``torch.nn.utils.parametrizations.weight_norm`` (the checkpoint's
``parametrizations.weight.original0/1`` names)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from esn_core.models.ragged import ragged_time_axis, valid_lengths


def _wn_conv(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Module:
    return weight_norm(nn.Conv1d(cin, cout, k, 1, dilation=dilation, padding=(k * dilation - dilation) // 2))


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, one alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        return x + torch.sin(x * a).pow(2) / (a + 1e-9)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(_wn_conv(channels, channels, kernel, d) for d in dilations)
        self.convs2 = nn.ModuleList(_wn_conv(channels, channels, kernel) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class F0Predictor(nn.Module):
    """Five weight-normed conv+ELU layers and a linear head; |output| is F0 in Hz per frame."""

    def __init__(self, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [weight_norm(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # (b, mels, T) -> (b, T)
        return self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1).abs()


class HarmonicSource(nn.Module):
    """Sine harmonics of F0 (phase integrated at frame rate, then linearly upsampled), noise in
    unvoiced samples, merged to one channel by ``l_linear`` + tanh."""

    def __init__(self, sampling_rate: int, upsample: int, harmonics: int, sine_amp: float,
                 noise_std: float, voiced_threshold: float):
        super().__init__()
        self.sr, self.upsample, self.dim = sampling_rate, upsample, harmonics + 1
        self.sine_amp, self.noise_std, self.voiced_threshold = sine_amp, noise_std, voiced_threshold
        self.l_linear = nn.Linear(self.dim, 1)

    def forward(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """f0: (b, samples, 1) at the audio rate -> source (b, samples, 1)."""
        b, n, _ = f0.shape
        freqs = f0 * torch.arange(1, self.dim + 1, device=f0.device, dtype=f0.dtype)
        step = (freqs / self.sr) % 1
        start = torch.rand(b, self.dim, generator=generator, device=generator.device).to(step)
        start[:, 0] = 0  # the fundamental starts at phase 0, the overtones at random phases
        step[:, 0, :] = step[:, 0, :] + start
        coarse = F.interpolate(step.transpose(1, 2), scale_factor=1 / self.upsample, mode="linear")
        phase = torch.cumsum(coarse, dim=2) * 2 * math.pi
        phase = F.interpolate(phase * self.upsample, scale_factor=self.upsample, mode="linear").transpose(1, 2)
        voiced = (f0 > self.voiced_threshold).to(f0)
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        # filled through a transposed view: upstream's randn_like sees this layout, and torch's
        # normal_ draws differently for non-contiguous tensors, so a seed gives upstream's noise
        draw = torch.empty(b, self.dim, n, device=generator.device).transpose(1, 2).normal_(generator=generator)
        noise = noise_amp * draw.to(phase)
        sines = torch.sin(phase) * self.sine_amp * voiced + noise
        return torch.tanh(self.l_linear(sines))


class HiFTGenerator(nn.Module):
    def __init__(self, in_channels: int = 80, base_channels: int = 512, nb_harmonics: int = 8,
                 sampling_rate: int = 24000, nsf_alpha: float = 0.1, nsf_sigma: float = 0.003,
                 nsf_voiced_threshold: float = 10, upsample_rates=(8, 5, 3), upsample_kernel_sizes=(16, 11, 7),
                 istft_params=None, resblock_kernel_sizes=(3, 7, 11),
                 resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)), source_resblock_kernel_sizes=(7, 7, 11),
                 source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)), lrelu_slope: float = 0.1,
                 audio_limit: float = 0.99, f0_channels: int = 512):
        super().__init__()
        istft = dict(istft_params or {"n_fft": 16, "hop_len": 4})
        self.n_fft, self.hop = int(istft["n_fft"]), int(istft["hop_len"])
        self.sampling_rate, self.lrelu_slope, self.audio_limit = sampling_rate, lrelu_slope, audio_limit
        self.hop_samples = int(np.prod(upsample_rates)) * self.hop
        self.num_kernels = len(resblock_kernel_sizes)
        self.m_source = HarmonicSource(sampling_rate, self.hop_samples, nb_harmonics, nsf_alpha, nsf_sigma,
                                       nsf_voiced_threshold)
        self.conv_pre = weight_norm(nn.Conv1d(in_channels, base_channels, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(base_channels // 2**i, base_channels // 2**(i + 1), k, u,
                                           padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)))
        # source branch i meets stage i, so it is downsampled by the product of later stages
        cum = np.cumprod([1, *list(upsample_rates)[::-1][:-1]])[::-1]
        self.source_downs, self.source_resblocks = nn.ModuleList(), nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, source_resblock_kernel_sizes, source_resblock_dilation_sizes)):
            ch, u = base_channels // 2**(i + 1), int(u)
            self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, 1) if u == 1
                                     else nn.Conv1d(self.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, list(d)))
        self.resblocks = nn.ModuleList(
            ResBlock(base_channels // 2**(i + 1), k, list(d))
            for i in range(len(self.ups)) for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(base_channels // 2**len(self.ups), self.n_fft + 2, 7, 1, padding=3))
        self.f0_predictor = F0Predictor(in_channels, f0_channels)

    def _window(self, like: torch.Tensor) -> torch.Tensor:
        return torch.hann_window(self.n_fft, periodic=True, dtype=like.dtype, device=like.device)

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """mel: (b, mels, T) -> audio (b, T * hop_samples) in [-audio_limit, audio_limit]."""
        return self._audio(self._filter(mel, self._source_spectrum(self.f0_predictor(mel), generator)))

    @torch.inference_mode()
    def rows(self, mels: Sequence[torch.Tensor], generators: Sequence[torch.Generator]) -> list[torch.Tensor]:
        """Each mel (mels, T_b) -> its audio (T_b * hop_samples,), the convolutions of all rows
        in one padded call, each row as if alone: the F0 predictor and the filter run under
        ``ragged_time_axis`` (zeros past each row's end before every conv); the parts that
        would read past a row's end otherwise (the source's edge interpolation, the STFT's and
        iSTFT's reflect and overlap at the right edge) and every random draw run per row."""
        if len(mels) != len(generators) or not mels:
            raise ValueError(f"HiFT rows need one generator per mel, got {len(mels)} mels and "
                             f"{len(generators)} generators")
        lengths = [int(m.shape[-1]) for m in mels]
        longest = max(lengths)
        mel = mels[0].new_zeros(len(mels), mels[0].shape[0], longest)
        for b, m in enumerate(mels):
            mel[b, :, :lengths[b]] = m
        with ragged_time_axis(self, lengths, input_steps=longest, device=mel.device,
                              lengths_at=self._valid_lengths):
            f0 = self.f0_predictor(mel)
            spectra = [self._source_spectrum(f0[b:b + 1, :n], g) for b, (n, g) in enumerate(zip(lengths, generators))]
            s = spectra[0].new_zeros(len(mels), spectra[0].shape[1], self._frames(longest))
            for b, spectrum in enumerate(spectra):
                s[b, :, :spectrum.shape[-1]] = spectrum[0]
            x = self._filter(mel, s)
        return [self._audio(x[b:b + 1, :, :self._frames(n)])[0] for b, n in enumerate(lengths)]

    def _frames(self, mel_frames: int) -> int:
        """STFT frames of the source of ``mel_frames`` mel frames (centred: one more than hops)."""
        return mel_frames * (self.hop_samples // self.hop) + 1

    def _valid_lengths(self, lengths: torch.Tensor, full: int, steps: int) -> torch.Tensor:
        # the last stage runs on the STFT frame axis (reflect-padded by one), not a multiple
        if steps == self._frames(full):
            return lengths * (self.hop_samples // self.hop) + 1
        return valid_lengths(lengths, full, steps)

    def _source_spectrum(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """F0 per mel frame (b, T) -> the harmonic source's STFT, real and imaginary (b, n_fft+2, frames)."""
        f0 = f0[:, :, None].repeat_interleave(self.hop_samples, dim=1)  # nearest upsampling
        source = self.m_source(f0, generator).squeeze(-1)
        spec = torch.stft(source, self.n_fft, self.hop, self.n_fft, window=self._window(source), return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _filter(self, mel: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The upsampling HiFi-GAN stack, fed the source spectrum at each stage -> conv_post's output."""
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        return self.conv_post(F.leaky_relu(x))

    def _audio(self, x: torch.Tensor) -> torch.Tensor:
        """conv_post's log-magnitude and phase -> the iSTFT's waveform, clipped."""
        half = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :half]).clamp(max=1e2)
        phase = torch.sin(x[:, half:])  # upstream keeps this sin; the checkpoint was trained with it
        audio = torch.istft(torch.polar(magnitude, phase), self.n_fft, self.hop, self.n_fft, window=self._window(x))
        return audio.clamp(-self.audio_limit, self.audio_limit)
