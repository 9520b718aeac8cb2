"""What one elementwise kernel per layer costs a decode step, with and without the engine.

    python benchmarks/decode_kernel_cost.py --device cuda --batch 64 --repeats 16

Splits the steering overhead of ``hook_overhead.py`` into its parts, side by side in one
run (modes interleaved, order rotated, GC paused): the engine's steering session, the same
session with every mask empty (the engine's Python, no kernel), and bare ``act_fn``
replacements that bypass the engine: SiLU alone, SiLU then an in-place multiply by ones,
SiLU then an out-of-place multiply. Per decode step: the median over repeats of a run's
median step over the same repeat's plain run's, with quartiles; and whole runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import numpy as np
import torch
from transformers import LogitsProcessorList

from esn_core.hooks import SILU, HookEngine, Intervention, MLPGroup

from hook_overhead import SHAPES, StepClock, build_model, steering_plan, sync


@contextlib.contextmanager
def replaced_act_fn(mlps, make):
    """``act_fn`` shadowed per layer by ``make(layer)`` (as the engine does), then restored."""
    for layer, mlp in enumerate(mlps):
        vars(mlp)["act_fn"] = make(layer)
    try:
        yield
    finally:
        for mlp in mlps:
            vars(mlp).pop("act_fn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen25omni7b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=16)
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_model(args.shape, args.device, dtype)
    group = MLPGroup.under(model.model, position_root=model, eos_token_ids=())
    engine = HookEngine({"lm": group})
    batch = args.batch
    ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (batch, args.prompt),
                        generator=torch.Generator().manual_seed(batch)).to(args.device)
    plan = steering_plan(group.layout, batch, 0.005, seed=batch)
    empty = Intervention("steer", tuple(np.zeros(0, np.int64) for _ in range(batch)), (1.0,) * batch)
    ones = [torch.ones(batch, 1, m.gate_proj.out_features, device=args.device, dtype=dtype)
            for m in group.mlps]
    mlps = group.mlps
    modes = {
        "plain": contextlib.nullcontext,
        "plain again": contextlib.nullcontext,
        "engine: steer": lambda: engine.session(interventions={"lm": plan}),
        "engine: steer, empty masks": lambda: engine.session(interventions={"lm": empty}),
        "bare: silu": lambda: replaced_act_fn(mlps, lambda l: SILU),
        "bare: silu, mul_ by ones": lambda: replaced_act_fn(
            mlps, lambda l: (lambda x, o=ones[l]: SILU(x).mul_(o))),
        "bare: silu, mul into new": lambda: replaced_act_fn(
            mlps, lambda l: (lambda x, o=ones[l]: torch.mul(SILU(x), o))),
    }
    clock = StepClock(args.device)

    def generate():
        clock.stamps.clear()
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                              logits_processor=LogitsProcessorList([clock]))

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; torch {torch.__version__}; shape {args.shape}; batch {batch}; "
          f"{args.repeats} repeats")
    steps = {m: [] for m in modes}
    times = {m: [] for m in modes}
    names = list(modes)
    with torch.inference_mode():
        for mode in names:  # warm-up
            with modes[mode]():
                generate()
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            for mode in names[shift:] + names[:shift]:
                gc.collect()
                gc.disable()
                sync(args.device)
                start = time.perf_counter()
                with modes[mode]():
                    generate()
                sync(args.device)
                times[mode].append(time.perf_counter() - start)
                gc.enable()
                steps[mode].append(float(np.median(np.diff(clock.stamps))))
    print("| mode | median step | per step, paired [quartiles] | whole run, paired |")
    print("|---|---|---|---|")
    for mode in names:
        paired = [s / p for s, p in zip(steps[mode], steps["plain"])]
        q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
        whole = statistics.median(t / p for t, p in zip(times[mode], times["plain"]))
        print(f"| {mode} | {statistics.median(steps[mode]) * 1e3:.2f} ms | "
              f"{statistics.median(paired):.3f}x [{q1:.3f}, {q3:.3f}] | {whole:.3f}x |")


if __name__ == "__main__":
    main()
