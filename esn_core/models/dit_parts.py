"""Pieces two flow-matching DiTs share (Kimi-Audio's detokenizer, MiniCPM-o's S3 flow):
the sinusoidal timestep features, adaLN's modulation, and host-made constants kept on the
device.

Why ``HostConstant``: upstream makes these tables on the host (CPU arithmetic, which our
outputs follow exactly) and moves them to the device at every call. A copy from host memory
that is not pinned makes the host wait for the device (torch synchronises the stream after
it), so a table moved per network evaluation serialises every Euler step of a speech decoder:
the host cannot queue the next evaluation while the device runs this one. The same table,
made the same way, is moved once per device instead.
"""

from __future__ import annotations

import functools
import math

import torch


class HostConstant:
    """A tensor made on the host, copied to each device (and dtype) once, on first use."""

    def __init__(self, tensor: torch.Tensor):
        self.host = tensor
        self._copies: dict = {}

    def on(self, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (torch.device(device), dtype)
        copy = self._copies.get(key)
        if copy is None:  # two threads may both make it: the same values either way
            copy = self._copies[key] = self.host.to(device=key[0], dtype=dtype or self.host.dtype)
        return copy


@functools.cache
def _frequencies(half: int, max_period: float) -> HostConstant:
    return HostConstant(torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half))


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    """``[B, dim]`` float32 sinusoids of ``t`` ``[B]``: the cosine half first."""
    freqs = _frequencies(dim // 2, float(max_period)).on(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift
