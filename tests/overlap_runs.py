"""An adapter's workflow runs with ``overlap_speech`` on must equal the runs without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from esn_core.hooks import Capture
from esn_core.pipeline import Condition, evaluate_conditions, plan_attempts, sample_attempts


def assert_overlap_matches_sequential(adapter, sources, tmp_path: Path, groups=("lm", "synth")) -> None:
    """Batch n's speech decoder on the worker thread while batch n+1 decodes gives the same
    attempts (in plan order), wav bytes, counts and evaluation rows as one batch after
    another: identification (capture on ``groups``) and evaluation (per-row steering)."""
    table = pl.DataFrame({
        "utterance_id": [f"0011_{i + 1:06d}" for i in range(len(sources))],
        "speaker": ["0011"] * len(sources), "split": ["identification"] * len(sources),
        "reference_text": ["one two"] * len(sources), "path": [str(p) for p in sources],
    })
    plan = plan_attempts(table, ("happy", "sad"), seed=3)
    mask = np.arange(0, adapter.groups()["lm"].layout.n_neurons, 7)
    conditions = [Condition("cas", "lm", "steer", 1.0, {"happy": mask, "sad": mask[::2]})]
    capture = {g: Capture() for g in groups}
    runs = {}
    for overlap in (False, True):
        adapter.overlap_speech = overlap
        try:
            out = tmp_path / f"overlap_{overlap}"
            runs[overlap] = (
                sample_attempts(adapter, plan, out / "sample", batch_size=2, capture=capture, progress=False),
                evaluate_conditions(adapter, table.head(2), conditions, out / "eval",
                                    targets=("happy", "sad"), seed=3, batch_size=2, progress=False),
            )
        finally:
            adapter.overlap_speech = False
    ((attempts, counts), evaluated), ((attempts_o, counts_o), evaluated_o) = runs[False], runs[True]
    assert attempts["attempt_id"].to_list() == plan["attempt_id"].to_list() == attempts_o["attempt_id"].to_list()
    assert plan.height > 2 and evaluated.height > 2  # several batches, so the worker overlapped
    for sequential, overlapped in ((attempts, attempts_o), (evaluated, evaluated_o)):
        assert sequential.drop("audio_path").equals(overlapped.drop("audio_path"))
        for a, b in zip(sequential["audio_path"], overlapped["audio_path"]):
            assert Path(a).read_bytes() == Path(b).read_bytes()
    for group in groups:
        np.testing.assert_array_equal(counts[group].K, counts_o[group].K)
        np.testing.assert_array_equal(counts[group].T, counts_o[group].T)
