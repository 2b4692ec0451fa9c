"""ValueGradientFlow: transport samples of a reference policy toward exp(Q / alpha) under a budget.

    policy = ValueGradientFlow(SteinField(alpha), ParticleAdam(lr), budget=StepBudget(L),
                               projection=BoxProjection(-1, 1))(reference, obs, value, num_particles=N)

draws N particles per state from ``reference`` (a conditional policy, a distribution, a particle tensor
[*B, N, A] or a previous ``ParticlePolicy``, which is how operators chain), integrates ``field`` with
``solver`` while ``budget`` bounds every state's transport, and returns a ``ParticlePolicy`` whose report
says what each state spent. ``with_budget`` gives the same operator with another budget (test-time
scaling without retraining). ``act`` (the flow, then one particle per state chosen by value) and
``next_value`` (the bootstrap term of a TD target) are the two calls another RL codebase needs; critics
written for that codebase are adapted by ``vgf_prob.values.as_value``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from vgf_prob.budget import Budget, StepBudget, as_budget, displacement, unlimited_steps_error
from vgf_prob.cost import CountingValue, count, measure, timed
from vgf_prob.distributions.particle import SELECTION_RULES, ParticlePolicy, TransportReport
from vgf_prob.flows.fields import VelocityField
from vgf_prob.flows.resampling import BoltzmannResampling, ResamplingRun, take_particles
from vgf_prob.flows.solvers import DiscreteSolver, SolveResult
from vgf_prob.validation import is_validation_enabled
from vgf_prob.values import AGGREGATIONS, HeadAggregation, ValueCallable

Reference = Callable[[Tensor], Distribution] | Distribution | Tensor | ParticlePolicy


class BoxProjection:
    """Clip particles to the box [low, high] (the action space), elementwise: x <- min(max(x, low), high).

    ``low`` and ``high`` are Python numbers, numpy arrays or tensors (scalars or one bound per action
    dimension, e.g. ``BoxProjection(env.action_space.low, env.action_space.high)``). Two numbers stay numbers
    (no host-to-device copy); arrays and tensors are moved to the particles' device and dtype once and kept.
    ``BoxProjection(-1, 1)`` is the box of normalised actions.
    """

    def __init__(self, low: float | Tensor | np.ndarray = -1.0, high: float | Tensor | np.ndarray = 1.0) -> None:
        bounds = []
        for name, bound in (("low", low), ("high", high)):
            if isinstance(bound, bool) or not isinstance(bound, (numbers.Real, Tensor, np.ndarray)):
                raise TypeError(f"BoxProjection {name} must be a number, a numpy array or a tensor, got {type(bound).__name__}")
            if isinstance(bound, numbers.Real):
                bounds.append(float(bound))
                continue
            tensor = torch.as_tensor(bound)
            if tensor.dtype == torch.bool or tensor.is_complex():
                raise TypeError(f"BoxProjection {name} must hold real numbers, got dtype {tensor.dtype}")
            bounds.append(tensor.detach())
        lows, highs = (torch.as_tensor(b, dtype=torch.float64, device="cpu") if isinstance(b, float)
                       else b.to(device="cpu", dtype=torch.float64) for b in bounds)
        try:
            ordered = bool((lows < highs).all())
        except RuntimeError:
            raise ValueError(
                f"BoxProjection low {list(lows.shape)} and high {list(highs.shape)} do not broadcast together"
            ) from None
        if torch.isnan(lows).any() or torch.isnan(highs).any() or not ordered:
            raise ValueError(f"BoxProjection needs low < high everywhere, got low={low}, high={high}")
        self.low, self.high = bounds
        self._moved: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"BoxProjection(low={self.low}, high={self.high})"

    def __call__(self, x: Tensor) -> Tensor:
        low, high = self._bounds(x)
        return torch.clamp(x, low, high)

    def outward(self, x: Tensor, velocity: Tensor) -> Tensor:
        low, high = self._bounds(x)
        return ((x >= high) & (velocity > 0)) | ((x <= low) & (velocity < 0))

    def _bounds(self, x: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """The bounds as ``x`` needs them: two Python numbers stay numbers; otherwise both as tensors on x's
        device and dtype, moved on first use and kept (a number is written by a fill, not a copy)."""
        if isinstance(self.low, float) and isinstance(self.high, float):
            return self.low, self.high
        key = (x.device, x.dtype)
        moved = self._moved.get(key)
        if moved is None:
            moved = self._moved[key] = tuple(
                b.to(dtype=x.dtype, device=x.device) if isinstance(b, Tensor)
                else torch.full((), b, dtype=x.dtype, device=x.device) for b in (self.low, self.high))
        return moved


class _FlowConstraint:
    """Adapts a budget and a projection to the solvers' ``Constraint`` protocol for one flattened batch."""

    def __init__(self, budget: Budget, projection: BoxProjection | None, batch_shape: torch.Size,
                 x0: Tensor, max_steps: int | None, resampling: ResamplingRun | None = None) -> None:
        self.budget, self.projection, self.batch_shape = budget, projection, batch_shape
        self.resampling = resampling
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

    def before_step(self, x: Tensor) -> Tensor | None:
        return None if self.resampling is None else self.resampling.before_step(x)


@dataclass(frozen=True)
class ValueGradientFlow:
    """Compose a velocity field, a solver, a budget and a projection into a transport operator.

    ``flow(reference, obs, value, num_particles=N)`` returns the moved cloud as a `ParticlePolicy`;
    ``flow.act(...)`` the action chosen from it, and ``flow.next_value(...)`` the bootstrap term of a TD
    target (REFERENCE.md section 3):

        act:        x^L = flow of N draws of mu(. | s) driven by Q_flow;  a = argmax_i Q_target-agg(s, x_i^L)
        next_value: V(s') = (1/N) sum_i Qbar(s', x_i^L), x^L moved by the ONLINE value, Qbar the target value

    ``aggregation`` combines critic heads for the flow's gradient ("mean": the authors' choice in every
    script); ``target_aggregation`` combines them wherever values are used: the choice of the acted particle
    and the TD target ("min": the authors' D4RL setting; their OGBench scripts take min for antmaze, mean
    elsewhere). ``max_steps`` caps the steps of budgets that do not count steps (displacement, Sinkhorn).
    With validation on (`vgf_prob.validation`) the starting particles are checked for NaN/inf and the returned
    `ParticlePolicy`'s arguments validated (host reads); inside ``vgf_prob.host_reads(False)`` a step-budget
    flow reads nothing back from the device. The starting particles are projected too, so
    every returned particle lies in the box, at L = 0 included. Particles move; the value's parameters never
    get a gradient.

    ``resampling`` (a `BoltzmannResampling`, discrete solvers only) makes the flow sequential Monte Carlo: the
    cloud is weighted by exp(Q / alpha) and resampled before every step, and the result carries the last
    weights as its ``log_weights``. Every result carries its ``cost`` (`vgf_prob.cost`): value and
    value-gradient evaluations counted at the value, reference passes counted in the sampler, wall time.
    """

    field: VelocityField
    solver: Callable[..., SolveResult]
    budget: Budget | int = 1
    projection: BoxProjection | None = None
    aggregation: str = "mean"
    target_aggregation: str = "min"
    max_steps: int | None = None
    resampling: BoltzmannResampling | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", as_budget(self.budget))
        if self.resampling is not None and not isinstance(self.solver, DiscreteSolver):
            raise ValueError(
                f"resampling happens between discrete steps; {type(self.solver).__name__} is not a DiscreteSolver "
                "(use Euler or ParticleAdam)"
            )
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be non-negative, got {self.max_steps}")
        for name in ("aggregation", "target_aggregation"):
            if getattr(self, name) not in AGGREGATIONS:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {AGGREGATIONS}")

    def with_budget(self, budget: Budget | int | float | Tensor) -> ValueGradientFlow:
        """The same operator with another budget (a whole number, or a tensor of them, is a step count)."""
        return replace(self, budget=as_budget(budget))

    def __call__(
        self,
        reference: Reference,
        obs: Tensor | None,
        value: ValueCallable,
        num_particles: int | None = None,
        generator: torch.Generator | None = None,
    ) -> ParticlePolicy:
        return self._transport(reference, obs, value, num_particles, generator)[0]

    def act(
        self,
        reference: Reference,
        obs: Tensor | None,
        value: ValueCallable,
        num_particles: int | None = None,
        *,
        budget: Budget | int | float | Tensor | None = None,
        rule: str = "argmax",
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One action per state, ``[*B, A]``: the flow (under ``budget``, default the operator's), then ``rule``
        over the moved particles scored by ``value`` with heads combined by ``target_aggregation``: ``argmax``
        (how VGF acts), ``softmax`` (probabilities ∝ exp(Q / temperature)) or ``uniform``. ``budget=0`` is
        best-of-N, at any ``num_particles`` per call. No graph is returned."""
        if rule not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTION_RULES}")
        flow = self if budget is None else self.with_budget(budget)
        with timed() as call:
            policy, obs = flow._transport(reference, obs, value, num_particles, generator)
            call.states = policy.batch_shape.numel()
            scores = None if rule == "uniform" else _score(value, obs, policy.particles, self.target_aggregation)
            return policy.select(rule, scores=scores, temperature=temperature, generator=generator)

    def next_value(
        self,
        reference: Reference,
        next_obs: Tensor | None,
        value: ValueCallable,
        target_value: ValueCallable,
        num_particles: int | None = None,
        *,
        budget: Budget | int | float | Tensor | None = None,
        reduction: str = "mean",
        generator: torch.Generator | None = None,
        return_policy: bool = False,
    ) -> Tensor | tuple[Tensor, ParticlePolicy]:
        """V(s') for the TD target y = r + gamma * mask * V(s'), ``[*B]``, without a graph.

        N particles from ``reference`` at ``next_obs`` are moved by the flow of the ONLINE ``value`` (heads by
        ``aggregation``) under ``budget`` (default the operator's: L_train), then scored by ``target_value``
        (the target critic) with heads by ``target_aggregation`` and reduced over particles by ``reduction``:
        ``"mean"`` (the authors'), or ``"max"``. ``return_policy=True`` returns ``(V, moved cloud)``, for logging
        what the flow spent."""
        if reduction not in PARTICLE_REDUCTIONS:
            raise ValueError(f"unknown particle reduction {reduction!r}; expected one of {PARTICLE_REDUCTIONS}")
        flow = self if budget is None else self.with_budget(budget)
        with timed() as call:
            policy, next_obs = flow._transport(reference, next_obs, value, num_particles, generator)
            call.states = policy.batch_shape.numel()
            q = _score(target_value, next_obs, policy.particles, self.target_aggregation)
        v = q.mean(-1) if reduction == "mean" else q.amax(-1)
        return (v, policy) if return_policy else v

    def _transport(
        self,
        reference: Reference,
        obs: Tensor | None,
        value: ValueCallable,
        num_particles: int | None,
        generator: torch.Generator | None,
    ) -> tuple[ParticlePolicy, Tensor | None]:
        """The flow's result (with its `Cost`) and obs as the flow used them (cast to the particles' dtype)."""
        _check_obs(obs)
        with measure() as cost, timed() as call:
            origin, x0 = self._initial_particles(reference, obs, num_particles, generator)
            batch_shape = x0.shape[:-2]
            _check_particles(x0)
            call.states = batch_shape.numel()
            count(particles=x0.shape[:-1].numel())
            obs = _match_obs(obs, x0)
            if self.projection is not None:
                x0 = self.projection(x0)
            origin = x0 if origin is None else origin
            policy = self._solve(obs, x0, origin, value, generator)
        policy.cost = cost
        return policy, obs

    def _solve(self, obs: Tensor | None, x0: Tensor, origin: Tensor, value: ValueCallable,
               generator: torch.Generator | None) -> ParticlePolicy:
        """Run the solver on the flattened batch (with SMC resampling when set) and build the result."""
        batch_shape = x0.shape[:-2]
        flat_obs = _flatten_obs(obs, batch_shape)
        flat_x0 = x0.reshape(-1, *x0.shape[-2:])
        aggregated = CountingValue(HeadAggregation(value, self.aggregation))
        run = None if self.resampling is None else self.resampling.start(flat_obs, flat_x0, aggregated, generator)
        constraint = _FlowConstraint(self.budget, self.projection, batch_shape, flat_x0, self.max_steps, run)
        result = self.solver(self.field, flat_obs, flat_x0, aggregated, constraint)
        x, log_weights, flat_origin = result.particles, None, origin.reshape(flat_x0.shape)
        if run is not None:  # each particle's own origin, and the last weighting's log-weights
            flat_x0, flat_origin = take_particles(flat_x0, run.lineage), take_particles(flat_origin, run.lineage)
            log_weights = run.finish(x).reshape(x0.shape[:-1])
        spent = {b.name: b.spent(flat_x0, x) for b in self.budget.parts() if b.name != "steps"}
        report = TransportReport(
            steps=result.steps,
            displacement=displacement(flat_x0, x),
            exhausted=result.exhausted,
            budget_spent=spent,
        ).reshape(batch_shape)
        return ParticlePolicy(x.reshape(x0.shape), log_weights, reference_particles=flat_origin.reshape(x0.shape),
                              report=report)

    def _initial_particles(
        self, reference: Reference, obs: Tensor | None, num_particles: int | None, generator: torch.Generator | None
    ) -> tuple[Tensor | None, Tensor]:
        """(origin of a chain, or None when the starting particles are the origin; starting particles [*B, N, A])."""
        if isinstance(reference, ParticlePolicy):
            return reference.reference_particles, reference.particles.detach()
        if isinstance(reference, Tensor):
            if reference.dim() < 2:
                raise ValueError(f"particles must have shape [*batch, N, A]; got {tuple(reference.shape)}")
            return None, reference.detach()
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int when drawing from a reference; got {num_particles}")
        if isinstance(reference, Distribution):
            distribution = reference
        else:
            distribution = _call_reference(reference, obs)
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
        return None, start


PARTICLE_REDUCTIONS = ("mean", "max")


def _score(value: ValueCallable, obs: Tensor | None, particles: Tensor, aggregation: str) -> Tensor:
    """Q of every particle, heads by ``aggregation``, ``[*B, N]``, without a graph; counted as value evaluations."""
    with torch.no_grad():
        return CountingValue(HeadAggregation(value, aggregation))(obs, particles)


def _call_reference(reference: Callable[[Tensor], Distribution], obs: Tensor | None) -> Distribution:
    """``reference(obs)``, with floating obs cast to a reference module's dtype; a reference on another device
    than obs, or one that raises, gets a named error."""
    parameter = None
    if isinstance(reference, nn.Module):
        parameter = next((p for p in reference.parameters() if p.is_floating_point()), None)
    if parameter is not None and obs is not None:
        if parameter.device != obs.device:
            raise ValueError(
                f"the reference {type(reference).__name__} has its parameters on {parameter.device} but obs are on "
                f"{obs.device}; move obs (obs.to('{parameter.device}')) or the reference to one device"
            )
        if obs.is_floating_point() and obs.dtype != parameter.dtype:
            obs = obs.to(parameter.dtype)
    try:
        return reference(obs)
    except (RuntimeError, TypeError) as err:
        where = "None" if obs is None else f"{list(obs.shape)} {obs.dtype} on {obs.device}"
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise type(err)(
            f"reference(obs) raised {type(err).__name__}: {first_line} (vgf-prob passed obs {where}); the reference "
            "maps obs [*B, O] to a distribution with batch shape [*B], in the dtype and on the device of its weights"
        ) from err


def _host_uniform_steps(budget: Budget, max_steps: int | None) -> int | None:
    """The step count shared by every state when it is known without reading device memory, else None."""
    counts = [part.steps for part in budget.parts() if isinstance(part, StepBudget)]
    if any(isinstance(count, Tensor) for count in counts):
        return None
    if max_steps is not None:
        counts.append(max_steps)
    return int(min(counts)) if counts else None


def _check_obs(obs: Tensor | None) -> None:
    if obs is None:
        return
    if not isinstance(obs, Tensor):
        raise TypeError(
            f"obs must be a tensor [*B, O] or None, got {type(obs).__name__}; convert it with "
            "torch.as_tensor(obs, device=...) first"
        )
    if obs.dim() == 0:
        raise ValueError("obs must have shape [*B, O]; got a scalar")
    if obs.shape[:-1].numel() == 0:
        raise ValueError(f"empty batch: obs has shape {tuple(obs.shape)}, no states to move particles for")


def _check_particles(x0: Tensor) -> None:
    if not x0.is_floating_point():
        raise TypeError(f"particles must be a floating-point tensor, got {x0.dtype}")
    if x0.shape[-2] == 0:
        raise ValueError("a flow needs at least one particle per state; got N = 0")
    if x0.shape[:-2].numel() == 0:
        raise ValueError(f"empty batch: the particles have shape {tuple(x0.shape)}, no states to move")
    if is_validation_enabled() and not torch.isfinite(x0).all():
        raise ValueError(f"particles contain {(~torch.isfinite(x0)).sum().item()} NaN/inf values")


def _match_obs(obs: Tensor | None, x0: Tensor) -> Tensor | None:
    """obs on the particles' device (else a named error) and, when floating, in their dtype (gymnasium's float64
    observations meet float32 particles)."""
    if obs is None:
        return None
    if obs.device != x0.device:
        raise ValueError(
            f"obs are on {obs.device} but the particles on {x0.device}; move obs to the particles' device "
            f"(obs.to('{x0.device}'))"
        )
    return obs.to(x0.dtype) if obs.is_floating_point() and obs.dtype != x0.dtype else obs


def _flatten_obs(obs: Tensor | None, batch_shape: torch.Size) -> Tensor | None:
    if obs is None:
        return None
    if obs.shape[:-1] != batch_shape:
        raise ValueError(
            f"obs has batch shape {tuple(obs.shape[:-1])} (shape {tuple(obs.shape)}) but the particles have batch "
            f"shape {tuple(batch_shape)}; expected obs of shape {tuple(batch_shape)} + (obs_dim,)"
        )
    return obs.reshape(-1, obs.shape[-1])
