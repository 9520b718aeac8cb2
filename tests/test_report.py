"""Tables (esn_core.report) and figures (esn_core.plots) on a hand-made evaluation table.

Two sources (s1 on TEST-SEEN, s2 on TEST-UNSEEN), four targets, baseline + CAS with four mask
emotions, judges 'e2v' and 'qwen3'. Judge e2v:

    baseline hits   s1: happy          s2: happy, sad
                 -> baseline match happy 100, angry 0, sad 50, surprise 0 (pooled)
    CAS             every diagonal cell hit by both sources, every off-diagonal cell 'neutral'

so Δ(e, e) = 100 − base(e) = [0, 100, 50, 100] and Δ(m, t≠m) = −base(t):

    rows e_mask, columns e_tgt (happy, angry, sad, surprise)
        happy     [   0,    0,  -50,    0]
        angry     [-100,  100,  -50,    0]
        sad       [-100,    0,   50,    0]
        surprise  [-100,    0,  -50,  100]

self = 250/4 = 62.5, cross = (3·-100 + 3·-50)/12 = -37.5, gap = 100. Under the bootstrap only
the sad baseline varies (b = share of s1/s2 draws that hit sad ∈ {0, ½, 1}):
self = 75 − 25b, cross = −25 − 25b, gap = 100, so the 95% CIs are [50, 75], [−50, −25],
[100, 100] (each extreme draw has probability ¼, far above 2.5%).

Judge qwen3 says 'neutral' everywhere except s1's baseline angry attempt: baseline angry 50,
others 0; CAS Δ(angry, ·) columns −50, so self = −50/4 = −12.5, cross = −150/12 = −12.5, gap 0.

WER: baseline 1 error / 10 words per attempt (10 %), CAS 2 / 10 (20 %); MOS 4.0 vs 3.5.
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest

from esn_core.io import write_table
from esn_core.layout import NeuronLayout
from esn_core.plots import build_figures, delta_heatmaps, write_figures
from esn_core.report import Anchor, Effects, markdown_report, markdown_table, write_tables
from esn_core.select import Mask, masks_to_table

TARGETS = ("happy", "angry", "sad", "surprise")
SPLIT = {"s1": "test_seen", "s2": "test_unseen"}
ANCHOR = {"selector": "cas", "rate": 0.005, "cap": 50, "group": "lm", "method": "steer", "alpha": 1.0}
LAYOUT = NeuronLayout((4, 4, 4))
N_BOOT = 200

EXPECTED_GRID = np.array(
    [
        [0, 0, -50, 0],
        [-100, 100, -50, 0],
        [-100, 0, 50, 0],
        [-100, 0, -50, 100],
    ],
    dtype=float,
)

BASELINE_HITS = {"e2v": {("s1", "happy"), ("s2", "happy"), ("s2", "sad")}, "qwen3": {("s1", "angry")}}


def _e2v_label(target: str) -> str:
    return "吃惊/surprised" if target == "surprise" else target  # raw emotion2vec spelling


def _rows(variant: dict, cas_hit=lambda mask, target: mask == target, judges=("e2v", "qwen3")) -> list[dict]:
    rows = []
    for judge in judges:
        for source, split in SPLIT.items():
            common = {"judge": judge, **variant, "split": split, "source_id": source, "speaker": source,
                      "ref_words": 10, "mos_estimator": "proxy"}
            for target in TARGETS:
                hit = (source, target) in BASELINE_HITS[judge]
                rows.append({**common, "condition": "baseline", "mask_emotion": None, "target_emotion": target,
                             "label": _e2v_label(target) if hit else "neutral", "word_errors": 1, "mos": 4.0})
                for mask in TARGETS:
                    hit = judge == "e2v" and cas_hit(mask, target)
                    rows.append({**common, "condition": "cas", "mask_emotion": mask, "target_emotion": target,
                                 "label": _e2v_label(target) if hit else "neutral", "word_errors": 2, "mos": 3.5})
    return rows


def _variant(**changes) -> dict:
    v = {k: ANCHOR[k] for k in ("cap", "group", "rate", "method", "alpha")}
    return {**v, **changes}


def _evaluation(*row_lists) -> pl.DataFrame:
    rows = [r for rl in (row_lists or [_rows(_variant())]) for r in rl]
    return pl.DataFrame(rows, schema_overrides={"mask_emotion": pl.Utf8, "mos": pl.Float64}, infer_schema_length=None)


def _mask(selector: str, emotion: str, flat: list[int]) -> Mask:
    return Mask(selector, emotion, flat, np.arange(len(flat), 0, -1, dtype=float), 4)


@pytest.fixture
def masks(tmp_path) -> list[dict]:
    """CAS: happy {0,1,4,5}, angry {2,3,6}, sad {8..11}, surprise {7}; LAP: happy {0,1,8,9}, angry {2,3,6}."""
    sets = {
        "cas": {"happy": [0, 1, 4, 5], "angry": [2, 3, 6], "sad": [8, 9, 10, 11], "surprise": [7]},
        "lap": {"happy": [0, 1, 8, 9], "angry": [2, 3, 6]},
    }
    records = []
    for selector, per_emotion in sets.items():
        path = tmp_path / "masks" / f"{selector}.parquet"
        table = masks_to_table([_mask(selector, e, f) for e, f in per_emotion.items()], LAYOUT)
        write_table(table, path, "masks")
        records.append({"selector": selector, "group": "lm", "rate": 0.005, "cap": 50, "path": str(path)})
    return records


def _written(paths, name):
    return pl.read_parquet(next(p for p in paths if p.name == f"{name}.parquet"))


def test_table3_self_cross_gap_with_cis(tmp_path, masks):
    paths = write_tables(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, tmp_path / "tables", n_boot=N_BOOT)
    t3 = _written(paths, "table3_selectors")
    assert t3["selector"].to_list() == ["cas"]
    r = t3.row(0, named=True)
    assert (r["self_e2v"], r["cross_e2v"], r["gap_e2v"]) == pytest.approx((62.5, -37.5, 100.0))
    assert (r["self_e2v_lo"], r["self_e2v_hi"]) == pytest.approx((50.0, 75.0))
    assert (r["cross_e2v_lo"], r["cross_e2v_hi"]) == pytest.approx((-50.0, -25.0))
    assert (r["gap_e2v_lo"], r["gap_e2v_hi"]) == pytest.approx((100.0, 100.0))
    assert (r["self_qwen3"], r["cross_qwen3"], r["gap_qwen3"]) == pytest.approx((-12.5, -12.5, 0.0))
    assert (r["wer_pct"], r["wer_delta_pp"]) == pytest.approx((20.0, 10.0))
    assert (r["mos_mean"], r["mos_delta"]) == pytest.approx((3.5, -0.5))
    assert (r["mask_size_mean"], r["mask_size_min"], r["mask_requested"], r["n_sources"]) == (3.0, 1, 4, 2)
    md = (tmp_path / "tables" / "table3_selectors.md").read_text()
    assert "+62.50 [+50.00, +75.00]" in md and "+100.00 [+100.00, +100.00]" in md
    csv = pl.read_csv(tmp_path / "tables" / "table3_selectors.csv")
    assert csv["self_e2v"].to_list() == pytest.approx([62.5])


def test_delta_grid_and_seen_unseen(tmp_path, masks):
    paths = write_tables(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, tmp_path, n_boot=N_BOOT)
    grid = _written(paths, "delta_grid").filter((pl.col("judge") == "e2v") & (pl.col("split") == "all"))
    assert grid.height == 16
    emotions = list(TARGETS)
    for r in grid.iter_rows(named=True):
        expected = EXPECTED_GRID[emotions.index(r["mask_emotion"]), emotions.index(r["target_emotion"])]
        assert r["delta_pp"] == pytest.approx(expected)
        assert r["lo_pp"] <= r["delta_pp"] <= r["hi_pp"]
    # per split, one source each: TEST-SEEN baseline (s1) hits happy only, so Δ(sad, sad) = 100
    seen = _written(paths, "seen_unseen").filter(pl.col("judge") == "e2v")
    value = {(r["split"], r["statistic"]): r["value_pp"] for r in seen.iter_rows(named=True)}
    assert value[("test_seen", "sad")] == pytest.approx(100.0)
    assert value[("test_unseen", "sad")] == pytest.approx(0.0)
    assert value[("test_seen", "self")] == pytest.approx(75.0)
    assert value[("test_unseen", "cross")] == pytest.approx(-50.0)


def test_table2_baseline_match_per_judge(tmp_path, masks):
    paths = write_tables(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, tmp_path, n_boot=N_BOOT)
    t2 = _written(paths, "table2_baseline")
    assert t2["split"].unique(maintain_order=True).to_list() == ["test_seen", "test_unseen", "all"]
    pooled = {r["target_emotion"]: r for r in t2.filter(pl.col("split") == "all").iter_rows(named=True)}
    assert [pooled[t]["match_e2v"] for t in TARGETS] == pytest.approx([100.0, 0.0, 50.0, 0.0])
    assert [pooled[t]["match_qwen3"] for t in TARGETS] == pytest.approx([0.0, 50.0, 0.0, 0.0])
    assert (pooled["avg"]["match_e2v"], pooled["avg"]["match_qwen3"]) == pytest.approx((37.5, 12.5))
    assert pooled["avg"]["wer_pct"] == pytest.approx(10.0) and pooled["avg"]["n"] == 8
    assert pooled["happy"]["mos_mean"] == pytest.approx(4.0) and pooled["happy"]["mos_estimator"] == "proxy"
    seen = {r["target_emotion"]: r["match_e2v"] for r in t2.filter(pl.col("split") == "test_seen").iter_rows(named=True)}
    assert seen["sad"] == 0.0 and seen["happy"] == 100.0


def test_table5_on_hand_masks(tmp_path, masks):
    paths = write_tables(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, tmp_path, n_boot=N_BOOT)
    t5 = {r["emotion"]: r for r in _written(paths, "table5_masks").iter_rows(named=True)}
    assert set(t5) == {"happy", "angry", "average"}  # emotions both selectors have
    happy = t5["happy"]  # |∩| = |{0,1}| = 2, |∪| = 6; layers CAS [.5,.5,0] vs LAP [.5,0,.5]
    assert (happy["selector_a"], happy["selector_b"]) == ("cas", "lap")  # anchor selector is A
    assert (happy["jaccard"], happy["direct_match"], happy["jsd"]) == pytest.approx((1 / 3, 0.5, 0.5))
    assert (t5["angry"]["jaccard"], t5["angry"]["direct_match"], t5["angry"]["jsd"]) == pytest.approx((1, 1, 0))
    assert (t5["average"]["jaccard"], t5["average"]["jsd"]) == pytest.approx((2 / 3, 0.25))
    loc = _written(paths, "localisation").filter((pl.col("selector") == "cas") & (pl.col("emotion") == "happy"))
    assert loc.sort("layer")["count"].to_list() == [2, 2, 0]


def test_missing_variants_are_skipped_and_logged(tmp_path, masks, caplog):
    with caplog.at_level(logging.WARNING, logger="esn_core.report"):
        paths = write_tables(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, tmp_path, n_boot=N_BOOT)
    names = {p.stem for p in paths}
    assert {"table4_strength", "table6_synth", "sweep_rate", "sweep_cap"}.isdisjoint(names)
    assert {"table2_baseline", "table3_selectors", "table5_masks", "delta_grid", "effects", "localisation"} <= names
    assert "table6_synth not written: no synth-group variant" in caplog.text
    assert not (tmp_path / "table6_synth.parquet").exists()
    assert {p.suffix for p in paths} == {".parquet", ".csv", ".md"}


def test_rate_sweep_and_synth_table(tmp_path, masks):
    # r = 1%: CAS never hits, so Δ = −base everywhere: self = cross = (−100 − 50)/4 = −37.5, gap 0
    never = _rows(_variant(rate=0.01), cas_hit=lambda m, t: False)
    synth = _rows(_variant(group="synth"), cas_hit=lambda m, t: False)
    evaluation = _evaluation(_rows(_variant()), never, synth)
    paths = write_tables(evaluation, masks, {"lm": LAYOUT}, ANCHOR, tmp_path, n_boot=N_BOOT)
    sweep = _written(paths, "sweep_rate")
    assert sweep["rate"].to_list() == pytest.approx([0.005, 0.01])
    assert sweep["self_e2v"].to_list() == pytest.approx([62.5, -37.5])
    assert sweep["gap_e2v"].to_list() == pytest.approx([100.0, 0.0])
    t6 = _written(paths, "table6_synth")
    assert t6["gap_e2v"].to_list() == pytest.approx([0.0]) and t6["mask_size_mean"].to_list() == [None]
    specs = {s.name: s for s in build_figures(evaluation, masks, {"lm": LAYOUT}, ANCHOR, n_boot=N_BOOT)}
    lines = specs["sweep_rate"].data["series"]["e2v"]
    assert lines["self"][0] == pytest.approx([62.5, -37.5])
    assert specs["sweep_rate"].data["x"] == ["0.5%", "1%"]


def test_heatmap_annotations_equal_delta_grid(masks):
    specs = {s.name: s for s in build_figures(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, n_boot=N_BOOT)}
    heat = specs["delta_heatmap_cas"]
    np.testing.assert_allclose(heat.data["matrices"]["e2v"], EXPECTED_GRID)
    ax = heat.figure.axes[0]
    texts = [float(t.get_text()) for t in ax.texts]
    np.testing.assert_allclose(texts, EXPECTED_GRID.ravel())  # row-major: e_mask rows, e_tgt columns
    assert [t.get_text() for t in ax.get_yticklabels()] == list(TARGETS)
    assert ax.get_xlabel() == "target emotion (e_tgt)" and ax.get_ylabel() == "mask emotion (e_mask)"
    assert heat.figure._suptitle.get_text()
    image = ax.images[0]
    assert image.norm.vmin == -image.norm.vmax  # diverging scale centred at 0
    counts = specs["layers_cas"].data["counts"]  # emotions happy, angry, sad, surprise x 3 layers
    np.testing.assert_array_equal(counts, [[2, 2, 0], [2, 1, 0], [0, 0, 4], [0, 1, 0]])
    seen = specs["seen_unseen"].data
    assert seen["categories"] == [*TARGETS, "self", "cross", "gap"]
    assert seen["series"]["e2v"]["TEST-SEEN"][0][2] == pytest.approx(100.0)  # Δ(sad, sad) on s1


def test_delta_heatmaps_blank_for_missing_cells():
    grid = pl.DataFrame({"mask_emotion": ["happy", "sad"], "target_emotion": ["happy", "happy"], "delta_pp": [3.0, -1.5]})
    fig, mats = delta_heatmaps([[("one", grid)]], "title")
    assert mats[0][0].shape == (2, 1)
    assert [t.get_text() for t in fig.axes[0].texts] == ["+3.0", "-1.5"]


def test_write_figures_png_svg_and_captions(tmp_path, masks):
    out = tmp_path / "figures"
    paths = write_figures(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, out, n_boot=N_BOOT)
    pngs = [p for p in paths if p.suffix == ".png"]
    assert {p.stem for p in pngs} == {"delta_heatmap_cas", "layers_cas", "layers_lap", "seen_unseen"}
    for png in pngs:
        blob = png.read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 1000
        assert png.with_suffix(".svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")
        caption = (out / "captions" / f"{png.stem}.rst").read_text(encoding="utf-8")
        assert len(caption.strip()) > 40
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_markdown_report_headline(tmp_path, masks):
    write_tables(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, tmp_path / "tables", n_boot=N_BOOT)
    write_figures(_evaluation(), masks, {"lm": LAYOUT}, ANCHOR, tmp_path / "figures", n_boot=N_BOOT)
    text = markdown_report(tmp_path / "tables", tmp_path / "figures")
    assert "Anchor: CAS, group lm, c=50, r=0.5%, steer α=1" in text
    assert "| e2v | +62.50 [+50.00, +75.00] | -37.50 [-50.00, -25.00] | +100.00 [+100.00, +100.00] |" in text
    assert "| qwen3 | -12.50" in text
    assert "| happy | 100.00 | 0.00 | 10.00 | 4.00 |" in text  # Table 2, pooled: e2v, qwen3, WER, MOS
    assert "WER 20.00% (Δ +10.00 pp)" in text
    assert "![delta_heatmap_cas](figures/delta_heatmap_cas.png)" in text
    assert "table4_strength" in text.split("Not produced")[1]


def test_effects_rejects_incomplete_table():
    with pytest.raises(ValueError, match="missing column"):
        Effects(_evaluation().drop("cap"))
    with pytest.raises(ValueError, match="anchor: missing key"):
        Anchor.from_mapping({"selector": "cas"})


def test_markdown_table_merges_ci_columns():
    df = pl.DataFrame({"selector": ["cas"], "self_x": [1.5], "self_x_lo": [-0.25], "self_x_hi": [3.0], "n": [4]})
    assert markdown_table(df).splitlines() == [
        "| selector | self_x | n |", "|---|---|---|", "| cas | +1.50 [-0.25, +3.00] | 4 |",
    ]


def test_table5_compares_an_empty_cas_mask(tmp_path):
    # a CAS mask is empty when no neuron has its emotion on top: overlaps are defined, JSD is not
    records = []
    for selector, per_emotion in {"cas": {"happy": [0, 1], "surprise": []},
                                  "lap": {"happy": [0, 4], "surprise": [7, 8]}}.items():
        path = tmp_path / "masks" / f"{selector}.parquet"
        write_table(masks_to_table([_mask(selector, e, f) for e, f in per_emotion.items()], LAYOUT), path, "masks")
        records.append({"selector": selector, "group": "lm", "rate": 0.005, "cap": 50, "path": str(path)})
    paths = write_tables(_evaluation(), records, {"lm": LAYOUT}, ANCHOR, tmp_path / "tables", n_boot=N_BOOT)
    t5 = {r["emotion"]: r for r in _written(paths, "table5_masks").iter_rows(named=True)}
    surprise = t5["surprise"]
    assert (surprise["size_a"], surprise["jaccard"], surprise["direct_match"]) == (0, 0.0, 0.0)
    assert surprise["jsd"] is None
    assert t5["average"]["jaccard"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert t5["average"]["jsd"] == pytest.approx(t5["happy"]["jsd"])  # the undefined one is left out
