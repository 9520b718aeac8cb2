"""emotion2vec+ large through funasr: the paper's acoustic emotion judge (SPEC §3, §7).

The checkpoint is read strictly from a local directory holding the files of the released
model (ModelScope ``iic/emotion2vec_plus_large``, mirrored on Hugging Face as
``emotion2vec/emotion2vec_plus_large``)::

    config.yaml   funasr's model description (``model: Emotion2vec``, ``model_conf``, tokenizer)
    model.pt      the weights
    tokens.txt    the classifier's labels, one a line ("生气/angry", ..., "<unk>")

and loaded with ``funasr.AutoModel(model=<dir>, hub=..., disable_update=True)``: funasr
resolves an existing directory without touching the network, so a hub id is refused here
unless it names an existing directory. Inference is funasr's own: utterance granularity,
``generate(..., granularity="utterance", extract_embedding=False)``, 16 kHz mono input
(each clip goes through ``load_audio_16k`` first, SPEC §7).

Each clip's label is the argmax over *all* of the judge's labels (SPEC §3: the paper uses
the predicted label directly); it is mapped onto ESD's emotions by ``map_judge_label``, so
``surprised`` becomes ``surprise`` and disgusted/fearful/other/<unk> become ``None`` (a miss,
never an error). ``score`` is the argmax probability; the whole distribution is returned by
``judge_with_scores`` and ends up in the judgement table.

Side effects of funasr that this module undoes: ``AutoModel`` reseeds Python's, NumPy's and
torch's global RNGs and resets torch's thread count; the judge restores all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from esn_core.judges.base import EmotionJudge, Judgement, load_audio_16k, local_checkpoint_dir
from esn_core.judges.labels import map_judge_label

# The files a funasr emotion2vec checkpoint directory must hold.
REQUIRED_FILES: tuple[str, ...] = ("config.yaml", "model.pt", "tokens.txt")
MODELSCOPE_ID = "iic/emotion2vec_plus_large"
HF_ID = "emotion2vec/emotion2vec_plus_large"
HUBS = ("ms", "modelscope", "hf", "huggingface")
# Recorded as raw_label for a clip the judge cannot hear (empty or shorter than the
# model's receptive field); its label is None, so it never matches a target.
UNJUDGEABLE_PREFIX = "<unjudgeable: "
# emotion2vec's convolutional feature encoder spans 400 samples (25 ms at 16 kHz).
DEFAULT_MIN_SAMPLES = 400


def where_to_get(model_dir: str | os.PathLike) -> str:
    """How to put the released checkpoint at ``model_dir``."""
    return (
        f"download it there with `modelscope download {MODELSCOPE_ID} --local_dir {model_dir}` "
        f"or from the Hugging Face mirror with `hf download {HF_ID} --local-dir {model_dir}`"
    )


def check_checkpoint_dir(model_dir: str | os.PathLike) -> Path:
    """The checkpoint directory, or an error naming what is missing and where to get it."""
    return local_checkpoint_dir(model_dir, "emotion2vec", REQUIRED_FILES, where_to_get(model_dir))


def unjudgeable(n_samples: int, min_samples: int) -> Judgement:
    """The verdict recorded for a clip too short to judge."""
    return Judgement(
        label=None,
        raw_label=f"{UNJUDGEABLE_PREFIX}clip of {n_samples} samples at 16 kHz, needs >= {min_samples}>",
        score=0.0,
    )


@dataclass(frozen=True)
class ScoredJudgements:
    """Verdicts plus the judge's full distribution over its own labels.

    ``scores[i, j]`` is the probability of ``labels[j]`` for clip ``i``; a clip that could
    not be judged has a row of NaN.
    """

    judgements: list[Judgement]
    labels: tuple[str, ...]
    scores: np.ndarray


@contextlib.contextmanager
def _funasr_side_effects_undone() -> Iterator[None]:
    """Restore global RNG states, torch's thread count and the root log level afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    threads = torch.get_num_threads()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # funasr logs every load step at INFO
    try:
        yield
    finally:
        root.setLevel(level)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _receptive_field(model) -> int:
    """Samples spanned by the conv feature encoder (its shortest usable input)."""
    try:
        layers = model.modality_encoders["AUDIO"].feature_enc_layers
    except (AttributeError, KeyError, TypeError):
        return DEFAULT_MIN_SAMPLES
    field, jump = 1, 1
    for _dim, kernel, stride in layers:
        field += (kernel - 1) * jump
        jump *= stride
    return field


class Emotion2VecJudge(EmotionJudge):
    """emotion2vec+ (funasr) as an ``EmotionJudge``; see the module docstring."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str = "cpu",
        batch_size: int = 16,
        hub: str = "ms",
        name: str = "emotion2vec",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if hub not in HUBS:
            raise ValueError(f"hub must be one of {HUBS}, got {hub!r}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        self.model_dir = check_checkpoint_dir(model_dir)
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.name = name
        from funasr import AutoModel  # heavy import (and prints a notice): only when used

        with _funasr_side_effects_undone():
            self._model = AutoModel(
                model=str(self.model_dir),
                hub=hub,
                disable_update=True,
                disable_pbar=True,
                disable_log=True,
                log_level="WARNING",
                device=self.device,
                batch_size=self.batch_size,
                ncpu=torch.get_num_threads(),
            )
        net = self._model.model
        tokenizer = self._model.kwargs.get("tokenizer")
        token_list = list(getattr(tokenizer, "token_list", None) or [])
        if getattr(net, "proj", None) is None or not token_list:
            raise ValueError(
                f"{self.model_dir}: not a fine-tuned emotion2vec classifier (no classification "
                f"head or no labels in tokens.txt); the judge needs {MODELSCOPE_ID}"
            )
        if net.proj.out_features != len(token_list):
            raise ValueError(
                f"{self.model_dir}: classifier has {net.proj.out_features} outputs but tokens.txt "
                f"lists {len(token_list)} labels"
            )
        # funasr drops labels starting with "unuse" from its output; so does this judge.
        self.labels: tuple[str, ...] = tuple(t for t in token_list if not t.startswith("unuse"))
        if not any(map_judge_label(t) for t in self.labels):
            raise ValueError(
                f"{self.model_dir}: none of the labels {list(self.labels)} names an ESD emotion"
            )
        self.min_samples = _receptive_field(net)

    # ------------------------------------------------------------ inference

    def predict_waveforms(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities ``[n, len(labels)]`` for 16 kHz mono waveforms (NaN rows: too short)."""
        scores = np.full((len(waveforms), len(self.labels)), np.nan)
        usable = [i for i, w in enumerate(waveforms) if np.asarray(w).size >= self.min_samples]
        if not usable:
            return scores
        clips = [np.ascontiguousarray(np.asarray(waveforms[i], dtype=np.float32).ravel()) for i in usable]
        with _funasr_side_effects_undone():
            results = self._model.generate(
                clips,
                granularity="utterance",
                extract_embedding=False,
                batch_size=self.batch_size,
                disable_pbar=True,
            )
        if len(results) != len(clips):
            raise RuntimeError(f"funasr returned {len(results)} results for {len(clips)} clips")
        for i, res in zip(usable, results):
            if tuple(res["labels"]) != self.labels:
                raise RuntimeError(
                    f"funasr returned labels {res['labels']}, expected {list(self.labels)}"
                )
            scores[i] = np.asarray(res["scores"], dtype=np.float64)
        return scores

    def judge_with_scores(self, paths: Sequence[str], speakers: Sequence[str]) -> ScoredJudgements:
        """Verdicts (argmax label mapped per SPEC §3, its probability) and all the scores."""
        if len(paths) != len(speakers):
            raise ValueError(f"{len(paths)} clips but {len(speakers)} speakers")
        waveforms = [load_audio_16k(p) for p in paths]
        scores = self.predict_waveforms(waveforms)
        return ScoredJudgements(self.verdicts(scores, waveforms), self.labels, scores)

    def judge(self, paths: Sequence[str], speakers: Sequence[str]) -> list[Judgement]:
        """``EmotionJudge``: speakers are not used (the judge needs no reference)."""
        return self.judge_with_scores(paths, speakers).judgements

    def verdicts(self, scores: np.ndarray, waveforms: Sequence[np.ndarray]) -> list[Judgement]:
        """One ``Judgement`` per score row: full argmax, mapped label, argmax probability."""
        out = []
        for row, wav in zip(scores, waveforms):
            if np.isnan(row).any():
                out.append(unjudgeable(int(np.asarray(wav).size), self.min_samples))
                continue
            raw = self.labels[int(np.argmax(row))]
            out.append(Judgement(label=map_judge_label(raw), raw_label=raw, score=float(row.max())))
        return out
