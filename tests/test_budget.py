"""Budgets: never exceeded, per-state stopping, and the Sinkhorn figure against an exact W2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import vgf_prob as vgf
from vgf_prob.budget import displacement


def random_quadratic_value(seed: int, action_dim: int):
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(action_dim, generator=generator, dtype=torch.float64) * 2
    scales = torch.rand(action_dim, generator=generator, dtype=torch.float64) * 5 + 0.1

    def value(obs, actions):
        return -(scales * (actions - center).square()).sum(-1)

    return value


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 4),
    particles=st.integers(1, 6),
    action_dim=st.integers(1, 4),
    radius=st.floats(0.0, 1.5),
    solver=st.sampled_from(["euler", "adam", "ode"]),
)
def test_no_state_ever_exceeds_its_displacement_budget(seed, batch, particles, action_dim, radius, solver):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, particles, action_dim, generator=generator, dtype=torch.float64) * 2 - 1
    radii = torch.rand(batch, generator=generator, dtype=torch.float64) * radius
    make_solver = {
        "euler": lambda: vgf.Euler(0.3),
        "adam": lambda: vgf.ParticleAdam(0.3),
        "ode": lambda: vgf.ODESolver("rk4", step_size=0.3),
    }[solver]
    for budget in (vgf.DisplacementBudget(radius), vgf.DisplacementBudget(radii)):
        out = vgf.ValueGradientFlow(
            vgf.SteinField(0.3), make_solver(), budget=budget & vgf.StepBudget(6), projection=vgf.BoxProjection()
        )(x0, None, random_quadratic_value(seed, action_dim))
        limit = budget.radius if isinstance(budget.radius, torch.Tensor) else torch.full((batch,), radius, dtype=torch.float64)
        assert (displacement(x0, out.particles) <= limit * (1 + 1e-9) + 1e-12).all()
        assert torch.allclose(out.report.displacement, displacement(x0, out.particles))
        assert out.particles.abs().max() <= 1


def exact_w2(x: np.ndarray, y: np.ndarray) -> float:
    cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def test_sinkhorn_figure_agrees_with_exact_w2_on_small_clouds():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 12, 2, generator=generator, dtype=torch.float64)
    y = x + torch.randn(6, 12, 2, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 1.0, 6, dtype=torch.float64)[:, None, None]
    sinkhorn = vgf.SinkhornBudget(1.0, blur=0.005, scaling=0.95).spent(x, y)
    exact = torch.tensor([exact_w2(a.numpy(), b.numpy()) for a, b in zip(x, y)], dtype=torch.float64)
    # entropic bias is O(blur^2) on W2^2; relative agreement within 2% plus a small absolute slack
    assert torch.allclose(sinkhorn, exact, rtol=0.02, atol=0.01)
    # particles keep their identity, so the displacement is an upper bound on W2
    assert (displacement(x, y) >= exact - 1e-12).all()
    assert torch.allclose(vgf.SinkhornBudget(1.0).spent(x, x), torch.zeros(6, dtype=torch.float64), atol=1e-6)


def test_sinkhorn_budget_is_enforced_per_state():
    x0 = torch.rand(3, 8, 2, dtype=torch.float64) * 0.5
    budget = vgf.SinkhornBudget(torch.tensor([0.0, 0.1, 0.3], dtype=torch.float64))
    out = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.05), budget=budget & vgf.StepBudget(50))(
        x0, None, random_quadratic_value(1, 2)
    )
    spent = out.report.budget_spent["sinkhorn"]
    assert (spent <= torch.tensor([0.0, 0.1, 0.3], dtype=torch.float64) + 1e-6).all()
    assert torch.equal(out.particles[0], x0[0])
    assert spent[2] > 0.25 and out.report.exhausted.all()


def test_sinkhorn_cut_back_is_the_largest_fitting_halving_and_ignores_the_other_states():
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(5, 8, 3, generator=generator, dtype=torch.float64)
    x_prev = x0 + 0.02 * torch.randn(5, 8, 3, generator=generator, dtype=torch.float64)
    step_sizes = torch.tensor([0.01, 0.6, 0.02, 0.9, 0.4], dtype=torch.float64)[:, None, None]
    x_new = x_prev + step_sizes * torch.randn(5, 8, 3, generator=generator, dtype=torch.float64)
    budget = vgf.SinkhornBudget(0.15, bisection_steps=10)
    kept, over = budget.enforce(x0, x_prev, x_new, torch.Size([5]))
    assert over.tolist() == (budget.spent(x0, x_new) > 0.15).tolist() and 0 < over.sum() < 5
    assert torch.equal(kept[~over], x_new[~over])  # states that fit are untouched
    for state in over.nonzero().flatten().tolist():
        alone, _ = budget.enforce(x0[state : state + 1], x_prev[state : state + 1], x_new[state : state + 1],
                                  torch.Size([1]))
        assert torch.allclose(kept[state], alone[0], atol=1e-12)
        # the kept fraction t of the step fits, t + 2^-10 does not (bisection resolution)
        step = x_new[state] - x_prev[state]
        fraction = ((kept[state] - x_prev[state]) / step).mean()
        fits = budget.spent(x0[state : state + 1], (x_prev[state] + fraction * step)[None])
        too_far = budget.spent(x0[state : state + 1], (x_prev[state] + (fraction + 2.0**-10) * step)[None])
        assert fits <= 0.15 + 1e-9 < too_far


def test_exhausted_states_stay_fixed_while_the_others_go_on():
    generator = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 5, 2, generator=generator, dtype=torch.float64)
    steps = torch.tensor([0, 2, 5])
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.01), budget=vgf.StepBudget(steps))
    value = random_quadratic_value(2, 2)
    out = flow(x0, None, value)
    assert torch.equal(out.report.steps, steps)
    assert torch.equal(out.particles[0], x0[0])
    for state, count in ((1, 2), (2, 5)):
        alone = flow.with_budget(int(count))(x0[state : state + 1], None, value).particles[0]
        assert torch.allclose(out.particles[state], alone)

    radius_flow = vgf.ValueGradientFlow(
        vgf.ValueGradient(), vgf.Euler(0.05), budget=vgf.DisplacementBudget(torch.tensor([0.0, 0.05, 10.0], dtype=torch.float64)), max_steps=20
    )
    moved = radius_flow(x0, None, value)
    assert torch.equal(moved.particles[0], x0[0])
    assert torch.isclose(moved.report.displacement[1], torch.tensor(0.05, dtype=torch.float64))
    assert moved.report.exhausted.tolist() == [True, True, False]
    assert moved.report.steps[2] == 20 and moved.report.steps[1] < 20


def test_ode_solver_freezes_states_inside_the_solve():
    x0 = torch.zeros(2, 4, 2, dtype=torch.float64)
    budget = vgf.DisplacementBudget(torch.tensor([0.1, 5.0], dtype=torch.float64)) & vgf.StepBudget(torch.tensor([100, 40]))
    out = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ODESolver("dopri5", step_size=0.05), budget=budget)(
        x0, None, random_quadratic_value(5, 2)
    )
    assert out.report.displacement[0] <= 0.1 + 1e-9
    euler = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.001), budget=vgf.StepBudget(2000))(
        x0[1:], None, random_quadratic_value(5, 2)
    )
    assert torch.allclose(out.particles[1], euler.particles[0], atol=5e-3)


def test_budget_validation_and_combination():
    with pytest.raises(ValueError, match="whole number"):
        vgf.StepBudget(1.5)
    with pytest.raises(ValueError, match="finite"):
        vgf.DisplacementBudget(float("inf"))
    with pytest.raises(TypeError, match="int step count"):
        vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(), budget="three")
    combined = vgf.StepBudget(3) & vgf.DisplacementBudget(0.5) & vgf.StepBudget(2)
    assert len(combined.parts()) == 3
    assert combined.step_limits(torch.Size([2]), torch.zeros(1)).tolist() == [2, 2]
    with pytest.raises(ValueError, match="broadcast to the batch shape"):
        vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(), budget=vgf.StepBudget(torch.tensor([1, 2, 3])))(
            torch.zeros(2, 3, 1), None, lambda o, a: a.sum(-1)
        )
