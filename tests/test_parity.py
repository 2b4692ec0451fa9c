"""The paper's Stein step against the authors' own output, and against a reference written from the spec.

`tests/data/svgd_parity.npz` (a copy of `../shared/parity/svgd_parity.npz`) holds the particles and fields that the authors' unmodified SVGD_VGF class
(ryanxhr/vgf, JAX) produced on a fixed problem (README next to it). `spec_phi` below is an autograd
implementation of REFERENCE.md section 2, steps 1-5, written from the text, not from vgf_prob's closed form:
it is the independent check on problems other than the stored one (other N, odd N*N, other alpha and lr,
more steps, clipping active, ties).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vgf_prob as vgf
from vgf_prob.rl.agent import VGFAgent
from vgf_prob.rl.config import preset

# a copy of shared/parity/svgd_parity.npz (its README beside it), so that a clean clone tests on its own
PARITY_FILE = Path(__file__).resolve().parent / "data" / "svgd_parity.npz"
# a second set from the authors' code: N = 7, A = 4, alpha 0.2, lr 0.3, 6 steps, clipping active (README there)
SECOND_PARITY_FILE = Path(__file__).resolve().parent / "data" / "svgd_parity_2.npz"
ALPHA, LR, STEPS = 0.5, 0.1, 3


@pytest.fixture(scope="module")
def parity() -> dict[str, np.ndarray]:
    with np.load(PARITY_FILE) as data:
        return dict(data)


def parity_heads(obs: torch.Tensor):
    """q1 = -sum((a - 0.3)^2) (1 + 0.1 obs_0), q2 = -sum((a + 0.1)^2), one observation per particle."""

    def value(_: torch.Tensor | None, actions: torch.Tensor) -> torch.Tensor:
        q1 = -(actions - 0.3).square().sum(-1) * (1 + 0.1 * obs[..., 0].to(actions.dtype))
        q2 = -(actions + 0.1).square().sum(-1)
        return torch.stack([q1, q2], -1)

    return value


def operator(field: vgf.SteinField, steps: int, lr: float = LR, aggregation: str = "mean") -> vgf.ValueGradientFlow:
    return vgf.ValueGradientFlow(field, vgf.ParticleAdam(lr), budget=vgf.StepBudget(steps),
                                 projection=vgf.BoxProjection(-1.0, 1.0), aggregation=aggregation)


@pytest.mark.parametrize("aggregation", ["mean", "min"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_stein_step_reproduces_the_authors_particles(parity, aggregation, dtype):
    x0 = torch.tensor(parity["particles0"], dtype=dtype)
    value = parity_heads(torch.tensor(parity["obs"]))
    prefix = "f64_" if aggregation == "mean" else "f64_min_"
    tolerance = 1e-6 if dtype == torch.float64 else 2e-5
    for step in range(1, STEPS + 1):
        particles = operator(vgf.SteinField.paper(ALPHA), step, aggregation=aggregation)(x0, None, value).particles
        expected = torch.tensor(parity[f"{prefix}particles{step}"], dtype=torch.float64)
        error = (particles.double() - expected).abs().max().item()
        assert error < tolerance, f"{aggregation} heads, {dtype}, step {step}: off the authors' particles by {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_stein_field_matches_the_authors_phi(parity, dtype):
    value = vgf.HeadAggregation(parity_heads(torch.tensor(parity["obs"])), "mean")
    field = vgf.SteinField.paper(ALPHA)
    for step in range(STEPS):
        at = torch.tensor(parity["particles0"] if step == 0 else parity[f"f64_particles{step}"], dtype=dtype)
        phi = field(None, at, value).double()
        error = (phi - torch.tensor(parity[f"f64_phi{step}"])).abs().max().item()
        assert error < 5e-5, f"phi at particles{step} ({dtype}) off the authors' by {error:.2e}"


def test_textbook_stein_step_reproduces_the_fixed_bandwidth_loop(parity):
    x0 = torch.tensor(parity["particles0"], dtype=torch.float64)
    value = parity_heads(torch.tensor(parity["obs"]))
    for step in range(1, STEPS + 1):
        particles = operator(vgf.SteinField.textbook(ALPHA), step)(x0, None, value).particles
        error = (particles - torch.tensor(parity[f"stopbw_particles{step}"], dtype=torch.float64)).abs().max().item()
        assert error < 2e-5, f"textbook step {step}: off the authors' fixed-bandwidth loop by {error:.2e}"
    paper = operator(vgf.SteinField.paper(ALPHA), 1)(x0, None, value).particles
    assert (paper - operator(vgf.SteinField.textbook(ALPHA), 1)(x0, None, value).particles).abs().max() > 1e-2


@pytest.mark.parametrize("aggregation", ["mean", "min"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_stein_step_reproduces_a_second_set_of_the_authors_particles(aggregation, dtype):
    with np.load(SECOND_PARITY_FILE) as data:
        stored = dict(data)
    obs = torch.tensor(stored["obs"], dtype=dtype)
    centre1, centre2 = float(stored["centre1"]), float(stored["centre2"])

    def heads(_, actions):
        q1 = -(actions - centre1).square().sum(-1) * (1 + 0.1 * obs[..., 0])
        return torch.stack([q1, -(actions - centre2).square().sum(-1)], -1)

    x0 = torch.tensor(stored["particles0"], dtype=dtype)
    field = vgf.SteinField.paper(float(stored["alpha"]))
    tolerance = 1e-6 if dtype == torch.float64 else 2e-5
    for step in range(1, int(stored["steps"]) + 1):
        particles = operator(field, step, float(stored["lr"]), aggregation)(x0, None, heads).particles
        error = (particles.double() - torch.tensor(stored[f"f64_{aggregation}_particles{step}"])).abs().max().item()
        assert error < tolerance, f"second set, {aggregation} heads, {dtype}, step {step}: off by {error:.2e}"


# ------------------------------------------------------------------------------ the spec, independently
def spec_phi(x: torch.Tensor, score: torch.Tensor, alpha: float, through_bandwidth: bool = True) -> torch.Tensor:
    """REFERENCE.md section 2, steps 1-5, by autograd: phi = (stopgrad(K) score / alpha + grad_K) / N."""
    n = x.shape[-2]
    rows = x.detach().clone().requires_grad_(True)
    y = x.detach()
    # 1. clamped expansion-formula distances to a constant copy: only the row particle is differentiated
    d = (rows.square().sum(-1)[..., :, None] + y.square().sum(-1)[..., None, :] - 2 * rows @ y.mT).clamp_min(0)
    # 2. jnp.median: flatten row-major, stable ascending sort, middle entry or mean of the two middle entries;
    # the order is read off the symmetric matrix (every entry tied with its transpose)
    values = d.detach()
    values = torch.triu(values, 1) + torch.triu(values, 1).mT
    order = torch.sort(values.flatten(-2), dim=-1, stable=True).indices
    count = n * n
    middle = [(count - 1) // 2] if count % 2 else [count // 2 - 1, count // 2]
    median = d.flatten(-2).gather(-1, order[..., middle]).mean(-1)
    if not through_bandwidth:
        median = median.detach()
    # 3. bandwidth and kernel
    h = median / (2 * math.log(n + 1))
    s = torch.sqrt(torch.clamp(h, min=1e-12))
    kernel = torch.exp(-d / (1e-6 + 2 * s[..., None, None] ** 2))
    # 4. grad_K = -d/dX sum_ij K_ij, through d and through s
    (grad_k,) = torch.autograd.grad(-kernel.sum(), rows)
    # 5.
    return (kernel.detach() @ score / alpha + grad_k) / n


def spec_flow(x0, value, alpha, lr, steps, through_bandwidth=True):
    """Fresh Adam (0.9, 0.999, eps 1e-8) on g = -phi, clipped to [-1, 1] after every step."""
    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    for t in range(1, steps + 1):
        leaf = x.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(value(None, leaf).sum(), leaf)
        g = -spec_phi(x, score, alpha, through_bandwidth)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.square()
        x = (x - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)).clamp(-1, 1)
    return x


@pytest.mark.parametrize(
    "n, alpha, lr, steps",
    [(1, 0.3, 0.1, 3), (2, 1.0, 0.05, 4), (3, 0.2, 0.3, 5), (7, 0.05, 0.1, 5), (9, 2.0, 0.2, 6), (11, 0.1, 0.3, 5)],
)
@pytest.mark.parametrize("through_bandwidth", [True, False])
def test_stein_step_matches_an_autograd_reference_of_the_spec(n, alpha, lr, steps, through_bandwidth):
    """Other N (odd N*N), alpha, lr and step counts; large steps so that clipping is active; equal particles."""
    generator = torch.Generator().manual_seed(100 + n)
    x0 = torch.rand(6, n, 4, generator=generator, dtype=torch.float64) * 2 - 1
    x0[0, : min(n, 3)] = x0[0, :1]  # tied distances, and coinciding particles
    x0[1] = x0[1].sign() * 0.97  # near the corners, so that the clip acts
    centre = torch.rand(6, 1, 4, generator=generator, dtype=torch.float64) * 3 - 1.5  # optima outside the box

    def value(_, actions):
        return -(actions - centre).square().sum(-1) - 0.5 * actions[..., 0] * actions[..., 1]

    expected = spec_flow(x0, value, alpha, lr, steps, through_bandwidth)
    flow = operator(vgf.SteinField(alpha, differentiate_bandwidth=through_bandwidth), steps, lr)
    particles = flow(x0, None, value).particles
    assert (particles.abs() == 1).any(), "the problem should drive some particles onto the box"
    error = (particles - expected).abs().max().item()
    assert error < 1e-9, f"N={n}, through_bandwidth={through_bandwidth}: off the spec by {error:.2e}"


# ---------------------------------------------------------------------------------------- the agent
def test_agent_flow_is_the_paper_step_on_the_mean_of_the_online_heads():
    """The D4RL preset's flow (fast critic path) equals the spec loop on mean_k Q_k, and not on min_k Q_k."""
    config = preset("hopper-medium-v2", critic_hidden_dims=(32, 32), bc_hidden_dims=(32, 32), num_particles=7)
    torch.manual_seed(0)
    agent = VGFAgent(5, 3, config, dtype=torch.float64)
    with torch.no_grad():  # heads that disagree, so that mean and min give different flows
        for parameter in agent.critic.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    obs = torch.randn(4, 5, dtype=torch.float64)
    policy, _ = agent.transport(obs, config.train_budget, torch.Generator().manual_seed(1))
    start = agent.reference_particles(obs, config.num_particles, torch.Generator().manual_seed(1))
    heads = lambda _, actions: agent.critic(obs.unsqueeze(-2).expand(*actions.shape[:-1], 5), actions)  # noqa: E731
    by_mean = spec_flow(start, lambda o, a: heads(o, a).mean(-1), config.alpha, config.vgf_lr, config.train_budget)
    by_min = spec_flow(start, lambda o, a: heads(o, a).amin(-1), config.alpha, config.vgf_lr, config.train_budget)
    assert (by_mean - by_min).abs().max() > 1e-3, "the heads should disagree enough to tell mean from min"
    error = (policy.particles - by_mean).abs().max().item()
    assert error < 1e-9, f"the agent's flow is off the paper step on mean heads by {error:.2e}"
