"""Human evaluation (SPEC §7, paper §5.4): loudness, CAS-H's success sets from human labels,
the import of listener files and the A/B statistics of Fig. 8, against hand-computed values."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from esn_core.human import (
    ListenerFileError,
    ab_summary,
    import_ab,
    import_labels,
    read_answers,
    simulate_listeners,
)
from esn_core.loudness import PEAK_CEILING, integrated_loudness, normalise
from esn_core.success import human_success_table

REF = "the nine the eggs i keep"


def _sine(rate, seconds=3.0, amp=1.0, freq=997.0):
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


# ---------------------------------------------------------------------------- loudness


def test_full_scale_997hz_sine_reads_minus_3_01_lkfs():
    # ITU-R BS.1770-4's reference: a 0 dBFS 997 Hz sine (48 kHz) measures -3.01 LKFS
    assert integrated_loudness(_sine(48000), 48000) == pytest.approx(-3.01, abs=0.01)
    # 20 dB lower reads 20 LU lower; at the pipeline's 16 kHz the filters are redesigned
    assert integrated_loudness(_sine(48000, amp=0.1), 48000) == pytest.approx(-23.01, abs=0.01)
    assert integrated_loudness(_sine(16000), 16000) == pytest.approx(-3.01, abs=0.1)


def test_silence_is_gated_out_and_normalise_hits_the_target():
    tone = _sine(16000, seconds=2.0, amp=0.05)
    padded = np.concatenate([np.zeros(32000), tone, np.zeros(32000)])
    # the absolute gate (-70 LKFS) drops the silent blocks; of the 400 ms blocks (100 ms hop) that
    # touch the tone, 17 lie inside it and 3 per edge cover 1/4, 1/2, 3/4 of it (all pass the
    # relative gate): mean power 20/23 of the tone's, where no gating would give 2/6
    expected = integrated_loudness(tone, 16000) + 10 * math.log10(20 / 23)
    assert integrated_loudness(padded, 16000) == pytest.approx(expected, abs=0.02)
    scaled, gain = normalise(tone, 16000)
    assert integrated_loudness(scaled, 16000) == pytest.approx(-23.0, abs=0.01)
    assert gain == pytest.approx(-23.0 - integrated_loudness(tone, 16000), abs=0.01)
    # a peaky clip is lowered to the -1 dBFS ceiling instead of clipping
    click = np.zeros(16000)
    click[100] = 0.5
    raised, _ = normalise(click + 1e-4 * _sine(16000, seconds=1.0), 16000)
    assert np.max(np.abs(raised)) <= PEAK_CEILING + 1e-6


# ---------------------------------------------------------------------------- CAS-H success sets


def _attempts(ids_targets):
    return pl.DataFrame({"attempt_id": [a for a, _ in ids_targets], "target_emotion": [t for _, t in ids_targets],
                         "reference_text": [REF] * len(ids_targets), "decoded_text": [REF] * len(ids_targets)})


def test_human_labels_of_a_subset_are_normal_and_unlabelled_attempts_fail(caplog):
    attempts = _attempts([("a1", "happy"), ("a2", "sad"), ("a3", "sad"), ("a4", "angry")])
    labels = pl.DataFrame({"attempt_id": ["a1", "a3"], "human_label": ["happy", "unclear"]})
    with caplog.at_level(logging.INFO):
        got = human_success_table(attempts, labels, cap=None)
    assert got["attempt_id"].to_list() == ["a1", "a2", "a3", "a4"]
    assert got["label"].to_list() == ["happy", None, None, None]
    assert got["success"].to_list() == [True, False, False, False]
    assert "2 of 4 attempts unlabelled" in caplog.text


def test_a_label_for_an_unknown_attempt_is_an_error():
    attempts = _attempts([("a1", "happy"), ("a2", "sad")])
    labels = pl.DataFrame({"attempt_id": ["a1", "a2", "zz9"], "human_label": ["happy", "sad", "sad"]})
    with pytest.raises(ValueError, match="attempt 'zz9' is not one of the attempts"):
        human_success_table(attempts, labels)


def test_a_misspelt_label_is_an_error_not_a_miss():
    attempts = _attempts([("a1", "angry"), ("a2", "sad")])
    labels = pl.DataFrame({"attempt_id": ["a1", "a2"], "human_label": ["angyr", "sad"]})
    with pytest.raises(ValueError, match="attempt 'a1' has label 'angyr'"):
        human_success_table(attempts, labels)


# ---------------------------------------------------------------------------- listener files

KEY = pl.DataFrame({
    "task": ["ab", "ab", "ab", "ab", "label", "label"],
    "item": ["p001", "p001", "p002", "p002", "l001", "l002"],
    "clip": ["c1", "c2", "c3", "c4", "c5", "c6"],
    "role": ["baseline", "intervened", "intervened", "baseline", "label", "label"],
    "attempt_id": ["s1.happy", "s1.happy.cas.happy", "s2.sad.cas.sad", "s2.sad", "i1.happy", "i2.sad"],
    "emotion": ["happy", "happy", "sad", "sad", "happy", "sad"],
    "audio_path": ["x"] * 6,
    "set_id": ["kitA"] * 4 + ["labs"] * 2,
})
HEADER = "kit,listener,task,trial,item,clip_a,clip_b,answer\n"


def _write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def test_ab_answers_become_win_tie_loss_of_the_intervened_clip(tmp_path):
    f1 = _write(tmp_path, "ann.csv", "kitA,ann,ab,1,p001,c2,c1,A\nkitA,ann,ab,2,p002,c4,c3,A\n")
    f2 = _write(tmp_path, "bob.csv", "kitA,bob,ab,1,p002,c3,c4,indecisive\nkitA,bob,ab,2,p001,c1,c2,B\n")
    got = import_ab(read_answers([f1, f2]), KEY).sort("listener", "pair_id")
    # ann: p001 chose c2 (intervened) = win, p002 chose c4 (baseline) = loss; bob: tie, win
    assert got.select("listener", "pair_id", "outcome").rows() == [
        ("ann", "p001", "win"), ("ann", "p002", "loss"), ("bob", "p001", "win"), ("bob", "p002", "tie")]
    assert got.filter(pl.col("listener") == "bob")["row"].to_list() == [3, 2]  # line numbers in the file


@pytest.mark.parametrize("body, message", [
    ("kitA,ann,ab,1,p009,c1,c2,A\n", r"ann.csv row 2: unknown pair id 'p009'"),
    ("kitA,ann,ab,1,p001,c1,c2,A\nkitA,ann,ab,2,p002,c3,c4,C\n", r"ann.csv row 3: answer 'C' is not one of"),
    ("kitA,ann,ab,1,p001,c1,c3,A\n", r"row 2: clips 'c1', 'c3' are not the clips of pair 'p001'"),
    ("kitB,ann,ab,1,p001,c1,c2,A\n", r"row 2: answers kit 'kitB', but this workflow's kit is 'kitA'"),
    ("kitA,ann,ab,1,p001,c1,c2,A\nkitA,ann,ab,2,p002,c3,c4,A\nkitA,ann,ab,3,p001,c2,c1,B\n",
     r"duplicate answer: listener 'ann' answered ab item 'p001' more than once \(.*ann.csv row 2, .*ann.csv row 4\)"),
])
def test_bad_ab_rows_are_named_by_file_and_row(tmp_path, body, message):
    with pytest.raises(ListenerFileError, match=message):
        import_ab(read_answers([_write(tmp_path, "ann.csv", body)]), KEY)


def test_label_answers_take_the_majority_and_reject_bad_rows(tmp_path):
    files = [
        _write(tmp_path, "a.csv", "labs,a,label,1,l001,c5,,happy\nlabs,a,label,2,l002,c6,,sad\n"),
        _write(tmp_path, "b.csv", "labs,b,label,1,l001,c5,,Happy\nlabs,b,label,2,l002,c6,,angry\n"),
        _write(tmp_path, "c.csv", "labs,c,label,1,l001,c5,,sad\n"),
    ]
    plain = tmp_path / "d.csv"
    plain.write_text("attempt_id,human_label\ni2.sad,unclear\n")
    got = import_labels(read_answers([*files, plain]), KEY.filter(pl.col("task") == "label"), ["i1.happy", "i2.sad"])
    # i1: happy 2 / sad 1 -> happy; i2: sad, angry, unclear tie -> no label (never a success)
    assert got.rows() == [("i1.happy", "happy", 3, 2), ("i2.sad", None, 3, 1)]
    bad = _write(tmp_path, "e.csv", "labs,e,label,1,l001,c5,,happy\nlabs,e,label,2,l002,c6,,angyr\n")
    with pytest.raises(ListenerFileError, match=r"e.csv row 3: label 'angyr' is not one of"):
        import_labels(read_answers([bad]), KEY, ["i1.happy", "i2.sad"])
    unknown = tmp_path / "f.csv"
    unknown.write_text("attempt_id,human_label\ni1.happy,happy\nnope.sad,sad\n")
    with pytest.raises(ListenerFileError, match=r"f.csv row 3: unknown attempt id 'nope.sad'"):
        import_labels(read_answers([unknown]), KEY, ["i1.happy", "i2.sad"])
    missing = tmp_path / "g.csv"
    missing.write_text("who,what\nx,y\n")
    with pytest.raises(ListenerFileError, match=r"g.csv: missing column\(s\)"):
        read_answers([missing])


# ---------------------------------------------------------------------------- Fig. 8 statistics


def test_ab_summary_shares_and_bootstrap_bounds():
    rows = [  # listener, pair, emotion, outcome
        ("l1", "p1", "happy", "win"), ("l1", "p2", "happy", "win"), ("l2", "p1", "happy", "win"), ("l2", "p2", "happy", "win"),
        ("l1", "p3", "sad", "win"), ("l1", "p4", "sad", "tie"), ("l2", "p3", "sad", "loss"), ("l2", "p4", "sad", "tie"),
    ]
    answers = pl.DataFrame(rows, schema=["listener", "pair_id", "emotion", "outcome"], orient="row")
    got = {r["emotion"]: r for r in ab_summary(answers, n_boot=200, seed=1).iter_rows(named=True)}
    assert [got["happy"][f"{o}_pct"] for o in ("win", "tie", "loss")] == [100, 0, 0]
    assert [got["sad"][f"{o}_pct"] for o in ("win", "tie", "loss")] == [25, 50, 25]
    assert [got["avg"][f"{o}_pct"] for o in ("win", "tie", "loss")] == [62.5, 25, 12.5]
    assert got["happy"]["win_lo"] == got["happy"]["win_hi"] == 100  # no variation to resample
    assert 0 <= got["sad"]["win_lo"] <= 25 <= got["sad"]["win_hi"] <= 100 and got["sad"]["win_hi"] > got["sad"]["win_lo"]
    assert (got["avg"]["n_pairs"], got["avg"]["n_listeners"], got["avg"]["n_answers"]) == (4, 2, 8)


def test_noiseless_simulated_listeners_answer_what_the_judge_heard(tmp_path):
    heard = {"s1.happy": "neutral", "s1.happy.cas.happy": "happy", "s2.sad": "sad", "s2.sad.cas.sad": "sad",
             "i1.happy": "happy", "i2.sad": None}
    files = simulate_listeners(KEY, heard, n_listeners=3, noise=0.0, seed=0)
    paths = []
    for name, frame in files.items():
        frame.write_csv(tmp_path / f"{name}.csv")
        paths.append(tmp_path / f"{name}.csv")
    answers = read_answers(paths)
    ab = import_ab(answers, KEY)
    # p001: only the intervened clip sounds happy -> win; p002: both sad -> indecisive
    assert dict(ab.group_by("pair_id").agg(pl.col("outcome").unique()).iter_rows()) == {"p001": ["win"], "p002": ["tie"]}
    labels = import_labels(answers, KEY.filter(pl.col("task") == "label"), ["i1.happy", "i2.sad"])
    assert labels.rows() == [("i1.happy", "happy", 3, 3), ("i2.sad", None, 3, 3)]
    for frame in files.values():  # every trial once per task, numbered in the order heard
        for task, n in (("ab", 2), ("label", 2)):
            part = frame.filter(pl.col("task") == task)
            assert sorted(part["trial"].to_list()) == list(range(1, n + 1)) and part["item"].n_unique() == n


# ---------------------------------------------------------------------------- the plan


def _demo_config() -> dict:
    import yaml

    return yaml.safe_load(open(Path(__file__).resolve().parents[1] / "config.yaml"))


def test_the_plan_adds_cas_h_beside_the_ser_judge_and_reserves_the_name(tmp_path):
    from esn_core.workflow import Plan

    config = _demo_config()  # the demo: simulated listeners
    plan = Plan(config)
    human = [v for v in plan.variants.values() if v.judge == "human"]
    assert [v.condition("cas") for v in human] == ["cas_h"]
    assert human[0].mask_path("cas") == "results/masks/human/tau0.15/c50/lm/cas_r0.0118.parquet"
    assert plan.sample_judgements("human", 3) == ["results/human/labels.parquet"]
    assert plan.sample_judgements("embedded", 1) == ["results/judgements/embedded/sample/shard0.parquet"]
    assert plan.report_judges == ["embedded"]
    assert plan.human_targets() == ["results/human/kit", "results/figures/human/ab_preference.png"]
    # without listeners there is no human judge and no Fig. 8
    config["human"]["simulate"] = None
    plan = Plan(config)
    assert all(v.judge != "human" for v in plan.variants.values()) and plan.human_targets() == ["results/human/kit"]
    # a lab's files may be the filter for every variant; then no extra CAS-H variant
    config["success"]["human_labels"] = str(tmp_path)
    with pytest.raises(ValueError, match="success.human_labels: the folder .* holds no listener file"):
        Plan(config)
    labels = tmp_path / "answers.csv"
    labels.write_text("attempt_id,human_label\n")
    config["success"]["human_labels"] = str(labels)
    config["judges"]["filter"] = "human"
    plan = Plan(config)
    assert {v.judge for v in plan.variants.values()} == {"human"}
    assert all(not v.condition_suffix for v in plan.variants.values()) and plan.report_judges == ["embedded"]
    config["judges"]["available"].append({"name": "human", "kind": "embedded"})
    with pytest.raises(ValueError, match="judges.available: 'human' is reserved"):
        Plan(config)
