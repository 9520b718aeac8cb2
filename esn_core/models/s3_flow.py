"""Step-Audio2's token-to-mel flow (``CausalMaskedDiffWithXvec`` + ``CausalConditionalCFM``),
whole-utterance path: prompt tokens and generated tokens are encoded together, the prompt's
mel frames condition the ODE, and only the generated frames are returned.

Randomness: upstream draws the ODE start noise once per process (a buffer filled at
construction); here it comes from the caller's ``torch.Generator`` so each row is seeded."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from esn_core.models.s3_flow_dit import DiT
from esn_core.models.s3_flow_encoder import UpsampleConformerEncoderV2


class CausalConditionalCFM(nn.Module):
    """Euler solver on a cosine time grid with classifier-free guidance (cond vs. all-zero)."""

    def __init__(self, estimator: DiT, inference_cfg_rate: float = 0.7, **_training_only):
        super().__init__()
        if inference_cfg_rate <= 0:
            raise ValueError(f"CausalConditionalCFM: inference_cfg_rate must be > 0, got {inference_cfg_rate}")
        self.estimator, self.inference_cfg_rate = estimator, float(inference_cfg_rate)
        self.out_channels = estimator.out_channels

    def forward(self, mu: torch.Tensor, key_ok: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                n_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(mu.shape[0], self.out_channels, mu.shape[2], generator=generator,
                        device=generator.device, dtype=torch.float32).to(mu)
        grid = 1 - torch.cos(torch.linspace(0, 1, n_timesteps + 1, dtype=mu.dtype) * 0.5 * math.pi)
        both = lambda a: torch.cat([a, torch.zeros_like(a)], dim=0)  # noqa: E731  guided / unguided
        key_ok2, mu2, spks2, cond2 = torch.cat([key_ok, key_ok]), both(mu), both(spks), both(cond)
        rate = self.inference_cfg_rate
        for step in range(n_timesteps):
            t = grid[step].to(mu.device).expand(2 * x.shape[0])
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
        if prompt_mel.shape[1] != prompt_tokens.shape[1] * self.up_rate:
            raise ValueError(f"prompt mel has {prompt_mel.shape[1]} frames, expected "
                             f"{prompt_tokens.shape[1]} tokens x {self.up_rate}")
        bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)]
        if bad.numel():
            raise ValueError(f"speech code {int(bad[0])} is outside the flow vocabulary [0, {self.vocab_size})")
        spk = self.spk_embed_affine_layer(F.normalize(speaker, dim=1))
        all_tokens = torch.cat([prompt_tokens, tokens], dim=1).long()
        lengths = torch.tensor([all_tokens.shape[1]], device=all_tokens.device)
        h = self.encoder_proj(self.encoder(self.input_embedding(all_tokens), lengths))
        n_prompt = prompt_mel.shape[1]
        cond = torch.zeros_like(h)
        cond[:, :n_prompt] = prompt_mel
        key_ok = torch.ones(1, h.shape[1], dtype=torch.bool, device=h.device)
        mel = self.decoder(h.transpose(1, 2), key_ok, spk, cond.transpose(1, 2), n_timesteps, generator)
        return mel[:, :, n_prompt:]
