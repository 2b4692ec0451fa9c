"""The Boltzmann target of Value Gradient Flow, pi*(a|s) ∝ exp(Q(s, a) / alpha) [* mu(a|s)]."""

from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from .networks import check_obs

AGGREGATIONS = ("mean", "min")
Value = Callable[[Tensor, Tensor], Tensor]


class Boltzmann(TorchDistribution):
    """pi*(a|s) ∝ exp(Q(s, a) / alpha), times mu(a|s) when ``base`` = mu is given.

    ``log_prob`` is UNNORMALISED: it returns Q(s, a) / alpha (+ base.log_prob(a)), with no log-partition term.
    ``value(obs [*B, O], actions [*B, N, A])`` returns ``[*B, N]`` or ``[*B, N, H]`` (heads, combined by
    ``aggregation``: "mean" or "min"). Sampling is sampling-importance-resampling: ``num_proposals`` draws from
    ``base`` per state, weighted by exp(Q / alpha), resampled with replacement; it needs ``base``.
    ``action_dim`` gives the event shape when there is no ``base``.
    """

    arg_constraints = {"obs": constraints.real_vector, "alpha": constraints.positive}
    has_rsample = False

    def __init__(
        self,
        value: Value,
        obs: Tensor,
        alpha: float | Tensor,
        base: TorchDistribution | None = None,
        aggregation: str = "mean",
        action_dim: int | None = None,
        num_proposals: int = 1000,
        validate_args: bool | None = None,
    ) -> None:
        check_obs(obs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        alpha = torch.as_tensor(alpha, dtype=obs.dtype, device=obs.device)
        if alpha.ndim != 0 or not alpha > 0:
            raise ValueError(f"alpha must be a positive scalar, got {alpha}")
        if base is not None:
            if base.batch_shape != obs.shape[:-1] or len(base.event_shape) != 1:
                raise ValueError(
                    f"base must have batch_shape {tuple(obs.shape[:-1])} and a 1-D event_shape, "
                    f"got {tuple(base.batch_shape)} and {tuple(base.event_shape)}"
                )
            if action_dim is not None and action_dim != base.event_shape[0]:
                raise ValueError(f"action_dim {action_dim} does not match base.event_shape {tuple(base.event_shape)}")
            action_dim = base.event_shape[0]
        if action_dim is None:
            raise ValueError("Boltzmann needs a base distribution or action_dim to know the action dimension")
        self.value = value
        self.obs = obs
        self.alpha = alpha
        self.base = base
        self.aggregation = aggregation
        self.num_proposals = num_proposals
        super().__init__(obs.shape[:-1], torch.Size([action_dim]), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.real_vector if self.base is None else self.base.support

    def expand(self, batch_shape: torch.Size, _instance: "Boltzmann | None" = None) -> "Boltzmann":
        new = self._get_checked_instance(Boltzmann, _instance)
        batch_shape = torch.Size(batch_shape)
        new.value = self.value
        new.obs = self.obs.expand(batch_shape + self.obs.shape[-1:])
        new.alpha = self.alpha
        new.base = None if self.base is None else self.base.expand(batch_shape)
        new.aggregation = self.aggregation
        new.num_proposals = self.num_proposals
        super(Boltzmann, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def q_value(self, actions: Tensor) -> Tensor:
        """Head-aggregated Q(s, a) for ``actions [*B, N, A]``: ``[*B, N]``."""
        q = self.value(self.obs, actions)
        if q.shape == actions.shape[:-1]:
            return q
        if q.shape[:-1] != actions.shape[:-1]:
            raise ValueError(
                f"value must return {tuple(actions.shape[:-1])} or {tuple(actions.shape[:-1])} + (heads,), "
                f"got {tuple(q.shape)}"
            )
        return q.mean(-1) if self.aggregation == "mean" else q.amin(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        """Unnormalised log-density Q(s, a) / alpha (+ log mu(a|s)) for ``[*B, A]`` or particles ``[*B, N, A]``."""
        batch_dims = len(self.batch_shape)
        if value.ndim not in (batch_dims + 1, batch_dims + 2) or value.shape[-1] != self.event_shape[0]:
            raise ValueError(
                f"actions must have shape {tuple(self.batch_shape + self.event_shape)} or "
                f"{tuple(self.batch_shape)} + (N, {self.event_shape[0]}), got {tuple(value.shape)}"
            )
        particles = value.ndim == batch_dims + 2
        actions = value if particles else value.unsqueeze(-2)
        actions = actions.expand(self.batch_shape + actions.shape[-2:])
        log_density = self.q_value(actions) / self.alpha
        if self.base is not None:
            log_density = log_density + self.base.log_prob(actions.movedim(-2, 0)).movedim(0, -1)
        return log_density if particles else log_density.squeeze(-1)

    def sample_particles(self, num_particles: int, generator: torch.Generator | None = None) -> Tensor:
        """``[*B, N, A]`` by sampling-importance-resampling from ``base`` with weights exp(Q / alpha)."""
        if self.base is None:
            raise ValueError("Boltzmann sampling needs a base/proposal distribution: construct it with base=mu")
        with torch.no_grad():
            if hasattr(self.base, "sample_particles"):
                proposals = self.base.sample_particles(self.num_proposals, generator=generator)
            else:
                proposals = self.base.sample((self.num_proposals,)).movedim(0, -2)
            weights = torch.softmax(self.q_value(proposals) / self.alpha, dim=-1)
            index = torch.multinomial(weights.reshape(-1, self.num_proposals), num_particles, True, generator=generator)
            index = index.reshape(self.batch_shape + (num_particles, 1))
            return proposals.gather(-2, index.expand(self.batch_shape + (num_particles,) + self.event_shape))

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        particles = self.sample_particles(sample_shape.numel())
        return particles.movedim(-2, 0).reshape(sample_shape + self.batch_shape + self.event_shape)
