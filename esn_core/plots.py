"""The paper's figure kinds (issue 4): Δ heat maps (Fig. 3 right), r / c / method / α sweeps
(Figs. 4–7), per-layer neuron counts (Fig. 9) and seen vs unseen effects (Fig. 10).

Every number comes from :class:`esn_core.report.Effects`, the object the tables are built
from, so a figure and its table agree. Figures are drawn on matplotlib ``Figure`` objects
with the Agg canvas (no pyplot state, no display needed). Each plotting function returns
the figure *and* the data it drew, which is what the tests check.

Names: ``delta_heatmap_<selector>`` (anchor variant), ``sweep_rate``, ``sweep_cap``,
``sweep_alpha``, ``methods`` (line/bar plots of self, cross, gap) and their ``*_heatmaps``,
``layers_<selector>`` (anchor group, r, c) and ``seen_unseen``. ``write_figures`` writes
``<name>.png``, ``<name>.svg`` and ``captions/<name>.rst`` (for ``snakemake --report``);
a figure whose variants are absent is skipped with a warning naming the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from esn_core.io import atomic_path
from esn_core.layout import NeuronLayout
from esn_core.report import (
    POOLED,
    STATISTICS,
    Anchor,
    Effects,
    MaskSet,
    Skip,
    Variant,
    anchor_variant,
    method_label,
    order_emotions,
    order_selectors,
    seen_unseen_table,
    strength_variants,
    sweep_variants,
    format_rate,
)

log = logging.getLogger(__name__)

DELTA_CMAP = "RdBu_r"  # diverging; centred at 0 by symmetric limits
COUNT_CMAP = "viridis"
STAT_COLOURS = {"self": "tab:red", "cross": "tab:blue", "gap": "tab:green"}
SPLIT_LABELS = {"test_seen": "TEST-SEEN", "test_unseen": "TEST-UNSEEN", POOLED: "all"}


@dataclass
class FigureSpec:
    """A drawn figure, the arrays it shows, and its caption (one sentence first)."""

    name: str
    figure: Figure
    caption: str
    data: dict[str, Any] = field(default_factory=dict)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------- Δ heat maps


def grid_matrix(grid: pl.DataFrame, value: str = "delta_pp") -> tuple[np.ndarray, list[str], list[str]]:
    """A long Δ grid -> matrix [mask emotion, target emotion] (NaN where not evaluated), rows, cols."""
    rows = order_emotions(grid["mask_emotion"].to_list())
    cols = order_emotions(grid["target_emotion"].to_list())
    matrix = np.full((len(rows), len(cols)), np.nan)
    for r in grid.iter_rows(named=True):
        matrix[rows.index(r["mask_emotion"]), cols.index(r["target_emotion"])] = r[value]
    return matrix, rows, cols


def delta_heatmaps(
    panels: Sequence[Sequence[tuple[str, pl.DataFrame]]], title: str
) -> tuple[Figure, list[list[np.ndarray]]]:
    """Rows of annotated 4x4 Δ heat maps (rows e_mask, columns e_tgt), one colour scale centred at 0.

    ``panels[i][j]`` = (subtitle, Δ grid); returns the figure and the matrices drawn.
    """
    mats = [[grid_matrix(g) for _, g in row] for row in panels]
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    finite = [np.abs(m[np.isfinite(m)]) for row in mats for m, _, _ in row]
    vmax = max((float(a.max()) for a in finite if a.size), default=0.0) or 1.0
    fig = _figure(3.3 * n_cols + 0.8, 3.0 * n_rows + 0.6)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    image = None
    for i, row in enumerate(panels):
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(row):
                ax.set_axis_off()
                continue
            matrix, mask_rows, target_cols = mats[i][j]
            image = ax.imshow(matrix, cmap=DELTA_CMAP, vmin=-vmax, vmax=vmax)
            for (r, c), v in np.ndenumerate(matrix):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:+.1f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(v) > 0.6 * vmax else "black")
            ax.set_xticks(range(len(target_cols)), target_cols, rotation=30)
            ax.set_yticks(range(len(mask_rows)), mask_rows)
            ax.set_xlabel("target emotion (e_tgt)")
            ax.set_ylabel("mask emotion (e_mask)")
            ax.set_title(row[j][0], fontsize=10)
    fig.colorbar(image, ax=axes, label="Δ emotion match (pp)", shrink=0.8)
    fig.suptitle(title)
    return fig, [[m for m, _, _ in row] for row in mats]


# ---------------------------------------------------------------------------- effect plots

Series = Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]  # name -> (value, lo, hi)


def _yerr(values, lo, hi) -> np.ndarray:
    v, l, h = (np.array([np.nan if x is None else x for x in arr], dtype=float) for arr in (values, lo, hi))
    return np.nan_to_num(np.vstack([v - l, h - v]), nan=0.0)


def effect_lines(
    x_labels: Sequence[str], panels: Mapping[str, Series], title: str, xlabel: str
) -> tuple[Figure, dict[str, Series]]:
    """Per panel (judge): self / cross / gap against a swept setting, with 95% CI error bars."""
    fig = _figure(4.2 * len(panels) + 0.4, 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    x = np.arange(len(x_labels))
    for ax, (panel, series) in zip(axes, panels.items()):
        for k, (name, (values, lo, hi)) in enumerate(series.items()):
            v = np.array([np.nan if a is None else a for a in values], dtype=float)
            shift = 0.06 * (k - (len(series) - 1) / 2)  # keep the error bars apart
            ax.errorbar(x + shift, v, yerr=_yerr(values, lo, hi), marker="o", capsize=3, label=name,
                        color=STAT_COLOURS.get(name))
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(x, list(x_labels))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Δ emotion match (pp)")
        ax.set_title(panel, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig, dict(panels)


def grouped_bars(
    categories: Sequence[str], panels: Mapping[str, Series], title: str, xlabel: str
) -> tuple[Figure, dict[str, Series]]:
    """Per panel (judge): bars per category, one bar per group, with 95% CI error bars."""
    fig = _figure(max(4.2, 0.9 * len(categories) + 1.5) * len(panels) + 0.4, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    x = np.arange(len(categories))
    for ax, (panel, groups) in zip(axes, panels.items()):
        width = 0.8 / max(1, len(groups))
        for k, (name, (values, lo, hi)) in enumerate(groups.items()):
            v = np.array([np.nan if a is None else a for a in values], dtype=float)
            ax.bar(x + (k - (len(groups) - 1) / 2) * width, v, width, yerr=_yerr(values, lo, hi),
                   capsize=3, label=name, color=STAT_COLOURS.get(name))
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(x, list(categories), rotation=20)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Δ emotion match (pp)")
        ax.set_title(panel, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig, dict(panels)


def layer_heatmap(counts: pl.DataFrame, title: str) -> tuple[Figure, np.ndarray]:
    """Selected neurons per (emotion, layer), layer on x (Fig. 9); returns the count matrix."""
    matrix, emotions = layer_matrix(counts)
    n_layers = matrix.shape[1]
    fig = _figure(min(18.0, 2.5 + 0.45 * n_layers), 1.4 + 0.5 * len(emotions))
    ax = fig.subplots()
    image = _draw_layer_counts(ax, matrix, emotions)
    fig.colorbar(image, ax=ax, label="selected neurons")
    fig.suptitle(title)
    return fig, matrix


def layer_matrix(counts: pl.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(emotion x layer) selected-neuron counts of a ``layer_counts`` table, and the emotions."""
    emotions = order_emotions(counts["emotion"].to_list())
    n_layers = int(counts["layer"].max()) + 1
    matrix = np.zeros((len(emotions), n_layers), dtype=np.int64)
    for r in counts.iter_rows(named=True):
        matrix[emotions.index(r["emotion"]), r["layer"]] += r["count"]
    return matrix, emotions


def layer_panels(counts: Mapping[str, pl.DataFrame], title: str) -> tuple[Figure, dict[str, np.ndarray]]:
    """Fig. 9 across models: one panel per model (stacked), each over its own layers."""
    matrices = {name: layer_matrix(c) for name, c in counts.items()}
    widest = max(m.shape[1] for m, _ in matrices.values())
    height = sum(1.0 + 0.5 * len(e) for _, e in matrices.values()) + 0.6
    fig = _figure(min(18.0, 2.5 + 0.45 * widest), height)
    axes = fig.subplots(len(matrices), 1, squeeze=False)[:, 0]
    for ax, (name, (matrix, emotions)) in zip(axes, matrices.items()):
        image = _draw_layer_counts(ax, matrix, emotions)
        ax.set_title(f"{name} ({matrix.shape[1]} layers)", fontsize=10)
        fig.colorbar(image, ax=ax, label="selected neurons")
    fig.suptitle(title)
    return fig, {name: m for name, (m, _) in matrices.items()}


def _draw_layer_counts(ax, matrix: np.ndarray, emotions: Sequence[str]):
    n_layers = matrix.shape[1]
    image = ax.imshow(matrix, cmap=COUNT_CMAP, aspect="auto", vmin=0)
    if n_layers <= 40:
        top = matrix.max() or 1
        for (r, c), v in np.ndenumerate(matrix):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 * top else "white")
    ax.set_xticks(range(n_layers), [str(l) for l in range(n_layers)], fontsize=7)
    ax.set_yticks(range(len(emotions)), emotions)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mask emotion")
    return image


# ---------------------------------------------------------------------------- figure set


def _stat_series(effects: Effects, variants: Sequence[Variant], selector: str, judge: str, split: str = POOLED) -> dict:
    series = {}
    for stat in STATISTICS:
        triples = [effects.summary(v, selector, judge, split).get(stat, (None, None, None)) for v in variants]
        series[stat] = tuple(list(t) for t in zip(*triples))
    return series


def _ci_note(effects: Effects) -> str:
    return (f"Error bars: 95% paired-bootstrap CIs over source utterances (B={effects.n_boot}); "
            f"TEST-SEEN ∪ TEST-UNSEEN.")


def _heatmaps(effects: Effects, anc: Anchor) -> list[FigureSpec]:
    variant = anchor_variant(effects, anc)
    specs = []
    for selector in effects.selectors(variant):
        panels = [[(judge, effects.grid(variant, selector, judge)) for judge in effects.judges]]
        fig, mats = delta_heatmaps(panels, f"Δ emotion match, {selector.upper()} masks ({variant.describe()})")
        caption = (f"Per-emotion change in target-emotion match (pp) under {selector.upper()} masks vs. the "
                   f"unintervened baseline ({variant.describe()}); rows: mask emotion, columns: target emotion; "
                   f"diagonal = self-effects, off-diagonal = cross-effects; one panel per judge "
                   f"({', '.join(effects.judges)}). TEST-SEEN ∪ TEST-UNSEEN. Cf. paper Fig. 3 (right).")
        specs.append(FigureSpec(f"delta_heatmap_{selector}", fig, caption,
                                {"matrices": dict(zip(effects.judges, mats[0])),
                                 "grids": {j: g for j, g in panels[0]}}))
    return specs


def _sweep(effects: Effects, anc: Anchor, key: str, number: int) -> list[FigureSpec]:
    variants = sweep_variants(effects, anc, key)
    labels = [format_rate(v.rate) if key == "rate" else str(v.cap) for v in variants]
    symbol, what = ("r", "selection rate") if key == "rate" else ("c", "success-set cap")
    v0 = anc.variant
    parts = {"group": f"group {v0.group}", "cap": f"c={v0.cap}", "rate": f"r={format_rate(v0.rate)}",
             "method": method_label(v0)}
    fixed = ", ".join(text for k, text in parts.items() if k != key)
    lines = {j: _stat_series(effects, variants, anc.selector, j) for j in effects.judges}
    fig, data = effect_lines(labels, lines, f"Sensitivity to {what} {symbol} ({anc.selector.upper()})", f"{what} {symbol}")
    heat, mats = delta_heatmaps(
        [[(f"{j}: {symbol}={lab}", effects.grid(v, anc.selector, j)) for v, lab in zip(variants, labels)]
         for j in effects.judges],
        f"Δ emotion match across {symbol} ({anc.selector.upper()})",
    )
    base = f"{anc.selector.upper()} masks, {fixed}, {symbol} ∈ {{{', '.join(labels)}}}."
    return [
        FigureSpec(f"sweep_{key}", fig,
                   f"Self-effect, cross-effect average and self–cross gap (pp) against {what} {symbol}; {base} "
                   + _ci_note(effects) + f" Cf. paper Fig. {number}.", {"x": labels, "series": data}),
        FigureSpec(f"sweep_{key}_heatmaps", heat,
                   f"Δ emotion match heat maps (pp) per {what} {symbol}; rows of panels: judges; {base}"
                   f" Cf. paper Fig. {number}.",
                   {"x": labels, "matrices": mats}),
    ]


def _methods(effects: Effects, anc: Anchor) -> list[FigureSpec]:
    variants = strength_variants(effects, anc)
    if len({v.method for v in variants}) < 2:
        raise Skip(f"only one intervention method evaluated ({variants[0].method})")
    labels = [method_label(v) for v in variants]
    bars = {j: _stat_series(effects, variants, anc.selector, j) for j in effects.judges}
    fig, data = grouped_bars(labels, bars, f"Intervention methods ({anc.selector.upper()})", "intervention (α)")
    heat, mats = delta_heatmaps(
        [[(f"{j}: {lab}", effects.grid(v, anc.selector, j)) for v, lab in zip(variants, labels)] for j in effects.judges],
        f"Δ emotion match per intervention method ({anc.selector.upper()})",
    )
    v0 = anc.variant
    base = f"{anc.selector.upper()}, group {v0.group}, c={v0.cap}, r={format_rate(v0.rate)}; α is method-specific."
    return [
        FigureSpec("methods", fig, f"Self, cross and gap (pp) per intervention method; {base} " + _ci_note(effects) + " Cf. paper Fig. 6.",
                   {"x": labels, "series": data}),
        FigureSpec("methods_heatmaps", heat, f"Δ emotion match heat maps (pp) per intervention method; {base} Cf. paper Fig. 6.",
                   {"x": labels, "matrices": mats}),
    ]


def _alpha(effects: Effects, anc: Anchor) -> list[FigureSpec]:
    variants = [v for v in strength_variants(effects, anc) if v.method == anc.variant.method and v.alpha is not None]
    variants.sort(key=lambda v: v.alpha)
    if len(variants) < 2:
        raise Skip(f"fewer than two α values for method {anc.variant.method!r}")
    labels = [f"{v.alpha:g}" for v in variants]
    lines = {j: _stat_series(effects, variants, anc.selector, j) for j in effects.judges}
    fig, data = effect_lines(labels, lines, f"Sensitivity to intervention strength α ({anc.variant.method})", "α")
    heat, mats = delta_heatmaps(
        [[(f"{j}: α={lab}", effects.grid(v, anc.selector, j)) for v, lab in zip(variants, labels)] for j in effects.judges],
        f"Δ emotion match across α ({anc.selector.upper()}, {anc.variant.method})",
    )
    v0 = anc.variant
    base = f"{anc.selector.upper()}, {v0.method}, group {v0.group}, c={v0.cap}, r={format_rate(v0.rate)}."
    return [
        FigureSpec("sweep_alpha", fig, f"Self, cross and gap (pp) against α; {base} " + _ci_note(effects) + " Cf. paper Fig. 7 / Table 4.",
                   {"x": labels, "series": data}),
        FigureSpec("sweep_alpha_heatmaps", heat, f"Δ emotion match heat maps (pp) per α; {base} Cf. paper Fig. 7.",
                   {"x": labels, "matrices": mats}),
    ]


def _layers(mask_set: MaskSet, anc: Anchor) -> list[FigureSpec]:
    v = anc.variant
    records = {r["selector"]: r for r in mask_set.find(group=v.group, rate=v.rate, cap=v.cap)}
    if not records:
        raise Skip(f"no masks at group {v.group}, c={v.cap}, r={format_rate(v.rate)}")
    specs = []
    for selector in order_selectors(records, first=anc.selector):
        counts = mask_set.counts(records[selector])
        fig, matrix = layer_heatmap(counts, f"{selector.upper()} neurons per layer (group {v.group}, r={format_rate(v.rate)}, c={v.cap})")
        specs.append(FigureSpec(
            f"layers_{selector}", fig,
            f"Number of {selector.upper()}-selected neurons per decoder layer and mask emotion "
            f"(group {v.group}, c={v.cap}, r={format_rate(v.rate)}); where neurons concentrate, not effect size. Cf. paper Fig. 9.",
            {"counts": matrix, "emotions": order_emotions(counts["emotion"].to_list())},
        ))
    return specs


def _seen_unseen(effects: Effects, anc: Anchor) -> list[FigureSpec]:
    table = seen_unseen_table(effects, anc)
    categories = order_emotions(s for s in table["statistic"].to_list() if s not in STATISTICS)
    categories += [s for s in STATISTICS if s in table["statistic"].to_list()]
    panels = {}
    for judge in effects.judges:
        groups = {}
        for split in [s for s in effects.splits if s in table["split"].to_list()]:
            sub = table.filter((pl.col("judge") == judge) & (pl.col("split") == split))
            lookup = {r["statistic"]: (r["value_pp"], r["lo_pp"], r["hi_pp"]) for r in sub.iter_rows(named=True)}
            triples = [lookup.get(c, (None, None, None)) for c in categories]
            groups[SPLIT_LABELS.get(split, split)] = tuple(list(t) for t in zip(*triples))
        panels[judge] = groups
    fig, data = grouped_bars(categories, panels, f"Seen vs unseen speakers ({anc.describe()})",
                             "target emotion Δ(e, e) / summary")
    caption = (f"Δ emotion match (pp) of the anchor intervention ({anc.describe()}) on seen (TEST-SEEN) and "
               f"unseen (TEST-UNSEEN) speakers: per-target self-effect Δ(e, e) and self/cross/gap, with 95% "
               f"paired-bootstrap CIs (B={effects.n_boot}); one panel per judge. Cf. paper Fig. 10.")
    return [FigureSpec("seen_unseen", fig, caption, {"categories": categories, "series": data})]


def build_figures(
    evaluation: pl.DataFrame,
    masks: Sequence[Mapping[str, Any]],
    layouts: Mapping[str, NeuronLayout],
    anchor: Mapping[str, Any],
    n_boot: int = 1000,
    seed: int = 0,
) -> list[FigureSpec]:
    """Every figure the variants allow, drawn but not written (skips are logged)."""
    anc = Anchor.from_mapping(anchor)
    effects = Effects(evaluation, n_boot=n_boot, seed=seed)
    mask_set = MaskSet(masks, layouts)
    builders = {
        "fig3 (Δ heat maps)": lambda: _heatmaps(effects, anc),
        "fig4 (rate sweep)": lambda: _sweep(effects, anc, "rate", 4),
        "fig5 (cap sweep)": lambda: _sweep(effects, anc, "cap", 5),
        "fig6 (methods)": lambda: _methods(effects, anc),
        "fig7 (α sweep)": lambda: _alpha(effects, anc),
        "fig9 (layers)": lambda: _layers(mask_set, anc),
        "fig10 (seen vs unseen)": lambda: _seen_unseen(effects, anc),
    }
    specs: list[FigureSpec] = []
    for name, build in builders.items():
        try:
            specs += build()
        except Skip as why:
            log.warning("%s not drawn: %s", name, why)
    return specs


def save_figure(spec: FigureSpec, out_dir) -> list[Path]:
    """``<name>.png`` (150 dpi), ``<name>.svg`` and ``captions/<name>.rst``, each written atomically."""
    out_dir = Path(out_dir)
    paths = []
    for fmt in ("png", "svg"):
        path = out_dir / f"{spec.name}.{fmt}"
        with atomic_path(path) as tmp:
            # "tight" keeps long suptitles inside the image instead of cropping them.
            spec.figure.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(path)
    caption = out_dir / "captions" / f"{spec.name}.rst"
    with atomic_path(caption) as tmp:
        tmp.write_text(spec.caption.strip() + "\n", encoding="utf-8")
    paths.append(caption)
    return paths


def write_figures(
    evaluation: pl.DataFrame,
    masks: Sequence[Mapping[str, Any]],
    layouts: Mapping[str, NeuronLayout],
    anchor: Mapping[str, Any],
    out_dir,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Path]:
    """Draw and write every figure the variants allow; returns the PNG, SVG and caption paths."""
    written: list[Path] = []
    for spec in build_figures(evaluation, masks, layouts, anchor, n_boot=n_boot, seed=seed):
        written += save_figure(spec, out_dir)
    return written
