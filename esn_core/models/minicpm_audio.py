"""MiniCPM-o 4.5's audio input side: the modules that turn a source's mel frames into the
LM's input embeddings (SPEC: the source audio of the EVC prompt).

Checkpoint names: ``apm.*`` (a Whisper encoder; transformers' stock ``WhisperEncoder`` holds
the same parameter names as upstream's subclass), ``audio_projection_layer.*`` (ReLU MLP from
a quarter of Whisper's FFN width to the LM width). The average pooling over
``audio_pool_step`` frames has no weights. Loading is strict: every parameter present, every
``apm.`` / ``audio_projection_layer.`` weight used.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from esn_core.models.minicpm_tts import ReluMLPProjector, load_exact

PREFIXES = ("apm.", "audio_projection_layer.")


class AudioConfigError(ValueError):
    """An ``audio_config`` / ``audio_pool_step`` value the audio side cannot use."""


class MiniCPMAudioIn(nn.Module):
    """``apm`` + ``audio_projection_layer`` + the pooler, under the checkpoint's names."""

    def __init__(self, audio_config: Mapping, llm_hidden: int, pool_step: int):
        super().__init__()
        if isinstance(pool_step, bool) or not isinstance(pool_step, int) or pool_step <= 0:
            raise AudioConfigError(f"audio_pool_step must be a positive integer, got {pool_step!r}")
        ffn = audio_config.get("encoder_ffn_dim")
        if not isinstance(ffn, int) or ffn <= 0 or ffn % 4:
            raise AudioConfigError("audio_config.encoder_ffn_dim must be a positive multiple "
                                   f"of 4 (the projector reads a quarter of it), got {ffn!r}")
        config = WhisperConfig(**audio_config)
        config._attn_implementation = "eager"
        self.apm = WhisperEncoder(config)
        self.audio_projection_layer = ReluMLPProjector(ffn // 4, llm_hidden)
        self.audio_avg_pooler = nn.AvgPool1d(pool_step, stride=pool_step)


def load_audio_in(audio_config: Mapping, llm_hidden: int, pool_step: int,
                  weights: Mapping[str, torch.Tensor]) -> MiniCPMAudioIn:
    """A ``MiniCPMAudioIn`` holding the ``apm.`` / ``audio_projection_layer.`` entries of the
    checkpoint's flat state dict; ``WeightNameError`` lists missing/unexpected names."""
    module = MiniCPMAudioIn(audio_config, llm_hidden, pool_step)
    own = {k: v for k, v in weights.items() if k.startswith(PREFIXES)}
    load_exact(module, own, "audio weights")
    return module
