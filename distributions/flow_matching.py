"""Flow-matching behaviour cloning: a conditional velocity field and the distribution it transports N(0, I) to."""

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS

from .networks import ConditionalMLP, broadcast_lead, check_obs, run_packed_steps

DIVERGENCES = ("auto", "exact", "hutchinson")
MAX_EXACT_DIVERGENCE_DIM = 16


def _check_method(name: str, method: str) -> None:
    if method not in SOLVERS:
        raise ValueError(f"unknown {name} {method!r}; valid torchdiffeq methods: {', '.join(sorted(SOLVERS))}")


def _time_column(t: Tensor, x: Tensor) -> Tensor:
    """``t`` as a ``[..., 1]`` input column next to ``x [..., A]`` (a scalar ``t`` is broadcast)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[:-1] + (1,)) if t.ndim == 0 else t


class FlowMatchingPolicy(nn.Module):
    """Flow-matching BC: v(s, x_t, t) regresses x1 - x0 at x_t = (1 - t) x0 + t x1, x0 ~ N(0, I), t ~ U[0, 1].

    ``policy(obs)`` is the law of x(1) under dx/dt = v(s, x, t), x(0) ~ N(0, I), clipped to the action box
    when ``clip``. ``method="euler"`` integrates with ``num_steps`` hand-written Euler steps (the paper's
    sampler); any other torchdiffeq method goes through ``odeint`` on the grid t = k / num_steps.
    ``density_method`` is the torchdiffeq method used by ``log_prob``; ``ode_options`` are keyword arguments
    for ``odeint`` (defaults ``rtol=atol=1e-5``); ``divergence`` is ``"exact"``, ``"hutchinson"`` or
    ``"auto"`` (exact when ``action_dim <= 16``).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (512, 512, 512, 512),
        num_steps: int = 10,
        method: str = "euler",
        action_low: float | Sequence[float] | Tensor = -1.0,
        action_high: float | Sequence[float] | Tensor = 1.0,
        clip: bool = True,
        ode_options: dict[str, Any] | None = None,
        density_method: str = "dopri5",
        divergence: str = "auto",
    ) -> None:
        super().__init__()
        _check_method("method", method)
        _check_method("density_method", density_method)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        low = torch.as_tensor(action_low, dtype=torch.get_default_dtype()).expand(action_dim).clone()
        high = torch.as_tensor(action_high, dtype=torch.get_default_dtype()).expand(action_dim).clone()
        if not (low < high).all():
            raise ValueError(f"action_low must be < action_high elementwise, got {low.tolist()} and {high.tolist()}")
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.num_steps = num_steps
        self.method = method
        self.density_method = density_method
        self.clip = clip
        self.ode_options = {"rtol": 1e-5, "atol": 1e-5, **(ode_options or {})}
        self.divergence = divergence
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)
        self.velocity_net = ConditionalMLP(obs_dim, action_dim + 1, action_dim, hidden_dims)

    def velocity(self, obs: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """v(s, x, t) through the plain concat path; ``t`` is ``[..., 1]`` or a scalar."""
        return self.velocity_net(obs, torch.cat([x, _time_column(t, x)], dim=-1))

    def velocity_from_context(self, encoded: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """v(s, x, t) from ``encoded = velocity_net.encode_context(obs)`` broadcast against ``x``."""
        return self.velocity_net.forward_from_context(encoded, torch.cat([x, _time_column(t, x)], dim=-1))

    def loss(
        self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None, validate: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-matching MSE between v(s, x_t, t) and x1 - x0 for dataset pairs ``obs [*B, O]``, ``actions [*B, A]``.

        ``validate=False`` skips the NaN/inf check of ``obs`` (no host read; shapes are still checked)."""
        check_obs(obs, self.obs_dim, check_values=validate)
        expected = obs.shape[:-1] + (self.action_dim,)
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {tuple(expected)}, got {tuple(actions.shape)}")
        noise = torch.randn(actions.shape, generator=generator, dtype=actions.dtype, device=actions.device)
        t = torch.rand(expected[:-1] + (1,), generator=generator, dtype=actions.dtype, device=actions.device)
        x_t = torch.lerp(noise, actions, t)
        loss = F.mse_loss(self.velocity(obs, x_t, t), actions - noise)
        return loss, {"flow_matching_loss": loss.detach()}

    def forward(self, obs: Tensor, validate: bool = True) -> "FlowMatchingDistribution":
        """The law of a BC sample at ``obs [*B, O]``; ``validate=False`` skips every check that reads a value
        back to the host (NaN/inf in ``obs``, the distribution's argument and sample validation)."""
        check_obs(obs, self.obs_dim, check_values=validate)
        return FlowMatchingDistribution(self, obs, validate_args=None if validate else False)


class FlowMatchingDistribution(TorchDistribution):
    """Law of x(1) for dx/dt = v(s, x, t), x(0) ~ N(0, I), clipped to the action box when the policy clips.

    ``log_prob`` is the density of the UNCLIPPED flow, by the instantaneous change of variables
    log p(x(1)) = log N(x(0); 0, I) - int_0^1 div_x v(s, x(t), t) dt, integrated backward from t = 1 to 0.
    """

    arg_constraints = {"obs": constraints.real_vector}
    has_rsample = True

    def __init__(self, policy: FlowMatchingPolicy, obs: Tensor, validate_args: bool | None = None) -> None:
        self.policy = policy
        self.obs = obs
        super().__init__(obs.shape[:-1], torch.Size([policy.action_dim]), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        if not self.policy.clip:
            return constraints.real_vector
        low, high = self.policy.action_low.to(self.obs), self.policy.action_high.to(self.obs)
        return constraints.independent(constraints.interval(low, high), 1)

    def expand(
        self, batch_shape: torch.Size, _instance: "FlowMatchingDistribution | None" = None
    ) -> "FlowMatchingDistribution":
        new = self._get_checked_instance(FlowMatchingDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        new.policy = self.policy
        new.obs = self.obs.expand(batch_shape + self.obs.shape[-1:])
        super(FlowMatchingDistribution, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """Integrate fresh N(0, I) noise of shape ``sample_shape + batch_shape + (A,)``; differentiable."""
        noise = torch.randn(self._extended_shape(sample_shape), dtype=self.obs.dtype, device=self.obs.device)
        return self._transport(noise, self.policy.velocity_net.encode_context(self.obs))

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def sample_particles(self, num_particles: int, generator: torch.Generator | None = None) -> Tensor:
        """``[*B, N, A]`` samples; the context is encoded once per state and shared by its particles."""
        shape = self.batch_shape + (num_particles,) + self.event_shape
        with torch.no_grad():
            noise = torch.randn(shape, generator=generator, dtype=self.obs.dtype, device=self.obs.device)
            return self._transport(noise, self.policy.velocity_net.encode_context(self.obs).unsqueeze(-2))

    def _time_grid(self, start: float, end: float) -> Tensor:
        return torch.linspace(start, end, self.policy.num_steps + 1, dtype=self.obs.dtype, device=self.obs.device)

    def _field(self, encoded: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return self.policy.velocity_from_context(encoded, x, t)

    def _transport(self, x: Tensor, encoded: Tensor) -> Tensor:
        policy = self.policy
        if policy.method == "euler":
            lead = broadcast_lead(encoded.shape[:-1], x.shape[:-1])
            packed = policy.velocity_net.packed_pass(x, math.prod(lead))
            if packed is not None:
                x = self._euler_packed(x, encoded, lead, *packed)
            else:
                dt = 1.0 / policy.num_steps
                for t in self._time_grid(0.0, 1.0)[:-1]:
                    x = x.add(policy.velocity_from_context(encoded, x, t), alpha=dt)
        else:
            field = partial(self._field, encoded)
            x = odeint(field, x, self._time_grid(0.0, 1.0), method=policy.method, **policy.ode_options)[-1]
        if policy.clip:
            x = torch.clamp(x, policy.action_low.to(x), policy.action_high.to(x))
        return x

    def _euler_packed(self, x: Tensor, encoded: Tensor, lead: torch.Size, inputs_weight_t: Tensor,
                      steps: list[tuple]) -> Tensor:
        """The Euler loop for a few rows (acting on one state) with the velocity network's oneDNN pass inlined.

        The first layer's input is [x, t]: its time part t_k w_t is added to the encoded state once per step,
        outside the loop, so a step is one small product for x, the packed ops, and the update (the same
        arithmetic as ``velocity_from_context``, up to the order of two additions)."""
        action_dim = x.shape[-1]
        dtype = inputs_weight_t.dtype
        rows, width = math.prod(lead), inputs_weight_t.shape[-1]
        dt = 1.0 / self.policy.num_steps
        times = self._time_grid(0.0, 1.0)[:-1].to(dtype)
        encoded = encoded.to(dtype)
        step_encodings = encoded + times.view(-1, *(1,) * encoded.dim()) * inputs_weight_t[action_dim]
        action_weight_t = inputs_weight_t[:action_dim]
        for encoded_t in step_encodings:
            hidden = encoded_t.expand(*lead, width).reshape(rows, width).addmm(
                x.expand(*lead, action_dim).reshape(rows, action_dim).to(dtype), action_weight_t)
            x = x.add(run_packed_steps(steps, hidden).view(*lead, action_dim), alpha=dt)
        return x

    def log_prob(self, value: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Log-density of the unclipped continuous flow at ``value [..., *B, A]`` (accuracy set by ``ode_options``).

        Uses the exact divergence (one backward per action dimension) or a Hutchinson estimate with one
        Rademacher probe per value held fixed along the path (drawn with ``generator``).
        """
        if self._validate_args:
            self._validate_sample(value)
        policy = self.policy
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape) + self.event_shape
        x1 = value.expand(shape)
        encoded = policy.velocity_net.encode_context(self.obs)
        mode = policy.divergence
        if mode == "auto":
            mode = "exact" if policy.action_dim <= MAX_EXACT_DIVERGENCE_DIM else "hutchinson"
        probe = None
        if mode == "hutchinson":
            probe = torch.randint(0, 2, shape, generator=generator, device=value.device).to(value.dtype) * 2 - 1
        differentiable = torch.is_grad_enabled()

        def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            x = state[0]
            with torch.enable_grad():
                x = x if x.requires_grad else x.detach().requires_grad_()
                v = policy.velocity_from_context(encoded, x, t)
                div = _divergence(v, x, probe, create_graph=differentiable)
            return (v, div) if differentiable else (v.detach(), div.detach())

        start = (x1, x1.new_zeros(shape[:-1]))
        grid = self._time_grid(1.0, 0.0)
        x0, delta = (y[-1] for y in odeint(dynamics, start, grid, method=policy.density_method, **policy.ode_options))
        log_base = -0.5 * x0.square().sum(-1) - 0.5 * policy.action_dim * math.log(2 * math.pi)
        return log_base + delta


def _divergence(v: Tensor, x: Tensor, probe: Tensor | None, create_graph: bool) -> Tensor:
    """div_x v, exactly (one backward per dimension) or as the Hutchinson estimate probe^T (dv/dx) probe."""
    if probe is not None:
        (vjp,) = torch.autograd.grad(v, x, probe, create_graph=create_graph)
        return (vjp * probe).sum(-1)
    diagonal = [
        torch.autograd.grad(v[..., i].sum(), x, create_graph=create_graph, retain_graph=True)[0][..., i]
        for i in range(v.shape[-1])
    ]
    return torch.stack(diagonal, dim=-1).sum(-1)
