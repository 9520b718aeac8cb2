"""Kimi-Audio's language model, rebuilt from transformers' Qwen2 layers under Kimi's names.

Upstream ships its LM as remote code that imports flash-attn and runs one row at a time.
This module builds the same network from ``Qwen2DecoderLayer`` / ``Qwen2RMSNorm`` /
``Qwen2RotaryEmbedding`` with the parameter names of upstream's state dict as its code
writes them, loaded strictly (``weights.load_exact``: a missing or unexpected key is an
error naming it). Tested on a tiny checkpoint under those names; the real one has not been
loaded here (no weights can be downloaded), so a name upstream's code does not show would
first surface as that error:

* ``model.embed_tokens``: one table for both input streams; a position's input is the sum
  of its audio-stream and text-stream embeddings.
* ``model.vq_adaptor.layers``: Linear → SiLU → Dropout → Linear → LayerNorm, mapping four
  stacked Whisper-large-v3 frames (``kimia_adaptor_input_dim`` = 5120) to the hidden size.
  Where ``is_continuous_mask`` is set, the audio embedding becomes
  ``(embed(token) + adaptor(feature)) * sqrt(2)``.
* ``model.layers`` (28 in the 7B model) → ``model.norm`` → ``lm_head``: TEXT logits.
* ``model.mimo_layers`` (6) branch from the output of layer
  ``kimia_mimo_transformer_from_layer_index`` (21) → ``model.mimo_norm`` → ``mimo_output``:
  AUDIO-token logits. (Upstream's own names suggest the opposite; its ``kimia.py`` unpacks
  them swapped, so the behaviour is the one described here.)

Batching: attention is SDPA with a mask built from a 2-D padding mask over every key
position seen so far (cache + new), and rotary positions are per row (``position_ids``),
so a left-padded row sees exactly what it would see alone. A padded query attends to
itself only (a query with no key would give NaN, and NaN would then reach real rows
through the values).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from esn_core.models.cache_keyword import cache_keyword

# The Qwen2 fields of Kimi's config.json that the rebuilt layers read.
QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "attention_dropout",
)
# Kimi's own fields, with the 7B model's values where the config may leave them out.
KIMI_DEFAULTS = {
    "kimia_mimo_layers": 6,
    "kimia_mimo_transformer_from_layer_index": 21,
    "kimia_token_offset": 152064,
    "kimia_text_output_vocab": 152064,
    "kimia_audio_output_vocab": 16896,
    "kimia_adaptor_input_dim": 5120,
    "kimia_media_begin": 151661,
    "kimia_media_end": 151663,
    "use_whisper_feature": True,
}


def kimi_config(fields: dict):
    """A ``Qwen2Config`` carrying Kimi's extra fields, from a config.json-like dict.

    The MIMO layers are numbered after the main ones (their KV-cache slots), so the
    config's per-layer attention types cover both stacks.
    """
    from transformers import Qwen2Config

    qwen = {k: fields[k] for k in QWEN2_FIELDS if k in fields}
    if "rope_theta" in qwen and "rope_scaling" not in qwen:
        qwen["rope_parameters"] = {"rope_type": "default", "rope_theta": qwen["rope_theta"]}
    config = Qwen2Config(**qwen)
    for key, default in KIMI_DEFAULTS.items():
        setattr(config, key, fields.get(key, default))
    total = config.num_hidden_layers + config.kimia_mimo_layers
    config.layer_types = ["full_attention"] * total
    config.use_sliding_window = False
    config._attn_implementation = "sdpa"
    branch = config.kimia_mimo_transformer_from_layer_index
    if not 0 <= branch < config.num_hidden_layers:
        raise ValueError(
            f"kimia_mimo_transformer_from_layer_index={branch} is outside the "
            f"{config.num_hidden_layers} main layers"
        )
    return config


def read_config(path: Path):
    path = Path(path)
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON config: {err}") from err
    return kimi_config(fields)


class VQAdaptor(nn.Module):
    """Whisper features (4 frames stacked) into the LM's embedding space."""

    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.layers = nn.Sequential(
            nn.Linear(config.kimia_adaptor_input_dim, hidden),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden, eps=config.rms_norm_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _layer_takes_cache() -> str:
    """The keyword under which this transformers' decoder layer takes its KV cache."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    return cache_keyword(Qwen2DecoderLayer)


class KimiBackbone(nn.Module):
    """``model.*`` of the checkpoint: embeddings, adaptor, main stack, MIMO branch."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.qwen2.modeling_qwen2 import (
            Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding,
        )

        self.config = config
        n_main = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(n_main))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mimo_layers = nn.ModuleList(
            Qwen2DecoderLayer(config, n_main + i) for i in range(config.kimia_mimo_layers)
        )
        self.mimo_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.use_whisper_feature:
            self.vq_adaptor = VQAdaptor(config)
        # Not in the state dict (inv_freq is a non-persistent buffer): recomputed from the
        # config, never read from a checkpoint (upstream's came back as garbage).
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.branch = config.kimia_mimo_transformer_from_layer_index
        self._cache_kw = _layer_takes_cache()

    def embed(self, input_ids, text_input_ids, continuous_features=None, is_continuous_mask=None):
        """Both streams' embeddings summed, Whisper features mixed in where continuous."""
        audio = self.embed_tokens(input_ids)
        if continuous_features is not None and is_continuous_mask is not None:
            if not hasattr(self, "vq_adaptor"):
                raise ValueError("continuous features given but use_whisper_feature is off")
            mask = is_continuous_mask[:, :, None].to(audio.dtype)
            whisper = self.vq_adaptor(continuous_features.to(audio.dtype)) * mask
            mixed = (audio + whisper) * math.sqrt(2.0)
            audio = audio * (1 - mask) + mixed * mask
        return audio + self.embed_tokens(text_input_ids)

    def forward(self, input_ids, text_input_ids, attention_mask, position_ids, cache=None,
                continuous_features=None, is_continuous_mask=None):
        """Last hidden states of the text stack and of the MIMO branch, ``[B, S, H]`` each.

        ``attention_mask``: ``[B, past + S]``, 1 for real positions; ``position_ids``:
        ``[B, S]``. ``cache``: a transformers ``DynamicCache`` (or None), updated in place.
        """
        hidden = self.embed(input_ids, text_input_ids, continuous_features, is_continuous_mask)
        mask = attention_bias(attention_mask, hidden.shape[1])
        rope = self.rotary_emb(hidden, position_ids)
        kwargs = {"attention_mask": mask, "position_ids": position_ids,
                  "position_embeddings": rope, self._cache_kw: cache, "use_cache": cache is not None}
        branch = None
        for i, layer in enumerate(self.layers):
            hidden = _hidden(layer(hidden, **kwargs))
            if i == self.branch:
                branch = hidden
        text_hidden = self.norm(hidden)
        for layer in self.mimo_layers:
            branch = _hidden(layer(branch, **kwargs))
        return text_hidden, self.mimo_norm(branch)


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def attention_bias(attention_mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """``[B, 1, S, K]`` boolean SDPA mask: causal, padded keys blocked, a padded query
    attending to itself only (so no row of the softmax is empty)."""
    batch, n_keys = attention_mask.shape
    real = attention_mask.to(torch.bool)
    keys = torch.arange(n_keys, device=real.device)
    queries = keys[n_keys - n_new:]
    causal = keys[None, :] <= queries[:, None]  # [S, K]
    allowed = causal[None] & real[:, None, :]
    own = keys[None, :] == queries[:, None]
    query_real = real[:, n_keys - n_new:]
    allowed = allowed | (own[None] & ~query_real[:, :, None])
    return allowed[:, None]


class KimiAudioLM(nn.Module):
    """The whole LM: ``model`` (backbone), ``lm_head`` (text), ``mimo_output`` (audio)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = KimiBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mimo_output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def place(self, device, dtype) -> KimiAudioLM:
        """Weights to ``device``/``dtype``; the rotary frequencies recomputed there in float32
        (a cast would round them to ``dtype``)."""
        self.to(device=device, dtype=dtype)
        with torch.device(device):
            self.model.rotary_emb = type(self.model.rotary_emb)(self.config)
        return self

    def forward(self, input_ids, text_input_ids, attention_mask, position_ids, cache=None,
                continuous_features=None, is_continuous_mask=None, last_only: bool = True):
        """``(text_logits, audio_logits)``; ``[B, V]`` of the last position if ``last_only``.

        ``input_ids`` is the audio stream (the name the hooks' position root reads, with the
        2-D ``attention_mask``), ``text_input_ids`` the text stream.
        """
        text_h, audio_h = self.model(input_ids, text_input_ids, attention_mask, position_ids,
                                     cache, continuous_features, is_continuous_mask)
        if last_only:
            text_h, audio_h = text_h[:, -1], audio_h[:, -1]
        return self.lm_head(text_h), self.mimo_output(audio_h)
