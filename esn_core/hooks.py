"""Capture and intervention engine on the gate activation ``g = act_fn(gate_proj(x))``.

One hook site per gated MLP (SPEC §1): for the duration of a session, ``mlp.act_fn`` resolves
to a thin function that counts positive activations and/or rewrites ``g`` on mask
dimensions (an instance attribute shadowing the registered submodule, which stays where it
is). Leaving the session deletes those attributes, so the model is restored exactly (no
stale hooks, no changed parameters or module tree).

Design choices, each for a measured or specified reason:

* Gated MLPs are found by *structure* (``gate_proj``/``up_proj``/``down_proj``/``act_fn``)
  under a root module that the model adapter names per group (``lm``, ``synth``), never by
  hard-coded attribute paths: the same code serves Qwen2, Qwen3, Llama and the Omni models.
* Counters live on the model's device as one int32 ``[B, D_l]`` tensor per layer and are
  moved to the host once, when the session ends: no per-call synchronisation (one per
  prefill, to learn whether it has padding at all).
* A decode step (one position per row) is where per-token cost matters: a SiLU layer's
  activation kernel writes ``g`` straight into that layer's slot of a step buffer, so
  counting adds no kernel; the buffer is reduced every few steps. Counts are summed as
  bytes: PyTorch would first copy a bool tensor into the sum's type (4 bytes an element).
  On CUDA, ``esn_core.fused_counting`` runs the reductions (a flush, a prefill layer) as
  one compiled kernel each (the same counts; ``ESN_FUSED_COUNTING=0`` turns it off).
* Padding never counts. A forward pre-hook on the group's *root* (the module ``generate``
  calls) reads ``attention_mask`` and, at decode steps, the fed token ids; a row stops
  counting once it has fed an end-of-sequence token, because a single unpadded run would
  have stopped there. Batched counts therefore equal separate single runs.
* Interventions are data: a method plus per-row flat neuron indices and per-row α. They are
  compiled once per session into one ``[B, 1, D_l]`` operand per layer, so every method is a
  single in-place elementwise op per decode step, reached without a further Python call (in
  ``generate`` each call and launch costs twice what a tight loop shows); a row with an
  empty mask gets the identity operand (×1, +0, max with −inf) and is an untouched
  baseline, bit for bit. A prefill touches only the masked (row, neuron) pairs while they
  are few; a layer no row masks is not touched.
* ``steer`` and ``deactivate`` are linear in ``g``, so ``folded_down_proj`` offers them as a
  change of ``down_proj`` columns with an exact restore, for zero per-token cost.
* Counts are taken on ``g`` as the model computes it, before the intervention rewrites it.
* A decode step replayed as a CUDA graph (``models/graphed_decode``) runs no Python per
  step: while it is recorded, each hook becomes tensor ops on ``GraphSlots`` (counts, row
  validity and operands at fixed addresses), which the session fills before each replay
  and adds to its own counts when it ends. With fused counting on, a SiLU layer's
  activation and count are one compiled kernel there (``fused_counting``).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from esn_core import fused_counting
from esn_core.layout import NeuronLayout

METHODS = ("steer", "add", "clamp", "deactivate")
# SiLU's own kernel binding, what ``F.silu`` calls after its Python-level checks (the
# binding handles ``__torch_function__`` itself).
SILU = torch._C._nn.silu
CountPositions = Literal["all", "generated"]


# --------------------------------------------------------------------------- discovery


def is_gated_mlp(module: nn.Module) -> bool:
    """True for a module shaped like transformers' gated MLPs (Qwen2/Qwen3/Llama...)."""
    children = module._modules
    return (
        isinstance(children.get("gate_proj"), nn.Linear)
        and isinstance(children.get("up_proj"), nn.Linear)
        and isinstance(children.get("down_proj"), nn.Linear)
        # the registered module: during a session an instance attribute shadows it
        and isinstance(children.get("act_fn"), nn.Module)
    )


def find_gated_mlps(root: nn.Module) -> list[nn.Module]:
    """All gated MLPs under ``root`` in module order (= layer order for decoder stacks)."""
    return [m for _, m in root.named_modules() if is_gated_mlp(m)]


@dataclass
class MLPGroup:
    """The hooked MLPs of one module group and the module whose inputs define positions.

    ``root`` is the module ``generate`` calls each step (its ``input_ids`` and
    ``attention_mask`` tell which positions are real); ``eos_token_ids`` end a row.
    """

    mlps: list[nn.Module]
    root: nn.Module | None = None
    eos_token_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if not self.mlps:
            raise ValueError("an MLP group needs at least one gated MLP")
        for i, mlp in enumerate(self.mlps):
            if not is_gated_mlp(mlp):
                raise TypeError(f"layer {i}: {type(mlp).__name__} is not a gated MLP")

    @classmethod
    def under(cls, root: nn.Module, position_root: nn.Module | None = None, eos_token_ids=()):
        return cls(find_gated_mlps(root), position_root, tuple(eos_token_ids))

    @property
    def layout(self) -> NeuronLayout:
        return NeuronLayout(tuple(m.gate_proj.out_features for m in self.mlps))


# --------------------------------------------------------------------------- interventions


@dataclass(frozen=True)
class Intervention:
    """What to do to ``g`` on which neurons, per batch row.

    ``row_masks[b]`` holds flat neuron indices (NeuronLayout order) for row ``b``; an empty
    array leaves the row untouched. ``row_alphas[b]`` is that row's α (ignored by
    ``deactivate``).
    """

    method: str
    row_masks: tuple[np.ndarray, ...]
    row_alphas: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"intervention method {self.method!r} is not one of {METHODS}")
        if len(self.row_masks) != len(self.row_alphas):
            raise ValueError(
                f"{len(self.row_masks)} row masks but {len(self.row_alphas)} row alphas"
            )
        for b, alpha in enumerate(self.row_alphas):
            if self.method != "deactivate" and not alpha >= 0:
                raise ValueError(f"row {b}: alpha must be >= 0 for {self.method}, got {alpha}")

    @classmethod
    def uniform(cls, method: str, mask: np.ndarray, alpha: float, batch_size: int):
        mask = np.asarray(mask, dtype=np.int64)
        return cls(method, (mask,) * batch_size, (float(alpha),) * batch_size)

    @property
    def batch_size(self) -> int:
        return len(self.row_masks)


def _identity_value(method: str) -> float:
    return {"steer": 1.0, "deactivate": 1.0, "add": 0.0, "clamp": float("-inf")}[method]


def _masked_value(method: str, alpha: float) -> float:
    return {"steer": 1.0 + alpha, "deactivate": 0.0, "add": alpha, "clamp": alpha}[method]


def check_mask_indices(plan: Intervention, n_neurons: int, group: str = "") -> None:
    where = f"group {group!r} " if group else ""
    for b, mask in enumerate(plan.row_masks):
        mask = np.asarray(mask)
        if mask.size and (mask.min() < 0 or mask.max() >= n_neurons):
            raise IndexError(f"{where}row {b}: mask index outside 0..{n_neurons - 1}")


# A prefill call touches the masked (row, neuron) pairs only, by gather and scatter, while
# they are at most this share of the layer's [B, D_l] grid: a broadcast ``g * [B, 1, D_l]``
# runs in PyTorch's non-vectorised kernel (0.63 ms per layer at batch 64 x 160 positions on
# an H200) and reads and writes every activation; the pairs of a 0.5% mask are ~1% of that.
SPARSE_SHARE = 1 / 8
# ... and while the call has at least this many activations. Below it the broadcast is the
# cheaper one: the gather, the index and the scatter cost ~90 us of host time per layer
# inside generate (a batch-1 prefill of 160 positions took 12.5% longer steered), while the
# broadcast runs at ~3 ps per activation (~54 us at this size, 10 us at that prefill).
SPARSE_MIN_ELEMENTS = 2**24


@dataclass(frozen=True)
class LayerOperand:
    """One layer's share of an intervention, compiled for the two kinds of call.

    ``dense`` (``[B, 1, D_l]``, identity where a row leaves a neuron alone) serves calls of
    one position per row (decode steps) and small calls over many: one elementwise kernel.
    ``rows``/``neurons``/``values`` list the masked pairs, when they are few (``None``
    otherwise), for large calls over many positions (``touches_pairs``). ``dense`` is
    ``None`` when no row masks a neuron of this layer: the layer runs untouched.
    """

    method: str
    batch_size: int
    dense: torch.Tensor | None
    rows: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
    values: torch.Tensor | None = None  # [P, 1], the masked value per pair

    def apply(self, g: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        """``g`` with the intervention applied; in place if allowed and autograd is not
        watching."""
        if g.shape[0] != self.batch_size:
            raise ValueError(
                f"intervention has {self.batch_size} rows but the batch has {g.shape[0]}"
            )
        if self.dense is None:
            return g
        inplace = inplace and not (torch.is_grad_enabled() and g.requires_grad)
        if inplace and self.touches_pairs(g):
            # [B, D, S] view: one advanced index picks a pair's S positions at once.
            by_neuron = g.transpose(1, 2)
            picked = by_neuron[self.rows, self.neurons]  # [P, S]
            by_neuron.index_put_((self.rows, self.neurons), _OPERATIONS[self.method][0](picked, self.values))
            return g
        return _OPERATIONS[self.method][inplace](g, self.dense)

    def touches_pairs(self, g: torch.Tensor) -> bool:
        """Does a call on ``g`` gather and scatter the masked pairs (else: the broadcast)?"""
        return (self.rows is not None and g.dim() == 3 and g.shape[1] > 1
                and g.numel() >= SPARSE_MIN_ELEMENTS)


def compile_operands(
    plan: Intervention, layout: NeuronLayout, device, dtype
) -> list[LayerOperand]:
    """One ``LayerOperand`` per layer, so a hooked call is one elementwise op (or a
    gather and a scatter of the masked pairs).

    All layers' operands share one allocation, filled on the device by one scatter. The
    pairs are placed, sorted and deduplicated on the device too, from copies of the masks
    and their row numbers: on the host, sorting a batch-64 plan's 170k pairs took most of
    the ~34 ms a session took to open. No host work proportional to ``B x N``, no temporary
    the size of the operands, one synchronisation (the pairs per layer).
    """
    check_mask_indices(plan, layout.n_neurons)
    batch = plan.batch_size
    masks = [np.asarray(mask, dtype=np.int64).ravel() for mask in plan.row_masks]
    cols = torch.as_tensor(np.concatenate(masks + [np.zeros(0, np.int64)]), device=device)
    rows = torch.as_tensor(np.repeat(np.arange(batch, dtype=np.int64), [m.size for m in masks]), device=device)
    offsets = torch.as_tensor(layout.offsets, device=device)
    sizes = torch.as_tensor(layout.layer_sizes, dtype=torch.int64, device=device)
    # Layer l's operand is the [B, D_l] block starting at B * offset_l of one flat tensor.
    layer_of = torch.searchsorted(offsets, cols, right=True) - 1
    flat = batch * offsets[layer_of] + rows * sizes[layer_of] + (cols - offsets[layer_of])
    # Sorted, the pairs group by layer, then row, then neuron; a repeated index goes.
    flat = torch.unique(flat)
    layer_of = torch.searchsorted(batch * offsets, flat, right=True) - 1
    within = flat - batch * offsets[layer_of]  # row * D_l + neuron
    rows = torch.div(within, sizes[layer_of], rounding_mode="floor")
    neurons = within - rows * sizes[layer_of]
    row_values = torch.as_tensor([_masked_value(plan.method, a) for a in plan.row_alphas], dtype=torch.float64)
    masked = row_values.to(device=device, dtype=dtype)[rows]
    block = torch.full((batch * layout.n_neurons,), _identity_value(plan.method), dtype=dtype, device=device)
    block[flat] = masked
    bounds = [0] + torch.bincount(layer_of, minlength=layout.n_layers).cumsum(0).tolist()
    starts = (batch * layout.offsets[:-1]).tolist()
    operands = []
    for layer, width in enumerate(layout.layer_sizes):
        lo, hi = bounds[layer], bounds[layer + 1]
        if lo == hi:
            operands.append(LayerOperand(plan.method, batch, None))
            continue
        dense = block[starts[layer] : starts[layer] + batch * width].view(batch, 1, width)
        sparse = hi - lo <= SPARSE_SHARE * batch * width
        operands.append(LayerOperand(
            plan.method, batch, dense,
            *((rows[lo:hi], neurons[lo:hi], masked[lo:hi, None]) if sparse else (None, None, None))))
    return operands


# Per method: (out-of-place, in-place) elementwise op.
_OPERATIONS = {
    "steer": (torch.mul, torch.Tensor.mul_),
    "deactivate": (torch.mul, torch.Tensor.mul_),
    "add": (torch.add, torch.Tensor.add_),
    "clamp": (torch.maximum, lambda g, operand: torch.maximum(g, operand, out=g)),
}


# --------------------------------------------------------------------------- capture


@dataclass(frozen=True)
class Capture:
    count_positions: CountPositions = "all"
    moments: bool = False

    def __post_init__(self) -> None:
        if self.count_positions not in ("all", "generated"):
            raise ValueError(
                f"count_positions must be 'all' or 'generated', got {self.count_positions!r}"
            )


@dataclass
class CountResult:
    """Per-row statistics of one session (SPEC §2), on the host."""

    K: np.ndarray  # [B, N] positions with g > 0 (uint8 when T < 256, else int32)
    T: np.ndarray  # [B] int64, counted positions
    layout: NeuronLayout
    sum_a: np.ndarray | None = None  # [B, N] float32
    sum_a2: np.ndarray | None = None  # [B, N] float32


class _Counter:
    """Positive-activation counters of one group for one batch, on the model's device.

    Counts accumulate in bytes, laid out ``[L, B, D]`` per run of equal-width layers (the
    step buffer's own order, so adding a step's counts is one contiguous, vectorised
    kernel), and are folded into an int32 ``[B, N]`` table only when a row might pass 255
    counted positions. A batch whose rows count fewer (every Kimi-Audio or MiniCPM-o
    conversion) never makes the int32 table: the counts leave as the bytes they are, with a
    quarter of the memory traffic of int32 counters at every step.

    Prefill calls (many positions) are reduced at once. A decode call (one position per
    row) writes the layer's activations into that layer's columns of a step buffer: a
    SiLU layer's own kernel writes them there (``silu(x, out=...)``), so counting costs no
    kernel at all; any other activation costs one ``g > 0`` written there. Every few steps
    the buffer (all layers) is compared and added to the byte counts, finished rows
    excluded by the comparison itself (a threshold of +inf), not by a second pass.
    """

    BUFFER_BYTES = 256 * 2**20
    MAX_STEPS = 32  # at most 255: a flush sums each neuron's steps in one byte

    def __init__(self, layout: NeuronLayout, capture: Capture):
        self.layout = layout
        self.capture = capture
        self.K: list[torch.Tensor] = []  # [layer] -> [B, D_l] byte-count view
        self.byte_runs: list[torch.Tensor] = []  # per run of equal-width layers: [L_r, B, D_r] uint8
        self.wide: list[torch.Tensor] = []  # [layer] -> [B, D_l] view of the int32 table, once made
        self.wide_all: torch.Tensor | None = None  # [B, N] int32, made at the first fold
        self.pending = 0  # positions any row may have added to the byte counts since a fold
        self.T: torch.Tensor | None = None
        self.sum_a: list[torch.Tensor] = []
        self.sum_a2: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None  # [B, S] for the current call
        self.padding_rows: torch.Tensor | None = None  # a "some" prefill's padding, as rows of [B S, D]
        self.prefill_into: list[torch.Tensor] = []  # the current prefill's count views
        # Per run of equal-width layers: ([L_r, steps, B, 1, D_r] buffer in the activations'
        # dtype, [L_r, B, D_r] byte counts); made at the first decode call.
        self.step_runs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.step_views: list[list[torch.Tensor]] = []  # [layer][step] -> [B, 1, D_l] view
        self.capacity = self.MAX_STEPS  # steps the buffer holds, once it is made
        self.step_valid: torch.Tensor | None = None  # [MAX_STEPS, B, 1] bool
        self.step_valid_views: list[torch.Tensor] = []
        self.slot = -1  # step-buffer slot of the current decode call, -1 for a prefill call
        self.graph_steps = 0  # captured decode steps run, not yet added to ``T``
        self.positions = "some"  # of a prefill call: are "all", "some" or "none" real
        self._zeros: torch.Tensor | None = None
        self.filled = 0
        # Whether a row of the buffered steps may have finished; until one may, every row
        # is real and the step-validity slots are neither written nor read.
        self.some_finished = False

    def _allocate(self, batch: int, device) -> None:
        self.byte_runs, self.K = [], []
        for width, run in itertools.groupby(self.layout.layer_sizes):
            counts = torch.zeros(len(list(run)), batch, width, dtype=torch.uint8, device=device)
            self.byte_runs.append(counts)
            self.K += list(counts.unbind(0))
        self.T = torch.zeros(batch, dtype=torch.int64, device=device)
        self.step_valid = torch.empty(self.MAX_STEPS, batch, 1, dtype=torch.bool, device=device)
        self.step_valid_views = list(self.step_valid.unbind(0))
        if self.capture.moments:
            sizes = self.layout.layer_sizes
            self.sum_a = [torch.zeros(batch, d, dtype=torch.float32, device=device) for d in sizes]
            self.sum_a2 = [torch.zeros(batch, d, dtype=torch.float32, device=device) for d in sizes]

    def _wide_table(self) -> list[torch.Tensor]:
        """The int32 ``[B, N]`` table's per-layer views, made zeroed on first use."""
        if self.wide_all is None:
            batch, device = self.T.shape[0], self.T.device
            self.wide_all = torch.zeros(batch, self.layout.n_neurons, dtype=torch.int32, device=device)
            self.wide = list(torch.split(self.wide_all, list(self.layout.layer_sizes), dim=1))
        return self.wide

    def _fold(self) -> None:
        """Byte counts into the int32 table, bytes zeroed: they may count 255 more."""
        if self.pending:
            for wide, counts in zip(self._wide_table(), self.K):
                wide += counts
            for counts in self.byte_runs:
                counts.zero_()
        self.pending = 0

    def _reserve(self, positions: int) -> list[torch.Tensor]:
        """Where ``positions`` more positions per row are counted: the byte counts, folded
        first if they could overflow, or the int32 table for a call longer than a byte holds."""
        if positions > _BYTE_SUM_LIMIT:
            return self._wide_table()
        if self.pending + positions > _BYTE_SUM_LIMIT:
            self._fold()
        self.pending += positions
        return self.K

    def add_counts(self, layer: int, counts: torch.Tensor) -> None:
        """Counts from elsewhere (a captured decode step's int32 slots) into ``layer``'s."""
        self._wide_table()[layer] += counts

    def _make_step_buffer(self, dtype: torch.dtype, device) -> None:
        """One buffer per run of equal-width layers (one for a decoder stack), laid out so
        that a layer's slot is contiguous (vectorised kernels write and read it) and a flush
        is one comparison and one addition per run."""
        batch, n = self.T.shape[0], self.layout.n_neurons
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.capacity = int(max(1, min(self.MAX_STEPS, self.BUFFER_BYTES // (batch * n * itemsize))))
        self.step_runs, self.step_views = [], []
        for counts in self.byte_runs:
            layers, _, width = counts.shape
            buffer = torch.empty(layers, self.capacity, batch, 1, width, dtype=dtype, device=device)
            self.step_runs.append((buffer, counts))
            # Views made once, so a decode call costs no slicing.
            self.step_views += [list(layer.unbind(0)) for layer in buffer.unbind(0)]

    def _ensure(self, batch: int, device) -> None:
        if not self.K:
            self._allocate(batch, device)
        elif batch != self.T.shape[0]:
            raise RuntimeError(f"batch changed from {self.T.shape[0]} to {batch} rows within a session")

    def begin_positions(self, valid: torch.Tensor, positions: str | None = None) -> None:
        """A forward pass over several positions per row (prefill); ``valid`` is ``[B, S]``.

        ``positions`` says whether "all", "some" or "none" of them are real, if the caller
        knows; otherwise it is read from ``valid`` (one synchronisation per prefill). The
        layers then skip the masking or the whole count.

        Padding is kept out of a layer's ``g > 0`` by setting its positions' rows to False
        by index, not by comparing with per-position +inf limits: a ``[B, S, 1]`` operand
        broadcast across the neurons sends CUDA's comparison down its non-vectorised kernel
        (``benchmarks/prefill_counting.py``: 41 → 24 ms for a 256-row Kimi-Audio prefill
        on an H200, 34 layers; counting no padding at all takes 17).
        """
        self._ensure(valid.shape[0], valid.device)
        if self.filled:
            self.flush()
        self.valid = valid
        self.T += valid.sum(dim=1)
        self.padding_rows = None
        if positions in (None, "some"):
            # The padding's positions as flat row indices, made once a prefill (the one
            # synchronisation): each layer sets their rows of its ``g > 0`` to False.
            self.padding_rows = (~valid).flatten().nonzero().squeeze(1)
            padding = self.padding_rows.numel()
            positions = "all" if padding == 0 else "none" if padding == valid.numel() else "some"
        self.positions = positions
        self.prefill_into = self._reserve(valid.shape[1]) if positions != "none" else []
        self.slot = -1

    def begin_step(self, finished: torch.Tensor | None, batch: int, device) -> None:
        """A decode step (one position per row): real unless the row has ``finished``.

        Writes the step's validity straight into its slot: one small op per step.
        """
        self._ensure(batch, device)
        if self.filled == self.capacity:
            self.flush()
        self.slot = self.filled
        view = self.step_valid_views[self.slot]
        if finished is not None:
            if not self.some_finished:
                # The earlier slots of this buffer were left unwritten (every row real).
                self.step_valid[: self.slot].fill_(True)
                self.some_finished = True
            torch.logical_not(finished, out=view)
        elif self.some_finished:
            view.fill_(True)
        self.valid = view if self.some_finished else None  # None: every row is real
        self.filled += 1

    def _step_out(self, layer: int, t: torch.Tensor) -> torch.Tensor:
        """This decode step's slot for ``layer``; ``t`` must be ``[B, 1, D_l]``."""
        if not self.step_runs:
            self._make_step_buffer(t.dtype, t.device)
        out = self.step_views[layer][self.slot]
        # A mismatch would silently resize or broadcast into ``out``: refuse it.
        if t.shape[0] != out.shape[0] or t.shape[1] != 1 or t.shape[-1] != out.shape[-1]:
            self._positions_mismatch(layer, t)
        return out

    def silu_into_step(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(x)`` written by its own kernel into the step buffer (None: not possible)."""
        out = self._step_out(layer, x)
        if out.dtype != x.dtype:
            return None
        g = torch._C._nn.silu(x, out=out)
        if self.capture.moments:
            self._add_moments(layer, g)
        return g

    def count(self, layer: int, g: torch.Tensor) -> None:
        if self.slot >= 0:
            torch.gt(g, self._zero(g.dtype), out=self._step_out(layer, g))  # 1/0, summed at flush
        else:
            if self.valid is None or self.valid.shape != g.shape[:2]:
                self._positions_mismatch(layer, g)
            if self.positions != "none" and not fused_counting.add_prefill_positives(
                    self.prefill_into[layer], g, self.valid if self.positions == "some" else None):
                positive = torch.empty(g.shape, dtype=torch.bool, device=g.device)
                torch.gt(g, self._zero(g.dtype), out=positive)
                if self.positions == "some":
                    positive.view(-1, g.shape[-1]).index_fill_(0, self.padding_rows, False)
                _add_positive_counts(self.prefill_into[layer], positive, dim=1)
        if self.capture.moments:
            self._add_moments(layer, g)

    def _add_moments(self, layer: int, g: torch.Tensor) -> None:
        a = g.detach().float()
        if self.valid is not None:
            a = a * self.valid[:, :, None]
        self.sum_a[layer] += a.sum(dim=1)
        self.sum_a2[layer] += (a * a).sum(dim=1)

    def _positions_mismatch(self, layer: int, g: torch.Tensor):
        got = None if self.valid is None else tuple(self.valid.shape)
        raise RuntimeError(
            f"layer {layer} saw {tuple(g.shape[:2])} positions but the group's root "
            f"announced {got}: is the root the module that runs these MLPs?"
        )

    def _zero(self, dtype: torch.dtype) -> torch.Tensor:
        # A 0-dim tensor, made once: comparing with a Python 0 wraps it into a tensor on
        # every call (three extra dispatches per layer per step).
        if self._zeros is None or self._zeros.dtype != dtype:
            self._zeros = torch.zeros((), dtype=dtype)
        return self._zeros

    def flush(self) -> None:
        n = self.filled
        if n and self.step_runs:
            # Decode positions are counted here, a few steps at a time, not per step.
            valid = self.step_valid[:n]  # [n, B, 1]
            if self.some_finished:
                self.T += valid[:, :, 0].sum(dim=0)
            else:
                self.T += n
            self._reserve(n)
            # [n, B, 1, 1] (every run's buffer has the activations' dtype): made once a flush
            dtype = self.step_runs[0][0].dtype
            limits = (_validity_limits(valid, dtype)[:, :, :, None] if self.some_finished
                      else self._zero(dtype))
            # The fused kernels' operands: one step as [L, B, D] against [B, 1], several as
            # [L, n, B, D] against [n, B, 1]; no limits while every row is real.
            fused_limits = None
            if self.some_finished:
                fused_limits = limits[0, :, :, 0] if n == 1 else limits[..., 0]
            # Fused kernels are compiled for exact shapes: a full buffer's, not every
            # length a session's last flush can have.
            full = n == self.capacity
            for buffer, counts in self.step_runs:  # [L, cap, B, 1, D], [L, B, D]
                steps = buffer[:, 0, :, 0] if n == 1 else buffer[:, :n, :, 0]
                if full and fused_counting.add_step_positives(counts, steps, fused_limits):
                    continue
                positive = _step_positives(buffer[:, :n], limits)
                if n == 1:  # every step alone (large batches): no sum, bools added as bytes
                    # Read as uint8, the add has one dtype: a bool operand would send CUDA's
                    # elementwise kernel down its slower dynamic-casting path.
                    counts += positive[:, 0, :, 0].view(torch.uint8)
                else:
                    counts += positive.view(torch.uint8).sum(dim=1, dtype=torch.uint8)[:, :, 0]
        self.filled = 0
        self.some_finished = False

    def result(self) -> CountResult:
        if not self.K:
            raise RuntimeError("no activation was captured: did the model run in the session?")
        self.flush()
        T = self.T.cpu().numpy()
        if self.wide_all is None:  # every count fits in a byte: they leave as they are
            flat = [c.permute(1, 0, 2).reshape(c.shape[1], -1) for c in self.byte_runs]  # [B, L_r D_r]
            K = _to_host(torch.cat(flat, dim=1))
        else:
            self._fold()
            # Counts never exceed T: ship them in the narrowest type that holds T.
            narrow = torch.uint8 if T.max(initial=0) < 2**8 else torch.int32
            K = _to_host(self.wide_all.to(narrow))
        out = CountResult(K=K, T=T.astype(np.int64), layout=self.layout)
        if self.capture.moments:
            out.sum_a = torch.cat(self.sum_a, dim=1).cpu().numpy()
            out.sum_a2 = torch.cat(self.sum_a2, dim=1).cpu().numpy()
        return out


def _step_positives(steps: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """``steps > limits`` for a run's buffered steps ``[L, n, B, 1, D]``; ``limits`` is 0-dim
    (every row real) or ``[n, B, 1, 1]`` (+inf where a row has finished).

    Per-row limits are first widened to one layer's ``[n, B, 1, D]`` (1/L of the steps' size)
    and each layer compared with them: against an operand broadcast across the neurons
    CUDA's comparison runs its non-vectorised kernel, ~3.6x slower per element in the profile of
    Kimi-Audio's capture (the broadcast ``logical_and`` the engine used to mask with).
    """
    if limits.dim() == 0:
        return torch.gt(steps, limits)
    wide = limits.expand(steps.shape[1:]).contiguous()
    positive = torch.empty(steps.shape, dtype=torch.bool, device=steps.device)
    for layer, out in zip(steps.unbind(0), positive.unbind(0)):
        torch.gt(layer, wide, out=out)
    return positive


def _validity_limits(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``valid``, +inf where not, in ``dtype``: thresholds that count only real positions."""
    # A Python scalar is a kernel argument: no host-to-device copy in the decode loop.
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, torch.inf)


# A byte counts up to 255.
_BYTE_SUM_LIMIT = 255


def _add_positive_counts(K: torch.Tensor, positive: torch.Tensor, dim) -> None:
    """``K += positive.sum(dim)`` for a bool ``positive``, summed in one byte per count.

    PyTorch reduces a bool tensor by first copying it into the result's type (4 bytes per
    element for int32): on a GPU that copy cost more than the comparison and the sum
    together. Read as bytes and summed into bytes, nothing is copied; the leading reduced
    dimension is cut into chunks of at most 255 so that a byte cannot overflow.
    """
    as_bytes = positive.view(torch.uint8)
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    lead = dims[0]
    others = 1  # positions summed per index of the leading dimension
    for d in dims[1:]:
        others *= as_bytes.shape[d]
    if others > _BYTE_SUM_LIMIT:
        raise ValueError(f"cannot sum {others} positions per chunk in one byte")
    size = as_bytes.shape[lead]
    step = _BYTE_SUM_LIMIT // max(1, others)
    for start in range(0, size, step):
        part = as_bytes if step >= size else as_bytes.narrow(lead, start, min(step, size - start))
        K += part.sum(dim=dims, dtype=torch.uint8)


@dataclass
class _GroupState:
    group: MLPGroup
    capture: Capture | None
    intervention: Intervention | None
    counter: _Counter | None = None
    operands: list[LayerOperand] | None = None
    operands_for: tuple | None = None  # (device, dtype) the operands were compiled for
    decode_operands: list[tuple] | None = None  # per layer (dense, batch, dtype, device index)
    finished: torch.Tensor | None = None  # [B] bool, rows that fed an end token
    eos: torch.Tensor | None = None
    eos_ids: tuple[int, ...] = ()
    calls: int = 0
    # Captured decode steps this session replayed: id(slots) -> (slots, layers it covers).
    graph_bindings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capture is not None:
            self.counter = _Counter(self.group.layout, self.capture)

    # -- positions ---------------------------------------------------------------
    def observe_inputs(self, input_ids, inputs_embeds, attention_mask) -> None:
        """Work out which positions of this forward call are real, before the layers run."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise RuntimeError("the group's root was called without input_ids or inputs_embeds")
        batch, seq = ref.shape[0], ref.shape[1]
        decoding = self.calls > 0
        self.calls += 1
        if decoding and input_ids is not None and self.eos is not None:
            # A row that fed an end token would have stopped in a single run: the end
            # token and everything after it are padding for counting purposes.
            fed_end = self._fed_end(input_ids)
            self.finished = fed_end if self.finished is None else self.finished.logical_or_(fed_end)
        if decoding and seq == 1:
            # generate extends the attention mask with a 1 for every fed token, so a decode
            # step's only padding is a finished row: no mask arithmetic per step.
            self.counter.begin_step(self.finished, batch, ref.device)
            return
        known = None  # which positions are real, if the host knows without asking the device
        attention_mask = _padding_mask(attention_mask, seq, decoding)
        if attention_mask is not None:
            valid = attention_mask[:, -seq:].to(torch.bool)
        else:
            valid = torch.ones(batch, seq, dtype=torch.bool, device=ref.device)
            known = "all" if self.finished is None else None
        if self.finished is not None:
            valid = valid & ~self.finished
        if self.capture.count_positions == "generated" and not decoding:
            valid = torch.zeros_like(valid)
            known = "none"
        self.counter.begin_positions(valid, known)

    def _fed_end(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, 1]: did the row feed an end token in this call (one op for one end token)."""
        if self.eos.numel() == 1:
            hit = input_ids == int(self.eos_ids[0])
        else:
            hit = torch.isin(input_ids, self.eos)
        return hit if hit.shape[1] == 1 else hit.any(dim=1, keepdim=True)

    # -- per layer ---------------------------------------------------------------
    def activation(self, layer: int, function) -> Callable[[torch.Tensor], torch.Tensor]:
        """What stands in for ``layer``'s ``act_fn`` while the session is open.

        A plain function, not a module: it runs once per layer and token, and a module
        call costs about as much host time as the intervention itself.
        """
        if self.counter is not None:
            hooked = lambda x: self.on_activation(layer, function, x)  # noqa: E731
        else:
            hooked = self._intervening(layer, function)
        # What a captured decode step (``GraphSlots``) needs to stand in for this function.
        hooked.esn_hook = (self, layer, function)
        return hooked

    def _intervening(self, layer: int, function) -> Callable[[torch.Tensor], torch.Tensor]:
        """``function`` then the intervention. A decode step (one position per row) takes
        the shortest path there is: one in-place op with the layer's compiled operand,
        after checks that cost no dispatch. Everything else goes through ``_intervene``.

        In ``generate`` every Python call and kernel launch here costs about twice what it
        costs in a tight loop (BENCHMARKS.md), so this path is kept to one launch.
        """
        operation = _OPERATIONS[self.intervention.method][1]

        def intervened(x: torch.Tensor) -> torch.Tensor:
            g = function(x)
            fast = self.decode_operands[layer] if self.decode_operands is not None else None
            if fast is not None:
                dense, batch, dtype, device = fast
                shape = g.shape
                if (shape[0] == batch and shape[1] == 1 and g.dtype is dtype
                        and g.get_device() == device and not g.requires_grad):
                    return g if dense is None else operation(g, dense)
            return self._intervene(layer, g)

        return intervened

    def on_activation(self, layer: int, function, x: torch.Tensor) -> torch.Tensor:
        """``function(x)`` (the layer's activation), counted and maybe intervened on."""
        counter = self.counter
        if layer == 0 and self.group.root is None:
            # No root announces positions: every position is real and the first
            # layer's call marks a new forward pass.
            batch, seq = x.shape[0], x.shape[1]
            if seq == 1:
                counter.begin_step(None, batch, x.device)
            else:
                counter.begin_positions(torch.ones(batch, seq, dtype=torch.bool, device=x.device), "all")
        g = None
        if counter.slot >= 0 and function is SILU and not (torch.is_grad_enabled() and x.requires_grad):
            g = counter.silu_into_step(layer, x)
        if g is None:
            g = function(x)
            counter.count(layer, g)
            inplace = True
        else:
            inplace = False  # g lives in the step buffer, which must keep it as computed
        if self.intervention is not None:
            g = self._intervene(layer, g, inplace)
        return g

    def _intervene(self, layer: int, g: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        if self.operands is None or self.operands_for != (g.device, g.dtype):
            self.compile(g.device, g.dtype)
        return self.operands[layer].apply(g, inplace)

    # -- captured decode steps (GraphSlots) ----------------------------------------
    def graph_signature(self, layer: int):
        """What a captured decode step must do at ``layer`` for this session, as a key:
        (counts, method, touches the layer); ``None`` when a captured step cannot do it
        (moments, or counting without a root that announces positions)."""
        counting = self.counter is not None
        if counting and (self.capture.moments or self.group.root is None):
            return None
        method = self.intervention.method if self.intervention is not None else None
        touched = method is not None and self.decode_operands is not None \
            and self.decode_operands[layer][0] is not None
        if method is not None and self.decode_operands is None:
            return None  # operands not compiled (non-float weights): the eager path compiles
        return counting, method, touched

    def bind_graph_slots(self, slots: GraphSlots, layers: Sequence[int]) -> None:
        """At this session's first use of ``slots``: zeroed counts and its operands in."""
        if id(slots) not in self.graph_bindings:
            self.graph_bindings[id(slots)] = (slots, tuple(layers))
            for layer in layers:
                mlp = self.group.mlps[layer]
                if self.counter is not None:
                    slots.counts[mlp].zero_()
                if mlp in slots.operands:
                    slots.operands[mlp].copy_(self.decode_operands[layer][0])

    def begin_graph_step(self, slots: GraphSlots, layers: Sequence[int]) -> None:
        """Before a captured step replays: bound to ``slots``, this step's counting limits
        (from the rows' validity) in.

        The root's pre-hook has already reserved an eager step-buffer slot for this step;
        the captured step counts into ``slots`` instead, so the reservation is taken back.
        """
        self.bind_graph_slots(slots, layers)
        if self.counter is None:
            return
        counter = self.counter
        counter.filled -= 1
        counter.slot = -1
        slots.set_limits(self.group.root, self.finished)
        # A row's position counts unless the row has finished: the steps are counted on the
        # host (added to ``T`` once, by ``collect_graph_counts``), the finished rows taken off
        # on the device (one kernel; none while no row can finish).
        counter.graph_steps += 1
        if self.finished is not None:
            counter.T.add_(self.finished.view(-1), alpha=-1)

    def static_activation(self, layer: int, function, slots: GraphSlots):
        """The function a captured decode step runs at ``layer``: tensor ops on ``slots``
        only (fixed addresses, no host work), counting then intervening as ``on_activation``.

        Counting a SiLU layer is one compiled kernel, SiLU and count together
        (``fused_counting.silu_and_count_step``), where fused counting is on: compiled at the
        graph's warm-up run, so the capture records only its launch. Otherwise the layer's
        function then two kernels, the comparison and the addition. A finished row's limit is
        +inf, so nothing of it counts.
        """
        mlp = self.group.mlps[layer]
        counts = slots.counts.get(mlp) if self.counter is not None else None
        limits = slots.limits.get(self.group.root) if counts is not None else None
        operand = slots.operands.get(mlp)
        operation = _OPERATIONS[self.intervention.method][1] if operand is not None else None

        def counted(x: torch.Tensor) -> torch.Tensor:
            g = fused_counting.silu_and_count_step(function, x, limits, counts)
            if g is None:
                g = function(x)
                counts.add_(torch.gt(g, limits))
            return g

        activate = function if counts is None else counted

        def captured(x: torch.Tensor) -> torch.Tensor:
            g = activate(x)  # the kernel's own output either way: the operation may write into it
            return g if operation is None else operation(g, operand)

        return captured

    def collect_graph_counts(self) -> None:
        """Add what the captured steps counted to this session's counts."""
        if self.counter is None:
            return
        for slots, layers in self.graph_bindings.values():
            for layer in layers:
                self.counter.add_counts(layer, slots.counts[self.group.mlps[layer]][:, 0, :])
        self.graph_bindings.clear()
        if self.counter.graph_steps:
            self.counter.T += self.counter.graph_steps
            self.counter.graph_steps = 0

    def compile(self, device, dtype) -> None:
        self.operands = compile_operands(self.intervention, self.group.layout, device, dtype)
        self.operands_for = (torch.device(device), dtype)
        index = torch.empty(0, device=device).get_device()  # what g.get_device() returns; -1 on CPU
        # Per layer, what a decode step checks before its one in-place op (dense None: the
        # layer is untouched).
        self.decode_operands = [(op.dense, op.batch_size, dtype, index) for op in self.operands]


_PINNED: list[torch.Tensor] = []  # one page-locked byte buffer, grown to the largest copy


def _pinned_bytes(n_bytes: int) -> torch.Tensor:
    """A page-locked ``uint8`` buffer of at least ``n_bytes``, reused across calls.

    Page-locking is slow to set up (about as slow as the copy it speeds up, per byte), so
    one buffer serves every shape: the ``lm`` and ``synth`` counts of a session and a
    run's last, smaller batch all reuse it, where a buffer per shape was freed and locked
    again at every switch (twice a session with two groups).
    """
    if not _PINNED or _PINNED[0].numel() < n_bytes:
        _PINNED.clear()  # free the old lock before taking a larger one
        _PINNED.append(torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True))
    return _PINNED[0]


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    """Copy to a host array through the reused pinned buffer.

    Pageable device-to-host copies are several times slower; the result is an ordinary
    array, because callers keep a shard's counts and gigabytes of page-locked memory would
    starve the host. That last copy is torch's, which splits it over the host's threads:
    into fresh pages it runs at page-fault speed, and numpy's single thread took 2.6x as
    long (490 vs 186 ms for 1.3 GB on the H200 host, ``benchmarks/counts_to_host.py``).
    """
    if tensor.device.type != "cuda":
        return tensor.numpy().copy()
    tensor = tensor.contiguous()
    n_bytes = tensor.numel() * tensor.element_size()
    host = _pinned_bytes(n_bytes)[:n_bytes].view(tensor.dtype).view(tensor.shape)
    host.copy_(tensor)
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(host).numpy()


def plain_function(activation: nn.Module):
    """The function ``activation`` computes, when it is known to be exactly that function.

    ``act_fn`` runs once per layer and token; calling SiLU's kernel binding directly instead
    of the module saves a module dispatch per call (the same kernel runs). Anything else, e.g.
    a hub kernel swapped in for ``forward`` or a module with hooks, is called as it is.
    """
    kind = type(activation)
    if vars(activation).get("forward") is not None or activation._forward_hooks \
            or activation._forward_pre_hooks or _global_module_hooks():
        return activation
    if kind is nn.SiLU and not activation.inplace:
        return SILU
    forward = kind.forward
    if kind.__name__ == "SiLUActivation" and forward.__module__ == "transformers.activations" \
            and forward.__qualname__ == "SiLUActivation.forward":
        return SILU
    return activation


def _global_module_hooks() -> bool:
    """Are hooks registered for every module (``register_module_forward_hook``)?"""
    from torch.nn.modules import module

    return bool(getattr(module, "_global_forward_hooks", None)
                or getattr(module, "_global_forward_pre_hooks", None))


# --------------------------------------------------------------------------- sessions


class Session:
    """Handle returned by ``HookEngine.session``; holds results after the block ends."""

    def __init__(self, states: dict[str, _GroupState]):
        self._states = states
        self._results: dict[str, CountResult] = {}
        self._installs = [_Installation(state) for state in states.values()]
        self._open = True
        self._paused = False

    def counts(self, group: str) -> CountResult:
        if group not in self._results:
            raise KeyError(f"no capture for group {group!r}; captured: {sorted(self._results)}")
        return self._results[group]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The model runs plain inside the block: nothing is counted or changed.

        Counts, operands and row states are kept, and the hooks come back when the block
        ends. A forward run while paused is not seen at all, positions included (an end
        token fed then does not end its row's counting). Pausing and resuming cost the
        same host work (an attribute per MLP, and the root's hook when counting), which lets
        ``benchmarks/hook_overhead.py`` alternate hooked and plain decode steps of one
        ``generate``.
        """
        if not self._open:
            raise RuntimeError("this session has ended")
        if self._paused:
            raise RuntimeError("this session is already paused")
        for install in reversed(self._installs):
            install.remove(check_nesting=True)
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            if self._open:
                for install in self._installs:
                    install.apply()

    def _collect(self) -> None:
        for name, state in self._states.items():
            state.collect_graph_counts()
            if state.counter is not None and state.counter.K:
                self._results[name] = state.counter.result()


class HookEngine:
    """Capture and intervention on the gated MLPs of named groups (``lm``, ``synth``)."""

    def __init__(self, groups: dict[str, MLPGroup]):
        if not groups:
            raise ValueError("HookEngine needs at least one MLP group")
        self.groups = groups

    def layout(self, group: str) -> NeuronLayout:
        return self._group(group).layout

    def _group(self, name: str) -> MLPGroup:
        if name not in self.groups:
            raise KeyError(f"unknown MLP group {name!r}; this model has {sorted(self.groups)}")
        return self.groups[name]

    @contextlib.contextmanager
    def session(
        self,
        capture: dict[str, Capture] | None = None,
        interventions: dict[str, Intervention] | None = None,
    ) -> Iterator[Session]:
        """Hooks on for the ``with`` block (one batch), restored exactly on exit."""
        capture = capture or {}
        interventions = interventions or {}
        names = list(dict.fromkeys([*capture, *interventions]))
        states: dict[str, _GroupState] = {}
        for name in names:
            group = self._group(name)
            state = _GroupState(group, capture.get(name), interventions.get(name))
            if state.intervention is not None:
                # Fail before the model runs, not at its first hooked layer.
                check_mask_indices(state.intervention, group.layout.n_neurons, name)
                weight = group.mlps[0].gate_proj.weight
                if weight.is_floating_point():
                    # Before the forward, not at its first layer: allocated mid-prefill the
                    # operands would sit between the prefill's large temporaries.
                    state.compile(weight.device, weight.dtype)
            states[name] = state
        session = Session(states)
        applied: list[_Installation] = []
        try:
            for install in session._installs:
                install.apply()
                applied.append(install)
            yield session
        finally:
            session._open = False
            if not session._paused:  # a pause left open has taken them off already
                for install in reversed(applied):
                    install.remove()
        session._collect()


class _Installation:
    """One group's hooks, made once per session and put on or taken off the model.

    Each MLP gets the hooked function as an *instance attribute* named ``act_fn``, which
    attribute lookup finds before the registered ``act_fn`` submodule: the module tree
    (``named_modules``, ``state_dict``) is never edited, and deleting the attribute restores
    the model. An enclosing session's hook is kept and called, so sessions nest.
    """

    def __init__(self, state: _GroupState):
        self.state = state
        mlps = state.group.mlps
        self.enclosing = [vars(mlp).get("act_fn") for mlp in mlps]
        self.functions = [
            state.activation(layer, outer if outer is not None else plain_function(mlp._modules["act_fn"]))
            for layer, (mlp, outer) in enumerate(zip(mlps, self.enclosing))
        ]
        # The root's inputs matter only to counting (positions, end tokens).
        counts = state.counter is not None and state.group.root is not None
        self.root_hook = _root_pre_hook(state) if counts else None
        self.handle = None

    def apply(self) -> None:
        for mlp, function in zip(self.state.group.mlps, self.functions):
            vars(mlp)["act_fn"] = function
        if self.root_hook is not None:
            self.handle = self.state.group.root.register_forward_pre_hook(self.root_hook, with_kwargs=True)

    def remove(self, check_nesting: bool = False) -> None:
        mlps = self.state.group.mlps
        if check_nesting and any(vars(mlp).get("act_fn") is not f for mlp, f in zip(mlps, self.functions)):
            # A session opened inside this one is on: taking these off would cut its hooks
            # out too, and its exit would put these back.
            raise RuntimeError("a session opened inside this one is still open: pause that one")
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        for mlp, outer in zip(mlps, self.enclosing):
            if outer is None:
                vars(mlp).pop("act_fn", None)
            else:
                vars(mlp)["act_fn"] = outer


# --------------------------------------------------------------------------- captured steps


def installed_hook(mlp: nn.Module):
    """``(state, layer, function)`` of the session hook on ``mlp``, or None (plain)."""
    function = vars(mlp).get("act_fn")
    return None if function is None else getattr(function, "esn_hook", False)


class GraphSlots:
    """The tensors a captured decode step (a CUDA graph) reads and writes, at fixed addresses.

    A graph replays the kernels it recorded on the addresses it recorded, so what changes
    between steps and sessions lives here, not in a session: per hooked MLP an int32
    ``[B, 1, D]`` count and the intervention's ``[B, 1, D]`` operand, per group root the
    step's ``[B, 1, 1]`` counting limits (0 for a real row, +inf for a finished one). A
    session binds itself before each replay (``_GroupState.begin_graph_step``) and adds the
    counts to its own when it ends.
    """

    def __init__(self, batch: int):
        self.batch = batch
        self.counts: dict[nn.Module, torch.Tensor] = {}
        self.operands: dict[nn.Module, torch.Tensor] = {}
        self.limits: dict[nn.Module, torch.Tensor] = {}
        self.limit_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # (0, +inf)
        self.infinite_limits: set[nn.Module] = set()  # roots whose limits may hold +inf

    def allocate(self, state: _GroupState, layer: int, signature) -> None:
        counting, method, touched = signature
        mlp = state.group.mlps[layer]
        weight = mlp.gate_proj.weight
        shape = (self.batch, 1, mlp.gate_proj.out_features)
        if counting:
            self.counts[mlp] = torch.zeros(shape, dtype=torch.int32, device=weight.device)
            root = state.group.root
            if root not in self.limits:
                self.limits[root] = torch.zeros(self.batch, 1, 1, dtype=weight.dtype, device=weight.device)
                # ``where``'s values, on the device: no host-to-device copy per step.
                self.limit_values[root] = (torch.zeros((), dtype=weight.dtype, device=weight.device),
                                           torch.full((), torch.inf, dtype=weight.dtype, device=weight.device))
        if touched:
            self.operands[mlp] = torch.empty(shape, dtype=weight.dtype, device=weight.device)

    def reset_counts(self) -> None:
        for counts in self.counts.values():
            counts.zero_()

    def set_limits(self, root: nn.Module, finished: torch.Tensor | None) -> None:
        """``root``'s rows' limits for the next replay, 0 or +inf where ``finished`` (``[B, 1]``
        bool, None: no row has), in one kernel; none while they are known to be all 0."""
        limits = self.limits[root]
        if finished is None:
            if root in self.infinite_limits:
                limits.zero_()
                self.infinite_limits.discard(root)
            return
        zero, inf = self.limit_values[root]
        torch.where(finished.view(limits.shape), inf, zero, out=limits)
        self.infinite_limits.add(root)


def _padding_mask(attention_mask, seq: int, decoding: bool) -> torch.Tensor | None:
    """``[B, positions]``, nonzero where a position is real, from the root's ``attention_mask``.

    ``generate`` hands most models the 2-D padding mask. With a static cache (the path
    transformers compiles) it hands a dict of prepared 4-D masks per attention type, or a
    4-D mask (``[B, heads or 1, queries, keys]``, boolean or additive). There a prefill
    query ``i`` sits at key ``i`` (nothing is cached yet), and it is real exactly when it
    may attend to itself: the diagonal is the padding mask. ``None``: every position is
    real (a prepared mask may be left out when there is no padding).
    """
    if isinstance(attention_mask, dict):
        masks = [m for m in attention_mask.values() if m is not None]
        attention_mask = masks[0] if masks else None
    if attention_mask is None or attention_mask.dim() == 2:
        return attention_mask
    if attention_mask.dim() != 4:
        raise ValueError(f"the group's root got a {attention_mask.dim()}-D attention_mask; "
                         "expected 2-D (padding) or 4-D (prepared)")
    if decoding:
        raise ValueError("a 4-D attention_mask on a call after the prefill with more than one "
                         "position: which of its keys are the new positions is unknown")
    steps = torch.arange(seq, device=attention_mask.device)
    own = attention_mask[:, 0, steps, steps]
    return own if own.dtype == torch.bool else own == 0  # additive masks: 0 = may attend


def _root_pre_hook(state: _GroupState):
    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.dtype.is_floating_point:
            input_ids = None
        if state.eos is None and state.group.eos_token_ids:
            device = (input_ids if input_ids is not None else kwargs.get("inputs_embeds")).device
            state.eos_ids = tuple(int(e) for e in state.group.eos_token_ids)
            state.eos = torch.as_tensor(list(state.eos_ids), device=device)
        if state.counter is not None:
            state.observe_inputs(input_ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask"))
        return None

    return hook


# --------------------------------------------------------------------------- folding


@contextlib.contextmanager
def folded_down_proj(
    group: MLPGroup, mask: np.ndarray, method: str, alpha: float = 0.0
) -> Iterator[None]:
    """Apply ``steer``/``deactivate`` on ``mask`` by scaling ``down_proj`` columns.

    ``h = W_o (g ⊙ v)`` is linear in each ``g_n``, so scaling column ``n`` of ``W_o`` by
    ``1 + α`` (or 0) equals the hook at zero per-token cost. The original columns are kept
    and copied back on exit, so the weights are restored bit for bit.
    """
    if method not in ("steer", "deactivate"):
        raise ValueError(f"only steer and deactivate can be folded into weights, not {method!r}")
    scale = _masked_value(method, alpha)
    per_layer = group.layout.split_indices(np.asarray(mask, dtype=np.int64))
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for mlp, idx in zip(group.mlps, per_layer):
                if idx.size == 0:
                    continue
                weight = mlp.down_proj.weight  # [hidden, D]
                cols = torch.as_tensor(idx, device=weight.device)
                saved.append((weight, cols, weight[:, cols].clone()))
                weight[:, cols] = weight[:, cols] * scale
        yield
    finally:
        with torch.no_grad():
            for weight, cols, original in saved:
                weight[:, cols] = original
