"""oneDNN products with pre-packed weights, for a few rows on CPU (acting on one state: N particles).

At 10 x 512 x 512 they are 1.9x faster than MKL's products on the benchmark CPU (the weight is reordered
into oneDNN's blocked layout once per parameter change, and a following ReLU is fused in). Above
``PACKED_MAX_ROWS`` rows the fresh output tensor each oneDNN product allocates (no ``out=``; page faults on
CPU) costs more than its faster kernel saves: BC sampling at 2560 rows took 263 ms against 235 ms with MKL
products into reused buffers (median of 8, 2 threads), though the bare products are 1.15x faster.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vgf_prob.fast.layers import Affine, LayerNorm, Layer, ReLU

PACKED_MAX_ROWS = 64
"""Up to this many rows the plain (non-ensemble) passes use oneDNN products with pre-packed weights."""


def packed_linear_available(like: Tensor) -> bool:
    """Whether oneDNN products with pre-packed weights can serve tensors like ``like`` (CPU, float32 or
    bfloat16, a torch built with oneDNN)."""
    return (
        like.device.type == "cpu"
        and like.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def build_packed_steps(layers: tuple[Layer, ...], cast: list[Tensor | None]) -> list[tuple]:
    """The layers as ``(op, args)`` steps, ``hidden = op(hidden, *args)``; ``cast`` holds the layers' tensors
    (weight, bias per `Affine`; weight, bias per `LayerNorm`; None where absent) in the compute dtype. Each
    `Affine` becomes a oneDNN product with its weight packed here and a directly following `ReLU` fused in."""
    tensors = iter(cast)
    steps: list[tuple] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, ReLU):
            steps.append((torch.relu_, ()))
        elif isinstance(layer, LayerNorm):
            weight, bias = next(tensors), next(tensors)
            steps.append((_layer_norm, (layer.eps, weight, bias)))
        elif isinstance(layer, Affine):
            weight, bias = next(tensors), next(tensors)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), PACKED_MAX_ROWS)
            fuse_relu = i + 1 < len(layers) and isinstance(layers[i + 1], ReLU)
            steps.append((torch.ops.mkldnn._linear_pointwise, (packed, bias, "relu" if fuse_relu else "none", [], "")))
            i += fuse_relu
        i += 1
    return steps


def _layer_norm(hidden: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    return torch.layer_norm(hidden, [hidden.shape[-1]], weight, bias, eps, False)


def run_packed_steps(steps: list[tuple], hidden: Tensor) -> Tensor:
    """Apply `build_packed_steps`' op list: ``hidden = op(hidden, *args)`` for each step (``hidden`` is a
    tensor the caller owns: a leading ReLU runs in place on it)."""
    for op, args in steps:
        hidden = op(hidden, *args)
    return hidden
