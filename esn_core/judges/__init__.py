"""Judges of an attempt: emotion labels (SER / LALM / human), content (WER) and naturalness.

Every judge reduces one generated attempt to a verdict the success filter (SPEC §3) and the
evaluation tables (SPEC §7) can use; label vocabularies are mapped onto ESD's five emotions
by ``esn_core.judges.labels``.
"""
