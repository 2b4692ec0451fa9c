"""Test-time operators under one API: best-of-N at any N, GradStep, SMC resampling; the agent's public paths."""

from __future__ import annotations

import dataclasses
import pytest
import torch
from scipy import stats

from rl_helpers import one_thread, synthetic_batch  # noqa: F401  (autouse fixture)
from vgf_prob.cost import measure
from vgf_prob.distributions.particle import gather_particles
from vgf_prob.flows import Euler, ParticleAdam, ValueGradient
from vgf_prob.flows.resampling import BoltzmannResampling, take_particles
from vgf_prob.rl.agent import VGFAgent
from vgf_prob.rl.config import VGFConfig
from vgf_prob.transport import BoxProjection, ValueGradientFlow
from vgf_prob.values import evaluate

OBS, ACT = 5, 3
TINY = VGFConfig(critic_hidden_dims=(16, 16), bc_hidden_dims=(16, 16), num_particles=4, flow_steps=3, train_budget=2,
                 target_aggregation="min")


def quadratic(center: torch.Tensor, k: float):
    """Q(x) = -||x - c||^2 / (2k) (one number per particle; obs ignored)."""
    return lambda obs, x: -(x - center).square().sum(-1) / (2 * k)


def tilted_gaussian(mean, var, center, k, alpha):
    """N(mean, var) times exp(-(x - c)^2 / (2 alpha k)), normalised: a Gaussian (precision adds)."""
    precision = 1 / var + 1 / (alpha * k)
    return (mean / var + center / (alpha * k)) / precision, 1 / precision


def weighted_moments(x: torch.Tensor, log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.softmax(log_weights, -1)[..., None]
    mean = (w * x).sum(-2)
    return mean, (w * (x - mean[..., None, :]).square()).sum(-2)


# ---------------------------------------------------------------------------------------------- SMC


def test_one_resampling_of_a_gaussian_cloud_gives_the_tilted_gaussian():
    g = torch.Generator().manual_seed(0)
    n, alpha, k = 200_000, 0.5, 2.0
    mean = torch.tensor([[0.0, 1.0], [-1.0, 2.0]])  # two states, two action dims, std 1.5
    x0 = mean[:, None, :] + 1.5 * torch.randn(2, n, 2, generator=g, dtype=torch.float64).to(mean.dtype)
    center = torch.tensor([1.0, -1.0])
    run = BoltzmannResampling(alpha).start(None, x0, quadratic(center, k), g)
    resampled = take_particles(x0, run.before_step(x0))
    want_mean, want_var = tilted_gaussian(mean, 2.25, center, k, alpha)
    # tolerances: about three standard errors at an effective sample size of about N / 2
    torch.testing.assert_close(resampled.mean(1), want_mean, atol=0.01, rtol=0)
    torch.testing.assert_close(resampled.var(1), torch.full((2, 2), want_var), atol=0.03, rtol=0)
    assert torch.all(run.resampled == 1) and torch.all(run.log_weights == 0)
    assert torch.equal(resampled, take_particles(x0, run.lineage))


@pytest.mark.parametrize("steps", [0, 1])
def test_smc_flow_weights_approximate_the_pushforward_tilted_by_exp_q_over_alpha(steps):
    """x1 = x0 + h grad Q(x0) = (1 - h/k) x0 + h c / k is affine, so the tilted law is a Gaussian."""
    n, alpha, k, h, m, s = 100_000, 0.5, 1.0, 0.3, 0.0, 1.0
    x0 = m + s * torch.randn(1, n, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    center = torch.tensor([1.0], dtype=torch.float64)
    flow = ValueGradientFlow(ValueGradient(), Euler(h), budget=steps, resampling=BoltzmannResampling(alpha))
    policy = flow(x0, None, quadratic(center, k), generator=torch.Generator().manual_seed(2))
    shrink = (1 - h / k) ** steps
    m1, s1 = shrink * m + (1 - shrink) * 1.0, shrink * s
    want_mean, want_var = tilted_gaussian(m1, s1**2, 1.0, k, alpha)
    mean, var = weighted_moments(policy.particles, policy.log_weights)
    assert mean.item() == pytest.approx(want_mean, abs=0.01) and var.item() == pytest.approx(want_var, abs=0.01)
    # every particle is the flow of its own origin (lineage followed through the resampling)
    torch.testing.assert_close(policy.particles, shrink * policy.reference_particles + (1 - shrink) * center)
    assert torch.logsumexp(policy.log_weights, -1).abs().max() < 1e-9


def test_resampling_carries_each_particles_adam_moments_and_origin():
    """Adam on the plain gradient moves each particle on its own, so with resampling every final particle is the
    no-resampling flow's particle of its origin: the moments and origins must travel with the particle."""
    x0 = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = lambda obs, x: -(x.square() * torch.tensor([1.0, 3.0], dtype=x.dtype)).sum(-1) + x[..., 0]  # noqa: E731
    plain = ValueGradientFlow(ValueGradient(), ParticleAdam(0.2), budget=4)
    smc = dataclasses.replace(plain, resampling=BoltzmannResampling(0.05))
    policy = smc(x0, None, value, generator=torch.Generator().manual_seed(3))
    moved = plain(x0, None, value).particles
    index = torch.cdist(policy.reference_particles, x0).argmin(-1)  # which origin each final particle has
    torch.testing.assert_close(policy.particles, take_particles(moved, index))
    assert policy.report.displacement.shape == (3,) and not torch.equal(policy.particles, moved)


def test_resampling_is_refused_with_an_ode_solver_and_bad_arguments():
    from vgf_prob.flows import ODESolver

    with pytest.raises(ValueError, match="not a DiscreteSolver"):
        ValueGradientFlow(ValueGradient(), ODESolver(), resampling=BoltzmannResampling())
    with pytest.raises(ValueError, match="alpha must be positive"):
        BoltzmannResampling(0.0)
    with pytest.raises(ValueError, match="ess_fraction"):
        BoltzmannResampling(1.0, ess_fraction=0.0)


# ---------------------------------------------------------------------------------------------- best-of-N


@pytest.mark.parametrize("n", [1, 5])
def test_best_of_n_chooses_the_maximum_whose_cdf_is_phi_to_the_n(n):
    """Reference N(0, 1), Q(x) = x: best-of-N's action is the max of N standard normals, CDF Phi(x)^N."""
    states = 4000
    torch.manual_seed(0)
    reference = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(states, 1), 1.0), 1)
    flow = ValueGradientFlow(ValueGradient(), Euler(0.1), budget=0, target_aggregation="mean")
    with measure() as cost:
        actions = flow.act(reference, None, lambda obs, x: x[..., 0], num_particles=n)
    result = stats.kstest(actions[:, 0].numpy(), lambda x: stats.norm.cdf(x) ** n)
    assert result.pvalue > 0.01
    assert cost.particles == states * n and cost.value_evaluations == states * n and cost.states == states


def test_agent_best_of_n_takes_n_per_call():
    torch.manual_seed(0)
    agent = VGFAgent(OBS, ACT, TINY)
    obs = torch.randn(6, OBS)
    for n in (1, 9):
        with measure() as cost:
            actions = agent.act(obs, budget=0, num_particles=n, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            particles = agent.reference(obs).sample_particles(n, generator=torch.Generator().manual_seed(4))
            q = agent.critic(obs.unsqueeze(1).expand(-1, n, -1), particles).amin(-1)
        torch.testing.assert_close(actions, gather_particles(particles, q.argmax(-1)))
        assert cost.particles == 6 * n and cost.reference_passes == 6 * n * 3
    with pytest.raises(ValueError, match="num_particles must be a positive int"):
        agent.act(obs, num_particles=0)


# ---------------------------------------------------------------------------------------------- GradStep


def test_agent_gradstep_is_one_adam_step_along_the_value_gradient():
    """Fresh Adam's first step is lr * g / (|g| + eps) with g = grad_a mean_k Q_k (no kernel, no alpha)."""
    torch.manual_seed(0)
    agent = VGFAgent(OBS, ACT, TINY.replace(vgf_lr=0.05, fast_path=False))
    obs = torch.randn(4, OBS)
    actions = agent.act(obs, budget=1, field=ValueGradient(), generator=torch.Generator().manual_seed(7))
    x0 = agent.reference_particles(obs, 4, torch.Generator().manual_seed(7)).requires_grad_(True)
    expanded = obs.unsqueeze(1).expand(-1, 4, -1)
    (grad,) = torch.autograd.grad(agent.critic(expanded, x0).mean(-1).sum(), x0)
    x1 = (x0 + 0.05 * grad / (grad.abs() + 1e-8)).clamp(-1, 1).detach()
    with torch.no_grad():
        chosen = gather_particles(x1, agent.critic(expanded, x1).amin(-1).argmax(-1))
    torch.testing.assert_close(actions, chosen)


def test_agent_smc_acts_in_the_box_and_reports_resampling_cost():
    torch.manual_seed(0)
    agent = VGFAgent(OBS, ACT, TINY)
    with measure() as cost:
        actions = agent.act(torch.randn(3, OBS), budget=2, resampling=BoltzmannResampling(0.01))
    assert actions.shape == (3, ACT) and actions.abs().max() <= 1
    # per state: K BC steps and 2 gradient steps per particle; weights before each step, at the end, scoring
    assert (cost.reference_passes, cost.value_gradient_evaluations, cost.value_evaluations) == (36, 24, 12 * 4)


# ------------------------------------------------------------------------------------- the agent's public paths


def old_flow(agent: VGFAgent, budget) -> ValueGradientFlow:
    """The operator as the agent built it before it acted through ``act`` / ``next_value``."""
    return ValueGradientFlow(agent.stein_field, agent.solver, budget=budget, projection=BoxProjection(-1.0, 1.0),
                             aggregation=agent.config.flow_aggregation)


@pytest.mark.parametrize("target_aggregation", ["min", "mean"])
def test_td_target_through_next_value_equals_the_definition(target_aggregation):
    torch.manual_seed(0)
    agent = VGFAgent(OBS, ACT, TINY.replace(target_aggregation=target_aggregation))
    agent.update(synthetic_batch(0, 8, OBS, ACT))  # target critic != online critic from here
    batch = synthetic_batch(1, 8, OBS, ACT)
    target, info = agent.td_target(batch, torch.Generator().manual_seed(5))
    next_obs = batch["next_observations"]
    with torch.no_grad():
        start = agent.reference_particles(next_obs, 4, torch.Generator().manual_seed(5))
        policy = old_flow(agent, agent.train_budget)(start, next_obs, agent.particle_fn(agent.critic, next_obs))
        q = evaluate(agent.particle_fn(agent.target_critic, next_obs), next_obs, policy.particles, target_aggregation)
    assert torch.equal(target, batch["rewards"] + agent.config.discount * batch["masks"] * q.mean(-1))
    assert torch.equal(info["flow_displacement"], policy.report.displacement.mean())


@pytest.mark.parametrize("budget", [0, 2])
def test_act_through_the_operator_equals_the_definition(budget):
    torch.manual_seed(0)
    agent = VGFAgent(OBS, ACT, TINY)
    obs = torch.randn(5, OBS)
    actions = agent.act(obs, budget=budget, generator=torch.Generator().manual_seed(3))
    start = agent.reference_particles(obs, 4, torch.Generator().manual_seed(3))
    critic_fn = agent.particle_fn(agent.critic, obs)
    particles = old_flow(agent, budget)(start, obs, critic_fn).particles if budget else start
    scores = evaluate(critic_fn, obs, particles, agent.config.target_aggregation)
    assert torch.equal(actions, gather_particles(particles, scores.argmax(-1)))
