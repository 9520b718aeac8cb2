"""A tiny MiniCPM-o 4.5 checkpoint folder in the real layout (config.json keys, safetensors
weight names under llm./apm./audio_projection_layer./tts./vpm.), random weights, seeded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3ForCausalLM

from esn_core.models.minicpm_audio import MiniCPMAudioIn
from esn_core.models.minicpm_checkpoint import lm_config
from esn_core.models.minicpm_tts import MiniCPMTTS

TINY_CONFIG = dict(
    architectures=["MiniCPMO"], model_type="minicpmo", hidden_size=16, intermediate_size=24,
    num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_hidden_layers=2,
    vocab_size=64, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    audio_pool_step=2,
    audio_config=dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, d_model=8,
                      encoder_ffn_dim=16, max_source_positions=10),
    tts_config=dict(llm_dim=16, llm_intermediate_size=12, hidden_size=8, intermediate_size=12,
                    num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1,
                    num_audio_tokens=11, num_text_tokens=13, num_vq=1, projector_type="mlp",
                    backbone_vocab_size=5))


def build(directory: Path, seed: int = 0, with_vision: bool = True) -> Path:
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_CONFIG, indent=1))
    weights = {f"llm.{k}": v for k, v in Qwen3ForCausalLM(lm_config(TINY_CONFIG)).state_dict().items()}
    weights |= MiniCPMAudioIn(TINY_CONFIG["audio_config"], 16, 2).state_dict()
    weights |= {f"tts.{k}": v for k, v in MiniCPMTTS(TINY_CONFIG["tts_config"]).state_dict().items()}
    if with_vision:
        weights["vpm.embeddings.patch_embedding.weight"] = torch.randn(4, 3, 2, 2)
        weights["resampler.query"] = torch.randn(2, 16)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    return directory
