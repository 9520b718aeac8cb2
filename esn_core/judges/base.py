"""The interface every emotion judge implements, and the audio loading they share.

A judge turns generated audio into one ``Judgement`` per clip: ``raw_label`` is what the
judge said in its own vocabulary, ``label`` that answer mapped onto ``EMOTIONS`` (or
``None`` when it names no ESD emotion, which never matches a target — SPEC §3), ``score``
the judge's confidence in ``raw_label``. The embedded acoustic judge, emotion2vec and the
LALM judge all satisfy ``EmotionJudge``, so the success filter never branches on which
judge ran. Judges receive the speaker of each clip because an acoustic judge may need the
speaker's neutral reference (the neutral source recording is always available in EVC).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import soundfile as sf

from esn_core.judges.prosody import as_mono_16k


@dataclass(frozen=True)
class Judgement:
    """One judge's verdict on one clip (the label/raw_label/score of the judgements table)."""

    label: str | None
    raw_label: str
    score: float


@runtime_checkable
class EmotionJudge(Protocol):
    """A speech emotion judge: clips (+ their speakers) in, one ``Judgement`` per clip out."""

    name: str

    def judge(self, paths: Sequence[str], speakers: Sequence[str]) -> list[Judgement]:
        ...


def load_audio_16k(path: str | os.PathLike) -> np.ndarray:
    """A sound file as float64 mono at 16 kHz (SPEC §7: all audio is judged at 16 kHz)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(str(path), dtype="float64", always_2d=False)
    except RuntimeError as exc:  # soundfile's LibsndfileError derives from it
        raise ValueError(f"{path}: not a readable audio file: {exc}") from exc
    return as_mono_16k(data, sr)


def local_checkpoint_dir(model_dir: str | os.PathLike, what: str, required: Sequence[str],
                         where_to_get: str) -> Path:
    """``model_dir`` as a path, or an error naming what is missing and ``where_to_get`` it.

    Judges load from local directories only (no hub downloads at run time), so a missing
    directory or file is reported with the command that fetches it.
    """
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} checkpoint directory {str(model_dir)!r} does not exist (judges load from "
            f"local directories only; a hub id is not fetched); {where_to_get}"
        )
    for name in required:
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{what} checkpoint {path} lacks {name} (needs {', '.join(required)}); {where_to_get}"
            )
    return path
