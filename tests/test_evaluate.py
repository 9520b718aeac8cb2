"""Evaluation metrics (SPEC §7): rates, Δ grid, self/cross/gap, paired bootstrap, masks."""

import math

import numpy as np
import polars as pl
import pytest

from esn_core.evaluate import (
    bootstrap_grid,
    delta_grid,
    jensen_shannon_base2,
    layer_counts,
    mask_comparison,
    mask_indices,
    match_rates,
    paired_bootstrap_ci,
    self_cross_gap,
)
from esn_core.layout import NeuronLayout


def _cell(condition, mask, target, outcomes, word_errors=None, ref_words=4, mos=None, sources=None):
    """One condition's attempts: outcome i True = source i judged as the target."""
    k = len(outcomes)
    return pl.DataFrame(
        {
            "source_id": sources or [f"s{i:02d}" for i in range(k)],
            "condition": [condition] * k,
            "mask_emotion": [mask] * k,
            "target_emotion": [target] * k,
            "label": [target if hit else "neutral" for hit in outcomes],
            "word_errors": word_errors or [0] * k,
            "ref_words": [ref_words] * k,
            "mos": mos or [4.0] * k,
        },
        schema_overrides={"mask_emotion": pl.Utf8, "mos": pl.Float64},
    )


def _two_by_two() -> pl.DataFrame:
    """Baseline happy 25 %, sad 50 %; CAS cells worked out in test_delta_grid."""
    return pl.concat(
        [
            _cell("baseline", None, "happy", [1, 0, 0, 0], word_errors=[0, 1, 2, 3], mos=[4.0, 3.0, None, 5.0]),
            _cell("baseline", None, "sad", [1, 1, 0, 0]),
            _cell("CAS", "happy", "happy", [1, 1, 1, 0]),
            _cell("CAS", "happy", "sad", [1, 0, 1, 0]),
            _cell("CAS", "sad", "happy", [0, 0, 0, 0]),
            _cell("CAS", "sad", "sad", [1, 1, 1, 1], word_errors=[20, 0, 0, 0]),
            _cell("LAP", "happy", "happy", [0, 0, 0, 0]),
        ]
    )


def test_match_rates_per_condition():
    rates = match_rates(_two_by_two())
    assert rates.columns == ["condition", "mask_emotion", "target_emotion", "n", "match_pct", "wer_pct", "mos_mean"]
    assert rates["condition"].to_list()[:2] == ["baseline", "baseline"]
    rows = {(r["condition"], r["mask_emotion"], r["target_emotion"]): r for r in rates.iter_rows(named=True)}
    base_happy = rows[("baseline", None, "happy")]
    assert base_happy["n"] == 4
    assert base_happy["match_pct"] == pytest.approx(25.0)
    assert base_happy["wer_pct"] == pytest.approx(100 * 6 / 16)  # (0+1+2+3) / (4·4)
    assert base_happy["mos_mean"] == pytest.approx(4.0)  # null MOS ignored: (4+3+5)/3
    # one hallucinated answer: corpus WER over 100 %
    assert rows[("CAS", "sad", "sad")]["wer_pct"] == pytest.approx(100 * 20 / 16)
    assert rows[("CAS", "sad", "sad")]["match_pct"] == pytest.approx(100.0)


def test_match_uses_the_judge_label_mapping():
    df = _cell("baseline", None, "surprise", [1, 1, 0]).with_columns(
        pl.Series("label", ["吃惊/surprised", "surprised", "fearful"])
    )
    assert match_rates(df)["match_pct"][0] == pytest.approx(200 / 3)


def test_delta_grid_and_self_cross_gap_by_hand():
    grid = delta_grid(_two_by_two(), "CAS")
    assert grid.select("mask_emotion", "target_emotion").rows() == [
        ("happy", "happy"), ("happy", "sad"), ("sad", "happy"), ("sad", "sad"),
    ]
    # match: 75, 50, 0, 100; baselines: happy 25, sad 50
    assert grid["match_pct"].to_list() == pytest.approx([75.0, 50.0, 0.0, 100.0])
    assert grid["baseline_pct"].to_list() == pytest.approx([25.0, 50.0, 25.0, 50.0])
    assert grid["delta_pp"].to_list() == pytest.approx([50.0, 0.0, -25.0, 50.0])
    summary = self_cross_gap(grid)
    assert summary["self"] == pytest.approx(50.0)  # (50 + 50) / 2
    assert summary["cross"] == pytest.approx(-12.5)  # (0 − 25) / 2
    assert summary["gap"] == pytest.approx(62.5)


def test_delta_grid_errors_name_what_is_missing():
    df = _two_by_two()
    with pytest.raises(ValueError, match=r"no rows for selector 'MAD'.*\['CAS', 'LAP'\]"):
        delta_grid(df, "MAD")
    with pytest.raises(ValueError, match="no baseline attempts for target 'sad'"):
        delta_grid(df.filter(~((pl.col("condition") == "baseline") & (pl.col("target_emotion") == "sad"))), "CAS")
    with pytest.raises(ValueError, match="mask_emotion 'happy'"):
        delta_grid(pl.concat([df, _cell("baseline", "happy", "sad", [1])]), "CAS")
    with pytest.raises(ValueError, match="'target_emotion' has value 'joy'"):
        delta_grid(pl.concat([df, _cell("CAS", "happy", "joy", [1])]), "CAS")
    with pytest.raises(ValueError, match="self"):
        self_cross_gap(delta_grid(df, "LAP"))


def _random_table(n_sources=30, seed=0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    cells = [_cell("baseline", None, t, list(rng.random(n_sources) < 0.3)) for t in ("happy", "sad")]
    for m in ("happy", "sad"):
        for t in ("happy", "sad"):
            cells.append(_cell("CAS", m, t, list(rng.random(n_sources) < (0.6 if m == t else 0.3))))
    return pl.concat(cells)


def test_bootstrap_ci_contains_the_point_estimate_and_matches_the_grid():
    df = _random_table()
    grid = delta_grid(df, "CAS")
    for row in grid.iter_rows(named=True):
        delta, lo, hi = paired_bootstrap_ci(df, "CAS", row["mask_emotion"], row["target_emotion"], n_boot=500, seed=1)
        assert delta == pytest.approx(row["delta_pp"])
        assert lo <= delta <= hi
        assert hi - lo > 0


def test_bootstrap_is_deterministic_for_a_seed():
    df = _random_table()
    first = paired_bootstrap_ci(df, "CAS", "happy", "happy", n_boot=300, seed=42)
    assert paired_bootstrap_ci(df, "CAS", "happy", "happy", n_boot=300, seed=42) == first
    assert paired_bootstrap_ci(df, "CAS", "happy", "happy", n_boot=300, seed=43) != first


def test_bootstrap_is_zero_width_when_every_source_agrees():
    df = pl.concat([_cell("baseline", None, "sad", [0] * 12), _cell("CAS", "sad", "sad", [1] * 12)])
    assert paired_bootstrap_ci(df, "CAS", "sad", "sad", n_boot=200) == (100.0, 100.0, 100.0)


def test_pairing_makes_the_interval_tight_where_unpaired_is_wide():
    # 20 easy sources match in both conditions, 20 hard ones in neither, 2 flip to a match
    # under the intervention: source difficulty dominates the variance unless it is paired.
    baseline = [1] * 20 + [0] * 20 + [0, 0]
    intervened = [1] * 20 + [0] * 20 + [1, 1]
    df = pl.concat([_cell("baseline", None, "happy", baseline), _cell("CAS", "happy", "happy", intervened)])
    delta, lo, hi = paired_bootstrap_ci(df, "CAS", "happy", "happy", n_boot=2000, seed=0)
    assert delta == pytest.approx(100 * 2 / 42)

    rng = np.random.default_rng(0)
    n = len(baseline)
    draw_b = np.asarray(baseline)[rng.integers(0, n, size=(2000, n))].mean(axis=1)
    draw_i = np.asarray(intervened)[rng.integers(0, n, size=(2000, n))].mean(axis=1)
    unpaired_lo, unpaired_hi = np.percentile(100 * (draw_i - draw_b), [2.5, 97.5])

    assert lo >= 0.0  # a paired difference can never be negative here: no source got worse
    assert hi - lo < 15.0
    assert unpaired_hi - unpaired_lo > 30.0
    assert unpaired_lo < 0.0


def test_grid_bootstrap_agrees_with_the_single_cell_and_summarises():
    df = _random_table(seed=3)
    result = bootstrap_grid(df, "CAS", n_boot=400, seed=9)
    point = delta_grid(df, "CAS")
    assert result.grid.select("mask_emotion", "target_emotion").rows() == point.select(
        "mask_emotion", "target_emotion"
    ).rows()
    assert result.grid["delta_pp"].to_list() == pytest.approx(point["delta_pp"].to_list())
    for row in result.grid.iter_rows(named=True):
        single = paired_bootstrap_ci(df, "CAS", row["mask_emotion"], row["target_emotion"], n_boot=400, seed=9)
        assert single == pytest.approx((row["delta_pp"], row["lo_pp"], row["hi_pp"]))

    expected = self_cross_gap(point)
    summary = {r["statistic"]: r for r in result.summary.iter_rows(named=True)}
    assert list(summary) == ["self", "cross", "gap"]
    for name in ("self", "cross", "gap"):
        assert summary[name]["value_pp"] == pytest.approx(expected[name])
        assert summary[name]["lo_pp"] <= summary[name]["value_pp"] <= summary[name]["hi_pp"]


def test_grid_bootstrap_summary_is_exact_when_outcomes_are_constant():
    df = pl.concat(
        [
            _cell("baseline", None, "happy", [0] * 6),
            _cell("baseline", None, "sad", [1] * 6),
            _cell("CAS", "happy", "happy", [1] * 6),  # +100
            _cell("CAS", "sad", "sad", [1] * 6),  # 0
            _cell("CAS", "happy", "sad", [0] * 6),  # −100
            _cell("CAS", "sad", "happy", [0] * 6),  # 0
        ]
    )
    summary = bootstrap_grid(df, "CAS", n_boot=50).summary.rows()
    assert summary == [("self", 50.0, 50.0, 50.0), ("cross", -50.0, -50.0, -50.0), ("gap", 100.0, 100.0, 100.0)]


def test_bootstrap_refuses_unpaired_sources():
    df = pl.concat(
        [_cell("baseline", None, "sad", [1, 0, 1]), _cell("CAS", "sad", "sad", [1, 1], sources=["s00", "s01"])]
    )
    with pytest.raises(ValueError, match="source 's02' has no attempt in condition 'CAS'"):
        paired_bootstrap_ci(df, "CAS", "sad", "sad")
    with pytest.raises(ValueError, match="no attempts for selector 'CAS', mask 'happy'"):
        paired_bootstrap_ci(df, "CAS", "happy", "sad")


LAYOUT = NeuronLayout((4, 4, 4))


def test_identical_masks():
    got = mask_comparison([1, 5, 9, 10], [10, 9, 5, 1], LAYOUT)
    assert got == {"jaccard": 1.0, "direct_match": 1.0, "jsd": 0.0, "jsd_undefined": None}


def test_disjoint_masks_in_different_layers_have_jsd_one():
    got = mask_comparison([0, 1, 2], [4, 9, 10], LAYOUT)  # layer 0 vs layers 1 and 2
    assert got == {"jaccard": 0.0, "direct_match": 0.0, "jsd": 1.0, "jsd_undefined": None}


def test_same_layers_different_neurons_have_jsd_zero():
    got = mask_comparison([0, 4], [1, 5], LAYOUT)
    assert got["jaccard"] == 0.0 and got["jsd"] == 0.0


def test_hand_computed_jsd_and_overlap():
    # A = {0, 1} (both layer 0): p = (1, 0, 0); B = {0, 4}: q = (½, ½, 0); m = (¾, ¼, 0)
    got = mask_comparison([0, 1], [0, 4], LAYOUT)
    kl_p = math.log2(1 / 0.75)
    kl_q = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    assert got["jsd"] == pytest.approx(0.5 * kl_p + 0.5 * kl_q)  # ≈ 0.311
    assert got["jaccard"] == pytest.approx(1 / 3)
    assert got["direct_match"] == pytest.approx(1 / 2)
    # direct match is relative to A: |A∩B| / |A|
    assert mask_comparison([0], [0, 4], LAYOUT)["direct_match"] == 1.0


def test_jaccard_equals_d_over_two_minus_d_for_equal_size_masks():
    layout = NeuronLayout((30, 50, 20))
    rng = np.random.default_rng(7)
    for _ in range(300):
        k = int(rng.integers(1, 40))
        a = rng.choice(layout.n_neurons, size=k, replace=False)
        b = rng.choice(layout.n_neurons, size=k, replace=False)
        got = mask_comparison(a, b, layout)
        d = got["direct_match"]
        assert got["jaccard"] == pytest.approx(d / (2 - d))
        assert 0.0 <= got["jsd"] <= 1.0
        assert got["jsd"] == pytest.approx(mask_comparison(b, a, layout)["jsd"])  # symmetric


def test_jsd_treats_zero_mass_as_zero_contribution():
    assert jensen_shannon_base2([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0.0
    assert jensen_shannon_base2([1.0, 0.0], [0.0, 1.0]) == 1.0


def test_mask_comparison_of_empty_masks_gives_the_defined_values():
    # CAS masks may be legitimately empty (no neuron has the emotion on top).
    both = mask_comparison([], [], LAYOUT)
    assert both["jaccard"] == 1.0  # two empty sets are equal
    assert both["direct_match"] == 0.0  # |A∩B| / |A| with |A| = 0: nothing of A matched
    assert math.isnan(both["jsd"]) and "empty" in both["jsd_undefined"]
    a_empty = mask_comparison([], [1, 5], LAYOUT)
    assert a_empty["jaccard"] == 0.0 and a_empty["direct_match"] == 0.0
    assert math.isnan(a_empty["jsd"]) and "mask a is empty" in a_empty["jsd_undefined"]
    b_empty = mask_comparison([1, 5], [], LAYOUT)
    assert b_empty["jaccard"] == 0.0 and b_empty["direct_match"] == 0.0
    assert math.isnan(b_empty["jsd"]) and "mask b is empty" in b_empty["jsd_undefined"]
    assert mask_comparison([1], [1], LAYOUT)["jsd_undefined"] is None  # defined: no reason


def test_mask_comparison_rejects_bad_masks():
    with pytest.raises(ValueError, match="mask b lists 1 neuron"):
        mask_comparison([1], [2, 2], LAYOUT)
    with pytest.raises(IndexError):
        mask_comparison([1], [12], LAYOUT)


def _mask_table():
    return pl.DataFrame(
        {
            "emotion": ["sad", "happy", "happy", "happy"],
            "layer": [1, 0, 2, 0],
            "neuron": [3, 0, 1, 2],
            "score": [1.0, 0.9, 0.8, 0.7],
            "rank": [0, 0, 1, 2],
        },
        schema_overrides={"layer": pl.Int32, "neuron": pl.Int32, "rank": pl.Int32},
    )


def test_layer_counts_with_and_without_zero_fill():
    present = layer_counts(_mask_table())
    assert present.rows() == [(0, "happy", 2), (2, "happy", 1), (1, "sad", 1)]
    full = layer_counts(_mask_table(), n_layers=3)
    assert full.rows() == [
        (0, "happy", 2), (1, "happy", 0), (2, "happy", 1),
        (0, "sad", 0), (1, "sad", 1), (2, "sad", 0),
    ]
    with pytest.raises(ValueError, match="layer 2 >= n_layers=2"):
        layer_counts(_mask_table(), n_layers=2)


def test_mask_indices_flatten_a_mask_table():
    assert mask_indices(_mask_table(), "happy", LAYOUT).tolist() == [0, 2, 9]
    assert mask_indices(_mask_table(), "sad", LAYOUT).tolist() == [7]
    with pytest.raises(ValueError, match="'angry'"):
        mask_indices(_mask_table(), "angry", LAYOUT)


def test_all_null_columns_of_a_baseline_only_table_are_accepted():
    df = pl.DataFrame(
        {
            "source_id": ["a", "b"], "condition": ["baseline"] * 2, "mask_emotion": [None, None],
            "target_emotion": ["sad", "sad"], "label": [None, None],
            "word_errors": [0, 1], "ref_words": [3, 3], "mos": [None, None],
        }
    )
    row = match_rates(df).row(0, named=True)
    assert (row["n"], row["match_pct"], row["mos_mean"]) == (2, 0.0, None)
    assert row["wer_pct"] == pytest.approx(100 / 6)
