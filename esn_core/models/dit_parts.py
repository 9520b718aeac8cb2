"""Pieces two flow-matching DiTs share (Kimi-Audio's detokenizer, MiniCPM-o's S3 flow):
the sinusoidal timestep features and adaLN's modulation."""

from __future__ import annotations

import math

import torch


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    """``[B, dim]`` float32 sinusoids of ``t`` ``[B]``: the cosine half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None].to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift
