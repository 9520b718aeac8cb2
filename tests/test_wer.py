"""WER: whisper normalisation + jiwer alignment, per attempt and per corpus."""

import math

import pytest

from esn_core.judges.labels import map_judge_label
from esn_core.judges.wer import attempt_wer, corpus_wer, normalize_text, word_errors


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("The nine the eggs, I keep.", "the 9 the eggs i keep"),  # numbers become digits
        ("twenty five", "25"),
        ("I can't go", "i can not go"),
        ("won't", "will not"),
        ("colour favourite", "color favorite"),  # British -> American
        ("Mr. Smith", "mister smith"),
        ("  spaced   out  ", "spaced out"),
        ("uh um hmm", ""),  # fillers dropped
        (None, ""),
    ],
)
def test_normalize_text_matches_whisper_english_rules(raw, expected):
    assert normalize_text(raw) == expected


def test_case_punctuation_and_spelling_differences_cost_nothing():
    assert word_errors("Colour me HAPPY, please!", "color me happy please") == (0, 4)


def test_spelled_and_digit_numbers_align():
    assert word_errors("twenty five people", "25 people") == (0, 2)
    # currency folds into one token: "twenty five dollars" and "25 dollars" both read "$25"
    assert word_errors("It costs twenty five dollars", "it costs 25 dollars") == (0, 3)
    assert word_errors("twenty five dollars", "$25") == (0, 1)


def test_contractions_align_with_expansions():
    # "can't" -> "can not" (5 reference words); "cannot" is not split: can->cannot (S) + not (D)
    assert word_errors("I can't do it", "I cannot do it") == (2, 5)
    assert word_errors("I can't do it", "I can not do it") == (0, 5)


def test_hand_counted_substitution_and_deletion():
    # the cat sat on the mat / the cat sit on mat: sat->sit (S), "the" dropped (D)
    assert word_errors("the cat sat on the mat", "the cat sit on mat") == (2, 6)
    assert attempt_wer("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)


def test_hand_counted_insertions():
    assert word_errors("good morning", "well good morning to you") == (3, 2)
    assert attempt_wer("good morning", "well good morning to you") == pytest.approx(1.5)


def test_empty_hypothesis_is_all_deletions():
    assert word_errors("one sad day", "") == (3, 3)
    assert attempt_wer("one sad day", None) == 1.0


def test_empty_reference_divides_by_one():
    assert attempt_wer("", "") == 0.0
    assert attempt_wer("uh um", "") == 0.0
    assert attempt_wer("", "three extra words") == 3.0
    assert math.isfinite(attempt_wer("...", "a b c d"))


def test_corpus_wer_is_total_edits_over_total_reference_words():
    refs = ["the cat sat on the mat", "good morning", "one sad day"]
    hyps = ["the cat sit on mat", "well good morning to you", "one sad day"]
    # edits 2 + 3 + 0 over words 6 + 2 + 3; not the mean of per-attempt rates
    assert corpus_wer(refs, hyps) == pytest.approx(5 / 11)
    mean_of_rates = (2 / 6 + 1.5 + 0) / 3
    assert corpus_wer(refs, hyps) != pytest.approx(mean_of_rates)


def test_insertion_heavy_hypotheses_push_corpus_wer_above_one():
    refs = ["hello world", "yes"]
    hyps = ["hello world this is a long hallucinated tail", "yes yes yes yes"]
    assert corpus_wer(refs, hyps) == pytest.approx((6 + 3) / 3)
    assert corpus_wer(refs, hyps) > 1


def test_corpus_wer_rejects_mismatched_or_wordless_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        corpus_wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no words"):
        corpus_wer(["", "uh"], ["x", ""])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("surprised", "surprise"),
        ("吃惊/surprised", "surprise"),
        ("生气/angry", "angry"),
        (" Happy ", "happy"),
        ("surprise", "surprise"),  # already mapped: no-op
        ("neutral", "neutral"),
        ("厌恶/disgusted", None),
        ("fearful", None),
        ("other", None),
        ("<unk>", None),
        ("unk", None),
        ("", None),
        (None, None),
    ],
)
def test_map_judge_label_onto_esd_emotions(raw, expected):
    assert map_judge_label(raw) == expected
