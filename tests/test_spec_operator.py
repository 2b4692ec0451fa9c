"""The operator against REFERENCE.md section 2, with every expected value computed here by hand (numpy).

Nothing below calls the library to build an expectation: head aggregation, the textbook Stein field, the
authors' per-flow Adam on -phi with clipping to the box, the W2 displacement bound
sqrt((1/N) sum_i ||x_i - x_i^0||^2), the step counts and the Sinkhorn limit (through an exact W2 from an
assignment solver) are all written out from the specification. Hypothesis runs derandomised, so CI sees
the same examples on every run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import vgf_prob as vgf

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------------------ a two-head value
class TwoHeadQuadratic:
    """Q_k(a) = -sum_d w_kd (a_d - c_kd)^2 for heads k = 1, 2 (the same for every state), as a torch value
    returning [B, N, 2] and, by hand, its values and gradients grad_a Q_k = -2 w_k (a - c_k) in numpy."""

    def __init__(self, seed: int, action_dim: int, spread: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        # the heads disagree: centres on opposite sides, different curvatures
        self.centers = spread * np.stack([rng.uniform(0.3, 0.9, action_dim), rng.uniform(-0.9, -0.3, action_dim)])
        self.weights = np.stack([rng.uniform(0.5, 2.0, action_dim), rng.uniform(2.0, 6.0, action_dim)])

    def __call__(self, obs, actions: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(self.centers, dtype=actions.dtype)
        w = torch.as_tensor(self.weights, dtype=actions.dtype)
        return -(w * (actions.unsqueeze(-2) - c).square()).sum(-1)

    def heads(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q [B, N, 2], grad [B, N, 2, A]) by hand."""
        diff = a[..., None, :] - self.centers
        return -(self.weights * diff**2).sum(-1), -2.0 * self.weights * diff

    def score(self, a: np.ndarray, aggregation: str) -> np.ndarray:
        """grad_a of the aggregated value: the mean of the head gradients, or the gradient of the lower head."""
        q, grad = self.heads(a)
        if aggregation == "mean":
            return grad.mean(-2)
        lower = q.argmin(-1)
        return np.take_along_axis(grad, lower[..., None, None], axis=-2).squeeze(-2)


def textbook_stein(x: np.ndarray, score: np.ndarray, alpha: float) -> np.ndarray:
    """phi_i = (1/N) sum_j [K_ij score_j / alpha + K_ij (x_i - x_j) 2 / (2 s^2 + 1e-6)], per state, with
    K_ij = exp(-||x_i - x_j||^2 / (2 s^2 + 1e-6)) and s^2 = median of all N*N squared distances (diagonal
    zeros included; np.median averages the two middle entries) / (2 log(N + 1)), floored at 1e-12."""
    n = x.shape[-2]
    diff = x[..., :, None, :] - x[..., None, :, :]
    d2 = (diff**2).sum(-1)
    s2 = np.maximum(np.median(d2.reshape(*d2.shape[:-2], -1), axis=-1) / (2.0 * math.log(n + 1)), 1e-12)
    c = (2.0 * s2 + 1e-6)[..., None, None]
    kernel = np.exp(-d2 / c)
    attraction = kernel @ score / alpha
    repulsion = (kernel[..., None] * diff).sum(-2) * 2.0 / c
    return (attraction + repulsion) / n


def adam_flow(x0: np.ndarray, field, steps: int, lr: float, box: bool) -> np.ndarray:
    """The authors' solver: a fresh Adam (betas 0.9/0.999, eps 1e-8) on g = -phi for each flow, its moments
    kept over the steps, particles clipped to [-1, 1] after every step."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.zeros_like(x0)
    for t in range(1, steps + 1):
        g = -field(x)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        x = x - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        if box:
            x = np.clip(x, -1.0, 1.0)
    return x


def euler_flow(x0: np.ndarray, field, steps: int, step_size: float) -> np.ndarray:
    x = x0.copy()
    for _ in range(steps):
        x = x + step_size * field(x)
    return x


def w2_bound(x0: np.ndarray, x: np.ndarray) -> np.ndarray:
    """sqrt((1/N) sum_i ||x_i - x_i^0||^2) per state: particles keep their identity, so this bounds W2."""
    return np.sqrt(((x - x0) ** 2).sum(-1).mean(-1))


def exact_w2(x0: np.ndarray, x: np.ndarray) -> float:
    """W2 between two equal-weight clouds of one state, by an exact assignment."""
    cost = ((x0[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def random_cloud(seed: int, batch: int, particles: int, action_dim: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.8, 0.8, (batch, particles, action_dim))


# ------------------------------------------------------------------------------------------ aggregation
@pytest.mark.parametrize("aggregation", ["mean", "min"])
def test_flow_follows_the_aggregated_heads_it_was_given(aggregation):
    """ValueGradientFlow(aggregation=...) moves particles along grad of mean_k Q_k or of min_k Q_k."""
    value = TwoHeadQuadratic(seed=1, action_dim=2)
    x0 = random_cloud(2, 3, 5, 2)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.05), budget=4, aggregation=aggregation)
    got = flow(torch.as_tensor(x0), None, value).particles.numpy()
    expected = euler_flow(x0, lambda x: value.score(x, aggregation), 4, 0.05)
    other = euler_flow(x0, lambda x: value.score(x, "min" if aggregation == "mean" else "mean"), 4, 0.05)
    assert np.abs(expected - other).max() > 0.05, "test data does not separate min from mean"
    error = np.abs(got - expected).max()
    assert error < 1e-12, (
        f"aggregation={aggregation!r}: the particles are off the hand-computed flow of the {aggregation} of the "
        f"heads by {error:.3g} (off the other aggregation's by {np.abs(got - other).max():.3g})"
    )


def test_min_and_mean_give_different_particles_with_the_authors_solver():
    value = TwoHeadQuadratic(seed=3, action_dim=3)
    x0 = torch.as_tensor(random_cloud(4, 2, 6, 3))
    make = lambda agg: vgf.ValueGradientFlow(  # noqa: E731
        vgf.SteinField(0.5), vgf.ParticleAdam(0.1), budget=3, projection=vgf.BoxProjection(), aggregation=agg
    )
    mean, low = (make(agg)(x0, None, value).particles for agg in ("mean", "min"))
    assert (mean - low).abs().max() > 0.05, "aggregation='min' moved the particles exactly as 'mean' did"


# ------------------------------------------------------------------------------------------ the authors' flow
@pytest.mark.parametrize(("aggregation", "particles"), [("mean", 6), ("min", 7)])
def test_stein_field_with_particle_adam_and_box_matches_the_hand_written_flow(aggregation, particles):
    """Textbook Stein field (bandwidth held fixed) on the aggregated heads, fresh Adam on -phi, clipping."""
    value = TwoHeadQuadratic(seed=5, action_dim=2, spread=2.0)  # optima outside the box: clipping is exercised
    x0 = random_cloud(6, 3, particles, 2) * 1.2
    alpha, lr, steps = 0.4, 0.15, 4
    field = vgf.SteinField(alpha, differentiate_bandwidth=False)
    flow = vgf.ValueGradientFlow(field, vgf.ParticleAdam(lr), budget=steps, projection=vgf.BoxProjection(-1.0, 1.0),
                                 aggregation=aggregation)  # fmt: skip
    got = flow(torch.as_tensor(x0), None, value).particles.numpy()
    expected = adam_flow(x0, lambda x: textbook_stein(x, value.score(x, aggregation), alpha), steps, lr, box=True)
    assert np.isclose(np.abs(expected).max(), 1.0), "the hand-written flow never reached the box: weak test data"
    error = np.abs(got - expected).max()
    assert error < 1e-10, f"Stein + ParticleAdam + box ({aggregation} heads) is off the specification by {error:.3g}"


def test_particle_adam_moves_lr_per_coordinate_on_its_first_step():
    """Adam's first step is lr * sign(phi), exactly lr phi / (|phi| + eps), whatever the scale of Q (REFERENCE.md
    section 2)."""
    x0 = random_cloud(7, 2, 4, 3)
    for scale in (1e-3, 1.0, 1e3):
        value = lambda o, a, s=scale: -s * (a - 0.25).square().sum(-1)  # noqa: E731
        got = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ParticleAdam(0.07), budget=1)(
            torch.as_tensor(x0), None, value).particles.numpy()  # fmt: skip
        phi = 2 * scale * (0.25 - x0)
        expected = x0 + 0.07 * phi / (np.abs(phi) + 1e-8)  # m_hat = -phi, sqrt(v_hat) = |phi|
        error = np.abs(got - expected).max()
        assert error < 1e-12, f"first Adam step is off lr * phi / (|phi| + eps) by {error:.3g} at Q scale {scale}"


# ------------------------------------------------------------------------------------------ budgets
@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 4),
    particles=st.integers(2, 7),
    action_dim=st.integers(1, 3),
    max_radius=st.floats(0.0, 0.8),
    solver=st.sampled_from(["euler", "adam"]),
)
def test_displacement_budget_holds_the_hand_computed_w2_bound(seed, batch, particles, action_dim, max_radius, solver):
    value = TwoHeadQuadratic(seed, action_dim)
    x0 = random_cloud(seed + 1, batch, particles, action_dim)
    radii = np.random.default_rng(seed + 2).uniform(0.0, 1.0, batch) * max_radius
    radii[0] = max_radius  # one state at the drawn limit itself
    make_solver = vgf.Euler(0.2) if solver == "euler" else vgf.ParticleAdam(0.2)
    budget = vgf.DisplacementBudget(torch.as_tensor(radii)) & vgf.StepBudget(6)
    out = vgf.ValueGradientFlow(vgf.SteinField(0.5), make_solver, budget=budget, projection=vgf.BoxProjection())(
        torch.as_tensor(x0), None, value
    )
    x = out.particles.numpy()
    by_hand = w2_bound(x0, x)
    assert np.all(by_hand <= radii * (1 + 1e-9) + 1e-12), (
        f"W2 bound sqrt(mean_i ||x_i - x_i^0||^2) = {by_hand} exceeds the radii {radii}"
    )
    np.testing.assert_allclose(out.report.displacement.numpy(), by_hand, rtol=1e-9, atol=1e-12,
                               err_msg="report.displacement is not sqrt(mean over particles of ||x_i - x_i^0||^2)")
    exhausted = out.report.exhausted.numpy()
    np.testing.assert_allclose(by_hand[exhausted], radii[exhausted], rtol=1e-6, atol=1e-12,
                               err_msg="a state stopped by its displacement budget is not on its radius")
    assert np.all(out.report.steps.numpy()[~exhausted] == 6), "a state within its budget stopped early"
    for state in range(batch):  # the bound is an upper bound on the exact W2
        assert exact_w2(x0[state], x[state]) <= by_hand[state] + 1e-12


def test_displacement_budget_is_an_average_over_particles_not_a_sum():
    """Moving every one of N particles by r along a line spends exactly r: sqrt(mean ||d||^2) = r."""
    x0 = np.zeros((1, 9, 2))
    value = lambda o, a: a[..., 0]  # noqa: E731  constant gradient e_1: every particle moves the same way
    out = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.01), budget=vgf.DisplacementBudget(0.3),
                                max_steps=100)(torch.as_tensor(x0), None, value)  # fmt: skip
    x = out.particles.numpy()
    np.testing.assert_allclose(x[..., 0], 0.3, rtol=1e-9, err_msg="each particle should move r = 0.3 (budget averaged)")
    np.testing.assert_allclose(x[..., 1], 0.0, atol=0)
    assert bool(out.report.exhausted[0]) and float(out.report.displacement[0]) == pytest.approx(0.3, rel=1e-9)


@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    steps=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    cap=st.none() | st.integers(0, 6),
    step_size=st.floats(0.01, 0.2),
)
def test_step_budget_takes_exactly_its_steps_per_state(seed, steps, cap, step_size):
    """Euler on Q = -sum_d w_d (a_d - c_d)^2 has the closed form x_L - c = (1 - 2 eps w)^L (x_0 - c)."""
    rng = np.random.default_rng(seed)
    batch, action_dim = len(steps), 2
    center, weight = rng.uniform(-1, 1, action_dim), rng.uniform(0.5, 3.0, action_dim)
    x0 = random_cloud(seed, batch, 3, action_dim)
    value = lambda o, a: -(torch.as_tensor(weight) * (a - torch.as_tensor(center)).square()).sum(-1)  # noqa: E731
    taken = np.array(steps) if cap is None else np.minimum(steps, cap)
    budget = vgf.StepBudget(torch.tensor(steps))
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(step_size), budget=budget, max_steps=cap)
    out = flow(torch.as_tensor(x0), None, value)
    assert out.report.steps.tolist() == taken.tolist(), f"steps taken {out.report.steps.tolist()}, budget {taken}"
    expected = center + (1 - 2 * step_size * weight) ** taken[:, None, None] * (x0 - center)
    error = np.abs(out.particles.numpy() - expected).max()
    assert error < 1e-12, f"per-state step budgets {taken.tolist()}: particles off the closed form by {error:.3g}"
    both = flow.with_budget(vgf.StepBudget(torch.tensor(steps)) & vgf.StepBudget(2))(torch.as_tensor(x0), None, value)
    assert both.report.steps.tolist() == np.minimum(taken, 2).tolist(), "combined step budgets do not take the fewest"
    zero = flow.with_budget(0)(torch.as_tensor(x0), None, value)
    assert np.array_equal(zero.particles.numpy(), x0), "L = 0 must leave mu's particles untouched (best-of-N)"


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000),
    radius=st.floats(0.05, 0.5),
    particles=st.integers(3, 8),
)
def test_sinkhorn_budget_keeps_the_exact_w2_within_the_radius(seed, radius, particles):
    """sqrt(2 S_eps) -> W2 as blur -> 0: with a small blur the exact W2 of the result stays within the radius
    (up to the entropic bias), a state cut back ends near it, and an uncut state took every step."""
    value = TwoHeadQuadratic(seed, 2)
    x0 = random_cloud(seed, 3, particles, 2)
    radii = np.array([radius, radius / 3, 10.0])
    budget = vgf.SinkhornBudget(torch.as_tensor(radii), blur=0.005, scaling=0.8, bisection_steps=8) & vgf.StepBudget(5)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=budget)
    out = flow(torch.as_tensor(x0), None, value)
    x = out.particles.numpy()
    exact = np.array([exact_w2(x0[s], x[s]) for s in range(3)])
    assert np.all(exact <= radii * 1.02 + 0.01), f"exact W2 {exact} exceeds the Sinkhorn radii {radii}"
    free = euler_flow(x0, lambda a: value.score(a, "mean"), 5, 0.1)
    np.testing.assert_allclose(x[2], free[2], atol=1e-12, err_msg="a state far inside its budget did not move freely")
    exhausted = out.report.exhausted.numpy()
    assert not exhausted[2]
    for s in np.flatnonzero(exhausted):
        assert exact[s] >= radii[s] * 0.9 - 0.02, f"state {s} was cut back to W2 {exact[s]:.3g}, far below {radii[s]}"
    for s in np.flatnonzero(~exhausted):
        assert out.report.steps[s] == 5
