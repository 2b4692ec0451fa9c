"""Sequential Monte Carlo between flow steps: particles resampled by their Boltzmann weights exp(Q / alpha).

Particle filtering and Feynman-Kac steering alternate a move with a weighting and a resampling; here the move is
one step of a value gradient flow (any discrete solver) and the weight is the Boltzmann factor of the value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fields import ValueFn


class BoltzmannResampling:
    """Weight and resample the cloud by exp(Q(s, x) / alpha) before every flow step, per state.

    With Q^k_i = Q(s, x_i^k) and Q^{-1} = 0, before step k each particle's log-weight grows by the increment

        log w_i <- log w_i + (Q^k_i - Q^{k'}_i) / alpha,   k' the last weighting of its path,

    and a state whose effective sample size ESS = (sum_i w_i)^2 / sum_i w_i^2 is below ``ess_fraction * N``
    (and whose weights are not all equal) draws ancestors a_i ~ Categorical(w / sum_j w_j), i = 1..N
    (multinomial resampling), takes x_i <- x_{a_i} and resets its weights to uniform. After the last step the
    increment to the final cloud gives the result's log-weights. Along every path the increments telescope
    to Q(s, x^L) / alpha, so the weighted result approximates the flow's pushforward of mu tilted by
    exp(Q / alpha); with no step it is self-normalised importance sampling of pi* ∝ mu exp(Q / alpha).
    ``ess_fraction=1`` resamples whenever the weights differ; ``0.5`` is the usual adaptive rule.
    """

    def __init__(self, alpha: float = 1.0, ess_fraction: float = 1.0) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 < ess_fraction <= 1.0:
            raise ValueError(f"ess_fraction must lie in (0, 1], got {ess_fraction}")
        self.alpha, self.ess_fraction = float(alpha), float(ess_fraction)

    def __repr__(self) -> str:
        return f"BoltzmannResampling(alpha={self.alpha}, ess_fraction={self.ess_fraction})"

    def start(self, obs: Tensor | None, x0: Tensor, value: ValueFn,
              generator: torch.Generator | None = None) -> ResamplingRun:
        """The bookkeeping of one flow over the cloud ``x0 [B, N, A]`` with ``value(obs, x) -> [B, N]``."""
        return ResamplingRun(self, obs, x0, value, generator)


class ResamplingRun:
    """One flow's weights and lineage (`BoltzmannResampling`): ``before_step`` returns ancestors [B, N] (or None
    when no state resamples), ``finish`` the final log-weights; ``lineage[b, i]`` is the index in x0 of the
    particle now at i, and ``resampled`` counts the resampling events per state."""

    def __init__(self, rule: BoltzmannResampling, obs: Tensor | None, x0: Tensor, value: ValueFn,
                 generator: torch.Generator | None) -> None:
        self.rule, self.obs, self.value, self.generator = rule, obs, value, generator
        batch, n = x0.shape[:2]
        self.log_weights = x0.new_zeros(batch, n)
        self.last_q = x0.new_zeros(batch, n)
        self.lineage = torch.arange(n, device=x0.device).expand(batch, n)
        self.resampled = torch.zeros(batch, dtype=torch.long, device=x0.device)

    def _weigh(self, x: Tensor) -> None:
        with torch.no_grad():
            q = self.value(self.obs, x)
        self.log_weights = self.log_weights + (q - self.last_q) / self.rule.alpha
        self.last_q = q

    def before_step(self, x: Tensor) -> Tensor | None:
        """Weigh the cloud ``x [B, N, A]`` and resample the states whose ESS is low: their ancestors, else None."""
        self._weigh(x)
        n = x.shape[-2]
        normalised = torch.softmax(self.log_weights, dim=-1)
        ess = 1.0 / normalised.square().sum(-1)
        spread = self.log_weights.amax(-1) > self.log_weights.amin(-1)
        needs = spread & (ess < self.rule.ess_fraction * n)
        if not bool(needs.any()):
            return None
        drawn = torch.multinomial(normalised, n, replacement=True, generator=self.generator)
        identity = torch.arange(n, device=x.device).expand_as(drawn)
        ancestors = torch.where(needs[:, None], drawn, identity)
        self.log_weights = torch.where(needs[:, None], torch.zeros_like(self.log_weights), self.log_weights)
        self.last_q = self.last_q.gather(-1, ancestors)
        self.lineage = self.lineage.gather(-1, ancestors)
        self.resampled = self.resampled + needs.long()
        return ancestors

    def finish(self, x: Tensor) -> Tensor:
        """The result's log-weights [B, N] (normalised to log-sum-exp 0), after the increment to ``x``."""
        self._weigh(x)
        return torch.log_softmax(self.log_weights, dim=-1)


def take_particles(x: Tensor, ancestors: Tensor) -> Tensor:
    """``x [B, N, ...]`` with particle i of state b replaced by particle ``ancestors[b, i]``."""
    index = ancestors.reshape(*ancestors.shape, *(1,) * (x.dim() - 2)).expand_as(x)
    return x.gather(1, index)
