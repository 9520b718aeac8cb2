"""Step-Audio2's token-to-mel flow (``CausalMaskedDiffWithXvec`` + ``CausalConditionalCFM``),
whole-utterance path: prompt tokens and generated tokens are encoded together, the prompt's
mel frames condition the ODE, and only the generated frames are returned.

Randomness: upstream draws the ODE start noise once per process (a buffer filled at
construction); here it comes from the caller's ``torch.Generator`` so each row is seeded.

Rows of different lengths (``inference_rows``) share one encoder and one CFM call, padded at
the end: attention masks the keys past each row's end, every conv is causal except the
encoder's look-ahead (which is fed zeros there, as a row alone pads), and each row draws its
noise from its own generator at its own length."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from esn_core.models.s3_flow_dit import DiT
from esn_core.models.s3_flow_encoder import UpsampleConformerEncoderV2


class FlowRow(NamedTuple):
    """One row of the flow: tokens (n,), prompt_tokens (p,) int; prompt_mel (p*up_rate, mels);
    speaker (spk_dim,)."""

    tokens: torch.Tensor
    prompt_tokens: torch.Tensor
    prompt_mel: torch.Tensor
    speaker: torch.Tensor


class CausalConditionalCFM(nn.Module):
    """Euler solver on a cosine time grid with classifier-free guidance (cond vs. all-zero)."""

    def __init__(self, estimator: DiT, inference_cfg_rate: float = 0.7, **_training_only):
        super().__init__()
        if inference_cfg_rate <= 0:
            raise ValueError(f"CausalConditionalCFM: inference_cfg_rate must be > 0, got {inference_cfg_rate}")
        self.estimator, self.inference_cfg_rate = estimator, float(inference_cfg_rate)
        self.out_channels = estimator.out_channels

    def start_noise(self, mu: torch.Tensor, key_ok: torch.Tensor,
                    generators: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
        """One generator: a ``(b, out, T)`` draw. One per row: row ``b`` draws
        ``(1, out, frames_b)`` from its own, as it does alone; zeros past its end."""
        if isinstance(generators, torch.Generator):
            return torch.randn(mu.shape[0], self.out_channels, mu.shape[2], generator=generators,
                               device=generators.device, dtype=torch.float32).to(mu)
        if len(generators) != mu.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {mu.shape[0]} rows")
        x = mu.new_zeros(mu.shape[0], self.out_channels, mu.shape[2])
        for b, (frames, generator) in enumerate(zip(key_ok.sum(dim=1).tolist(), generators)):
            x[b, :, :frames] = torch.randn(1, self.out_channels, frames, generator=generator,
                                           device=generator.device, dtype=torch.float32).to(mu)[0]
        return x

    def forward(self, mu: torch.Tensor, key_ok: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                n_timesteps: int, generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
        """key_ok: (b, T) True at each row's real frames (a prefix); the DiT masks the rest."""
        x = self.start_noise(mu, key_ok, generator)
        grid = 1 - torch.cos(torch.linspace(0, 1, n_timesteps + 1, dtype=mu.dtype) * 0.5 * math.pi)
        # The grid stays on the host (its steps are read there) and goes to the device once:
        # a copy from host memory per step would make the host wait for every step.
        times = grid.to(mu.device)
        both = lambda a: torch.cat([a, torch.zeros_like(a)], dim=0)  # noqa: E731  guided / unguided
        key_ok2, mu2, spks2, cond2 = torch.cat([key_ok, key_ok]), both(mu), both(spks), both(cond)
        rate = self.inference_cfg_rate
        for step in range(n_timesteps):
            t = times[step].expand(2 * x.shape[0])
            v_cond, v_free = self.estimator(torch.cat([x, x]), key_ok2, mu2, t, spks2, cond2).chunk(2)
            x = x + (grid[step + 1] - grid[step]).item() * ((1 + rate) * v_cond - rate * v_free)
        return x


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(self, input_size: int = 512, output_size: int = 80, spk_embed_dim: int = 192,
                 output_type: str = "mel", vocab_size: int = 5121, encoder: UpsampleConformerEncoderV2 = None,
                 decoder: CausalConditionalCFM = None, input_embedding: nn.Module = None, **_training_only):
        super().__init__()
        if encoder is None or decoder is None:
            raise ValueError("CausalMaskedDiffWithXvec needs an encoder and a decoder (flow.yaml)")
        self.output_size, self.vocab_size = output_size, vocab_size
        self.input_embedding = input_embedding if input_embedding is not None else nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder
        self.up_rate = int(encoder.up_layer.stride)

    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor,
                  speaker: torch.Tensor, n_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """tokens: (1, n), prompt_tokens: (1, p) int; prompt_mel: (1, p*up_rate, mels);
        speaker: (1, spk_dim) -> mel (1, mels, n*up_rate) for the generated tokens only."""
        if tokens.shape[0] != 1:
            raise ValueError(f"inference takes one row, got {tokens.shape[0]}; use inference_rows")
        row = FlowRow(tokens[0], prompt_tokens[0], prompt_mel[0], speaker[0])
        return self.inference_rows([row], n_timesteps, [generator])[0][None]

    @torch.inference_mode()
    def inference_rows(self, rows: Sequence[FlowRow], n_timesteps: int,
                       generators: Sequence[torch.Generator]) -> list[torch.Tensor]:
        """Each row's mel (mels, n_b*up_rate), all rows in one encoder and one CFM call.

        Row ``b`` is [its prompt tokens, its tokens], padded at the end to the longest row;
        the encoder and the DiT mask keys past its end and their convs are causal (the
        encoder's look-ahead sees zeros there), and its noise comes from ``generators[b]``
        at its own length, so its frames are what it computes alone."""
        if len(rows) != len(generators) or not rows:
            raise ValueError(f"inference_rows needs one generator per row, got {len(rows)} rows "
                             f"and {len(generators)} generators")
        for row in rows:
            self._check(row)
        device = rows[0].tokens.device
        n_prompt = [row.prompt_tokens.shape[0] * self.up_rate for row in rows]
        n_tokens = [row.prompt_tokens.shape[0] + row.tokens.shape[0] for row in rows]
        all_tokens = torch.zeros(len(rows), max(n_tokens), dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            all_tokens[b, :n_tokens[b]] = torch.cat([row.prompt_tokens, row.tokens]).long()
        speakers = torch.stack([row.speaker for row in rows])
        spk = self.spk_embed_affine_layer(F.normalize(speakers, dim=1))
        lengths = torch.tensor(n_tokens, device=device)
        h = self.encoder_proj(self.encoder(self.input_embedding(all_tokens), lengths))
        cond = torch.zeros_like(h)
        for b, row in enumerate(rows):
            cond[b, :n_prompt[b]] = row.prompt_mel
        key_ok = torch.arange(h.shape[1], device=device)[None] < (lengths * self.up_rate)[:, None]
        mel = self.decoder(h.transpose(1, 2), key_ok, spk, cond.transpose(1, 2), n_timesteps, list(generators))
        return [mel[b, :, n_prompt[b]:n * self.up_rate] for b, n in enumerate(n_tokens)]

    def _check(self, row: FlowRow) -> None:
        if row.prompt_mel.shape[0] != row.prompt_tokens.shape[0] * self.up_rate:
            raise ValueError(f"prompt mel has {row.prompt_mel.shape[0]} frames, expected "
                             f"{row.prompt_tokens.shape[0]} tokens x {self.up_rate}")
        if row.tokens.numel() == 0:
            raise ValueError("the flow needs at least one speech code per row")
        bad = row.tokens[(row.tokens < 0) | (row.tokens >= self.vocab_size)]
        if bad.numel():
            raise ValueError(f"speech code {int(bad[0])} is outside the flow vocabulary [0, {self.vocab_size})")
