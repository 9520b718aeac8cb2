"""Rows of different lengths through one batched call of a speech decoder, each as if alone.

Upstream speech decoders (a flow-matching DiT over mel frames, a convolutional vocoder such
as BigVGAN or HiFT) are run once per output row, because rows of unequal length would read
each other's padding. Two mechanisms make a padded batch compute, at every real position of
a row, what that row computes alone:

* **Attention**: keys past a row's end are masked (``key_padding``); a padded query keeps
  its own key, so no softmax row is empty (an empty one is NaN, and 0 x NaN would leak).
* **Convolutions** (``ragged_time_axis``): before every operator that mixes time steps, the
  positions past each row's end are refilled with what that operator's own padding would
  put there for the row alone: zeros before a zero-padded ``Conv1d``/``ConvTranspose1d``,
  the row's last value before an operator that pads by replicating its edge. Everything in
  between is elementwise, so the garbage that padded positions accumulate never reaches a
  real position. A row's valid length at any depth is its input length scaled by that
  depth's length ratio, which holds for vocoders whose layers keep or multiply the length
  (``same`` convolutions, transposed convolutions with stride ``s`` and padding
  ``(k - s) / 2``, resamplers by integer ratios); a layer that breaks the ratio raises.

The results equal the single-row decode up to the rounding of kernels run at another shape
(exactly, where the backend's kernels do not depend on the length); the adapters' tests
state the measured difference. Used by the Qwen2.5-Omni adapter's token2wav, Kimi-Audio's
BigVGAN and MiniCPM-o's HiFT (whose last stage runs on an STFT frame axis of ``120 n + 1``
steps, not a multiple of its ``n`` mel frames: it passes its own ``lengths_at`` rule).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn


def valid_lengths(lengths: torch.Tensor, full: int, current: int) -> torch.Tensor:
    """Per-row valid lengths at a depth whose time axis is ``current`` long (input: ``full``)."""
    scaled = lengths * current
    if bool((scaled % full != 0).any()):
        raise ValueError(
            f"a layer changed the time axis from {full} to {current} steps, not by a ratio that "
            "maps every row's length to a whole number of steps; this decoder cannot be "
            "batched with ragged lengths (decode one row at a time)"
        )
    return scaled // full


def longest_first(lengths: Sequence[int], max_rows: int | None = None) -> list[list[int]]:
    """Row indices in groups of at most ``max_rows`` (None: one group), longest rows first
    (ties in input order), so each group pads its rows to similar lengths."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (or None for all rows), got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = max_rows or max(len(order), 1)
    return [order[start:start + size] for start in range(0, len(order), size)]


def past_the_end(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """``[rows, steps]`` booleans: True where a position lies past its row's end."""
    return torch.arange(steps, device=lengths.device)[None, :] >= lengths[:, None]


def key_padding(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """``[rows, steps, steps]`` booleans: True where query ``i`` must not see key ``j``.

    Keys past the row's end are blocked, except each position's own key, so a padded query
    still has one key to attend to (its output is garbage that stays in the padding).
    """
    blocked = past_the_end(lengths, steps)[:, None, :]
    own = torch.eye(steps, dtype=torch.bool, device=lengths.device)
    return blocked & ~own


def _refill_zeros(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(past_the_end(lengths, x.shape[-1])[:, None, :], 0)


def _refill_edge(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(x.shape[0], x.shape[1], 1)
    edge = x.gather(-1, index)
    return torch.where(past_the_end(lengths, x.shape[-1])[:, None, :], edge, x)


def _zero_padded(module: nn.Module) -> bool:
    return getattr(module, "padding_mode", "zeros") == "zeros"


@contextlib.contextmanager
def ragged_time_axis(decoder: nn.Module, lengths: Sequence[int] | torch.Tensor,
                     replicate_padded: Iterable[type] = (), *, input_steps: int | None = None,
                     device: torch.device | str | None = None,
                     lengths_at: Callable[[torch.Tensor, int, int], torch.Tensor] = valid_lengths):
    """Inside the block, ``decoder([rows, channels, steps])`` treats row ``b`` as ``lengths[b]``
    steps long: every ``Conv1d``/``ConvTranspose1d`` and every module of a
    ``replicate_padded`` type sees, past the row's end, what its padding would supply.

    The decoder's input length is read when ``decoder`` is called, so the block may wrap a
    call that reaches the decoder indirectly. A decoder whose stages the caller runs one by
    one (never calling ``decoder`` itself) gives that length as ``input_steps`` (and the
    ``device`` of its tensors). ``lengths_at(lengths, input_steps, steps)`` gives the rows'
    valid lengths on a time axis of ``steps`` (default: scaled by the ratio,
    ``valid_lengths``); a decoder with a non-proportional axis passes its own rule.
    Hooks are removed on leaving.
    """
    replicate_padded = tuple(replicate_padded)
    state: dict[str, object] = {}

    def start(rows: int, steps: int, on: torch.device | str | None) -> None:
        if rows != len(state["lengths_cpu"]):
            raise ValueError(f"ragged_time_axis: {len(state['lengths_cpu'])} lengths for a batch "
                             f"of {rows} rows")
        state["full"] = steps
        state["lengths"] = torch.as_tensor(state["lengths_cpu"], device=on)
        state["cache"] = {}

    def enter(module, args):
        x = args[0]
        if x.dim() != 3:
            raise ValueError(f"ragged_time_axis: the decoder got a {x.dim()}-D input; "
                             "expected [rows, channels, steps]")
        start(x.shape[0], x.shape[-1], x.device)

    def lengths_on(steps: int) -> torch.Tensor:
        cache = state["cache"]
        if steps not in cache:
            cache[steps] = lengths_at(state["lengths"], state["full"], steps)
        return cache[steps]

    def refill(fill):
        def hook(module, args):
            if "full" not in state:
                return None  # called outside the decoder's own call
            x = args[0]
            return (fill(x, lengths_on(x.shape[-1])), *args[1:])

        return hook

    state["lengths_cpu"] = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if min(state["lengths_cpu"], default=1) < 1:
        raise ValueError("ragged_time_axis: every row needs at least one step")
    if input_steps is not None:
        start(len(state["lengths_cpu"]), int(input_steps), device)
    handles = [] if input_steps is not None else [decoder.register_forward_pre_hook(enter)]
    try:
        for name, module in decoder.named_modules():
            if isinstance(module, replicate_padded):
                handles.append(module.register_forward_pre_hook(refill(_refill_edge)))
            elif isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                if not _zero_padded(module):
                    raise ValueError(f"ragged_time_axis: {name} pads with {module.padding_mode!r}, "
                                     "which cannot be refilled; decode one row at a time")
                handles.append(module.register_forward_pre_hook(refill(_refill_zeros)))
        yield
    finally:
        for handle in handles:
            handle.remove()
