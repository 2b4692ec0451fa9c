"""The description of a network that the fast passes read: plain data, given by the model.

A `Network` is ``h_0 = e + x W_in`` (``e`` the part of the first affine map the model computes once per
state, e.g. ``W_s s + b``; ``x`` the per-particle input), followed by ``layers`` in order. Each layer is
one of

- `Affine`: ``y = x W + b``, ``W [in, out]`` (``[H, in, out]`` for an ensemble of H heads), ``b`` or None;
- `LayerNorm`: ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last dimension;
- `ReLU`: ``y = max(x, 0)``.

Ensemble descriptions carry a leading head dimension on every weight (``W_in [H, I, D0]``, biases and
norm scales ``[H, 1, D]``); plain ones do not (``W_in [I, D0]``, biases ``[D]``).

`describe(*modules)` builds the layer list from torch.nn modules: ``nn.Linear``, ``nn.LayerNorm`` over one
dimension, ``nn.ReLU``, ``nn.Identity``, containers of them, and any module with a ``describe_layers()``
method returning its own layers. Anything else gives an `Unsupported` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class Affine:
    """y = x W + b; ``weight [..., in, out]``, ``bias [..., out]`` (or ``[H, 1, out]``) or None."""

    weight: Tensor
    bias: Tensor | None = None


@dataclass(frozen=True, eq=False)
class LayerNorm:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension (weight, bias optional)."""

    eps: float
    weight: Tensor | None = None
    bias: Tensor | None = None


@dataclass(frozen=True, eq=False)
class ReLU:
    """y = max(x, 0)."""


Layer = Affine | LayerNorm | ReLU


@dataclass(frozen=True)
class Unsupported:
    """Why a network cannot be described; ``quiet`` when falling back is the user's choice (no warning)."""

    reason: str
    quiet: bool = False


@dataclass(frozen=True, eq=False)
class Network:
    """h_0 = e + x W_in, then ``layers``; ``layers`` may instead be the `Unsupported` reason."""

    input_weight: Tensor
    layers: tuple[Layer, ...] | Unsupported

    @property
    def ensemble(self) -> bool:
        return self.input_weight.dim() == 3

    def parts(self) -> list[Tensor | None]:
        """``W_in``, then (weight, bias) of every `Affine` and `LayerNorm` in order, None where absent."""
        out: list[Tensor | None] = [self.input_weight]
        for layer in self.layers:
            if not isinstance(layer, ReLU):
                out += [layer.weight, layer.bias]
        return out

    def signature(self) -> tuple:
        """The structure (layer kinds, eps, which optional tensors exist), without the values."""
        return tuple(
            (type(layer).__name__, getattr(layer, "eps", None), getattr(layer, "weight", 0) is None,
             getattr(layer, "bias", 0) is None)
            for layer in self.layers
        )


def describe(*modules: nn.Module) -> tuple[Layer, ...] | Unsupported:
    """The layers of ``modules`` applied one after the other, or `Unsupported` saying which one is not."""
    layers: list[Layer] = []
    for module in modules:
        found = _describe_one(module)
        if isinstance(found, Unsupported):
            return found
        layers += found
    return tuple(layers)


def _describe_one(module: nn.Module) -> tuple[Layer, ...] | Unsupported:
    if getattr(module, "_compiled_call_impl", None) is not None:
        return Unsupported(f"{type(module).__name__} is torch.compile'd (the compiled forward runs)", quiet=True)
    own = getattr(module, "describe_layers", None)
    if own is not None:
        return own()
    if isinstance(module, nn.Linear):
        return (Affine(module.weight.t(), module.bias),)
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return Unsupported(f"LayerNorm over {len(module.normalized_shape)} dimensions (one is supported)")
        return (LayerNorm(module.eps, module.weight, module.bias),)
    if isinstance(module, nn.ReLU):
        return (ReLU(),)
    if isinstance(module, nn.Identity):
        return ()
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        return describe(*module)
    return Unsupported(f"{type(module).__name__} is not a Linear / LayerNorm / ReLU layer and has no describe_layers()")
