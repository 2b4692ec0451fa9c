"""Fused passes of an ensemble critic at particles: Q of all heads and its gradient to the particles only.

For a `Network` description with H heads (``W_in [H, A, D0]``, layers with ``[H, ...]`` weights, last width
1), at particles ``a [B, N, A]`` of states encoded as ``e [H, B, 1, D0]``:

Forward, one batched product per `Affine` for all heads: ``h_0 = e + a W_in``, then each layer in order
(`Affine` ``h W + b``; `LayerNorm` ``u = (h - mean) / std``, ``y = gamma u + beta``; `ReLU`), giving
``Q [B, N, H]``.

Backward, for ``g = dLoss/dQ``, from the top: `Affine` ``g <- g W^T``; `ReLU` ``g <- 1[h > 0] g``;
`LayerNorm` ``g <- gamma g`` then ``g <- (g - mean(g) - u mean(g u)) / std``; finally
``dLoss/da = sum_heads g W_in^T``. No weight gradients and no autograd graph of the layers.

Two regimes. Up to ``FEW_ROWS`` rows (acting on one state; float32 / float64), where per-op cost dominates:
fresh tensors and torch's fused LayerNorm kernels. Otherwise activations live in a `Workspace` (reused, no
page faults); a float32 LayerNorm runs in place on the product's buffer; each gamma is folded into the transposed
weight of the `Affine` above it (when only ReLUs lie between), and, every step of the backward being linear
per row, the LayerNorms' ``1/std`` row factors are applied once, to the final ``[H, M, A]`` gradient.

A saving forward carries a token: if another saving forward ran before its backward, the backward
recomputes its own forward first (correct, only slower). Not for concurrent calls on one critic from
several threads (the buffers are shared).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vgf_prob.fast.buffers import Prepared, Workspace, cast
from vgf_prob.fast.dispatch import (
    autocast_off,
    broadcast_lead,
    compute_dtype,
    description,
    is_enabled,
    state,
    warn_fallback,
)
from vgf_prob.fast.layers import Affine, LayerNorm, Network, ReLU, Unsupported

NATIVE_NORM_DTYPES = {torch.bfloat16}
"""Dtypes whose large-batch LayerNorm forward is torch's fused kernel (a fresh output): for bfloat16 it beats
the in-place four-op version (whose float32 statistics need casts); for float32 the in-place one is as fast
and reuses its buffer."""

FEW_ROWS = 64
"""Up to this many particle rows the fused passes use fresh tensors and fused LayerNorm kernels (few ops,
little Python): there the per-op cost, not arithmetic, is what a call spends."""

ParticleValues = Callable[[Tensor, Tensor], Tensor]


def particle_pass(owner: Any) -> ParticleValues | None:
    """``values(encoded [H, B, 1, D0], actions [B, N, A]) -> Q [B, N, H]`` for the ensemble that
    ``owner.describe_layers()`` describes, differentiable with respect to ``actions`` only (the parameters
    get no graph: ``torch.autograd.grad`` wrt the particles is the use). Under a bfloat16 autocast it
    computes in bfloat16.

    None where the model's own forward must run: the switch is off, ``owner`` has no description or a
    non-ensemble one, or its layers are not supported (then with one warning saying why)."""
    if not is_enabled() or not hasattr(owner, "describe_layers"):
        return None
    net = description(owner)
    problem = net.layers if isinstance(net.layers, Unsupported) else _check(net)
    if problem is not None:
        if not problem.quiet:
            warn_fallback(owner, problem.reason)
        return None
    if not net.ensemble:
        return None
    fused = state(owner, "ensemble", _FusedEnsemble)

    def values(encoded: Tensor, actions: Tensor) -> Tensor:
        if torch.is_grad_enabled() and actions.requires_grad:
            return _ParticleValues.apply(actions, encoded, fused, net)
        return fused.values(net, encoded, actions, save=False)

    return values


def _check(net: Network) -> Unsupported | None:
    if not net.ensemble:
        return None
    width = net.input_weight.shape[-1]
    for layer in net.layers:
        if isinstance(layer, Affine):
            if layer.weight.dim() != 3:
                return Unsupported(f"an ensemble Affine needs weights [H, in, out], got {tuple(layer.weight.shape)}")
            width = layer.weight.shape[-1]
    if width != 1:
        return Unsupported(f"the last layer has width {width}; each critic head must give one value")
    return None


class _FusedEnsemble:
    """Buffers, prepared weights and the last saving forward's activations of one critic."""

    def __init__(self) -> None:
        self.workspace = Workspace()
        self.prepared = Prepared()
        self.token = 0
        self.saved: tuple | None = None  # (few_rows, weights, activations per layer, dtype)

    def weights(self, net: Network, dtype: torch.dtype) -> dict[str, Any]:
        """The description's tensors in ``dtype``: ``w_in``, per layer ``(kind, weight, bias, eps)``, the
        transposed weights ``w_t`` and their gamma-folded versions ``folded_t`` (per `Affine` index), and the
        LayerNorms whose gamma is folded; rebuilt only when a tensor changed."""
        parts = net.parts()

        def build() -> dict[str, Any]:
            weights = cast(parts, dtype)
            rest = iter(weights[1:])
            layers = []
            for layer in net.layers:
                if isinstance(layer, ReLU):
                    layers.append(("relu", None, None, None))
                else:
                    kind = "affine" if isinstance(layer, Affine) else "norm"
                    weight, bias = next(rest), next(rest)
                    if kind == "norm":  # a scale/shift shared by the heads, [D], broadcasts as [1, 1, D]
                        weight, bias = (t if t is None or t.dim() == 3 else t.view(1, 1, -1) for t in (weight, bias))
                    layers.append((kind, weight, bias, getattr(layer, "eps", None)))
            w_t, folded_t, gamma_folded = {}, {}, set()
            for i, (kind, weight, _, _) in enumerate(layers):
                if kind != "affine":
                    continue
                w_t[i] = folded_t[i] = weight.transpose(1, 2)
                below = i - 1
                while below >= 0 and layers[below][0] == "relu":
                    below -= 1
                if below >= 0 and layers[below][0] == "norm" and layers[below][1] is not None:
                    gamma = layers[below][1]  # [H, 1, D]: (gamma_l * W)^T as [H, out, D]
                    folded_t[i] = (gamma.transpose(1, 2) * weight).transpose(1, 2)
                    gamma_folded.add(below)
            return {"w_in": weights[0], "layers": layers, "w_t": w_t, "folded_t": folded_t,
                    "gamma_folded": gamma_folded}

        return self.prepared.get(dtype, [t for t in parts if t is not None], net.signature(), build)

    @torch.no_grad()
    def values(self, net: Network, encoded: Tensor, actions: Tensor, save: bool,
               dtype: torch.dtype | None = None) -> Tensor:
        """Q ``[*lead, H]`` at ``actions [*lead, A]``, lead = (B, N) broadcast against ``encoded [H, B, 1, D0]``;
        ``save`` keeps what `action_grad` needs."""
        dtype = dtype or compute_dtype(actions, net.input_weight.dtype)
        weights = self.weights(net, dtype)
        encoded_c, actions_c = encoded.to(dtype), actions.to(dtype)
        lead = broadcast_lead(encoded.shape[1:-1], actions.shape[:-1])
        few_rows = math.prod(lead) <= FEW_ROWS and dtype != torch.bfloat16
        with autocast_off(actions.device.type):
            run = self._values_few_rows if few_rows else self._values
            q, saved = run(weights, encoded_c, actions_c, lead, save)
        if save:
            self.token += 1
            self.saved = (few_rows, weights, saved, dtype)
        heads = encoded.shape[0]
        return q.squeeze(-1).t().reshape(*lead, heads).to(actions.dtype)

    def _values_few_rows(self, w: dict[str, Any], encoded: Tensor, actions: Tensor, lead: torch.Size,
                         save: bool) -> tuple[Tensor, list | None]:
        """Fresh tensors, torch's fused LayerNorm; saves (z, mean, 1/std) per LayerNorm, h per ReLU."""
        heads, width = encoded.shape[0], encoded.shape[-1]
        rows = math.prod(lead)
        start = encoded.expand(heads, *lead, width).reshape(heads, rows, width)
        flat = actions.expand(*lead, actions.shape[-1]).reshape(1, rows, -1).expand(heads, -1, -1)
        h = torch.baddbmm(start, flat, w["w_in"])
        saved: list | None = [None] * len(w["layers"]) if save else None
        h_saved = False
        for i, (kind, weight, bias, eps) in enumerate(w["layers"]):
            if kind == "affine":
                h = torch.baddbmm(bias, h, weight) if bias is not None else torch.bmm(h, weight)
                h_saved = False
            elif kind == "norm":
                u, mean, rstd = torch.native_layer_norm(h, [h.shape[-1]], None, None, eps)
                if save:
                    saved[i] = (h, mean, rstd)
                h, h_saved = _scale_shift(u, weight, bias), False
            else:
                h = torch.relu(h) if h_saved else h.relu_()
                if save:
                    saved[i], h_saved = h, True
        return h, saved

    def _values(self, w: dict[str, Any], encoded: Tensor, actions: Tensor, lead: torch.Size,
                save: bool) -> tuple[Tensor, list | None]:
        """Activations in reused buffers (saving and non-saving forwards use separate ones); float32 LayerNorm in
        place (mean, subtract, norm, scale: as fast at 2560 rows as the fused kernel, and its buffer is reused),
        bfloat16 LayerNorm by torch's kernel (`NATIVE_NORM_DTYPES`). Saves (u, 1/std) per LayerNorm, h per ReLU."""
        ws = self.workspace
        heads, width = encoded.shape[0], encoded.shape[-1]
        rows = math.prod(lead)
        names = _Names("" if save else "eval_", save)
        h = ws.get(names.first(), (heads, rows, width), encoded)
        h.view(heads, *lead, width).copy_(encoded.expand(heads, *lead, width))
        flat = actions.expand(*lead, actions.shape[-1]).reshape(1, rows, -1).expand(heads, -1, -1)
        h.baddbmm_(flat, w["w_in"])
        saved: list | None = [None] * len(w["layers"]) if save else None
        h_saved, last = False, len(w["layers"]) - 1
        for i, (kind, weight, bias, eps) in enumerate(w["layers"]):
            if kind == "affine":
                if i == last:  # the output: a fresh tensor
                    return (torch.baddbmm(bias, h, weight) if bias is not None else torch.bmm(h, weight)), saved
                out = ws.get(names.next(i), (heads, rows, weight.shape[-1]), h)
                if bias is not None:
                    torch.baddbmm(bias, h, weight, out=out)
                else:
                    torch.bmm(h, weight, out=out)
                h, h_saved = out, False
            elif kind == "norm":
                if h.dtype in NATIVE_NORM_DTYPES:
                    h, _, rstd = torch.native_layer_norm(h, [h.shape[-1]], None, None, eps)
                else:
                    if h_saved:  # normalised in place below: keep the saved tensor intact
                        h = ws.get(names.next(i, "copy"), h.shape, h).copy_(h)
                    rstd = _normalise_in_place(ws, h, names.stat(i), eps)
                if save:
                    saved[i] = (h, rstd)
                if weight is None and bias is None:
                    h_saved = save
                    continue
                out = ws.get(names.next(i), h.shape, h)
                _scale_shift(h, weight, bias, out=out)
                h, h_saved = out, False
            else:
                if h_saved:
                    h = torch.clamp_min(h, 0.0, out=ws.get(names.next(i), h.shape, h))
                else:
                    h.relu_()
                if save:
                    saved[i], h_saved = h, True
        return h.clone(), saved  # the last layer was not an Affine: the result must not be a reused buffer

    @torch.no_grad()
    def action_grad(self, grad_q: Tensor) -> Tensor:
        """dLoss/da ``[M, A]`` from dLoss/dQ ``[M, H]``, through the activations of the last saving forward."""
        few_rows, w, saved, dtype = self.saved
        out_dtype = grad_q.dtype
        grad_q = grad_q.to(dtype)
        if few_rows:
            return self._action_grad_few_rows(w, saved, grad_q).to(out_dtype)
        ws = self.workspace
        rows, heads = grad_q.shape
        g, owned = grad_q.t().unsqueeze(-1), False
        row_scale = grad_q.new_ones(heads, rows, 1, dtype=torch.promote_types(dtype, torch.float32))
        names = _Names("grad_", save=False)
        for i in reversed(range(len(w["layers"]))):
            kind, weight, bias, eps = w["layers"][i]
            if kind == "affine":
                weight_t = w["folded_t"][i]
                out = ws.get(names.next(i), (heads, rows, weight_t.shape[-1]), grad_q)
                if g.shape[-1] == 1:
                    torch.mul(g, weight_t, out=out)
                else:
                    torch.bmm(g, weight_t, out=out)
                g, owned = out, True
            elif kind == "relu":
                out = ws.get(names.next(i), g.shape, grad_q)
                torch.ops.aten.threshold_backward.grad_input(g, saved[i], 0.0, grad_input=out)
                g, owned = out, True
            else:
                if not owned:
                    g, owned = ws.get(names.next(i), g.shape, grad_q).copy_(g), True
                if weight is not None and i not in w["gamma_folded"]:
                    g.mul_(weight)
                u, rstd = saved[i]
                row_scale.mul_(rstd)
                g = _unit_layer_norm_backward(ws, g, u)
        grad = torch.bmm(g, w["w_in"].transpose(1, 2)).to(row_scale.dtype).mul_(row_scale).sum(0)
        return grad.to(out_dtype)

    @staticmethod
    def _action_grad_few_rows(w: dict[str, Any], saved: list, grad_q: Tensor) -> Tensor:
        """Per layer from the top with fresh tensors: products with the forward's own weights (transposed
        views, just brought into cache by the forward), the ReLU mask, gamma, and torch's LayerNorm backward
        from the saved (z, mean, 1/std)."""
        g = grad_q.t().unsqueeze(-1)
        for i in reversed(range(len(w["layers"]))):
            kind, weight, bias, eps = w["layers"][i]
            if kind == "affine":
                weight_t = w["w_t"][i]
                g = g * weight_t if g.shape[-1] == 1 else torch.bmm(g, weight_t)
            elif kind == "relu":
                g = torch.ops.aten.threshold_backward(g, saved[i], 0.0)
            else:
                if weight is not None:
                    g = g * weight
                z, mean, rstd = saved[i]
                g = torch.ops.aten.native_layer_norm_backward(g, z, [z.shape[-1]], mean, rstd, None, None,
                                                              [True, False, False])[0]
        return torch.bmm(g, w["w_in"].transpose(1, 2)).sum(0)


class _Names:
    """Workspace names for one pass: per layer when the activations are saved, else two alternating ones."""

    def __init__(self, prefix: str, save: bool) -> None:
        self.prefix, self.save, self.flip = prefix, save, 0

    def first(self) -> str:
        return f"{self.prefix}in"

    def next(self, layer: int, what: str = "out") -> str:
        if self.save:
            return f"{self.prefix}{what}{layer}"
        self.flip ^= 1
        return f"{self.prefix}{'ab'[self.flip]}"

    def stat(self, layer: int) -> str:
        return f"{self.prefix}rstd{layer if self.save else ''}"


def _normalise_in_place(ws: Workspace, h: Tensor, rstd_name: str, eps: float) -> Tensor:
    """h <- (h - mean) / sqrt(var + eps) over the last dim, in place: mean, subtract, norm, scale (statistics in
    float32 at least; same-dtype in-place ops, as a mixed-dtype one copies the whole tensor). Returns 1/std."""
    heads, rows, d = h.shape
    stat_like = h.new_empty((), dtype=torch.promote_types(h.dtype, torch.float32))
    mean = ws.get("mean", (heads, rows, 1), stat_like)
    rstd = ws.get(rstd_name, (heads, rows, 1), stat_like)
    torch.mean(h, -1, keepdim=True, dtype=stat_like.dtype, out=mean)
    h.sub_(mean.to(h.dtype))
    torch.linalg.vector_norm(h, 2, -1, keepdim=True, dtype=stat_like.dtype, out=rstd)
    rstd.square_().div_(d).add_(eps).rsqrt_()
    h.mul_(rstd.to(h.dtype))
    return rstd


def _scale_shift(u: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """gamma u + beta with either term optional (``u`` itself, or a copy into ``out``, when both are absent)."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias, u, weight, out=out) if out is not None else torch.addcmul(bias, u, weight)
    if weight is not None:
        return torch.mul(u, weight, out=out) if out is not None else u * weight
    if bias is not None:
        return torch.add(u, bias, out=out) if out is not None else u + bias
    return out.copy_(u) if out is not None else u


def _unit_layer_norm_backward(ws: Workspace, g_u: Tensor, u: Tensor) -> Tensor:
    """Input gradient of a LayerNorm whose output ``u`` has zero mean and unit variance per row (1/std = 1):
    g_z = g_u - mean(g_u) - u * mean(g_u * u) over the last dim, by torch's fused kernel with unit statistics
    (one pass; it accumulates in float32 for bfloat16). Measured against the same formula as five ops into
    reused buffers: 5.1 against 10.8 ms at [2, 2560, 512] float32 (1 thread), and no slower in a whole update."""
    rows = g_u.shape[:-1]
    unit = ws.get("ln_unit_stats", (2, *rows, 1), g_u)
    unit[0].zero_()
    unit[1].fill_(1.0)
    return torch.ops.aten.native_layer_norm_backward(g_u, u, [u.shape[-1]], unit[0], unit[1], None, None,
                                                     [True, False, False])[0]


class _ParticleValues(torch.autograd.Function):
    """Q at particles: fused forward, hand-written backward to the particles only."""

    @staticmethod
    def forward(ctx, actions: Tensor, encoded: Tensor, fused: _FusedEnsemble, net: Network) -> Tensor:  # type: ignore[override]
        q = fused.values(net, encoded, actions, save=True)
        ctx.fused, ctx.net, ctx.token, ctx.dtype = fused, net, fused.token, fused.saved[3]
        ctx.save_for_backward(actions, encoded)
        return q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        actions, encoded = ctx.saved_tensors
        fused = ctx.fused
        if fused.token != ctx.token:  # another saving forward overwrote our activations: redo ours
            fused.values(ctx.net, encoded, actions, save=True, dtype=ctx.dtype)
        grad = fused.action_grad(grad_q.reshape(-1, grad_q.shape[-1]).to(actions.dtype))
        return grad.reshape(actions.shape), None, None, None
