"""Leaving a capture session: the per-row counts' copy to the host, by staging policy.

A session with two groups ships two ``[B, N]`` count tables (uint8 while T < 256) to the
host when it ends. This times that copy for one session (every group's table in turn, as
``Session._collect`` does) three ways, side by side in one run:

- ``pinned per shape``: a page-locked buffer made for each table's shape and freed when the
  shape changes: with two groups of different widths, every copy locks a new buffer (the
  engine's policy until 2026-12-03);
- ``pinned, one buffer``: ``esn_core.hooks._to_host``, one grow-only page-locked buffer
  that every shape reuses;
- ``pageable``: ``tensor.cpu()``.

Each is followed by the host copy into an ordinary array (callers keep the counts). Default
shapes are Kimi-Audio's (``lm`` 28 x 18944, ``synth`` 6 x 18944 neurons).

    python benchmarks/counts_to_host.py --device cuda --batches 64 256 1024 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from esn_core.hooks import _pinned_bytes, _to_host  # noqa: E402


def per_shape_pinned(tensor: torch.Tensor):
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    host.copy_(tensor)
    return host.numpy().copy()


def pinned_parallel_host_copy(tensor: torch.Tensor):
    """The one pinned buffer, then torch's multi-threaded copy into a fresh host tensor: the
    single-threaded numpy copy runs at page-fault speed (~3.4 GB/s)."""
    tensor = tensor.contiguous()
    host = tensor
    if tensor.is_cuda:
        n_bytes = tensor.numel() * tensor.element_size()
        host = _pinned_bytes(n_bytes)[:n_bytes].view(tensor.dtype).view(tensor.shape)
        host.copy_(tensor)
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(host).numpy()


def pageable(tensor: torch.Tensor):
    return tensor.cpu().numpy().copy()


POLICIES = {"pinned per shape": per_shape_pinned, "pinned, one buffer": _to_host,
            "pinned, parallel host copy": pinned_parallel_host_copy, "pageable": pageable}


def session_seconds(policy, tables: list[torch.Tensor], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for table in tables:
        out = policy(table)
        assert out.shape == tuple(table.shape)
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--groups", type=int, nargs="+", default=[28 * 18944, 6 * 18944],
                    help="neurons per group, copied in this order each session")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"# counts to the host, {args.device}, groups of {args.groups} neurons, uint8")
    print("| batch | MB a session | " + " | ".join(f"{p} ms" for p in POLICIES) + " |")
    print("|---|---|" + "---|" * len(POLICIES))
    for batch in args.batches:
        tables = [torch.randint(0, 200, (batch, n), dtype=torch.uint8, device=args.device)
                  for n in args.groups]
        for name, policy in POLICIES.items():
            session_seconds(policy, tables, args.device)  # first call: buffers, page faults
            for table in tables:  # every policy ships the same bytes
                if not (policy(table) == table.cpu().numpy()).all():
                    raise AssertionError(f"{name} changed the counts")
        times = {name: [] for name in POLICIES}
        for _ in range(args.repeats):  # policies interleaved, so drift hits them alike
            for name, policy in POLICIES.items():
                times[name].append(session_seconds(policy, tables, args.device))
        megabytes = sum(t.numel() for t in tables) / 1e6
        print(f"| {batch} | {megabytes:,.0f} | " + " | ".join(
            f"{statistics.median(times[name]) * 1e3:,.1f}" for name in POLICIES) + " |")


if __name__ == "__main__":
    main()
