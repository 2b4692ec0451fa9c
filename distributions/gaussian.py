"""Gaussian behaviour cloning: a state-conditional diagonal Gaussian policy."""

from collections.abc import Sequence

import torch
from pyro.distributions import Independent, Normal, TorchDistribution
from torch import Tensor, nn

from .networks import check_obs, mlp


class DiagonalNormal(Independent, TorchDistribution):
    """N(loc, diag(scale^2)) over the action (``Independent(Normal(loc, scale), 1)``).

    ``sample``/``rsample``/``log_prob`` are the exact Gaussian; ``sample_particles`` draws ``[*B, N, A]`` and
    clamps it into ``[action_low, action_high]`` when a box is given.
    """

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        action_low: Tensor | None = None,
        action_high: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if (action_low is None) != (action_high is None):
            raise ValueError("give both action_low and action_high, or neither")
        self.action_low = action_low
        self.action_high = action_high
        super().__init__(Normal(loc, scale, validate_args=validate_args), 1, validate_args=validate_args)

    @classmethod
    def infer_shapes(cls, loc: torch.Size, scale: torch.Size, action_low=None, action_high=None):
        """``(batch_shape, event_shape)`` of ``DiagonalNormal(loc, scale)``: the last dimension is the event."""
        shape = torch.broadcast_shapes(loc, scale)
        return shape[:-1], shape[-1:]

    def expand(self, batch_shape: torch.Size, _instance: "DiagonalNormal | None" = None) -> "DiagonalNormal":
        new = self._get_checked_instance(DiagonalNormal, _instance)
        new.action_low = self.action_low
        new.action_high = self.action_high
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: Tensor) -> Tensor:
        """log N(value; loc, diag(scale^2)); validation also checks the event shape (torch's ``Independent``
        only checks that ``value`` broadcasts against the base's batch shape)."""
        if self._validate_args:
            self._validate_sample(value)
        return super().log_prob(value)

    def sample_particles(self, num_particles: int, generator: torch.Generator | None = None) -> Tensor:
        """``[*B, N, A]`` draws with noise from ``generator``, clamped into the action box when one is set."""
        loc = self.base_dist.loc.unsqueeze(-2)
        scale = self.base_dist.scale.unsqueeze(-2)
        shape = self.batch_shape + (num_particles,) + self.event_shape
        with torch.no_grad():
            noise = torch.randn(shape, generator=generator, dtype=loc.dtype, device=loc.device)
            particles = loc + scale * noise
            if self.action_low is not None:
                particles = torch.clamp(particles, self.action_low.to(loc), self.action_high.to(loc))
        return particles


class GaussianPolicy(nn.Module):
    """Gaussian BC: mu(a|s) = N(m(s), diag(exp(2 l(s)))), l squashed into [min_log_std, max_log_std] by tanh.

    With ``state_dependent_std=False`` the log-std is one learned vector shared by all states. ``loss`` is the
    negative log-likelihood of dataset actions.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (256, 256),
        min_log_std: float = -5.0,
        max_log_std: float = 2.0,
        state_dependent_std: bool = True,
        action_low: float | Sequence[float] | Tensor | None = None,
        action_high: float | Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if min_log_std >= max_log_std:
            raise ValueError(f"min_log_std must be < max_log_std, got {min_log_std} and {max_log_std}")
        if (action_low is None) != (action_high is None):
            raise ValueError("give both action_low and action_high, or neither")
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.min_log_std = min_log_std
        self.max_log_std = max_log_std
        self.state_dependent_std = state_dependent_std
        self.net = mlp(obs_dim, 2 * action_dim if state_dependent_std else action_dim, hidden_dims)
        self.log_std = None if state_dependent_std else nn.Parameter(torch.zeros(action_dim))
        low = high = None
        if action_low is not None:
            low = torch.as_tensor(action_low, dtype=torch.get_default_dtype()).expand(action_dim).clone()
            high = torch.as_tensor(action_high, dtype=torch.get_default_dtype()).expand(action_dim).clone()
            if not (low < high).all():
                raise ValueError(f"action_low must be < action_high elementwise, got {low.tolist()}, {high.tolist()}")
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)

    def forward(self, obs: Tensor) -> DiagonalNormal:
        """The Gaussian at ``obs [*B, O]``; with validation off (`vgf_prob.validation`) nothing reads a value back
        to the host (NaN/inf in ``obs``, the distribution's argument validation)."""
        check_obs(obs, self.obs_dim)
        out = self.net(obs)
        if self.state_dependent_std:
            mean, raw_log_std = out.split(self.action_dim, dim=-1)
        else:
            mean, raw_log_std = out, self.log_std.expand_as(out)
        half_range = 0.5 * (self.max_log_std - self.min_log_std)
        log_std = self.min_log_std + half_range * (torch.tanh(raw_log_std) + 1.0)
        return DiagonalNormal(mean, log_std.exp(), self.action_low, self.action_high)

    def loss(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean negative log-likelihood of ``actions [*B, A]`` under ``self(obs [*B, O])``."""
        expected = obs.shape[:-1] + (self.action_dim,)
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {tuple(expected)}, got {tuple(actions.shape)}")
        policy = self(obs)
        nll = -policy.log_prob(actions).mean()
        return nll, {"nll": nll.detach(), "std": policy.base_dist.scale.mean().detach()}
