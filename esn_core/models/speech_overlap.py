"""One batch's speech decoder running while the next batch decodes its text and speech codes.

A conversion has two halves. The first, the language model and the speech-code decoder, is
what the hook engine sees (every hooked MLP runs there); its decode steps are small kernels
whose launching costs more than running them, so the GPU idles most of the time. The
second, the speech decoder (Qwen2.5-Omni's token2wav, Kimi-Audio's detokenizer, MiniCPM-o's
vocoder), holds no hooked MLP and fills the GPU with large kernels. Running batch n's second
half beside batch n+1's first puts that idle time to use; the outputs are the same, since
each half keeps its own random generators and inputs. Measured on an H100 (Qwen2.5-Omni,
batch 64, graphs): 5-8 % more utterances an hour; beside token2wav the decode's steps take
2.6x as long, so most of the decode is not hidden (BENCHMARKS.md, "2026-12-07").

* ``SpeechWorker`` (the pipeline's side): runs each batch's second half on one worker thread,
  in order, while the caller goes on with the next batch; each result is handed back to the
  caller's ``done`` in its own thread, in order. Disabled, it runs each at once in the
  caller's thread: the same results, no thread.
* ``StreamHandoff`` (an adapter's side): made in the caller's thread when the first half has
  queued its work; inside it, on the worker, the second half runs on a CUDA stream of its
  own that starts after that work, and at its exit waits for its own kernels (so that its
  inputs may be freed and its outputs read).
* ``paced``: the speech decoder queues thousands of kernels a call, far faster than the GPU
  runs them; once CUDA's queue of pending launches is full, launches block, perhaps the
  decoding thread's too. Pacing waits, with the GIL released, until the GPU has run all
  but the last ``lag`` forwards of the decoder's repeated blocks, so the worker never runs
  far ahead of the GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn


class SpeechWorker:
    """Runs second halves (``submit``) on a worker thread, one at a time, in order.

    At most one second half runs while the next one waits queued, and ``submit`` returns
    only when every older one has been handed to its ``done``: the caller decodes batch
    n+1 while batch n speaks, never further ahead (memory stays that of two batches). Use
    it as a context manager: leaving it hands over what is left (``drain``), or after an
    error waits for the worker without handing anything over.
    """

    def __init__(self, enabled: bool, device: torch.device | str | None = None):
        self.enabled = bool(enabled)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="speech") if self.enabled else None
        self._pending: deque[tuple[Future, Callable[[Any], None]]] = deque()
        cuda = device is not None and torch.device(device).type == "cuda"
        self._device = torch.device(device) if self.enabled and cuda else None
        self._scope = contextlib.ExitStack()

    def submit(self, finish: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """``done(finish())``: ``finish`` on the worker, ``done`` in this thread, both in order."""
        if self._executor is None:
            done(finish())
            return
        self._pending.append((self._executor.submit(finish), done))
        while len(self._pending) > 1:
            self._hand_over()

    def drain(self) -> None:
        """Wait for every submitted second half and hand each to its ``done``."""
        while self._pending:
            self._hand_over()

    def _hand_over(self) -> None:
        future, done = self._pending.popleft()
        done(future.result())  # re-raises the worker's error here, in the caller's thread

    def __enter__(self) -> SpeechWorker:
        if self._device is not None:
            self._scope.enter_context(_decode_first(self._device))
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self.drain()
        finally:
            if self._executor is not None:
                for future, _ in self._pending:
                    future.cancel()
                self._pending.clear()
                self._executor.shutdown(wait=True)  # no thread outlives the run
            self._scope.close()


@contextlib.contextmanager
def _decode_first(device: torch.device) -> Iterator[None]:
    """The caller's CUDA work in the block on a stream of high priority, the worker's on
    streams of the default (lowest) one: the GPU's block scheduler then starts
    the decode's small kernels before the speech decoder's pending blocks, instead of after
    its whole grid. Ordered after the caller's earlier work, and its later work after it.
    (No measurable effect on an H100: the decode's steps beside token2wav took 2.6x as long
    with the high-priority stream and without it; BENCHMARKS.md, "2026-12-07".)"""
    caller = torch.cuda.current_stream(device)
    high = torch.cuda.Stream(device, priority=-1)  # lower is higher; 0 is the default
    high.wait_stream(caller)
    try:
        with torch.cuda.stream(high):
            yield
    finally:
        caller.wait_stream(high)


_STREAMS: dict[tuple[torch.device, int], torch.cuda.Stream] = {}


def _worker_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device and thread for second halves (reused: streams are not freed)."""
    key = (device, threading.get_ident())
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


class StreamHandoff:
    """Made where the first half ends; ``with`` it, the second half runs after that work.

    On CUDA it records an event on the current stream at construction, and the ``with``
    block runs on a stream of its own that waits for that event, with the forwards of the
    speech decoder ``pace``'s repeated blocks paced (``repeated_blocks``, ``paced``);
    leaving the block waits for the block's kernels. Elsewhere (CPU), or not ``enabled``
    (the second half runs in the caller's thread, in order), it does nothing.
    """

    def __init__(self, device: torch.device | str, pace: object = None, enabled: bool = True):
        self.device = torch.device(device)
        self.pace = pace
        self.ready = None
        if enabled and self.device.type == "cuda":
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(self.device))
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> StreamHandoff:
        if self.ready is not None:
            stream = _worker_stream(self.device)
            stream.wait_event(self.ready)
            self._stack.enter_context(torch.cuda.stream(stream))
            self._stack.enter_context(paced(repeated_blocks(self.pace), self.device))
        return self

    def __exit__(self, *exc) -> None:
        stream = torch.cuda.current_stream(self.device) if self.ready is not None else None
        self._stack.close()
        if stream is not None:
            stream.synchronize()


def repeated_blocks(*roots: object) -> list[nn.Module]:
    """The members of each root's outermost ``ModuleList``s (a DiT's blocks, a vocoder's
    resblocks and upsamplers): forwards of similar size, where ``paced`` waits. A root that
    is no module (a speech decoder class holding its modules) is searched through its
    module attributes; None has none."""
    found: list[nn.Module] = []

    def members(modules: nn.ModuleList) -> None:
        for module in modules:
            if isinstance(module, nn.ModuleList):
                members(module)  # a list of lists is never called itself
            else:
                found.append(module)

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                members(child)
            else:
                walk(child)

    for root in roots:
        if isinstance(root, nn.Module):
            walk(root)
        elif root is not None:
            for value in vars(root).values():
                if isinstance(value, nn.Module):
                    walk(value)
    return found


@contextlib.contextmanager
def paced(modules: Iterable[nn.Module], device: torch.device | str, lag: int = 4) -> Iterator[None]:
    """Before each forward of ``modules`` on a CUDA ``device``, wait until all but the last
    ``lag`` of their forwards so far have run on the GPU (nothing is waited for elsewhere).

    A DiT block launches ~50 kernels and a vocoder's resblock ~100 (Qwen2.5-Omni's, counted
    by the profiler), so 4 keep a few hundred queued: enough that the GPU never waits for
    the worker, well under the ~1,000 pending launches at which CUDA's queue blocks."""
    if torch.device(device).type != "cuda":
        yield
        return
    finished: deque[torch.cuda.Event] = deque()

    def before(module, args):
        while len(finished) >= lag:
            finished.popleft().synchronize()  # releases the GIL while it waits

    def after(module, args, output):
        event = torch.cuda.Event()
        event.record()
        finished.append(event)

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        yield
    finally:
        for handle in handles:
            handle.remove()
