"""MiniCPM-o 4.5's checkpoint folder (``openbmb/MiniCPM-o-4_5``): files it must hold, its
config, and loading its weights into our modules with 0 missing / 0 unexpected keys.

Layout read: ``config.json`` (Qwen3 LM keys at the top level, plus ``audio_config``,
``tts_config``, ``audio_pool_step``) and ``model.safetensors`` or an index with shards.
Weight prefixes: ``llm.`` -> stock ``Qwen3ForCausalLM``; ``apm.`` / ``audio_projection_layer.``
-> ``minicpm_audio``; ``tts.`` -> ``minicpm_tts``. The vision tower (``vpm.``, ``resampler.``)
is skipped by rule: EVC feeds no images. Any other prefix is an error, not silently dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from esn_core.models.minicpm_audio import PREFIXES as AUDIO_PREFIXES
from esn_core.models.minicpm_audio import MiniCPMAudioIn, load_audio_in
from esn_core.models.minicpm_tts import MiniCPMTTS, load_tts
from esn_core.models.weights import WeightNameError, load_exact, read_safetensors, weight_files

HUB_ID = "openbmb/MiniCPM-o-4_5"
CONFIG = "config.json"
# The tokenizer files the hub folder ships (its own class name is remote code; the files are
# a standard fast tokenizer, read here by transformers' PreTrainedTokenizerFast).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Special tokens the EVC prompt and the TTS hand-over use (MiniCPM-o 4.5's added tokens).
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>", "<|audio_start|>",
                  "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>", "<|spk_eos|>",
                  "<|tts_bos|>", "<|tts_eos|>")
SKIPPED_PREFIXES = ("vpm.", "resampler.")  # the vision tower: unused by EVC
SUB_CONFIGS = ("audio_config", "tts_config", "vision_config")


class CheckpointError(FileNotFoundError):
    """A MiniCPM-o checkpoint that is missing or incomplete; the message names the file."""


@dataclass
class MiniCPMParts:
    llm: Qwen3ForCausalLM
    audio_in: MiniCPMAudioIn
    tts: MiniCPMTTS
    config: dict


def read_config(directory: Path) -> dict:
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"MiniCPM-o checkpoint {directory} has no {CONFIG}; download "
                              f"{HUB_ID} there and set model path to it")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not JSON: {err}") from err
    for key in ("audio_config", "tts_config", "hidden_size"):
        if key not in config:
            raise CheckpointError(f"{path} has no {key!r}: not a MiniCPM-o 4.5 config")
    return config


def load_tokenizer(directory: str | os.PathLike):
    """The checkpoint's text tokenizer and chat template, without remote code.

    Every special token of ``SPECIAL_TOKENS`` must be a single id: the prompt places audio
    placeholders (``<unk>``) and the TTS hand-over (``<|tts_bos|>``/``<|tts_eos|>``) by id.
    """
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    for name in TOKENIZER_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"MiniCPM-o checkpoint {directory} has no {name}; download "
                                  f"{HUB_ID} there (its tokenizer files)")
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        eos_token=settings.get("eos_token", "<|im_end|>"),
        pad_token=settings.get("pad_token", "<|endoftext|>"),
        unk_token=settings.get("unk_token", "<unk>"))
    template = settings.get("chat_template")
    if not template:
        raise CheckpointError(f"{directory / 'tokenizer_config.json'} has no chat_template")
    tokenizer.chat_template = template
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
            raise CheckpointError(f"{directory / 'tokenizer.json'}: special token {token!r} "
                                  f"is not one token (got ids {ids})")
    return tokenizer


def lm_config(config: dict) -> Qwen3Config:
    """The top-level keys as a stock Qwen3 config (upstream's config subclasses Qwen3's)."""
    keys = {k: v for k, v in config.items() if k not in SUB_CONFIGS}
    keys.pop("architectures", None), keys.pop("auto_map", None), keys.pop("model_type", None)
    lm = Qwen3Config(**keys)
    # SDPA: eager attention turns a left-padded row's fully masked padding queries into NaN,
    # which then reaches the real positions through their (zero-weight) values.
    lm._attn_implementation = "sdpa"
    return lm


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    missing: list[str] = []
    files = weight_files(directory, missing)
    if missing:
        raise CheckpointError(f"MiniCPM-o checkpoint {directory} is missing: {', '.join(missing)}")
    return read_safetensors(files)


def load_checkpoint(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MiniCPMParts:
    """The LM, audio input and TTS of the checkpoint at ``directory``, every weight placed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"MiniCPM-o checkpoint directory {directory} does not exist; "
                              f"download {HUB_ID} there and set model path to it")
    config = read_config(directory)
    weights = load_weights(directory)
    stray = sorted(k for k in weights if not k.startswith(
        ("llm.", "tts.") + AUDIO_PREFIXES + SKIPPED_PREFIXES))
    if stray:
        raise WeightNameError(f"{directory}: weights under no known prefix: {stray[:8]}")
    llm = Qwen3ForCausalLM(lm_config(config))
    own = {k[4:]: v for k, v in weights.items() if k.startswith("llm.")}
    # A tied head lives in embed_tokens: the checkpoint may leave it out.
    tied = ("lm_head.weight",) if config.get("tie_word_embeddings") and "lm_head.weight" not in own else ()
    load_exact(llm, own, f"{directory}: LM weights under 'llm.' (Qwen3ForCausalLM)", may_lack=tied)
    audio_in = load_audio_in(config["audio_config"], config["hidden_size"],
                             config.get("audio_pool_step", 5), weights)
    tts = load_tts(config["tts_config"], weights)
    parts = MiniCPMParts(llm.to(dtype).eval(), audio_in.to(dtype).eval(), tts.to(dtype).eval(),
                         config)
    return parts
