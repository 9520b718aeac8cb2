"""Several LALMs side by side, as the paper reports them (issue 19).

Built from each model's own outputs, never from their evaluation attempts, so adding or
removing a model redoes only this step:

- ``table2_baseline_models``: Table 2 with the models as column groups (``<model>.match_<judge>``,
  ``<model>.wer_pct``, ...), one row per (split, target emotion) as in each model's Table 2.
- ``table3_selectors_models``: Table 3 with the models as row groups (a ``model`` column first).
- ``layers_models``: Fig. 9 with one panel per model, each over its own decoder layers (the
  anchor selector's masks at the anchor cell).
- ``report.md``: each model's headline (anchor self / cross / gap per judge), both tables and
  the figure, with links to the per-model reports.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import polars as pl

from esn_core.io import atomic_path, read_frame, read_provenance
from esn_core.layout import NeuronLayout
from esn_core.report import POOLED, Anchor, MaskSet, Skip, format_rate, headline_lines, markdown_table, write_frame

log = logging.getLogger(__name__)

KEYS = ("split", "target_emotion")  # the rows of Table 2


def table2_models(per_model: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """Each model's Table 2 as a column group; rows in the order they first appear."""
    if not per_model:
        raise Skip("no model tables")
    rows: list[tuple] = []
    for frame in per_model.values():
        for key in frame.select(KEYS).iter_rows():
            if key not in rows:
                rows.append(key)
    out = pl.DataFrame(rows, schema={"split": pl.String, "target_emotion": pl.String}, orient="row")
    out = out.with_row_index("_order")
    for name, frame in per_model.items():
        values = [c for c in frame.columns if c not in KEYS]
        group = frame.select(*KEYS, *[pl.col(c).alias(f"{name}.{c}") for c in values])
        out = out.join(group, on=list(KEYS), how="left")
    return out.sort("_order").drop("_order")


def table3_models(per_model: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """Each model's Table 3 as a row group, models in config order, a ``model`` column first."""
    if not per_model:
        raise Skip("no model tables")
    parts = [frame.select(pl.lit(name).alias("model"), pl.all()) for name, frame in per_model.items()]
    return pl.concat(parts, how="diagonal_relaxed")


def anchor_layer_counts(masks: Mapping[str, str], anchor: Anchor) -> dict[str, pl.DataFrame]:
    """Per model: selected neurons per (layer, emotion) of its anchor mask, every layer of that
    model (its layout, from the mask's provenance) included."""
    v = anchor.variant
    out = {}
    for name, path in masks.items():
        layout = NeuronLayout(tuple(read_provenance(path)["layer_sizes"]))
        record = {"selector": anchor.selector, "group": v.group, "rate": v.rate, "cap": v.cap, "path": path}
        out[name] = MaskSet([record], {v.group: layout}).counts(record)
    return out


def write_cross_model(
    tables_dirs: Mapping[str, str],
    masks: Mapping[str, str],
    anchor: Mapping[str, Any],
    out_dir,
    figure,
    report,
) -> list[Path]:
    """Write both cross-model tables (Parquet + CSV + Markdown), the figure and the report."""
    from esn_core.plots import FigureSpec, layer_panels, save_figure

    anc = Anchor.from_mapping(anchor)
    table2 = {n: read_frame(Path(d) / "table2_baseline.parquet") for n, d in tables_dirs.items()}
    table3 = {n: read_frame(Path(d) / "table3_selectors.parquet") for n, d in tables_dirs.items()}
    provenance = {"anchor": anc.as_dict(), "models": list(tables_dirs)}
    written = write_frame(table2_models(table2), Path(out_dir), "table2_baseline_models",
                          "Table 2 — baseline EVC per model (column groups): target-emotion match % per judge, "
                          "corpus WER %, mean MOS", provenance)
    written += write_frame(table3_models(table3), Path(out_dir), "table3_selectors_models",
                           f"Table 3 — selectors at {anc.variant.describe()} per model (row groups); Δ in pp vs. "
                           "baseline, TEST-SEEN ∪ TEST-UNSEEN, 95% paired-bootstrap CIs", provenance)
    v = anc.variant
    counts = anchor_layer_counts(masks, anc)
    fig, data = layer_panels(counts, f"{anc.selector.upper()} neurons per layer by model "
                                     f"(group {v.group}, r={format_rate(v.rate)}, c={v.cap})")
    figure = Path(figure)
    caption = (f"Number of {anc.selector.upper()}-selected neurons per decoder layer and mask emotion, one panel "
               f"per model over its own layers (group {v.group}, c={v.cap}, r={format_rate(v.rate)}). Cf. paper "
               "Fig. 9.")
    written += save_figure(FigureSpec(figure.stem, fig, caption, {"counts": data}), figure.parent)
    text = cross_report(tables_dirs, table2_models(table2), table3_models(table3), figure, Path(report).parent)
    with atomic_path(report) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return [*written, Path(report)]


def cross_report(tables_dirs: Mapping[str, str], table2: pl.DataFrame, table3: pl.DataFrame, figure: Path,
                 base: Path) -> str:
    """results/report.md of a several-model run."""
    names = list(tables_dirs)
    lines = [f"# ESN results: {len(names)} models ({', '.join(names)})", ""]
    anchor_text = None
    for name, tables in tables_dirs.items():
        prov = read_provenance(Path(tables) / "table3_selectors.parquet")
        anc = Anchor.from_mapping(prov["anchor"])
        anchor_text = anchor_text or anc.describe()
        report = Path(tables).parent / "report.md"
        lines += [f"## {name}: headline (anchor intervention)", "",
                  *(headline_lines(read_frame(Path(tables) / "table3_selectors.parquet"), anc, prov.get("judges", []))
                    or ["No Table 3 row for the anchor selector.", ""]),
                  f"Full report: [{os.path.relpath(report, base)}]({Path(os.path.relpath(report, base)).as_posix()})",
                  ""]
    if anchor_text:
        lines[2:2] = [f"Anchor: {anchor_text}. Δ in pp vs. the unintervened baseline, TEST-SEEN ∪ TEST-UNSEEN, "
                      "95% paired-bootstrap CIs over source utterances.", ""]
    pooled = table2.filter(pl.col("split") == POOLED).drop("split")
    pooled = pooled.select([c for c in pooled.columns if pooled[c].null_count() < pooled.height])  # no all-— columns
    lines += ["## Baseline per model (Table 2, all test splits)", "", markdown_table(pooled),
              "## Selectors per model (Table 3)", "", markdown_table(table3),
              "## Emotion-sensitive neurons per layer (Fig. 9)", "",
              f"![{figure.stem}]({Path(os.path.relpath(figure, base)).as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"
