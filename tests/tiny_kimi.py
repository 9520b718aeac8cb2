"""A tiny Kimi-Audio checkpoint in upstream's file layout, built locally.

``config.json`` + ``model.safetensors`` (the LM under Kimi's parameter names, written from
a dict of tensors named here, not from our module's ``state_dict``, so loading it checks the
names), ``tiktoken.model`` (a byte-level BPE: the 256 bytes and the prefixes of a few
words), ``whisper-large-v3/`` (a real transformers ``WhisperModel`` with random weights,
saved by ``save_pretrained``), ``glm-4-voice-tokenizer/`` (GLM-4-Voice's WhisperVQ layout), ``audio_detokenizer/``
(the flow-matching DiT, tensors named by hand) and ``vocoder/`` (PyPI's BigVGAN). Shapes are shrunk so a batch generates in about a second on
two CPU cores; the token layout keeps the real one: the special table right after the base
vocabulary, the audio tokens after the text vocabulary.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from esn_core.models.kimi_tokens import N_SPECIAL

CORPUS = (
    "Repeat exactly the words spoken in this audio, word for word, and say them with the "
    "emotion: happy, angry, sad, surprise or neutral. Reply with the words only. "
    "the quick brown fox jumps over the lazy dog"
)
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 32, 48, 4, 2
MAIN_LAYERS, MIMO_LAYERS, BRANCH = 4, 2, 2
AUDIO_CODES = 48
WHISPER_D = 16
SOURCE_RATE = 16_000


def bpe_ranks() -> dict[bytes, int]:
    """Every byte, then every prefix of the corpus' words (each the merge of a shorter
    prefix and one byte, so tiktoken can build it)."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in CORPUS.replace(",", " ").replace(".", " ").replace(":", " ").split():
        for piece in (word, " " + word):
            raw = piece.encode()
            for end in range(2, len(raw) + 1):
                ranks.setdefault(raw[:end], len(ranks))
    return ranks


def write_tiktoken(path: Path) -> int:
    ranks = bpe_ranks()
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")
    return len(ranks)


def config_fields(n_base: int) -> dict:
    offset = n_base + N_SPECIAL
    return {
        "architectures": ["MoonshotKimiaForCausalLM"],
        "model_type": "kimi_audio",
        "vocab_size": offset + AUDIO_CODES,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": MAIN_LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "kimia_mimo_layers": MIMO_LAYERS,
        "kimia_mimo_transformer_from_layer_index": BRANCH,
        "kimia_token_offset": offset,
        "kimia_text_output_vocab": offset,
        "kimia_audio_output_vocab": AUDIO_CODES,
        "kimia_adaptor_input_dim": 4 * WHISPER_D,
        "kimia_media_begin": n_base + 18,
        "kimia_media_end": n_base + 20,
        "use_whisper_feature": True,
    }


def _layer(prefix: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    head = HIDDEN // HEADS
    shapes = {
        "self_attn.q_proj.weight": (HEADS * head, HIDDEN), "self_attn.q_proj.bias": (HEADS * head,),
        "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN), "self_attn.k_proj.bias": (KV_HEADS * head,),
        "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN), "self_attn.v_proj.bias": (KV_HEADS * head,),
        "self_attn.o_proj.weight": (HIDDEN, HEADS * head),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }
    state = {f"{prefix}.{k}": torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    state[f"{prefix}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    state[f"{prefix}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    return state


def lm_state(fields: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The LM's tensors under upstream's names (``MoonshotKimiaForCausalLM``)."""
    g = torch.Generator().manual_seed(seed)
    vocab = fields["vocab_size"]
    state = {"model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=g) * 0.5,
             "model.norm.weight": torch.ones(HIDDEN), "model.mimo_norm.weight": torch.ones(HIDDEN),
             "lm_head.weight": torch.randn(vocab, HIDDEN, generator=g) * 0.5,
             "mimo_output.weight": torch.randn(vocab, HIDDEN, generator=g) * 0.5}
    for i in range(MAIN_LAYERS):
        state.update(_layer(f"model.layers.{i}", g))
    for i in range(MIMO_LAYERS):
        state.update(_layer(f"model.mimo_layers.{i}", g))
    adaptor_in = fields["kimia_adaptor_input_dim"]
    state.update({
        "model.vq_adaptor.layers.0.weight": torch.randn(HIDDEN, adaptor_in, generator=g) * 0.2,
        "model.vq_adaptor.layers.0.bias": torch.zeros(HIDDEN),
        "model.vq_adaptor.layers.3.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.2,
        "model.vq_adaptor.layers.3.bias": torch.zeros(HIDDEN),
        "model.vq_adaptor.layers.4.weight": torch.ones(HIDDEN),
        "model.vq_adaptor.layers.4.bias": torch.zeros(HIDDEN),
    })
    # Steer the audio head towards audio codes, so generation produces some codes and
    # a sampled audio end token now and then (as a trained model does).
    state["mimo_output.weight"][fields["kimia_token_offset"]:] *= 3.0
    # ... and towards the ends: with these scales some rows of a batch end at an audio
    # end token and some at the length cap, and text ends early (tests need both).
    n_base = fields["kimia_media_begin"] - 18
    state["mimo_output.weight"][n_base + 2] *= 1.6  # <|im_msg_end|>
    state["lm_head.weight"][n_base + 24] *= 2.0  # <|im_kimia_text_eos|>
    return state


def write_whisper(directory: Path, seed: int = 0) -> None:
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(
        d_model=WHISPER_D, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=128,
        max_source_positions=1500, max_target_positions=32, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    torch.manual_seed(seed)
    WhisperModel(config).save_pretrained(directory)


VQ_LAYERS, VQ_POSITION, VQ_CODES = 3, 2, 40


def write_vq_tokenizer(directory: Path, seed: int = 0) -> None:
    """GLM-4-Voice's tokenizer layout: a Whisper checkpoint (``model.encoder.*``, more
    layers than the quantizer uses, final norm, decoder) plus the VQ config fields and
    ``codebook`` / ``embed_positions2``; ``preprocessor_config.json`` for the features."""
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        d_model=WHISPER_D, encoder_layers=VQ_LAYERS, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=128,
        max_source_positions=1500, max_target_positions=32, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    config.update(dict(
        pooling_kernel_size=4, pooling_type="avg", pooling_position=VQ_POSITION,
        quantize_position=VQ_POSITION, quantize_vocab_size=VQ_CODES,
        quantize_causal_block_size=200, quantize_causal_encoder=False,
        encoder_causal_attention=False, encoder_causal_convolution=True,
    ))
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(directory)
    torch.manual_seed(seed + 1)
    state = {f"model.{k}": v for k, v in WhisperModel(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 2)
    state["model.encoder.codebook.weight"] = torch.randn(VQ_CODES, WHISPER_D, generator=g)
    state["model.encoder.embed_positions2.weight"] = torch.randn(375, WHISPER_D, generator=g)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))


DIT_HIDDEN, DIT_HEADS, DIT_DEPTH = 16, 2, 2


def dit_config() -> dict:
    return {"model": {"dit": {
        "input_size": 80, "semantic_vocab_size": AUDIO_CODES, "hidden_size": DIT_HIDDEN,
        "depth": DIT_DEPTH, "num_heads": DIT_HEADS, "mlp_ratio": 2.0, "ffn_type": "vanilla_mlp",
        "position_embedding_type": "sincos", "max_seq_len": 4096, "use_rope": True,
        "rope_params": {"max_position_embeddings": 4096, "rope_base": 10000.0,
                        "rope_interpolation_factor": 1.0},
    }}, "normalize_mel": False, "mel_mean": None, "mel_std": None}


def dit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The detokenizer's tensors under upstream's names (``speech_model.`` + DiTPrefix)."""
    g = torch.Generator().manual_seed(seed + 3)
    h = DIT_HIDDEN
    shapes = {
        "t_embedder.mlp.0": (h, 256), "t_embedder.mlp.2": (h, h), "input_linear": (h, 80),
        "final_layer.linear": (80, h), "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    for i in range(DIT_DEPTH):
        shapes.update({
            f"blocks.{i}.attn.qkv": (3 * h, h), f"blocks.{i}.attn.proj": (h, h),
            f"blocks.{i}.mlp.fc1": (2 * h, h), f"blocks.{i}.mlp.fc2": (h, 2 * h),
            f"blocks.{i}.adaLN_modulation.1": (6 * h, h),
        })
    state = {}
    for name, (out, inp) in shapes.items():
        state[f"speech_model.{name}.weight"] = torch.randn(out, inp, generator=g) / math.sqrt(inp)
        state[f"speech_model.{name}.bias"] = 0.1 * torch.randn(out, generator=g)
    state["speech_model.semantic_token_embedding.weight"] = torch.randn(AUDIO_CODES + 1, h, generator=g)
    state["speech_model.position_embedding._float_tensor"] = torch.zeros(1)
    return state


def vocoder_config() -> dict:
    return {
        "num_mels": 80, "upsample_rates": [8, 6, 5, 2], "upsample_kernel_sizes": [16, 12, 10, 4],
        "upsample_initial_channel": 32, "resblock": "1", "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1, 3]], "activation": "snakebeta", "snake_logscale": True,
        "use_tanh_at_final": False, "use_bias_at_final": False, "sampling_rate": 24000,
        "hop_size": 480, "n_fft": 1920, "win_size": 1920, "fmin": 0, "fmax": None,
    }


def write_speech_decoder(directory: Path, seed: int = 0) -> None:
    """``audio_detokenizer/`` (config.yaml, model.pt) and ``vocoder/`` (config.json,
    model.pt with a ``generator`` state dict of PyPI's BigVGAN)."""
    import yaml
    from bigvgan.bigvgan import BigVGAN
    from bigvgan.env import AttrDict

    detok = directory / "audio_detokenizer"
    detok.mkdir(parents=True, exist_ok=True)
    (detok / "config.yaml").write_text(yaml.safe_dump(dit_config()))
    torch.save({"state_dict": dit_state(seed)}, detok / "model.pt")
    vocoder_dir = directory / "vocoder"
    vocoder_dir.mkdir(parents=True, exist_ok=True)
    (vocoder_dir / "config.json").write_text(json.dumps(vocoder_config()))
    torch.manual_seed(seed + 4)
    vocoder = BigVGAN(AttrDict(vocoder_config()), use_cuda_kernel=False)
    torch.save({"generator": vocoder.state_dict()}, vocoder_dir / "model.pt")


def build_checkpoint(directory: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_base = write_tiktoken(directory / "tiktoken.model")
    fields = config_fields(n_base)
    (directory / "config.json").write_text(json.dumps(fields, indent=2))
    save_file(lm_state(fields, seed), str(directory / "model.safetensors"))
    write_whisper(directory / "whisper-large-v3", seed)
    write_vq_tokenizer(directory / "glm-4-voice-tokenizer", seed)
    write_speech_decoder(directory, seed)
    return directory


def write_sources(directory: Path, seconds=(0.9, 1.4, 0.6), seed: int = 0) -> list[Path]:
    """Short noisy tones at 16 kHz (and one at 22.05 kHz stereo, to exercise reading)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, length in enumerate(seconds):
        rate = 22_050 if i == 1 else SOURCE_RATE
        t = np.arange(int(length * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (180 + 60 * i) * t) + 0.05 * rng.standard_normal(t.size)
        if i == 1:
            wave = np.stack([wave, wave], axis=1)
        path = Path(directory) / f"src{i}.wav"
        sf.write(path, wave.astype(np.float32), rate)
        paths.append(path)
    return paths
