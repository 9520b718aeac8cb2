"""Success filter (SPEC §3): emotion check, WER check, seeded order-free cap, audit trail."""

import polars as pl
import pytest

from esn_core import io
from esn_core.success import _capped_sample_ids, human_success_table, success_summary, success_table

REF = "the nine the eggs i keep"  # 6 words after normalisation


def _frames(rows):
    """rows: (attempt_id, target, decoded_text, label) -> (attempts, judgements)."""
    attempts = pl.DataFrame(
        {
            "attempt_id": [r[0] for r in rows],
            "target_emotion": [r[1] for r in rows],
            "reference_text": [REF] * len(rows),
            "decoded_text": [r[2] for r in rows],
        }
    )
    judgements = pl.DataFrame({"attempt_id": [r[0] for r in rows], "label": [r[3] for r in rows]})
    return attempts, judgements


def test_each_attempt_is_audited_with_both_checks():
    attempts, judgements = _frames(
        [
            ("a1", "happy", "The nine, the eggs, I keep.", "开心/happy"),  # WER 0, label ok
            ("a2", "happy", "the nine the eggs i keep", "sad"),  # wrong emotion
            ("a3", "sad", "the nine eggs", "sad"),  # 3 deletions of 6: WER 0.5
            ("a4", "surprise", "the 9 the eggs i keep", "surprised"),  # mapped label
            ("a5", "angry", "the nine the eggs i keep", "厌恶/disgusted"),  # outside E
            ("a6", "angry", None, "angry"),  # no decoded text: WER 1
        ]
    )
    got = success_table(attempts, judgements, cap=None)
    assert got.columns == list(io.SCHEMAS["success"])
    assert got["attempt_id"].to_list() == ["a1", "a2", "a3", "a4", "a5", "a6"]
    assert got["emotion"].to_list() == ["happy", "happy", "sad", "surprise", "angry", "angry"]
    assert got["label"].to_list() == ["happy", "sad", "sad", "surprise", None, "angry"]
    assert got["wer"].to_list() == pytest.approx([0.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    assert got["emotion_ok"].to_list() == [True, False, True, True, False, True]
    assert got["content_ok"].to_list() == [True, True, False, True, True, False]
    assert got["success"].to_list() == [True, False, False, True, False, False]
    assert got["kept"].to_list() == got["success"].to_list()


def test_wer_threshold_is_inclusive():
    ref = " ".join(f"w{i}" for i in range(20))
    three_wrong = " ".join(["x", "y", "z"] + [f"w{i}" for i in range(3, 20)])
    four_wrong = " ".join(["x", "y", "z", "v"] + [f"w{i}" for i in range(4, 20)])
    attempts = pl.DataFrame(
        {
            "attempt_id": ["at", "over"],
            "target_emotion": ["sad", "sad"],
            "reference_text": [ref, ref],
            "decoded_text": [three_wrong, four_wrong],
        }
    )
    judgements = pl.DataFrame({"attempt_id": ["at", "over"], "label": ["sad", "sad"]})
    got = success_table(attempts, judgements)
    assert got["wer"].to_list() == pytest.approx([0.15, 0.20])
    assert got["content_ok"].to_list() == [True, False]


def _many(n_happy_success, n_sad_success, n_fail=5):
    rows = [(f"h{i:03d}", "happy", REF, "happy") for i in range(n_happy_success)]
    rows += [(f"s{i:03d}", "sad", REF, "sad") for i in range(n_sad_success)]
    rows += [(f"f{i:03d}", "happy", REF, "neutral") for i in range(n_fail)]
    return _frames(rows)


def test_cap_keeps_exactly_c_successes_and_never_a_failure():
    attempts, judgements = _many(80, 7)
    got = success_table(attempts, judgements, cap=50, seed=3)
    kept = got.filter("kept")
    assert kept.filter(pl.col("emotion") == "happy").height == 50
    assert kept.filter(pl.col("emotion") == "sad").height == 7  # under the cap: all kept
    assert kept["success"].all()
    assert got.filter(~pl.col("success"))["kept"].sum() == 0
    assert got.height == attempts.height  # every attempt appears


def test_cap_sample_is_seeded_and_independent_of_row_order():
    attempts, judgements = _many(80, 60)
    first = success_table(attempts, judgements, cap=50, seed=11)
    again = success_table(
        attempts.sample(fraction=1.0, shuffle=True, seed=1),
        judgements.sample(fraction=1.0, shuffle=True, seed=2),
        cap=50,
        seed=11,
    )
    assert first.equals(again)
    other_seed = success_table(attempts, judgements, cap=50, seed=12)
    assert set(first.filter("kept")["attempt_id"]) != set(other_seed.filter("kept")["attempt_id"])


def test_one_emotions_sample_does_not_move_when_another_emotion_changes():
    attempts, judgements = _many(80, 60)
    fewer_sad = attempts.filter(~pl.col("attempt_id").is_in(["s000", "s001"]))
    a = success_table(attempts, judgements, cap=50, seed=5)
    b = success_table(fewer_sad, judgements, cap=50, seed=5)
    happy_kept = lambda t: set(t.filter(pl.col("kept") & (pl.col("emotion") == "happy"))["attempt_id"])
    assert happy_kept(a) == happy_kept(b)


def test_cap_sample_is_uniform_over_seeds():
    attempts, judgements = _many(10, 0, n_fail=0)
    judged = success_table(attempts, judgements, cap=None)  # sorted, as the sampler expects
    hits = {f"h{i:03d}": 0 for i in range(10)}
    n_seeds = 400
    for seed in range(n_seeds):
        for aid in _capped_sample_ids(judged, cap=5, seed=seed):
            hits[aid] += 1
    # each id should be kept with probability 5/10; 4 standard deviations = 0.1
    for aid, count in hits.items():
        assert 0.4 < count / n_seeds < 0.6, aid


def test_missing_judgement_names_the_attempt():
    attempts, judgements = _many(3, 0, n_fail=0)
    with pytest.raises(ValueError, match="no label for attempt 'h001'"):
        success_table(attempts, judgements.filter(pl.col("attempt_id") != "h001"))


def test_duplicate_ids_name_the_attempt():
    attempts, judgements = _many(3, 0, n_fail=0)
    with pytest.raises(ValueError, match="attempts: duplicate attempt_id 'h002'"):
        success_table(pl.concat([attempts, attempts.tail(1)]), judgements)
    with pytest.raises(ValueError, match="judgements: duplicate attempt_id 'h000'"):
        success_table(attempts, pl.concat([judgements, judgements.head(1)]))


def test_unknown_target_and_missing_column_are_named():
    attempts, judgements = _frames([("x1", "surprised", REF, "surprised")])
    with pytest.raises(ValueError, match="'x1' has target_emotion 'surprised'"):
        success_table(attempts, judgements)
    with pytest.raises(ValueError, match="missing column.*decoded_text"):
        success_table(attempts.drop("decoded_text"), judgements)
    with pytest.raises(ValueError, match="cap"):
        success_table(*_many(2, 0), cap=0)


def test_human_labels_use_the_same_construction():
    attempts, judgements = _frames(
        [("a1", "happy", REF, "happy"), ("a2", "sad", REF, "neutral"), ("a3", "angry", REF, "angry")]
    )
    human = pl.DataFrame({"attempt_id": ["a3", "a2", "a1"], "human_label": ["neutral", "Sad", "happy"]})
    machine_run = success_table(attempts, judgements)
    human_run = human_success_table(attempts, human)
    assert machine_run["success"].to_list() == [True, False, True]
    assert human_run["success"].to_list() == [True, True, False]
    relabelled = human.rename({"human_label": "label"})
    assert human_run.equals(success_table(attempts, relabelled))
    # humans label subsets: the unlabelled a1 is simply not a success (tests/test_human.py)
    assert human_success_table(attempts, human.head(2))["success"].to_list() == [False, True, False]


def test_table_writes_under_the_declared_schema(tmp_path):
    attempts, judgements = _many(4, 2)
    got = success_table(attempts, judgements, cap=3)
    path = io.write_table(got.to_arrow(), tmp_path / "success.parquet", "success")
    back = pl.from_arrow(io.read_table(path, "success"))
    assert back.equals(got)


def test_summary_reports_empty_sets_as_zero():
    attempts, judgements = _many(4, 2, n_fail=3)
    summary = success_summary(success_table(attempts, judgements, cap=3))
    rows = {r["emotion"]: r for r in summary.iter_rows(named=True)}
    assert list(rows) == ["neutral", "happy", "angry", "sad", "surprise"]
    assert (rows["happy"]["n_attempts"], rows["happy"]["n_success"], rows["happy"]["n_kept"]) == (7, 4, 3)
    assert (rows["sad"]["n_success"], rows["sad"]["n_kept"]) == (2, 2)
    assert rows["angry"]["n_attempts"] == 0 and rows["angry"]["n_kept"] == 0
