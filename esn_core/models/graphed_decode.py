"""Decode steps of a decoder stack replayed as CUDA graphs, with the hook engine inside.

A decode step (one position per row) of a 7B decoder launches ~15 kernels per layer, and at
batch 1 launching them costs more than running them (``../shared/notes/omni-speed.md``:
23.5 ms a thinker step against a ~3.5 ms memory floor). A CUDA graph records the step's
kernels once and replays them in one launch. ``GraphedDecode`` wraps one module's
``forward`` (an adapter's text decoder or talker stack, what its root calls each step):

* Prefill calls, calls on a cache that grows (``DynamicCache``), and steps a session hook
  cannot run inside a graph (``_GroupState.graph_signature``) run eagerly, as before.
* A decode step on a compileable (static) cache replays the graph recorded for its key:
  batch, the shapes and dtypes of its tensors, the cache object, and what the session's
  hooks do per layer (count, method, touched). A new key is recorded once (a warm-up
  run on a side stream, then the capture), so the cost is paid once per job and cache.
* Inputs are copied into the graph's own tensors before each replay and outputs are cloned
  out of it (``generate`` keeps the hidden states of every step).
* The session's hooks become tensor ops on ``GraphSlots`` while a graph is recorded:
  counts added to fixed ``[B, 1, D]`` tensors, row validity and operands copied in before
  each replay, the counts handed to the session when it ends. Counts and outputs therefore
  equal the eager path's (tests; on the GPU ``benchmarks/qwen_omni_throughput.py`` checks).

``mode="eager"`` runs the same static path without recording a graph (the model's own
forward each step, the hooks on ``GraphSlots``): it is how CPU tests check everything but
the CUDA graph itself, and the fallback where CUDA graphs are not available.

Why the KV cache survives the warm-up: it writes the step's keys and values at the step's
position (and advances the cache's device-side write position, which is put back
afterwards); the replay then writes the same values there from the same inputs before
any layer reads them. So the cache ends as one eager step leaves it. One warm-up run, not
more: each would write one position further, past the end of a cache made just long
enough.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from esn_core.hooks import GraphSlots, find_gated_mlps, installed_hook

# Graphs kept per wrapped module; the oldest goes first (each pins its cache and pool).
MAX_GRAPHS = 8
_CACHE_KEYS = ("past_key_values", "cache")


class _Unsupported(Exception):
    """This call cannot be replayed as a graph: run it eagerly."""


def _leaves(value, path=()):
    """(path, tensor) for every tensor in nested dicts/tuples/lists of a call's value."""
    if torch.is_tensor(value):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))


def _structure(value):
    """A hashable description of ``value`` with tensors by shape, dtype and device."""
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_structure(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _Unsupported(f"argument of type {type(value).__name__}")


def _replace_leaves(value, tensors: dict):
    """``value`` with its tensors replaced by ``tensors[path]`` (the graph's own)."""

    def walk(v, path):
        if torch.is_tensor(v):
            return tensors[path]
        if isinstance(v, dict):
            return type(v)((k, walk(x, path + (k,))) for k, x in v.items())
        if isinstance(v, (tuple, list)):
            return type(v)(walk(x, path + (i,)) for i, x in enumerate(v))
        return v

    return walk(value, ())


def _without_cache(call: dict) -> dict:
    return {k: v for k, v in call.items() if k not in _CACHE_KEYS}


def _clone_out(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict
        return type(value)(**{k: _clone_out(v) for k, v in value.items()})
    if isinstance(value, tuple):
        return tuple(_clone_out(v) for v in value)
    return value


@dataclass
class _Step:
    """One recorded decode step: its inputs, outputs, hook slots and (on CUDA) graph."""

    call: dict  # the call with the step's own input tensors
    inputs: dict  # path -> the step's own input tensor
    slots: GraphSlots
    bindings: list  # the hook plan it was recorded for: [(index in self.mlps, signature)]
    graph: Any = None
    output: Any = None
    seconds: float = 0.0  # time to record


@dataclass
class GraphStats:
    captures: int = 0
    capture_seconds: float = 0.0
    replays: int = 0
    eager_calls: int = 0
    reasons: dict = field(default_factory=dict)  # why calls ran eagerly, with counts


class GraphedDecode:
    """``module``'s decode steps replayed as CUDA graphs while the ``with`` block is open.

    ``mode``: ``"cuda"`` records and replays graphs; ``"eager"`` runs the same static path
    without a graph (CPU tests, fallback). ``warmup``: eager runs before recording.
    """

    def __init__(self, module: nn.Module, mode: str = "cuda", warmup: int = 1):
        if mode not in ("cuda", "eager"):
            raise ValueError(f"mode must be 'cuda' or 'eager', got {mode!r}")
        if mode == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; use mode='eager' on CPU")
        self.module = module
        self.mode = mode
        self.warmup = int(warmup)
        self.mlps = find_gated_mlps(module)
        self.forward: Callable = type(module).forward.__get__(module)
        self.signature = inspect.signature(type(module).forward)
        self.steps: OrderedDict = OrderedDict()
        self.pool = None
        self.stats = GraphStats()

    # -- installation -------------------------------------------------------------------
    def __enter__(self) -> GraphedDecode:
        if "forward" in vars(self.module):
            raise RuntimeError(f"{type(self.module).__name__}.forward is already wrapped")
        vars(self.module)["forward"] = self._call
        return self

    def __exit__(self, *exc) -> None:
        vars(self.module).pop("forward", None)

    def release(self) -> None:
        """Drop the recorded graphs (and the caches and memory they pin)."""
        self.steps.clear()
        self.pool = None

    # -- one call ------------------------------------------------------------------------
    def _bind_arguments(self, args, kwargs) -> dict:
        parameters = self.signature.parameters
        call = dict(self.signature.bind(self.module, *args, **kwargs).arguments)
        call.pop(next(iter(parameters)))  # self
        for name, parameter in parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in call:
                call.update(call.pop(name))
        return call

    def _eager(self, reason: str, args, kwargs):
        self.stats.eager_calls += 1
        self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
        return self.forward(*args, **kwargs)

    def _call(self, *args, **kwargs):
        call = self._bind_arguments(args, kwargs)
        ref = call.get("inputs_embeds")
        if ref is None:
            ref = call.get("input_ids")
        if ref is None or ref.dim() < 2 or ref.shape[1] != 1:
            return self._eager("not a decode step", args, kwargs)
        cache = next((call[k] for k in _CACHE_KEYS if call.get(k) is not None), None)
        if cache is None or not getattr(cache, "is_compileable", False):
            return self._eager("cache not static", args, kwargs)
        if torch.is_grad_enabled():
            return self._eager("autograd on", args, kwargs)
        plan = self._hook_plan()
        if plan is None:
            return self._eager("hooks a graph cannot run", args, kwargs)
        try:
            key = (
                tuple(sig for _, sig in plan),
                tuple(layer for layer, _ in plan),
                id(cache),
                tuple((k, _structure(v)) for k, v in _without_cache(call).items()),
            )
        except _Unsupported as why:
            return self._eager(str(why), args, kwargs)
        step = self.steps.get(key)
        batch = ref.shape[0]
        if step is None:
            step = self._record(key, call, plan, batch)
        else:
            self.steps.move_to_end(key)
        for state, layers in self._by_state(plan):
            state.begin_graph_step(step.slots, layers)
        for path, tensor in _leaves(_without_cache(call)):
            step.inputs[path].copy_(tensor)
        self.stats.replays += 1
        if step.graph is not None:
            step.graph.replay()
            return _clone_out(step.output)
        with self._static_hooks(step):
            return _clone_out(self.forward(**step.call))

    # -- hooks ---------------------------------------------------------------------------
    def _hook_plan(self):
        """[(layer, signature)] for the hooked MLPs of this module; None: not graphable."""
        plan = []
        for index, mlp in enumerate(self.mlps):
            hook = installed_hook(mlp)
            if hook is None:
                continue
            if hook is False or installed_hook_is_nested(hook):
                return None  # an act_fn the engine did not install, or nested sessions
            state, layer, _ = hook
            signature = state.graph_signature(layer)
            if signature is None:
                return None
            plan.append((index, signature))
        return plan

    def _by_state(self, plan) -> list[tuple]:
        """[(session state, its layers)] of a hook plan."""
        by_state: dict[int, tuple] = {}
        for index, _ in plan:
            state, layer, _ = installed_hook(self.mlps[index])
            by_state.setdefault(id(state), (state, []))[1].append(layer)
        return list(by_state.values())

    def _static_hooks(self, step: _Step):
        """The session's hooks swapped for their ``GraphSlots`` form for one forward."""
        mlps = self.mlps

        class Swap:
            def __enter__(inner):
                inner.saved = {}
                for index, _ in step.bindings:
                    mlp = mlps[index]
                    state, layer, function = installed_hook(mlp)
                    inner.saved[mlp] = vars(mlp)["act_fn"]
                    vars(mlp)["act_fn"] = state.static_activation(layer, function, step.slots)

            def __exit__(inner, *exc):
                for mlp, function in inner.saved.items():
                    vars(mlp)["act_fn"] = function

        return Swap()

    # -- recording -----------------------------------------------------------------------
    def _record(self, key, call: dict, plan, batch: int) -> _Step:
        started = time.perf_counter()
        slots = GraphSlots(batch)
        for index, signature in plan:
            state, layer, _ = installed_hook(self.mlps[index])
            slots.allocate(state, layer, signature)
        plain = _without_cache(call)
        inputs = {path: tensor.clone() for path, tensor in _leaves(plain)}
        static_call = {**_replace_leaves(plain, inputs), **{k: v for k, v in call.items() if k in _CACHE_KEYS}}
        step = _Step(call=static_call, inputs=inputs, slots=slots, bindings=list(plan))
        if self.mode == "cuda":
            # Operands in before the warm-up, so that it runs what the replays will run.
            for state, layers in self._by_state(plan):
                state.bind_graph_slots(slots, layers)
            self._capture(step)
            slots.reset_counts()  # the warm-up counted; the replays count from zero
        # A graph recorded on another cache is stale (generate made a new one) and pins
        # that cache's memory: keep only this cache's graphs.
        for old in [k for k in self.steps if k[2] != key[2]]:
            del self.steps[old]
        while len(self.steps) >= MAX_GRAPHS:
            self.steps.popitem(last=False)
        self.steps[key] = step
        step.seconds = time.perf_counter() - started
        self.stats.captures += 1
        self.stats.capture_seconds += step.seconds
        return step

    def _capture(self, step: _Step) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        cache = next(step.call[k] for k in _CACHE_KEYS if step.call.get(k) is not None)
        counters = [(t, t.clone()) for t in _cache_counters(cache)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with self._static_hooks(step), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.forward(**step.call)
        torch.cuda.current_stream().wait_stream(side)
        # The warm-up advanced the cache's position counters; the step has not happened yet.
        for tensor, before in counters:
            tensor.copy_(before)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a speech worker may be running the previous batch's speech decoder on
        # its own stream meanwhile (speech_overlap); only this thread must not sync or allocate.
        with self._static_hooks(step), torch.cuda.graph(graph, pool=self.pool,
                                                        capture_error_mode="thread_local"):
            step.output = self.forward(**step.call)
        step.graph = graph


def _cache_counters(cache) -> list[torch.Tensor]:
    """The small tensors a static cache advances at every update (transformers 5's layers
    keep their write position on the device, ``cumulative_length``): not the keys and values."""
    counters = []
    for layer in getattr(cache, "layers", ()):
        for value in vars(layer).values():
            if torch.is_tensor(value) and value.numel() <= 1:
                counters.append(value)
    return counters


def installed_hook_is_nested(hook) -> bool:
    """Does the hook wrap an enclosing session's hook (nested sessions stay eager)?"""
    _, _, function = hook
    return getattr(function, "esn_hook", None) is not None
