"""The benchmark scripts run end to end on CPU (tiny shapes), so they do not rot between
GPU sessions; their figures are only meaningful on a GPU (BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_hook_overhead_reports_every_mode_and_the_per_call_cost():
    out = _run("benchmarks/hook_overhead.py", "--shape", "tiny", "--batches", "2", "--prompt", "8",
               "--new", "4", "--repeats", "2")
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 5  # whole runs, decode steps, alternating steps, prefill, act_fn call
    assert "tokens identical: plain vs plain True; capture vs plain True" in out
    alternating = rows[2].split("|")[2:-1]
    assert len(alternating) == 4 and all(re.fullmatch(r" [\d.]+x \[.*\]; [\d.]+x \[.*\] ", c)
                                         for c in alternating)
    per_call = [float(v) for v in re.findall(r"([\d.]+) us", rows[4])]
    assert len(per_call) == 4 and all(v > 0 for v in per_call)


def test_qwen_omni_throughput_reports_parts_modes_and_json(tmp_path):
    target = tmp_path / "omni.json"
    out = _run("benchmarks/qwen_omni_throughput.py", "--tiny", "--batches", "2", "--repeats", "1",
               "--warmup", "0", "--modes", "off", "capture", "steer", "fp32",
               "--out", str(target))
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["off", "capture", "steer", "fp32"]
    results = json.loads(target.read_text())["results"]
    for result in results:
        # token2wav = DiT + BigVGAN (+ the little glue between them)
        assert result["dit"] + result["bigvgan"] <= result["token2wav"] + 1e-9
        assert result["step_ms"]["talker"] > 0 and result["step_ms"]["thinker"] > 0
        assert result["utterances_per_hour"] == 2 / result["total"] * 3600


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
    steps, mean = alternating_ratios([0.0, 1.0, 3.0, 4.0, 8.0, 11.0])
    assert steps == [2 / 1, 4 / 2]
    assert mean == (2 + 4) / 2 / ((1 + 1 + 3) / 3)
