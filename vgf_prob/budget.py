"""Transport budgets: how far a particle cloud may travel from the reference it started at.

Every budget is enforced per state (a state that has spent its budget stops moving, the others go on),
holds either one limit for all states or a tensor of limits shaped like the batch, and can be swapped at
test time (``ValueGradientFlow.with_budget``). Budgets combine with ``&``: all must hold.

- ``StepBudget(L)``: at most L flow steps (the paper's knob; L = 0 is best-of-N).
- ``DisplacementBudget(r)``: sqrt((1/N) sum_i ||x_i - x_i^0||^2) <= r. Particles keep their identity, so
  this is an exact upper bound on W2(reference cloud, current cloud); it is enforced by radially projecting
  the cloud's displacement onto the ball of radius r (a convex combination of two in-box clouds, so the
  box is kept).
- ``SinkhornBudget(r)``: sqrt(2 S_eps(x^0, x)) <= r, with S_eps geomloss's debiased Sinkhorn divergence for
  the half squared distance; it tends to W2 as blur -> 0. A step that would leave the budget is cut back by
  bisection along the step.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod

import torch
from torch import Tensor

Limit = float | int | Tensor


def _check_limit(name: str, limit: Limit) -> None:
    values = limit if isinstance(limit, Tensor) else torch.tensor(float(limit))
    if not torch.isfinite(values.float()).all():
        raise ValueError(f"{name} must be finite, got {limit}")
    if (values < 0).any():
        raise ValueError(f"{name} must be non-negative, got {limit}")


def _per_state(limit: Limit, batch_shape: torch.Size, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Broadcast a scalar or [*batch] limit to the flattened batch [B].

    A Python number is written on the device by a fill (copying it from the host would make a GPU wait)."""
    dtype = dtype or like.dtype
    if not isinstance(limit, Tensor):
        return torch.full((batch_shape.numel(),), limit, dtype=dtype, device=like.device)
    limits = limit.to(dtype=dtype, device=like.device)
    try:
        return limits.expand(batch_shape).reshape(-1)
    except RuntimeError:
        raise ValueError(
            f"a per-state budget must be a scalar or broadcast to the batch shape {tuple(batch_shape)}; "
            f"got shape {tuple(limits.shape)}"
        ) from None


def displacement(x0: Tensor, x: Tensor) -> Tensor:
    """sqrt((1/N) sum_i ||x_i - x0_i||^2) per state, [B]: an exact upper bound on W2 between the clouds."""
    return (x - x0).square().sum(-1).mean(-1).sqrt()


def _diameter(*clouds: Tensor) -> float:
    """Length of the diagonal of the box holding every point of ``clouds`` (each [B, N, D]), plus 1e-3."""
    extent = torch.cat(clouds, dim=-2)
    return float((extent.amax(dim=(0, 1)) - extent.amin(dim=(0, 1))).norm()) + 1e-3


class Budget(ABC):
    """A per-state constraint on transport. Subclasses measure ``spent`` and ``enforce`` the limit."""

    name: str

    def __and__(self, other: Budget) -> AllOf:
        return AllOf(self, other)

    def parts(self) -> tuple[Budget, ...]:
        return (self,)

    def step_limits(self, batch_shape: torch.Size, like: Tensor) -> Tensor | None:
        """Steps allowed per state ([B], long), or None when this budget does not count steps."""
        return None

    @abstractmethod
    def spent(self, x0: Tensor, x: Tensor) -> Tensor:
        """What a cloud at x has spent of this budget, per state [B], in the units of the limit."""

    def enforce(self, x0: Tensor, x_prev: Tensor, x_new: Tensor, batch_shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Return x_new brought back inside the budget and a bool [B] of states that reached the limit."""
        return x_new, torch.zeros(x_new.shape[0], dtype=torch.bool, device=x_new.device)

    def moving(self, x0: Tensor, x: Tensor, batch_shape: torch.Size) -> Tensor:
        """Bool [B]: states with budget left at x."""
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)


class StepBudget(Budget):
    """At most ``steps`` flow steps per state (an int, or a long tensor shaped like the batch)."""

    name = "steps"

    def __init__(self, steps: Limit) -> None:
        if isinstance(steps, bool) or not isinstance(steps, (numbers.Real, Tensor)):
            raise TypeError(f"StepBudget steps must be a whole number or a tensor of them, got {type(steps).__name__}")
        _check_limit("StepBudget steps", steps)
        if isinstance(steps, Tensor):
            whole = not steps.is_floating_point() or bool((steps == steps.round()).all())
        else:
            whole = float(steps).is_integer()
        if not whole:
            raise ValueError(f"StepBudget steps must be a whole number, got {steps}")
        self.steps = steps

    def step_limits(self, batch_shape: torch.Size, like: Tensor) -> Tensor:
        return _per_state(self.steps, batch_shape, like, dtype=torch.long)

    def spent(self, x0: Tensor, x: Tensor) -> Tensor:
        raise TypeError("steps spent are counted by the solver, not measured from the particles")

    def __repr__(self) -> str:
        return f"StepBudget({self.steps})"


class DisplacementBudget(Budget):
    """sqrt((1/N) sum_i ||x_i - x_i^0||^2) <= radius per state (an exact bound on W2 to the reference)."""

    name = "displacement"

    def __init__(self, radius: Limit) -> None:
        _check_limit("DisplacementBudget radius", radius)
        self.radius = radius

    def spent(self, x0: Tensor, x: Tensor) -> Tensor:
        return displacement(x0, x)

    def enforce(self, x0: Tensor, x_prev: Tensor, x_new: Tensor, batch_shape: torch.Size) -> tuple[Tensor, Tensor]:
        radius = _per_state(self.radius, batch_shape, x_new)
        moved = displacement(x0, x_new)
        scale = torch.where(moved > radius, radius / moved.clamp_min(torch.finfo(x_new.dtype).tiny), 1.0)
        projected = x0 + (x_new - x0) * scale[:, None, None]
        exhausted = moved >= radius * (1.0 - 1e-6)
        return projected, exhausted

    def moving(self, x0: Tensor, x: Tensor, batch_shape: torch.Size) -> Tensor:
        return displacement(x0, x) < _per_state(self.radius, batch_shape, x) * (1.0 - 1e-6)

    def __repr__(self) -> str:
        return f"DisplacementBudget({self.radius})"


class SinkhornBudget(Budget):
    """sqrt(2 S_eps(x^0, x)) <= radius per state, S_eps the debiased Sinkhorn divergence (geomloss).

    ``blur`` is the entropic length scale (S_eps -> W2^2 / 2 as blur -> 0); ``scaling`` the epsilon-scaling
    ratio (closer to 1 is more accurate and slower); ``bisection_steps`` how finely a step that crosses the
    limit is cut back.
    """

    name = "sinkhorn"

    def __init__(self, radius: Limit, blur: float = 0.01, scaling: float = 0.9, bisection_steps: int = 12) -> None:
        _check_limit("SinkhornBudget radius", radius)
        if not blur > 0 or not 0 < scaling < 1:
            raise ValueError(f"SinkhornBudget needs blur > 0 and 0 < scaling < 1; got blur={blur}, scaling={scaling}")
        self.radius, self.blur, self.scaling, self.bisection_steps = radius, blur, scaling, bisection_steps

    def spent(self, x0: Tensor, x: Tensor) -> Tensor:
        return self._distance(x0, x, _diameter(x0, x))

    def _distance(self, x0: Tensor, x: Tensor, diameter: float) -> Tensor:
        """sqrt(2 S_eps(x0, x)) per state, [B]; ``diameter`` (any bound on the clouds' extent) only sets where
        geomloss's epsilon-scaling starts, so its value changes the result by rounding only."""
        from geomloss import SamplesLoss

        loss = SamplesLoss("sinkhorn", p=2, blur=self.blur, scaling=self.scaling, diameter=diameter, backend="tensorized")
        with torch.no_grad():
            divergence = loss(x0.contiguous(), x.contiguous())
        return (2.0 * divergence).clamp_min(0.0).sqrt()

    def enforce(self, x0: Tensor, x_prev: Tensor, x_new: Tensor, batch_shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Keep ``x_new`` where it fits; cut the states that crossed back to x_prev + t (x_new - x_prev), t the
        largest of ``bisection_steps`` halvings that fits. Only the crossing states are re-measured while
        bisecting; every point measured lies in the hull of x0, x_prev and x_new, so one diameter serves all."""
        radius = _per_state(self.radius, batch_shape, x_new)
        diameter = _diameter(x0, x_prev, x_new)
        over = self._distance(x0, x_new, diameter) > radius
        crossing = over.nonzero().squeeze(-1)
        if crossing.numel() == 0:
            return x_new, over
        x0_c, start, radius_c = x0[crossing], x_prev[crossing], radius[crossing]
        step = x_new[crossing] - start
        low = torch.zeros_like(radius_c)
        high = torch.ones_like(radius_c)
        for _ in range(self.bisection_steps):
            middle = (low + high) / 2
            fits = self._distance(x0_c, start + middle[:, None, None] * step, diameter) <= radius_c
            low = torch.where(fits, middle, low)
            high = torch.where(fits, high, middle)
        return x_new.index_copy(0, crossing, start + low[:, None, None] * step), over

    def moving(self, x0: Tensor, x: Tensor, batch_shape: torch.Size) -> Tensor:
        return self.spent(x0, x) < _per_state(self.radius, batch_shape, x) * (1.0 - 1e-6)

    def __repr__(self) -> str:
        return f"SinkhornBudget({self.radius}, blur={self.blur})"


class AllOf(Budget):
    """Several budgets at once: the fewest steps allowed, and each limit enforced in turn."""

    name = "all"

    def __init__(self, *budgets: Budget) -> None:
        if not budgets:
            raise ValueError("AllOf needs at least one budget")
        self.budgets = tuple(part for budget in budgets for part in budget.parts())

    def parts(self) -> tuple[Budget, ...]:
        return self.budgets

    def step_limits(self, batch_shape: torch.Size, like: Tensor) -> Tensor | None:
        limits = [lim for b in self.budgets if (lim := b.step_limits(batch_shape, like)) is not None]
        if not limits:
            return None
        return torch.stack(limits).amin(0)

    def spent(self, x0: Tensor, x: Tensor) -> Tensor:
        raise TypeError("AllOf has no single measure; ask each of its parts()")

    def enforce(self, x0: Tensor, x_prev: Tensor, x_new: Tensor, batch_shape: torch.Size) -> tuple[Tensor, Tensor]:
        exhausted = torch.zeros(x_new.shape[0], dtype=torch.bool, device=x_new.device)
        for budget in self.budgets:
            x_new, part_exhausted = budget.enforce(x0, x_prev, x_new, batch_shape)
            exhausted = exhausted | part_exhausted
        return x_new, exhausted

    def moving(self, x0: Tensor, x: Tensor, batch_shape: torch.Size) -> Tensor:
        moving = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for budget in self.budgets:
            moving = moving & budget.moving(x0, x, batch_shape)
        return moving

    def __repr__(self) -> str:
        return " & ".join(repr(b) for b in self.budgets)


def as_budget(budget: Budget | int | float | Tensor) -> Budget:
    """A Budget passes through; a step count is read as ``StepBudget``: a whole number (``3`` or ``3.0``, as
    ``StepBudget`` itself takes them) or a tensor of per-state counts shaped like the batch."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Real, Tensor)):
        raise TypeError(f"a budget must be a Budget or an int step count (3.0 counts as 3), got {type(budget).__name__}")
    if isinstance(budget, numbers.Real) and not float(budget).is_integer():
        raise ValueError(
            f"a number as a budget is a step count and must be whole, got {budget}; a distance budget is "
            "DisplacementBudget(r) or SinkhornBudget(r)"
        )
    return StepBudget(budget)


def unlimited_steps_error(budget: Budget) -> ValueError:
    return ValueError(
        f"the budget {budget!r} does not bound the number of steps; pass max_steps= to ValueGradientFlow "
        "or combine it with a StepBudget (budget & StepBudget(L))"
    )


__all__ = [
    "AllOf",
    "Budget",
    "DisplacementBudget",
    "SinkhornBudget",
    "StepBudget",
    "as_budget",
    "displacement",
    "unlimited_steps_error",
]
