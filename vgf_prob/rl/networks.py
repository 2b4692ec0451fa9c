"""Networks of the offline-RL agent: the critic ensemble and the amortised gradient network.

Both split their first layer as W [s; a] + b = (W_s s + b) + W_a a, so the state part is computed once per
state (``encode_obs``) and reused for every particle and flow step (``forward_from_encoding``); ``forward``
is the plain concat path through the same weights. ``describe_layers`` hands the layers to `vgf_prob.fast`
(the fused passes the agent runs in its flows); the modules here are plain autograd modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgf_prob import fast
from vgf_prob.distributions.networks import ConditionalMLP


class EnsembleLinear(nn.Module):
    """H independent affine maps applied together: y_k = x_k W_k + b_k, weights [H, in, out], biases [H, 1, out].

    Xavier-uniform weights (per head: U(-a, a), a = sqrt(6 / (in + out))) and zero biases.
    """

    def __init__(self, num_heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (in_features + out_features))
        self.weight = nn.Parameter(torch.empty(num_heads, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, out_features))

    def forward(self, x: Tensor) -> Tensor:
        """``x [H, M, in] -> [H, M, out]`` (one batched matrix product for all heads)."""
        return torch.baddbmm(self.bias, x, self.weight)

    def describe_layers(self) -> tuple[fast.Affine]:
        return (fast.Affine(self.weight, self.bias),)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with a scale and shift per head: [H, M, D] -> [H, M, D]."""

    def __init__(self, num_heads: int, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, 1, width))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, width))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:], eps=self.eps), self.weight)

    def describe_layers(self) -> tuple[fast.LayerNorm]:
        return (fast.LayerNorm(self.eps, self.weight, self.bias),)


class EnsembleTrunk(nn.Module):
    """Everything of an ensemble MLP after the first affine map: LayerNorm -> ReLU, then (Linear -> LayerNorm
    -> ReLU) per further hidden layer, then Linear(1). ``[H, M, hidden_0] -> [H, M, 1]``.
    """

    def __init__(self, num_heads: int, hidden_dims: Sequence[int], layer_norm_eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(EnsembleLayerNorm(num_heads, w, layer_norm_eps) for w in hidden_dims)
        self.hidden = nn.ModuleList(EnsembleLinear(num_heads, i, o) for i, o in zip(hidden_dims[:-1], hidden_dims[1:]))
        self.output = EnsembleLinear(num_heads, hidden_dims[-1], 1)
        self.activation = nn.ReLU(inplace=True)

    def layers(self) -> list[nn.Module]:
        """The layers in the order ``forward`` applies them."""
        order: list[nn.Module] = [self.norms[0], self.activation]
        for layer, norm in zip(self.hidden, self.norms[1:]):
            order += [layer, norm, self.activation]
        return [*order, self.output]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers():
            x = layer(x)
        return x

    def describe_layers(self) -> tuple[fast.Affine | fast.LayerNorm | fast.ReLU, ...] | fast.Unsupported:
        return fast.describe(*self.layers())


class EnsembleCritic(nn.Module):
    """H critic heads Q_k(s, a), k = 1..H, each an MLP Linear -> LayerNorm -> ReLU per hidden layer -> Linear(1).

    All heads run in one batched product per layer (weights [H, in, out]); outputs are ``[..., H]``.
    ``encode_obs(s)`` = W_s s + b of the first layer, ``[H, B, 1, hidden]``; ``forward_from_encoding`` adds
    W_a a for particles ``[B, N, A]`` and runs the ``trunk`` (any module ``[H, M, hidden] -> [H, M, 1]``),
    giving ``[B, N, H]``.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (512, 512, 512, 512),
        num_heads: int = 2,
        layer_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not hidden_dims:
            raise ValueError("EnsembleCritic needs at least one hidden layer")
        self.obs_dim, self.action_dim, self.num_heads = obs_dim, action_dim, num_heads
        self.first = EnsembleLinear(num_heads, obs_dim + action_dim, hidden_dims[0])
        self.trunk: nn.Module = EnsembleTrunk(num_heads, tuple(hidden_dims), layer_norm_eps)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Q of every head for matched pairs: obs ``[..., O]``, actions ``[..., A]`` -> ``[..., H]``."""
        batch_shape = actions.shape[:-1]
        x = torch.cat([obs, actions], dim=-1).reshape(1, -1, self.obs_dim + self.action_dim)
        x = self.first(x.expand(self.num_heads, -1, -1))
        return self.trunk(x).squeeze(-1).transpose(0, 1).reshape(*batch_shape, self.num_heads)

    def encode_obs(self, obs: Tensor) -> Tensor:
        """State part of the first layer, W_s s + b: obs ``[B, O]`` -> ``[H, B, 1, hidden]``."""
        weight_s = self.first.weight[:, : self.obs_dim]
        return torch.baddbmm(self.first.bias, obs.expand(self.num_heads, -1, -1), weight_s).unsqueeze(-2)

    def forward_from_encoding(self, encoded: Tensor, actions: Tensor) -> Tensor:
        """Q of every head at particles ``[B, N, A]`` of the states encoded as ``[H, B, 1, hidden]`` -> ``[B, N, H]``."""
        lead = actions.shape[:-1]
        flat = actions.reshape(1, -1, self.action_dim).expand(self.num_heads, -1, -1)
        x = torch.bmm(flat, self.first.weight[:, self.obs_dim :])  # W_a a: [H, B * N, hidden]
        x = x.view(self.num_heads, *lead, -1) + encoded
        return self.trunk(x.flatten(1, 2)).squeeze(-1).transpose(0, 1).reshape(*lead, self.num_heads)

    def describe_layers(self) -> fast.Network:
        """W_a (the action part of the first layer, ``[H, A, hidden]``) and the trunk's layers, for `vgf_prob.fast`."""
        return fast.Network(self.first.weight[:, self.obs_dim :], fast.describe(self.trunk))


class AmortizedGradientNetwork(nn.Module):
    """f(s, a) ~ grad_a Q(s, a): an MLP on concat(s, a) with LayerNorm (the amortised VGF field).

    Same split first layer as the critic: ``encode_obs`` ``[B, O] -> [B, 1, hidden]``, then
    ``forward_from_encoding(encoded, x [B, N, A]) -> [B, N, A]`` (`ConditionalMLP` underneath).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (512, 512, 512, 512),
        layer_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.net = ConditionalMLP(obs_dim, action_dim, action_dim, hidden_dims, layer_norm=True,
                                  layer_norm_eps=layer_norm_eps)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        """f for matched pairs: obs ``[..., O]``, actions ``[..., A]`` -> ``[..., A]``."""
        return self.net(obs, actions)

    def encode_obs(self, obs: Tensor) -> Tensor:
        return self.net.encode_context(obs).unsqueeze(-2)

    def forward_from_encoding(self, encoded: Tensor, actions: Tensor) -> Tensor:
        return self.net.forward_from_context(encoded, actions)


__all__ = ["AmortizedGradientNetwork", "EnsembleCritic", "EnsembleLayerNorm", "EnsembleLinear", "EnsembleTrunk"]
