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

from esn_core.models.minicpm_tts import ReluMLPProjector
from esn_core.models.weights import load_exact

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
        self.encoder_layer = int(audio_config.get("audio_encoder_layer", -1))

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """``[n_embeddings, llm_hidden]`` for ONE clip's mel ``[num_mel_bins, frames]``.

        One clip per call: in a padded batch Whisper's convolutions carry padded frames into
        the real ones. Stock ``WhisperEncoder.forward`` insists on 30 s inputs, upstream's
        subclass takes any length, so the encoder's steps run here on the clip's own frames.
        """
        apm = self.apm
        x = nn.functional.gelu(apm.conv1(mel[None].to(apm.conv1.weight.dtype)))
        x = nn.functional.gelu(apm.conv2(x)).transpose(1, 2)
        if x.shape[1] > apm.embed_positions.weight.shape[0]:
            raise ValueError(f"a clip of {mel.shape[-1]} mel frames exceeds the encoder's "
                             f"{apm.embed_positions.weight.shape[0]} positions (audio_config."
                             "max_source_positions); cut the source into 30 s pieces")
        states = [x + apm.embed_positions.weight[: x.shape[1]]]
        for layer in apm.layers:
            out = layer(states[-1], attention_mask=None)
            states.append(out[0] if isinstance(out, tuple) else out)
        states[-1] = apm.layer_norm(states[-1])  # as the encoder's last hidden state
        hidden = states[self.encoder_layer]
        embeds = self.audio_projection_layer(hidden)
        return self.audio_avg_pooler(embeds.transpose(1, 2)).transpose(1, 2)[0]


def load_audio_in(audio_config: Mapping, llm_hidden: int, pool_step: int,
                  weights: Mapping[str, torch.Tensor]) -> MiniCPMAudioIn:
    """A ``MiniCPMAudioIn`` holding the ``apm.`` / ``audio_projection_layer.`` entries of the
    checkpoint's flat state dict; ``WeightNameError`` lists missing/unexpected names."""
    module = MiniCPMAudioIn(audio_config, llm_hidden, pool_step)
    own = {k: v for k, v in weights.items() if k.startswith(PREFIXES)}
    load_exact(module, own, "audio weights")
    return module
