"""The transport operator against closed forms, an independent ODE solution and its invariants."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import vgf_prob as vgf
from vgf_prob.flows import ODE_METHODS, action_gradient
from vgf_prob.flows.kernels import median_bandwidth, pairwise_sq_distances, rbf_kernel

MEAN = torch.tensor([0.3, -0.2], dtype=torch.float64)
HESSIAN = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)


def quadratic_value(obs, actions):
    """Q(a) = -(a - m)^T H (a - m) / 2."""
    delta = actions - MEAN.to(actions.dtype)
    return -0.5 * ((delta @ HESSIAN.to(actions.dtype)) * delta).sum(-1)


def test_stein_field_reaches_the_boltzmann_target_of_a_quadratic_value():
    # pi* ∝ exp(Q / alpha) is N(m, alpha H^-1). The SVGD fixed point with N particles matches its moments up
    # to O(1/sqrt(N)) finite-particle error: with N = 200 and std ~0.5 that is ~0.035 on the mean and ~10%
    # on the covariance, so the tolerances below are about 1.5 of those units.
    torch.manual_seed(0)
    alpha = 0.5
    x0 = torch.randn(2, 200, 2, dtype=torch.float64)
    flow = vgf.ValueGradientFlow(vgf.SteinField(alpha=alpha), vgf.Euler(step_size=0.1), budget=300)
    particles = flow(x0, None, quadratic_value).particles
    target_cov = alpha * torch.linalg.inv(HESSIAN)
    for cloud in particles:
        assert torch.allclose(cloud.mean(0), MEAN, atol=0.06)
        cov = torch.cov(cloud.T)
        assert torch.linalg.norm(cov - target_cov) / torch.linalg.norm(target_cov) < 0.15
    # the repulsion is what keeps the spread: without it the cloud collapses onto the mode
    collapsed = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=300)(x0, None, quadratic_value)
    assert torch.cov(collapsed.particles[0].T).trace() < 1e-6


def test_euler_with_small_steps_agrees_with_the_ode_solver_and_the_closed_form():
    # dx/dt = grad Q = -H (x - m) has the solution x(t) = m + expm(-H t) (x0 - m).
    torch.manual_seed(1)
    x0 = torch.randn(3, 5, 2, dtype=torch.float64)
    budget = vgf.StepBudget(1000)
    euler = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(step_size=1e-3), budget=budget)(x0, None, quadratic_value)
    ode = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ODESolver("dopri5", step_size=1e-3, rtol=1e-9, atol=1e-10), budget=budget)(
        x0, None, quadratic_value
    )
    exact = MEAN + (x0 - MEAN) @ torch.linalg.matrix_exp(-HESSIAN * 1.0).T
    assert torch.allclose(ode.particles, exact, atol=1e-6)
    assert torch.allclose(euler.particles, exact, atol=2e-3)  # Euler's global error is O(h)
    rk4 = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ODESolver("rk4", step_size=1e-2), budget=100)(x0, None, quadratic_value)
    assert torch.allclose(rk4.particles, exact, atol=1e-6)


def test_particle_adam_first_step_moves_lr_per_coordinate_along_the_field():
    x0 = torch.tensor([[[0.5, -0.5], [0.0, 0.2]]], dtype=torch.float64)
    lr = 0.03
    out = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ParticleAdam(lr=lr), budget=1)(x0, None, quadratic_value)
    gradient = -(x0 - MEAN) @ HESSIAN
    # m_hat = g, v_hat = g^2 after bias correction, so the step is lr * g / (|g| + eps)
    expected = x0 + lr * gradient / (gradient.abs() + 1e-8)
    assert torch.allclose(out.particles, expected, atol=1e-12)


def test_adam_keeps_fresh_state_per_flow():
    x0 = torch.tensor([[[0.5, -0.5]]], dtype=torch.float64)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ParticleAdam(lr=0.01), budget=1)
    first = flow(x0, None, quadratic_value).particles
    again = flow(x0, None, quadratic_value).particles
    assert torch.equal(first, again)


def test_zero_budget_is_exactly_best_of_n():
    torch.manual_seed(2)
    reference = vgf.BoxProjection(-1, 1)(torch.randn(4, 16, 2))
    policy = vgf.ValueGradientFlow(vgf.SteinField(0.1), vgf.ParticleAdam(0.1), budget=0)(reference, None, quadratic_value)
    assert torch.equal(policy.particles, reference)
    chosen = policy.select("argmax", value=quadratic_value)
    by_hand = reference[torch.arange(4), quadratic_value(None, reference).argmax(-1)]
    assert torch.equal(chosen, by_hand)
    assert torch.equal(policy.report.steps, torch.zeros(4, dtype=torch.long))


def test_particles_stay_in_the_action_box():
    def outward(obs, actions):
        return 10.0 * actions.sum(-1)

    x0 = torch.rand(3, 8, 4) * 1.8 - 0.9
    for solver in (vgf.Euler(0.5), vgf.ParticleAdam(0.5), vgf.ODESolver("dopri5", step_size=0.5)):
        out = vgf.ValueGradientFlow(vgf.ValueGradient(), solver, budget=10, projection=vgf.BoxProjection(-1, 1))(
            x0, None, outward
        )
        assert out.particles.min() >= -1 and out.particles.max() <= 1
        assert torch.allclose(out.particles, torch.ones_like(out.particles), atol=1e-5)


class LinearCritic(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, heads: int = 2) -> None:
        super().__init__()
        self.net = nn.Linear(obs_dim + action_dim, heads)

    def forward(self, obs, actions):
        obs = obs.unsqueeze(-2).expand(*actions.shape[:-1], obs.shape[-1])
        return -self.net(torch.cat([obs, actions], -1)).square()


def test_no_gradient_reaches_the_value_parameters_and_heads_are_aggregated():
    torch.manual_seed(3)
    critic = LinearCritic(3, 2)
    obs = torch.randn(5, 3)
    reference = torch.randn(5, 6, 2)
    for aggregation in ("mean", "min"):
        out = vgf.ValueGradientFlow(vgf.SteinField(1.0), vgf.Euler(0.01), budget=3, aggregation=aggregation)(
            reference, obs, critic
        )
        assert out.particles.shape == reference.shape
    assert all(p.grad is None for p in critic.parameters())
    q, grad = action_gradient(vgf.HeadAggregation(critic, "min"), obs, reference)
    assert torch.allclose(q, critic(obs, reference).amin(-1))
    assert not q.requires_grad and not grad.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_arbitrary_leading_batch_shapes(dtype):
    torch.manual_seed(4)
    obs = torch.randn(2, 3, 4, dtype=dtype)
    reference = torch.randn(2, 3, 7, 2, dtype=dtype)
    critic = LinearCritic(4, 2).to(dtype)
    policy = vgf.ValueGradientFlow(vgf.SteinField(0.5), vgf.ParticleAdam(0.05), budget=2)(reference, obs, critic)
    assert policy.particles.dtype == dtype and policy.particles.shape == (2, 3, 7, 2)
    assert policy.batch_shape == (2, 3) and policy.event_shape == (2,)
    assert policy.report.steps.shape == (2, 3) and policy.report.displacement.shape == (2, 3)
    assert policy.select("argmax", value=vgf.HeadAggregation(critic), obs=obs).shape == (2, 3, 2)
    assert policy.sample().shape == (2, 3, 2)


def test_draws_particles_from_a_distribution_reference():
    reference = torch.distributions.Normal(torch.zeros(4, 2), torch.ones(4, 2))
    obs = torch.zeros(4, 1)
    policy = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=2)(
        lambda o: torch.distributions.Independent(reference, 1), obs, quadratic_value, num_particles=9
    )
    assert policy.particles.shape == (4, 9, 2)
    assert policy.reference_particles.shape == (4, 9, 2)
    assert not torch.equal(policy.particles, policy.reference_particles)


def test_operators_chain_and_with_budget_swaps_only_the_budget():
    torch.manual_seed(5)
    x0 = torch.randn(2, 5, 2, dtype=torch.float64)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.01), budget=2)
    two_then_three = flow.with_budget(3)(flow(x0, None, quadratic_value), None, quadratic_value)
    five = flow.with_budget(5)(x0, None, quadratic_value)
    assert torch.allclose(two_then_three.particles, five.particles)
    assert torch.equal(two_then_three.reference_particles, x0)
    assert flow.with_budget(3).field is flow.field and flow.with_budget(3).budget.steps == 3


def test_whole_float_budgets_are_step_counts_like_step_budget():
    x0 = torch.randn(2, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.05))
    assert torch.equal(flow.with_budget(3.0)(x0, None, quadratic_value).particles,
                       flow.with_budget(3)(x0, None, quadratic_value).particles)
    assert flow.with_budget(np.int64(2)).budget.steps == 2
    per_state = flow.with_budget(torch.tensor([0, 2]))(x0, None, quadratic_value)
    assert per_state.report.steps.tolist() == [0, 2]
    with pytest.raises(ValueError, match="whole"):
        flow.with_budget(2.5)
    with pytest.raises(TypeError, match="step count"):
        flow.with_budget(True)


def test_box_from_numpy_bounds_clips_per_dimension_and_moves_its_bounds_once():
    box = vgf.BoxProjection(np.array([-2.0, 0.0]), np.array([2.0, 0.5]))  # as env.action_space.low / high
    x = torch.tensor([[[-3.0, 0.7], [1.0, -0.2]]])
    assert torch.equal(box(x), torch.tensor([[[-2.0, 0.5], [1.0, 0.0]]]))
    assert box(x).dtype == torch.float32
    low, _ = box._bounds(x)
    assert low is box._bounds(x + 1)[0] and low.dtype == torch.float32
    assert box._bounds(x.double())[0].dtype == torch.float64
    mixed = vgf.BoxProjection(-1, torch.tensor([1.0, 0.5]))
    assert torch.equal(mixed(torch.full((1, 1, 2), 5.0)), torch.tensor([[[1.0, 0.5]]]))


@pytest.mark.parametrize("budget", [0, vgf.StepBudget(torch.tensor([0, 4, 0])), vgf.DisplacementBudget(0.0) & vgf.StepBudget(4)])
def test_starting_particles_are_projected_so_every_result_is_in_the_box(budget):
    # reference draws far outside the box; states whose budget is 0 never move, yet must come back inside it
    x0 = 3.0 * torch.randn(3, 50, 2, generator=torch.Generator().manual_seed(10))
    box = vgf.BoxProjection(np.array([-1.0, -0.5]), np.array([1.0, 0.5]))
    flow = vgf.ValueGradientFlow(vgf.SteinField(0.5), vgf.ParticleAdam(0.1), budget=budget, projection=box)
    policy = flow(x0, None, quadratic_value)
    low, high = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.5])
    assert (policy.particles >= low).all() and (policy.particles <= high).all()
    assert (x0 < low).any()  # the test would see an unprojected start
    assert (flow.act(x0, None, quadratic_value) >= low).all()
    assert torch.equal(policy.reference_particles, box(x0))


def test_float64_observations_meet_float32_particles():
    critic = LinearCritic(3, 2)
    obs = torch.randn(4, 3, dtype=torch.float64)
    x0 = torch.rand(4, 5, 2) * 2 - 1
    policy = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=2)(x0, obs, critic)
    reference_run = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=2)(x0, obs.float(), critic)
    assert policy.particles.dtype == torch.float32
    assert torch.equal(policy.particles, reference_run.particles)


def test_a_value_detached_from_the_actions_warns_once_per_flow():
    def detached(obs, actions):
        return -(actions.detach() - 0.3).square().sum(-1) * torch.ones((), requires_grad=True)

    def under_no_grad(obs, actions):
        with torch.no_grad():
            return quadratic_value(obs, actions)

    x0 = torch.zeros(2, 3, 2)
    flow = vgf.ValueGradientFlow(vgf.SteinField(1.0), vgf.Euler(0.1), budget=3)
    for value in (detached, under_no_grad):
        with pytest.warns(vgf.NoActionGradientWarning, match="no gradient to the actions") as record:
            flow(x0, None, value)
        assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", vgf.NoActionGradientWarning)
        flow(x0, None, quadratic_value)
        flow(x0, torch.zeros(2, 1), LinearCritic(1, 2))


def two_head_value(obs, actions):
    """Head 1 peaks at +0.5, head 2 at -0.5 with a steeper fall: mean and min prefer different particles."""
    h1 = -(actions - 0.5).square().sum(-1)
    h2 = -3.0 * (actions + 0.5).square().sum(-1) + 0.2
    return torch.stack([h1, h2], -1)


def test_act_flows_on_mean_heads_and_chooses_by_the_target_aggregation():
    x0 = torch.linspace(-1, 1, 9).reshape(1, 9, 1).expand(2, 9, 1).contiguous()
    for target in ("min", "mean"):
        flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.05), budget=2, target_aggregation=target)
        # the flow alone, on the mean of the heads written out
        moved = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.05), budget=2)(
            x0, None, lambda o, a: two_head_value(o, a).mean(-1)).particles
        heads = two_head_value(None, moved)
        scores = heads.amin(-1) if target == "min" else heads.mean(-1)
        expected = moved[torch.arange(2), scores.argmax(-1)]
        assert torch.equal(flow.act(x0, None, two_head_value), expected)
    chosen = {t: vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.05), budget=0, target_aggregation=t).act(
        x0, None, two_head_value)[0, 0].item() for t in ("min", "mean")}
    assert chosen["min"] != chosen["mean"]  # the test can tell the two aggregations apart


def test_act_takes_a_budget_per_call_and_other_rules():
    x0 = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(11))
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=1)
    assert torch.equal(flow.act(x0, None, quadratic_value, budget=4), flow.with_budget(4).act(x0, None, quadratic_value))
    assert not torch.equal(flow.act(x0, None, quadratic_value, budget=4), flow.act(x0, None, quadratic_value))
    moved = flow(x0, None, quadratic_value).particles
    for rule in ("softmax", "uniform"):
        action = flow.act(x0, None, quadratic_value, rule=rule, generator=torch.Generator().manual_seed(0))
        assert action.shape == (3, 2)
        assert all(any(torch.equal(action[b], p) for p in moved[b]) for b in range(3))


def test_next_value_moves_by_the_online_value_and_scores_by_the_target_value():
    x0 = torch.randn(4, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(12))

    def target_value(obs, actions):
        return torch.stack([actions.sum(-1), -actions.square().sum(-1)], -1)

    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=3)
    moved = x0.clone()
    for _ in range(3):  # Euler on grad Q by hand: grad of -(a - m)^T H (a - m) / 2 is -H (a - m)
        moved = moved - 0.1 * (moved - MEAN) @ HESSIAN
    by_hand = target_value(None, moved)
    assert torch.allclose(flow.next_value(x0, None, quadratic_value, target_value), by_hand.amin(-1).mean(-1))
    assert torch.allclose(flow.next_value(x0, None, quadratic_value, target_value, reduction="max"),
                          by_hand.amin(-1).amax(-1))
    mean_heads = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=3, target_aggregation="mean")
    assert torch.allclose(mean_heads.next_value(x0, None, quadratic_value, target_value), by_hand.mean(-1).mean(-1))
    at_zero = flow.next_value(x0, None, quadratic_value, target_value, budget=0)
    assert torch.allclose(at_zero, target_value(None, x0).amin(-1).mean(-1))
    assert not flow.next_value(x0, None, quadratic_value, target_value).requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu():
    torch.manual_seed(6)
    x0 = torch.randn(3, 10, 2, dtype=torch.float64)
    flow = vgf.ValueGradientFlow(vgf.SteinField(0.5), vgf.ParticleAdam(0.05), budget=3, projection=vgf.BoxProjection())
    cpu = flow(x0, None, quadratic_value).particles
    gpu = flow(x0.cuda(), None, lambda o, a: quadratic_value(o, a)).particles
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-9)


def test_stein_field_matches_its_textbook_formula():
    torch.manual_seed(7)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    alpha = 0.7
    phi = vgf.SteinField(alpha)(None, x, lambda o, a: -(a**2).sum(-1))
    score = -2 * x
    diff = x[:, :, None, :] - x[:, None, :, :]
    d2 = diff.square().sum(-1)
    s2 = torch.quantile(d2.flatten(-2), 0.5, dim=-1) / (2 * torch.log(torch.tensor(7.0)))
    kernel = torch.exp(-d2 / (2 * s2[:, None, None] + 1e-6))
    expected = (
        torch.einsum("bij,bjd->bid", kernel, score) / alpha
        + (kernel[..., None] * diff).sum(2) * 2 / (2 * s2[:, None, None] + 1e-6)
    ) / 6
    assert torch.allclose(phi, expected)


def test_kernel_helpers():
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    d2 = pairwise_sq_distances(x)
    assert torch.allclose(d2, torch.cdist(x, x).square(), atol=1e-10)
    assert torch.equal(torch.diagonal(d2, dim1=-2, dim2=-1), torch.zeros(3, 5, dtype=torch.float64))
    s2 = median_bandwidth(d2)
    assert torch.allclose(rbf_kernel(d2, s2).diagonal(dim1=-2, dim2=-1), torch.ones(3, 5, dtype=torch.float64))


class TestBadInput:
    def test_mismatched_obs_and_particles(self):
        with pytest.raises(ValueError, match="obs has batch shape"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())(torch.zeros(4, 3, 2), torch.zeros(5, 3), quadratic_value)

    def test_value_with_wrong_output_shape(self):
        with pytest.raises(ValueError, match=r"returned shape \(\) .*vgf.as_value"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())(torch.zeros(4, 3, 2), None, lambda o, a: a.sum())

    def test_a_value_that_raises_is_reraised_with_the_shapes_passed_and_the_adapter(self):
        def rows_critic(obs, actions):  # written for matched rows, as CORL/CleanRL critics are
            return torch.cat([obs, actions], 1).sum(1)

        flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())
        with pytest.raises(RuntimeError, match=r"obs \[4, 3\] and actions \[4, 5, 2\].*vgf.as_value") as info:
            flow(torch.zeros(4, 5, 2), torch.zeros(4, 3), rows_critic)
        assert "\n" not in str(info.value) and isinstance(info.value.__cause__, RuntimeError)

    def test_empty_batch(self):
        flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())
        with pytest.raises(ValueError, match="empty batch"):
            flow(lambda o: torch.distributions.Normal(torch.zeros(0, 2), 1.0), torch.zeros(0, 3), quadratic_value,
                 num_particles=4)
        with pytest.raises(ValueError, match="empty batch"):
            flow(torch.zeros(0, 4, 2), None, quadratic_value)

    def test_obs_on_another_device_than_the_particles(self):
        with pytest.raises(ValueError, match="obs are on meta but the particles on cpu"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())(
                torch.zeros(2, 3, 2), torch.zeros(2, 4, device="meta"), quadratic_value
            )

    def test_numpy_obs_are_refused_by_name(self):
        with pytest.raises(TypeError, match="torch.as_tensor"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())(torch.zeros(2, 3, 2), np.zeros((2, 4)), quadratic_value)

    def test_bad_box_bounds(self):
        with pytest.raises(ValueError, match="low < high"):
            vgf.BoxProjection(np.array([-1.0, 2.0]), np.array([1.0, 1.0]))
        with pytest.raises(ValueError, match="low < high"):
            vgf.BoxProjection(float("nan"), 1.0)
        with pytest.raises(ValueError, match="broadcast"):
            vgf.BoxProjection(np.zeros(2), np.ones(3))
        with pytest.raises(TypeError, match="number, a numpy array or a tensor"):
            vgf.BoxProjection("-1", 1)

    def test_unknown_selection_rule_and_reduction(self):
        flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())
        with pytest.raises(ValueError, match="selection rule 'best'"):
            flow.act(torch.zeros(1, 2, 2), None, quadratic_value, rule="best")
        with pytest.raises(ValueError, match="particle reduction 'sum'"):
            flow.next_value(torch.zeros(1, 2, 2), None, quadratic_value, quadratic_value, reduction="sum")
        with pytest.raises(ValueError, match="target_aggregation 'max'"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(), target_aggregation="max")

    def test_nan_particles(self):
        x0 = torch.zeros(2, 3, 2)
        x0[1, 2, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN/inf"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())(x0, None, quadratic_value)

    def test_nan_value_gradient_raises_and_leaves_input_untouched(self):
        x0 = torch.zeros(2, 3, 2)
        before = x0.clone()

        def broken(obs, actions):
            return actions.sum(-1) * torch.tensor(float("nan"))

        with pytest.raises(FloatingPointError, match="non-finite"):
            vgf.ValueGradientFlow(vgf.SteinField(), vgf.ParticleAdam())(x0, None, broken)
        assert torch.equal(x0, before)

    def test_inference_mode_is_refused_instead_of_a_silent_zero_gradient(self):
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())(torch.zeros(1, 2, 2), None, quadratic_value)

    def test_negative_budgets(self):
        for make in (lambda: vgf.StepBudget(-1), lambda: vgf.DisplacementBudget(-0.1), lambda: vgf.SinkhornBudget(-1)):
            with pytest.raises(ValueError, match="non-negative"):
                make()

    def test_unknown_solver_method_and_settings(self):
        with pytest.raises(ValueError, match="unknown ODE method 'rk5'"):
            vgf.ODESolver("rk5")
        assert "dopri5" in ODE_METHODS
        with pytest.raises(ValueError, match="aggregation"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(), aggregation="max")
        with pytest.raises(ValueError, match="step_size"):
            vgf.Euler(step_size=0)
        with pytest.raises(ValueError, match="alpha"):
            vgf.SteinField(alpha=0)

    def test_missing_num_particles(self):
        with pytest.raises(ValueError, match="num_particles"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler())(
                lambda o: torch.distributions.Normal(0, 1), torch.zeros(2, 1), quadratic_value
            )

    def test_unbounded_budget_needs_max_steps(self):
        with pytest.raises(ValueError, match="max_steps"):
            vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(), budget=vgf.DisplacementBudget(1.0))(
                torch.zeros(1, 2, 2), None, quadratic_value
            )

    def test_bad_selection(self):
        policy = vgf.ParticlePolicy(torch.zeros(2, 3, 1))
        with pytest.raises(ValueError, match="selection rule"):
            policy.select("best")
        with pytest.raises(ValueError, match="needs scores"):
            policy.select("argmax")
