"""token2wav's ODE solver without host reads of the device: the same RK4 steps, the same
numbers.

transformers' Qwen2.5-Omni ``RungeKutta4ODESolver.integrate`` compares time points (device
tensors) on the host at every step to decide where to interpolate (``time_end >=
time_points[i]``, twice, then ``time_point == time_start`` and ``== time_end``): four waits
for the device a step, so the host cannot queue the next DiT evaluation while the device
runs one.
Where the time points increase strictly, which token2wav's schedule gives (a linspace bent
by its sway coefficient), every comparison has one known answer: a step's end is the next
point, and the value there is the step's result itself (``_linear_interpolation`` returns
``value_end``). ``StepwiseRK4`` runs the parent's own ``_compute_step`` for each step and
writes each result in place, reading nothing back; it checks once a call that the points
increase (one wait a call) and hands anything else to the parent.

``rk4_without_host_reads()`` puts it in the place of transformers' solver (a module-level
name, looked up by ``Qwen2_5OmniToken2WavDiTModel.sample`` at each call) while it is open.
Being exact for any input, the class needs no per-thread scoping.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch

_lock = threading.Lock()
_depth = 0
_replaced = None  # transformers' own solver class while ours stands in its place


@functools.cache
def stepwise_solver_class():
    """The ``RungeKutta4ODESolver`` subclass, or None where transformers has no such solver."""
    try:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver
    except ImportError:
        return None

    class StepwiseRK4(RungeKutta4ODESolver):
        def integrate(self, time_points: torch.Tensor) -> torch.Tensor:
            if time_points.dim() != 1 or not bool((time_points[1:] > time_points[:-1]).all()):
                return super().integrate(time_points)
            solution = torch.empty(len(time_points), *self.initial_value.shape,
                                   dtype=self.initial_value.dtype, device=self.initial_value.device)
            solution[0] = self.initial_value
            value = self.initial_value
            for index, (start, end) in enumerate(zip(time_points[:-1], time_points[1:]), 1):
                delta, _ = self._compute_step(self.function, start, end - start, end, value)
                value = value + delta
                solution[index] = value
            return solution

    return StepwiseRK4


@contextlib.contextmanager
def rk4_without_host_reads():
    """Within: token2wav's ``sample`` integrates with ``StepwiseRK4`` (see module doc)."""
    global _depth, _replaced
    solver = stepwise_solver_class()
    if solver is None:
        yield
        return
    import transformers.models.qwen2_5_omni.modeling_qwen2_5_omni as modeling

    with _lock:
        if _depth == 0:
            _replaced, modeling.RungeKutta4ODESolver = modeling.RungeKutta4ODESolver, solver
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                modeling.RungeKutta4ODESolver, _replaced = _replaced, None
