"""The benchmark scripts run end to end on CPU (tiny shapes), so they do not rot between
GPU sessions; their figures are only meaningful on a GPU (BENCHMARKS.md)."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_hook_overhead_reports_every_mode_and_the_per_call_cost():
    out = _run("benchmarks/hook_overhead.py", "--shape", "tiny", "--batches", "2", "--prompt", "8",
               "--new", "8", "--repeats", "2", "--alternate-periods", "2", "3")
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
    # whole runs, decode steps, fast-state runs, alternating by periods 2 and 3, composed,
    # prefill, act_fn call
    assert len(rows) == 8
    assert "tokens identical: plain vs plain True; capture vs plain True" in out
    fast = rows[2].split("|")[2:-1]
    assert re.fullmatch(r" [012]/2 ", fast[0])
    assert all(re.fullmatch(r" [012]/2; (nan|[\d.]+)x; (nan|[\d.]+)x ", c) for c in fast[1:])
    cell = r" [\d.]+x \[.*\]; [\d.]+x \[.*\]"
    for row, spill in ((rows[3], ""), (rows[4], r"; after it [\d.]+x")):
        alternating = row.split("|")[2:-1]
        assert len(alternating) == 4 and all(re.fullmatch(cell + spill + " ", c) for c in alternating)
    composed = rows[5].split("|")[2:-1]
    assert re.fullmatch(r" [\d.]+ \+ [\d.]+ ms ", composed[0])
    assert all(re.fullmatch(r" ([\d.]+)-([\d.]+)x \(-?[\d.]+ \+ -?[\d.]+ ms\) ", c) for c in composed[1:])
    per_call = [float(v) for v in re.findall(r"([\d.]+) us", rows[7])]
    assert len(per_call) == 4 and all(v > 0 for v in per_call)


def test_hook_overhead_refuses_periods_longer_than_the_run_allows():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/hook_overhead.py", "--new", "5",
                           "--alternate-periods", "3"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--alternate-periods 3: needs a period >= 2 and --new >= 6 (got --new 5)" in proc.stderr


def test_graph_counting_checks_the_fused_kernel_bit_for_bit_and_times_every_way():
    out = _run("benchmarks/graph_counting.py", "--batches", "2", "--layers", "2", "--width", "64",
               "--replays", "1", "--random", "512")
    checks = [line for line in out.splitlines() if "differs from eager SiLU" in line]
    assert len(checks) == 3 and all("in 0 of" in c and "counts equal" in c for c in checks)
    row = next(line for line in out.splitlines() if line.startswith("| 2 |"))
    assert len(re.findall(r"[\d.]+ us", row)) == 4


def _omni_modes(attempts: int, *flags: str) -> tuple[str, list[str]]:
    """The tiny Qwen2.5-Omni benchmark at batch 2, modes off and capture with ``flags``:
    its output and the modes of its table, in order."""
    out = _run("benchmarks/qwen_omni_throughput.py", "--tiny", "--batches", "2", "--repeats", "1",
               "--warmup", "0", "--min-attempts", str(attempts), "--modes", "off", "capture",
               "--token2wav-steps", "2", *flags)
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
    return out, [row.split("|")[3].strip() for row in rows]


def test_qwen_omni_throughput_runs_each_mode_on_both_decodes_and_checks_the_graphs():
    out, modes = _omni_modes(2, "--cuda-graphs", "both")
    assert modes == ["off", "capture", "off+graphs", "capture+graphs"]
    # hook ratios against the plain run of the same decode
    assert re.search(r"\| 2 \| 2 \| capture\+graphs \|.*\([\d.]+x\)", out)
    # CPU runs the fixed-slot path without recording: the check must find it identical
    check = next(line for line in out.splitlines() if "graphs vs the eager fixed-slot path" in line)
    assert "tokens identical; lm T identical, K identical; synth T identical, K identical" in check
    assert re.search(r"\(([1-9]\d*) graph replays\)", check)
    assert "graphs over eager decode, per step: thinker" in out


def test_qwen_omni_throughput_runs_the_eager_batch_1_loop_beside_graphs_at_larger_batches():
    out = _run("benchmarks/qwen_omni_throughput.py", "--tiny", "--batches", "1", "2", "--repeats", "1",
               "--warmup", "0", "--min-attempts", "2", "--modes", "off", "--token2wav-steps", "2",
               "--cuda-graphs", "both", "--eager-batches", "1")
    table = {(cells[1], cells[3]): cells for cells in
             ([c.strip() for c in line.split("|")] for line in out.splitlines()
              if re.match(r"\| [12] \|", line))}
    assert sorted(table) == [("1", "off"), ("1", "off+graphs"), ("2", "off+graphs")]
    rate = {key: float(cells[8].replace(",", "")) for key, cells in table.items()}
    line = next(line for line in out.splitlines() if "over the eager batch-1 loop (off, same run)" in line)
    printed = float(re.search(r"batch 2 off\+graphs ([\d.]+)x", line).group(1))
    assert printed == pytest.approx(rate[("2", "off+graphs")] / rate[("1", "off")], abs=0.06)


def test_qwen_omni_throughput_times_overlapped_speech_beside_one_batch_after_another():
    out, modes = _omni_modes(4, "--overlap-speech", "both")
    assert modes == ["off", "capture", "off+overlap", "capture+overlap"]
    # hooks against the plain run of the same kind; overlap against the same mode without it
    assert re.search(r"\| 2 \| 4 \| capture\+overlap \|.*\([\d.]+x\)", out)
    assert re.search(r"overlapped over one batch after another .*: off\+overlap [\d.]+x, "
                     r"capture\+overlap [\d.]+x", out)


def test_qwen_omni_throughput_reports_parts_modes_and_json(tmp_path):
    target = tmp_path / "omni.json"
    out = _run("benchmarks/qwen_omni_throughput.py", "--tiny", "--batches", "1", "3", "--repeats", "1",
               "--warmup", "0", "--min-attempts", "3", "--modes", "off", "capture", "steer", "fp32",
               "--token2wav-steps", "2", "--out", str(target))
    rows = [line for line in out.splitlines() if line.startswith("| 3 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["off", "capture", "steer", "fp32"]
    assert "each row ends at its own lengths" in out
    assert re.search(r"batch 3 [\d.]+x", out)  # the batch-1 loop is the anchor of the same run
    saved = json.loads(target.read_text())
    codec = [a["codec_tokens"] for a in saved["workload"]]
    assert len(codec) == 3 and len(set(codec)) > 1  # rows of different lengths in one batch
    for result in saved["results"]:
        # token2wav = DiT + BigVGAN (+ the little glue between them)
        assert result["dit"] + result["bigvgan"] <= result["token2wav"] + 1e-9
        assert result["step_ms"]["talker"] > 0 and result["step_ms"]["thinker"] > 0
        assert result["utterances_per_hour"] == 3 / result["total"] * 3600


def test_token2wav_ragged_compares_every_path_against_the_per_row_decode(tmp_path):
    target = tmp_path / "t2w.json"
    out = _run("benchmarks/token2wav_ragged.py", "--tiny", "--rows", "4", "--steps", "2",
               "--micro", "2", "4", "--dit-mask", "both", "--ode-solver", "both", "--out", str(target))
    saved = json.loads(target.read_text())
    paths = [r["path"] for r in saved["results"]]
    solver = ", transformers' solver"
    assert paths == ["per row", "buckets"] + [
        f"ragged m{m}{mask}{s}" for m in (2, 4) for mask in ("", ", per-head mask") for s in ("", solver)]
    assert len(set(saved["lengths"])) > 1
    by_path = {r["path"]: r for r in saved["results"]}
    assert by_path["per row"]["min_snr_db"] == float("inf")  # the reference itself
    assert by_path["ragged m4"]["calls"] == 1 and by_path["ragged m2"]["calls"] == 2
    for path in ("buckets", "ragged m2", "ragged m4", "ragged m4, per-head mask"):
        assert by_path[path]["min_snr_db"] > 100, path  # float32 on CPU: rounding only
    for path in ("ragged m2", "ragged m4", "ragged m4, per-head mask"):
        # the same waveforms on either solver, so the same distance from the reference
        assert by_path[path + solver]["max_abs"] == by_path[path]["max_abs"], path
    assert "| ragged m4 | 4 | 1 |" in out


def test_kimi_detokenizer_batched_checks_every_batched_path_against_the_per_row_decode(tmp_path):
    target = tmp_path / "kimi_detok.json"
    out = _run("benchmarks/kimi_detokenizer_batched.py", "--shape", "tiny", "--device", "cpu",
               "--rows", "4", "--steps", "2", "--micro", "2", "4", "--vocoder-by-length",
               "--out", str(target))
    saved = json.loads(target.read_text())
    assert [r["path"] for r in saved["results"]] == [
        "per row", "batched m2", "batched m2, vocoder by length", "batched m4",
        "batched m4, vocoder by length"]
    lengths = saved["lengths"]
    assert len(lengths) == 4 and len(set(lengths)) > 1
    assert all(10 <= n <= 80 for n in lengths)  # 2-5 s x 0.85-1.25 at 12.5 codes a second
    by_path = {r["path"]: r for r in saved["results"]}
    assert by_path["per row"]["min_snr_db"] == float("inf") and by_path["per row"]["calls"] == 4
    assert by_path["batched m4"]["calls"] == 1 and by_path["batched m2"]["calls"] == 2
    for result in saved["results"][1:]:
        assert result["min_snr_db"] > 100 and result["max_abs"] < 1e-5, result  # float32 rounding
        assert result["dit_ms_per_row"] + result["vocoder_ms_per_row"] <= result["ms_per_row"] + 1e-6
    assert "| batched m4 | 4 | 1 |" in out and "# per row / batched: batched m2" in out
    assert "is proportional to its input" in out


def test_minicpm_vocoder_batched_checks_every_batched_path_against_the_per_row_decode(tmp_path):
    from tests.test_minicpm_vocoder import F32_MAX_ABS, F32_MIN_SNR_DB

    target = tmp_path / "minicpm_vocoder.json"
    out = _run("benchmarks/minicpm_vocoder_batched.py", "--shape", "tiny", "--device", "cpu",
               "--rows", "4", "--steps", "2", "--micro", "2", "4", "--out", str(target))
    saved = json.loads(target.read_text())
    assert [r["path"] for r in saved["results"]] == ["per row", "batched m2", "batched m4"]
    lengths, prompts = saved["lengths"], saved["prompt_tokens"]
    assert len(lengths) == 4 and len(set(lengths)) > 1
    # 2-5 s x 0.85-1.25 at 25 codes a second, at least the code loop's 50; the prompt is the
    # 2-5 s source at 25 tokens a second
    assert all(50 <= n <= 157 for n in lengths) and all(50 <= p <= 125 for p in prompts)
    by_path = {r["path"]: r for r in saved["results"]}
    per_row = by_path["per row"]
    assert per_row["min_snr_db"] == float("inf") and per_row["max_abs"] == 0
    assert per_row["calls"] == per_row["hift_calls"] == 4  # one flow and one HiFT call per row
    assert by_path["batched m2"]["calls"] == by_path["batched m2"]["hift_calls"] == 2
    assert by_path["batched m4"]["calls"] == by_path["batched m4"]["hift_calls"] == 1
    for result in saved["results"]:
        assert result["rows"] == 4 and result["peak_gib"] is None  # CPU: no peak memory
        assert 0 < result["flow_ms_per_row"] + result["hift_ms_per_row"] <= result["ms_per_row"]
    for result in saved["results"][1:]:  # float32 rounding, as tests/test_minicpm_vocoder.py
        assert result["max_abs"] <= F32_MAX_ABS and result["min_snr_db"] >= F32_MIN_SNR_DB, result
    assert "| batched m4 | 4 | 1 |" in out and "# per row / batched: batched m2" in out


def test_minicpm_vocoder_benchmark_shapes_are_the_test_checkpoint_and_the_published_flow(tmp_path):
    import torch

    from esn_core.models.flow_yaml import build_flow
    from tests.test_minicpm_vocoder import PUBLISHED_FLOW_YAML, TINY_FLOW_YAML

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from minicpm_vocoder_batched import FLOW_YAML

    def shapes(text, name):
        (tmp_path / name).write_text(text)
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in build_flow(tmp_path / name).state_dict().items()}

    assert shapes(FLOW_YAML["tiny"], "tiny.yaml") == shapes(TINY_FLOW_YAML, "test.yaml")
    assert shapes(FLOW_YAML["full"], "full.yaml") == shapes(PUBLISHED_FLOW_YAML, "published.yaml")


def test_forced_lengths_end_each_row_at_its_own_step():
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from workloads import ForcedLengths

    forced = ForcedLengths([0, 2], end_ids=[5, 6])
    scores = torch.zeros(2, 8)
    scores[:, 6] = 3.0  # the second end id would win on its own
    picks = []
    for step in range(3):
        ids = torch.zeros(2, 4 + step, dtype=torch.long)  # a 4-token prompt, then the answer
        picks.append(forced(ids, scores).argmax(dim=-1).tolist())
    # row 0 ends at step 0 (with the first end id); row 1 may not end before step 2
    assert picks[0][0] == 5 and picks[0][1] not in (5, 6)
    assert picks[1][1] not in (5, 6) and picks[2][1] == 5
    out = forced(torch.zeros(2, 5, dtype=torch.long), scores)
    assert torch.isinf(out[1, [5, 6]]).all() and out[1, 0] == 0  # step 1: ends masked only
    assert torch.equal(scores[:, 6], torch.full((2,), 3.0))  # the caller's scores untouched


def test_esd_like_lengths_and_even_subsets():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from workloads import esd_like, spread

    draw = esd_like(400, seed=3)
    assert draw == esd_like(400, seed=3)
    seconds = np.array([a.source_seconds for a in draw])
    codec = np.array([a.codec_tokens for a in draw])
    assert 2.0 <= seconds.min() and seconds.max() <= 5.0
    ratio = codec / (50 * seconds)  # speech 0.85-1.25x the source at 50 codes per second
    assert ratio.min() >= 0.85 - 0.01 and ratio.max() <= 1.25 + 0.01
    assert len(set(codec.tolist())) > 100
    subset = spread(draw, 5)
    ordered = sorted(codec.tolist())
    assert [a.codec_tokens for a in subset] == [ordered[i] for i in (0, 100, 200, 299, 399)]


def test_vocoder_benchmark_helpers_rates_rows_errors_and_part_timer():
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from workloads import (
        Attempt, PartTimer, codes_at, random_codes, snr_db, spread_indices, worst_difference,
    )

    answer = Attempt(3.0, 10, 150)  # 3 s of speech at 50 codes a second
    assert codes_at(answer, 25) == 75 and codes_at(answer, 12.5) == 38  # 37.5 rounds to even
    assert codes_at(answer, 25, minimum=100) == 100 and codes_at(Attempt(0.1, 4, 1), 12.5) == 1
    assert spread_indices([30, 10, 20, 40, 50], 3) == [0, 1, 4]  # middle, shortest, longest
    assert spread_indices([3, 1, 2], 5) == [1, 2, 0]  # every row, shortest first
    reference = torch.tensor([1.0, -1.0, 2.0, 0.0])
    assert snr_db(reference, reference.clone()) == float("inf")
    # error energy 0.25 against 6: 10 log10(24)
    assert abs(snr_db(reference, reference + torch.tensor([0.5, 0, 0, 0])) - 10 * np.log10(24)) < 1e-9
    max_abs, low_snr = worst_difference([(reference, reference), (reference.numpy(), reference.numpy() - 0.5)])
    assert max_abs == 0.5 and abs(low_snr - 10 * np.log10(6 / 1.0)) < 1e-9

    class Part:
        def run(self, x):
            return x + 1

    part, synced = Part(), []
    timer = PartTimer(sync=lambda: synced.append(1))
    timer.wrap("part", part, "run")
    assert part.run(1) == 2 and part.run(2) == 3
    assert timer.calls == {"part": 2} and timer.seconds["part"] > 0 and len(synced) == 4
    before = timer.snapshot()
    timer.reset()
    assert timer.calls == {"part": 0} and timer.seconds == {"part": 0.0} and before["calls"] == {"part": 2}
    # median_run: the parts reset before each run; the median run's result and parts come back
    import time as _time
    plan = iter([(0.2, 1, "slow"), (0.0, 3, "fast"), (0.05, 2, "median")])  # (sleep, calls, result)

    def run():
        pause, calls, name = next(plan)
        _time.sleep(pause)
        for _ in range(calls):
            part.run(0)
        return name

    seconds, result, parts, peak = timer.median_run(run, 3, "cpu")
    assert result == "median" and parts["calls"] == {"part": 2} and peak is None
    assert 0.05 <= seconds < 0.2
    assert PartTimer.on("cpu").sync() is None
    codes = random_codes([3, 0, 5], 7, seed=1)
    assert [len(c) for c in codes] == [3, 0, 5] and all(0 <= x < 7 for c in codes for x in c)
    assert codes == random_codes([3, 0, 5], 7, seed=1) != random_codes([3, 0, 5], 7, seed=2)


def test_decode_kernel_cost_reports_every_part():
    out = _run("benchmarks/decode_kernel_cost.py", "--shape", "tiny", "--batch", "2",
               "--prompt", "8", "--new", "6", "--repeats", "2")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == [
        "plain/plain (control)", "engine: steer", "engine: steer, empty masks", "engine: capture",
        "bare: silu", "bare: silu, mul_ by steering operand", "bare: silu, mul_ by ones"]
    assert all(re.fullmatch(r" [\d.]+x \[[\d.]+, [\d.]+\] ", r[1]) for r in rows[1:])


def test_alternating_ratios_pair_each_hooked_step_with_its_plain_neighbours(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from hook_overhead import alternating_ratios

    # forwards 1..5 take 1, 2, 1, 4, 3 s: 2 and 4 ran hooked
    steps, mean, spill = alternating_ratios([0.0, 1.0, 3.0, 4.0, 8.0, 11.0])
    assert steps == [2 / 1, 4 / 2]
    assert mean == (2 + 4) / 2 / ((1 + 1 + 3) / 3)
    assert spill == []  # with period 2 the step after a hooked one is a neighbour itself


def test_alternating_ratios_over_longer_periods_compare_with_clean_plain_steps(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from hook_overhead import alternating_ratios, hooked_forward

    # period 3: forwards 0 (the prefill), 3, 6 hooked. Forwards 1..8 take
    # 5, 2, 4, 3, 2, 6, 4, 2 s: forward 3 (4 s) against forwards 2 and 5 (2, 2), the step
    # after it (forward 4, 3 s) against the same; forward 6 (6 s) against forwards 5 and 8.
    assert [hooked_forward(f, 3) for f in range(9)] == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    stamps = np.cumsum([0.0, 5, 2, 4, 3, 2, 6, 4, 2]).tolist()
    steps, mean, spill = alternating_ratios(stamps, period=3)
    assert steps == [4 / 2, 6 / 2]
    assert spill == [3 / 2, 4 / 2]
    assert mean == ((4 + 6) / 2) / ((2 + 2 + 2) / 3)  # plain steps after a plain step only


def test_alternator_leaves_hooks_on_for_one_forward_in_each_period(monkeypatch):
    import contextlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from hook_overhead import Alternator

    class Session:
        hooked = True

        @contextlib.contextmanager
        def paused(self):
            self.hooked = False
            yield
            self.hooked = True

    for period, want in ((2, [1, 0, 1, 0, 1, 0, 1]), (3, [1, 0, 0, 1, 0, 0, 1])):
        session = Session()
        alternator = Alternator(session, period)
        seen = [session.hooked]  # forward 0; generate calls the alternator after each forward
        for _ in range(6):
            alternator()
            seen.append(session.hooked)
        assert seen == [bool(w) for w in want]
        alternator()  # forward 7 is plain; close() puts the hooks back
        assert not session.hooked
        alternator.close()
        assert session.hooked


def test_composed_ratios_add_the_parts_of_a_whole_generate(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from hook_overhead import composed_ratios

    # 3 ms more to enter the session, 100 ms prefill 10% slower, 900 ms of decode steps 2%
    # (per step) or 4% (per run) slower, 5 ms more to leave:
    # (3 + 10 + 18 + 5) / 1000 and (3 + 10 + 36 + 5) / 1000.
    row = {"prefill_ms": 100.0, "decode_ms": 900.0, "capture (prefill)": 1.1,
           "entering_ms": {"capture": 3.0}, "leaving_ms": {"capture": 5.0},
           "alternating": {2: {"capture": {"steps": [1.01, 1.03, 1.02], "means": [1.04]}}}}
    low, high = composed_ratios(row, "capture")
    assert abs(low - 1.036) < 1e-12 and abs(high - 1.054) < 1e-12


def test_prefill_paths_compares_both_paths_and_finds_them_identical():
    out = _run("benchmarks/prefill_paths.py", "--batches", "1", "3", "--prompt", "12", "--repeats", "2")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d", line)]
    assert [r[0].strip() for r in rows] == ["1", "3"]
    for row in rows:
        assert all(re.fullmatch(r" [\d.]+x \[[\d.]+, [\d.]+\] ", c) for c in row[3:5])
        assert row[5].strip() == "True"  # the two paths give bit-identical hidden states
    assert "default SPARSE_MIN_ELEMENTS = 2^24" in out


def test_prefill_counting_times_every_way_and_the_ways_count_alike():
    out = _run("benchmarks/prefill_counting.py", "--batches", "3", "16", "--width", "40",
               "--layers", "2", "--repeats", "1")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r[0].strip() for r in rows] == ["3", "16"]
    for row in rows:
        total, real = re.fullmatch(r" ([\d,]+) \(([\d,]+)\) ", row[1]).groups()
        assert int(real.replace(",", "")) < int(total.replace(",", ""))  # left padding exists
        assert all(float(c) > 0 for c in row[2:8]) and row[9].strip() == "True"


def test_step_counting_fused_ways_count_as_the_engine_does():
    out = _run("benchmarks/step_counting.py", "--batches", "5", "--width", "24", "--layers", "2",
               "--repeats", "2")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 1 and rows[0][0].strip() == "5"
    assert all(float(c) > 0 for c in rows[0][1:6]) and rows[0][7].strip() == "True"


def _assert_paired_table(out: str, expected: list[tuple[str, str, str]]) -> dict:
    """The ``--paired-repeats`` table: (batch, part, calls) rows as ``expected`` (batch 1 is
    never paired), and each ratio the one of its printed sums, up to the printing's rounding.
    Returns each (batch, part)'s (off, capture) sums."""
    paired = [line.split("|")[1:-1] for line in out.splitlines()
              if re.match(r"\| \d+ \| [a-z +]+ \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", line)]
    assert [tuple(c.strip() for c in r[:3]) for r in paired] == expected
    sums = {}
    for row in paired:
        off, capture, ratio = float(row[3]), float(row[4]), float(row[5].strip()[:-1])
        assert abs(ratio - capture / off) <= 0.0005 + 0.0005 * (1 + capture) / off ** 2
        low, high = map(float, re.fullmatch(r" \[([\d.]+), ([\d.]+)\] ", row[6]).groups())
        assert low <= ratio + 0.0005 and ratio - 0.0005 <= high  # the interval holds its ratio
        assert re.fullmatch(r" [\d.]+x \[[\d.]+, [\d.]+\] ", row[7])
        sums[row[0].strip(), row[1].strip()] = (off, capture)
    return sums


def test_paired_calls_times_every_part_in_abba_order(capsys):
    """Known answers: a fake call whose parts' seconds say which mode and call ran; the
    pairs run off first on even calls, capture first on odd ones, after one untimed call
    of each mode, and every part's pairs and sums come from the same calls."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hook_overhead import paired_calls, paired_rows

    order = []

    def time_call(chunk, mode):
        order.append((chunk, mode))
        lm = chunk + (0.5 if mode == "capture" else 0.0)
        return {"whole": lm + 10.0, "lm": lm}

    parts = paired_calls([1.0, 2.0, 3.0], time_call)
    assert order == [(1.0, "off"), (1.0, "capture"), (1.0, "off"), (1.0, "capture"),
                     (2.0, "capture"), (2.0, "off"), (3.0, "off"), (3.0, "capture")]
    assert list(parts) == ["whole", "lm"]
    totals, pairs = parts["lm"]
    assert pairs == [(1.0, 1.5), (2.0, 2.5), (3.0, 3.5)] and totals == {"off": 6.0, "capture": 7.5}
    totals, pairs = parts["whole"]
    assert pairs == [(11.0, 11.5), (12.0, 12.5), (13.0, 13.5)] and totals == {"off": 36.0, "capture": 37.5}
    table = paired_rows(8, parts)
    sums = _assert_paired_table(table, [("8", "whole", "3"), ("8", "lm", "3")])
    assert sums == {("8", "whole"): (36.0, 37.5), ("8", "lm"): (6.0, 7.5)}
    assert "| 1.250x |" in table and "| 1.042x |" in table  # 7.5 / 6 and 37.5 / 36
    printed = capsys.readouterr().out
    assert "# pair 2/3: whole: off 12.000 s, capture 12.500 s (1.042x); lm: off 2.000 s" in printed
    # a call that returns plain seconds is the part "call"
    assert list(paired_calls([1.0], lambda chunk, mode: chunk)) == ["call"]


def test_paired_ratio_interval_resamples_whole_pairs():
    """Known answers: pairs (1 s, 1 s) and (1 s, 2 s) resample to ratios of sums 1, 1.5 and 2
    with chances 1/4, 1/2, 1/4, so the 95 % interval is [1, 2]; pairs of one ratio give it
    exactly, however their lengths differ; the interval is seeded."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hook_overhead import paired_row, ratio_interval

    assert ratio_interval([(1.0, 1.0), (1.0, 2.0)]) == (1.0, 2.0)
    low, high = ratio_interval([(2.0, 2.1), (4.0, 4.2), (8.0, 8.4)])
    assert abs(low - 1.05) < 1e-12 and abs(high - 1.05) < 1e-12
    spread = [(4.0, 4.0 * r) for r in (0.9, 1.0, 1.05, 1.1, 1.2)]
    low, high = ratio_interval(spread)
    assert low < 1.05 < high and ratio_interval(spread) == (low, high)
    row = paired_row(256, "call", {"off": 20.0, "capture": 21.0}, spread)
    assert row.startswith("| 256 | call | 5 | 20.000 | 21.000 | 1.050x | [") and "| 1.050x [1.000, 1.100] |" in row


def test_kimi_audio_throughput_ends_every_row_at_its_drawn_lengths(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kimi_audio_throughput as bench
    from workloads import esd_like

    adapter = bench.build("tiny", "cpu", "float32")
    attempts = esd_like(3, seed=4)
    rows = bench.run(adapter, attempts, seed=0)
    assert [len(r.codes) for r in rows] == [bench.answer_codes(a) for a in attempts]
    assert all(r.ended for r in rows)
    # the step loop with lengths forced ran as long as the longest row's delay + codes + end
    delay = adapter.sampling.audio_delay
    assert [r.n_positions for r in rows] == [
        n + delay + bench.answer_codes(a) for n, a in zip(
            bench.prompt_batch(adapter, attempts, 0).lengths, attempts)]
    assert adapter.lm is not None and not isinstance(adapter.lm, bench.ForcedEnds)

    bench.main(["--batches", "1", "2", "--attempts", "2", "--single-rows", "1", "--repeats", "1",
                "--alternate-repeats", "1", "--paired-repeats", "2"])
    out = capsys.readouterr().out
    assert "| 2 | 2 | capture |" in out and "capture overhead" in out and "the batch-1 loop" in out
    _assert_paired_table(out, [("2", "call", "2")])  # 2 rows at batch 2, two passes: 2 calls
    # hooks off never leave a session; capture's time leaving them (~1 ms here, printed to
    # 0.1 ms) is part of its total
    whole = {(r[0].strip(), r[2].strip()): (float(r[3]), float(r[4])) for r in
             (line.split("|")[1:-1] for line in out.splitlines())
             if len(r) == 8 and r[2].strip() in ("off", "capture")}
    assert whole["2", "off"][1] == 0 and 0 < whole["2", "capture"][1] < whole["2", "capture"][0]
    # per-step overhead: every mode at every batch, ratios of hooked steps to plain neighbours
    alternating = [line.split("|")[1:-1] for line in out.splitlines()
                   if re.match(r"\| \d+ \| (control|capture|steer)", line)]
    assert [(r[0].strip(), r[1].strip()) for r in alternating] == [
        (b, m) for b in ("1", "2") for m in bench.ALTERNATING]
    for row in alternating:
        assert all(re.fullmatch(r" [\d.]+x \[[\d.]+, [\d.]+\] ", c) for c in row[2:4])
        assert int(row[4]) > 10  # hooked steps compared: about half the run's steps


def _whole_conversion_rows(out: str, columns: int) -> dict:
    """The main table's (batch, mode) -> its numeric cells, for a table of ``columns``."""
    return {(r[0].strip(), r[2].strip()): [float(c.replace(",", "")) for c in r[3:]] for r in
            (line.split("|")[1:-1] for line in out.splitlines())
            if len(r) == columns and r[2].strip() in ("off", "capture")}


def test_composed_whole_adds_each_part_of_a_call():
    """Known answer: prefill 1 s (capture 1.5x), decode 9 s, entering 0.1 s and leaving
    0.2 s: capture adds 0.1 + 0.5 + 0.2 s and 9 s x (step ratio - 1) to a 10 s call."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hook_overhead import composed_loops, composed_whole

    low, high = composed_whole(1.0, 9.0, 0.1, 0.2, 1.5, [1.02, 1.01])
    assert abs(low - 1.089) < 1e-12 and abs(high - 1.098) < 1e-12
    assert composed_whole(2.0, 6.0, 0.0, 0.0, 1.0, [1.0]) == (1.0, 1.0)  # nothing added
    # two loops in a 20 s call (2 s of it unhooked): 0.3 s fixed, prefills +0.2 and +0.1 s,
    # decodes 8 s and 6 s at +1 % / +2 % (medians) and +2 % / +1 % (means)
    low, high = composed_loops(20.0, 0.1, 0.2, [(2.0, 1.1, 8.0, [1.01, 1.02]),
                                                (2.0, 1.05, 6.0, [1.02, 1.01])])
    assert abs(low - (1 + (0.6 + 0.08 + 0.12) / 20)) < 1e-12
    assert abs(high - (1 + (0.6 + 0.16 + 0.06) / 20)) < 1e-12
    with pytest.raises(ValueError, match="same kinds"):
        composed_loops(1.0, 0, 0, [(0.1, 1.0, 0.5, [1.0]), (0.1, 1.0, 0.3, [1.0, 1.1])])


def test_kimi_audio_composed_overhead_table_is_its_parts(capsys):
    """``--composed-repeats``: one row per batch; the composed ratio is the printed parts'
    (up to their printing), the decode the whole call less its prefill."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kimi_audio_throughput as bench

    bench.main(["--batches", "2", "--attempts", "2", "--repeats", "0", "--alternate-repeats", "0",
                "--composed-repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| 2 \| [\d.]+ \| ", line)]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0]]
    prefill, entering, leaving, decode, whole = (float(cells[i]) for i in (1, 3, 4, 5, 8))
    prefill_ratio = float(cells[2].split("x")[0])
    steps = [float(x) for x in re.findall(r"([\d.]+)x", cells[6])]
    control = [float(x) for x in re.findall(r"([\d.]+)x", cells[7])]
    assert len(steps) == len(control) == 2 and prefill > 0 and decode > 0
    assert entering >= 0 and leaving > 0 and abs(decode + prefill / 1e3 - whole) <= 0.002
    # composed from the raw step ratios, and from the step ratios over the control's
    for cell, ratios in ((cells[9], steps), (cells[10], [s / c for s, c in zip(steps, control)])):
        low, high = (float(x) for x in re.fullmatch(r"([\d.]+)x-([\d.]+)x", cell).groups())
        for ratio, expected in zip(sorted([low, high]), sorted(
                1 + ((entering + prefill * (prefill_ratio - 1) + leaving) / 1e3 + decode * (r - 1))
                / (prefill / 1e3 + decode) for r in ratios)):
            assert abs(ratio - expected) <= 0.003


def test_minicpm_o_composed_overhead_is_its_loops_parts(capsys):
    """``--composed-repeats``: a row per loop (text, codes) and the composed ratio, which
    is ``composed_loops`` of the printed parts (up to their printing)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import minicpm_o_throughput as bench

    bench.main(["--batches", "2", "--attempts", "2", "--repeats", "0", "--alternate-repeats", "0",
                "--composed-repeats", "1"])
    out = capsys.readouterr().out
    rows = {r[1].strip(): [c.strip() for c in r] for r in
            (line.split("|")[1:-1] for line in out.splitlines())
            if len(r) == 7 and r[0].strip() == "2" and r[1].strip() in ("text", "codes")}
    assert list(rows) == ["text", "codes"]
    summary = re.search(r"# batch 2: entering ([\d.]+) ms, leaving ([\d.]+) ms, whole call off "
                        r"([\d.]+) s \(text \+ codes\); composed capture / off ([\d.]+)x-([\d.]+)x; "
                        r"steps over control ([\d.]+)x-([\d.]+)x", out)
    entering, leaving, whole, low, high, c_low, c_high = map(float, summary.groups())
    fixed = (entering + leaving) / 1e3
    raw, over_control = [0.0, 0.0], [0.0, 0.0]  # the decodes' extra seconds, by kind of ratio
    for cells in rows.values():
        prefill, ratio, decode = float(cells[2]) / 1e3, float(cells[3].split("x")[0]), float(cells[4])
        assert prefill > 0 and decode > 0
        fixed += prefill * (ratio - 1)
        steps = [float(x) for x in re.findall(r"([\d.]+)x", cells[5])]
        control = [float(x) for x in re.findall(r"([\d.]+)x", cells[6])]
        for k in range(2):
            raw[k] += decode * (steps[k] - 1)
            over_control[k] += decode * (steps[k] / control[k] - 1)
    for (a, b), extras in (((low, high), raw), ((c_low, c_high), over_control)):
        expected = sorted(1 + (fixed + extra) / whole for extra in extras)
        assert abs(a - expected[0]) <= 0.004 and abs(b - expected[1]) <= 0.004


def test_kimi_audio_throughput_times_whole_conversions_with_speech(capsys):
    """``--speech``: every call's codes go through the speech decoder (80 ms of 16 kHz audio
    a code), its seconds are part of the call's, and the paired table gives the whole
    conversion and the LM's part from the same calls."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kimi_audio_throughput as bench
    from workloads import esd_like

    adapter = bench.build("tiny", "cpu", "float32")
    bench.attach_speech(adapter, "tiny", max_rows=2)
    attempts = esd_like(3, seed=4)
    rows = bench.run(adapter, attempts, seed=0)
    waves = adapter.speak_rows([r.codes for r in rows], [0, 1, 2])
    assert [len(w) for w in waves] == [1280 * bench.answer_codes(a) for a in attempts]

    bench.main(["--batches", "2", "--attempts", "2", "--repeats", "1", "--alternate-repeats", "0",
                "--paired-repeats", "2", "--speech", "--speech-batch", "2"])
    out = capsys.readouterr().out
    assert "whole conversions: speech decoder (3 Euler points a chunk, 2 rows a call)" in out
    for (batch, mode), (seconds, leaving, speech, rate, _) in _whole_conversion_rows(out, 8).items():
        assert 0 < speech < seconds and abs(rate - 2 / seconds * 3600) <= 0.5 + 1e-3 * rate
    sums = _assert_paired_table(out, [("2", "whole conversion", "2"), ("2", "text + codes", "2")])
    for mode in (0, 1):  # the LM's part is part of the whole, call by call and so in sum
        assert 0 < sums["2", "text + codes"][mode] < sums["2", "whole conversion"][mode]


def test_minicpm_o_throughput_times_whole_conversions_with_speech(capsys):
    """``--speech``: every call's codes go through the vocoder (40 ms of 16 kHz audio a code,
    each row's source as its prompt); text, codes and speech are parts of the call."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import minicpm_o_throughput as bench
    from workloads import esd_like

    adapter = bench.build("tiny", "cpu", "float32")
    adapter.vocoder = bench.build_vocoder("tiny", "cpu", 2)
    attempts = esd_like(3, seed=2)
    _, codes, _, _ = bench.convert(adapter, attempts, seed=0)
    waves = bench.speak(adapter, attempts, codes, seed=0)
    assert [len(w) for w in waves] == [640 * bench.answer_codes(a, adapter.sampling) for a in attempts]

    bench.main(["--batches", "2", "--attempts", "2", "--repeats", "1", "--alternate-repeats", "0",
                "--paired-repeats", "2", "--speech", "--speech-steps", "2"])
    out = capsys.readouterr().out
    assert "whole conversions: vocoder (float32, 2 flow steps, 16 rows a call)" in out
    for (batch, mode), (total, text_s, code_s, speech_s, rate, _) in _whole_conversion_rows(out, 9).items():
        assert 0 < text_s and 0 < code_s and 0 < speech_s
        assert text_s + code_s + speech_s <= total + 0.002  # each printed to 1 ms
    sums = _assert_paired_table(out, [("2", "whole conversion", "2"), ("2", "text + codes", "2")])
    for mode in (0, 1):
        assert 0 < sums["2", "text + codes"][mode] < sums["2", "whole conversion"][mode]


def test_counts_to_host_times_every_staging_policy():
    out = _run("benchmarks/counts_to_host.py", "--batches", "2", "3", "--groups", "50", "7",
               "--repeats", "1")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r[0].strip() for r in rows] == ["2", "3"]
    assert all(len(r) == 6 and all(float(c) >= 0 for c in r[2:]) for r in rows)


def test_capture_profile_finds_the_session_exit_and_the_counting_ops():
    out = _run("benchmarks/capture_profile.py", "--batches", "2", "--top", "400", "--repeats", "1")
    host = out.split("extra host ms with capture")[1]
    extra_calls = {r[0].strip(): int(r[2].replace(",", "")) for r in
                   (line.split("|")[1:-1] for line in host.splitlines()[2:]) if len(r) == 3}
    # capture adds one exit, and comparisons (the prefill's and the step flushes' g > 0)
    assert extra_calls["capture session exit"] == 1 and extra_calls["aten::gt"] > 0
    assert re.search(r"\| off \| [\d.]+ \|", out) and re.search(r"\| capture \| [\d.]+ \|", out)
    # phases: one prefill, the decode steps (as many as the longest row's delay + codes +
    # end, minus the prefill's own first position), the exit only with capture
    phases = {r[0].strip(): int(r[5].replace(",", "")) for r in
              (line.split("|")[1:-1] for line in out.splitlines()) if len(r) == 6 and
              r[0].strip().startswith(("phase:", "capture session exit"))}
    assert phases["phase: prefill"] == 1 and phases["capture session exit"] == 1
    assert phases["phase: decode step"] > 10


def test_minicpm_o_throughput_ends_every_row_at_its_drawn_lengths(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import minicpm_o_throughput as bench
    from workloads import esd_like

    adapter = bench.build("tiny", "cpu", "float32")
    attempts = esd_like(3, seed=2)
    texts, codes, _, _ = bench.convert(adapter, attempts, seed=0)
    assert [len(t.tokens) for t in texts] == [a.text_tokens for a in attempts]
    assert [c.codes.shape[0] for c in codes] == [bench.answer_codes(a, adapter.sampling)
                                                  for a in attempts]
    assert all(t.ended for t in texts) and all(c.ended for c in codes)
    # at least upstream's 50 codes; 25 a second of speech otherwise
    assert all(c.codes.shape[0] >= 50 for c in codes)

    bench.main(["--batches", "1", "2", "--attempts", "4", "--single-rows", "1", "--repeats", "1",
                "--paired-repeats", "1"])
    out = capsys.readouterr().out
    _assert_paired_table(out, [("2", "call", "2")])  # 4 rows at batch 2, one pass: 2 calls
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| [12] \| \d+ \| (off|capture) \|", line)]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        ("1", "1", "off"), ("1", "1", "capture"), ("2", "4", "off"), ("2", "4", "capture")]
    for r in rows:  # text and code seconds are parts of the total, each printed to 1 ms
        total, text_s, code_s = map(float, r[3:6])
        assert 0 < text_s and 0 < code_s and text_s + code_s <= total + 0.0015
    assert "capture overhead" in out and "the batch-1 loop" in out
    # per-step overhead: each loop, every mode, every batch
    alternating = [line.split("|")[1:-1] for line in out.splitlines()
                   if re.match(r"\| \d+ \| (text|codes) \|", line)]
    assert [tuple(c.strip() for c in r[:3]) for r in alternating] == [
        (b, loop, m) for b in ("1", "2") for loop in bench.LOOPS for m in bench.ALTERNATING]
    assert all(int(r[5]) >= 2 for r in alternating if r[1].strip() == "codes")


def test_decode_beside_runs_the_decode_alone_and_beside_each_load():
    """Every load ran while the decode did (its rounds counted), the decode is timed in each
    condition, and ``alone`` is its own reference (1.00x); ``--profile`` lists the decode's
    costliest ops, costliest first."""
    out = _run("benchmarks/decode_beside.py", "--tiny", "--profile", "3")
    rows = {r[0].strip(): [c.strip() for c in r[1:]] for r in
            (line.split("|")[1:-1] for line in out.splitlines())
            if len(r) == 6 and r[0].strip() in ("alone", "host", "device", "token2wav")}
    assert list(rows) == ["alone", "host", "device", "token2wav"]
    assert rows["alone"][1] == rows["alone"][3] == "1.00x" and rows["alone"][4] == "0"
    for load in ("host", "device", "token2wav"):
        thinker, talker = float(rows[load][0]), float(rows[load][2])
        assert thinker > 0 and talker > 0 and float(rows[load][4]) >= 1
    # --profile: the decode alone, its 3 costliest ops (by CPU time here), each with its calls
    ops = out.split("its 3 costliest ops")[1].split("| load |")[0]
    op_rows = [line.split("|")[1:-1] for line in ops.splitlines()
               if line.startswith("| ") and not line.startswith("| op |")]
    assert len(op_rows) == 3 and all(int(r[1]) >= 1 and float(r[2]) > 0 for r in op_rows)
    totals = [float(r[2]) for r in op_rows]
    assert totals == sorted(totals, reverse=True)


def test_decode_attention_times_both_paths_and_checks_they_agree(tmp_path):
    target = tmp_path / "attention.json"
    out = _run("benchmarks/decode_attention.py", "--tiny", "--batches", "1", "3", "--lengths", "5", "17",
               "--out", str(target))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| tiny |")]
    assert [(r[1], r[2]) for r in rows] == [("1", "5"), ("1", "17"), ("3", "5"), ("3", "17")]
    saved = json.loads(target.read_text())["results"]
    for row, result in zip(rows, saved):
        assert result["max_diff"] < 1e-5  # float32: rounding only
        # the step's attention is one layer's times the model's layers (2 for the tiny shape)
        assert float(row[7]) == pytest.approx(result["expanded_ms"] * 2, abs=1e-3)
        assert float(row[8]) == pytest.approx(result["packed_ms"] * 2, abs=1e-3)


def test_the_attention_option_puts_an_adapter_back_on_transformers_sdpa_and_says_so():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from workloads import set_attention

    from esn_core.models.decode_attention import NAME, grouped_query_configs, use_packed_decode_attention
    from tests.test_decode_attention import _tiny_qwen2

    model = _tiny_qwen2()
    use_packed_decode_attention(model)  # as the adapters leave it
    assert set_attention(model, "packed") == "decode attention: packed"
    assert [c._attn_implementation for c in grouped_query_configs(model)] == [NAME]
    assert set_attention(model, "stock") == "decode attention: transformers' sdpa"
    assert [c._attn_implementation for c in grouped_query_configs(model)] == ["sdpa"]
    out = _run("benchmarks/qwen_omni_throughput.py", "--tiny", "--batches", "1", "--repeats", "1", "--warmup",
               "0", "--min-attempts", "1", "--modes", "off", "--token2wav-steps", "2", "--attention", "stock")
    assert "; decode attention: transformers' sdpa" in out.splitlines()[0]


def test_hook_overhead_alternates_hooks_inside_the_graphed_decode():
    out = _run("benchmarks/hook_overhead.py", "--shape", "tiny", "--batches", "2", "--prompt", "8",
               "--new", "8", "--repeats", "1", "--alternate-periods", "2", "--cuda-graphs")
    # every generated step after the prefill went through the fixed-slot path (CPU: no recording);
    # the only eager calls are prefills and the act_fn timing's calls without a static cache
    stats = re.search(r"graphs: (\d+) decode steps replayed, (\d+) recorded .*, (\d+) calls eager \((.*)\)", out)
    replays, recorded = int(stats.group(1)), int(stats.group(2))
    assert replays > 0 and recorded == 4  # plain, capture, steering, both: one hook plan each
    assert set(re.findall(r"'([a-z ]+)'", stats.group(4))) == {"not a decode step", "cache not static"}
    assert "tokens identical: plain vs plain True; capture vs plain True" in out
    assert out.splitlines()[0].endswith("decode attention packed")  # as the adapters run it
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 7  # as without graphs, one alternating period


@pytest.mark.parametrize("script, loops", [
    ("kimi_audio_throughput", ["kimi_generate"]),
    ("minicpm_o_throughput", ["minicpm_generate", "minicpm_speech_codes"]),
])
def test_stop_check_both_times_every_mode_late_and_every_step_side_by_side(capsys, monkeypatch,
                                                                          script, loops):
    """``--stop-check both``: each mode twice, its step loops reading their stop flag late
    (``LateFlag``) and every step (``EveryStepFlag``), and the printed ratio is the rows'."""
    import importlib

    from esn_core.models import late_stop

    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = importlib.import_module(script)
    used = collections.Counter()

    def counting(kind, base):
        class Counted(base):
            def push(self, flag):
                used[kind] += 1
                return super().push(flag)
        return Counted

    late = counting("late", late_stop.LateFlag)
    monkeypatch.setattr(late_stop, "EveryStepFlag", counting("every step", late_stop.EveryStepFlag))
    modules = [importlib.import_module(f"esn_core.models.{name}") for name in loops]
    for module in modules:
        monkeypatch.setattr(module, "LateFlag", late)
    bench.main(["--batches", "2", "--attempts", "2", "--repeats", "1", "--alternate-repeats", "0",
                "--stop-check", "both"])
    out = capsys.readouterr().out
    assert used["late"] > 0 and used["every step"] > 0
    assert all(module.LateFlag is late for module in modules)  # put back after each mode
    rates = {cells[2].strip(): float(cells[-2].replace(",", "")) for cells in
             (line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 2 |"))}
    assert list(rates) == ["off", "capture", "off+every-step-stop", "capture+every-step-stop"]
    for mode in ("off", "capture"):
        ratio = float(re.search(rf"# batch 2 {mode}: stop flag read a step late ([\d.]+)x", out)[1])
        assert abs(ratio - rates[mode] / rates[mode + "+every-step-stop"]) <= 0.002
