"""Where a capture session's cost goes: one batch under torch.profiler, hooks off vs capture.

Whole-run wall times put Kimi-Audio's capture at 1.06-1.12x at 256-2048 rows where the
per-step figure is 1.01-1.02x. This runs one batch of Kimi-Audio's step loop (the workload
and forced ends of ``kimi_audio_throughput.py``) twice under the profiler, hooks off and
capturing both groups, and prints the ops whose device time and host time differ most
between the two, with the session's exit (counts reduced, narrowed, copied to the host) as
its own range, and the device time of each phase (the prompt's prefill, the decode steps,
the exit) with and without capture: whether the cost sits in the prefill's ``[B, T, D]``
counting or in the steps' flushes. The profiler slows the host side, so read the
differences, not the totals.

    python benchmarks/capture_profile.py --shape full --device cuda --batches 256 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

import kimi_audio_throughput as kimi  # noqa: E402
from workloads import describe, esd_like  # noqa: E402
from esn_core.hooks import Capture, HookEngine  # noqa: E402

EXIT = "capture session exit"
PREFILL, STEP = "phase: prefill", "phase: decode step"
PHASES = (PREFILL, STEP, EXIT)


class PhasedLM:
    """The LM with each call in a profiler range: the first (the prompt) as the prefill, the
    rest as decode steps; everything else is the LM's own (``ForcedEnds`` wraps this)."""

    def __init__(self, lm):
        self.lm, self.calls = lm, 0

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def __call__(self, **inputs):
        name, self.calls = (PREFILL if self.calls == 0 else STEP), self.calls + 1
        with record_function(name):
            return self.lm(**inputs)


def one_batch(adapter, engine, attempts, mode: str, device: str) -> None:
    real_lm = adapter.lm
    adapter.lm = PhasedLM(real_lm)  # kimi.run wraps adapter.lm; the hooks stay on the real one
    try:
        _one_batch(adapter, engine, attempts, mode, device)
    finally:
        adapter.lm = real_lm


def _one_batch(adapter, engine, attempts, mode: str, device: str) -> None:
    if mode == "capture":
        session = engine.session(capture={"lm": Capture(), "synth": Capture()})
        session.__enter__()
        try:
            kimi.run(adapter, attempts, seed=0)
            kimi.sync(device)
        finally:
            with record_function(EXIT):
                session.__exit__(None, None, None)
    else:
        kimi.run(adapter, attempts, seed=0)
    kimi.sync(device)


def op_times(prof) -> dict[str, tuple[float, float, int]]:
    """op name -> (self device ms, self host ms, calls); ranges keep their whole device time."""
    out = {}
    for event in prof.key_averages():
        whole = event.key in PHASES
        device_us = event.device_time_total if whole else getattr(event, "self_device_time_total", 0.0)
        host_us = event.cpu_time_total if whole else event.self_cpu_time_total
        out[event.key] = (device_us / 1e3, host_us / 1e3, event.count)
    return out


def profiled(adapter, engine, attempts, mode: str, device: str):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        one_batch(adapter, engine, attempts, mode, device)
    return time.perf_counter() - start, op_times(prof)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(kimi.SHAPES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[4])
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3, help="unprofiled timings per mode")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    adapter = kimi.build(args.shape, args.device, dtype)
    engine = HookEngine(adapter.groups())
    for batch in args.batches:
        attempts = esd_like(batch, seed=0)
        print(f"# Kimi-Audio {args.shape}, {dtype}, {args.device}, one batch of {batch}: "
              f"{describe(attempts)}")
        for mode in ("off", "capture"):  # warm-up: kernels, allocator, the pinned buffer
            one_batch(adapter, engine, attempts, mode, args.device)
        plain = {"off": [], "capture": []}  # unprofiled, modes alternating
        for _ in range(args.repeats):
            for mode in plain:
                start = time.perf_counter()
                one_batch(adapter, engine, attempts, mode, args.device)
                plain[mode].append(time.perf_counter() - start)
        off, capture = (statistics.median(plain[m]) for m in ("off", "capture"))
        print(f"# unprofiled, median of {args.repeats}: off {off:.3f} s, capture {capture:.3f} s "
              f"({capture / off:.3f}x)")
        walls, times = {}, {}
        profiled(adapter, engine, attempts[:1], "off", args.device)  # the profiler's first use
        for mode in ("off", "capture"):
            walls[mode], times[mode] = profiled(adapter, engine, attempts, mode, args.device)
        totals = {m: tuple(sum(v[i] for k, v in t.items() if k not in PHASES) for i in (0, 1))
                  for m, t in times.items()}
        print("| mode | wall s (profiled) | device ms (all ops) | host ms (all ops) |")
        print("|---|---|---|---|")
        for mode in ("off", "capture"):
            print(f"| {mode} | {walls[mode]:.3f} | {totals[mode][0]:,.1f} | {totals[mode][1]:,.1f} |")
        zero = (0.0, 0.0, 0)
        print("\n| phase | off device ms | capture device ms | extra device ms | extra host ms | calls |")
        print("|---|---|---|---|---|---|")
        for phase in PHASES:
            o, c = times["off"].get(phase, zero), times["capture"].get(phase, zero)
            print(f"| {phase} | {o[0]:,.1f} | {c[0]:,.1f} | {c[0] - o[0]:,.1f} | {c[1] - o[1]:,.1f} "
                  f"| {c[2]:,} |")
        keys = (set(times["off"]) | set(times["capture"])) - {PREFILL, STEP}
        diff = {k: tuple(c - o for c, o in zip(times["capture"].get(k, zero), times["off"].get(k, zero)))
                for k in keys}
        for column, label in ((0, "device"), (1, "host")):
            print(f"\n| op | extra {label} ms with capture | extra calls |")
            print("|---|---|---|")
            for key in sorted(keys, key=lambda k: -diff[k][column])[: args.top]:
                print(f"| {key[:70]} | {diff[key][column]:,.2f} | {diff[key][2]:,} |")


if __name__ == "__main__":
    main()
