"""What steering costs a decode step, part by part, hooked steps alternating with plain ones.

    python benchmarks/decode_kernel_cost.py --device cuda --batch 64 --repeats 8

Each mode runs ``generate`` with its ``act_fn`` replacement put on and taken off after every
step (``hook_overhead.Alternator``), so a hooked step is compared with its two plain
neighbours under the same machine state. Modes: the engine's steering session, the same
session with every mask empty (the engine's Python, no kernel), its capture session; and bare
replacements that bypass the engine: SiLU alone, and SiLU then an in-place multiply by the
steering operand or by ones (the same work, unchanged values). Reports per mode the median
ratio of a hooked step to its neighbours [quartiles of the runs' medians] and mean hooked /
mean plain step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics

import numpy as np
import torch
from transformers import LogitsProcessorList

from esn_core.hooks import SILU, Capture, Intervention, compile_operands

from hook_overhead import (SHAPES, Alternator, StepClock, add_model_arguments, alternating_ratios,
                           hooked_model, quartiles, steering_plan, sync)


class Replacement:
    """``act_fn`` shadowed per layer by ``functions[layer]`` (as the engine does) while open,
    with ``paused`` taking them off for a block, like a session's."""

    def __init__(self, mlps, functions):
        self.mlps, self.functions = mlps, functions

    def _apply(self):
        for mlp, function in zip(self.mlps, self.functions):
            vars(mlp)["act_fn"] = function

    def _remove(self):
        for mlp in self.mlps:
            vars(mlp).pop("act_fn", None)

    def __enter__(self):
        self._apply()
        return self

    def __exit__(self, *exc):
        self._remove()

    @contextlib.contextmanager
    def paused(self):
        self._remove()
        try:
            yield
        finally:
            self._apply()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap, shape="qwen25omni7b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()

    model, group, engine = hooked_model(args.shape, args.device, args.attention)
    dtype = model.dtype
    batch = args.batch
    ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (batch, args.prompt),
                        generator=torch.Generator().manual_seed(batch)).to(args.device)
    plan = steering_plan(group.layout, batch, 0.005, seed=batch)
    empty = Intervention("steer", tuple(np.zeros(0, np.int64) for _ in range(batch)), (1.0,) * batch)
    ones = [torch.ones(batch, 1, m.gate_proj.out_features, device=args.device, dtype=dtype)
            for m in group.mlps]
    operands = [op.dense if op.dense is not None else one  # a layer no row masks: x1
                for op, one in zip(compile_operands(plan, group.layout, args.device, dtype), ones)]
    mlps = group.mlps
    modes = {
        "plain/plain (control)": lambda: contextlib.nullcontext(None),
        "engine: steer": lambda: engine.session(interventions={"lm": plan}),
        "engine: steer, empty masks": lambda: engine.session(interventions={"lm": empty}),
        "engine: capture": lambda: engine.session(capture={"lm": Capture()}),
        "bare: silu": lambda: Replacement(mlps, [SILU] * len(mlps)),
        "bare: silu, mul_ by steering operand": lambda: Replacement(
            mlps, [lambda x, o=o: SILU(x).mul_(o) for o in operands]),
        "bare: silu, mul_ by ones": lambda: Replacement(
            mlps, [lambda x, o=o: SILU(x).mul_(o) for o in ones]),
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
    runs = {m: [] for m in modes}
    means = {m: [] for m in modes}
    names = list(modes)
    try:
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
                    with modes[mode]() as hooks:
                        clock.after = alternator = Alternator(hooks)
                        generate()
                        sync(args.device)
                        alternator.close()
                    gc.enable()
                    ratios, mean, _ = alternating_ratios(clock.stamps)
                    steps[mode] += ratios
                    runs[mode].append(statistics.median(ratios))
                    means[mode].append(mean)
    finally:
        clock.after = None
    print("| mode | hooked step / plain neighbours, median [run quartiles] | mean hooked / mean plain step |")
    print("|---|---|---|")
    for mode in names:
        q1, q3 = quartiles(runs[mode])
        print(f"| {mode} | {statistics.median(steps[mode]):.3f}x [{q1:.3f}, {q3:.3f}] | "
              f"{statistics.median(means[mode]):.3f}x |")


if __name__ == "__main__":
    main()
