"""Mapping of a judge's raw emotion label onto ESD's five emotions (SPEC §3).

emotion2vec+ large predicts one of {angry, disgusted, fearful, happy, neutral, other, sad,
surprised, unk}; its released checkpoints spell them bilingually (``"吃惊/surprised"``,
``"<unk>"``). An LALM judge or a human answers in free-ish text ("Surprise", " sad ").
Both reduce here to a member of ``EMOTIONS`` or ``None``; ``None`` never matches a target,
so labels outside E (disgusted, fearful, other, unk) count as misses, never as errors.
"""

from __future__ import annotations

from esn_core.constants import EMOTIONS

# Judge vocabulary that names an ESD emotion under another spelling.
_SYNONYMS: dict[str, str] = {"surprised": "surprise"}


def map_judge_label(raw: str | None) -> str | None:
    """A raw judge label -> an emotion of ``EMOTIONS``, or ``None`` if it names none.

    Case and surrounding whitespace are ignored; of a bilingual ``"中文/english"`` label
    only the part after the last ``/`` is read. Mapping an already mapped label is a no-op.
    """
    if raw is None:
        return None
    word = raw.rsplit("/", 1)[-1].strip().lower()
    word = _SYNONYMS.get(word, word)
    return word if word in EMOTIONS else None
