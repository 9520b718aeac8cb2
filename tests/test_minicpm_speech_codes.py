import pytest
import torch

from esn_core.models.minicpm_speech_codes import (CodeSampling, SynthStep, generate_codes,
                                                  penalise_repeats, top_p_top_k)
from esn_core.models.minicpm_tts import MiniCPMTTS
from tests.tiny_minicpm import TINY_CONFIG


@pytest.fixture(scope="module")
def step():
    torch.manual_seed(0)
    tts = MiniCPMTTS(TINY_CONFIG["tts_config"]).eval()
    return SynthStep(tts)


def conditions(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 8, generator=g) for n in lengths]


def test_penalty_is_power_of_the_count():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    history = torch.tensor([[0, 0, 1, -1]])  # code 0 twice, code 1 once, padding
    got = penalise_repeats(logits, history, 2.0)
    assert torch.allclose(got, torch.tensor([[0.5, -4.0, 1.0, 3.0]]))


def test_top_p_then_top_k_keep_at_least_min_keep():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    kept = torch.isfinite(top_p_top_k(logits, 0.7, 0, 1))
    assert kept.tolist() == [[True, True, False, False, False]]  # 0.5 + 0.3 reaches 0.7
    kept = torch.isfinite(top_p_top_k(logits, 0.5, 0, 3))
    assert kept.sum() == 3
    kept = torch.isfinite(top_p_top_k(logits, 1.0, 2, 1))
    assert kept.tolist() == [[True, True, False, False, False]]


def test_batched_rows_equal_rows_alone(step):
    sampling = CodeSampling(min_codes=0, max_codes=12)
    conds, seeds = conditions([5, 3, 7]), [4, 5, 6]
    batch = generate_codes(step, conds, seeds, sampling)
    for b in range(3):
        alone = generate_codes(step, [conds[b]], [seeds[b]], sampling)[0]
        assert torch.equal(batch[b].codes, alone.codes), b
        assert batch[b].ended == alone.ended
        assert batch[b].n_positions == conds[b].shape[0] + alone.codes.shape[0]


def test_same_seed_same_codes_other_seed_other_codes(step):
    sampling = CodeSampling(min_codes=20, max_codes=20)
    cond = conditions([4])
    a = generate_codes(step, cond, [3], sampling)[0]
    b = generate_codes(step, cond, [3], sampling)[0]
    c = generate_codes(step, cond, [9], sampling)[0]
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    # no end code before min_codes; at the cap the last drawn code is dropped (upstream)
    assert not a.ended and a.codes.shape == (19, 1)
    assert (a.codes < 10).all()


def test_end_code_stops_its_row_only(step):
    sampling = CodeSampling(min_codes=0, max_codes=15, temperature=1.0, top_p=1.0, top_k=0)
    conds, seeds = conditions([3, 6, 4, 5, 2], seed=7), [1, 2, 3, 4, 5]
    rows = generate_codes(step, conds, seeds, sampling)
    assert {r.ended for r in rows} == {True, False}  # some rows end early, others run on
    for r, c, s in zip(rows, conds, seeds):
        assert (r.codes != 10).all()  # the end code is never kept
        assert r.ended == (r.codes.shape[0] < 14)
        alone = generate_codes(step, [c], [s], sampling)[0]
        assert torch.equal(r.codes, alone.codes)


def test_bad_sampling_values_are_named():
    with pytest.raises(ValueError, match="temperature"):
        CodeSampling(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        CodeSampling(top_p=0)


def test_synth_capture_counts_the_positions_the_rows_report(step):
    import numpy as np

    from esn_core.hooks import Capture, HookEngine, MLPGroup, find_gated_mlps

    sampling = CodeSampling(min_codes=0, max_codes=15, temperature=1.0, top_p=1.0, top_k=0)
    conds, seeds = conditions([3, 6, 4, 5, 2], seed=7), [1, 2, 3, 4, 5]
    group = MLPGroup(find_gated_mlps(step.tts.model.layers), root=step, eos_token_ids=(10,))
    assert len(group.mlps) == 2
    engine = HookEngine({"synth": group})
    with engine.session(capture={"synth": Capture()}) as session:
        rows = generate_codes(step, conds, seeds, sampling)
    counts = session.counts("synth")
    assert {r.ended for r in rows} == {True, False}
    assert counts.T.tolist() == [c.shape[0] + r.codes.shape[0] for c, r in zip(conds, rows)]
    for b, (c, s) in enumerate(zip(conds, seeds)):
        with engine.session(capture={"synth": Capture()}) as alone:
            generate_codes(step, [c], [s], sampling)
        np.testing.assert_array_equal(alone.counts("synth").K[0], counts.K[b])


def test_codes_equal_the_pinned_runs_of_the_two_sync_loop():
    """Every row of every pinned run (tests/minicpm_code_runs.py): codes, end and positions
    bit for bit as the loop gave them before it kept its state on the device."""
    import json

    from tests.minicpm_code_runs import CASES, GOLDEN, run_case

    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(name for name, *_ in CASES)
    for name, *args in CASES:
        assert run_case(*args) == golden[name], name


# Tensor methods and torch functions that read a tensor's values on the host (a device sync
# on an accelerator); ``.to("cpu")`` is left out: the model calls ``.to`` for dtypes too.
HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu",
              "numpy", "nonzero")


def test_the_loop_reads_the_device_once_a_step(step, monkeypatch):
    import collections
    import sys

    reads = collections.Counter()

    def counted(name, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code
            reads[f"{name} at {caller.co_filename}:{caller.co_name}"] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in ("nonzero", "equal", "is_nonzero"):
        monkeypatch.setattr(torch, name, counted(f"torch.{name}", getattr(torch, name)))
    steps = 30  # no row can end before min_codes: every run takes all the steps
    rows = generate_codes(step, conditions([3, 5, 4]), [1, 2, 3],
                          CodeSampling(min_codes=steps, max_codes=steps))
    monkeypatch.undo()
    assert [r.codes.shape[0] for r in rows] == [steps - 1] * 3
    # one test a step (has every row ended?), skipped at the cap; three reads after the loop
    assert sum(reads.values()) <= steps + 3, dict(reads)


def test_reading_the_stop_flag_late_changes_no_code_or_count(step, monkeypatch):
    """The loop learns a step late that every row ended (``late_stop``): one more step runs,
    and the codes and counts are those of the flag read every step."""
    import numpy as np

    from sync_audit import late_and_every_step

    import esn_core.models.minicpm_speech_codes as loop
    from esn_core.hooks import Capture, HookEngine, MLPGroup, find_gated_mlps

    sampling = CodeSampling(min_codes=0, max_codes=200, temperature=1.0, top_p=1.0, top_k=0)
    conds, seeds = conditions([3, 6, 4, 5, 2], seed=7), [1, 2, 3, 4, 5]
    engine = HookEngine({"synth": MLPGroup(find_gated_mlps(step.tts.model.layers), root=step,
                                           eos_token_ids=(10,))})

    def run():
        with engine.session(capture={"synth": Capture()}) as session:
            rows = generate_codes(step, conds, seeds, sampling)
        return rows, session.counts("synth")

    late, every = late_and_every_step(run, step, loop, monkeypatch)
    ((late_rows, late_counts), late_forwards), ((rows, counts), forwards) = late, every
    assert all(r.ended for r in late_rows)  # every row draws the end code before the cap
    for a, b in zip(late_rows, rows):
        assert torch.equal(a.codes, b.codes) and a.ended == b.ended
    np.testing.assert_array_equal(late_counts.T, counts.T)
    np.testing.assert_array_equal(late_counts.K, counts.K)
    assert late_forwards == forwards + 1


def test_the_code_loop_never_waits_for_the_device_per_step(step):
    """Its stop check is read a step late (``late_stop``): 8 steps wait as often as 3."""
    from sync_audit import SyncAudit

    sites = []
    for codes in (3, 8):
        sampling = CodeSampling(min_codes=codes, max_codes=codes)  # every row runs to the cap
        with SyncAudit() as audit:
            rows = generate_codes(step, conditions([5, 3, 7]), [4, 5, 6], sampling)
        assert [r.codes.shape[0] for r in rows] == [codes - 1] * 3  # the cap's last code dropped
        sites.append((audit.sites, audit.uploads))
    assert sites[0][0] and sites[0] == sites[1]
