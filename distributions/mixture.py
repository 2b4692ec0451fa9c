"""A fixed (state-independent) Gaussian-mixture reference for bandits and tests."""

from collections.abc import Sequence

import torch
from pyro.distributions import Categorical, Independent, MixtureSameFamily, Normal, TorchDistribution, constraints
from torch import Tensor, nn

from .networks import check_obs


class GaussianMixture(MixtureSameFamily, TorchDistribution):
    """p(a) = sum_k w_k N(a; m_k, diag(s_k^2)) (pyro ``MixtureSameFamily`` of ``Independent(Normal)``).

    Adds ``sample_particles``: ``[*B, N, A]`` draws (component, then Gaussian noise) from ``generator``. The
    support is declared ``real_vector`` (the components' support), so that pyro's autoguides can bijectively
    map it.
    """

    support = constraints.real_vector

    @classmethod
    def infer_shapes(cls, **arg_shapes):
        raise NotImplementedError(
            "a mixture's arguments are distributions, not tensors: use .batch_shape / .event_shape"
        )

    def sample_particles(self, num_particles: int, generator: torch.Generator | None = None) -> Tensor:
        components = self.component_distribution.base_dist
        loc, scale = components.loc, components.scale
        probs = self.mixture_distribution.probs
        num_components, action_dim = loc.shape[-2:]
        with torch.no_grad():
            index = torch.multinomial(probs.reshape(-1, num_components), num_particles, True, generator=generator)
            index = index.reshape(self.batch_shape + (num_particles, 1))
            index = index.expand(self.batch_shape + (num_particles, action_dim))
            noise = torch.randn(index.shape, generator=generator, dtype=loc.dtype, device=loc.device)
            return loc.gather(-2, index) + scale.gather(-2, index) * noise


class MixtureReference(nn.Module):
    """Fixed reference mu(a|s) = sum_k softmax(logits)_k N(a; means_k, diag(scales_k^2)), the same for every s.

    ``reference(obs [*B, O])`` returns a ``GaussianMixture`` with batch shape ``*B`` in ``obs``'s dtype and
    device; uniform weights when ``logits`` is None.
    """

    def __init__(
        self,
        means: Tensor | Sequence[Sequence[float]],
        scales: Tensor | Sequence[Sequence[float]] | float,
        logits: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.get_default_dtype())
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, A], got {tuple(means.shape)}")
        scales = torch.as_tensor(scales, dtype=means.dtype)
        if scales.ndim != 0 and scales.shape != means.shape:
            raise ValueError(f"scales must be a scalar or of shape {tuple(means.shape)}, got {tuple(scales.shape)}")
        scales = scales.expand_as(means).clone()
        if not (scales > 0).all():
            raise ValueError("scales must be positive")
        logits = torch.zeros(means.shape[0]) if logits is None else torch.as_tensor(logits, dtype=means.dtype)
        if logits.shape != means.shape[:1]:
            raise ValueError(f"logits must have shape [{means.shape[0]}], got {tuple(logits.shape)}")
        self.register_buffer("means", means)
        self.register_buffer("scales", scales)
        self.register_buffer("logits", logits)

    def forward(self, obs: Tensor) -> GaussianMixture:
        check_obs(obs)
        components = Independent(Normal(self.means.to(obs), self.scales.to(obs)), 1)
        mixture = GaussianMixture(Categorical(logits=self.logits.to(obs)), components)
        return mixture.expand(obs.shape[:-1])
