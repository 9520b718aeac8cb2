"""The paper's tables (SPEC §7, §9; issue 4 "Stages and outputs") from the combined evaluation table.

Input is the long evaluation table the workflow assembles, one row per (evaluation attempt,
reporting judge): the columns of ``evaluate.EVAL_COLUMNS`` plus ``judge``, ``split`` and the
*variant* keys ``cap, group, rate, method, alpha``. Every variant carries its own baseline
rows, so each Δ compares attempts generated under the same setting.

Conventions (the **Decision**s a reader needs to check a number):

- Headline tables (3, 4, 6, sweeps) pool TEST-SEEN and TEST-UNSEEN (``split = 'all'``); the
  long tables ``delta_grid`` / ``effects`` and Table 2 also give each split on its own.
- Δ, self, cross and gap are in percentage points with 95% paired-bootstrap CIs over source
  utterances (``evaluate.bootstrap_grid``; one seed, so every table sees the same draws).
- WER and MOS are per attempt, not per judge: they are read from the rows of the first
  judge in the table (order of first appearance), so attempts are never counted twice.
  WER is corpus WER (total edits / total reference words, %); MOS the mean of non-null values.
- The random control gets self/cross/gap like any selector: its masks are drawn per emotion
  (SPEC §5), so its 4x4 grid is defined (the paper shows only its mean effect).
- A table whose variants are absent is not written; a warning names it and says why.
  Comparison tables (Table 4, sweeps) need at least two settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from esn_core import __version__
from esn_core.constants import EMOTIONS
from esn_core.evaluate import (
    BASELINE,
    EVAL_COLUMNS,
    bootstrap_grid,
    delta_grid,
    layer_counts,
    mask_comparison,
    match_rates,
)
from esn_core.io import PROVENANCE_KEY, atomic_path, read_frame, read_provenance, read_table
from esn_core.layout import NeuronLayout
from esn_core.select import Mask, masks_from_table

log = logging.getLogger(__name__)

VARIANT_KEYS: tuple[str, ...] = ("cap", "group", "rate", "method", "alpha")
REPORT_COLUMNS: tuple[str, ...] = ("judge", *VARIANT_KEYS, "split", *EVAL_COLUMNS)
POOLED = "all"  # split label of TEST-SEEN ∪ TEST-UNSEEN
STATISTICS: tuple[str, ...] = ("self", "cross", "gap")
SPLIT_ORDER: tuple[str, ...] = ("test_seen", "test_unseen")
SELECTOR_ORDER: tuple[str, ...] = ("random", "lap", "lape", "mad", "cas")  # the paper's row order
METHOD_ORDER: tuple[str, ...] = ("steer", "add", "clamp", "deactivate")
TABLE_NAMES: tuple[str, ...] = (
    "table2_baseline", "table3_selectors", "table4_strength", "table5_masks", "table6_synth",
    "sweep_rate", "sweep_cap", "seen_unseen", "delta_grid", "effects", "localisation",
)

_EMOTION_RANK = {e: i for i, e in enumerate(EMOTIONS)}


# ---------------------------------------------------------------------------- variants


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


@dataclass(frozen=True)
class Variant:
    """One evaluated setting (cap c, module group, rate r, intervention method, α)."""

    cap: int
    group: str
    rate: float
    method: str
    alpha: float | None

    def matches(self, **fixed: Any) -> bool:
        """True when every given key equals this variant's (floats compared with tolerance)."""
        for key, value in fixed.items():
            mine = getattr(self, key)
            if key in ("rate", "alpha"):
                if not _same(mine, value):
                    return False
            elif mine != value:
                return False
        return True

    def describe(self) -> str:
        text = f"group {self.group}, c={self.cap}, r={format_rate(self.rate)}, {self.method}"
        if self.method != "deactivate" and self.alpha is not None:
            text += f" α={self.alpha:g}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in VARIANT_KEYS}

    def sort_key(self) -> tuple:
        method = METHOD_ORDER.index(self.method) if self.method in METHOD_ORDER else len(METHOD_ORDER)
        alpha = (1, 0.0) if self.alpha is None else (0, self.alpha)
        return (self.group, self.cap, self.rate, method, self.method, alpha)


def format_rate(rate: float) -> str:
    return f"{100 * rate:g}%"


def method_label(variant: Variant) -> str:
    """'steer α=1', 'deactivate' — the x label of a method comparison."""
    if variant.method == "deactivate" or variant.alpha is None:
        return variant.method
    return f"{variant.method} α={variant.alpha:g}"


@dataclass(frozen=True)
class Anchor:
    """The anchor cell of SPEC §9: a selector at one variant."""

    selector: str
    variant: Variant

    @classmethod
    def from_mapping(cls, anchor: Mapping[str, Any]) -> "Anchor":
        missing = [k for k in ("selector", *VARIANT_KEYS) if k not in anchor]
        if missing:
            raise ValueError(f"anchor: missing key(s) {missing}; got {dict(anchor)}")
        alpha = anchor["alpha"]
        return cls(
            str(anchor["selector"]),
            Variant(int(anchor["cap"]), str(anchor["group"]), float(anchor["rate"]),
                    str(anchor["method"]), None if alpha is None else float(alpha)),
        )

    def describe(self) -> str:
        return f"{self.selector.upper()}, {self.variant.describe()}"

    def as_dict(self) -> dict[str, Any]:
        return {"selector": self.selector, **self.variant.as_dict()}


def order_selectors(names: Iterable[str], first: str | None = None) -> list[str]:
    """Paper order (random, lap, lape, mad, cas), unknown names (e.g. cas_h) after, sorted."""
    names = set(names)
    known = [s for s in SELECTOR_ORDER if s in names]
    ordered = known + sorted(names - set(known))
    if first is not None and first in ordered:
        ordered.remove(first)
        ordered.insert(0, first)
    return ordered


def order_emotions(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=lambda e: (_EMOTION_RANK.get(e, len(EMOTIONS)), e))


def judge_slug(judge: str) -> str:
    """A judge name as a column suffix ('e2v', 'qwen3', 'embedded')."""
    slug = re.sub(r"\W+", "_", judge).strip("_").lower()
    if not slug:
        raise ValueError(f"judge name {judge!r} has no usable characters")
    return slug


# ---------------------------------------------------------------------------- effects


class Effects:
    """The combined evaluation table with cached bootstrap results per (variant, selector, judge, split).

    Both the tables and the figures read every number through this object, so a figure and
    its table never disagree.
    """

    def __init__(self, evaluation: pl.DataFrame, n_boot: int = 1000, seed: int = 0):
        self.df = _checked_evaluation(evaluation)
        self.n_boot, self.seed = int(n_boot), int(seed)
        self.judges: list[str] = list(dict.fromkeys(self.df["judge"].to_list()))
        slugs = [judge_slug(j) for j in self.judges]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"judge names {self.judges} collide as column names {slugs}")
        present = set(self.df["split"].to_list())
        self.splits: list[str] = [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))
        self._parts: dict[Variant, pl.DataFrame] = {}
        for key, part in self.df.partition_by(list(VARIANT_KEYS), as_dict=True, maintain_order=True).items():
            cap, group, rate, method, alpha = key
            variant = Variant(int(cap), group, float(rate), method, None if alpha is None else float(alpha))
            self._parts[variant] = part
        self.variants: list[Variant] = sorted(self._parts, key=Variant.sort_key)
        self._cache: dict[tuple, tuple[pl.DataFrame, dict[str, tuple[float, float, float]]]] = {}

    @property
    def content_judge(self) -> str:
        return self.judges[0]

    def find(self, **fixed: Any) -> list[Variant]:
        return [v for v in self.variants if v.matches(**fixed)]

    def variant(self, variant: Variant) -> Variant | None:
        """The stored variant equal to ``variant`` (tolerant float match), or None."""
        found = self.find(**variant.as_dict())
        return found[0] if found else None

    def rows(self, variant: Variant, judge: str | None = None, split: str = POOLED) -> pl.DataFrame:
        part = self._parts[variant]
        if judge is not None:
            part = part.filter(pl.col("judge") == judge)
        if split != POOLED:
            part = part.filter(pl.col("split") == split)
        return part

    def selectors(self, variant: Variant, first: str | None = None) -> list[str]:
        names = self._parts[variant]["condition"].unique().to_list()
        return order_selectors([n for n in names if n != BASELINE], first)

    def has(self, variant: Variant, selector: str, split: str = POOLED) -> bool:
        rows = self.rows(variant, split=split)
        return rows.filter(pl.col("condition") == selector).height > 0 and \
            rows.filter(pl.col("condition") == BASELINE).height > 0

    def grid(self, variant: Variant, selector: str, judge: str, split: str = POOLED) -> pl.DataFrame:
        """Δ grid with CIs: mask_emotion, target_emotion, n, match_pct, baseline_pct, delta_pp, lo_pp, hi_pp."""
        return self._compute(variant, selector, judge, split)[0]

    def summary(self, variant: Variant, selector: str, judge: str, split: str = POOLED) -> dict[str, tuple[float, float, float]]:
        """statistic -> (value, lo, hi) in pp, for the statistics the grid defines."""
        return self._compute(variant, selector, judge, split)[1]

    def _compute(self, variant, selector, judge, split):
        key = (variant, selector, judge, split)
        if key not in self._cache:
            rows = self.rows(variant, judge, split)
            point = delta_grid(rows, selector)
            ci = bootstrap_grid(rows, selector, n_boot=self.n_boot, seed=self.seed)
            grid = point.join(
                ci.grid.select("mask_emotion", "target_emotion", "lo_pp", "hi_pp"),
                on=["mask_emotion", "target_emotion"], how="left",
            )
            summary = {r["statistic"]: (r["value_pp"], r["lo_pp"], r["hi_pp"]) for r in ci.summary.iter_rows(named=True)}
            self._cache[key] = (grid, summary)
        return self._cache[key]

    def content(self, variant: Variant, condition: str, split: str = POOLED) -> dict[str, Any]:
        """n_attempts, n_sources, corpus wer_pct, mos_mean of one condition (first judge's rows)."""
        rows = self.rows(variant, self.content_judge, split).filter(pl.col("condition") == condition)
        words = int(rows["ref_words"].sum()) if rows.height else 0
        mos = rows["mos"].drop_nulls()
        estimators = sorted(set(rows["mos_estimator"].drop_nulls().to_list()))
        return {
            "n_attempts": rows.height,
            "n_sources": rows["source_id"].n_unique(),
            "wer_pct": 100.0 * int(rows["word_errors"].sum()) / words if words else None,
            "mos_mean": float(mos.mean()) if mos.len() else None,
            "mos_estimator": ",".join(estimators) if estimators else None,
        }

    def effect_columns(self, variant: Variant, selector: str, split: str = POOLED) -> dict[str, float | None]:
        """{self_<judge>, self_<judge>_lo, self_<judge>_hi, cross_..., gap_...} for every judge."""
        out: dict[str, float | None] = {}
        for judge in self.judges:
            judged = self.rows(variant, judge, split).filter(pl.col("condition") == selector).height > 0
            summary = self.summary(variant, selector, judge, split) if judged else {}
            for stat in STATISTICS:
                value, lo, hi = summary.get(stat, (None, None, None))
                slug = judge_slug(judge)
                out[f"{stat}_{slug}"], out[f"{stat}_{slug}_lo"], out[f"{stat}_{slug}_hi"] = value, lo, hi
        return out

    def content_columns(self, variant: Variant, selector: str, split: str = POOLED) -> dict[str, Any]:
        """n_sources, wer_pct, wer_delta_pp, mos_mean, mos_delta (Δ against the variant's baseline)."""
        mine, base = self.content(variant, selector, split), self.content(variant, BASELINE, split)
        return {
            "n_sources": mine["n_sources"],
            "wer_pct": mine["wer_pct"],
            "wer_delta_pp": _minus(mine["wer_pct"], base["wer_pct"]),
            "mos_mean": mine["mos_mean"],
            "mos_delta": _minus(mine["mos_mean"], base["mos_mean"]),
        }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _checked_evaluation(evaluation: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in REPORT_COLUMNS if c not in evaluation.columns]
    if missing:
        raise ValueError(f"evaluation table: missing column(s) {missing}; has {evaluation.columns}")
    if evaluation.height == 0:
        raise ValueError("evaluation table is empty")
    df = evaluation
    if "mos_estimator" not in df.columns:
        df = df.with_columns(mos_estimator=pl.lit(None, dtype=pl.Utf8))
    df = df.select(*REPORT_COLUMNS, "mos_estimator").with_columns(
        pl.col("judge", "group", "method", "split", "mos_estimator").cast(pl.Utf8),
        pl.col("cap").cast(pl.Int64),
        pl.col("rate", "alpha").cast(pl.Float64),
    )
    for col in ("judge", "cap", "group", "rate", "method", "split"):
        nulls = df.filter(pl.col(col).is_null()).height
        if nulls:
            raise ValueError(f"evaluation table: {nulls} null value(s) in column {col!r}")
    return df


# ---------------------------------------------------------------------------- masks


class MaskSet:
    """Mask tables by (selector, group, rate, cap), read lazily and checked against the layouts."""

    def __init__(self, records: Sequence[Mapping[str, Any]], layouts: Mapping[str, NeuronLayout]):
        self.records = []
        for rec in records:
            missing = [k for k in ("selector", "group", "rate", "cap", "path") if k not in rec]
            if missing:
                raise ValueError(f"mask record {dict(rec)}: missing key(s) {missing}")
            self.records.append({**rec, "rate": float(rec["rate"]), "cap": int(rec["cap"])})
        self.layouts = dict(layouts)
        self._loaded: dict[str, tuple[pl.DataFrame, dict[str, Mask]]] = {}

    def find(self, selector: str | None = None, group: str | None = None,
             rate: float | None = None, cap: int | None = None) -> list[dict]:
        out = []
        for rec in self.records:
            if selector is not None and rec["selector"] != selector:
                continue
            if group is not None and rec["group"] != group:
                continue
            if rate is not None and not _same(rec["rate"], rate):
                continue
            if cap is not None and rec["cap"] != cap:
                continue
            out.append(rec)
        return out

    def layout(self, group: str) -> NeuronLayout:
        if group not in self.layouts:
            raise ValueError(f"no NeuronLayout for group {group!r}; have {sorted(self.layouts)}")
        return self.layouts[group]

    def load(self, record: Mapping[str, Any]) -> tuple[pl.DataFrame, dict[str, Mask]]:
        path = str(record["path"])
        if path not in self._loaded:
            table = read_table(path, "masks")
            masks = masks_from_table(table, self.layout(record["group"]), selector=record["selector"])
            self._loaded[path] = (pl.from_arrow(table), masks)
        return self._loaded[path]

    def masks(self, selector: str, group: str, rate: float, cap: int) -> dict[str, Mask] | None:
        found = self.find(selector, group, rate, cap)
        if len(found) > 1:
            raise ValueError(f"{len(found)} mask records for {selector}/{group}/r={rate}/c={cap}")
        return self.load(found[0])[1] if found else None

    def counts(self, record: Mapping[str, Any]) -> pl.DataFrame:
        """layer, emotion, count of one mask table (every layer, zeros included)."""
        table, masks = self.load(record)
        emotions = order_emotions(masks)
        return layer_counts(table, n_layers=self.layout(record["group"]).n_layers, emotions=emotions)


def mask_size_columns(mask_set: MaskSet, selector: str, variant: Variant) -> dict[str, Any]:
    masks = mask_set.masks(selector, variant.group, variant.rate, variant.cap)
    if not masks:
        log.warning("no mask record for %s at %s: mask size left empty", selector, variant.describe())
        return {"mask_size_mean": None, "mask_size_min": None, "mask_requested": None}
    sizes = [m.size for m in masks.values()]
    return {
        "mask_size_mean": float(np.mean(sizes)),
        "mask_size_min": int(min(sizes)),
        "mask_requested": int(max(m.requested for m in masks.values())),
    }


# ---------------------------------------------------------------------------- table builders


class Skip(Exception):
    """A table that cannot be built from the variants present (the message says why)."""


def anchor_variant(effects: Effects, anchor: Anchor) -> Variant:
    found = effects.variant(anchor.variant)
    if found is None:
        raise Skip(f"the anchor variant ({anchor.variant.describe()}) is not in the evaluation table")
    if not effects.has(found, anchor.selector):
        raise Skip(f"the anchor selector {anchor.selector!r} was not evaluated at {found.describe()}")
    return found


def baseline_variant(effects: Effects, anchor: Anchor) -> Variant:
    """The anchor variant's baseline; failing that, the first variant of the anchor group (logged)."""
    found = effects.variant(anchor.variant)
    if found is not None:
        return found
    same_group = effects.find(group=anchor.variant.group) or effects.variants
    log.warning("table2_baseline: anchor variant absent; baseline rows of %s used instead",
                same_group[0].describe())
    return same_group[0]


def table2_baseline(effects: Effects, anchor: Anchor) -> pl.DataFrame:
    """Per split (and pooled) and target: baseline match % per judge, corpus WER %, mean MOS."""
    variant = baseline_variant(effects, anchor)
    rows = []
    for split in [*effects.splits, POOLED]:
        base = effects.rows(variant, split=split).filter(pl.col("condition") == BASELINE)
        if base.height == 0:
            continue
        per_judge = {}
        for judge in effects.judges:
            judged = base.filter(pl.col("judge") == judge)
            if judged.height:
                rates = match_rates(judged)
                per_judge[judge] = dict(zip(rates["target_emotion"].to_list(), rates["match_pct"].to_list()))
        content_rows = base.filter(pl.col("judge") == effects.content_judge)
        targets = order_emotions(base["target_emotion"].unique().to_list())
        for target in [*targets, "avg"]:
            sub = content_rows if target == "avg" else content_rows.filter(pl.col("target_emotion") == target)
            row: dict[str, Any] = {"split": split, "target_emotion": target, "n": sub.height}
            for judge in effects.judges:
                values = per_judge.get(judge, {})
                if target == "avg":  # mean over emotions, as the paper's Avg. row
                    row[f"match_{judge_slug(judge)}"] = float(np.mean(list(values.values()))) if values else None
                else:
                    row[f"match_{judge_slug(judge)}"] = values.get(target)
            words = int(sub["ref_words"].sum())
            mos = sub["mos"].drop_nulls()
            estimators = sorted(set(sub["mos_estimator"].drop_nulls().to_list()))
            row["wer_pct"] = 100.0 * int(sub["word_errors"].sum()) / words if words else None
            row["mos_mean"] = float(mos.mean()) if mos.len() else None
            row["mos_estimator"] = ",".join(estimators) if estimators else None
            rows.append(row)
    return _frame(rows)


def selector_table(effects: Effects, mask_set: MaskSet, variant: Variant, first: str | None = None) -> pl.DataFrame:
    """Tables 3 and 6: one row per selector evaluated at ``variant`` (pooled splits)."""
    rows = []
    for selector in effects.selectors(variant):
        rows.append({
            "selector": selector,
            **effects.effect_columns(variant, selector),
            **effects.content_columns(variant, selector),
            **mask_size_columns(mask_set, selector, variant),
        })
    return _frame(rows)


def table3_selectors(effects: Effects, mask_set: MaskSet, anchor: Anchor) -> pl.DataFrame:
    return selector_table(effects, mask_set, anchor_variant(effects, anchor))


def synth_variant(effects: Effects, anchor: Anchor) -> Variant:
    v = anchor.variant
    if v.group == "synth":
        raise Skip("the anchor group is already 'synth'; Table 6 compares the synth group to it")
    found = effects.find(group="synth", cap=v.cap, rate=v.rate, method=v.method, alpha=v.alpha)
    if not found:
        raise Skip(f"no synth-group variant at c={v.cap}, r={format_rate(v.rate)}, {method_label(v)}")
    return found[0]


def table6_synth(effects: Effects, mask_set: MaskSet, anchor: Anchor) -> pl.DataFrame:
    return selector_table(effects, mask_set, synth_variant(effects, anchor))


def strength_variants(effects: Effects, anchor: Anchor) -> list[Variant]:
    """Variants at the anchor (group, rate, cap) with the anchor selector, any (method, α)."""
    v = anchor.variant
    found = [x for x in effects.find(group=v.group, rate=v.rate, cap=v.cap) if _with_selector(effects, x, anchor)]
    if len(found) < 2:
        raise Skip(f"fewer than two (method, α) settings with {anchor.selector!r} at "
                   f"group {v.group}, c={v.cap}, r={format_rate(v.rate)} (found {[method_label(x) for x in found]})")
    return found


def _with_selector(effects: Effects, variant: Variant, anchor: Anchor) -> bool:
    if effects.has(variant, anchor.selector):
        return True
    log.warning("%s: selector %r not evaluated there; left out of the comparison",
                variant.describe(), anchor.selector)
    return False


def table4_strength(effects: Effects, anchor: Anchor) -> pl.DataFrame:
    rows = []
    for variant in strength_variants(effects, anchor):
        rows.append({
            "method": variant.method,
            "alpha": variant.alpha,
            **effects.effect_columns(variant, anchor.selector),
            **effects.content_columns(variant, anchor.selector),
        })
    return _frame(rows)


def sweep_variants(effects: Effects, anchor: Anchor, key: str) -> list[Variant]:
    """Variants equal to the anchor except in ``key`` ('rate' or 'cap'), sorted by it."""
    fixed = {k: getattr(anchor.variant, k) for k in VARIANT_KEYS if k != key}
    found = [x for x in effects.find(**fixed) if _with_selector(effects, x, anchor)]
    found.sort(key=lambda x: getattr(x, key))
    if len(found) < 2:
        raise Skip(f"fewer than two values of {key} with {anchor.selector!r} at the anchor's other "
                   f"settings (found {[getattr(x, key) for x in found]})")
    return found


def sweep_table(effects: Effects, anchor: Anchor, key: str) -> pl.DataFrame:
    rows = []
    for variant in sweep_variants(effects, anchor, key):
        rows.append({
            key: getattr(variant, key),
            **effects.effect_columns(variant, anchor.selector),
            **effects.content_columns(variant, anchor.selector),
        })
    return _frame(rows)


def seen_unseen_table(effects: Effects, anchor: Anchor) -> pl.DataFrame:
    """Per judge and split: each target's self-effect Δ(e, e) and self/cross/gap, with CIs (Fig. 10)."""
    variant = anchor_variant(effects, anchor)
    splits = [s for s in effects.splits if effects.has(variant, anchor.selector, s)]
    if len(splits) < 2:
        raise Skip(f"the anchor variant was evaluated on fewer than two splits ({splits})")
    rows = []
    for judge in effects.judges:
        for split in splits:
            grid = effects.grid(variant, anchor.selector, judge, split)
            for r in grid.filter(pl.col("mask_emotion") == pl.col("target_emotion")).iter_rows(named=True):
                rows.append({"judge": judge, "split": split, "statistic": r["target_emotion"],
                             "value_pp": r["delta_pp"], "lo_pp": r["lo_pp"], "hi_pp": r["hi_pp"]})
            for stat, (value, lo, hi) in effects.summary(variant, anchor.selector, judge, split).items():
                rows.append({"judge": judge, "split": split, "statistic": stat,
                             "value_pp": value, "lo_pp": lo, "hi_pp": hi})
    return _frame(rows)


def table5_masks(mask_set: MaskSet, anchor: Anchor) -> pl.DataFrame:
    """Pairwise mask comparison per emotion at the anchor (group, rate, cap), plus an 'average' row."""
    v = anchor.variant
    records = mask_set.find(group=v.group, rate=v.rate, cap=v.cap)
    selectors = order_selectors({r["selector"] for r in records}, first=anchor.selector)
    if len(selectors) < 2:
        raise Skip(f"fewer than two selectors' masks at group {v.group}, c={v.cap}, r={format_rate(v.rate)} ({selectors})")
    layout = mask_set.layout(v.group)
    rows = []
    for i, a in enumerate(selectors):
        for b in selectors[i + 1:]:
            ma, mb = mask_set.masks(a, v.group, v.rate, v.cap), mask_set.masks(b, v.group, v.rate, v.cap)
            pair = []
            for emotion in order_emotions(set(ma) & set(mb)):
                A, B = ma[emotion], mb[emotion]
                stats = mask_comparison(A.indices, B.indices, layout)
                reason = stats.pop("jsd_undefined")
                if reason is not None:  # an empty mask (CAS may give one): no JSD, overlaps defined
                    log.warning("table5_masks: %s vs %s, %s: JSD left empty (%s)", a, b, emotion, reason)
                    stats["jsd"] = None
                pair.append({"selector_a": a, "selector_b": b, "emotion": emotion,
                             "size_a": A.size, "size_b": B.size, **stats})
            if pair:
                avg = {k: _mean_or_none([p[k] for p in pair]) for k in ("jaccard", "direct_match", "jsd")}
                pair.append({"selector_a": a, "selector_b": b, "emotion": "average",
                             "size_a": None, "size_b": None, **avg})
            rows.extend(pair)
    return _frame(rows)


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def delta_grid_table(effects: Effects) -> pl.DataFrame:
    """Every (variant, selector, judge, split incl. pooled) Δ cell with its 95% CI."""
    parts = []
    for variant, selector, judge, split in _all_cells(effects):
        grid = effects.grid(variant, selector, judge, split)
        parts.append(grid.select(
            *[pl.lit(val).alias(k) for k, val in variant.as_dict().items()],
            pl.lit(selector).alias("selector"), pl.lit(judge).alias("judge"), pl.lit(split).alias("split"),
            pl.all(),
        ))
    return _concat(parts)


def effects_table(effects: Effects) -> pl.DataFrame:
    """Every (variant, selector, judge, split incl. pooled): self / cross / gap with 95% CIs, long."""
    rows = []
    for variant, selector, judge, split in _all_cells(effects):
        for stat, (value, lo, hi) in effects.summary(variant, selector, judge, split).items():
            rows.append({**variant.as_dict(), "selector": selector, "judge": judge, "split": split,
                         "statistic": stat, "value_pp": value, "lo_pp": lo, "hi_pp": hi})
    return _frame(rows)


def _all_cells(effects: Effects):
    for variant in effects.variants:
        for selector in effects.selectors(variant):
            for judge in effects.judges:
                for split in [*effects.splits, POOLED]:
                    rows = effects.rows(variant, judge, split)
                    if rows.filter(pl.col("condition") == selector).height and \
                            rows.filter(pl.col("condition") == BASELINE).height:
                        yield variant, selector, judge, split


def localisation_table(mask_set: MaskSet) -> pl.DataFrame:
    parts = []
    for rec in sorted(mask_set.records, key=lambda r: (r["group"], r["cap"], r["rate"], r["selector"])):
        counts = mask_set.counts(rec)
        parts.append(counts.select(
            pl.lit(rec["selector"]).alias("selector"), pl.lit(rec["group"]).alias("group"),
            pl.lit(rec["rate"]).alias("rate"), pl.lit(rec["cap"]).alias("cap"), pl.all(),
        ))
    if not parts:
        raise Skip("no mask records")
    return pl.concat(parts)


def _frame(rows: list[dict]) -> pl.DataFrame:
    if not rows:
        raise Skip("nothing to tabulate")
    return pl.DataFrame(rows, infer_schema_length=None)


def _concat(parts: list[pl.DataFrame]) -> pl.DataFrame:
    if not parts:
        raise Skip("nothing to tabulate")
    return pl.concat(parts, how="diagonal_relaxed")


# ---------------------------------------------------------------------------- writing


def _fmt(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        if column in ("rate", "alpha"):
            return f"{value:g}"  # exact as configured: r = 0.0059 must not print as 0.006
        value = round(value, 3) + 0.0  # no '-0.00'

        if column in ("jaccard", "direct_match", "jsd"):
            return f"{value:.3f}"
        if _signed(column):
            return f"{value:+.2f}"
        return f"{value:.2f}"
    return str(value)


def _signed(column: str) -> bool:
    return column.startswith(STATISTICS) or "delta" in column or column == "value_pp"


def markdown_table(df: pl.DataFrame) -> str:
    """A pipe table; ``X`` with ``X_lo``/``X_hi`` becomes one 'X [lo, hi]' column."""
    cols = df.columns
    shown = [c for c in cols if not (re.search(r"_(lo|hi)$", c) and c[:-3] in cols)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in df.iter_rows(named=True):
        cells = []
        for c in shown:
            text = _fmt(c, row[c])
            if f"{c}_lo" in cols and f"{c}_hi" in cols and row[c] is not None and row[f"{c}_lo"] is not None:
                text += f" [{_fmt(c, row[f'{c}_lo'])}, {_fmt(c, row[f'{c}_hi'])}]"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_frame(df: pl.DataFrame, out_dir: Path, name: str, title: str, provenance: Mapping[str, Any]) -> list[Path]:
    """``name``.parquet (provenance in the metadata), .csv and .md, each written atomically."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}.parquet", out_dir / f"{name}.csv", out_dir / f"{name}.md"]
    table = df.to_arrow()
    prov = {"table": name, "title": title, "esn_core_version": __version__, **provenance}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           PROVENANCE_KEY: json.dumps(prov, sort_keys=True, default=str).encode()})
    with atomic_path(paths[0]) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    with atomic_path(paths[1]) as tmp:
        df.write_csv(tmp)
    with atomic_path(paths[2]) as tmp:
        tmp.write_text(f"## {title}\n\n{markdown_table(df)}", encoding="utf-8")
    return paths


def _titles(anchor: Anchor, n_boot: int) -> dict[str, str]:
    ci = f"Δ emotion match vs. baseline in pp, TEST-SEEN ∪ TEST-UNSEEN, 95% paired-bootstrap CIs (B={n_boot})"
    v = anchor.variant
    return {
        "table2_baseline": "Table 2 — baseline EVC: target-emotion match % per judge, corpus WER %, mean MOS",
        "table3_selectors": f"Table 3 — selectors at {v.describe()}; {ci}",
        "table4_strength": f"Table 4 — {anchor.selector.upper()} across intervention methods and α "
                           f"(group {v.group}, c={v.cap}, r={format_rate(v.rate)}); {ci}",
        "table5_masks": f"Table 5 — mask similarity between selectors per emotion "
                        f"(group {v.group}, c={v.cap}, r={format_rate(v.rate)}): Jaccard, direct match |A∩B|/|A|, JSD",
        "table6_synth": f"Table 6 — selectors on the synth group (c={v.cap}, r={format_rate(v.rate)}, {method_label(v)}); {ci}",
        "sweep_rate": f"Selection-rate sweep (Fig. 4) — {anchor.selector.upper()}, c={v.cap}, {method_label(v)}; {ci}",
        "sweep_cap": f"Success-cap sweep (Fig. 5) — {anchor.selector.upper()}, r={format_rate(v.rate)}, {method_label(v)}; {ci}",
        "seen_unseen": f"Seen vs unseen speakers (Fig. 10) — {anchor.describe()}; per-target Δ(e, e) and "
                       f"self/cross/gap per split, pp, 95% CIs",
        "delta_grid": "Δ(e_mask, e_tgt) in pp for every variant, selector, judge and split, with 95% CIs",
        "effects": "self / cross / gap in pp for every variant, selector, judge and split, with 95% CIs",
        "localisation": "Selected neurons per (layer, emotion) of every mask (Fig. 9)",
    }


def write_tables(
    evaluation: pl.DataFrame,
    masks: Sequence[Mapping[str, Any]],
    layouts: Mapping[str, NeuronLayout],
    anchor: Mapping[str, Any],
    out_dir,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Path]:
    """Write every table the variants allow (Parquet + CSV + Markdown); returns the paths written."""
    anc = Anchor.from_mapping(anchor)
    effects = Effects(evaluation, n_boot=n_boot, seed=seed)
    mask_set = MaskSet(masks, layouts)
    titles = _titles(anc, n_boot)
    builders = {
        "table2_baseline": lambda: table2_baseline(effects, anc),
        "table3_selectors": lambda: table3_selectors(effects, mask_set, anc),
        "table4_strength": lambda: table4_strength(effects, anc),
        "table5_masks": lambda: table5_masks(mask_set, anc),
        "table6_synth": lambda: table6_synth(effects, mask_set, anc),
        "sweep_rate": lambda: sweep_table(effects, anc, "rate"),
        "sweep_cap": lambda: sweep_table(effects, anc, "cap"),
        "seen_unseen": lambda: seen_unseen_table(effects, anc),
        "delta_grid": lambda: delta_grid_table(effects),
        "effects": lambda: effects_table(effects),
        "localisation": lambda: localisation_table(mask_set),
    }
    provenance = {"anchor": anc.as_dict(), "n_boot": effects.n_boot, "seed": effects.seed,
                  "judges": effects.judges, "content_judge": effects.content_judge,
                  "splits": effects.splits}
    written: list[Path] = []
    for name, build in builders.items():
        try:
            df = build()
        except Skip as why:
            log.warning("%s not written: %s", name, why)
            continue
        written += write_frame(df, Path(out_dir), name, titles[name], provenance)
        log.info("%s: %d rows", name, df.height)
    return written


# ---------------------------------------------------------------------------- report


def markdown_report(tables_dir, figures_dir, link_base=None) -> str:
    """results/report.md: anchor self/cross/gap per judge with CIs, baseline match per emotion, figures.

    Links to figures are relative to ``link_base``, the folder the report will sit in
    (default: the parent of ``tables_dir``, i.e. ``results/`` for ``results/tables``).
    """
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    lines = ["# ESN results", ""]
    t3_path, t2_path = tables_dir / "table3_selectors.parquet", tables_dir / "table2_baseline.parquet"
    prov_source = t3_path if t3_path.exists() else t2_path if t2_path.exists() else None
    prov = read_provenance(prov_source) if prov_source else {}
    anc = Anchor.from_mapping(prov["anchor"]) if "anchor" in prov else None
    judges = prov.get("judges", [])
    if anc is not None:
        lines += [f"Anchor: {anc.describe()}. Δ in pp vs. the unintervened baseline, TEST-SEEN ∪ "
                  f"TEST-UNSEEN, 95% paired-bootstrap CIs over source utterances (B={prov.get('n_boot')}).", ""]
    if t3_path.exists() and anc is not None:
        t3 = read_frame(t3_path)
        headline = headline_lines(t3, anc, judges)
        if headline:
            lines += ["## Headline: anchor intervention", "", *headline]
        lines += ["## Selectors (Table 3)", "", markdown_table(t3)]
    if t2_path.exists():
        t2 = read_frame(t2_path).filter(pl.col("split") == POOLED)
        match_cols = [c for c in t2.columns if c.startswith("match_")]
        lines += ["## Baseline match per target emotion (Table 2, all test splits)", "",
                  markdown_table(t2.select("target_emotion", *match_cols, "wer_pct", "mos_mean"))]
    present = [n for n in TABLE_NAMES if (tables_dir / f"{n}.parquet").exists()]
    absent = [n for n in TABLE_NAMES if n not in present]
    lines += ["## Tables", "", ", ".join(f"`{n}`" for n in present) or "none", ""]
    if absent:
        lines += [f"Not produced (their variants were not evaluated): {', '.join(absent)}.", ""]
    figures = sorted(figures_dir.glob("*.png"), key=_figure_rank) if figures_dir.exists() else []
    link_base = tables_dir.parent if link_base is None else link_base
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            target = Path(_relative(fig, link_base))
            caption = figures_dir / "captions" / f"{fig.stem}.rst"
            text = caption.read_text(encoding="utf-8").strip().splitlines()[0] if caption.exists() else fig.stem
            lines += [f"![{fig.stem}]({target.as_posix()})", "", f"*{text}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def headline_lines(table3: pl.DataFrame, anc: Anchor, judges: Sequence[str]) -> list[str]:
    """The anchor selector's self / cross / gap per judge with CIs, then WER and MOS; [] when
    Table 3 has no row for it."""
    row = table3.filter(pl.col("selector") == anc.selector)
    if not row.height:
        return []
    r = row.row(0, named=True)
    lines = ["| judge | self | cross | gap |", "|---|---|---|---|"]
    for judge in judges:
        s = judge_slug(judge)
        cells = [_ci_text(r, f"{stat}_{s}") for stat in STATISTICS]
        lines.append(f"| {judge} | " + " | ".join(cells) + " |")
    return lines + ["", f"WER {_fmt('wer_pct', r['wer_pct'])}% (Δ {_fmt('wer_delta_pp', r['wer_delta_pp'])} pp), "
                        f"MOS {_fmt('mos_mean', r['mos_mean'])} (Δ {_fmt('mos_delta', r['mos_delta'])}).", ""]


FIGURE_ORDER: tuple[str, ...] = (
    "delta_heatmap", "sweep_rate", "sweep_cap", "methods", "sweep_alpha", "layers", "seen_unseen",
)


def _figure_rank(path: Path) -> tuple[int, str]:
    """The paper's figure order (Fig. 3, 4, 5, 6, 7, 9, 10), then the name."""
    ranks = [i for i, prefix in enumerate(FIGURE_ORDER) if path.stem.startswith(prefix)]
    return (ranks[0] if ranks else len(FIGURE_ORDER), path.stem)


def _ci_text(row: Mapping[str, Any], col: str) -> str:
    if row.get(col) is None:
        return "—"
    value, lo, hi = (round(row[c], 2) + 0.0 for c in (col, col + "_lo", col + "_hi"))
    return f"{value:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _relative(path: Path, base) -> str:
    return str(path) if base is None else os.path.relpath(path, base)
