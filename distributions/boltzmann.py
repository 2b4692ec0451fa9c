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

    ``log_prob`` is UNNORMALISED: it returns Q(s, a) / alpha (+ base.log_prob(a)), with no log-partition term,
    for values laid out as pyro's (sample dims first); `particle_log_prob` scores particles ``[*B, N, A]``.
    ``value(obs [*B, O], actions [*B, N, A])`` returns ``[*B, N]`` or ``[*B, N, H]`` (heads, combined by
    ``aggregation``: "mean" or "min"). Sampling is sampling-importance-resampling from ``base`` with weights
    exp(Q / alpha) over ``num_proposals`` proposals (`sample`: independent draws, a fresh pool each;
    `sample_particles`: one pool per state); without ``base`` it raises NotImplementedError. ``action_dim``
    gives the event shape when there is no ``base``.
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

    @classmethod
    def infer_shapes(cls, **arg_shapes):
        raise NotImplementedError("the event shape comes from base or action_dim, not from argument shapes")

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

    def q_value(self, actions: Tensor, obs: Tensor | None = None) -> Tensor:
        """Head-aggregated Q(s, a) for ``actions [*B, N, A]`` (at ``obs [*B, O]``, default the states): ``[*B, N]``."""
        q = self.value(self.obs if obs is None else obs, actions)
        if q.shape == actions.shape[:-1]:
            return q
        if q.shape[:-1] != actions.shape[:-1]:
            raise ValueError(
                f"value must return {tuple(actions.shape[:-1])} or {tuple(actions.shape[:-1])} + (heads,), "
                f"got {tuple(q.shape)}"
            )
        return q.mean(-1) if self.aggregation == "mean" else q.amin(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        """Unnormalised log pi*(value) = Q(s, a) / alpha (+ log mu(a|s)) with pyro's layout: ``value`` is
        ``sample_shape + batch_shape + (A,)`` (batch dims may broadcast), each value scored against its own
        state; the result has shape ``sample_shape + batch_shape``."""
        if self._validate_args:
            self._validate_sample(value)
        batch_dims = len(self.batch_shape)
        if value.ndim < 1 or value.shape[-1] != self.event_shape[0]:
            raise ValueError(f"value must end in the event shape {tuple(self.event_shape)}, got {tuple(value.shape)}")
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        sample_shape, batch_shape = shape[: len(shape) - batch_dims], shape[len(shape) - batch_dims :]
        actions = value.expand(shape + self.event_shape).reshape((-1,) + batch_shape + self.event_shape)
        obs = self.obs.expand(batch_shape + self.obs.shape[-1:])
        q = self.q_value(actions.movedim(0, -2), obs).movedim(-1, 0).reshape(shape)
        log_density = q / self.alpha
        if self.base is not None:
            log_density = log_density + self.base.log_prob(value)
        return log_density

    def particle_log_prob(self, particles: Tensor) -> Tensor:
        """Unnormalised log pi* of particles ``[*B, N, A]`` (the flows' layout): ``[*B, N]``."""
        expected = self.batch_shape + (particles.shape[-2] if particles.ndim >= 2 else 0,) + self.event_shape
        if particles.shape != expected or particles.shape[-2] == 0:
            raise ValueError(f"particles must have shape {tuple(self.batch_shape)} + (N, "
                             f"{self.event_shape[0]}), got {tuple(particles.shape)}")
        return self.log_prob(particles.movedim(-2, 0)).movedim(0, -1)

    def _proposals(self, count: int, generator: torch.Generator | None) -> Tensor:
        if self.base is None:
            raise NotImplementedError(
                "Boltzmann sampling needs a base/proposal distribution: construct it with base=mu"
            )
        if hasattr(self.base, "sample_particles"):
            return self.base.sample_particles(count, generator=generator)
        return self.base.sample((count,)).movedim(0, -2)

    def _resample(self, logits: Tensor, draws: int, generator: torch.Generator | None) -> Tensor:
        """``draws`` indices per row of ``logits [..., M]``, with replacement, probabilities softmax(logits)."""
        flat = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        return torch.multinomial(flat, draws, True, generator=generator).reshape(logits.shape[:-1] + (draws,))

    def sample_particles(self, num_particles: int, generator: torch.Generator | None = None) -> Tensor:
        """``[*B, N, A]`` by sampling-importance-resampling: ``num_proposals`` draws from ``base`` per state,
        resampled N times with replacement with weights exp(Q / alpha). The N particles share one pool (they
        repeat when the weights concentrate); ``sample`` gives independent draws."""
        with torch.no_grad():
            proposals = self._proposals(self.num_proposals, generator)
            index = self._resample(self.q_value(proposals) / self.alpha, num_particles, generator)
            return proposals.gather(-2, index[..., None].expand(index.shape + self.event_shape))

    def sample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Independent draws ``sample_shape + batch_shape + (A,)``: each one is a separate sampling-importance-
        resampling step from its own ``num_proposals`` fresh proposals (exact as ``num_proposals`` grows)."""
        sample_shape = torch.Size(sample_shape)
        draws, pool = sample_shape.numel(), self.num_proposals
        with torch.no_grad():
            proposals = self._proposals(draws * pool, generator)
            logits = (self.q_value(proposals) / self.alpha).reshape(self.batch_shape + (draws, pool))
            index = self._resample(logits, 1, generator)
            proposals = proposals.reshape(self.batch_shape + (draws, pool) + self.event_shape)
            chosen = proposals.gather(-2, index[..., None].expand(index.shape + self.event_shape)).squeeze(-2)
        return chosen.movedim(-2, 0).reshape(sample_shape + self.batch_shape + self.event_shape)
