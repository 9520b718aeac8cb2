"""Seeded draws shared by the generation loops (Kimi-Audio's audio stream, MiniCPM-o's
speech codes): uniforms drawn per row on the host before a loop, and the inverse-CDF lookup
that turns one uniform and a row of weights into an index.

A loop that draws this way gives each row the same tokens in any batch and on any device
(its uniforms depend on its seed and its own count only) and draws nothing per step.
"""

from __future__ import annotations

import torch


def draw_uniforms(seeds: list[int], counts: list[int], device) -> torch.Tensor:
    """``[B, max(counts)]`` uniforms: row ``b``'s first ``counts[b]`` draws of a CPU generator
    seeded ``seeds[b]`` (the rest zero).

    Drawn once, before the loop, on the host: the same seed gives the same draws on every
    device, and the loop draws nothing per step (no per-row kernel, no host sync). A row's
    draws depend on its seed and its own cap only, so a row in a batch draws as it would alone.
    """
    width = max(max(counts), 1)
    draws = torch.zeros(len(seeds), width)
    for b, (seed, n) in enumerate(zip(seeds, counts)):
        if n > 0:
            draws[b, :n] = torch.rand(n, generator=torch.Generator().manual_seed(int(seed)))
    return draws.to(device)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` ``[N, V]`` (non-negative, unnormalised): the first
    whose cumulative weight exceeds ``uniforms`` ``[N]`` (in [0, 1)) times the row's total.

    The same distribution as ``torch.multinomial(weights, 1)``, drawn from the given uniforms
    instead of a generator. The clamp guards against a uniform that rounds onto the total."""
    cdf = weights.cumsum(dim=-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)[:, 0]
