"""Where code would make the host wait for a CUDA device, found on CPU.

On a GPU, reading a device tensor's value on the host (``.item()``, ``bool(t)``,
``.tolist()``, ``int(t)``, ``nonzero``, boolean-mask indexing, ...) blocks the host until
the device has caught up. In a decode loop one such wait per step serialises host and
device work; a batch-1 step is then host time plus device time. ``SyncAudit`` counts these
calls per call site (file and line of the first frame outside torch) through a torch
function mode, so CPU tests can tell which code would wait, and how often.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

# Calls that read a tensor's values on the host (on CUDA: a synchronisation).
WAITS = frozenset({"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero",
                   "masked_select", "unique", "equal", "allclose", "numpy"})
ROOT = Path(__file__).resolve().parents[1]


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


class SyncAudit(TorchFunctionMode):
    """``with SyncAudit(under="esn_core") as audit: ...``; then ``audit.sites``: a Counter of
    ``"path:line"`` for calls from files under ``under`` (one folder or a tuple: names in
    the repository, or absolute paths such as a library's package folder, whose sites are
    named from the package down, e.g. ``transformers/generation/utils.py:3083``)."""

    def __init__(self, under: str | Path | tuple = "esn_core"):
        super().__init__()
        roots = under if isinstance(under, tuple) else (under,)
        # A folder of the repository by name, or any folder by path (a library's own code).
        self.roots = [Path(r) if Path(r).is_absolute() else ROOT / r for r in roots]
        self.sites: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in WAITS or (name in ("__getitem__", "__setitem__") and _bool_index(args)):
            frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                          if "/torch/" not in f.filename and f.filename != __file__), None)
            path = Path(frame.filename) if frame is not None else None
            root = next((r for r in self.roots if path is not None and path.is_relative_to(r)), None)
            if root is not None:
                base = ROOT if path.is_relative_to(ROOT) else root.parent
                self.sites[f"{path.relative_to(base)}:{frame.lineno}"] += 1
        return func(*args, **(kwargs or {}))


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
