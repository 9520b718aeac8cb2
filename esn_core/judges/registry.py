"""Judges and naturalness estimators from config, and the judgement table they fill.

``load_judge`` turns one judge entry of the workflow config into an ``EmotionJudge``::

    {"kind": "embedded",    "path": "judge.json"}
    {"kind": "emotion2vec", "model_dir": "/models/emotion2vec_plus_large", "device": "cuda", "batch_size": 16}
    {"kind": "lalm",        "model_dir": "/models/Qwen3-Omni-30B-A3B-Instruct", "device": "cuda",
                            "batch_size": 8, "model_under_test": "/models/<the LALM being studied>"}

(``path`` and ``model_dir`` are synonyms; optional for every kind: ``name``, the judge's name
in the table). ``load_mos_estimator`` does the same for ``{"kind": "utmos", "checkpoint":
...}`` (or ``path``) and ``{"kind": "dnsmos", "metric": "ovrl"}``.

``judgement_rows`` is what the workflow's judge rule calls, once per (judge, attempts file):
the judge's verdict on each attempt's audio, the per-attempt WER of the decoded text against
the source transcript (SPEC §3) and, when an estimator is given, MOS named by its estimator.
Judges that keep their full distribution (emotion2vec) add two list columns, ``score_labels``
and ``scores``, after the declared ``SCHEMAS['judgements']`` columns.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import polars as pl
import pyarrow as pa

from esn_core.io import SCHEMAS
from esn_core.judges.base import EmotionJudge, load_audio_16k
from esn_core.judges.mos import MOSEstimator
from esn_core.judges.wer import attempt_wer, word_errors

JUDGE_KINDS = ("embedded", "emotion2vec", "lalm")
MOS_KINDS = ("utmos", "dnsmos")
ATTEMPT_COLUMNS = ("attempt_id", "audio_path", "speaker", "reference_text", "decoded_text")

_JUDGE_KEYS: dict[str, set[str]] = {
    "embedded": {"kind", "path", "name"},
    "emotion2vec": {"kind", "path", "model_dir", "name", "device", "batch_size", "hub"},
    "lalm": {"kind", "path", "model_dir", "name", "device", "batch_size", "model_under_test",
             "max_new_tokens", "dtype"},
}
_MOS_KEYS: dict[str, set[str]] = {
    "utmos": {"kind", "path", "checkpoint", "device"},
    "dnsmos": {"kind", "metric", "personalized"},
}
# Keys naming the file or directory a judge/estimator loads from (synonyms).
_PATH_KEYS = ("path", "model_dir", "checkpoint")


def _check_keys(config: Mapping[str, Any], allowed: dict[str, set[str]], what: str) -> str:
    kind = config.get("kind")
    if kind not in allowed:
        raise ValueError(f"{what} kind must be one of {sorted(allowed)}, got {kind!r}")
    unknown = sorted(set(config) - allowed[kind])
    if unknown:
        raise ValueError(f"{what} of kind {kind!r}: unknown key(s) {unknown}; allowed {sorted(allowed[kind])}")
    return kind


def _path(config: Mapping[str, Any], allowed: set[str], what: str) -> str:
    keys = [k for k in _PATH_KEYS if k in allowed]
    given = {str(config[k]) for k in keys if config.get(k)}
    if not given:
        names = " or ".join(repr(k) for k in keys)
        raise ValueError(f"{what} of kind {config['kind']!r} needs {names} (a local file or directory)")
    if len(given) > 1:
        raise ValueError(f"{what} of kind {config['kind']!r} names two locations: {sorted(given)}")
    return given.pop()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_judge(config: Mapping[str, Any], model_under_test: str | None = None) -> EmotionJudge:
    """The judge a config entry describes (see the module docstring).

    ``model_under_test`` (or the entry's own key) is the LALM being studied; an LALM judge
    that is that model is refused (SPEC: the emotion judge must be held out). Neural judges
    run on ``device`` (default: the GPU when there is one, as on the workflow's GPU rule).
    """
    kind = _check_keys(config, _JUDGE_KEYS, "judge")
    path = _path(config, _JUDGE_KEYS[kind], "judge")
    if kind == "embedded":
        from esn_core.judges.embedded import EmbeddedJudge

        judge = EmbeddedJudge.load(path)
    elif kind == "emotion2vec":
        from esn_core.judges.emotion2vec import Emotion2VecJudge

        judge = Emotion2VecJudge(
            path,
            device=config.get("device") or _default_device(),
            batch_size=int(config.get("batch_size", 16)),
            hub=config.get("hub", "ms"),
        )
    else:
        from esn_core.judges.lalm_judge import LALMJudge, check_held_out

        # Both the run's model and the entry's own model_under_test must differ from the judge.
        for other in (model_under_test, config.get("model_under_test")):
            check_held_out(path, other)
        under_test = model_under_test if model_under_test is not None else config.get("model_under_test")
        judge = LALMJudge(
            path,
            device=config.get("device") or _default_device(),
            batch_size=int(config.get("batch_size", 8)),
            model_under_test=under_test,
            max_new_tokens=int(config.get("max_new_tokens", 8)),
            dtype=config.get("dtype"),
        )
    if config.get("name"):
        judge.name = str(config["name"])
    return judge


def load_mos_estimator(config: Mapping[str, Any] | None) -> MOSEstimator | None:
    """The naturalness estimator a config entry describes, or None for ``None``/``{}``."""
    if not config:
        return None
    kind = _check_keys(config, _MOS_KEYS, "MOS estimator")
    from esn_core.judges.mos import DNSMOSEstimator, UTMOSEstimator

    if kind == "utmos":
        path = _path(config, _MOS_KEYS[kind], "MOS estimator")
        return UTMOSEstimator(path, device=config.get("device") or _default_device())
    return DNSMOSEstimator(config.get("metric", "ovrl"), bool(config.get("personalized", False)))


def _polars_type(arrow_type: pa.DataType) -> pl.DataType:
    return pl.from_arrow(pa.array([], type=arrow_type)).dtype


def judgement_rows(
    judge: EmotionJudge,
    attempts: pl.DataFrame,
    mos_estimator: MOSEstimator | None = None,
) -> pl.DataFrame:
    """One judgement row per attempt, in the attempts' order (``SCHEMAS['judgements']``).

    ``attempts`` needs attempt_id (unique), audio_path, speaker, reference_text and
    decoded_text. MOS and mos_estimator are null without an estimator; a clip the estimator
    cannot score has a null MOS under its estimator's name.
    """
    missing = [c for c in ATTEMPT_COLUMNS if c not in attempts.columns]
    if missing:
        raise ValueError(f"attempts lack column(s) {missing}; have {attempts.columns}")
    ids = attempts["attempt_id"].cast(pl.Utf8)
    if ids.is_null().any() or ids.n_unique() != attempts.height:
        raise ValueError("attempt_id must be non-null and unique")
    paths = attempts["audio_path"].cast(pl.Utf8).to_list()
    speakers = attempts["speaker"].cast(pl.Utf8).to_list()
    refs = attempts["reference_text"].cast(pl.Utf8).to_list()
    hyps = attempts["decoded_text"].cast(pl.Utf8).to_list()

    keeps_scores = hasattr(judge, "judge_with_scores")
    scored = None
    if not attempts.height:
        verdicts = []
    elif keeps_scores:
        scored = judge.judge_with_scores(paths, speakers)
        verdicts = scored.judgements
    else:
        verdicts = judge.judge(paths, speakers)
    if len(verdicts) != attempts.height:
        raise RuntimeError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {attempts.height} clips")

    errors = [word_errors(r, h) for r, h in zip(refs, hyps)]
    if mos_estimator is not None and attempts.height:
        values = mos_estimator.predict([load_audio_16k(p) for p in paths])
        mos = [None if not math.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]
        estimator = [mos_estimator.name] * attempts.height
    else:
        mos = [None] * attempts.height
        estimator = [None] * attempts.height

    schema = {c: _polars_type(t) for c, t in SCHEMAS["judgements"].items()}
    table = pl.DataFrame(
        {
            "attempt_id": ids.to_list(),
            "judge": [judge.name] * attempts.height,
            "label": [v.label for v in verdicts],
            "raw_label": [v.raw_label for v in verdicts],
            "score": [float(v.score) for v in verdicts],
            "wer": [attempt_wer(r, h) for r, h in zip(refs, hyps)],
            "ref_words": [n for _, n in errors],
            "word_errors": [e for e, _ in errors],
            "mos": mos,
            "mos_estimator": estimator,
        },
        schema=schema,
    )
    if keeps_scores:
        labels = list(scored.labels) if scored is not None else []
        rows = [] if scored is None else [
            [None if not math.isfinite(x) else float(x) for x in row] for row in scored.scores
        ]
        table = table.with_columns(
            pl.Series("score_labels", [labels] * attempts.height, dtype=pl.List(pl.Utf8)),
            pl.Series("scores", rows, dtype=pl.List(pl.Float64)),
        )
    return table
