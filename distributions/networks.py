"""MLP building blocks shared by the reference policies, and the observation check they all use."""

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_obs(obs: Tensor, obs_dim: int | None = None, check_values: bool = True) -> None:
    """Raise a ValueError unless ``obs`` is a ``[*B, obs_dim]`` floating tensor of finite values.

    ``check_values=False`` checks type and shape only: the finiteness check reads a result back to the host
    (a device synchronisation on a GPU), which a training loop on validated data can skip."""
    if not isinstance(obs, Tensor) or obs.ndim == 0:
        raise ValueError(f"obs must be a tensor of shape [*B, O], got {type(obs).__name__} {getattr(obs, 'shape', '')}")
    if not obs.is_floating_point():
        raise ValueError(f"obs must have a floating-point dtype, got {obs.dtype}")
    if obs_dim is not None and obs.shape[-1] != obs_dim:
        raise ValueError(f"obs must have last dimension {obs_dim}, got shape {tuple(obs.shape)}")
    if check_values and not torch.isfinite(obs).all():
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


class Workspace:
    """Scratch tensors reused from call to call by the no-grad fast paths (``ConditionalMLP.infer_from_context``
    and the critic ensemble's fused passes).

    ``get(name, shape, like)`` returns the tensor kept under ``name`` while shape, dtype and device match, and
    allocates a new one otherwise. On CPU a fresh activation-sized tensor costs a page fault per 4 KiB page
    (torch has no caching allocator there), which is a sizeable part of a flow step; reusing buffers removes
    that. A few shapes are kept per name (e.g. acting on one state and training on a batch alternate).
    Copies and pickles of the owning module start with an empty workspace; nothing here is in a state_dict.
    """

    SHAPES_PER_NAME = 3

    def __init__(self) -> None:
        self._buffers: dict[str, list[Tensor]] = {}

    def get(self, name: str, shape: Sequence[int], like: Tensor) -> Tensor:
        shape = torch.Size(shape)
        kept = self._buffers.setdefault(name, [])
        for i, buffer in enumerate(kept):
            if buffer.shape == shape and buffer.dtype == like.dtype and buffer.device == like.device:
                if i:
                    kept.insert(0, kept.pop(i))
                return buffer
        with torch.inference_mode(False):  # a normal tensor even when first asked for inside inference mode
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        kept.insert(0, buffer)
        del kept[self.SHAPES_PER_NAME:]
        return buffer

    def clear(self) -> None:
        self._buffers.clear()

    def __deepcopy__(self, memo: dict) -> "Workspace":
        return Workspace()

    def __getstate__(self) -> dict:
        return {"_buffers": {}}


def fast_inference_allowed(module: nn.Module, *inputs: Tensor) -> bool:
    """Whether a hand-written no-grad pass may replace ``module``'s autograd forward: no graph is being
    recorded for it (grad mode off, or neither its parameters nor the inputs need one) and ``module`` is
    not torch.compile'd. Under autocast the fast passes compute in the autocast dtype (`compute_dtype`)."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        return False
    if torch.is_grad_enabled():
        if any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters()):
            return False
    return True


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for device types autocast does not know (e.g. the
    ``meta`` device, on which a whole update can be traced without data)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def compute_dtype(like: Tensor, parameter_dtype: torch.dtype) -> torch.dtype:
    """The dtype a fast pass computes in: the autocast dtype when autocast is on for ``like``'s device and
    the parameters are float32 (bfloat16 products and activations, as ``flow_autocast_bf16`` asks), else the
    parameters' dtype."""
    device_type = like.device.type
    if autocast_enabled(device_type) and parameter_dtype == torch.float32:
        return torch.get_autocast_dtype(device_type)
    return parameter_dtype


def broadcast_lead(a: Sequence[int], b: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes(a, b)`` for two shapes, in plain Python (the torch function goes through its
    reference implementation, tens of microseconds: a sizeable part of a small network's call)."""
    if a == b:
        return torch.Size(a)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
        out.append(y if x == 1 else x)
    return torch.Size(out)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device_type``, or a no-op one when autocast is already off."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class CastWeights:
    """Parameters cast to a compute dtype, recast only when a parameter changed (tensor versions)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._cast: list[Tensor] = []

    def __call__(self, params: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
        if all(p.dtype == dtype for p in params):
            return params
        key = (dtype, *((p.data_ptr(), p._version) for p in params))
        if key != self._key:
            with torch.no_grad(), torch.inference_mode(False):
                self._cast = [p.detach().to(dtype) for p in params]
            self._key = key
        return self._cast

    def __deepcopy__(self, memo: dict) -> "CastWeights":
        return CastWeights()

    def __getstate__(self) -> dict:
        return CastWeights().__dict__


PACKED_MAX_ROWS = 64
"""Up to this many rows (acting on one state: N particles) ``infer_from_context`` uses oneDNN products with
pre-packed weights. Above it the fresh output tensor each oneDNN product allocates (no ``out=``; page faults
on CPU) costs more than its faster kernel saves: BC sampling at 2560 rows took 263 ms against 235 ms with
MKL products into reused buffers (median of 8, 2 threads), though the bare products are 1.15x faster."""


def packed_linear_available(like: Tensor) -> bool:
    """Whether oneDNN products with pre-packed weights can serve tensors like ``like`` (CPU, float32 or
    bfloat16): 1.9x faster than MKL's at 10 x 512 x 512 on the benchmark CPU."""
    return (
        like.device.type == "cpu"
        and like.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class _FastPlan:
    """What ``ConditionalMLP``'s fast path needs to know about its layers, worked out once per trunk; copies
    and pickles start empty (the parameters they refer to are re-found)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self._layers: list[nn.Module] | None = None
        self.parameters: list[Tensor] = []
        self._packed_key: tuple | None = None
        self._packed: tuple[Tensor, list[tuple]] | None = None

    def layers(self, net: "ConditionalMLP") -> list[nn.Module] | None:
        key = (id(net.first), id(net.first_activation), id(net.trunk))
        if key != self.key:
            layers = [*net.first_activation, *net.trunk] if isinstance(net.trunk, nn.Sequential) else None
            valid = (
                bool(layers)
                and all(isinstance(m, (nn.Linear, nn.LayerNorm, nn.ReLU)) for m in layers)
                and isinstance(layers[-1], nn.Linear)
                and all(m.bias is not None for m in layers if isinstance(m, nn.Linear))
            )
            self._layers = layers if valid else None
            self.parameters = [net.first.weight, *(p for m in layers for p in m.parameters())] if valid else []
            self._packed_key = self._packed = None
            self.key = key
        return self._layers

    def packed_program(self, net: "ConditionalMLP", dtype: torch.dtype) -> tuple[Tensor, list[tuple]]:
        """The oneDNN pass as data: ``W_x^T`` of the first layer and one ``(op, args)`` per later step,
        ``hidden = op(hidden, *args)``. Linear layers are oneDNN products with pre-packed weights and a
        following ReLU fused in. Rebuilt only when a parameter changed (data
        pointer or version), so a call costs a key check and the ops themselves."""
        key = (dtype, *((p.data_ptr(), p._version) for p in self.parameters))
        if key != self._packed_key:
            with torch.no_grad(), torch.inference_mode(False):
                cast = [p.detach().to(dtype) for p in self.parameters]
            first_weight, rest = cast[0], iter(cast[1:])
            layers, steps, i = self._layers, [], 0
            while i < len(layers):
                layer = layers[i]
                if isinstance(layer, nn.ReLU):
                    steps.append((torch.relu_, ()))
                elif isinstance(layer, nn.LayerNorm):
                    weight, bias = (next(rest) if getattr(layer, name) is not None else None
                                    for name in ("weight", "bias"))
                    steps.append((torch.layer_norm, (list(layer.normalized_shape), weight, bias, layer.eps, False)))
                else:
                    weight, bias = next(rest), next(rest)
                    with torch.no_grad(), torch.inference_mode(False):
                        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_MAX_ROWS)
                    fuse_relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                    steps.append((torch.ops.mkldnn._linear_pointwise,
                                  (packed, bias, "relu" if fuse_relu else "none", [], "")))
                    i += fuse_relu
                i += 1
            self._packed = (first_weight[:, net.context_dim :].t(), steps)
            self._packed_key = key
        return self._packed

    def __deepcopy__(self, memo: dict) -> "_FastPlan":
        return _FastPlan()

    def __getstate__(self) -> dict:
        return _FastPlan().__dict__


def run_packed_steps(steps: list[tuple], hidden: Tensor) -> Tensor:
    """Apply a `_FastPlan.packed_program` op list: ``hidden = op(hidden, *args)`` for each step."""
    for op, args in steps:
        hidden = op(hidden, *args)
    return hidden


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
        self._workspace = Workspace()
        self._cast_weights = CastWeights()
        self._plan = _FastPlan()
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

        When no graph is needed (sampling under ``torch.no_grad``, or parameters frozen) this runs
        ``infer_from_context``: the same arithmetic into reused buffers.
        """
        if self._fast_layers is not None and fast_inference_allowed(self, encoded, inputs):
            return self.infer_from_context(encoded, inputs)
        hidden = encoded + F.linear(inputs, self.first.weight[:, self.context_dim :])
        return self.trunk(self.first_activation(hidden))

    @property
    def _fast_layers(self) -> list[nn.Module] | None:
        """The layers after the first affine map when they are all Linear (with bias) / LayerNorm / ReLU
        (else None); worked out once per trunk object."""
        return self._plan.layers(self)

    @torch.no_grad()
    def infer_from_context(self, encoded: Tensor, inputs: Tensor) -> Tensor:
        """``forward_from_context`` without autograd.

        For a few rows on CPU in float32/bfloat16 the Linear layers are oneDNN products with weights packed once
        per parameter change and ReLU fused in (`_infer_packed`). Otherwise every hidden activation is written
        into a reused buffer: ``encoded`` broadcast plus ``inputs @ W_x^T`` accumulated in place, each further
        Linear one ``addmm`` with its bias into the next buffer, LayerNorm into a buffer, ReLU in place. Under
        a bfloat16 autocast everything (weights, activations, output) is bfloat16, as autocast's Linear gives.
        """
        layers = self._fast_layers
        if layers is None:
            raise RuntimeError("infer_from_context needs a trunk of Linear / LayerNorm / ReLU layers")
        dtype = compute_dtype(inputs, self.first.weight.dtype)
        encoded, inputs = encoded.to(dtype), inputs.to(dtype)
        lead = broadcast_lead(encoded.shape[:-1], inputs.shape[:-1])
        rows = math.prod(lead)
        with autocast_off(inputs.device.type):
            if rows <= PACKED_MAX_ROWS and packed_linear_available(inputs):
                return self._infer_packed(encoded, inputs, lead, rows, dtype)
            return self._infer(layers, encoded, inputs, lead, rows, dtype)

    def _infer(self, layers: list[nn.Module], encoded: Tensor, inputs: Tensor, lead: torch.Size, rows: int,
               dtype: torch.dtype) -> Tensor:
        workspace = self._workspace
        params = self._cast_weights(self._plan.parameters, dtype)
        first_weight, rest = params[0], iter(params[1:])
        width = self.first.out_features
        hidden = workspace.get("h0", (rows, width), encoded)
        hidden.view(*lead, width).copy_(encoded.expand(*lead, width))
        flat_inputs = inputs.expand(*lead, inputs.shape[-1]).reshape(rows, inputs.shape[-1])
        hidden.addmm_(flat_inputs, first_weight[:, self.context_dim :].t())
        ping = 1
        for layer in layers[:-1]:
            if isinstance(layer, nn.ReLU):
                hidden.relu_()
                continue
            weight, bias = (next(rest) if getattr(layer, name) is not None else None for name in ("weight", "bias"))
            out_width = layer.out_features if isinstance(layer, nn.Linear) else hidden.shape[-1]
            out = workspace.get(f"h{ping}", (rows, out_width), hidden)
            ping ^= 1
            if isinstance(layer, nn.Linear):
                torch.addmm(bias, hidden, weight.t(), out=out)
            else:
                stats = workspace.get("ln_stats", (2, rows, 1), hidden)
                torch.ops.aten.native_layer_norm.out(hidden, list(layer.normalized_shape), weight, bias, layer.eps,
                                                     out0=out, out1=stats[0], out2=stats[1])
            hidden = out
        last = layers[-1]
        weight, bias = next(rest), next(rest)
        return torch.addmm(bias, hidden, weight.t()).view(*lead, last.out_features)

    def _infer_packed(self, encoded: Tensor, inputs: Tensor, lead: torch.Size, rows: int,
                     dtype: torch.dtype) -> Tensor:
        """`_FastPlan.packed_program`'s ops one after the other (CPU, float32/bfloat16, few rows): the outputs
        are small, so fresh tensors cost nothing here and per-call Python work is what counts."""
        inputs_weight_t, steps = self._plan.packed_program(self, dtype)
        width = self.first.out_features
        flat_inputs = inputs.expand(*lead, inputs.shape[-1]).reshape(rows, inputs.shape[-1])
        hidden = encoded.expand(*lead, width).reshape(rows, width).addmm(flat_inputs, inputs_weight_t)
        hidden = run_packed_steps(steps, hidden)
        return hidden.view(*lead, hidden.shape[-1])

    def packed_pass(self, inputs: Tensor, rows: int) -> tuple[Tensor, list[tuple]] | None:
        """What a caller needs to run this network's few-rows oneDNN pass itself, e.g. in a loop of Euler
        steps: ``(W_x^T, steps)``, W_x^T ``[I, H1]`` in the compute dtype; the output for a first-layer
        pre-activation ``z [rows, H1]`` is ``run_packed_steps(steps, z)``. None where the pass does not apply
        (more than ``PACKED_MAX_ROWS`` rows, GPU, float64, a graph needed, a compiled or custom trunk)."""
        if (rows > PACKED_MAX_ROWS or self._fast_layers is None or not packed_linear_available(inputs)
                or not fast_inference_allowed(self, inputs)):
            return None
        return self._plan.packed_program(self, compute_dtype(inputs, self.first.weight.dtype))

    def forward(self, context: Tensor, inputs: Tensor) -> Tensor:
        """MLP(concat(context, inputs)); ``context`` and ``inputs`` share their leading dimensions."""
        hidden = self.first(torch.cat([context, inputs], dim=-1))
        return self.trunk(self.first_activation(hidden))
