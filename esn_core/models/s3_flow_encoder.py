"""The flow model's token encoder (Step-Audio2 / CosyVoice2 ``UpsampleConformerEncoderV2``):
25 Hz token embeddings -> a conformer stack -> x2 nearest upsampling + causal conv -> a second
conformer stack at the 50 Hz mel rate. Attention is ESPnet relative-position attention.

Only the whole-utterance path (no streaming caches) is written here. Submodule names follow
the upstream checkpoint (``flow.pt``) so its state dict loads with strict names.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def relative_positions(length: int, dim: int) -> torch.Tensor:
    """ESPnet's relative sinusoid table for offsets length-1 ... -(length-1): (1, 2L-1, dim)."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(2 * length - 1, dim)
    # row i holds offset (length-1-i): positive offsets first (descending), then negative ones
    offsets = torch.cat([pos.flip(0), -pos[1:]], dim=0)
    table[:, 0::2] = torch.sin(offsets * freq)
    table[:, 1::2] = torch.cos(offsets * freq)
    return table.unsqueeze(0)


class ScaledRelPositionInput(nn.Module):
    """Linear + LayerNorm, scaled by sqrt(dim), returned with the relative-position table."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.dim = dim
        self.out = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-5), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * math.sqrt(self.dim)
        return x, relative_positions(x.shape[1], self.dim).to(x)


class RelPositionAttention(nn.Module):
    """Multi-head attention with Transformer-XL style content (u) and position (v) biases."""

    def __init__(self, heads: int, dim: int, key_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.h, self.d_k = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim, bias=key_bias)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, c) -> (b, t, h, d)
        return x.view(x.shape[0], -1, self.h, self.d_k)

    @staticmethod
    def _shift(scores: torch.Tensor) -> torch.Tensor:
        """(b, h, T, 2T-1) over offsets -> (b, h, T, T) over key positions."""
        b, h, t, _ = scores.shape
        padded = torch.cat([scores.new_zeros(b, h, t, 1), scores], dim=-1).view(b, h, 2 * t, t)
        return padded[:, :, 1:].reshape(b, h, t, 2 * t - 1)[..., :t]

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x)).transpose(1, 2)
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self._heads(self.linear_pos(pos)).transpose(1, 2)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = self._shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = ~key_ok[:, None, None, :]
        attn = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(x.shape[0], -1, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1, self.w_2, self.activation = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm attention + feed-forward (this encoder uses no conv module and no macaron)."""

    def __init__(self, dim: int, heads: int, hidden: int, key_bias: bool):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, dim, key_bias)
        self.feed_forward = FeedForward(dim, hidden)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos, key_ok)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """Residual conv pair that lets each token see ``pre_lookahead_len`` future tokens."""

    def __init__(self, channels: int, pre_lookahead_len: int):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, c)
        h = F.pad(x.transpose(1, 2), (0, self.pre_lookahead_len))
        h = F.pad(F.leaky_relu(self.conv1(h)), (2, 0))
        return self.conv2(h).transpose(1, 2) + x


class NearestUpsample(nn.Module):
    """Repeat each frame ``stride`` times, then a causal conv of width 2*stride+1."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, t) -> (b, c, t*stride)
        h = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(h, (self.stride * 2, 0)))


class UpsampleConformerEncoderV2(nn.Module):
    """Constructor arguments as in the checkpoint's flow.yaml (extra training keys ignored)."""

    def __init__(self, input_size: int, output_size: int = 256, input_layer: str = "linear",
                 pre_lookahead_len: int = 3, num_blocks: int = 6, num_up_blocks: int = 4,
                 up_stride: int = 2, up_scale_factor: float = 2, attention_heads: int = 4,
                 pos_enc_layer_type: str = "rel_pos_espnet", selfattention_layer_type: str = "rel_selfattn",
                 key_bias: bool = True, linear_units: int = 2048, normalize_before: bool = True,
                 activation_type: str = "swish", **_training_only):
        super().__init__()
        wanted = {"input_layer": (input_layer, "linear"), "pos_enc_layer_type": (pos_enc_layer_type, "rel_pos_espnet"),
                  "selfattention_layer_type": (selfattention_layer_type, "rel_selfattn"),
                  "activation_type": (activation_type, "swish"), "normalize_before": (normalize_before, True)}
        for field, (got, supported) in wanted.items():
            if got != supported:
                raise ValueError(f"UpsampleConformerEncoderV2: {field}={got!r} is not supported (only {supported!r})")
        if float(up_scale_factor) != float(up_stride):
            raise ValueError(f"UpsampleConformerEncoderV2: up_scale_factor {up_scale_factor} != up_stride {up_stride}")
        self._output_size = output_size
        self.embed = ScaledRelPositionInput(input_size, output_size)
        self.pre_lookahead_layer = PreLookahead(output_size, pre_lookahead_len)
        layer = lambda: ConformerLayer(output_size, attention_heads, linear_units, key_bias)  # noqa: E731
        self.encoders = nn.ModuleList(layer() for _ in range(num_blocks))
        self.up_layer = NearestUpsample(output_size, up_stride)
        self.up_embed = ScaledRelPositionInput(input_size, output_size)
        self.up_encoders = nn.ModuleList(layer() for _ in range(num_up_blocks))
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def output_size(self) -> int:
        return self._output_size

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x: (b, t, input_size) token embeddings; lengths: (b,) -> (b, t*stride, output_size).
        Row ``b``'s first ``lengths[b] * stride`` outputs are what it computes alone (keys past
        its end are masked, the look-ahead sees zeros there; the other convs are causal)."""
        key_ok = torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]
        x, pos = self.embed(x)
        # the look-ahead conv reads the next tokens, zeros past the end for a row alone: a
        # padded batch row must see those zeros too, not its padding's embeddings
        x = self.pre_lookahead_layer(x.masked_fill(~key_ok[:, :, None], 0))
        for layer in self.encoders:
            x = layer(x, pos, key_ok)
        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        key_ok = key_ok.repeat_interleave(self.up_layer.stride, dim=1)
        x, pos = self.up_embed(x)
        for layer in self.up_encoders:
            x = layer(x, pos, key_ok)
        return self.after_norm(x)
