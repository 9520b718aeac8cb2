"""A decode step's capture counting at large batches, by the engine and by fused kernels.

    python benchmarks/step_counting.py                                     # CPU sanity check
    python benchmarks/step_counting.py --device cuda --batches 256 2048 --layers 34

At ≥ 256 rows the engine's step buffer holds one step, so every step's activations are
compared and added to the byte counts on their own: SiLU writes ``g`` into the buffer,
``g > limits`` writes booleans, and the add reads them and the counts and writes the counts,
~6 bytes of traffic per activation on top of SiLU's own 4. Ways timed, for ``--layers``
layers of one step (a fifth of the rows finished, as late in a batch):

* ``plain``: ``silu(x)`` alone, the floor;
* ``engine``: ``_Counter`` as it runs by default (``begin_step``, ``silu_into_step``, ``flush``);
* ``engine, fused``: the same with ``ESN_FUSED_COUNTING=1`` (``esn_core.fused_counting``,
  compiled for the step buffer's fixed shapes);
* ``fused add``: SiLU into the buffer, then ``counts += g > limits`` as one
  ``torch.compile``-d kernel a run of layers (no booleans written; fixed shapes unless
  ``--dynamic``);
* ``fused silu``: SiLU, comparison and add as one compiled kernel a layer (reads ``x`` and
  the counts, writes ``g`` and the counts).

The fused ways need ``torch.compile`` (Triton on CUDA); their compile time is reported and
paid once per shape. Every way's counts are checked against the engine's. Device ms for all
layers of one step, median of ``--repeats``, the ways round-robin.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from esn_core.hooks import Capture, _Counter, _validity_limits
from esn_core.layout import NeuronLayout


def add_positives(counts: torch.Tensor, g: torch.Tensor, limits: torch.Tensor) -> None:
    counts += (g > limits).to(torch.uint8)


def silu_counted(x: torch.Tensor, counts: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    g = F.silu(x)
    counts += (g > limits).to(torch.uint8)
    return g


def kernel_arguments(description: str, repeats: int, **layers_help) -> argparse.Namespace:
    """The options both counting benchmarks take, with the model's dtype and width resolved
    (``args.dtype`` a torch dtype, ``args.width`` an int) and ``args.sync`` the device's."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[8])
    ap.add_argument("--width", type=int, default=None, help="default: 18944 on CUDA, 512 on CPU")
    ap.add_argument("--layers", type=int, default=4, **layers_help)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="skip the fused ways")
    ap.add_argument("--dynamic", action="store_true", help="compile the fused ways for dynamic shapes")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.width = args.width or (18944 if cuda else 512)
    args.sync = torch.cuda.synchronize if cuda else (lambda: None)
    args.device_name = torch.cuda.get_device_name() if cuda else "cpu"
    return args


def main() -> None:
    args = kernel_arguments(__doc__.split("\n")[0], repeats=20)
    dtype, width, sync, fused = args.dtype, args.width, args.sync, not args.no_compile

    print(f"# step counting, {args.device_name}, torch {torch.__version__}, {dtype}, width {width}, "
          f"{args.layers} layers a step, median of {args.repeats}")
    print("| batch | plain ms | engine ms | engine, fused ms | fused add ms | fused silu ms | "
          "compile s | counts equal |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        gen = torch.Generator(device=args.device).manual_seed(args.seed + batch)
        x = torch.randn(args.layers, batch, 1, width, generator=gen, device=args.device, dtype=dtype)
        finished = torch.zeros(batch, 1, dtype=torch.bool, device=args.device)
        finished[: batch // 5] = True
        limits = _validity_limits(~finished, dtype)[:, :, None]  # [B, 1, 1]
        layout = NeuronLayout((width,) * args.layers)
        counters = {setting: _Counter(layout, Capture()) for setting in ("0", "1")}
        outputs = [torch.empty(batch, 1, width, dtype=dtype, device=args.device)
                   for _ in range(args.layers)]
        counts_add = torch.zeros(args.layers, batch, width, dtype=torch.uint8, device=args.device)
        counts_silu = torch.zeros_like(counts_add)
        buffer = torch.empty(args.layers, batch, 1, width, dtype=dtype, device=args.device)
        compile_s = 0.0
        if fused:
            start = time.perf_counter()
            fused_add = torch.compile(add_positives, fullgraph=True, dynamic=args.dynamic)
            fused_silu = torch.compile(silu_counted, fullgraph=True, dynamic=args.dynamic)
            fused_add(torch.zeros_like(counts_add), buffer[:, :, 0], limits[None, :, :, 0])
            fused_silu(x[0], torch.zeros_like(counts_add[0])[:, None], limits)
            sync()
            compile_s = time.perf_counter() - start

        def plain():
            for layer in range(args.layers):
                torch._C._nn.silu(x[layer], out=outputs[layer])

        def engine(setting: str):
            """The engine's step, its counting fused (``ESN_FUSED_COUNTING=1``) or eager (0)."""
            def step():
                os.environ["ESN_FUSED_COUNTING"] = setting
                counter = counters[setting]
                counter.begin_step(finished, batch, x.device)
                for layer in range(args.layers):
                    counter.silu_into_step(layer, x[layer])
                counter.flush()
            return step

        def add_way():
            for layer in range(args.layers):
                torch._C._nn.silu(x[layer], out=buffer[layer])
            fused_add(counts_add, buffer[:, :, 0], limits[None, :, :, 0])

        def silu_way():
            for layer in range(args.layers):
                outputs[layer] = fused_silu(x[layer], counts_silu[layer][:, None], limits)

        ways = {"plain": plain, "engine": engine("0")}
        if fused:
            ways |= {"engine, fused": engine("1"), "fused add": add_way, "fused silu": silu_way}
        times = {w: [] for w in ways}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for w, run in ways.items():
                sync()
                start = time.perf_counter()
                run()
                sync()
                if repeat:
                    times[w].append(1000 * (time.perf_counter() - start))
        rounds = args.repeats + 1
        engine_counts = torch.stack(counters["0"].K)  # [L, B, D], ``rounds`` steps counted
        equal = "-"
        if fused:
            equal = str(all(torch.equal(engine_counts, c) for c in
                            (torch.stack(counters["1"].K), counts_add, counts_silu)))
        expected = rounds * (x[:, batch // 5:] > 0).sum()
        assert int(engine_counts.sum()) == int(expected), "the engine's counts are off"
        cells = " | ".join(f"{statistics.median(times[w]):.3f}" for w in ways)
        if not fused:
            cells += " | - | - | -"
        print(f"| {batch} | {cells} | {compile_s:.1f} | {equal} |")
        del x, buffer, counters


if __name__ == "__main__":
    main()
