"""Capture's counting as ``torch.compile``-d kernels on CUDA: one pass where eager runs two or three.

Eager PyTorch counts a decode step as a comparison that writes booleans and an add that
reads them back with the counts; a prefill as a comparison, the padding's removal and a
sum. Fused, each is one kernel that reads the activations once. In the engine on an H200 at
Kimi-Audio's width (34 layers of 18,944 neurons), SiLU plus the counting of one decode step
takes 1.30 → 0.94 ms of device time at 256 rows (SiLU alone 0.43) and 4.11 → 2.73 ms at
2048 (1.48); a left-padded prefill's counting 24.3 → 10.4 ms at 256 rows and 188 → 74 ms
at 2048 (``benchmarks/step_counting.py``, ``benchmarks/prefill_counting.py``).

Shapes are why: compiled for dynamic shapes (the first two forms of this module) the same
kernels ran no faster than eager, and slower at 2048 rows (5.35 against 4.15 ms a step), as
a kernel that cannot assume a row's width or alignment loses its vectorised loads. So a
step's flush is compiled for its exact shapes, and only a full step buffer is flushed this
way (a session's last, partial flush runs eagerly): a job compiles once per batch size and
kind of call, a few seconds each. A prefill's positions differ from batch to batch, so only
that dimension is left dynamic there.

Counts are integers, so the fused kernels give exactly the eager counts (tested on CPU
through the same compiler). **On by default for CUDA tensors** (``ESN_FUSED_COUNTING=auto``)
for the device time above; whole runs on an H200 could not resolve it (~1 % of a Kimi-Audio
call, below their run-to-run noise: BENCHMARKS.md, "2026-12-04, later"). The compiles,
~10-15 s for the first and 1-8 s for each later shape, are paid once per
process. ``=0`` counts eagerly everywhere, ``=1`` compiles on every device (tests).
Wherever compiling fails, a warning says so once and the engine counts eagerly.

A decode step replayed as a CUDA graph (``models/graphed_decode``) counts into fixed slots
instead: a SiLU layer's activation and count are one kernel there (``silu_and_count_step``),
where eager runs SiLU, the comparison and the addition. The kernel is compiled by the
graph's warm-up run, before the capture, which then records only its launch; a shape not
compiled by then is never compiled inside a capture (the eager ops are recorded instead).
Its SiLU is written as PyTorch's kernels compute it and compiled with inductor's eager
numerics, so that ``g``, which the model goes on with, keeps eager's last bit (checked
bit for bit on CPU in the tests; unmeasured on GPU), and counts are taken on ``g`` as
rounded, as eager takes them. Its cost inside a graph is unmeasured.
"""

from __future__ import annotations

import contextlib
import functools
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


_compiled: dict[str, tuple[object, set]] = {}  # name -> (compiled function, shapes it has run)
_failed: set[str] = set()

# Kernels one function may be compiled into: one per batch size, group and kind of step
# (with or without finished rows). Dynamo's own limit, 8, a two-group job with a last,
# shorter batch already reaches, and with ``fullgraph`` hitting it is an error.
RECOMPILE_LIMIT = 64


SETTINGS = ("auto", "0", "1")  # of ESN_FUSED_COUNTING; also checked before a workflow's jobs


def _setting() -> str:
    value = os.environ.get("ESN_FUSED_COUNTING", "auto").strip().lower()
    if value not in SETTINGS:
        raise ValueError(f"ESN_FUSED_COUNTING must be auto, 0 or 1, got {value!r}")
    return value


def _enabled(device: torch.device) -> bool:
    setting = _setting()
    return setting == "1" or (setting == "auto" and device.type == "cuda")


def _shapes(args) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor)
                 else a for a in args)


_NOT_RUN = object()  # what ``_call`` returns where the caller must compute eagerly


def _call(name: str, function, device: torch.device, *args, options: dict | None = None):
    """``function(*args)`` compiled (with inductor ``options``); ``_NOT_RUN`` where fused
    counting is not used."""
    if name in _failed or not _enabled(device):
        return _NOT_RUN
    if name not in _compiled:
        # Fixed shapes (see the module's docstring); a prefill marks its positions dynamic.
        _compiled[name] = torch.compile(function, dynamic=False, fullgraph=True, options=options), set()
    compiled, seen = _compiled[name]
    shapes = _shapes(args)
    if shapes not in seen and _capturing(device):
        # Compiling launches work a CUDA graph capture forbids: the recorded step gets the
        # eager ops instead. (A graph's warm-up run compiles its shapes before the capture.)
        return _NOT_RUN
    # Only a call with new shapes can compile; the others skip the patch's ~20 us.
    limit = (torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if shapes not in seen
             else contextlib.nullcontext())
    try:
        with limit:
            result = compiled(*args)
    except Exception as error:  # a missing compiler or Triton: count eagerly from now on
        _failed.add(name)
        warnings.warn(f"fused capture counting ({name}) could not be compiled, counting "
                      f"eagerly instead: {type(error).__name__}: {error}", RuntimeWarning)
        return _NOT_RUN
    seen.add(shapes)
    return result


def _run(name: str, function, device: torch.device, *args) -> bool:
    """Run ``function`` compiled; False (nothing done) where fused counting is not used."""
    return _call(name, function, device, *args) is not _NOT_RUN


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


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
    # Every batch's prompts have their own length: one kernel for all of them, not a
    # compile per length. ``maybe``: a length the compiler must specialise is no error.
    if _enabled(counts.device):
        torch._dynamo.maybe_mark_dynamic(g, 1)
        if valid is not None:
            torch._dynamo.maybe_mark_dynamic(valid, 1)
    return _run("prefill", _add_prefill_positives, counts.device, counts, g, valid)


def _silu_and_count_step(x: torch.Tensor, limits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # SiLU written as PyTorch's own kernels compute it (x / (1 + exp(-x)), half types in
    # float32), not as inductor's x * sigmoid(x), so that g can keep eager's last bit.
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    g = (wide / (1 + torch.exp(-wide))).to(x.dtype)
    counts.add_(g > limits)  # on g as rounded, as eager counts it
    return g


@functools.cache
def _eager_numerics() -> dict:
    """Inductor settings that round as eager PyTorch does, those this torch has: keep every
    cast to a half type, take CUDA's libdevice and its correctly rounded division."""
    from torch._inductor import config

    options = {}
    if hasattr(config, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    if hasattr(getattr(config, "eager_numerics", None), "division_rounding"):
        options["eager_numerics.division_rounding"] = True
    return options


def silu_and_count_step(function, x: torch.Tensor, limits: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor | None:
    """``g = silu(x)`` and ``counts += g > limits`` in one kernel, if fused counting is on.

    For one decode step of a layer whose activation ``function`` is SiLU's kernel binding
    (what ``hooks.plain_function`` makes of an ``nn.SiLU`` or transformers' SiLU): ``x``
    ``[B, 1, D]``, ``limits`` ``[B, 1, 1]`` (0, or +inf for a finished row), ``counts`` int32
    ``[B, 1, D]``, added to in place. Returns ``g``, a new tensor, or None where nothing was
    done (another function, autograd, fused counting off or failed): the caller runs both.
    """
    if function is not torch._C._nn.silu or x.requires_grad:
        return None
    g = _call("silu_step", _silu_and_count_step, x.device, x, limits, counts, options=_eager_numerics())
    return None if g is _NOT_RUN else g
