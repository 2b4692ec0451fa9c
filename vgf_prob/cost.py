"""What a flow costs: counters filled where the work happens, and critic-pass equivalents.

Every count is in rows, one row being one (state, particle) pair through a network:

- ``value_evaluations``: rows through the value (critic) without a backward pass (scoring, target values,
  SMC weights);
- ``value_gradient_evaluations``: rows through the value whose backward pass to the actions ran (the flow's
  field); a forward is counted as an evaluation when it runs and moves to this counter when its backward runs;
- ``reference_passes``: rows through the reference network (one flow-matching BC Euler step of one particle
  is one pass; an ODE sampler counts every evaluation of its velocity);
- ``particles``: particles drawn or moved (N per state per flow);
- ``states``: states served (actions chosen, or clouds moved) by the outermost timed calls;
- ``wall_s``: host wall time of the outermost timed calls (on CUDA, synchronise before reading it);
- ``cpu_s``: this process's CPU time in those calls (with one torch thread, the work without the waits for other
  processes: the number to compare on a shared machine).

**Critic-pass equivalents** put them on one axis: a reference pass is 1, a value evaluation 1, a value-gradient
evaluation 2 (a forward and a backward),

    passes = reference_passes + value_evaluations + 2 * value_gradient_evaluations,

so best-of-N with a K-step BC sampler costs N (K + 1) per action and VGF adds 2 N per flow step. Kernel
arithmetic (the Stein field's N x N matrices) is not a network pass: it shows in ``wall_s`` only.

    with measure() as cost:
        agent.act(obs)
    cost.per_state()  # {"passes": ..., "ms": ..., ...}

The counters are filled by `count` from inside the samplers and by `CountingValue` around the value the
operator calls; `timed` marks the calls whose wall time counts. Meters nest: every active meter sees every
count. This module imports only torch, so every layer may count.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, fields

from torch import Tensor

COUNTERS = ("value_evaluations", "value_gradient_evaluations", "reference_passes", "particles")
PASS_WEIGHTS = {"reference_passes": 1, "value_evaluations": 1, "value_gradient_evaluations": 2}


@dataclass
class Cost:
    """Counts and wall time of the flows run while this meter was active (module docstring)."""

    value_evaluations: int = 0
    value_gradient_evaluations: int = 0
    reference_passes: int = 0
    particles: int = 0
    states: int = 0
    calls: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    _depth: int = field(default=0, repr=False, compare=False)

    @property
    def passes(self) -> int:
        """Critic-pass equivalents: reference passes + value evaluations + 2 x value-gradient evaluations."""
        return sum(weight * getattr(self, name) for name, weight in PASS_WEIGHTS.items())

    def per_state(self) -> dict[str, float]:
        """Every counter, the critic-pass equivalents and the milliseconds divided by ``states`` (per action when
        the timed calls chose actions)."""
        if self.states == 0:
            raise ValueError("no timed call served a state while this meter was active: nothing to divide by")
        row = {name: getattr(self, name) / self.states for name in COUNTERS}
        return {**row, "passes": self.passes / self.states, "ms": 1e3 * self.wall_s / self.states,
                "cpu_ms": 1e3 * self.cpu_s / self.states}

    def to_dict(self) -> dict[str, float]:
        """The totals, the critic-pass equivalents and the per-state figures (``*_per_state``), JSON-ready."""
        totals = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        per_state = self.per_state() if self.states else {}
        return {**totals, "passes": self.passes, **{f"{k}_per_state": v for k, v in per_state.items()}}


_ACTIVE: ContextVar[tuple[Cost, ...]] = ContextVar("vgf_prob_cost_meters", default=())


@contextlib.contextmanager
def measure() -> Iterator[Cost]:
    """A new `Cost` that counts everything run inside the block (nested meters all count)."""
    cost = Cost()
    token = _ACTIVE.set(_ACTIVE.get() + (cost,))
    try:
        yield cost
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """Whether a meter is counting (callers may skip the bookkeeping otherwise)."""
    return bool(_ACTIVE.get())


def count(**counts: int) -> None:
    """Add ``counts`` (names from `COUNTERS`) to every active meter."""
    for meter in _ACTIVE.get():
        for name, amount in counts.items():
            setattr(meter, name, getattr(meter, name) + amount)


@dataclass
class TimedCall:
    """Handle of a `timed` block: set ``states`` once the batch size is known."""

    states: int = 0


@contextlib.contextmanager
def timed() -> Iterator[TimedCall]:
    """Mark one operator or agent call: each active meter for which this is the outermost timed call adds the
    block's wall and CPU time, one call and the handle's ``states``."""
    meters = _ACTIVE.get()
    outermost = [meter for meter in meters if meter._depth == 0]
    for meter in meters:
        meter._depth += 1
    call = TimedCall()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield call
    finally:
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        for meter in meters:
            meter._depth -= 1
        for meter in outermost:
            meter.wall_s += elapsed
            meter.cpu_s += cpu
            meter.calls += 1
            meter.states += call.states


class CountingValue:
    """``value(obs, actions)`` that counts its rows: each call adds ``actions.shape[:-1].numel()`` value
    evaluations; when a backward pass later runs through its output, those rows move to value-gradient
    evaluations (a hook on the output tensor, so only a backward that ran is counted)."""

    def __init__(self, value: Callable[[Tensor | None, Tensor], Tensor]) -> None:
        self.value = value

    def __call__(self, obs: Tensor | None, actions: Tensor) -> Tensor:
        q = self.value(obs, actions)
        meters = _ACTIVE.get()
        if not meters:  # nothing counts: no bookkeeping, no hook
            return q
        rows = actions.shape[:-1].numel()
        count(value_evaluations=rows)
        if isinstance(q, Tensor) and q.requires_grad:
            q.register_hook(lambda grad: _count_backward(meters, rows))
        return q


def _count_backward(meters: tuple[Cost, ...], rows: int) -> None:
    for meter in meters:
        meter.value_evaluations -= rows
        meter.value_gradient_evaluations += rows


__all__ = ["COUNTERS", "Cost", "CountingValue", "PASS_WEIGHTS", "TimedCall", "active", "count", "measure", "timed"]
