"""The flow model's velocity estimator (Step-Audio2 ``DiT``): adaLN-modulated transformer
blocks (attention with per-head q/k LayerNorm, a causal conv block, a tanh-GELU MLP) over the
frame-wise concatenation [x, mu, speaker, prompt-mel cond]. Whole-utterance path only.
Submodule names follow ``flow.pt`` (``decoder.estimator.*``)."""

from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F

from esn_core.models.dit_parts import modulate, timestep_features


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class CausalConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


def causal_conv_block(dim: int, kernel: int = 3) -> nn.Sequential:
    # indices 1, 3 and 6 carry weights; the layout matches the checkpoint's ``conv.block.N``
    return nn.Sequential(Transpose(), CausalConv1d(dim, dim, kernel), Transpose(), nn.LayerNorm(dim),
                         nn.Mish(), Transpose(), CausalConv1d(dim, dim, kernel), Transpose())


class ConvBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block = causal_conv_block(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class QKNormAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.q_norm, self.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        q = self.q_norm(self._split(self.to_q(x)))
        k = self.k_norm(self._split(self.to_k(x)))
        v = self._split(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _plain_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = _plain_norm(dim), _plain_norm(dim), _plain_norm(dim)
        self.attn = QKNormAttention(dim, heads, head_dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.conv = ConvBlock(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        (sh_a, sc_a, g_a, sh_m, sc_m, g_m, sh_c, sc_c, g_c) = self.adaLN_modulation(c).chunk(9, dim=-1)
        x = x + g_a * self.attn(modulate(self.norm1(x), sh_a, sc_a), key_ok)
        x = x + g_c * self.conv(modulate(self.norm3(x), sh_c, sc_c))
        return x + g_m * self.mlp(modulate(self.norm2(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.norm_final = _plain_norm(dim)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """Sinusoid of 1000*t (cos half first), then a SiLU MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t * 1000, self.freq_dim).to(t.dtype))


class DiT(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, mlp_ratio: float = 4.0, depth: int = 28,
                 num_heads: int = 8, head_dim: int = 64, hidden_size: int = 256):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.in_proj = nn.Linear(in_channels, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, head_dim, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, out_channels)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x, mu, cond: (b, c, T); spks: (b, c); t: (b,); key_ok: (b, T) bool -> (b, out, T)."""
        feats = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        if feats.shape[1] != self.in_channels:
            raise ValueError(f"DiT expects {self.in_channels} input channels, got {feats.shape[1]}")
        c = self.t_embedder(t).unsqueeze(1)
        h = self.in_proj(feats.transpose(1, 2))
        for block in self.blocks:
            h = block(h, c, key_ok)
        return self.final_layer(h, c).transpose(1, 2)
