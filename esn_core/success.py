"""Success filter and capped success sets (SPEC §3).

An identification attempt *succeeds* when the judge hears the target emotion
(``map_judge_label(label) == target``) AND the LALM's decoded text preserves the content
(``attempt_wer(reference, decoded) <= tau_wer``). Per emotion, the success set ``S_e`` is
capped at ``c`` by a uniform, seeded sample that does not depend on input row order.

The output is an audit trail: every attempt appears once, with each check spelled out, so
that a reader can see why an attempt is in ``S_e`` (``kept``) or not. Its columns are
``io.SCHEMAS['success']``. The same construction from imported human labels gives CAS-H's
sets (``human_success_table``).
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from esn_core.constants import EMOTIONS
from esn_core.judges.labels import map_judge_label
from esn_core.judges.wer import attempt_wer

log = logging.getLogger(__name__)

TAU_WER = 0.15
CAP = 50

SUCCESS_COLUMNS: tuple[str, ...] = (
    "attempt_id", "emotion", "label", "wer", "emotion_ok", "content_ok", "success", "kept",
)

_ATTEMPT_COLUMNS = ("attempt_id", "target_emotion", "reference_text", "decoded_text")


def success_table(
    attempts: pl.DataFrame,
    judgements: pl.DataFrame,
    tau_wer: float = TAU_WER,
    cap: int | None = CAP,
    seed: int = 0,
) -> pl.DataFrame:
    """Judge every attempt and mark the capped success sets.

    ``attempts``: attempt_id, target_emotion, reference_text, decoded_text (one row each).
    ``judgements``: attempt_id, label (the judge's label, raw or mapped; one row each).
    Judgements of attempts not in ``attempts`` are ignored; an attempt without a judgement
    row is an error, while a row whose label is null (the judge gave no verdict) simply
    fails the emotion check. A null decoded_text reads as empty (all words deleted). ``cap=None`` keeps every success. Rows are sorted by attempt_id.
    """
    _require_columns(judgements, ("attempt_id", "label"), "judgements")
    return _build(attempts, judgements.select("attempt_id", "label"), "judgements", tau_wer, cap, seed)


def human_success_table(
    attempts: pl.DataFrame,
    human_labels: pl.DataFrame,
    tau_wer: float = TAU_WER,
    cap: int | None = CAP,
    seed: int = 0,
) -> pl.DataFrame:
    """``success_table`` with imported human labels (columns attempt_id and human_label or
    label) as the judge: CAS-H's sets (SPEC §3).

    Humans label a subset: an attempt without a label is not a success (its ``label`` is
    null), and the count is logged. A label for an attempt that is not in ``attempts``, or a
    label that names no emotion of E (a misspelling such as ``'angyr'``), is an error; a null
    label or ``'unclear'`` is a heard-but-unclear attempt and fails the emotion check.
    """
    column = "human_label" if "human_label" in human_labels.columns else "label"
    _require_columns(human_labels, ("attempt_id", column), "human labels")
    labels = human_labels.select(pl.col("attempt_id").cast(pl.Utf8), pl.col(column).cast(pl.Utf8).alias("label"))
    _require_unique_ids(labels, "human labels")
    known = set(attempts["attempt_id"].cast(pl.Utf8).to_list())
    unknown = labels.filter(~pl.col("attempt_id").is_in(list(known)))
    if unknown.height:
        raise ValueError(f"human labels: attempt {unknown['attempt_id'][0]!r} is not one of the attempts "
                         f"({unknown.height} unknown id(s))")
    bad = [(a, x) for a, x in labels.iter_rows()
           if x is not None and x.strip().lower() != "unclear" and map_judge_label(x) is None]
    if bad:
        raise ValueError(f"human labels: attempt {bad[0][0]!r} has label {bad[0][1]!r}, not one of "
                         f"{EMOTIONS} or 'unclear' ({len(bad)} such label(s))")
    unlabelled = sorted(known - set(labels["attempt_id"].to_list()))
    if unlabelled:
        log.info("human labels: %d of %d attempts unlabelled (not successes), e.g. %r",
                 len(unlabelled), len(known), unlabelled[0])
        labels = pl.concat([labels, pl.DataFrame({"attempt_id": unlabelled, "label": [None] * len(unlabelled)},
                                                 schema=labels.schema)])
    return _build(attempts, labels, "human labels", tau_wer, cap, seed)


def success_summary(table: pl.DataFrame) -> pl.DataFrame:
    """Per emotion of ``EMOTIONS``: attempts, emotion/content passes, successes, kept.

    Emotions without attempts appear with zeros, so an empty success set is visible in a
    report instead of silently missing (SPEC §4).
    """
    _require_columns(table, SUCCESS_COLUMNS, "success table")
    counts = table.group_by("emotion").agg(
        pl.len().alias("n_attempts"),
        pl.col("emotion_ok").sum().alias("n_emotion_ok"),
        pl.col("content_ok").sum().alias("n_content_ok"),
        pl.col("success").sum().alias("n_success"),
        pl.col("kept").sum().alias("n_kept"),
    )
    every = pl.DataFrame({"emotion": list(EMOTIONS)})
    count_cols = [c for c in counts.columns if c != "emotion"]
    return every.join(counts, on="emotion", how="left").with_columns(
        pl.col(count_cols).fill_null(0).cast(pl.Int64)
    )


def _build(
    attempts: pl.DataFrame,
    labels: pl.DataFrame,
    label_source: str,
    tau_wer: float,
    cap: int | None,
    seed: int,
) -> pl.DataFrame:
    _check_parameters(tau_wer, cap, seed)
    _require_columns(attempts, _ATTEMPT_COLUMNS, "attempts")
    attempts = attempts.select(_ATTEMPT_COLUMNS).with_columns(pl.col("attempt_id").cast(pl.Utf8))
    labels = labels.with_columns(pl.col("attempt_id").cast(pl.Utf8), pl.col("label").cast(pl.Utf8))
    _require_unique_ids(attempts, "attempts")
    _require_unique_ids(labels, label_source)
    _require_known_targets(attempts)
    _require_reference_text(attempts)

    _require_judged(attempts, labels, label_source)
    joined = attempts.join(labels, on="attempt_id", how="left", coalesce=True)
    table = _judge_rows(joined, tau_wer).sort("attempt_id")
    kept_ids = _capped_sample_ids(table, cap, seed)
    return table.with_columns(kept=pl.col("attempt_id").is_in(list(kept_ids))).select(SUCCESS_COLUMNS)


def _judge_rows(joined: pl.DataFrame, tau_wer: float) -> pl.DataFrame:
    mapped = [map_judge_label(raw) for raw in joined["label"].to_list()]
    wers = [
        attempt_wer(ref, hyp)
        for ref, hyp in zip(joined["reference_text"].to_list(), joined["decoded_text"].to_list())
    ]
    return joined.select(
        "attempt_id",
        pl.col("target_emotion").alias("emotion"),
        pl.Series("label", mapped, dtype=pl.Utf8),
        pl.Series("wer", wers, dtype=pl.Float64),
    ).with_columns(
        # a label outside E is null and never equals a target
        emotion_ok=(pl.col("label") == pl.col("emotion")).fill_null(False),
        content_ok=pl.col("wer") <= tau_wer,
    ).with_columns(success=pl.col("emotion_ok") & pl.col("content_ok"))


def _capped_sample_ids(table: pl.DataFrame, cap: int | None, seed: int) -> set[str]:
    """Attempt ids in the capped success sets; ``table`` must be sorted by attempt_id."""
    kept: set[str] = set()
    for emotion in EMOTIONS:
        ids = table.filter(pl.col("success") & (pl.col("emotion") == emotion))["attempt_id"].to_list()
        if cap is None or len(ids) <= cap:
            kept.update(ids)
            continue
        # One stream per (seed, emotion): an emotion's sample does not move when another
        # emotion's attempts change.
        rng = np.random.default_rng(np.random.SeedSequence([seed, EMOTIONS.index(emotion)]))
        chosen = rng.choice(len(ids), size=cap, replace=False)
        kept.update(ids[i] for i in chosen)
    return kept


def _check_parameters(tau_wer: float, cap: int | None, seed: int) -> None:
    if not (tau_wer >= 0):
        raise ValueError(f"tau_wer must be >= 0, got {tau_wer!r}")
    if cap is not None and (int(cap) != cap or cap < 1):
        raise ValueError(f"cap must be a positive integer or None, got {cap!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _require_columns(df: pl.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; has {df.columns}")


def _require_unique_ids(df: pl.DataFrame, what: str) -> None:
    null_ids = df.filter(pl.col("attempt_id").is_null()).height
    if null_ids:
        raise ValueError(f"{what}: {null_ids} row(s) with a null attempt_id")
    dups = df.filter(pl.col("attempt_id").is_duplicated())["attempt_id"].unique().sort()
    if len(dups):
        raise ValueError(f"{what}: duplicate attempt_id {dups[0]!r} ({len(dups)} duplicated id(s))")


def _require_known_targets(attempts: pl.DataFrame) -> None:
    bad = attempts.filter(~pl.col("target_emotion").is_in(list(EMOTIONS)).fill_null(False))
    if bad.height:
        row = bad.row(0, named=True)
        raise ValueError(
            f"attempts: attempt {row['attempt_id']!r} has target_emotion "
            f"{row['target_emotion']!r}, not one of {EMOTIONS}"
        )


def _require_reference_text(attempts: pl.DataFrame) -> None:
    bad = attempts.filter(pl.col("reference_text").is_null())
    if bad.height:
        raise ValueError(f"attempts: attempt {bad['attempt_id'][0]!r} has no reference_text")


def _require_judged(attempts: pl.DataFrame, labels: pl.DataFrame, label_source: str) -> None:
    judged = set(labels["attempt_id"].to_list())
    missing = [a for a in attempts["attempt_id"].sort().to_list() if a not in judged]
    if missing:
        raise ValueError(
            f"{label_source}: no label for attempt {missing[0]!r} "
            f"({len(missing)} attempt(s) unjudged)"
        )
