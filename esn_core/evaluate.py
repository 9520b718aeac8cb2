"""Evaluation metrics (SPEC §7): match rates, Δ grids, self/cross/gap, paired bootstrap CIs,
mask comparison (Table 5) and per-layer neuron counts (Fig. 9).

Input is one long table of judged evaluation attempts, one row per attempt:

    source_id       the neutral source utterance (the unit the bootstrap resamples)
    condition       'baseline' or a selector name ('CAS', 'LAP', ...)
    mask_emotion    the mask's emotion; null for the baseline
    target_emotion  the emotion the model was instructed to produce
    label           the judge's label (raw or mapped; see judges.labels)
    word_errors     edits of the decoded text against the reference (judges.wer)
    ref_words       words in the normalised reference
    mos             naturalness estimate (may be null)

Percentages are in [0, 100]; Δ values are percentage points (pp). Filter the table to one
split and one judge before calling: the functions compare whatever rows they are given.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import polars as pl

from esn_core.constants import EMOTIONS
from esn_core.judges.labels import map_judge_label
from esn_core.layout import NeuronLayout

BASELINE = "baseline"

EVAL_COLUMNS: tuple[str, ...] = (
    "source_id", "condition", "mask_emotion", "target_emotion",
    "label", "word_errors", "ref_words", "mos",
)

_EMOTION_RANK = {e: i for i, e in enumerate(EMOTIONS)}


# ---------------------------------------------------------------------------- rates and Δ


def match_rates(df: pl.DataFrame) -> pl.DataFrame:
    """Per (condition, mask_emotion, target_emotion): n, match_pct, wer_pct, mos_mean.

    ``match_pct`` = 100 · share of attempts judged as the target; ``wer_pct`` = corpus WER
    (100 · total edits / total reference words, may exceed 100; null without reference
    words); ``mos_mean`` ignores null MOS values. Baseline rows come first.
    """
    scored = _prepare(df)
    rates = scored.group_by("condition", "mask_emotion", "target_emotion").agg(
        pl.len().cast(pl.Int64).alias("n"),
        (100.0 * pl.col("match").mean()).alias("match_pct"),
        pl.col("word_errors").sum().alias("_errors"),
        pl.col("ref_words").sum().alias("_words"),
        pl.col("mos").mean().alias("mos_mean"),
    )
    rates = rates.with_columns(
        wer_pct=pl.when(pl.col("_words") > 0).then(100.0 * pl.col("_errors") / pl.col("_words"))
    ).drop("_errors", "_words")
    rates = rates.select("condition", "mask_emotion", "target_emotion", "n", "match_pct", "wer_pct", "mos_mean")
    return _sort_conditions(rates)


def delta_grid(df: pl.DataFrame, selector: str) -> pl.DataFrame:
    """Δ(e_mask, e_tgt) = match(selector, e_mask, e_tgt) − match(baseline, e_tgt), in pp.

    One row per (mask_emotion, target_emotion) the selector was evaluated on, with columns
    n, match_pct, baseline_pct, delta_pp. Rows are in ``EMOTIONS`` order (mask, then target).
    """
    rates = match_rates(df)
    selected = _selector_rows(rates, selector)
    baseline = rates.filter(pl.col("condition") == BASELINE).select(
        "target_emotion", pl.col("match_pct").alias("baseline_pct")
    )
    _require_baseline_for(selected["target_emotion"].unique().to_list(), baseline, selector)
    grid = selected.join(baseline, on="target_emotion", how="left").with_columns(
        delta_pp=pl.col("match_pct") - pl.col("baseline_pct")
    )
    grid = _sort_emotions(grid, ["mask_emotion", "target_emotion"])
    return grid.select("mask_emotion", "target_emotion", "n", "match_pct", "baseline_pct", "delta_pp")


def self_cross_gap(grid: pl.DataFrame) -> dict[str, float]:
    """self = mean Δ over e_mask == e_tgt cells; cross = mean over e_mask != e_tgt; gap = self − cross.

    Means are over cells, not attempts (SPEC §7). Needs both kinds of cell.
    """
    diagonal = grid.filter(pl.col("mask_emotion") == pl.col("target_emotion"))["delta_pp"]
    off_diagonal = grid.filter(pl.col("mask_emotion") != pl.col("target_emotion"))["delta_pp"]
    if diagonal.len() == 0 or off_diagonal.len() == 0:
        raise ValueError(
            f"self_cross_gap: the grid needs both self (e_mask == e_tgt) and cross cells; "
            f"has {diagonal.len()} self and {off_diagonal.len()} cross"
        )
    self_effect, cross_effect = float(diagonal.mean()), float(off_diagonal.mean())
    return {"self": self_effect, "cross": cross_effect, "gap": self_effect - cross_effect}


# ---------------------------------------------------------------------------- bootstrap


class GridCI(NamedTuple):
    """Bootstrap CIs for a selector's whole Δ grid and its self/cross/gap summary."""

    grid: pl.DataFrame  # mask_emotion, target_emotion, delta_pp, lo_pp, hi_pp
    summary: pl.DataFrame  # statistic (self | cross | gap), value_pp, lo_pp, hi_pp


class _PairedCounts(NamedTuple):
    """Per-source hit/attempt counts, one row per Δ cell, baseline aligned to each cell."""

    sources: list[str]
    cells: list[tuple[str, str]]  # (mask_emotion, target_emotion)
    hits: np.ndarray  # [C, S] intervened attempts judged as the target
    n: np.ndarray  # [C, S] intervened attempts
    base_hits: np.ndarray  # [C, S] baseline of the cell's target
    base_n: np.ndarray  # [C, S]


def paired_bootstrap_ci(
    df: pl.DataFrame,
    selector: str,
    mask_emotion: str,
    target: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(Δ, lo, hi) in pp for one cell, by a paired bootstrap over source utterances.

    Each replicate draws the sources with replacement and recomputes both the intervened
    and the baseline match rate on the *same* drawn sources, so per-source difficulty
    cancels; the interval is the percentile interval at ``level``. Every source must have
    attempts in both conditions. Equals the cell's CI from ``bootstrap_grid`` when the
    grid has the same sources.
    """
    scored = _prepare(df)
    _selector_rows(scored, selector)
    cell_rows = scored.filter(
        (pl.col("condition") == selector)
        & (pl.col("mask_emotion") == mask_emotion)
        & (pl.col("target_emotion") == target)
    )
    if cell_rows.height == 0:
        raise ValueError(f"no attempts for selector {selector!r}, mask {mask_emotion!r}, target {target!r}")
    counts = _paired_counts(scored, selector, [(mask_emotion, target)])
    point, boot = _bootstrap_deltas(counts, n_boot, seed)
    lo, hi = _percentile_interval(boot, level)
    return float(point[0]), float(lo[0]), float(hi[0])


def bootstrap_grid(
    df: pl.DataFrame, selector: str, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> GridCI:
    """Paired bootstrap CIs for every Δ cell of ``selector`` and for self / cross / gap.

    All cells share each replicate's draw of sources, so the summary statistics' intervals
    account for the correlation between cells. The summary has a row for each statistic
    the grid defines (self needs a diagonal cell, cross an off-diagonal one, gap both).
    """
    scored = _prepare(df)
    cells = _selector_rows(scored, selector).select("mask_emotion", "target_emotion").unique()
    cells = _sort_emotions(cells, ["mask_emotion", "target_emotion"]).rows()
    counts = _paired_counts(scored, selector, cells)
    point, boot = _bootstrap_deltas(counts, n_boot, seed)
    lo, hi = _percentile_interval(boot, level)
    grid = pl.DataFrame(
        {
            "mask_emotion": [m for m, _ in cells],
            "target_emotion": [t for _, t in cells],
            "delta_pp": point,
            "lo_pp": lo,
            "hi_pp": hi,
        }
    )
    return GridCI(grid=grid, summary=_summary_ci(cells, point, boot, level))


def _summary_ci(
    cells: Sequence[tuple[str, str]], point: np.ndarray, boot: np.ndarray, level: float
) -> pl.DataFrame:
    is_self = np.array([m == t for m, t in cells])
    stats: dict[str, tuple[float, np.ndarray]] = {}  # name -> (point value, replicates [B])
    if is_self.any():
        stats["self"] = (point[is_self].mean(), boot[:, is_self].mean(axis=1))
    if (~is_self).any():
        stats["cross"] = (point[~is_self].mean(), boot[:, ~is_self].mean(axis=1))
    if "self" in stats and "cross" in stats:
        stats["gap"] = (stats["self"][0] - stats["cross"][0], stats["self"][1] - stats["cross"][1])
    rows = []
    for name, (value, draws) in stats.items():
        lo, hi = _percentile_interval(draws[:, None], level)
        rows.append((name, float(value), float(lo[0]), float(hi[0])))
    return pl.DataFrame(rows, schema=["statistic", "value_pp", "lo_pp", "hi_pp"], orient="row")


def _paired_counts(scored: pl.DataFrame, selector: str, cells: Sequence[tuple[str, str]]) -> _PairedCounts:
    """Hit / attempt counts per (cell, source) for the selector and the matching baselines."""
    wanted = pl.DataFrame(
        {"mask_emotion": [m for m, _ in cells], "target_emotion": [t for _, t in cells]},
        schema={"mask_emotion": pl.Utf8, "target_emotion": pl.Utf8},
    )
    intervened = scored.filter(pl.col("condition") == selector).join(
        wanted, on=["mask_emotion", "target_emotion"], how="semi"
    )
    baseline = scored.filter(
        (pl.col("condition") == BASELINE) & pl.col("target_emotion").is_in(wanted["target_emotion"].to_list())
    )
    relevant = pl.concat([intervened, baseline])
    per_source = relevant.group_by("condition", "mask_emotion", "target_emotion", "source_id").agg(
        pl.col("match").sum().alias("hits"), pl.len().alias("n")
    )
    lookup = {
        (r["condition"], r["mask_emotion"], r["target_emotion"], r["source_id"]): (r["hits"], r["n"])
        for r in per_source.iter_rows(named=True)
    }
    sources = sorted(relevant["source_id"].unique().to_list())
    shape = (len(cells), len(sources))
    hits, n, base_hits, base_n = (np.zeros(shape) for _ in range(4))
    for c, (mask, target) in enumerate(cells):
        for s, source in enumerate(sources):
            hits[c, s], n[c, s] = _source_counts(lookup, (selector, mask, target, source))
            base_hits[c, s], base_n[c, s] = _source_counts(lookup, (BASELINE, None, target, source))
    return _PairedCounts(sources, list(cells), hits, n, base_hits, base_n)


def _source_counts(lookup: dict, key: tuple) -> tuple[int, int]:
    if key not in lookup:
        condition, mask, target, source = key
        raise ValueError(
            f"paired bootstrap: source {source!r} has no attempt in condition {condition!r} "
            f"(mask {mask!r}, target {target!r}); every source must appear in every compared "
            f"condition (filter the table to one split first)"
        )
    return lookup[key]


def _bootstrap_deltas(counts: _PairedCounts, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Point Δ [C] and replicate Δ [n_boot, C] in pp.

    Drawing S sources with replacement is the same as multinomial weights over the sources;
    the weights make every cell of a replicate see the same draw.
    """
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    n_sources = len(counts.sources)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_sources, np.full(n_sources, 1.0 / n_sources), size=int(n_boot)).astype(float)

    def deltas(w: np.ndarray) -> np.ndarray:
        intervened = (w @ counts.hits.T) / (w @ counts.n.T)
        baseline = (w @ counts.base_hits.T) / (w @ counts.base_n.T)
        return 100.0 * (intervened - baseline)

    return deltas(np.ones((1, n_sources)))[0], deltas(weights)


def _percentile_interval(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(draws, [tail, 100.0 - tail], axis=0)
    return lo, hi


# ---------------------------------------------------------------------------- masks


def mask_comparison(a_flat, b_flat, layout: NeuronLayout) -> dict[str, float | str | None]:
    """Compare two masks of one emotion (Table 5), given as flat neuron indices.

    jaccard = |A∩B| / |A∪B|; direct_match = |A∩B| / |A| (A is the reference mask);
    jsd = Jensen–Shannon divergence, base 2, in [0, 1], between the two masks' per-layer
    count distributions (each normalised to sum 1); jsd_undefined = why jsd is NaN, else None.

    Empty masks are legitimate (a CAS mask is empty when no neuron has its emotion on
    top): two empty sets are equal (jaccard 1.0), an empty A matches nothing
    (direct_match 0.0), and an empty mask has no layer distribution (jsd NaN).
    """
    a = _mask_array(a_flat, layout, "a")
    b = _mask_array(b_flat, layout, "b")
    shared = np.intersect1d(a, b).size
    union = np.union1d(a, b).size
    empty = [name for name, m in (("a", a), ("b", b)) if m.size == 0]
    if empty:
        jsd, reason = float("nan"), " and ".join(f"mask {n} is empty" for n in empty) + \
            ": no per-layer distribution"
    else:
        jsd = jensen_shannon_base2(_layer_distribution(a, layout), _layer_distribution(b, layout))
        reason = None
    return {
        "jaccard": shared / union if union else 1.0,
        "direct_match": shared / a.size if a.size else 0.0,
        "jsd": jsd,
        "jsd_undefined": reason,
    }


def jensen_shannon_base2(p: np.ndarray, q: np.ndarray) -> float:
    """JSD(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p+q)/2, log base 2, 0·log 0 = 0.

    (scipy's ``jensenshannon`` returns the square root, the distance, hence our own.)
    """
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    m = (p + q) / 2.0

    def kl_to_m(x: np.ndarray) -> float:
        support = x > 0  # where x > 0, m >= x/2 > 0, so the log is finite
        return float(np.sum(x[support] * np.log2(x[support] / m[support])))

    # clip float noise so identical inputs give exactly 0 and disjoint ones at most 1
    return min(1.0, max(0.0, 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)))


def mask_indices(mask_table: pl.DataFrame, emotion: str, layout: NeuronLayout) -> np.ndarray:
    """Sorted flat indices of one emotion's mask from a ``masks`` table."""
    rows = mask_table.filter(pl.col("emotion") == emotion)
    if rows.height == 0:
        raise ValueError(f"mask table has no neuron for emotion {emotion!r}")
    return np.sort(layout.flat_index(rows["layer"].to_numpy(), rows["neuron"].to_numpy()))


def layer_counts(
    mask_table: pl.DataFrame, n_layers: int | None = None, emotions: Sequence[str] | None = None
) -> pl.DataFrame:
    """Selected-neuron count per (layer, emotion) of a ``masks`` table (Fig. 9).

    With ``n_layers`` every layer 0..n_layers-1 appears for every emotion (zeros included),
    which a heat map needs; ``emotions`` defaults to those in the table, in ``EMOTIONS`` order.
    """
    for col in ("emotion", "layer"):
        if col not in mask_table.columns:
            raise ValueError(f"mask table: missing column {col!r}; has {mask_table.columns}")
    counts = mask_table.group_by("layer", "emotion").agg(pl.len().cast(pl.Int64).alias("count"))
    counts = counts.with_columns(pl.col("layer").cast(pl.Int32))
    if emotions is None:
        emotions = sorted(mask_table["emotion"].unique().to_list(), key=lambda e: _EMOTION_RANK.get(e, len(EMOTIONS)))
    counts = counts.filter(pl.col("emotion").is_in(list(emotions)))
    if n_layers is not None:
        too_deep = counts.filter(pl.col("layer") >= n_layers)
        if too_deep.height:
            raise ValueError(f"mask table: layer {too_deep['layer'].max()} >= n_layers={n_layers}")
        full = pl.DataFrame({"layer": list(range(n_layers))}, schema={"layer": pl.Int32}).join(
            pl.DataFrame({"emotion": list(emotions)}, schema={"emotion": pl.Utf8}), how="cross"
        )
        counts = full.join(counts, on=["layer", "emotion"], how="left").with_columns(
            pl.col("count").fill_null(0)
        )
    order = {e: i for i, e in enumerate(emotions)}
    return (
        counts.with_columns(pl.col("emotion").replace_strict(order, return_dtype=pl.Int32).alias("_rank"))
        .sort("_rank", "layer")
        .select("layer", "emotion", "count")
    )


def _mask_array(flat, layout: NeuronLayout, name: str) -> np.ndarray:
    arr = np.asarray(flat, dtype=np.int64).ravel()
    unique = np.unique(arr)
    if unique.size != arr.size:
        raise ValueError(f"mask {name} lists {arr.size - unique.size} neuron(s) twice")
    layout.unflatten(unique)  # raises IndexError for an index outside the layout
    return unique


def _layer_distribution(flat: np.ndarray, layout: NeuronLayout) -> np.ndarray:
    layers, _ = layout.unflatten(flat)
    counts = np.bincount(layers, minlength=layout.n_layers).astype(float)
    return counts / counts.sum()


# ---------------------------------------------------------------------------- input checks


def _prepare(df: pl.DataFrame) -> pl.DataFrame:
    """Validate the evaluation table and add a boolean ``match`` column."""
    missing = [c for c in EVAL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"evaluation table: missing column(s) {missing}; has {df.columns}")
    # fixed dtypes: an all-null column (a baseline-only table's mask_emotion) reads as Null
    df = df.select(EVAL_COLUMNS).with_columns(
        pl.col("source_id", "condition", "mask_emotion", "target_emotion", "label").cast(pl.Utf8),
        pl.col("word_errors", "ref_words").cast(pl.Int64),
        pl.col("mos").cast(pl.Float64),
    )
    for col in ("source_id", "condition", "target_emotion", "word_errors", "ref_words"):
        _require_no_nulls(df, col)
    _require_values_in(df, "target_emotion", EMOTIONS)
    _require_baseline_masks(df)
    negative = df.filter((pl.col("word_errors") < 0) | (pl.col("ref_words") < 0))
    if negative.height:
        raise ValueError(f"evaluation table: negative word_errors/ref_words for source {negative['source_id'][0]!r}")
    labels = df["label"].unique().drop_nulls().to_list()
    mapping = {raw: map_judge_label(raw) for raw in labels}
    mapped = pl.col("label").replace_strict(mapping, default=None, return_dtype=pl.Utf8)
    return df.with_columns(match=(mapped == pl.col("target_emotion")).fill_null(False))


def _require_no_nulls(df: pl.DataFrame, col: str) -> None:
    nulls = df.filter(pl.col(col).is_null())
    if nulls.height:
        raise ValueError(f"evaluation table: {nulls.height} null value(s) in column {col!r}")


def _require_values_in(df: pl.DataFrame, col: str, allowed: Sequence[str]) -> None:
    bad = df.filter(~pl.col(col).is_in(list(allowed)).fill_null(False))
    if bad.height:
        raise ValueError(
            f"evaluation table: column {col!r} has value {bad[col][0]!r} "
            f"(source {bad['source_id'][0]!r}); expected one of {tuple(allowed)}"
        )


def _require_baseline_masks(df: pl.DataFrame) -> None:
    is_base = pl.col("condition") == BASELINE
    masked_baseline = df.filter(is_base & pl.col("mask_emotion").is_not_null())
    if masked_baseline.height:
        raise ValueError(
            f"evaluation table: baseline row of source {masked_baseline['source_id'][0]!r} has "
            f"mask_emotion {masked_baseline['mask_emotion'][0]!r}; baseline rows must have none"
        )
    _require_values_in(df.filter(~is_base), "mask_emotion", EMOTIONS)


def _selector_rows(table: pl.DataFrame, selector: str) -> pl.DataFrame:
    if selector == BASELINE:
        raise ValueError(f"{BASELINE!r} is the reference condition, not a selector")
    rows = table.filter(pl.col("condition") == selector)
    if rows.height == 0:
        known = sorted(set(table["condition"].to_list()) - {BASELINE})
        raise ValueError(f"no rows for selector {selector!r}; conditions present: {known}")
    return rows


def _require_baseline_for(targets: list[str], baseline: pl.DataFrame, selector: str) -> None:
    have = set(baseline["target_emotion"].to_list())
    missing = sorted((t for t in targets if t not in have), key=_EMOTION_RANK.__getitem__)
    if missing:
        raise ValueError(f"selector {selector!r}: no baseline attempts for target {missing[0]!r}")


def _sort_emotions(df: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    ranks = [
        pl.col(c).replace_strict(_EMOTION_RANK, default=None, return_dtype=pl.Int32).alias(f"_rank_{c}")
        for c in cols
    ]
    keys = [f"_rank_{c}" for c in cols]
    return df.with_columns(ranks).sort(keys, nulls_last=False).drop(keys)


def _sort_conditions(df: pl.DataFrame) -> pl.DataFrame:
    df = df.with_columns((pl.col("condition") != BASELINE).alias("_not_base"))
    df = _sort_emotions(df, ["mask_emotion", "target_emotion"])
    return df.sort("_not_base", "condition", maintain_order=True).drop("_not_base")
