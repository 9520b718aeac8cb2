"""Capture's counting inside a decode step replayed as a CUDA graph: what each way costs, and
whether the fused kernel leaves the activation bit for bit as eager SiLU computes it.

    python benchmarks/graph_counting.py                                   # CPU sanity check
    python benchmarks/graph_counting.py --device cuda --batches 1 64 256 --layers 28

A captured step (``esn_core.models.graphed_decode``) runs, at every hooked layer, one of:

* ``plain``: ``silu(x)`` alone (no session), the floor;
* ``eager ops``: ``silu(x)``, then ``counts += g > limits`` as two kernels (the captured
  step's counting with ``ESN_FUSED_COUNTING=0``);
* ``fused``: ``fused_counting.silu_and_count_step``, SiLU and count in one compiled kernel
  (the default on CUDA).

Each way's ``--layers`` layers (``[B, 1, --width]`` activations, a seventh of the rows
finished) are recorded once as a CUDA graph after a warm-up on a side stream, as
``GraphedDecode`` records them, and the graph is replayed ``--replays`` times between device
events: microseconds per replay. On the CPU the same layers run eagerly (no graph). Every
way's counts and activations are checked against eager SiLU's; first, the fused kernel's
``g`` is compared bit for bit with eager SiLU over every bfloat16 and float16 value and over
``--random`` random float32 values.
"""

from __future__ import annotations

import argparse
import os

import torch

from esn_core import fused_counting

SILU = torch._C._nn.silu
INTEGER_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def plain(x, limits, counts):
    return SILU(x)


def eager_ops(x, limits, counts):
    g = SILU(x)
    counts.add_(torch.gt(g, limits))
    return g


def fused(x, limits, counts):
    g = fused_counting.silu_and_count_step(SILU, x, limits, counts)
    if g is None:
        raise RuntimeError(f"the fused kernel did not run (compile failures: {sorted(fused_counting._failed)})")
    return g


WAYS = {"plain": plain, "eager ops": eager_ops, "fused": fused}


def bit_check(device: str, random_values: int) -> list[str]:
    """The fused kernel's g and counts against eager SiLU's, bit for bit."""
    lines = []
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = []
    for dtype in (torch.bfloat16, torch.float16):
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32, device=device).to(torch.int16).view(dtype)
        inputs.append((f"every {dtype}".replace("torch.", ""), every.view(256, 1, 256)))
    values = torch.randn(random_values, generator=generator, device=device) * 4
    inputs.append((f"{random_values:,} random float32", values.view(-1, 1, 256)))
    for label, x in inputs:
        limits = torch.zeros(x.shape[0], 1, 1, dtype=x.dtype, device=device)
        limits[::7] = torch.inf  # finished rows count nothing
        counts = torch.zeros(x.shape, dtype=torch.int32, device=device)
        g = fused(x, limits, counts)
        ref = SILU(x)
        real = ~torch.isnan(ref)
        view = INTEGER_VIEW[x.dtype]
        mismatched = int(((g.view(view) != ref.view(view)) & real).sum())
        counted = torch.equal(counts, (ref > limits).to(torch.int32))
        lines.append(f"{label}: g differs from eager SiLU in {mismatched} of {int(real.sum()):,} values; "
                     f"counts {'equal' if counted else 'DIFFER'}")
    return lines


def step_of(way, batch: int, args) -> tuple:
    """``--layers`` layers of ``way`` on fresh inputs: (run, inputs, limits, counts, outputs)."""
    shape = (batch, 1, args.width)
    xs = [torch.randn(shape, device=args.device, dtype=args.dtype) for _ in range(args.layers)]
    limits = torch.zeros(batch, 1, 1, device=args.device, dtype=args.dtype)
    limits[::7] = torch.inf
    counts = [torch.zeros(shape, dtype=torch.int32, device=args.device) for _ in xs]
    outputs: list = []

    def layers():
        outputs[:] = [way(x, limits, c) for x, c in zip(xs, counts)]

    if not args.device.startswith("cuda"):
        layers()  # warm-up (compiles the fused kernel)
        for c in counts:
            c.zero_()
        return layers, xs, limits, counts, outputs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layers()  # warm-up, as GraphedDecode's: compiles before the capture
    torch.cuda.current_stream().wait_stream(side)
    for c in counts:
        c.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers()
    return graph.replay, xs, limits, counts, outputs


def microseconds(run, args) -> float:
    if not args.device.startswith("cuda"):
        import time

        start = time.perf_counter()
        for _ in range(args.replays):
            run()
        return (time.perf_counter() - start) / args.replays * 1e6
    for _ in range(20):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.replays):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / args.replays * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--width", type=int, default=None, help="default: 18944 on CUDA, 256 on CPU")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--replays", type=int, default=None, help="default: 500 on CUDA, 5 on CPU")
    parser.add_argument("--random", type=int, default=None,
                        help="random float32 values in the bit check (default 2**24 on CUDA, 2**12 on CPU)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.width = args.width or (18944 if cuda else 256)
    args.replays = args.replays or (500 if cuda else 5)
    os.environ.setdefault("ESN_FUSED_COUNTING", "auto" if cuda else "1")  # CPU: compile anyway
    name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    print(f"# in-graph counting on {name}; torch {torch.__version__}; ESN_FUSED_COUNTING="
          f"{os.environ['ESN_FUSED_COUNTING']}; {args.layers} layers x {args.width} {args.dtype}".replace("torch.", ""))
    for line in bit_check(args.device, args.random or (2**24 if cuda else 2**12)):
        print(f"#   {line}")
    where = "per graph replay" if cuda else "per eager run (no graph on the CPU)"
    print(f"| batch | {' | '.join(WAYS)} | fused over plain |")
    print(f"|---|{'---|' * len(WAYS)}---|")
    for batch in args.batches:
        times = {}
        for label, way in WAYS.items():
            run, xs, limits, counts, outputs = step_of(way, batch, args)
            run()
            if label != "plain":
                for x, c, g in zip(xs, counts, outputs):
                    ref = SILU(x)
                    if not (torch.equal(c, (ref > limits).to(torch.int32)) and torch.equal(g, ref)):
                        raise RuntimeError(f"{label} at batch {batch}: counts or activations differ from eager SiLU")
            times[label] = microseconds(run, args)
        print(f"| {batch} | " + " | ".join(f"{t:,.1f} us" for t in times.values())
              + f" | {times['fused'] - times['plain']:+,.1f} us |", flush=True)
    print(f"# microseconds {where}, all {args.layers} layers; counts and activations checked against eager SiLU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
