"""The result of a value gradient flow: a weighted particle cloud per state."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from pyro.distributions import Empirical, constraints
from torch import Tensor
from torch.distributions import Distribution

from vgf_prob.cost import Cost

SELECTION_RULES = ("argmax", "softmax", "uniform")


@dataclass
class TransportReport:
    """What a flow spent, per state (shapes follow the batch of the policy).

    steps: flow steps taken (for an ODE solve, its time allowance in step units); displacement:
    sqrt((1/N) sum_i ||x_i - x_i^0||^2), an exact upper bound on W2 to the cloud the flow started from;
    budget_spent: the measure of each budget of the flow (e.g. ``{"sinkhorn": ...}``); exhausted: states
    that stopped because a budget's limit was reached.
    """

    steps: Tensor
    displacement: Tensor
    exhausted: Tensor
    budget_spent: dict[str, Tensor] = field(default_factory=dict)

    def reshape(self, batch_shape: torch.Size) -> TransportReport:
        return self._map(lambda t: t.reshape(batch_shape))

    def expand(self, batch_shape: torch.Size) -> TransportReport:
        """The same report for a policy expanded to ``batch_shape`` (states repeated, nothing recomputed)."""
        return self._map(lambda t: t.expand(batch_shape))

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TransportReport:
        return TransportReport(
            steps=fn(self.steps),
            displacement=fn(self.displacement),
            exhausted=fn(self.exhausted),
            budget_spent={k: fn(v) for k, v in self.budget_spent.items()},
        )


def gather_particles(particles: Tensor, index: Tensor) -> Tensor:
    """``particles [*B, N, A]`` at one particle index per state ``index [*B]``: ``[*B, A]``."""
    event = particles.shape[-1]
    return particles.gather(-2, index[..., None, None].expand(*index.shape, 1, event)).squeeze(-2)


@contextlib.contextmanager
def _default_validation(enabled: bool) -> Iterator[None]:
    """torch.distributions' default ``validate_args`` set to ``enabled`` for the duration (as
    ``pyro.validation_enabled`` does; process-wide while it lasts)."""
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(previous)


class ParticlePolicy(Empirical):
    """pi(a | s) = sum_i w_i delta(a - x_i): particles [*B, N, A] with log-weights [*B, N] (pyro Empirical).

    ``log_prob(value)`` takes pyro's layout ``sample_shape + batch_shape + (A,)`` and returns
    log sum_{i: x_i = value} w_i / sum_j w_j (-inf off the cloud). ``enumerate_support`` lists each state's
    particles, ``[N, *B, A]`` (the values differ by state, so ``expand=False`` cannot collapse the batch
    dims to 1); it needs distinct particles within a state, so that the enumerated masses sum to 1.
    ``select`` turns the cloud into one action per state: ``argmax`` of a value over particles (how VGF
    acts), ``softmax`` sampling with probabilities ∝ exp(Q / temperature), or ``uniform`` sampling.
    ``reference_particles`` is the cloud the flow started from (after SMC resampling, each particle's own
    origin), ``report`` what the flow spent per state, and ``cost`` what the call cost in network passes and
    wall time (a `vgf_prob.cost.Cost`).
    """

    support = constraints.independent(constraints.real, 1)

    def __init__(
        self,
        particles: Tensor,
        log_weights: Tensor | None = None,
        reference_particles: Tensor | None = None,
        report: TransportReport | None = None,
        validate_args: bool | None = None,
        cost: Cost | None = None,
    ) -> None:
        if particles.dim() < 2:
            raise ValueError(f"particles must have shape [*batch, N, A]; got {tuple(particles.shape)}")
        if log_weights is None:
            log_weights = torch.zeros(particles.shape[:-1], dtype=particles.dtype, device=particles.device)
        if reference_particles is not None and reference_particles.shape != particles.shape:
            raise ValueError(
                f"reference_particles {tuple(reference_particles.shape)} must match particles {tuple(particles.shape)}"
            )
        # Empirical builds its Categorical with the default validation; validate_args=False reaches it this way
        with _default_validation(False) if validate_args is False else contextlib.nullcontext():
            super().__init__(particles, log_weights, validate_args=validate_args)
        self.reference_particles = reference_particles
        self.report = report
        self.cost = cost

    @property
    def particles(self) -> Tensor:
        return self._samples

    @property
    def log_weights(self) -> Tensor:
        return self._log_weights

    @property
    def num_particles(self) -> int:
        return self._samples.shape[-2]

    @classmethod
    def infer_shapes(cls, particles: torch.Size, log_weights: torch.Size | None = None):
        """``(batch_shape, event_shape)`` of ``ParticlePolicy(particles, log_weights)``: ``[*B, N, A]`` gives
        ``(B, (A,))``."""
        if len(particles) < 2:
            raise ValueError(f"particles must have shape [*batch, N, A]; got {tuple(particles)}")
        return torch.Size(particles[:-2]), torch.Size(particles[-1:])

    def expand(self, batch_shape: torch.Size, _instance=None) -> ParticlePolicy:
        batch_shape = torch.Size(batch_shape)
        particles = self._samples.expand(batch_shape + self._samples.shape[-2:])
        reference = (
            None
            if self.reference_particles is None
            else self.reference_particles.expand(batch_shape + self._samples.shape[-2:])
        )
        report = None if self.report is None else self.report.expand(batch_shape)
        return ParticlePolicy(particles, self._log_weights.expand(batch_shape + self._log_weights.shape[-1:]),
                              reference, report, validate_args=self._validate_args, cost=self.cost)

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        return super().sample(torch.Size(sample_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        """log pi(value) for ``value [..., *B, A]``: the normalised weight of the particles equal to it."""
        if self._validate_args:
            self._validate_sample(value)
        matches = (value.unsqueeze(-2) == self._samples).all(-1)
        log_weights = torch.log_softmax(self._log_weights, dim=-1)
        return torch.where(matches, log_weights, torch.full_like(log_weights, -math.inf)).logsumexp(-1)

    def enumerate_support(self, expand: bool = True) -> Tensor:
        """Each state's particles ``[N, *B, A]`` (the same with ``expand=False``: see the class docstring)."""
        particles = self._samples
        same = (particles.unsqueeze(-2) == particles.unsqueeze(-3)).all(-1)
        if (same.sum(-1) > 1).any():
            raise ValueError("enumerate_support needs distinct particles within each state (some repeat): "
                             "repeated particles would be enumerated, and counted, more than once")
        return particles.movedim(-2, 0)

    def select(
        self,
        rule: str = "argmax",
        scores: Tensor | None = None,
        value: Callable[[Tensor | None, Tensor], Tensor] | None = None,
        obs: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One action per state, [*B, A]: by ``rule`` over ``scores`` [*B, N] or over ``value(obs, particles)``.

        ``value`` gets obs [*B, O] and particles [*B, N, A] and must return one number per particle.
        """
        if rule not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTION_RULES}")
        batch_shape = self._samples.shape[:-2]
        if rule == "uniform":
            logits = torch.zeros(self._log_weights.shape, dtype=self._samples.dtype, device=self._samples.device)
        else:
            scores = self._scores(scores, value, obs)
            if rule == "argmax":
                index = scores.argmax(-1)
                return self._gather(index)
            if not temperature > 0:
                raise ValueError(f"softmax selection needs a positive temperature, got {temperature}")
            logits = scores / temperature
        flat = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        index = torch.multinomial(flat, 1, generator=generator).reshape(batch_shape)
        return self._gather(index)

    def _scores(self, scores: Tensor | None, value, obs: Tensor | None) -> Tensor:
        if scores is None:
            if value is None:
                raise ValueError("argmax/softmax selection needs scores= or value= (with obs=)")
            with torch.no_grad():
                scores = value(obs, self._samples)
        if scores.shape != self._log_weights.shape:
            raise ValueError(
                f"selection scores must have shape {tuple(self._log_weights.shape)} (one per particle); "
                f"got {tuple(scores.shape)}"
            )
        return scores

    def _gather(self, index: Tensor) -> Tensor:
        return gather_particles(self._samples, index)
