"""A conditional MLP without autograd: ``h_0 = e + x W_in``, then the described layers, into reused buffers.

For a few rows on CPU (float32 / bfloat16) the `Affine` layers are oneDNN products with weights packed once
per parameter change and a following ReLU fused in (`packed`). Otherwise every hidden activation is
written into a reused buffer: ``e`` broadcast plus ``x W_in`` accumulated in place, each further `Affine`
one ``addmm`` with its bias into the next buffer, `LayerNorm` into a buffer, `ReLU` in place. Under a
bfloat16 autocast everything (weights, activations, output) is bfloat16, as autocast's products give.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vgf_prob.fast.buffers import Prepared, Workspace, cast
from vgf_prob.fast.dispatch import (
    autocast_off,
    broadcast_lead,
    compute_dtype,
    description,
    graph_needed,
    is_enabled,
    state,
    warn_fallback,
)
from vgf_prob.fast.layers import Affine, Network, ReLU, Unsupported
from vgf_prob.fast.packed import PACKED_MAX_ROWS, build_packed_steps, packed_linear_available, run_packed_steps


class _MLPState:
    def __init__(self) -> None:
        self.workspace = Workspace()
        self.prepared = Prepared()


def _runnable(owner: Any, *inputs: Tensor) -> Network | None:
    """``owner``'s description when a no-grad pass may replace its forward (switch on, no graph wanted,
    layers supported), else None (warning once when the layers are not supported)."""
    if not is_enabled() or graph_needed(inputs, ()):
        return None
    net = description(owner)
    if isinstance(net.layers, Unsupported):
        if not net.layers.quiet:
            warn_fallback(owner, net.layers.reason)
        return None
    if net.ensemble or not net.layers or graph_needed((), [t for t in net.parts() if t is not None]):
        return None
    return net


def forward_without_graph(owner: Any, encoded: Tensor, inputs: Tensor) -> Tensor | None:
    """``owner``'s network at ``inputs [..., I]`` from its encoded state part ``encoded [..., D0]`` (broadcast
    together), computed without autograd; None where the model's own forward must run: the switch is off, a
    graph is being recorded, or its description (``owner.describe_layers()``) is unsupported."""
    net = _runnable(owner, encoded, inputs)
    if net is None:
        return None
    st = state(owner, "mlp", _MLPState)
    dtype = compute_dtype(inputs, net.input_weight.dtype)
    encoded, inputs = encoded.to(dtype), inputs.to(dtype)
    lead = broadcast_lead(encoded.shape[:-1], inputs.shape[:-1])
    rows = math.prod(lead)
    flat_inputs = inputs.expand(*lead, inputs.shape[-1]).reshape(rows, inputs.shape[-1])
    with autocast_off(inputs.device.type):
        if rows <= PACKED_MAX_ROWS and packed_linear_available(inputs):
            input_weight, steps = _packed(st, net, dtype)
            width = input_weight.shape[-1]
            hidden = encoded.expand(*lead, width).reshape(rows, width).addmm(flat_inputs, input_weight)
            out = run_packed_steps(steps, hidden)
        else:
            out = _infer(st, net, encoded, flat_inputs, lead, rows, dtype)
    return out.view(*lead, out.shape[-1])


def packed_program(owner: Any, inputs: Tensor, rows: int) -> tuple[Tensor, list[tuple]] | None:
    """What a caller needs to run ``owner``'s few-rows oneDNN pass itself, e.g. in a loop of Euler steps:
    ``(W_in, steps)``, ``W_in [I, D0]`` in the compute dtype; the output for a first pre-activation
    ``z [rows, D0]`` is ``run_packed_steps(steps, z)``. None where the pass does not apply (switch off, more
    than ``PACKED_MAX_ROWS`` rows, not CPU float32/bfloat16, a graph needed, unsupported layers)."""
    if rows > PACKED_MAX_ROWS or not packed_linear_available(inputs):
        return None
    net = _runnable(owner, inputs)
    if net is None:
        return None
    return _packed(state(owner, "mlp", _MLPState), net, compute_dtype(inputs, net.input_weight.dtype))


def _packed(st: _MLPState, net: Network, dtype: torch.dtype) -> tuple[Tensor, list[tuple]]:
    parts = net.parts()

    def build() -> tuple[Tensor, list[tuple]]:
        weights = cast(parts, dtype)
        return weights[0], build_packed_steps(net.layers, weights[1:])

    return st.prepared.get(("packed", dtype), [t for t in parts if t is not None], net.signature(), build)


def _infer(st: _MLPState, net: Network, encoded: Tensor, flat_inputs: Tensor, lead: torch.Size, rows: int,
           dtype: torch.dtype) -> Tensor:
    parts = net.parts()
    weights = st.prepared.get(("cast", dtype), [t for t in parts if t is not None], net.signature(),
                              lambda: cast(parts, dtype))
    workspace = st.workspace
    input_weight, rest = weights[0], iter(weights[1:])
    width = input_weight.shape[-1]
    hidden = workspace.get("h0", (rows, width), encoded)
    hidden.view(*lead, width).copy_(encoded.expand(*lead, width))
    hidden.addmm_(flat_inputs, input_weight)
    ping = 1
    for i, layer in enumerate(net.layers):
        if isinstance(layer, ReLU):
            hidden.relu_()
            continue
        weight, bias = next(rest), next(rest)
        if isinstance(layer, Affine) and i == len(net.layers) - 1:  # the output: a fresh tensor
            return torch.addmm(bias, hidden, weight) if bias is not None else torch.mm(hidden, weight)
        out_width = weight.shape[-1] if isinstance(layer, Affine) else width
        out = workspace.get(f"h{ping}", (rows, out_width), hidden)
        ping ^= 1
        if isinstance(layer, Affine):
            if bias is not None:
                torch.addmm(bias, hidden, weight, out=out)
            else:
                torch.mm(hidden, weight, out=out)
        else:
            stats = workspace.get("ln_stats", (2, rows, 1), hidden)
            torch.ops.aten.native_layer_norm.out(hidden, [width], weight, bias, layer.eps,
                                                 out0=out, out1=stats[0], out2=stats[1])
        hidden, width = out, out_width
    return hidden.clone()  # the last layer was not an Affine: the result must not be a reused buffer
