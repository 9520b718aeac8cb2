"""Capture's counting as ``torch.compile``-d kernels on CUDA: one pass where eager runs two or three.

Eager PyTorch counts a decode step as a comparison that writes booleans and an add that
reads them back with the counts; a prefill as a comparison, the padding's removal and a
sum. Fused, each is one kernel that reads the activations once. On an H200 at Kimi-Audio's
width (34 layers of 18,944 neurons), counting one decode step takes 1.00 → 0.42 ms of device
time at 256 rows and 2.65 → 1.20 ms at 2048 (``benchmarks/step_counting.py``); a left-padded
prefill 24 → 10 ms at 256 rows and 188 → 67 ms at 2048 (``benchmarks/prefill_counting.py``).

Counts are integers, so the fused kernels give exactly the eager counts (tested on CPU
through the same compiler). **Off by default**: the figures above are of the kernels on
their own (compiled for fixed shapes); inside the engine, compiled for dynamic shapes, the
first form measured was slower than eager at 2048 rows (5.33 against 4.14 ms a step), and
the form here (one step with no reduction) is not yet measured on a GPU.
``ESN_FUSED_COUNTING=auto`` turns them on for CUDA tensors (the compile, ~15 s, is paid
once per process and kind of call), ``=1`` for every device (tests), ``=0`` (the default)
off. Wherever compiling fails, a warning says so once and the engine counts eagerly.
"""

from __future__ import annotations

import os
import warnings

import torch


def _add_step_positives(counts: torch.Tensor, steps: torch.Tensor, limits: torch.Tensor | None) -> None:
    positive = steps > 0 if limits is None else steps > limits
    if steps.dim() == 3:  # one step: no reduction at all
        counts += positive.to(counts.dtype)
    else:
        counts += positive.sum(dim=1, dtype=counts.dtype)


def _add_prefill_positives(counts: torch.Tensor, g: torch.Tensor, valid: torch.Tensor | None) -> None:
    positive = g > 0
    if valid is not None:
        positive = positive & valid[:, :, None]
    counts += positive.sum(dim=1, dtype=counts.dtype)


_compiled: dict[str, object] = {}
_failed: set[str] = set()


def _setting() -> str:
    value = os.environ.get("ESN_FUSED_COUNTING", "0").strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"ESN_FUSED_COUNTING must be auto, 0 or 1, got {value!r}")
    return value


def _run(name: str, function, device: torch.device, *args) -> bool:
    """Run ``function`` compiled; False (nothing done) where fused counting is not used."""
    setting = _setting()
    if setting == "0" or name in _failed or (setting == "auto" and device.type != "cuda"):
        return False
    compiled = _compiled.get(name)
    if compiled is None:
        compiled = _compiled[name] = torch.compile(function, dynamic=True, fullgraph=True)
    try:
        compiled(*args)
    except Exception as error:  # a missing compiler or Triton: count eagerly from now on
        _failed.add(name)
        warnings.warn(f"fused capture counting ({name}) could not be compiled, counting "
                      f"eagerly instead: {type(error).__name__}: {error}", RuntimeWarning)
        return False
    return True


def add_step_positives(counts: torch.Tensor, steps: torch.Tensor, limits: torch.Tensor | None) -> bool:
    """``counts += (steps > limits).sum(steps)`` in one kernel, if fused counting is on.

    ``counts`` ``[L, B, D]``; ``steps`` ``[L, n, B, D]`` activations, or ``[L, B, D]`` for
    one step; ``limits`` None (every row real) or ``[n, B, 1]`` (+inf where a row has
    finished; ``[B, 1]`` for one step). The caller keeps
    ``n`` within what ``counts``' type holds. Returns whether it counted.
    """
    return _run("steps", _add_step_positives, counts.device, counts, steps, limits)


def add_prefill_positives(counts: torch.Tensor, g: torch.Tensor, valid: torch.Tensor | None) -> bool:
    """``counts += ((g > 0) & valid).sum(positions)`` in one kernel, if fused counting is on.

    ``counts`` ``[B, D]``; ``g`` ``[B, S, D]``; ``valid`` ``[B, S]`` booleans or None (every
    position real). Returns whether it counted.
    """
    return _run("prefill", _add_prefill_positives, counts.device, counts, g, valid)
