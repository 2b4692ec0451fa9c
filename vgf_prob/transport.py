"""ValueGradientFlow: transport samples of a reference policy toward exp(Q / alpha) under a budget.

    policy = ValueGradientFlow(SteinField(alpha), ParticleAdam(lr), budget=StepBudget(L),
                               projection=BoxProjection(-1, 1))(reference, obs, value, num_particles=N)

draws N particles per state from ``reference`` (a conditional policy, a distribution, a particle tensor
[*B, N, A] or a previous ``ParticlePolicy``, which is how operators chain), integrates ``field`` with
``solver`` while ``budget`` bounds every state's transport, and returns a ``ParticlePolicy`` whose report
says what each state spent. ``with_budget`` gives the same operator with another budget (test-time
scaling without retraining).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution

from vgf_prob.budget import Budget, StepBudget, as_budget, displacement, unlimited_steps_error
from vgf_prob.distributions.particle import ParticlePolicy, TransportReport
from vgf_prob.flows.fields import VelocityField
from vgf_prob.flows.solvers import SolveResult
from vgf_prob.values import HeadAggregation, ValueCallable

Reference = Callable[[Tensor], Distribution] | Distribution | Tensor | ParticlePolicy


@dataclass(frozen=True)
class BoxProjection:
    """Clip particles to the box [low, high] (the action space); ``BoxProjection(-1, 1)`` for normalised actions."""

    low: float | Tensor = -1.0
    high: float | Tensor = 1.0

    def __post_init__(self) -> None:
        if torch.any(torch.as_tensor(self.low) >= torch.as_tensor(self.high)):
            raise ValueError(f"BoxProjection needs low < high, got low={self.low}, high={self.high}")

    def __call__(self, x: Tensor) -> Tensor:
        low, high = self._bounds(x)
        return torch.clamp(x, low, high)

    def outward(self, x: Tensor, velocity: Tensor) -> Tensor:
        low, high = self._bounds(x)
        return ((x >= high) & (velocity > 0)) | ((x <= low) & (velocity < 0))

    def _bounds(self, x: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """The bounds as ``x`` needs them: two Python numbers stay numbers (no host-to-device copy); otherwise
        both become tensors on x's device and dtype (a number by a fill, not a copy)."""
        if not isinstance(self.low, Tensor) and not isinstance(self.high, Tensor):
            return self.low, self.high
        return tuple(b.to(dtype=x.dtype, device=x.device) if isinstance(b, Tensor)
                     else torch.full((), b, dtype=x.dtype, device=x.device) for b in (self.low, self.high))


class _FlowConstraint:
    """Adapts a budget and a projection to the solvers' ``Constraint`` protocol for one flattened batch."""

    def __init__(self, budget: Budget, projection: BoxProjection | None, batch_shape: torch.Size,
                 x0: Tensor, max_steps: int | None) -> None:
        self.budget, self.projection, self.batch_shape = budget, projection, batch_shape
        steps = budget.step_limits(batch_shape, x0)
        if steps is None:
            if max_steps is None:
                raise unlimited_steps_error(budget)
            steps = torch.full((x0.shape[0],), max_steps, dtype=torch.long, device=x0.device)
        elif max_steps is not None:
            steps = steps.clamp_max(max_steps)
        self.steps = steps
        self.uniform_steps = _host_uniform_steps(budget, max_steps)

    def step_allowance(self) -> Tensor:
        return self.steps

    def project(self, x: Tensor) -> Tensor:
        return x if self.projection is None else self.projection(x)

    def enforce(self, x0: Tensor, x_prev: Tensor, x_new: Tensor) -> tuple[Tensor, Tensor]:
        return self.budget.enforce(x0, x_prev, x_new, self.batch_shape)

    def moving(self, x0: Tensor, x: Tensor) -> Tensor:
        return self.budget.moving(x0, x, self.batch_shape)

    def outward_velocity(self, x: Tensor, velocity: Tensor) -> Tensor:
        if self.projection is None:
            return torch.zeros_like(x, dtype=torch.bool)
        return self.projection.outward(x, velocity)


@dataclass(frozen=True)
class ValueGradientFlow:
    """Compose a velocity field, a solver, a budget and a projection into a transport operator.

    ``aggregation`` combines critic heads ("mean" or "min"); ``max_steps`` caps the steps of budgets that
    do not count steps (displacement, Sinkhorn); ``validate`` checks the starting particles for NaN/inf and
    validates the returned `ParticlePolicy`'s arguments (host reads; training loops that validate their
    batches turn it off together with the solver's ``check_finite``, and a step-budget flow then reads
    nothing back from the device). Particles move; the value's parameters never get a gradient.
    """

    field: VelocityField
    solver: Callable[..., SolveResult]
    budget: Budget | int = 1
    projection: BoxProjection | None = None
    aggregation: str = "mean"
    max_steps: int | None = None
    validate: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", as_budget(self.budget))
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be non-negative, got {self.max_steps}")
        HeadAggregation(lambda o, a: a, self.aggregation)

    def with_budget(self, budget: Budget | int) -> ValueGradientFlow:
        """The same operator with another budget (an int means a step count)."""
        return replace(self, budget=as_budget(budget))

    def __call__(
        self,
        reference: Reference,
        obs: Tensor | None,
        value: ValueCallable,
        num_particles: int | None = None,
        generator: torch.Generator | None = None,
    ) -> ParticlePolicy:
        origin, x0 = self._initial_particles(reference, obs, num_particles, generator)
        batch_shape = x0.shape[:-2]
        _check_particles(x0, self.validate)
        flat_obs = _flatten_obs(obs, batch_shape)
        flat_x0 = x0.reshape(-1, *x0.shape[-2:])
        constraint = _FlowConstraint(self.budget, self.projection, batch_shape, flat_x0, self.max_steps)
        aggregated = HeadAggregation(value, self.aggregation)
        result = self.solver(self.field, flat_obs, flat_x0, aggregated, constraint)
        x = result.particles
        spent = {b.name: b.spent(flat_x0, x) for b in self.budget.parts() if b.name != "steps"}
        report = TransportReport(
            steps=result.steps,
            displacement=displacement(flat_x0, x),
            exhausted=result.exhausted,
            budget_spent=spent,
        ).reshape(batch_shape)
        return ParticlePolicy(x.reshape(x0.shape), reference_particles=origin, report=report,
                              validate_args=None if self.validate else False)

    def _initial_particles(
        self, reference: Reference, obs: Tensor | None, num_particles: int | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """(origin of the chain, starting particles [*B, N, A])."""
        if isinstance(reference, ParticlePolicy):
            start = reference.particles.detach()
            origin = reference.reference_particles if reference.reference_particles is not None else start
            return origin, start
        if isinstance(reference, Tensor):
            if reference.dim() < 2:
                raise ValueError(f"particles must have shape [*batch, N, A]; got {tuple(reference.shape)}")
            start = reference.detach()
            return start, start
        if num_particles is None or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int when drawing from a reference; got {num_particles}")
        distribution = reference if isinstance(reference, Distribution) else reference(obs)
        with torch.no_grad():
            if hasattr(distribution, "sample_particles"):
                start = distribution.sample_particles(num_particles, generator=generator)
            else:
                start = distribution.sample((num_particles,)).movedim(0, -2)
        start = start.detach()
        if obs is not None and start.shape[:-2] != obs.shape[:-1]:
            raise ValueError(
                f"the reference drew particles for batch {tuple(start.shape[:-2])} but obs has batch {tuple(obs.shape[:-1])}"
            )
        return start, start


def _host_uniform_steps(budget: Budget, max_steps: int | None) -> int | None:
    """The step count shared by every state when it is known without reading device memory, else None."""
    counts = [part.steps for part in budget.parts() if isinstance(part, StepBudget)]
    if any(isinstance(count, Tensor) for count in counts):
        return None
    if max_steps is not None:
        counts.append(max_steps)
    return int(min(counts)) if counts else None


def _check_particles(x0: Tensor, check_finite: bool) -> None:
    if not x0.is_floating_point():
        raise TypeError(f"particles must be a floating-point tensor, got {x0.dtype}")
    if x0.shape[-2] == 0:
        raise ValueError("a flow needs at least one particle per state; got N = 0")
    if check_finite and not torch.isfinite(x0).all():
        raise ValueError(f"particles contain {(~torch.isfinite(x0)).sum().item()} NaN/inf values")


def _flatten_obs(obs: Tensor | None, batch_shape: torch.Size) -> Tensor | None:
    if obs is None:
        return None
    if obs.shape[:-1] != batch_shape:
        raise ValueError(
            f"obs has batch shape {tuple(obs.shape[:-1])} (shape {tuple(obs.shape)}) but the particles have batch "
            f"shape {tuple(batch_shape)}; expected obs of shape {tuple(batch_shape)} + (obs_dim,)"
        )
    return obs.reshape(-1, obs.shape[-1])
