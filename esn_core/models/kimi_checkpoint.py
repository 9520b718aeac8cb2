"""Kimi-Audio's checkpoint folder: which files it must hold (reading them: ``weights``).

Upstream's layout (``moonshotai/Kimi-Audio-7B-Instruct``): ``config.json``,
``model*.safetensors``, ``tiktoken.model``, ``whisper-large-v3/``, ``audio_detokenizer/``,
``vocoder/``; the source tokenizer ``THUDM/glm-4-voice-tokenizer`` is fetched separately by
upstream and expected here as ``glm-4-voice-tokenizer/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from esn_core.models.weights import weight_files

HUB_ID = "moonshotai/Kimi-Audio-7B-Instruct"
CONFIG = "config.json"
TIKTOKEN = "tiktoken.model"
WHISPER_DIR = "whisper-large-v3"
VQ_DIR = "glm-4-voice-tokenizer"
DETOKENIZER_DIR = "audio_detokenizer"
VOCODER_DIR = "vocoder"


class CheckpointError(FileNotFoundError):
    """A Kimi-Audio checkpoint that is missing or incomplete; the message names the file."""


# --------------------------------------------------------------------------- checkpoint


def check_checkpoint(directory: str | os.PathLike) -> Path:
    """``directory`` if it holds every file the adapter loads, else a ``CheckpointError``
    naming each missing file (upstream's layout: LM config + safetensors, ``tiktoken.model``,
    ``whisper-large-v3/``, ``audio_detokenizer/``, ``vocoder/``; plus ``glm-4-voice-tokenizer/``, which upstream downloads on
    its own)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"Kimi-Audio checkpoint directory {directory} does not exist; "
                              f"download {HUB_ID} there and set model path to it")
    missing: list[str] = []
    for name in (CONFIG, TIKTOKEN):
        if not (directory / name).is_file():
            missing.append(name)
    weight_files(directory, missing)
    whisper = directory / WHISPER_DIR
    if not (whisper / "config.json").is_file():
        missing.append(f"{WHISPER_DIR}/config.json")
    weight_files(whisper, missing, f"{WHISPER_DIR}/")
    vq = directory / VQ_DIR
    for name in ("config.json", "preprocessor_config.json"):
        if not (vq / name).is_file():
            missing.append(f"{VQ_DIR}/{name}")
    weight_files(vq, missing, f"{VQ_DIR}/")
    for part, name in ((DETOKENIZER_DIR, "config.yaml"), (DETOKENIZER_DIR, "model.pt"),
                       (VOCODER_DIR, "config.json"), (VOCODER_DIR, "model.pt")):
        if not (directory / part / name).is_file():
            missing.append(f"{part}/{name}")
    if missing:
        raise CheckpointError(f"Kimi-Audio checkpoint at {directory} is incomplete: missing "
                              f"{', '.join(missing)}")
    return directory
