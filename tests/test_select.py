"""Selectors of SPEC §4-5 on hand-computed activation-probability matrices.

The main fixture is 2 layers x 3 neurons (flat 0..5) and the four targets; every P is a
multiple of 1/8 so means, margins and deviations are exact in binary floating point and
ties are real ties. P in eighths (rows happy, angry, sad, surprise):

    flat:      0  1  2  3  4  5
    happy      7  4  2  7  0  3
    angry      1  4  6  1  0  3
    sad        1  2  3  1  0  6
    surprise   1  0  1  1  0  3
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from esn_core.io import read_table, write_table
from esn_core.layout import NeuronLayout
from esn_core.select import (
    ActivationProbabilities,
    Mask,
    lape_pool,
    lape_threshold,
    layer_indices,
    masks_from_table,
    masks_to_table,
    n_candidates,
    n_selected,
    normalised_entropy_terms,
    select,
    select_cas,
    select_lape,
    select_random,
    top_k_stable,
)

FOUR = ("happy", "angry", "sad", "surprise")
EIGHTHS = np.array(
    [
        [7, 4, 2, 7, 0, 3],
        [1, 4, 6, 1, 0, 3],
        [1, 2, 3, 1, 0, 6],
        [1, 0, 1, 1, 0, 3],
    ]
)
LAYOUT = NeuronLayout((3, 3))


@pytest.fixture
def probs() -> ActivationProbabilities:
    return ActivationProbabilities(FOUR, EIGHTHS / 8.0, LAYOUT)


def indices(masks: dict[str, Mask]) -> dict[str, list[int]]:
    return {e: m.indices.tolist() for e, m in masks.items()}


# --------------------------------------------------------------------------- sizes, ranking


def test_n_selected_floors_the_written_decimal():
    assert n_selected(0.005, 530_432) == 2652  # 2652.16
    assert n_selected(0.29, 100) == 29  # binary 0.29 * 100 = 28.999999999999996
    assert n_selected(0.5, 6) == 3
    assert n_selected(0.1, 6) == 0
    assert n_candidates(0.005, 530_432) == 13_260  # floor(0.025 * 530432 = 13260.8)
    assert n_candidates(0.3, 10) == 10  # min(1, 5r) caps at N


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "0.5"])
def test_selection_rate_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="selection rate r"):
        n_selected(bad, 10)


def test_top_k_stable_breaks_ties_by_lower_position():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 1.0])
    assert top_k_stable(scores, 2).tolist() == [1, 2]
    assert top_k_stable(scores, 4).tolist() == [1, 2, 4, 3]
    assert top_k_stable(scores, 5).tolist() == [1, 2, 4, 3, 0]
    assert top_k_stable(scores, 99).tolist() == [1, 2, 4, 3, 0, 5]
    assert top_k_stable(scores, 0).tolist() == []


def test_top_k_stable_equals_a_full_stable_sort_on_tie_heavy_data():
    rng = np.random.default_rng(7)
    for _ in range(50):
        scores = rng.integers(0, 5, size=200).astype(float)
        k = int(rng.integers(1, 200))
        full = np.lexsort((np.arange(scores.size), -scores))[:k]
        assert top_k_stable(scores, k).tolist() == full.tolist()


# --------------------------------------------------------------------------- inputs


def test_rows_are_stored_in_emotion_order(probs):
    shuffled = ActivationProbabilities(FOUR[::-1], EIGHTHS[::-1] / 8.0, LAYOUT)
    assert shuffled.emotions == FOUR
    np.testing.assert_array_equal(shuffled.P, probs.P)
    np.testing.assert_array_equal(shuffled.row("sad"), EIGHTHS[2] / 8.0)


def test_from_counts_drops_empty_success_sets_and_reports_them():
    counts = {
        "neutral": (np.zeros(6, dtype=np.int64), 0),
        "happy": (EIGHTHS[0], 8),
        "angry": (EIGHTHS[1] * 2, 16),
        "sad": (np.zeros(6, dtype=np.int64), 0),
    }
    probs, excluded = ActivationProbabilities.from_counts(counts, LAYOUT)
    assert excluded == ["neutral", "sad"]
    assert probs.emotions == ("happy", "angry")
    assert probs.excluded == ("neutral", "sad")
    np.testing.assert_array_equal(probs.P, EIGHTHS[:2] / 8.0)
    with pytest.raises(ValueError, match="'sad'.*success set is empty"):
        select("lap", probs, 0.5, targets=("happy", "sad"))
    with pytest.raises(ValueError, match="'surprise' has no activation probabilities"):
        select("lap", probs, 0.5, targets=("surprise",))


def test_from_counts_rejects_counts_above_T():
    with pytest.raises(ValueError, match="'happy'.*\\[0, T=3\\]"):
        ActivationProbabilities.from_counts({"happy": (EIGHTHS[0], 3)}, LAYOUT)


def test_nan_row_is_refused_with_the_emotion_named():
    P = EIGHTHS / 8.0
    P[2] = np.nan
    with pytest.raises(ValueError, match="'sad' contains NaN"):
        ActivationProbabilities(FOUR, P, LAYOUT)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        ActivationProbabilities(FOUR, EIGHTHS[:, :5] / 8.0, LAYOUT)


def test_unknown_selector_is_refused(probs):
    with pytest.raises(ValueError, match="unknown selector 'lapx'"):
        select("lapx", probs, 0.5)


# --------------------------------------------------------------------------- LAP, MAD


def test_lap_exact_masks_with_ties_by_lower_index(probs):
    masks = select("lap", probs, r=0.5, targets=FOUR)
    assert indices(masks) == {
        "happy": [0, 3, 1],
        "angry": [2, 1, 5],
        "sad": [5, 2, 1],
        "surprise": [5, 0, 2],  # 0, 2, 3 tie at 1/8: lowest two indices
    }
    np.testing.assert_array_equal(masks["happy"].scores, [7 / 8, 7 / 8, 4 / 8])
    assert all(m.requested == 3 and m.size == 3 and m.selector == "lap" for m in masks.values())


def test_mad_exact_masks(probs):
    # means in 32nds: 10, 10, 12, 10, 0, 15; P in 32nds = 4 * eighths
    masks = select("MAD", probs, r=0.5, targets=FOUR)
    assert indices(masks) == {
        "happy": [0, 3, 1],  # 18, 18, 6
        "angry": [2, 0, 1],  # 12, then 6 at flat 0, 1, 3
        "sad": [5, 0, 3],  # 9, 6, 6
        "surprise": [1, 2, 0],  # 10, 8, 6
    }
    np.testing.assert_array_equal(masks["angry"].scores, np.array([12, 6, 6]) / 32)


def test_mad_exact_tie_goes_to_the_lower_index_whatever_the_summation_order():
    # Columns 0 and 1 hold the same values in a different emotion order, so their means
    # are equal and happy's deviations |0.1 - 0.4| tie exactly: SPEC's rule picks flat 0.
    # A plain column sum rounds (0.1 + 0.1) + 1.0 and (0.1 + 1.0) + 0.1 differently.
    P = np.array([[0.1, 0.1], [0.1, 1.0], [1.0, 0.1]])
    three = ("happy", "angry", "sad")
    masks = select("mad", ActivationProbabilities(three, P, NeuronLayout((2,))), 0.5, three)
    assert indices(masks) == {"happy": [0], "angry": [1], "sad": [0]}
    assert masks["happy"].scores[0] == pytest.approx(0.3)


def test_mad_scores_are_invariant_to_the_order_of_the_other_emotions():
    # Each odd column is its even neighbour with the other emotions' values shuffled:
    # happy's deviation must be bit-identical in both, so every pair ties exactly.
    rng = np.random.default_rng(3)
    base = rng.random((4, 200))
    shuffled = base.copy()
    for j in range(base.shape[1]):
        shuffled[1:, j] = rng.permutation(base[1:, j])
    P = np.empty((4, 400))
    P[:, 0::2], P[:, 1::2] = base, shuffled
    probs = ActivationProbabilities(FOUR, P, NeuronLayout((400,)))
    happy = select("mad", probs, 1.0, ("happy",))["happy"]
    by_index = dict(zip(happy.indices.tolist(), happy.scores.tolist()))
    assert all(by_index[2 * j] == by_index[2 * j + 1] for j in range(200))
    ranks = {n: i for i, n in enumerate(happy.indices.tolist())}
    assert all(ranks[2 * j] + 1 == ranks[2 * j + 1] for j in range(200))  # tie -> lower first


# --------------------------------------------------------------------------- CAS


def test_cas_exact_masks_sizes_and_argmax_ties(probs):
    masks = select("cas", probs, r=0.5, targets=FOUR)
    # tops: 0 happy (6/8), 1 happy/angry tie -> happy (0), 2 angry (3/8), 3 happy (6/8),
    # 4 all tie -> happy (0), 5 sad (3/8)
    assert indices(masks) == {"happy": [0, 3, 1], "angry": [2], "sad": [5], "surprise": []}
    np.testing.assert_array_equal(masks["happy"].scores, [0.75, 0.75, 0.0])
    np.testing.assert_array_equal(masks["angry"].scores, [3 / 8])
    assert [masks[e].size for e in FOUR] == [3, 1, 1, 0]
    assert all(masks[e].requested == 3 for e in FOUR)


def test_cas_argmax_tie_goes_to_first_emotion_in_order_whatever_the_input_order():
    # flat 0: angry == sad on top; flat 1: happy == surprise on top
    P = np.array([[0.1, 0.6], [0.5, 0.2], [0.5, 0.0], [0.2, 0.6]])
    reversed_input = ActivationProbabilities(FOUR[::-1], P[::-1], NeuronLayout((2,)))
    masks = select_cas(reversed_input, FOUR, n_sel=2)
    assert indices(masks) == {"happy": [1], "angry": [0], "sad": [], "surprise": []}
    np.testing.assert_array_equal(masks["angry"].scores, [0.0])


def test_cas_needs_two_emotions():
    one = ActivationProbabilities(("happy",), EIGHTHS[:1] / 8.0, LAYOUT)
    with pytest.raises(ValueError, match="at least two"):
        select("cas", one, 0.5, targets=("happy",))


# --------------------------------------------------------------------------- LAPE


def test_lape_threshold_is_numpy_linear_percentile(probs):
    # 24 sorted values (eighths): 0 x5, 1 x7, 2 x2, 3 x4, 4 x2, 6 x2, 7 x2
    # q=75: position 17.25 between 3 and 4 -> 3.25/8; q=95: 21.85 between 6 and 7 -> 6.85/8
    assert lape_threshold(probs, 75) == pytest.approx(3.25 / 8)
    assert lape_threshold(probs, 95) == pytest.approx(6.85 / 8)
    assert lape_threshold(probs, 100) == 7 / 8


def test_entropy_uses_natural_log_and_zero_log_zero():
    P = np.array([[4.0, 1.0], [4.0, 1.0], [2.0, 0.0], [0.0, 0.0]]) / 8
    expected_0 = -(2 * 0.4 * np.log(0.4) + 0.2 * np.log(0.2))
    np.testing.assert_allclose(normalised_entropy_terms(P), [expected_0, np.log(2)])


def test_lape_pool_is_lowest_entropy_survivors(probs):
    # q=75 survivors: every neuron with some P >= 4/8 -> 0, 1, 2, 3, 5 (4 is all zero)
    # entropies: 0 = 3 (0.940) < 1 (1.055) < 2 (1.199) < 5 (1.332)
    assert lape_pool(probs, 6, 75).tolist() == [0, 1, 2, 3, 5]
    assert lape_pool(probs, 3, 75).tolist() == [0, 1, 3]
    assert lape_pool(probs, 1, 75).tolist() == [0]  # 0 and 3 tie: lower flat index
    assert lape_pool(probs, 6, 95).tolist() == [0, 3]  # only 7/8 > 6.85/8


def test_lape_exact_masks_from_a_restricted_pool(probs):
    masks = select_lape(probs, FOUR, n_sel=2, n_cand=3, percentile=75)
    assert indices(masks) == {
        "happy": [0, 3],
        "angry": [1, 0],
        "sad": [1, 0],
        "surprise": [0, 3],
    }
    np.testing.assert_array_equal(masks["angry"].scores, [4 / 8, 1 / 8])


def test_lape_pool_smaller_than_n_sel_gives_the_whole_pool(probs):
    masks = select_lape(probs, FOUR, n_sel=5, n_cand=3, percentile=75)
    assert indices(masks) == {
        "happy": [0, 3, 1],
        "angry": [1, 0, 3],
        "sad": [1, 0, 3],
        "surprise": [0, 3, 1],  # P = 1/8, 1/8, 0: pool members with P = 0 still count
    }
    assert all(m.requested == 5 and m.size == 3 for m in masks.values())


def test_lape_percentile_100_leaves_no_survivors(probs):
    masks = select("lape", probs, r=0.5, targets=FOUR, lape_percentile=100)
    assert all(m.size == 0 and m.requested == 3 for m in masks.values())


def test_lape_through_dispatcher_uses_n_cand_from_r(probs):
    # r = 0.5: N_sel = 3, N_cand = floor(min(1, 2.5) * 6) = 6 -> pool = all 5 survivors
    masks = select("lape", probs, r=0.5, targets=("happy", "sad"), lape_percentile=75)
    assert indices(masks) == {"happy": [0, 3, 1], "sad": [5, 2, 1]}


def test_lape_rejects_percentile_out_of_range(probs):
    with pytest.raises(ValueError, match="percentile"):
        select("lape", probs, 0.5, lape_percentile=101)


# --------------------------------------------------------------------------- random


def test_random_is_deterministic_sized_and_distinct_per_emotion():
    layout = NeuronLayout((400, 600))
    P = np.full((4, 1000), 0.5)
    p = ActivationProbabilities(FOUR, P, layout)
    a = select("random", p, r=0.05, targets=FOUR, seed=11)
    b = select("random", p, r=0.05, targets=FOUR, seed=11)
    c = select("random", p, r=0.05, targets=FOUR, seed=12)
    alone = select("random", p, r=0.05, targets=("sad",), seed=11)
    for e in FOUR:
        assert a[e].size == a[e].requested == 50
        assert np.unique(a[e].indices).size == 50
        assert a[e].indices.tolist() == sorted(a[e].indices.tolist())
        np.testing.assert_array_equal(a[e].indices, b[e].indices)
        assert not np.array_equal(a[e].indices, c[e].indices)
        np.testing.assert_array_equal(a[e].scores, np.zeros(50))
    np.testing.assert_array_equal(alone["sad"].indices, a["sad"].indices)
    assert len({tuple(a[e].indices) for e in FOUR}) == 4


def test_random_overlap_with_a_fixed_set_is_at_chance_level():
    # |mask| = 50 of N = 1000; fixed set = the first 100 neurons -> expected overlap 5.
    # Over 300 seeds the mean's s.d. is about 0.12; a biased draw (e.g. lowest indices)
    # would give 50.
    p = ActivationProbabilities(("happy", "sad"), np.zeros((2, 1000)), NeuronLayout((1000,)))
    overlaps = [
        np.count_nonzero(select_random(p, ("happy",), 50, seed)["happy"].indices < 100)
        for seed in range(300)
    ]
    assert abs(np.mean(overlaps) - 5.0) < 0.75


def test_random_seed_must_be_non_negative_int(probs):
    with pytest.raises(ValueError, match="seed"):
        select("random", probs, 0.5, seed=-1)


# --------------------------------------------------------------------------- tables, layers


def test_masks_table_rows_and_round_trip_through_parquet(probs, tmp_path):
    masks = select("cas", probs, r=0.5, targets=FOUR)
    table = masks_to_table(masks, LAYOUT)
    assert table.column("emotion").to_pylist() == ["happy"] * 3 + ["angry", "sad"]
    assert table.column("layer").to_pylist() == [0, 1, 0, 0, 1]
    assert table.column("neuron").to_pylist() == [0, 0, 1, 2, 2]
    assert table.column("rank").to_pylist() == [1, 2, 3, 1, 1]
    assert table.column("score").to_pylist() == [0.75, 0.75, 0.0, 0.375, 0.375]

    path = write_table(table, tmp_path / "masks.parquet", "masks")
    back = masks_from_table(read_table(path, "masks"), LAYOUT)
    assert list(back) == list(FOUR)  # the empty surprise mask survives
    for e in FOUR:
        assert back[e].selector == "cas"
        assert back[e].requested == 3
        np.testing.assert_array_equal(back[e].indices, masks[e].indices)
        np.testing.assert_array_equal(back[e].scores, masks[e].scores)


def test_masks_from_table_checks_layout_and_ranks(probs):
    table = masks_to_table(select("lap", probs, r=0.5, targets=("happy",)), LAYOUT)
    with pytest.raises(ValueError, match="layer sizes"):
        masks_from_table(table, NeuronLayout((2, 4)))
    gap = table.set_column(4, "rank", pa.array([1, 2, 4], type=pa.int32()))
    with pytest.raises(ValueError, match="ranks of emotion 'happy'"):
        masks_from_table(gap, LAYOUT)
    bare = table.replace_schema_metadata(None)
    with pytest.raises(ValueError, match="esn.masks"):
        masks_from_table(bare, LAYOUT)
    assert masks_from_table(bare, LAYOUT, selector="lap")["happy"].indices.tolist() == [0, 3, 1]


def test_masks_table_refuses_mixed_selectors(probs):
    mixed = [select("lap", probs, 0.5, ("happy",))["happy"], select("cas", probs, 0.5, ("sad",))["sad"]]
    with pytest.raises(ValueError, match="one selector"):
        masks_to_table(mixed, LAYOUT)


def test_layer_indices_on_unequal_layers():
    layout = NeuronLayout((2, 4, 1, 3))  # offsets 0, 2, 6, 7, 10
    mask = Mask("lap", "happy", [9, 0, 6, 3, 5, 7], np.zeros(6), 6)
    per_layer = layer_indices(mask, layout)
    assert [a.tolist() for a in per_layer] == [[0], [1, 3], [0], [0, 2]]
    sparse = layer_indices(Mask("lap", "happy", [4], [0.0], 1), layout)
    assert [a.tolist() for a in sparse] == [[], [2], [], []]
    assert all(a.dtype == np.int64 for a in sparse)
    with pytest.raises(ValueError, match="beyond"):
        layer_indices(Mask("lap", "happy", [10], [0.0], 1), layout)


def test_mask_refuses_duplicates_and_oversize():
    with pytest.raises(ValueError, match="duplicate"):
        Mask("lap", "happy", [1, 1], [0.0, 0.0], 2)
    with pytest.raises(ValueError, match="exceeds requested"):
        Mask("lap", "happy", [1, 2], [0.0, 0.0], 1)
