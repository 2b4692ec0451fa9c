"""ODESolver meets per-state step budgets exactly, for every method torchdiffeq offers (issue 24, item 6).

A state with allowance L_b moves for t in [0, L_b h] and no longer; with a constant gradient g the answer
is x0 + L_b h g, and with the linear field dx/dt = -x it is x0 exp(-L_b h).
"""

from __future__ import annotations

import pytest
import torch

import vgf_prob as vgf
from vgf_prob.flows import ODE_METHODS
from vgf_prob.flows.solvers import FIXED_GRID_METHODS

METHODS = sorted(ODE_METHODS)


def linear_value(obs, actions):
    """Q(a) = sum(a): a constant gradient of ones."""
    return actions.sum(-1)


def decay_value(obs, actions):
    """Q(a) = -|a|^2 / 2: the flow dx/dt = -x."""
    return -0.5 * actions.square().sum(-1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_constant_gradient_moves_each_state_its_budget_exactly(method, dtype):
    steps = torch.tensor([0, 2, 5, 3, 2])
    x0 = torch.zeros(5, 2, 3, dtype=dtype)
    solver = vgf.ODESolver(method, step_size=0.1)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), solver, budget=vgf.StepBudget(steps))
    out = flow(x0, None, linear_value)
    expected = (steps.to(dtype) * 0.1)[:, None, None].expand_as(x0)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(out.particles, expected, atol=tolerance, rtol=0), out.particles[:, 0, 0]
    assert out.report.steps.tolist() == steps.tolist()
    assert torch.equal(out.particles[0], x0[0])  # a budget of 0 never moves


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")  # torchdiffeq's Adams-Moulton
@pytest.mark.parametrize("method", METHODS)
def test_linear_field_per_state_horizons_match_the_exponential(method):
    steps = torch.tensor([7, 1, 0, 4, 7, 3])
    x0 = torch.linspace(-1.0, 1.0, 6 * 2 * 2, dtype=torch.float64).reshape(6, 2, 2)
    solver = vgf.ODESolver(method, step_size=0.05, rtol=1e-10, atol=1e-12)
    out = vgf.ValueGradientFlow(vgf.ValueGradient(), solver, budget=vgf.StepBudget(steps))(x0, None, decay_value)
    exact = x0 * torch.exp(-0.05 * steps.to(torch.float64))[:, None, None]
    # fixed-grid methods carry their truncation error (euler's is O(h), 6e-3 here); the adaptive ones stay
    # within 2e-7 (bosh3's embedded estimate accepts long steps on this field)
    coarse = {"euler": 1e-2, "midpoint": 2e-4, "heun2": 2e-4, "heun3": 1e-5, "explicit_adams": 1e-5}
    tolerance = coarse.get(method, 1e-6)
    assert torch.allclose(out.particles, exact, atol=tolerance, rtol=0), (out.particles - exact).abs().amax()
    assert torch.equal(out.particles[2], x0[2])


def test_ode_euler_takes_exactly_the_discrete_euler_steps_per_state():
    """ODESolver('euler', h) and Euler(h) integrate the same ODE on the same grid: equal up to rounding."""
    steps = torch.tensor([3, 0, 6, 1])
    x0 = torch.rand(4, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    budget = vgf.StepBudget(steps)
    ode = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ODESolver("euler", step_size=0.2), budget=budget)
    euler = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.2), budget=budget)
    value = lambda obs, a: -(a - 0.3).square().sum(-1) + a.prod(-1)  # noqa: E731
    assert torch.allclose(ode(x0, None, value).particles, euler(x0, None, value).particles, atol=1e-13, rtol=0)


@pytest.mark.parametrize("method", sorted(FIXED_GRID_METHODS))
def test_every_fixed_grid_method_steps_by_step_size(method):
    """A fixed-grid method takes its grid from step_size (heun2, heun3 and fixed_adams included): 10 steps
    of h evaluate the field at least 10 times, where one step over the whole horizon evaluates it at most 4."""
    calls = []

    def counting_value(obs, actions):
        calls.append(1)
        return decay_value(obs, actions)

    x0 = torch.ones(1, 1, 1, dtype=torch.float64)
    vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ODESolver(method, step_size=0.05), budget=10)(
        x0, None, counting_value)
    assert len(calls) >= 10
