"""MiniCPM-o 4.5's TTS module (``MiniCPMO.tts``): the ``synth`` side of SPEC's two groups.

Built from the checkpoint's ``tts_config`` with the weight names upstream's code gives it
under ``tts.``, loaded strictly (0 missing / 0 unexpected keys, else an error naming them;
checked on a tiny checkpoint, not yet on the real safetensors): a stock
``LlamaModel`` backbone (``model.*``, whose layers' gated MLPs are the ``synth`` group), the
text embedding ``emb_text``, one code embedding ``emb_code.i`` and one weight-norm code head
``head_code.i`` per VQ codebook, and the projectors ``projector_spk`` / ``projector_semantic``
that map the LM's hidden states into the TTS width. Code generation lives elsewhere; this
module only owns the parameters and their layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from transformers import LlamaConfig, LlamaModel

from esn_core.models.weights import load_exact

# tts_config keys the module's shapes depend on (the checkpoint's config.json spelling).
SHAPE_KEYS = ("llm_dim", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_hidden_layers", "num_key_value_heads", "num_audio_tokens", "num_text_tokens",
              "num_vq")
PROJECTOR_TYPES = ("mlp", "default", "minicpm")


class TTSConfigError(ValueError):
    """A ``tts_config`` value the TTS module cannot be built from; the message names it."""


def check_tts_config(cfg: Mapping) -> dict:
    """``cfg`` with every shape key present as a positive int and a known projector and
    backbone, else a ``TTSConfigError`` naming the field and its value."""
    for key in SHAPE_KEYS:
        if key not in cfg:
            raise TTSConfigError(f"tts_config.{key} is missing")
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise TTSConfigError(f"tts_config.{key} must be a positive integer, got {value!r}")
    if cfg.get("backbone_model", "llama") != "llama":
        raise TTSConfigError(f"tts_config.backbone_model must be 'llama' (the only backbone "
                             f"upstream builds), got {cfg['backbone_model']!r}")
    if cfg.get("projector_type", "mlp") not in PROJECTOR_TYPES:
        raise TTSConfigError(f"tts_config.projector_type must be one of {PROJECTOR_TYPES}, "
                             f"got {cfg['projector_type']!r}")
    # Upstream's other TTS path (text in chunks of 10 tokens, each followed by audio_bos, and
    # its own sampling defaults) is taken when ``interleaved`` is set; only the default
    # path is built here, and upstream refuses any condition but hidden_text_merge.
    if cfg.get("interleaved", False):
        raise TTSConfigError("tts_config.interleaved is true: only upstream's non-interleaved "
                             "TTS path is built")
    if cfg.get("condition_type", "hidden_text_merge") != "hidden_text_merge":
        raise TTSConfigError(f"tts_config.condition_type must be 'hidden_text_merge' (the only "
                             f"one upstream implements), got {cfg['condition_type']!r}")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"] or \
            cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise TTSConfigError("tts_config.hidden_size must divide by num_attention_heads, and "
                             "num_attention_heads by num_key_value_heads; got "
                             f"{cfg['hidden_size']}, {cfg['num_attention_heads']}, "
                             f"{cfg['num_key_value_heads']}")
    return dict(cfg)


class ReluMLPProjector(nn.Module):
    """``linear2(relu(linear1(x)))``: upstream's ``projector_type: mlp`` (with biases)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim, bias=True)
        self.linear2 = nn.Linear(out_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(torch.relu(self.linear1(x)))


class GatedProjector(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with biases: upstream's ``projector_type: minicpm``.
    Gated, but outside ``model``, so it is not part of the ``synth`` group."""

    def __init__(self, in_dim: int, inner: int, out_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(in_dim, inner, bias=True)
        self.up_proj = nn.Linear(in_dim, inner, bias=True)
        self.down_proj = nn.Linear(inner, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def make_projector(cfg: Mapping) -> nn.Module:
    kind = cfg.get("projector_type", "mlp")
    if kind == "mlp":
        return ReluMLPProjector(cfg["llm_dim"], cfg["hidden_size"])
    if kind == "minicpm":
        return GatedProjector(cfg["llm_dim"], cfg.get("llm_intermediate_size", 768),
                              cfg["hidden_size"])
    return nn.Linear(cfg["llm_dim"], cfg["hidden_size"], bias=False)


class MiniCPMTTS(nn.Module):
    """The parameters of ``MiniCPMO.tts`` under their checkpoint names (see module doc)."""

    def __init__(self, cfg: Mapping):
        super().__init__()
        cfg = check_tts_config(cfg)
        self.config = cfg
        backbone = LlamaConfig(
            hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_attention_heads=cfg["num_attention_heads"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_key_value_heads=cfg["num_key_value_heads"],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            # upstream's LlamaConfig keeps Llama's default vocabulary; the backbone is fed
            # inputs_embeds only, but its embed_tokens is in the checkpoint and must load.
            vocab_size=cfg.get("backbone_vocab_size", 32000))
        backbone._attn_implementation = "eager"
        self.emb_text = nn.Embedding(cfg["num_text_tokens"], cfg["hidden_size"])
        self.model = LlamaModel(backbone)
        self.projector_spk = make_projector(cfg)
        self.projector_semantic = make_projector(cfg)
        self.emb_code = nn.ModuleList(
            nn.Embedding(cfg["num_audio_tokens"], cfg["hidden_size"])
            for _ in range(cfg["num_vq"]))
        # torch's parametrization weight_norm, as upstream: the checkpoint stores
        # head_code.i.parametrizations.weight.original0 (g) and .original1 (v).
        self.head_code = nn.ModuleList(
            weight_norm(nn.Linear(cfg["hidden_size"], cfg["num_audio_tokens"], bias=False))
            for _ in range(cfg["num_vq"]))


def load_tts(cfg: Mapping, weights: Mapping[str, torch.Tensor], prefix: str = "tts.") -> MiniCPMTTS:
    """A ``MiniCPMTTS`` holding the ``prefix``-ed entries of ``weights`` (the checkpoint's
    flat state dict). Every module parameter must be present and every ``prefix``-ed weight
    used: a ``WeightNameError`` lists the missing and unexpected names otherwise."""
    tts = MiniCPMTTS(cfg)
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    load_exact(tts, own, f"TTS weights under {prefix!r}")
    return tts
