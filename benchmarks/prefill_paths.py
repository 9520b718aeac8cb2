"""A steered prefill by its two paths: the masked (row, neuron) pairs gathered and scattered,
or one broadcast of the dense operand; which is cheaper depends on the call's size, and
``esn_core.hooks.SPARSE_MIN_ELEMENTS`` sits where they cross.

    python benchmarks/prefill_paths.py --shape tiny                   # CPU sanity check
    python benchmarks/prefill_paths.py --shape qwen25omni7b --device cuda --batches 1 2 4 8 16

Times the decoder over a ``--prompt``-token prompt (no generate, no LM head), plain and
steered by each path (a mask of ``--r`` of the neurons per row, one row untouched as in an
evaluation batch), the modes round-robin; each repeat opens a session, runs one forward
(the operands compile) and times the next. Reports the median of paired ratios to plain
[quartiles] and whether the two paths gave bit-identical hidden states.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import esn_core.hooks as hooks

from hook_overhead import SHAPES, add_model_arguments, hooked_model, quartiles, steering_plan, sync

PATHS = {"pairs": 0, "broadcast": 2**62}  # SPARSE_MIN_ELEMENTS that forces each path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--r", type=float, default=0.005)
    args = ap.parse_args()

    model, group, engine = hooked_model(args.shape, args.device, args.attention)
    width = group.layout.layer_sizes[0]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; torch {torch.__version__}; shape {args.shape}; default "
          f"SPARSE_MIN_ELEMENTS = 2^{hooks.SPARSE_MIN_ELEMENTS.bit_length() - 1}")
    print("| batch | activations per layer call | plain | pairs | broadcast | identical |")
    print("|---|---|---|---|---|---|")
    default = hooks.SPARSE_MIN_ELEMENTS
    try:
        for batch in args.batches:
            ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (batch, args.prompt),
                                generator=torch.Generator().manual_seed(batch)).to(args.device)
            mask = torch.ones_like(ids)
            plan = steering_plan(group.layout, batch, args.r, seed=batch)
            times = {m: [] for m in ("plain", *PATHS)}
            outputs = {}
            with torch.inference_mode():
                for _ in range(args.repeats):
                    for mode in times:
                        hooks.SPARSE_MIN_ELEMENTS = PATHS.get(mode, default)
                        session = (contextlib.nullcontext() if mode == "plain"
                                   else engine.session(interventions={"lm": plan}))
                        with session:
                            model.model(ids, attention_mask=mask)
                            sync(args.device)
                            start = time.perf_counter()
                            outputs[mode] = model.model(ids, attention_mask=mask).last_hidden_state
                            sync(args.device)
                            times[mode].append(time.perf_counter() - start)
            cells = []
            for mode in PATHS:
                ratios = [t / p for t, p in zip(times[mode], times["plain"])]
                q1, q3 = quartiles(ratios)
                cells.append(f"{statistics.median(ratios):.3f}x [{q1:.3f}, {q3:.3f}]")
            elements = batch * args.prompt * width
            print(f"| {batch} | {elements / 2**24:.2f} x 2^24 | {statistics.median(times['plain']) * 1e3:.2f} ms | "
                  + " | ".join(cells) + f" | {torch.equal(outputs['pairs'], outputs['broadcast'])} |", flush=True)
    finally:
        hooks.SPARSE_MIN_ELEMENTS = default


if __name__ == "__main__":
    main()
