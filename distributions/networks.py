"""MLP building blocks shared by the reference policies, and the observation check they all use."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgf_prob import fast
from vgf_prob.validation import is_validation_enabled


def check_obs(obs: Tensor, obs_dim: int | None = None) -> None:
    """Raise a ValueError unless ``obs`` is a ``[*B, obs_dim]`` floating tensor of finite values.

    With validation off (`vgf_prob.validation`) only type and shape are checked: the finiteness check reads a
    result back to the host (a device synchronisation on a GPU)."""
    if not isinstance(obs, Tensor) or obs.ndim == 0:
        raise ValueError(f"obs must be a tensor of shape [*B, O], got {type(obs).__name__} {getattr(obs, 'shape', '')}")
    if not obs.is_floating_point():
        raise ValueError(f"obs must have a floating-point dtype, got {obs.dtype}")
    if obs_dim is not None and obs.shape[-1] != obs_dim:
        raise ValueError(f"obs must have last dimension {obs_dim}, got shape {tuple(obs.shape)}")
    if is_validation_enabled() and not torch.isfinite(obs).all():
        raise ValueError("obs contains NaN or infinite values")


def _init_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _activation(width: int, layer_norm: bool, layer_norm_eps: float) -> list[nn.Module]:
    norm = [nn.LayerNorm(width, eps=layer_norm_eps)] if layer_norm else []
    return [*norm, nn.ReLU()]


def mlp(
    input_dim: int,
    output_dim: int,
    hidden_dims: Sequence[int] = (256, 256),
    layer_norm: bool = False,
    layer_norm_eps: float = 1e-6,
) -> nn.Sequential:
    """Linear -> [LayerNorm] -> ReLU per hidden layer, then a Linear output; Xavier-uniform weights, zero biases."""
    layers: list[nn.Module] = []
    width = input_dim
    for hidden in hidden_dims:
        layers += [_init_linear(nn.Linear(width, hidden)), *_activation(hidden, layer_norm, layer_norm_eps)]
        width = hidden
    layers.append(_init_linear(nn.Linear(width, output_dim)))
    return nn.Sequential(*layers)


class ConditionalMLP(nn.Module):
    """y = MLP(concat(c, x)), with the first layer split as W [c; x] + b = (W_c c + b) + W_x x.

    ``encode_context(c)`` computes ``W_c c + b`` once per state; ``forward_from_context`` reuses it for any
    number of inputs (particles, Euler steps) broadcast against it. ``forward`` is the plain concat path
    through the same weights. With ``hidden_dims=()`` the network is one affine map.
    """

    def __init__(
        self,
        context_dim: int,
        input_dim: int,
        output_dim: int,
        hidden_dims: Sequence[int] = (512, 512, 512, 512),
        layer_norm: bool = False,
        layer_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.input_dim = input_dim
        self.output_dim = output_dim
        hidden_dims = tuple(hidden_dims)
        first_width = hidden_dims[0] if hidden_dims else output_dim
        self.first = _init_linear(nn.Linear(context_dim + input_dim, first_width))
        if hidden_dims:
            self.first_activation = nn.Sequential(*_activation(first_width, layer_norm, layer_norm_eps))
            self.trunk: nn.Module = mlp(first_width, output_dim, hidden_dims[1:], layer_norm, layer_norm_eps)
        else:
            self.first_activation = nn.Identity()
            self.trunk = nn.Identity()

    def encode_context(self, context: Tensor) -> Tensor:
        """``W_c c + b``: ``[..., C] -> [..., H1]``, to be reused by ``forward_from_context``."""
        return F.linear(context, self.first.weight[:, : self.context_dim], self.first.bias)

    def forward_from_context(self, encoded: Tensor, inputs: Tensor) -> Tensor:
        """MLP output from an encoded context ``[..., H1]`` broadcast against ``inputs [..., I]``.

        When no graph is needed (sampling under ``torch.no_grad``) `vgf_prob.fast` computes it without autograd.
        """
        out = fast.forward_without_graph(self, encoded, inputs)
        if out is not None:
            return out
        hidden = encoded + F.linear(inputs, self.first.weight[:, self.context_dim :])
        return self.trunk(self.first_activation(hidden))

    def forward(self, context: Tensor, inputs: Tensor) -> Tensor:
        """MLP(concat(context, inputs)); ``context`` and ``inputs`` share their leading dimensions."""
        hidden = self.first(torch.cat([context, inputs], dim=-1))
        return self.trunk(self.first_activation(hidden))

    def describe_layers(self) -> fast.Network:
        """W_x^T (the input part of the first layer, ``[I, H1]``) and the layers after it, for `vgf_prob.fast`."""
        return fast.Network(self.first.weight[:, self.context_dim :].t(), fast.describe(self.first_activation, self.trunk))
