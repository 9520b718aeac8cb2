"""A left-padded prefill's capture counting, by three ways of keeping padding out of the counts.

    python benchmarks/prefill_counting.py                                  # CPU sanity check
    python benchmarks/prefill_counting.py --device cuda --batches 256 2048 --layers 34

The engine counts a prefill layer as ``g > limit`` summed over positions, ``limit`` being
0 at real positions and +inf at padding, ``[B, T, 1]``. An operand broadcast along the
innermost dimension sends CUDA's comparison down its non-vectorised kernel. The ways:

* ``limits``: that broadcast comparison (the engine's way until 2026-12-03);
* ``refill``: ``g > 0`` over every position (vectorised), then the padding positions' rows of
  the result set to False by index (the engine's way now);
* ``fused``: ``((g > 0) & valid).sum(positions)`` added to the counts as one
  ``torch.compile``-d kernel (fixed shapes unless ``--dynamic``; ``--no-compile`` skips it
  and the fused engine; its compile time is reported);
* ``unmasked``: ``g > 0`` summed over every position, padding included: the floor, wrong
  counts, for reference only.

``engine`` times the ``_Counter`` itself (``begin_positions`` + ``count`` per layer), so the
figure follows whatever the engine does by default; ``engine, fused`` the same with
``ESN_FUSED_COUNTING=1`` (``esn_core.fused_counting``, its positions compiled dynamic). Every way's counts are checked against the
engine's. Workload: Kimi-Audio's prompts (a 24-token instruction + 12.5 audio tokens a
second of a U(2, 5) s source, ``workloads.esd_like``), left-padded to the batch's longest;
activations random normal in the model's dtype at Kimi's width (18,944 gate neurons).
Reports device ms for all ``--layers`` layer calls of one prefill, median of ``--repeats``,
the ways round-robin.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from esn_core.hooks import Capture, _add_positive_counts, _Counter, _validity_limits
from esn_core.layout import NeuronLayout

from step_counting import kernel_arguments
from workloads import esd_like

KIMI_PROMPT = 24  # instruction tokens before the source's audio tokens
KIMI_AUDIO_RATE = 12.5


def prompt_lengths(batch: int, seed: int) -> list[int]:
    return [KIMI_PROMPT + round(a.source_seconds * KIMI_AUDIO_RATE) for a in esd_like(batch, seed=seed)]


def left_padded_valid(lengths: list[int], device) -> torch.Tensor:
    steps = max(lengths)
    start = torch.tensor([steps - n for n in lengths], device=device)
    return torch.arange(steps, device=device)[None, :] >= start[:, None]


def way_limits(g, valid, counts):
    limits = _validity_limits(valid, g.dtype)[:, :, None]
    _add_positive_counts(counts, torch.gt(g, limits), dim=1)


def way_refill(g, valid, counts, padding_rows):
    positive = torch.gt(g, 0)
    positive.view(-1, g.shape[-1]).index_fill_(0, padding_rows, False)
    _add_positive_counts(counts, positive, dim=1)


def count_valid(counts, g, valid):
    counts += ((g > 0) & valid[:, :, None]).sum(dim=1, dtype=torch.uint8)


def way_unmasked(g, valid, counts):
    _add_positive_counts(counts, torch.gt(g, 0), dim=1)


def main() -> None:
    args = kernel_arguments(__doc__.split("\n")[0], repeats=5, help="layer calls per prefill")
    dtype, width, sync = args.dtype, args.width, args.sync

    print(f"# prefill counting, {args.device_name}, torch {torch.__version__}, {dtype}, width {width}, "
          f"{args.layers} layer calls a prefill, median of {args.repeats}")
    print("| batch | positions (real) | engine ms | engine, fused ms | limits ms | refill ms | "
          "fused ms | unmasked ms (floor) | compile s | counts equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        lengths = prompt_lengths(batch, args.seed)
        valid = left_padded_valid(lengths, args.device)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        g = torch.randn(batch, valid.shape[1], width, generator=gen, device=args.device, dtype=dtype)
        layout = NeuronLayout((width,) * args.layers)

        def engine_way(setting: str):
            """The engine's prefill, its counting fused (``ESN_FUSED_COUNTING=1``) or eager (0)."""
            def run():
                os.environ["ESN_FUSED_COUNTING"] = setting
                counter = _Counter(layout, Capture())
                counter.begin_positions(valid)
                for layer in range(args.layers):
                    counter.count(layer, g)
                return torch.cat(counter.K, dim=1)
            return run

        def simple(way, *extra):
            def run():
                counts = [torch.zeros(batch, width, dtype=torch.uint8, device=args.device)
                          for _ in range(args.layers)]
                for layer in range(args.layers):
                    way(g, valid, counts[layer], *extra)
                return torch.cat(counts, dim=1)
            return run

        def refill_way():
            # Once a prefill, as the engine would: the padding's flat row indices (one sync).
            padding_rows = (~valid).flatten().nonzero().squeeze(1)
            return simple(way_refill, padding_rows)()

        ways = {"engine": engine_way("0"), "limits": simple(way_limits), "refill": refill_way}
        compile_s = 0.0
        if not args.no_compile:
            start = time.perf_counter()
            fused = torch.compile(count_valid, fullgraph=True, dynamic=args.dynamic)
            fused(torch.zeros(batch, width, dtype=torch.uint8, device=args.device), g, valid)
            sync()
            compile_s = time.perf_counter() - start
            ways["fused"] = simple(lambda g, valid, counts: fused(counts, g, valid))
            ways["engine, fused"] = engine_way("1")
        ways["unmasked"] = simple(way_unmasked)
        times = {w: [] for w in ways}
        results = {}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for w, run in ways.items():
                sync()
                start = time.perf_counter()
                results[w] = run()
                sync()
                if repeat:
                    times[w].append(1000 * (time.perf_counter() - start))
        checked = [w for w in ways if w not in ("engine", "unmasked")]
        equal = all(torch.equal(results["engine"], results[w]) for w in checked)
        cells = [f"{statistics.median(times[w]):.2f}" if w in times else "-"
                 for w in ("engine", "engine, fused", "limits", "refill", "fused", "unmasked")]
        print(f"| {batch} | {valid.numel():,} ({int(valid.sum()):,}) | {' | '.join(cells)} | "
              f"{compile_s:.1f} | {equal} |")
        del g, results


if __name__ == "__main__":
    main()
