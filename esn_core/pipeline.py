"""Pipeline glue the workflow rules call: plan attempts, run them, judge them, tabulate.

Stages (SPEC §2-§7) as plain functions over polars tables:

* ``plan_attempts`` / ``plan_evaluation``: neutral source rows of a manifest -> one row per
  attempt (ids, target, condition, mask emotion, intervention, α, per-attempt seed).
* ``sample_attempts``: identification — run a plan in batches with activation capture;
  returns the ``attempts`` table and per-group ``stats.Counts`` (every attempt, before any
  success filtering, SPEC §2).
* ``evaluate_conditions``: evaluation — baseline plus every (condition, mask emotion,
  target) in batches with *per-row* masks, so one batch may mix mask emotions.
* ``evaluation_table``: judged attempts as the long table ``esn_core.evaluate`` reads
  (judging itself is ``esn_core.judges.registry.judgement_rows``).

Overlap: both runners call ``adapter.begin_convert`` inside the hook session (all that the
hooks see) and hand the returned second half (the speech decoder) to a ``SpeechWorker``;
with the adapter's ``overlap_speech`` it runs on a worker thread while the next batch
decodes, otherwise at once. Rows, wavs and counts are the same either way and come out in
plan order; a failed second half fails the run before any later batch is written.

Pairing: an attempt's seed depends only on (seed, source, target), never on the
condition, so a baseline attempt and its intervened twins share every random draw of the
model and differ only by the intervention; the paired bootstrap relies on it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import polars as pl
import soundfile as sf
from tqdm.auto import tqdm

from esn_core import io
from esn_core.constants import EMOTIONS, TARGETS
from esn_core.evaluate import BASELINE, EVAL_COLUMNS
from esn_core.hooks import METHODS, Capture, HookEngine, Intervention
from esn_core.models.base import EVCRequest, LALMAdapter
from esn_core.models.speech_overlap import SpeechWorker
from esn_core.stats import Counts

ATTEMPT_COLUMNS: tuple[str, ...] = tuple(io.SCHEMAS["attempts"])
JUDGEMENT_COLUMNS: tuple[str, ...] = tuple(io.SCHEMAS["judgements"])
# The plan carries the source audio on top of the attempt columns known before generating.
PLAN_COLUMNS: tuple[str, ...] = (
    "attempt_id", "source_id", "speaker", "split", "target_emotion", "condition",
    "mask_emotion", "intervention", "alpha", "reference_text", "source_path", "seed",
)
_PLAN_SCHEMA = {
    "attempt_id": pl.Utf8, "source_id": pl.Utf8, "speaker": pl.Utf8, "split": pl.Utf8,
    "target_emotion": pl.Utf8, "condition": pl.Utf8, "mask_emotion": pl.Utf8,
    "intervention": pl.Utf8, "alpha": pl.Float64, "reference_text": pl.Utf8,
    "source_path": pl.Utf8, "seed": pl.Int64,
}


# ---------------------------------------------------------------------------- planning


def attempt_seed(seed: int, source_id: str, target: str) -> int:
    """A 63-bit seed from (global seed, source, target): stable across runs and platforms."""
    digest = hashlib.blake2b(f"{int(seed)}|{source_id}|{target}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def neutral_sources(manifest: pl.DataFrame, split: str) -> pl.DataFrame:
    """The neutral recordings of one split: the conversion sources (SPEC §4.3)."""
    rows = manifest.filter((pl.col("split") == split) & (pl.col("emotion") == "neutral"))
    if rows.is_empty():
        raise ValueError(f"manifest has no neutral utterance in split {split!r}")
    return rows.sort("utterance_id")


@dataclass(frozen=True)
class Condition:
    """One intervened evaluation condition: a selector's masks applied to one group.

    ``name`` is the ``condition`` column value (e.g. ``'cas'``); ``masks`` maps each mask
    emotion to flat neuron indices of ``group``'s layout.
    """

    name: str
    group: str
    method: str
    alpha: float
    masks: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        if self.name == BASELINE:
            raise ValueError(f"{BASELINE!r} is the reference condition, not an intervention")
        if self.method not in METHODS:
            raise ValueError(f"condition {self.name!r}: method {self.method!r} not in {METHODS}")
        unknown = [e for e in self.masks if e not in EMOTIONS]
        if unknown:
            raise ValueError(f"condition {self.name!r}: unknown mask emotion(s) {unknown}")


def plan_attempts(
    sources: pl.DataFrame,
    targets: Sequence[str] = TARGETS,
    seed: int = 0,
    condition: Condition | None = None,
    mask_emotion: str | None = None,
) -> pl.DataFrame:
    """One attempt per (source, target); baseline unless ``condition``/``mask_emotion`` given."""
    if (condition is None) != (mask_emotion is None):
        raise ValueError("an intervened plan needs both condition and mask_emotion")
    if condition is not None and mask_emotion not in condition.masks:
        raise ValueError(f"condition {condition.name!r} has no mask for {mask_emotion!r}")
    rows = []
    for src in sources.iter_rows(named=True):
        for target in targets:
            base_id = f"{src['utterance_id']}.{target}"
            rows.append({
                "attempt_id": base_id if condition is None else f"{base_id}.{condition.name}.{mask_emotion}",
                "source_id": src["utterance_id"],
                "speaker": src["speaker"],
                "split": src["split"],
                "target_emotion": target,
                "condition": BASELINE if condition is None else condition.name,
                "mask_emotion": mask_emotion,
                "intervention": None if condition is None else condition.method,
                "alpha": None if condition is None else float(condition.alpha),
                "reference_text": src["reference_text"],
                "source_path": src["path"],
                "seed": attempt_seed(seed, src["utterance_id"], target),
            })
    return pl.DataFrame(rows, schema=_PLAN_SCHEMA)


def plan_evaluation(
    sources: pl.DataFrame, conditions: Sequence[Condition], targets: Sequence[str] = TARGETS,
    seed: int = 0,
) -> pl.DataFrame:
    """Baseline plus every (condition, mask emotion, target) for each source (SPEC §7)."""
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique, got {names}")
    plans = [plan_attempts(sources, targets, seed)]
    for cond in conditions:
        plans.extend(plan_attempts(sources, targets, seed, cond, e) for e in cond.masks)
    return pl.concat(plans)


def requests_of(plan: pl.DataFrame) -> list[EVCRequest]:
    return [
        EVCRequest(r["attempt_id"], r["source_path"], r["reference_text"], r["speaker"],
                   r["target_emotion"], int(r["seed"]))
        for r in plan.iter_rows(named=True)
    ]


# ---------------------------------------------------------------------------- running


def _write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> None:
    with io.atomic_path(path) as tmp:
        sf.write(tmp, waveform, sample_rate, subtype="PCM_16", format="WAV")


def _attempt_rows(plan: pl.DataFrame, outputs, audio_dir: Path) -> pl.DataFrame:
    by_id = {o.attempt_id: o for o in outputs}
    paths, texts, positions = [], [], []
    for attempt_id in plan["attempt_id"].to_list():
        out = by_id[attempt_id]
        path = audio_dir / f"{attempt_id}.wav"
        _write_wav(path, out.waveform, out.sample_rate)
        paths.append(str(path))
        texts.append(out.decoded_text)
        positions.append(out.n_positions)
    return plan.with_columns(
        pl.Series("decoded_text", texts, dtype=pl.Utf8),
        pl.Series("audio_path", paths, dtype=pl.Utf8),
        pl.Series("n_positions", positions, dtype=pl.Int64),
    ).select(ATTEMPT_COLUMNS)


def _writer(batch: pl.DataFrame, audio_dir: Path, parts: list, bar) -> Callable[[list], None]:
    """What a batch's outputs go to once its speech is decoded: its rows (wavs written) into
    ``parts``, in submission order, and the progress bar."""

    def done(outputs) -> None:
        parts.append(_attempt_rows(batch, outputs, audio_dir))
        bar.update(batch.height)

    return done


def _batches(plan: pl.DataFrame, batch_size: int) -> Iterator[pl.DataFrame]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, plan.height, batch_size):
        yield plan.slice(start, batch_size)


def _narrow(K: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Counts never exceed T: keep them in the narrowest unsigned type (memory per shard)."""
    top = int(T.max(initial=0))
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return K.astype(dtype)
    return K.astype(np.uint64)


def sample_attempts(
    adapter: LALMAdapter,
    plan: pl.DataFrame,
    audio_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    capture: Mapping[str, Capture] | None = None,
    progress: bool = True,
) -> tuple[pl.DataFrame, dict[str, Counts]]:
    """Run a (baseline) plan with capture: the ``attempts`` table and per-group counts.

    ``capture`` defaults to ``{'lm': Capture()}``. Counts rows follow the plan's order.
    """
    if plan["condition"].ne(BASELINE).any():
        raise ValueError("sample_attempts runs baseline attempts; use evaluate_conditions to intervene")
    capture = dict(capture) if capture is not None else {"lm": Capture()}
    audio_dir = Path(audio_dir)
    engine = HookEngine(adapter.groups())
    parts, K, T = [], {g: [] for g in capture}, {g: [] for g in capture}
    with tqdm(total=plan.height, desc=f"sample {adapter.name}", unit="attempt", disable=not progress) as bar, \
            SpeechWorker(adapter.overlap_speech, getattr(adapter, "device", None)) as speech:
        for batch in _batches(plan, batch_size):
            with engine.session(capture=capture) as session:
                finish = adapter.begin_convert(requests_of(batch))
            for group in capture:
                result = session.counts(group)
                K[group].append(_narrow(result.K, result.T))
                T[group].append(result.T)
            speech.submit(finish, _writer(batch, audio_dir, parts, bar))
    attempts = pl.concat(parts) if parts else plan.head(0)
    ids = attempts["attempt_id"].to_list()
    counts = {
        g: Counts(ids, np.concatenate(K[g]), np.concatenate(T[g]), engine.layout(g))
        for g in capture
    }
    return attempts, counts


def _interventions(batch: pl.DataFrame, by_name: Mapping[str, Condition]) -> dict[str, Intervention]:
    """Per-row interventions of one batch, whose intervened rows share (group, method)."""
    names = [n for n in batch["condition"].unique().to_list() if n != BASELINE]
    if not names:
        return {}
    conds = [by_name[n] for n in names]
    group, method = conds[0].group, conds[0].method
    if any((c.group, c.method) != (group, method) for c in conds):
        raise ValueError("one batch mixes groups or methods; plan batches by (group, method)")
    empty = np.empty(0, dtype=np.int64)
    masks, alphas = [], []
    for name, emotion in zip(batch["condition"].to_list(), batch["mask_emotion"].to_list()):
        if name == BASELINE:
            masks.append(empty)  # an empty mask row is an untouched baseline, bit for bit
            alphas.append(0.0)
        else:
            masks.append(np.asarray(by_name[name].masks[emotion], dtype=np.int64))
            alphas.append(float(by_name[name].alpha))
    return {group: Intervention(method, tuple(masks), tuple(alphas))}


def evaluate_conditions(
    adapter: LALMAdapter,
    sources: pl.DataFrame,
    conditions: Sequence[Condition],
    audio_dir: str | os.PathLike,
    *,
    targets: Sequence[str] = TARGETS,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> pl.DataFrame:
    """Baseline + every condition × mask emotion × target, with per-row masks (SPEC §6-7).

    Rows are batched by the (group, method) their intervention needs, since a session
    applies one method per group; mask emotions and α vary freely within a batch.
    """
    by_name = {c.name: c for c in conditions}
    plan = plan_evaluation(sources, conditions, targets, seed)
    key = pl.col("condition").replace_strict(
        {BASELINE: "", **{c.name: f"{c.group}/{c.method}" for c in conditions}}, return_dtype=pl.Utf8
    )
    plan = plan.with_columns(_key=key).sort("_key", maintain_order=True)
    engine = HookEngine(adapter.groups())
    audio_dir = Path(audio_dir)
    parts = []
    with tqdm(total=plan.height, desc=f"evaluate {adapter.name}", unit="attempt", disable=not progress) as bar, \
            SpeechWorker(adapter.overlap_speech, getattr(adapter, "device", None)) as speech:
        for _, group_plan in plan.group_by("_key", maintain_order=True):
            for batch in _batches(group_plan.drop("_key"), batch_size):
                with engine.session(interventions=_interventions(batch, by_name)):
                    finish = adapter.begin_convert(requests_of(batch))
                speech.submit(finish, _writer(batch, audio_dir, parts, bar))
    return pl.concat(parts)


# ---------------------------------------------------------------------------- judging


def evaluation_table(attempts: pl.DataFrame, judgements: pl.DataFrame) -> pl.DataFrame:
    """The long table of ``esn_core.evaluate`` (one row per judged evaluation attempt)."""
    joined = attempts.join(judgements, on="attempt_id", how="left", validate="1:1")
    unjudged = joined.filter(pl.col("ref_words").is_null())
    if unjudged.height:
        raise ValueError(f"{unjudged.height} attempt(s) have no judgement, e.g. {unjudged['attempt_id'][0]!r}")
    return joined.select(EVAL_COLUMNS)
