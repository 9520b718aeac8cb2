"""Word error rate between a reference transcript and the LALM's decoded text (SPEC §3, §7).

Both sides go through whisper-normalizer's ``EnglishTextNormalizer`` (lower case, no
punctuation, British -> American spelling, contractions expanded, spelled-out numbers
turned into digits: "twenty five" -> "25"), then jiwer aligns the words. Edit counts are
substitutions + deletions + insertions against the normalised reference.

Two rates:
- ``attempt_wer`` for the per-attempt content check (``WER <= tau_wer``);
- ``corpus_wer`` = total edits / total reference words over a condition, for reported
  tables; insertions make it exceed 1.
"""

from __future__ import annotations

from typing import Sequence

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

# One shared instance: it compiles its regexes and loads its spelling map once.
_NORMALIZER = EnglishTextNormalizer()


def normalize_text(text: str | None) -> str:
    """Whisper's English normalisation, whitespace collapsed; ``None`` reads as ''."""
    return " ".join(_NORMALIZER(text or "").split())


def word_errors(ref: str | None, hyp: str | None) -> tuple[int, int]:
    """(substitutions + deletions + insertions, number of reference words), after normalising."""
    ref_norm, hyp_norm = normalize_text(ref), normalize_text(hyp)
    ref_words = len(ref_norm.split())
    if ref_words == 0 or not hyp_norm:
        # Nothing to align: every hypothesis word is an insertion, every reference word a
        # deletion (jiwer agrees; the shortcut also spares it the empty-string corner cases).
        return len(hyp_norm.split()) + ref_words, ref_words
    out = jiwer.process_words(ref_norm, hyp_norm)
    return int(out.substitutions + out.deletions + out.insertions), ref_words


def attempt_wer(ref: str | None, hyp: str | None) -> float:
    """Per-attempt WER = edits / max(reference words, 1).

    A reference that normalises to nothing (e.g. only fillers "uh um") has no words to get
    wrong; dividing by 1 instead of 0 makes the rate 0.0 when the hypothesis is empty too and
    the number of inserted words otherwise, so any spoken word fails a threshold below 1
    rather than producing inf/nan that would poison sums and comparisons.
    """
    errors, ref_words = word_errors(ref, hyp)
    return errors / max(ref_words, 1)


def corpus_wer(refs: Sequence[str | None], hyps: Sequence[str | None]) -> float:
    """Total edits / total reference words over paired lists (may exceed 1).

    Raises if the lists differ in length or the references hold no word at all (the rate
    is then undefined).
    """
    if len(refs) != len(hyps):
        raise ValueError(f"corpus_wer: {len(refs)} references but {len(hyps)} hypotheses")
    total_errors = total_words = 0
    for ref, hyp in zip(refs, hyps):
        errors, ref_words = word_errors(ref, hyp)
        total_errors += errors
        total_words += ref_words
    if total_words == 0:
        raise ValueError("corpus_wer: the references contain no words after normalisation")
    return total_errors / total_words
