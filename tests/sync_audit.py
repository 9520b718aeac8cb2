"""Where code would make the host wait for a CUDA device, found on CPU.

On a GPU, reading a device tensor's value on the host (``.item()``, ``bool(t)``,
``.tolist()``, ``int(t)``, ``nonzero``, boolean-mask indexing, ...) blocks the host until
the device has caught up. In a decode loop one such wait per step serialises host and
device work; a batch-1 step is then host time plus device time. ``SyncAudit`` counts these
calls per call site (file and line of the first frame outside torch) through a torch
function mode, so CPU tests can tell which code would wait, and how often.

It also counts, apart (``uploads``), host data sent to the device: a tensor made from Python
data with a device named (``torch.tensor(rows, device=d)``, ``t.new_tensor(rows)``), or made
on the host and then moved (``.to(d)``, ``.cuda()``, a ``copy_`` or an assignment from it).
From pageable memory such a copy makes the host wait too, and on CPU it looks like any other
op; what a test can see is that it happens, and how often.
"""

from __future__ import annotations

import collections
import traceback
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

# Calls that read a tensor's values on the host (on CUDA: a synchronisation).
WAITS = frozenset({"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero",
                   "masked_select", "unique", "equal", "allclose", "numpy", "cpu"})
# Factories: with no device named they make the tensor on the host, in a GPU run too.
FACTORIES = frozenset({"tensor", "as_tensor", "from_numpy", "arange", "linspace", "logspace",
                       "zeros", "ones", "full", "empty", "rand", "randn", "randint", "eye"})
FROM_DATA = frozenset({"tensor", "as_tensor"})  # their values come from the host
ROOT = Path(__file__).resolve().parents[1]


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _names_a_device(name: str, args, kwargs) -> bool:
    """Does this ``to`` / ``cuda`` call move its tensor to a device (not only cast it)?"""
    if name == "cuda" or kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (str, torch.device)) or torch.is_tensor(a) for a in args[1:])


class SyncAudit(TorchFunctionMode):
    """``with SyncAudit(under="esn_core") as audit: ...``; then ``audit.sites``: a Counter of
    ``"path:line"`` for calls from files under ``under`` (one folder or a tuple: names in
    the repository, or absolute paths such as a library's package folder, whose sites are
    named from the package down, e.g. ``transformers/generation/utils.py:3083``) that
    would wait; ``audit.uploads``: the same for host data sent to the device.

    Which tensors live on the host in a GPU run is followed from where they are made: a
    factory that names no device makes one, an op whose tensor inputs all live on the host
    makes one, ``.cpu()`` makes one; a move to a device makes a device tensor. Tensors from
    outside the audit count as device tensors. Reading a host tensor is no wait."""

    def __init__(self, under: str | Path | tuple = "esn_core"):
        super().__init__()
        roots = under if isinstance(under, tuple) else (under,)
        # A folder of the repository by name, or any folder by path (a library's own code).
        self.roots = [Path(r) if Path(r).is_absolute() else ROOT / r for r in roots]
        self.sites: collections.Counter = collections.Counter()
        self.uploads: collections.Counter = collections.Counter()
        self._host: dict[int, weakref.ref] = {}  # tensors that live on the host in a GPU run

    def _note(self, counter: collections.Counter) -> None:
        frame = next((f for f in reversed(traceback.extract_stack()[:-2])
                      if "/torch/" not in f.filename and f.filename != __file__), None)
        path = Path(frame.filename) if frame is not None else None
        root = next((r for r in self.roots if path is not None and path.is_relative_to(r)), None)
        if root is not None:
            base = ROOT if path.is_relative_to(ROOT) else root.parent
            counter[f"{path.relative_to(base)}:{frame.lineno}"] += 1

    def _on_host(self, value) -> bool:
        ref = self._host.get(id(value)) if torch.is_tensor(value) else None
        return ref is not None and ref() is value

    def _keep_on_host(self, out) -> None:
        for tensor in _tensors(out):
            self._host[id(tensor)] = weakref.ref(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = [*_tensors(args), *_tensors(kwargs)]
        all_on_host = bool(inputs) and all(self._on_host(t) for t in inputs)
        reads = name in WAITS or (name in ("__getitem__", "__setitem__") and _bool_index(args))
        if reads and not all_on_host:
            self._note(self.sites)
        out = func(*args, **kwargs)
        if name in FACTORIES and not (args and torch.is_tensor(args[0])):
            if kwargs.get("device") is None:
                self._keep_on_host(out)
            elif name in FROM_DATA:
                self._note(self.uploads)  # Python data copied to the named device
        elif name == "new_tensor" and len(args) > 1 and not torch.is_tensor(args[1]):
            self._note(self.uploads)  # made on the device of the tensor it is called on
        elif name in ("to", "cuda") and args and _names_a_device(name, args, kwargs):
            if self._on_host(args[0]):
                self._note(self.uploads)
        elif name == "copy_" and len(args) > 1:
            if self._on_host(args[1]) and not self._on_host(args[0]):
                self._note(self.uploads)
        elif name == "__setitem__" and len(args) > 2:
            if self._on_host(args[2]) and not self._on_host(args[0]):
                self._note(self.uploads)
        elif name == "cpu" or all_on_host:
            self._keep_on_host(out)
        return out


def line_of(path: str, text: str) -> str:
    """``"path:line"`` of the one line of ``path`` (relative to the repository) holding ``text``."""
    lines = [n for n, line in enumerate((ROOT / path).read_text().splitlines(), 1) if text in line]
    if len(lines) != 1:
        raise ValueError(f"{text!r} is on {len(lines)} lines of {path}")
    return f"{path}:{lines[0]}"



def late_and_every_step(run, module, loop, monkeypatch) -> list[tuple]:
    """``run()`` twice, with the step-loop module ``loop`` reading its stop flag late (its
    ``LateFlag``, as it runs) and every step (``late_stop.EveryStepFlag``): each time
    ``(run's result, the forwards module made)``, late first."""
    from esn_core.models import late_stop

    forwards = []
    handle = module.register_forward_pre_hook(lambda *_: forwards.append(1))
    results = []
    try:
        for flag in (loop.LateFlag, late_stop.EveryStepFlag):
            monkeypatch.setattr(loop, "LateFlag", flag)
            forwards.clear()
            results.append((run(), len(forwards)))
    finally:
        handle.remove()
    return results
