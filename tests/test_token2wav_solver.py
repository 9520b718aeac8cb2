"""``token2wav_solver``: transformers' RK4 integration of token2wav's ODE, step for step the
same numbers, without reading the device on the host at every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sync_audit import SyncAudit

from esn_core.models.token2wav_solver import rk4_without_host_reads, stepwise_solver_class

modeling = pytest.importorskip("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni")
LIBRARY = str(Path(modeling.__file__).parents[2])


def _velocity(t, x):
    """A field that depends on both time and state, as the DiT's does."""
    return torch.sin(3 * t) * x - torch.tanh(x) * t + 0.25


def _schedule(steps: int, sway: float = -1.0) -> torch.Tensor:
    """token2wav's time points: a linspace bent by the sway coefficient (transformers' sample)."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    return t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)


def _both(points, start):
    own = modeling.RungeKutta4ODESolver(function=_velocity, initial_value=start).integrate(points)
    ours = stepwise_solver_class()(function=_velocity, initial_value=start).integrate(points)
    return own, ours


@pytest.mark.parametrize("steps, sway", [(10, -1.0), (4, -1.0), (32, 0.0), (7, 0.5)])
def test_every_point_of_the_trajectory_is_transformers_own_bit_for_bit(steps, sway):
    start = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    own, ours = _both(_schedule(steps, sway), start)
    assert ours.shape == own.shape == (steps, 2, 5, 3)
    assert torch.equal(ours, own)


def test_points_that_do_not_increase_go_to_transformers_own_integration():
    start = torch.ones(2, 3, dtype=torch.float64)
    for points in (torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=torch.float64),
                   torch.tensor([0.0, 0.6, 0.4, 1.0], dtype=torch.float64)):
        own, ours = _both(points, start)
        assert torch.equal(ours, own)


def test_transformers_reads_the_device_four_times_a_step_and_ours_once_a_call():
    start = torch.ones(2, 3, dtype=torch.float64)
    waits = []
    for steps in (4, 10):
        for solver in (modeling.RungeKutta4ODESolver, stepwise_solver_class()):
            points = _schedule(steps).to(start.device)  # outside the audit: a device tensor
            with SyncAudit(under=LIBRARY) as audit:
                solver(function=_velocity, initial_value=start).integrate(points)
            with SyncAudit(under="esn_core") as ours:
                solver(function=_velocity, initial_value=start).integrate(points)
            waits.append(sum(audit.sites.values()) + sum(ours.sites.values()))
    own_4, ours_4, own_10, ours_10 = waits
    # a step's end against the next point (twice: the loop's test), then interpolation's two
    assert own_10 - own_4 == 4 * (10 - 4)
    assert ours_4 == ours_10 == 1  # the check that the points increase


def test_the_context_puts_transformers_own_solver_back_after_nesting_and_errors():
    own = modeling.RungeKutta4ODESolver
    with rk4_without_host_reads():
        with rk4_without_host_reads():
            assert modeling.RungeKutta4ODESolver is stepwise_solver_class()
        assert modeling.RungeKutta4ODESolver is stepwise_solver_class()
    assert modeling.RungeKutta4ODESolver is own
    with pytest.raises(RuntimeError, match="inside"):
        with rk4_without_host_reads():
            raise RuntimeError("inside")
    assert modeling.RungeKutta4ODESolver is own
