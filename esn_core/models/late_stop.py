"""Decode loops that learn one step late that every row has finished, so the host never
waits for the device between decode steps.

Why: "has every row finished?" is a device value. Reading it on the host each step makes
the host wait until the device has run that step, so the next step cannot be queued
meanwhile: host work (Python, kernel launches) and device work add up instead of
overlapping. At batch 1 a decode step is mostly host work, so this wait costs about the
device's whole share of the step. Read one step late, the flag is already on the host when
it is needed; the price is one extra step after the last row has finished, whose outputs
are dropped. (transformers 5.17+ ships this as ``DeferredStopCheck``, used on Apple's mps
only; ``late_stop_checks`` lets its ``generate`` use ours on any device.)

The extra step is invisible to the hook engine where rows end on end tokens its groups
know (or at the length cap, where no extra step runs): by then every row has fed its end
token or is past it, and a capture session counts no finished row (``hooks``). A row stopped
by another criterion (a stop string, a custom ``StoppingCriteria``) would be counted at that
step; the adapters end rows only on their groups' end tokens.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading

import torch


class LateFlag:
    """A device bool read on the host one push late, without waiting for the device.

    ``push(flag)`` starts copying ``flag`` (a 0-d bool tensor) to pinned host memory and
    returns the flag pushed the call before (``False`` on the first call). Waiting for that
    earlier copy waits for the step before the one just queued, which keeps the device busy.
    """

    def __init__(self, device: torch.device):
        device = torch.device(device)
        on_host = device.type == "cpu"  # then every copy is done when copy_ returns
        self._slots = []
        for _ in range(2):
            host = torch.zeros((), dtype=torch.bool, pin_memory=device.type == "cuda")
            # Read through numpy: it is host memory, so reading it is not a device read.
            self._slots.append((host, host.numpy(), None if on_host else torch.Event(device=device)))
        self._pushes = 0

    def push(self, flag: torch.Tensor) -> bool:
        host, _, copied = self._slots[self._pushes % 2]
        host.copy_(flag, non_blocking=True)
        if copied is not None:
            copied.record()
        self._pushes += 1
        if self._pushes == 1:
            return False
        _, earlier, earlier_copied = self._slots[self._pushes % 2]
        if earlier_copied is not None:
            earlier_copied.synchronize()
        return bool(earlier[()])


class EveryStepFlag:
    """``LateFlag``'s every-step twin: ``push`` returns the flag it is given, so the host
    waits for each step on a GPU. What reading late is compared with (tests, benchmarks:
    swap a step loop's ``LateFlag`` for it)."""

    def __init__(self, device: torch.device):
        pass

    def push(self, flag: torch.Tensor) -> bool:
        return bool(flag)


_patch_lock = threading.Lock()
_patch_depth = 0  # contexts open on all threads: the module name stays ours while > 0
_replaced = None  # transformers' own DeferredStopCheck while ours stands in its place
_disposable: collections.Counter = collections.Counter()  # ids of caches whose extra step stays
_this_thread = threading.local()  # .depth: contexts open on this thread


def _deferring_here() -> bool:
    return getattr(_this_thread, "depth", 0) > 0


@functools.cache
def late_stop_check_class():
    """The ``StopCheck`` subclass for transformers' ``generate`` (None before 5.17, which
    has no stop-check object to replace)."""
    try:
        from transformers.generation.utils import DeferredStopCheck, StopCheck
    except ImportError:
        return None
    stock = DeferredStopCheck  # what another thread's generate gets from us, unchanged

    class LateStopCheck(StopCheck):
        """``generate``'s stop check, read one step late (``LateFlag``).

        Stops at once where the host knows the answer (``max_length``); otherwise one step
        after every row finished, and ``finish`` reports that step so ``generate`` drops its
        token and recorded outputs. A cache that ``generate`` returns is cropped by the same
        step; a cache the caller declared disposable (reset before its next use) is not.

        Only on threads inside ``late_stop_checks``: elsewhere the module name is ours too
        while a context is open, so both ``is_supported`` and construction hand over to
        transformers' own class there.
        """

        def __new__(cls, *args, **kwargs):
            if not _deferring_here():
                return stock(*args, **kwargs)  # not an instance of cls: __init__ is skipped
            return super().__new__(cls)

        def __init__(self, input_ids, max_length, cache, cache_is_returned, streamer=None):
            super().__init__(streamer)
            self.max_length = max_length
            self.cache = cache if cache_is_returned and id(cache) not in _disposable else None
            self.flag = LateFlag(input_ids.device)
            self.extra_step = False

        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
            if not _deferring_here():
                return stock.is_supported(device, cache, cache_is_returned, is_assistant)
            if is_assistant:
                return False
            if cache is None or not cache_is_returned or id(cache) in _disposable:
                return True
            # A returned cache must drop the extra step exactly: plain dynamic layers do.
            from transformers.cache_utils import DynamicLayer

            layers = getattr(cache, "layers", None)
            return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

        def __call__(self, unfinished_sequences, tokens, length) -> bool:
            if self.streamer is not None:  # it wants each token now: read every step
                return super().__call__(unfinished_sequences, tokens, length)
            if self.flag.push(unfinished_sequences.max() == 0):
                self.extra_step = True  # this step ran after every row had finished
                return True
            return self.max_length is not None and length >= self.max_length

        def finish(self) -> int:
            if self.extra_step and self.cache is not None:
                self.cache.crop(-1)
            return int(self.extra_step)

    return LateStopCheck


@contextlib.contextmanager
def late_stop_checks(disposable_caches=()):
    """Within: transformers' ``generate`` reads its stop flag one step late, on any device.

    transformers picks its deferred check by a module-level name (``DeferredStopCheck``),
    which this replaces while any such context is open; a ``generate`` on another thread
    meanwhile still gets transformers' own behaviour (the class hands over to it on threads
    outside a context). ``disposable_caches``:
    caches the caller resets before reusing (static caches kept across batches), whose
    extra step's slot need not be undone. A no-op on transformers without stop checks.
    """
    global _patch_depth, _replaced
    check = late_stop_check_class()
    if check is None:
        yield
        return
    import transformers.generation.utils as generation

    ids = [id(cache) for cache in disposable_caches]
    with _patch_lock:
        if _patch_depth == 0:
            _replaced, generation.DeferredStopCheck = generation.DeferredStopCheck, check
        _patch_depth += 1
        _disposable.update(ids)
    _this_thread.depth = getattr(_this_thread, "depth", 0) + 1
    try:
        yield
    finally:
        _this_thread.depth -= 1
        with _patch_lock:
            _disposable.subtract(ids)
            for gone in [i for i in ids if _disposable[i] <= 0]:
                del _disposable[gone]
            _patch_depth -= 1
            if _patch_depth == 0:
                generation.DeferredStopCheck, _replaced = _replaced, None
