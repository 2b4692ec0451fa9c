"""Tests for the reference/target distributions in vgf_prob.distributions."""

import copy
import math

import pytest
import torch
from pyro.distributions import TorchDistribution
from torch import Tensor, nn

from vgf_prob import validation_enabled
from vgf_prob.distributions.boltzmann import Boltzmann
from vgf_prob.distributions.flow_matching import FlowMatchingPolicy
from vgf_prob.distributions.gaussian import DiagonalNormal, GaussianPolicy
from vgf_prob.distributions.mixture import MixtureReference
from vgf_prob.distributions.networks import ConditionalMLP

OBS_DIM, ACTION_DIM = 4, 2


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_head_value(obs: Tensor, actions: Tensor) -> Tensor:
    """Two critic heads: -||a - obs[:A]||^2 and a shifted copy; [*B, N, 2]."""
    q = -(actions - obs[..., None, :ACTION_DIM]).square().sum(-1)
    return torch.stack([q, q + actions[..., 0]], dim=-1)


class BoltzmannOverMixture(nn.Module):
    """A conditional policy wrapping the Boltzmann target over a fixed mixture base."""

    def __init__(self) -> None:
        super().__init__()
        self.base = MixtureReference(torch.randn(3, ACTION_DIM), 0.5)

    def forward(self, obs: Tensor) -> Boltzmann:
        return Boltzmann(two_head_value, obs, 0.5, base=self.base(obs), num_proposals=64)


FACTORIES = {
    "gaussian": lambda: GaussianPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16,), action_low=-1.0, action_high=1.0),
    "gaussian_shared_std": lambda: GaussianPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16,), state_dependent_std=False),
    "flow_euler": lambda: FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16, 16), num_steps=4, bound="none"),
    "flow_euler_tanh": lambda: FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16, 16), num_steps=4, bound="tanh"),
    "flow_dopri5_tanh": lambda: FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16, 16), method="dopri5",
                                                   bound="tanh"),
    "flow_rk4_unbounded": lambda: FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16,), num_steps=3, method="rk4",
                                                     bound="none"),
    "mixture": lambda: MixtureReference(torch.randn(3, ACTION_DIM), 0.5),
    "boltzmann": BoltzmannOverMixture,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3)])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_policy_contract(name: str, batch_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    policy = FACTORIES[name]().to(dtype)
    obs = torch.randn(*batch_shape, OBS_DIM, dtype=dtype)
    dist = policy(obs)
    assert isinstance(dist, TorchDistribution)
    assert isinstance(dist.arg_constraints, dict) and isinstance(dist.has_rsample, bool)
    assert dist.batch_shape == batch_shape and dist.event_shape == (ACTION_DIM,)

    sample = dist.sample()
    assert sample.shape == batch_shape + (ACTION_DIM,) and sample.dtype == dtype
    assert dist.sample((4,)).shape == (4,) + batch_shape + (ACTION_DIM,)
    assert dist.support.check(sample).all()
    log_prob = dist.log_prob(sample)
    assert log_prob.shape == batch_shape and log_prob.dtype == dtype and torch.isfinite(log_prob).all()

    particles = dist.sample_particles(7, generator=torch.Generator().manual_seed(1))
    assert particles.shape == batch_shape + (7, ACTION_DIM) and particles.dtype == dtype
    assert torch.equal(particles, dist.sample_particles(7, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(particles, dist.sample_particles(7, generator=torch.Generator().manual_seed(2)))

    expanded = dist.expand((3,) + batch_shape)
    assert type(expanded) is type(dist) and expanded.batch_shape == (3,) + batch_shape
    assert expanded.sample_particles(2).shape == (3,) + batch_shape + (2, ACTION_DIM)
    expanded_log_prob = expanded.log_prob(sample.expand((3,) + sample.shape))
    # each value's density is solved on its own (Newton per row, fixed density grid): only float rounding differs
    torch.testing.assert_close(expanded_log_prob, log_prob.expand((3,) + batch_shape))


@pytest.mark.parametrize("name", ["gaussian", "flow_euler", "flow_dopri5_tanh"])
def test_rsample_is_differentiable(name: str) -> None:
    torch.manual_seed(0)
    policy = FACTORIES[name]()
    dist = policy(torch.randn(3, OBS_DIM))
    assert dist.has_rsample
    dist.rsample((2,)).square().sum().backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("hidden_dims", [(8, 6), ()])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_conditional_mlp_fast_path_matches_plain_path(hidden_dims: tuple[int, ...], layer_norm: bool) -> None:
    torch.manual_seed(0)
    net = ConditionalMLP(5, 3, 2, hidden_dims=hidden_dims, layer_norm=layer_norm).double()
    context, inputs = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 7, 3, dtype=torch.float64)
    fast = net.forward_from_context(net.encode_context(context).unsqueeze(-2), inputs)
    plain = net(context.unsqueeze(-2).expand(4, 7, 5), inputs)
    assert fast.shape == (4, 7, 2)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    assert sum(isinstance(m, nn.LayerNorm) for m in net.modules()) == (len(hidden_dims) if layer_norm else 0)
    for layer in (m for m in net.modules() if isinstance(m, nn.Linear)):
        bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
        assert layer.weight.abs().max() <= bound and torch.all(layer.bias == 0)


def test_conditional_mlp_layer_order() -> None:
    net = ConditionalMLP(2, 1, 1, hidden_dims=(4, 4), layer_norm=True, layer_norm_eps=1e-6)
    kinds = [type(m) for m in [net.first, *net.first_activation, *net.trunk]]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    assert net.first_activation[0].eps == 1e-6


def test_flow_sampling_encodes_context_once(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,), num_steps=5)
    calls = {"encode": 0}
    encode = policy.velocity_net.encode_context

    def counting_encode(context: Tensor) -> Tensor:
        calls["encode"] += 1
        return encode(context)

    def forbidden_plain_path(*args: Tensor) -> Tensor:
        raise AssertionError("sampling must reuse the encoded context")

    monkeypatch.setattr(policy.velocity_net, "encode_context", counting_encode)
    monkeypatch.setattr(policy.velocity_net, "forward", forbidden_plain_path)
    assert policy(torch.randn(3, OBS_DIM)).sample_particles(16).shape == (3, 16, ACTION_DIM)
    assert calls["encode"] == 1


def test_flow_matching_learns_conditional_gaussian() -> None:
    """a | s ~ N(0.3 s, 0.25^2), s in {-1, 1}; the learned flow, integrated accurately, reproduces it.

    The sampling error of 4000 particles is 0.25 / sqrt(4000) ~ 0.004; the rest of the tolerance is the fit of a
    32-unit network after 300 steps (measured over seeds: mean within 0.015, std 0.23-0.24, i.e. flow matching
    slightly under-disperses), hence 0.05 on the mean and 0.04 on the std.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    def batch(size: int) -> tuple[Tensor, Tensor]:
        obs = torch.randint(0, 2, (size, 1), generator=generator).float() * 2 - 1
        return obs, 0.3 * obs + 0.25 * torch.randn(size, 1, generator=generator)

    policy = FlowMatchingPolicy(1, 1, hidden_dims=(32, 32), bound="none")
    held_out = batch(4096)
    initial_loss, _ = policy.loss(*held_out, generator=torch.Generator().manual_seed(9))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 300)
    for _ in range(300):
        loss, _ = policy.loss(*batch(256), generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    final_loss, _ = policy.loss(*held_out, generator=torch.Generator().manual_seed(9))
    assert final_loss < 0.6 * initial_loss  # measured: ~1.2 -> ~0.42, close to this target's irreducible loss

    accurate = FlowMatchingPolicy(1, 1, hidden_dims=(32, 32), bound="none", method="dopri5")
    accurate.load_state_dict(policy.state_dict())
    particles = accurate(torch.tensor([[-1.0], [1.0]])).sample_particles(4000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(particles.mean(dim=(1, 2)), torch.tensor([-0.3, 0.3]), atol=0.05, rtol=0)
    torch.testing.assert_close(particles.std(dim=(1, 2)), torch.tensor([0.25, 0.25]), atol=0.04, rtol=0)


def test_euler_converges_to_dopri5_from_the_same_noise() -> None:
    """Euler's global error is O(1/K): 400 steps land within 2e-3 of dopri5 (measured 6e-4) and beat 50 steps by ~8x."""
    torch.manual_seed(0)
    tight = {"rtol": 1e-9, "atol": 1e-9}
    reference = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, (32, 32), method="dopri5", bound="none", ode_options=tight)
    reference = reference.double()
    obs = torch.randn(3, OBS_DIM, dtype=torch.float64)
    exact = reference(obs).sample_particles(64, torch.Generator().manual_seed(3))
    errors = []
    for num_steps in (50, 400):
        euler = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, (32, 32), num_steps=num_steps, bound="none").double()
        euler.load_state_dict(reference.state_dict())
        approx = euler(obs).sample_particles(64, torch.Generator().manual_seed(3))
        errors.append((approx - exact).abs().max().item())
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 4


def _linear_flow(obs_weight: Tensor, matrix: Tensor, bias: Tensor, **kwargs) -> FlowMatchingPolicy:
    """A flow whose velocity is v(s, x, t) = W_s s + M x + b (no hidden layer, zero time weight)."""
    action_dim, obs_dim = obs_weight.shape
    policy = FlowMatchingPolicy(obs_dim, action_dim, hidden_dims=(), bound="none", **kwargs).double()
    with torch.no_grad():
        weight = torch.cat([obs_weight, matrix, torch.zeros(action_dim, 1, dtype=torch.float64)], dim=1)
        policy.velocity_net.first.weight.copy_(weight)
        policy.velocity_net.first.bias.copy_(bias)
    return policy


def test_euler_sampler_follows_the_paper_time_grid() -> None:
    """K Euler steps x <- x + v(s, x, k / K) / K, k = 0..K-1, checked by hand on v = M x + c + w t with K = 3."""
    generator = torch.Generator().manual_seed(0)
    obs_weight, matrix, bias = (torch.randn(s, generator=generator, dtype=torch.float64) for s in [(2, 3), (2, 2), 2])
    policy = _linear_flow(obs_weight, matrix, bias, num_steps=3)
    time_weight = torch.tensor([1.5, -2.0], dtype=torch.float64)
    with torch.no_grad():
        policy.velocity_net.first.weight[:, -1] = time_weight
    obs = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    x = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for k in range(3):
        x = x + (x @ matrix.T + (obs @ obs_weight.T + bias).unsqueeze(1) + time_weight * k / 3) / 3
    torch.testing.assert_close(policy(obs).sample_particles(6, torch.Generator().manual_seed(5)), x)


def test_linear_flow_sample_and_log_prob_match_closed_form() -> None:
    """dx/dt = M x + c: x(1) = e^M x(0) + M^-1 (e^M - I) c, so x(1) ~ N(M^-1 (e^M - I) c, e^M e^M^T)."""
    generator = torch.Generator().manual_seed(0)
    obs_weight = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    matrix = 0.5 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    tight = {"rtol": 1e-10, "atol": 1e-10}
    policy = _linear_flow(obs_weight, matrix, bias, method="dopri5", ode_options=tight, density_method="dopri5")
    obs = torch.randn(4, 2, generator=generator, dtype=torch.float64)

    transfer = torch.linalg.matrix_exp(matrix)
    shift = torch.linalg.solve(matrix, (transfer - torch.eye(3, dtype=torch.float64)) @ (obs @ obs_weight.T + bias).T).T
    noise = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    particles = policy(obs).sample_particles(5, torch.Generator().manual_seed(7))
    torch.testing.assert_close(particles, noise @ transfer.T + shift.unsqueeze(1))

    closed_form = torch.distributions.MultivariateNormal(shift, covariance_matrix=transfer @ transfer.T)
    points = shift + torch.randn(4, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(policy(obs).log_prob(points), closed_form.log_prob(points), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kwargs", [dict(), dict(method="rk4", density_steps=20)], ids=["euler", "rk4"])
def test_flow_log_prob_normalises_in_one_dimension(kwargs: dict) -> None:
    """log_prob of a random nonlinear 1-D flow integrates to 1 (trapezoid on a fine grid): the Euler map's exact
    discrete density, and the continuous density of the ODE flow."""
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(1, 1, hidden_dims=(16, 16), bound="none", **kwargs).double()
    grid = torch.linspace(-10.0, 10.0, 1601, dtype=torch.float64)
    with torch.no_grad():
        density = policy(torch.zeros(1, dtype=torch.float64)).log_prob(grid.unsqueeze(-1)).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)


def test_flow_log_prob_is_differentiable_in_parameters() -> None:
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,), bound="none", method="rk4", num_steps=4)
    policy(torch.randn(3, OBS_DIM)).log_prob(torch.randn(3, ACTION_DIM)).sum().backward()
    assert all(p.grad is not None for p in policy.parameters())


def test_hutchinson_divergence_agrees_with_exact_in_expectation() -> None:
    """Each of M copies of one action gets its own Rademacher probe; their mean must match the exact value."""
    torch.manual_seed(0)
    kwargs = dict(hidden_dims=(16, 16), bound="none", num_steps=8, method="rk4")
    exact = FlowMatchingPolicy(OBS_DIM, 3, divergence="exact", **kwargs).double()
    hutchinson = FlowMatchingPolicy(OBS_DIM, 3, divergence="hutchinson", **kwargs).double()
    hutchinson.load_state_dict(exact.state_dict())
    obs, action = torch.randn(OBS_DIM, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    with torch.no_grad():
        reference = exact(obs).log_prob(action)
        estimates = hutchinson(obs.expand(4000, OBS_DIM)).log_prob(action, generator=torch.Generator().manual_seed(0))
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert estimates.std() > 1e-4
    assert abs(estimates.mean() - reference) < 4 * standard_error


def test_auto_divergence_switches_to_hutchinson_above_16_dims() -> None:
    torch.manual_seed(0)
    kwargs = dict(hidden_dims=(8,), bound="none", num_steps=2, method="rk4", density_method="euler")
    obs = torch.zeros(8, 1)
    small = FlowMatchingPolicy(1, 16, **kwargs)(obs).log_prob(torch.ones(16))
    large = FlowMatchingPolicy(1, 17, **kwargs)(obs).log_prob(torch.ones(17))
    assert torch.allclose(small, small[0]) and not torch.allclose(large, large[0])


def test_flow_samples_are_clipped_to_the_action_box() -> None:
    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,), action_low=[-1.0, -0.5], action_high=[1.0, 0.5])
    with torch.no_grad():
        policy.velocity_net.trunk[-1].bias.fill_(10.0)
    dist = policy(torch.randn(6, OBS_DIM))
    expected = torch.tensor([1.0, 0.5]).expand(6, 3, 2)
    torch.testing.assert_close(dist.sample_particles(3), expected)
    torch.testing.assert_close(dist.rsample(), expected[:, 0])


def test_gaussian_particles_are_clamped_but_samples_are_exact() -> None:
    policy = GaussianPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,), action_low=-1.0, action_high=1.0)
    with torch.no_grad():
        policy.net[-1].bias[:ACTION_DIM].fill_(5.0)
    dist = policy(torch.randn(10, OBS_DIM))
    assert dist.sample_particles(50).max() == 1.0 and dist.sample().min() > 1.0


@pytest.mark.parametrize("state_dependent_std", [True, False])
def test_gaussian_log_std_is_squashed_into_its_range(state_dependent_std: bool) -> None:
    policy = GaussianPolicy(OBS_DIM, 3, hidden_dims=(8,), state_dependent_std=state_dependent_std).double()
    raw = torch.tensor([-100.0, 0.0, 100.0], dtype=torch.float64)
    with torch.no_grad():
        if state_dependent_std:
            policy.net[-1].weight[3:].zero_()
            policy.net[-1].bias[3:].copy_(raw)
        else:
            policy.log_std.copy_(raw)
    std = policy(torch.randn(5, OBS_DIM, dtype=torch.float64)).base_dist.scale
    expected = torch.tensor([-5.0, -1.5, 2.0], dtype=torch.float64).exp().expand(5, 3)
    torch.testing.assert_close(std, expected)


def test_gaussian_loss_is_negative_log_likelihood() -> None:
    torch.manual_seed(0)
    policy = GaussianPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,))
    obs, actions = torch.randn(5, OBS_DIM), torch.randn(5, ACTION_DIM)
    loss, info = policy.loss(obs, actions)
    dist = policy(obs)
    by_hand = -torch.distributions.Normal(dist.base_dist.loc, dist.base_dist.scale).log_prob(actions).sum(-1).mean()
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(info["nll"], by_hand.detach())


def test_mixture_log_prob_matches_hand_computed_value() -> None:
    means = [[0.0, 0.0], [1.0, 2.0]]
    scales = [[1.0, 1.0], [0.5, 2.0]]
    weights = [0.3, 0.7]
    reference = MixtureReference(means, scales, logits=torch.tensor(weights).log())
    x = (0.5, 1.0)

    def normal_pdf(v: float, m: float, s: float) -> float:
        return math.exp(-0.5 * ((v - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    density = sum(w * normal_pdf(x[0], m[0], s[0]) * normal_pdf(x[1], m[1], s[1])
                  for w, m, s in zip(weights, means, scales))
    dist = reference(torch.zeros(3, 5, dtype=torch.float64))
    log_prob = dist.log_prob(torch.tensor(x, dtype=torch.float64))
    torch.testing.assert_close(log_prob, torch.full((3,), math.log(density), dtype=torch.float64))

    particles = dist.sample_particles(20000, torch.Generator().manual_seed(0))
    # mixture mean (0.7, 1.4); per-coordinate std < 2, so 20000 draws give a standard error < 0.015
    expected_mean = torch.tensor([0.7, 1.4], dtype=torch.float64).expand(3, 2)
    torch.testing.assert_close(particles.mean(1), expected_mean, atol=0.05, rtol=0)


def test_mixture_particles_keep_each_component_scale() -> None:
    """Well-separated components: the particles near each mean have that component's scale and weight."""
    reference = MixtureReference([[-5.0], [5.0]], [[0.1], [1.0]], logits=torch.tensor([0.25, 0.75]).log())
    particles = reference(torch.zeros(1)).sample_particles(20000, torch.Generator().manual_seed(0))[:, 0]
    left, right = particles[particles < 0], particles[particles > 0]
    assert len(left) / len(particles) == pytest.approx(0.25, abs=0.02)
    assert left.std().item() == pytest.approx(0.1, rel=0.05) and right.std().item() == pytest.approx(1.0, rel=0.05)


def test_boltzmann_log_prob_is_q_over_alpha_plus_base() -> None:
    torch.manual_seed(0)
    obs = torch.randn(2, 3, OBS_DIM)
    base = MixtureReference(torch.randn(3, ACTION_DIM), 0.7)(obs)
    particles = torch.randn(2, 3, 5, ACTION_DIM)
    heads = two_head_value(obs, particles)
    base_log_prob = base.log_prob(particles.movedim(-2, 0)).movedim(0, -1)

    with_base = Boltzmann(two_head_value, obs, 0.25, base=base)
    torch.testing.assert_close(with_base.particle_log_prob(particles), heads.mean(-1) / 0.25 + base_log_prob)
    single = with_base.log_prob(particles[..., 0, :])
    torch.testing.assert_close(single, heads[..., 0, :].mean(-1) / 0.25 + base_log_prob[..., 0])

    minimum = Boltzmann(two_head_value, obs, 0.25, aggregation="min", action_dim=ACTION_DIM)
    torch.testing.assert_close(minimum.particle_log_prob(particles), heads.amin(-1) / 0.25)
    single_head = Boltzmann(lambda o, a: two_head_value(o, a)[..., 0], obs, 2.0, action_dim=ACTION_DIM)
    torch.testing.assert_close(single_head.particle_log_prob(particles), heads[..., 0] / 2.0)


def test_boltzmann_sir_recovers_the_product_gaussian() -> None:
    """Q = -||a - c||^2 / 2, alpha = 0.5, mu = N(m, I): pi* = N((2c + m) / 3, I / 3).

    20000 proposals keep an effective sample size above ~5000, and 20000 resampled particles add their own
    noise: the standard error of each mean is < 0.6 * sqrt(1/5000 + 1/20000) ~ 0.01, so 0.05 is 5 of them.
    """
    obs = torch.tensor([[0.5, -0.5], [-1.0, 1.0], [0.0, 0.0]])
    base_mean = torch.tensor([[0.0, 0.5], [0.0, 0.0], [1.0, -1.0]])
    base = DiagonalNormal(base_mean, torch.ones(3, 2))

    def quadratic(obs: Tensor, actions: Tensor) -> Tensor:
        return -0.5 * (actions - obs.unsqueeze(-2)).square().sum(-1)

    target = Boltzmann(quadratic, obs, 0.5, base=base, num_proposals=20000)
    particles = target.sample_particles(20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(particles.mean(1), (2 * obs + base_mean) / 3, atol=0.05, rtol=0)
    torch.testing.assert_close(particles.std(1), torch.full((3, 2), 3**-0.5), atol=0.05, rtol=0)


def test_method_names_are_validated() -> None:
    with pytest.raises(ValueError, match="'rk5'.*dopri5"):
        FlowMatchingPolicy(OBS_DIM, ACTION_DIM, method="rk5")
    with pytest.raises(ValueError, match="density_method.*euler"):
        FlowMatchingPolicy(OBS_DIM, ACTION_DIM, method="rk4", density_method="exact")
    with pytest.raises(ValueError, match="density_method apply to ODE samplers only"):
        FlowMatchingPolicy(OBS_DIM, ACTION_DIM, density_method="rk4")
    with pytest.raises(ValueError, match="bound must be one of"):
        FlowMatchingPolicy(OBS_DIM, ACTION_DIM, bound="clamp")
    with pytest.raises(ValueError, match="divergence"):
        FlowMatchingPolicy(OBS_DIM, ACTION_DIM, method="rk4", divergence="skilling")


@pytest.mark.parametrize("name", ["gaussian", "flow_euler"])
def test_bad_observations_raise(name: str) -> None:
    policy = FACTORIES[name]()
    with pytest.raises(ValueError, match=r"last dimension 4, got shape \(2, 3\)"):
        policy(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"last dimension 4, got shape \(2, 5\)"):
        policy.loss(torch.zeros(2, 5), torch.zeros(2, ACTION_DIM))
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 2\), got \(2, 3\)"):
        policy.loss(torch.zeros(2, OBS_DIM), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        policy(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        Boltzmann(two_head_value, torch.full((2, OBS_DIM), float("nan")), 1.0, action_dim=ACTION_DIM)
    with pytest.raises(ValueError, match="floating-point"):
        policy(torch.zeros(2, OBS_DIM, dtype=torch.long))


def test_boltzmann_errors() -> None:
    """Validation errors, with validation on: another library (torchrl, torch.compile) may have switched torch's
    process-wide default off before this test runs."""
    with validation_enabled(True):
        obs = torch.zeros(3, OBS_DIM)
        target = Boltzmann(two_head_value, obs, 1.0, action_dim=ACTION_DIM)
        with pytest.raises(NotImplementedError, match="base/proposal"):
            target.sample()
        with pytest.raises(NotImplementedError, match="base/proposal"):
            target.sample_particles(4)
        with pytest.raises(ValueError, match="event_shape"):
            target.log_prob(torch.zeros(3, 3))
        with pytest.raises(ValueError, match="to be within the support"):
            target.log_prob(torch.tensor([[0.0, float("nan")]]).expand(3, 2))
        with pytest.raises(ValueError, match=r"particles must have shape \(3,\) \+ \(N, 2\)"):
            target.particle_log_prob(torch.zeros(4, 3, ACTION_DIM))
        with pytest.raises(ValueError, match="value must return"):
            Boltzmann(lambda o, a: a[..., 0, 0], obs, 1.0, action_dim=ACTION_DIM).particle_log_prob(
                torch.zeros(3, 4, ACTION_DIM))
        with pytest.raises(ValueError, match="base distribution or action_dim"):
            Boltzmann(two_head_value, obs, 1.0)
        with pytest.raises(ValueError, match="alpha must be a positive scalar"):
            Boltzmann(two_head_value, obs, 0.0, action_dim=ACTION_DIM)
        with pytest.raises(ValueError, match="aggregation"):
            Boltzmann(two_head_value, obs, 1.0, aggregation="max", action_dim=ACTION_DIM)
        with pytest.raises(ValueError, match="batch_shape"):
            Boltzmann(two_head_value, obs, 1.0, base=MixtureReference(torch.zeros(2, ACTION_DIM), 1.0)(torch.zeros(4, 1)))


def test_mixture_errors() -> None:
    with pytest.raises(ValueError, match=r"means must have shape \[K, A\]"):
        MixtureReference(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="scales must be a scalar or of shape"):
        MixtureReference(torch.zeros(3, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="scales must be positive"):
        MixtureReference(torch.zeros(3, 2), 0.0)
    with pytest.raises(ValueError, match=r"logits must have shape \[3\]"):
        MixtureReference(torch.zeros(3, 2), 1.0, logits=torch.zeros(2))


# ------------------------------------------------------------------------- flow-matching: density of the sampler


def _euler_linear_law(obs_weight: Tensor, matrix: Tensor, bias: Tensor, time_weight: Tensor, obs: Tensor,
                      steps: int) -> torch.distributions.MultivariateNormal:
    """Law of K Euler steps of v = M x + c + w t from x_0 ~ N(0, I), by hand: x_{k+1} = (I + M/K) x_k + (c + w k/K)/K
    is affine, so x_K = P x_0 + q with P = (I + M/K)^K is N(q, P P^T)."""
    step = torch.eye(matrix.shape[0], dtype=matrix.dtype) + matrix / steps
    shift = torch.zeros(obs.shape[0], matrix.shape[0], dtype=matrix.dtype)
    for k in range(steps):
        shift = shift @ step.T + (obs @ obs_weight.T + bias + time_weight * k / steps) / steps
    transfer = torch.linalg.matrix_power(step, steps)
    return torch.distributions.MultivariateNormal(shift, covariance_matrix=transfer @ transfer.T)


def test_euler_log_prob_is_the_density_of_the_euler_samples() -> None:
    """For v = M x + c + w t the Euler sampler's law is Gaussian in closed form (not the ODE's e^M): log_prob must
    equal that Gaussian, and the samples must have its mean and covariance."""
    generator = torch.Generator().manual_seed(0)
    obs_weight = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    matrix = torch.tensor([[2.0, 0.5], [-0.3, 1.0]], dtype=torch.float64)  # steep: Euler's law is far from e^M's
    bias = torch.randn(2, generator=generator, dtype=torch.float64)
    time_weight = torch.tensor([1.5, -2.0], dtype=torch.float64)
    policy = _linear_flow(obs_weight, matrix, bias, num_steps=10)
    with torch.no_grad():
        policy.velocity_net.first.weight[:, -1] = time_weight
    obs = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    law = _euler_linear_law(obs_weight, matrix, bias, time_weight, obs, 10)
    dist = policy(obs)
    points = law.sample((6,))
    torch.testing.assert_close(dist.log_prob(points), law.log_prob(points), rtol=1e-10, atol=1e-10)
    samples = dist.sample((20000,))
    torch.testing.assert_close(samples.mean(0), law.mean, atol=0.1 * law.stddev.max().item(), rtol=0)
    covariance = torch.einsum("sbi,sbj->bij", samples - law.mean, samples - law.mean) / 20000
    torch.testing.assert_close(covariance, law.covariance_matrix, rtol=0.05, atol=0.05 * law.variance.max().item())


def test_euler_log_prob_of_a_steep_1d_field() -> None:
    """v = 2x, 10 Euler steps: x_K = 1.2^10 x_0 (std 6.19, where the ODE would give e^2 = 7.39)."""
    policy = _linear_flow(torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64), num_steps=10)
    dist = policy(torch.zeros(1, dtype=torch.float64))
    scale = 1.2**10
    grid = torch.linspace(-20, 20, 9, dtype=torch.float64).unsqueeze(-1)
    expected = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), scale).log_prob(grid[:, 0])
    torch.testing.assert_close(dist.log_prob(grid), expected, rtol=1e-12, atol=1e-12)
    assert dist.sample((4000,)).std().item() == pytest.approx(scale, rel=0.05)


@pytest.mark.parametrize("kwargs", [dict(), dict(method="rk4", density_steps=8)], ids=["euler", "rk4"])
def test_flow_log_prob_of_a_value_does_not_depend_on_its_batch_mates(kwargs: dict) -> None:
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16, 16), bound="none", **kwargs).double()
    obs = torch.randn(OBS_DIM, dtype=torch.float64)
    values = 2 * torch.randn(9, ACTION_DIM, dtype=torch.float64)
    together = policy(obs.expand(9, OBS_DIM)).log_prob(values)
    alone = torch.stack([policy(obs).log_prob(v) for v in values])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(bound="none"), dict(bound="tanh"), dict(bound="none", method="rk4")],
                         ids=["euler", "euler-tanh", "rk4"])
def test_rsample_and_log_prob_agree_with_log_prob(kwargs: dict) -> None:
    """One pass gives (x, log p(x)); log_prob of a copy of x (inverted from scratch) gives the same number, and
    log_prob of the last rsample's own output (for Euler its cached path) the same number and the same pathwise
    gradient d/dtheta log q_theta(x_theta(eps)) as rsample_and_log_prob from the same noise (a reparameterised
    ELBO's)."""
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16, 16), **kwargs).double()
    dist = policy(torch.randn(3, OBS_DIM, dtype=torch.float64))
    weight = policy.velocity_net.first.weight
    torch.manual_seed(1)
    x, log_p = dist.rsample_and_log_prob((2,))
    assert x.shape == (2, 3, ACTION_DIM) and log_p.shape == (2, 3)
    tol = dict(rtol=1e-6, atol=1e-6) if "method" in kwargs else dict(rtol=1e-9, atol=1e-9)  # rk4: density ODE vs map
    torch.testing.assert_close(dist.log_prob(x.detach().clone()), log_p, **tol)
    (one_pass,) = torch.autograd.grad(log_p.sum(), weight)
    torch.manual_seed(1)
    sample = dist.rsample((2,))
    torch.testing.assert_close(sample, x)
    cached = dist.log_prob(sample)
    torch.testing.assert_close(cached, log_p, **tol)
    (pathwise,) = torch.autograd.grad(cached.sum(), weight)
    # Euler: the same path, the same gradient; rk4: a backward density solve against a forward one
    grad_tol = dict(rtol=1e-3, atol=1e-4) if "method" in kwargs else tol
    torch.testing.assert_close(pathwise, one_pass, **grad_tol)


def test_euler_log_prob_gradients_match_finite_differences() -> None:
    """d log p / d value (used by NUTS) and d log p / d theta (maximum likelihood) through the Newton inversion."""
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(16, 16), bound="none").double()
    obs = torch.randn(OBS_DIM, dtype=torch.float64)
    value = torch.randn(ACTION_DIM, dtype=torch.float64, requires_grad=True)
    (grad_value,) = torch.autograd.grad(policy(obs).log_prob(value), value)
    weight = policy.velocity_net.trunk[0].weight
    (grad_weight,) = torch.autograd.grad(policy(obs).log_prob(value.detach()), weight)
    eps = 1e-6
    for i in range(ACTION_DIM):
        step = torch.zeros(ACTION_DIM, dtype=torch.float64)
        step[i] = eps
        with torch.no_grad():
            numeric = (policy(obs).log_prob(value + step) - policy(obs).log_prob(value - step)) / (2 * eps)
        assert grad_value[i].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-7)
    with torch.no_grad():
        weight[0, 0] += eps
        up = policy(obs).log_prob(value)
        weight[0, 0] -= 2 * eps
        down = policy(obs).log_prob(value)
        weight[0, 0] += eps
    assert grad_weight[0, 0].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-5, abs=1e-7)


def test_euler_log_prob_refuses_a_folding_step() -> None:
    """v = -20 x with 10 steps: each step multiplies by 1 - 2 = -1 (det < 0), the map is not orientation-preserving."""
    policy = _linear_flow(torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), -20.0, dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64), num_steps=10)
    with pytest.raises(ValueError, match="not invertible.*num_steps"):
        policy(torch.zeros(1, dtype=torch.float64)).log_prob(torch.ones(1, dtype=torch.float64))


def test_clipped_flow_has_no_density_and_says_what_to_use() -> None:
    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,))
    dist = policy(torch.randn(3, OBS_DIM))
    sample = dist.sample()
    assert dist.support.check(sample).all()
    with pytest.raises(NotImplementedError, match="bound='tanh'"):
        dist.log_prob(sample)
    with pytest.raises(NotImplementedError, match="bound='tanh'"):
        dist.rsample_and_log_prob()


def test_tanh_flow_stays_in_the_box_and_its_density_normalises() -> None:
    """a = c + h tanh(z) on the box [-0.5, 1.5]: samples inside, density integrates to 1 over the box, and the BC
    target of an action is z = atanh((a - c) / h)."""
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(1, 1, hidden_dims=(16, 16), bound="tanh", action_low=-0.5, action_high=1.5).double()
    dist = policy(torch.zeros(1, dtype=torch.float64))
    samples = dist.sample((2000,))
    assert samples.min() > -0.5 and samples.max() < 1.5
    grid = torch.linspace(-0.5, 1.5, 4001, dtype=torch.float64)[1:-1]
    with torch.no_grad():
        density = dist.log_prob(grid.unsqueeze(-1)).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=2e-3)
    actions = torch.tensor([[-0.5], [0.5], [1.0]], dtype=torch.float64)
    expected = torch.atanh(torch.tensor([[-1 + 1e-6], [0.0], [0.5]], dtype=torch.float64))
    torch.testing.assert_close(policy.flow_target(actions), expected)


def test_flow_distribution_is_a_snapshot_of_the_parameters() -> None:
    """Built inside functional_call it uses the substituted parameters; an in-place change after it was built is
    an error; copies (deepcopy, pyro's deep_to) evaluate their own tensors and leave the policy alone."""
    from pyro.distributions.util import deep_to

    torch.manual_seed(0)
    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,), bound="none")
    other = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,), bound="none")
    obs = torch.randn(3, OBS_DIM)
    values = torch.randn(3, ACTION_DIM)
    substituted = {f"velocity_net.{k}": v for k, v in other.velocity_net.named_parameters()}
    built_inside = torch.func.functional_call(policy, substituted, (obs,))
    torch.testing.assert_close(built_inside.log_prob(values), other(obs).log_prob(values))
    draw = built_inside.sample_particles(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw, other(obs).sample_particles(5, torch.Generator().manual_seed(0)))

    dist = policy(obs)
    reference = dist.log_prob(values)
    as_double = deep_to(dist, torch.float64)
    assert policy.velocity_net.first.weight.dtype == torch.float32
    torch.testing.assert_close(as_double.log_prob(values.double()), reference.double(), rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(dist)
    with torch.no_grad():
        policy.velocity_net.first.weight.add_(1.0)
    torch.testing.assert_close(copied.log_prob(values), reference)
    with pytest.raises(RuntimeError, match="changed in place.*policy\\(obs\\)"):
        dist.log_prob(values)


def test_flow_moments_say_how_to_estimate_them() -> None:
    dist = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,), bound="none")(torch.randn(2, OBS_DIM))
    for name in ("mean", "variance"):
        with pytest.raises(NotImplementedError, match=r"dist.sample\(\(n,\)\)"):
            getattr(dist, name)
    with pytest.raises(NotImplementedError, match="rsample_and_log_prob"):
        dist.entropy()


def test_policy_observes_pyro_validation_switch() -> None:
    import pyro

    policy = FlowMatchingPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,))
    nan_obs = torch.full((2, OBS_DIM), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        policy(nan_obs)
    with pytest.raises(ValueError, match="NaN"):
        GaussianPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,))(nan_obs)
    with pyro.validation_enabled(False):
        assert policy(nan_obs).batch_shape == (2,)
        assert GaussianPolicy(OBS_DIM, ACTION_DIM, hidden_dims=(8,))(nan_obs).batch_shape == (2,)


# ---------------------------------------------------------------------------------------------- Boltzmann


def test_boltzmann_log_prob_scores_each_sample_against_its_own_state() -> None:
    """sample((k,)) with k = the batch size: value [i, j] belongs to state j (pyro's layout), never to state i."""
    torch.manual_seed(0)
    obs = torch.randn(3, OBS_DIM)
    base = MixtureReference(torch.randn(3, ACTION_DIM), 0.7)(obs)
    target = Boltzmann(two_head_value, obs, 0.5, base=base, num_proposals=32)
    samples = target.sample((3,))
    assert samples.shape == (3, 3, ACTION_DIM)
    by_hand = torch.empty(3, 3)
    for i in range(3):
        for j in range(3):
            q = two_head_value(obs[j], samples[i, j].view(1, ACTION_DIM)).mean(-1)[0]
            by_hand[i, j] = q / 0.5 + base.log_prob(samples[i, j])[j]
    torch.testing.assert_close(target.log_prob(samples), by_hand)
    broadcast = target.log_prob(samples[:, :1])  # a batch dim of size 1 broadcasts against the states
    assert broadcast.shape == (3, 3)


def test_boltzmann_samples_are_independent_draws() -> None:
    """Each draw resamples its own pool of proposals: 2000 draws from a continuous base are all distinct (one
    shared pool of 64 would give at most 64 distinct values), and their moments match the product Gaussian
    N((2c + m) / 3, I / 3) of Q = -||a - c||^2 / 2, alpha = 0.5, mu = N(m, I)."""
    obs = torch.tensor([[0.5, -0.5]])
    base = DiagonalNormal(torch.tensor([[0.0, 0.5]]), torch.ones(1, 2))

    def quadratic(obs: Tensor, actions: Tensor) -> Tensor:
        return -0.5 * (actions - obs.unsqueeze(-2)).square().sum(-1)

    torch.manual_seed(0)
    draws = Boltzmann(quadratic, obs, 0.5, base=base, num_proposals=64).sample((2000,))
    assert draws.unique(dim=0).shape[0] == 2000
    # SIR with 64 proposals is biased by O(1/64); 2000 draws add a standard error of ~0.013
    torch.testing.assert_close(draws.mean(0), (2 * obs + base.base_dist.loc) / 3, atol=0.06, rtol=0)


# ---------------------------------------------------------------------------------------------- particles


def test_particle_policy_scores_vectorised_values_and_enumerates_its_particles() -> None:
    from vgf_prob.distributions import ParticlePolicy, TransportReport

    particles = torch.randn(2, 4, 3)
    log_weights = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    report = TransportReport(torch.ones(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool), {"w2": torch.ones(2)})
    policy = ParticlePolicy(particles, log_weights, report=report, validate_args=True)
    assert policy.support.event_dim == 1 and policy.sample([5, 2]).shape == (5, 2, 2, 3)
    support = policy.enumerate_support()
    assert support.shape == (4, 2, 3)
    expected = torch.softmax(log_weights, -1).T  # [N, B]: the weight of particle i in state b
    torch.testing.assert_close(policy.log_prob(support).exp(), expected)
    assert policy.log_prob(torch.zeros(7, 2, 3)).eq(-math.inf).all()
    expanded = policy.expand((5, 2))
    assert expanded.report.steps.shape == (5, 2) and expanded.report.budget_spent["w2"].shape == (5, 2)
    assert expanded._validate_args is True
    with pytest.raises(ValueError, match="distinct particles"):
        ParticlePolicy(torch.zeros(1, 2, 3)).enumerate_support()
