"""Discrete source tokens for Kimi-Audio: GLM-4-Voice's WhisperVQ encoder, rebuilt.

The tokenizer (``THUDM/glm-4-voice-tokenizer``) is the first ``quantize_position`` layers of
a Whisper encoder, then average/max pooling (``pooling_kernel_size``, 50 Hz → 12.5 Hz) and a
nearest-codebook lookup (squared L2) into ``quantize_vocab_size`` codes. Our module is built
from transformers' ``WhisperEncoderLayer`` under the checkpoint's names (``conv1``, ``conv2``,
``embed_positions``, ``layers.*``, ``codebook``, ``embed_positions2``; stored under
``model.encoder.``); the checkpoint's later layers, final norm and decoder are not used.

Choices that follow the tokenizer's config:

* ``encoder_causal_convolution``: both convolutions pad on the left only.
* attention: fully causal if ``encoder_causal_attention`` or ``quantize_causal_encoder``;
  else block-causal with ``quantize_causal_block_size`` frames (a frame sees its block and
  everything before it; the block shrinks by the pooling factor after pooling), padded
  keys blocked; else padding only.

Each source is tokenized alone (as upstream's prompt manager does), padded to a multiple of
the encoder's stride (1280 samples = one token): one token per 80 ms of audio.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from esn_core.models.weights import load_exact, read_safetensors, weight_files

SOURCE_RATE = 16_000
UNUSED_KEYS = ("ema_count", "ema_weight")  # training-time EMA statistics of the codebook


class CausalConv1d(nn.Conv1d):
    """A 1-D convolution that pads on the left only (its output never sees the future)."""

    def __init__(self, *args, padding: int = 0, **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        self.left = self.dilation[0] * (self.kernel_size[0] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (self.left, 0)))


def block_causal(valid: torch.Tensor, block: int | None, causal: bool, dtype) -> torch.Tensor:
    """``[B, 1, T, T]`` additive mask; ``valid``: ``[B, T]`` real frames."""
    n = valid.shape[1]
    steps = torch.arange(n, device=valid.device)
    if causal:
        allowed = steps[None, :] <= steps[:, None]
    elif block:
        # A query sees every key of its own block and every key before it.
        allowed = (steps[None, :] // block) <= (steps[:, None] // block)
    else:
        allowed = torch.ones(n, n, dtype=torch.bool, device=valid.device)
    allowed = allowed[None] & valid[:, None, :].bool()
    allowed = allowed | torch.eye(n, dtype=torch.bool, device=valid.device)[None]  # no empty row
    bias = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class WhisperVQ(nn.Module):
    def __init__(self, config):
        from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

        super().__init__()
        self.config = config
        d = config.d_model
        conv = CausalConv1d if getattr(config, "encoder_causal_convolution", False) else nn.Conv1d
        self.conv1 = conv(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = conv(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.quantize_position))
        self.pool_size = config.pooling_kernel_size or 1
        self.codebook = nn.Embedding(config.quantize_vocab_size, d)
        self.embed_positions2 = nn.Embedding(math.ceil(config.max_source_positions / self.pool_size), d)
        self.causal = bool(getattr(config, "encoder_causal_attention", False)
                           or getattr(config, "quantize_causal_encoder", False))
        self.block = getattr(config, "quantize_causal_block_size", None)
        self.pool_at = getattr(config, "pooling_position", None)
        pool = getattr(config, "pooling_type", "max")
        if pool not in ("max", "avg"):
            raise ValueError(f"pooling_type {pool!r} is not 'max' or 'avg'")
        self.pool = nn.MaxPool1d(self.pool_size) if pool == "max" else nn.AvgPool1d(self.pool_size)
        params = inspect.signature(WhisperEncoderLayer.forward).parameters
        self._head_mask = {"layer_head_mask": None} if "layer_head_mask" in params else {}

    @property
    def stride(self) -> int:
        """Mel frames per token."""
        return self.conv1.stride[0] * self.conv2.stride[0] * self.pool_size

    def forward(self, mel: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, T_tokens]`` for ``mel`` ``[B, n_mels, T]`` (``frame_mask``: ``[B, T]``)."""
        x = nn.functional.gelu(self.conv1(mel))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        valid = frame_mask[:, :: self.conv1.stride[0] * self.conv2.stride[0]]
        x = x + self.embed_positions.weight[: x.shape[1]]
        block = self.block
        bias = block_causal(valid, block, self.causal, x.dtype)
        for index, layer in enumerate(self.layers):
            out = layer(x, bias, **self._head_mask)
            x = out[0] if isinstance(out, tuple) else out
            if self.pool_at is not None and index + 1 == self.pool_at and self.pool_size > 1:
                x = self._pooled(x)
                valid = valid[:, :: self.pool_size]
                block = block // self.pool_size if block else None
                bias = block_causal(valid, block, self.causal, x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        codebook = self.codebook.weight
        distances = (flat * flat).sum(1, keepdim=True) - 2 * flat @ codebook.T + (codebook * codebook).sum(1)
        return distances.argmin(dim=1).reshape(x.shape[:2]), valid

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 1)
        extra = x.shape[-1] % self.pool_size
        if extra:
            x = nn.functional.pad(x, (0, self.pool_size - extra))
        return self.pool(x).permute(0, 2, 1)


class SourceTokenizer:
    """Audio at 16 kHz → 0-based VQ codes (12.5 Hz), from a ``glm-4-voice-tokenizer`` folder."""

    def __init__(self, directory: Path, device):
        from transformers import WhisperConfig, WhisperFeatureExtractor

        directory = Path(directory)
        config = WhisperConfig.from_pretrained(directory)
        config._attn_implementation = "sdpa"
        for key in ("quantize_position", "quantize_vocab_size"):
            if getattr(config, key, None) is None:
                raise ValueError(f"{directory / 'config.json'} has no {key}: not a WhisperVQ tokenizer")
        self.extractor = WhisperFeatureExtractor.from_pretrained(directory)
        state = {}
        for name, tensor in read_safetensors(weight_files(directory, [])).items():
            if not name.startswith("model.encoder."):
                continue
            name = name[len("model.encoder."):]
            if name.startswith("layer_norm") or name in UNUSED_KEYS:
                continue
            if name.startswith("layers.") and int(name.split(".")[1]) >= config.quantize_position:
                continue
            state[name] = tensor
        self.model = WhisperVQ(config)
        load_exact(self.model, state, f"{directory} (WhisperVQ tokenizer)")
        self.model = self.model.to(device).eval()  # float32, as upstream runs it
        self.device = device

    @torch.no_grad()
    def __call__(self, audio: np.ndarray) -> list[int]:
        """One source's codes: 30 s windows, each padded to a whole number of tokens."""
        codes: list[int] = []
        hop = self.extractor.hop_length
        multiple = self.model.stride * hop
        for start in range(0, len(audio), 30 * SOURCE_RATE):
            segment = audio[start:start + 30 * SOURCE_RATE]
            features = self.extractor(segment, sampling_rate=SOURCE_RATE, return_tensors="pt",
                                      return_attention_mask=True, padding="longest",
                                      pad_to_multiple_of=multiple)
            mel = features.input_features.to(self.device, torch.float32)
            ids, valid = self.model(mel, features.attention_mask.to(self.device))
            codes += ids[0][valid[0].bool()].tolist()
        return codes
