"""Solvers that integrate a velocity field on particle clouds, discretely or in continuous time.

Every solver has one call signature,

    solver(field, obs, x0, value, constraint) -> SolveResult(particles, steps),

so swapping Euler steps for Adam-on-particles or an adaptive ODE solver is a one-line change. The
``constraint`` (built by ``vgf_prob.transport.ValueGradientFlow`` from a budget and a projection) tells
the solver how many steps each state may take and keeps every state inside its budget: a state that has
spent its budget stops moving while the others go on, also inside the ODE solver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS as ODE_METHODS
from torchdiffeq._impl.solvers import FixedGridODESolver

from vgf_prob.validation import host_reads_allowed, is_validation_enabled

from .fields import ValueFn, VelocityField
from .resampling import take_particles

FIXED_GRID_METHODS = frozenset(name for name, cls in ODE_METHODS.items() if issubclass(cls, FixedGridODESolver))
"""torchdiffeq's fixed-grid methods: they step by ``options['step_size']``, which ODESolver sets to its step_size."""


class Constraint(Protocol):
    """What a solver needs to know about budgets and the action box (see ``vgf_prob.transport``)."""

    uniform_steps: int | None
    """The step count every state shares when it is known on the host (no device read), else None."""

    def step_allowance(self) -> Tensor:
        """Steps each state may take, long tensor [B]."""

    def project(self, x: Tensor) -> Tensor:
        """Map particles into the feasible box (elementwise)."""

    def enforce(self, x0: Tensor, x_prev: Tensor, x_new: Tensor) -> tuple[Tensor, Tensor]:
        """Bring x_new back inside each state's budget; return it and a bool [B] of states now exhausted."""

    def moving(self, x0: Tensor, x: Tensor) -> Tensor:
        """Bool [B]: states that have budget left at x (used to freeze states inside an ODE solve)."""

    def outward_velocity(self, x: Tensor, velocity: Tensor) -> Tensor:
        """Bool like x: velocity components that push a particle out of the box."""

    def before_step(self, x: Tensor) -> Tensor | None:
        """Ancestor indices [B, N] to resample the cloud by before the next discrete step (SMC), or None."""


@dataclass
class SolveResult:
    """Final particles [B, N, A], steps taken per state [B] (for an ODE solve its time allowance in step
    units) and the states stopped by a budget's limit [B]."""

    particles: Tensor
    steps: Tensor
    exhausted: Tensor


def check_finite_velocity(velocity: Tensor) -> None:
    """Raise if the field produced NaN/inf (a diverged value or a bad gradient)."""
    if not torch.isfinite(velocity).all():
        bad = (~torch.isfinite(velocity)).sum().item()
        raise FloatingPointError(
            f"the velocity field returned {bad} non-finite values (NaN/inf); check the value function and its "
            "gradient at these particles"
        )


class DiscreteSolver:
    """Shared loop of the step-based solvers: x <- enforce(project(x + update(v))) for the allowed steps.

    States whose allowance ran out or whose budget is exhausted are left exactly where they are. With
    validation on (`vgf_prob.validation`) every velocity is checked for NaN/inf; with host reads allowed the
    loop stops once every state has spent its budget.
    """

    def init_state(self, x0: Tensor) -> dict[str, Tensor]:
        return {}

    def displacement(self, state: dict[str, Tensor], velocity: Tensor, step: int) -> Tensor:
        raise NotImplementedError

    def __call__(
        self, field: VelocityField, obs: Tensor | None, x0: Tensor, value: ValueFn, constraint: Constraint
    ) -> SolveResult:
        allowance = constraint.step_allowance()
        steps = torch.zeros_like(allowance)
        max_steps, uniform = constraint.uniform_steps, True
        if max_steps is None:  # per-state allowances: two host reads before the loop, none inside it
            max_steps = int(allowance.max().item()) if allowance.numel() else 0
            uniform = bool((allowance == max_steps).all().item())
        active = allowance > 0
        reads, checks = host_reads_allowed(), is_validation_enabled()
        exhausted_any = torch.zeros_like(active)
        state = self.init_state(x0)
        x = x0
        for step in range(max_steps):
            if reads and not bool(active.any()):
                break  # every state has spent its budget (a host read)
            ancestors = constraint.before_step(x)
            if ancestors is not None:  # SMC: a particle takes its ancestor's position, origin and solver state
                x, x0 = take_particles(x, ancestors), take_particles(x0, ancestors)
                state = {key: take_particles(moment, ancestors) for key, moment in state.items()}
            velocity = field(obs, x, value)
            if checks:
                check_finite_velocity(velocity)
            proposal = constraint.project(x + self.displacement(state, velocity, step))
            proposal, exhausted = constraint.enforce(x0, x, proposal)
            if not uniform:
                active = active & (step < allowance)
            x = torch.where(active[:, None, None], proposal, x)
            steps = steps + active.long()
            exhausted_any = exhausted_any | (active & exhausted)
            active = active & ~exhausted
        return SolveResult(x, steps, exhausted_any)


class Euler(DiscreteSolver):
    """Explicit Euler steps, the paper's update: x <- x + eps * phi(x)."""

    def __init__(self, step_size: float = 0.01) -> None:
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.step_size = float(step_size)

    def displacement(self, state: dict[str, Tensor], velocity: Tensor, step: int) -> Tensor:
        return self.step_size * velocity


class ParticleAdam(DiscreteSolver):
    """Adam on the particles with fresh moments for every flow (what the VGF authors' code does).

    With g = -phi: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
    x <- x - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). Each step moves about lr per
    coordinate whatever the scale of Q (the first step moves exactly lr * sign(phi) up to eps).
    """

    def __init__(
        self,
        lr: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)

    def init_state(self, x0: Tensor) -> dict[str, Tensor]:
        return {"m": torch.zeros_like(x0), "v": torch.zeros_like(x0)}

    def displacement(self, state: dict[str, Tensor], velocity: Tensor, step: int) -> Tensor:
        beta1, beta2 = self.betas
        state["m"] = torch.lerp(velocity, state["m"], beta1)
        state["v"] = torch.lerp(velocity.square(), state["v"], beta2)
        m_hat = state["m"] / (1.0 - beta1 ** (step + 1))
        v_hat = state["v"] / (1.0 - beta2 ** (step + 1))
        return self.lr * m_hat / (v_hat.sqrt() + self.eps)


class ODESolver:
    """Continuous-time flow dx/dt = phi(x) over t in [0, L * step_size], integrated by torchdiffeq.

    One budget step corresponds to ``step_size`` units of time, so Euler(step_size=h) with L steps and
    ODESolver(step_size=h) with the same budget integrate the same ODE; every fixed-grid method steps by h.
    A state with allowance L_b moves for t in [0, L_b h] exactly: the solve runs to each distinct horizon
    in turn and freezes the states whose horizon is reached (no solver step straddles a horizon). Inside
    the solver a state whose budget is spent has zero velocity, and velocity components pushing a particle
    out of the box are zeroed; the end point is projected and enforced once more.

    torchdiffeq's ``explicit_adams`` (Adams-Bashforth up to order 12) is unstable past a few dozen steps even
    on dx/dt = -x with h = 0.01; ``options={"max_order": 4}`` steadies it.
    """

    def __init__(
        self,
        method: str = "dopri5",
        step_size: float = 0.01,
        rtol: float = 1e-5,
        atol: float = 1e-6,
        options: dict | None = None,
    ) -> None:
        if method not in ODE_METHODS:
            raise ValueError(f"unknown ODE method {method!r}; torchdiffeq offers {sorted(ODE_METHODS)}")
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.method, self.step_size, self.rtol, self.atol = method, float(step_size), rtol, atol
        self.options = dict(options or {})
        if method in FIXED_GRID_METHODS and "step_size" not in self.options:
            self.options["step_size"] = self.step_size

    def __call__(
        self, field: VelocityField, obs: Tensor | None, x0: Tensor, value: ValueFn, constraint: Constraint
    ) -> SolveResult:
        allowance = constraint.step_allowance()
        x = x0
        start = 0
        for stop in _distinct_horizons(allowance, constraint.uniform_steps):
            x = self._segment(field, obs, x0, x, value, constraint, allowance >= stop, start, stop)
            start = stop
        x_end, exhausted = constraint.enforce(x0, x0, constraint.project(x))
        return SolveResult(x_end, allowance.clone(), exhausted | ~constraint.moving(x0, x_end))

    def _segment(self, field: VelocityField, obs: Tensor | None, x0: Tensor, x: Tensor, value: ValueFn,
                 constraint: Constraint, active: Tensor, start: int, stop: int) -> Tensor:
        """Integrate from t = start * h to stop * h; only the ``active`` states [B] move."""
        checks = is_validation_enabled()

        def dynamics(t: Tensor, x: Tensor) -> Tensor:
            velocity = field(obs, x, value)
            if checks:
                check_finite_velocity(velocity)
            moving = active & constraint.moving(x0, x)
            velocity = torch.where(constraint.outward_velocity(x, velocity), 0.0, velocity)
            return velocity * moving[:, None, None].to(velocity.dtype)

        times = torch.tensor([start * self.step_size, stop * self.step_size], dtype=x.dtype, device=x.device)
        return odeint(dynamics, x, times, method=self.method, rtol=self.rtol, atol=self.atol, options=self.options)[-1]


def _distinct_horizons(allowance: Tensor, uniform_steps: int | None) -> list[int]:
    """The positive step allowances, ascending, each once (one host read unless every state shares a count
    known on the host)."""
    if uniform_steps is not None:
        return [uniform_steps] if uniform_steps > 0 else []
    return [h for h in torch.unique(allowance).tolist() if h > 0]
