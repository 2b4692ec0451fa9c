"""Networks of the offline-RL agent: the critic ensemble and the amortised gradient network.

Both split their first layer as W [s; a] + b = (W_s s + b) + W_a a, so the state part is computed once per
state (``encode_obs``) and reused for every particle and flow step (``forward_from_encoding``); ``forward``
is the plain concat path through the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgf_prob.distributions.networks import (
    PACKED_MAX_ROWS,
    ConditionalMLP,
    Workspace,
    autocast_off,
    broadcast_lead,
    compute_dtype,
    fast_inference_allowed,
)

FEW_ROWS = PACKED_MAX_ROWS
"""Up to this many particle rows (acting on one state) the critic's passes use fresh tensors and fused
LayerNorm kernels (few ops, little Python): there the per-op cost, not arithmetic, is what a call spends."""


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


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with a scale and shift per head: [H, M, D] -> [H, M, D]."""

    def __init__(self, num_heads: int, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, 1, width))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, width))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:], eps=self.eps), self.weight)


class EnsembleTrunk(nn.Module):
    """Everything of an ensemble MLP after the first affine map: LayerNorm -> ReLU, then (Linear -> LayerNorm
    -> ReLU) per further hidden layer, then Linear(1). ``[H, M, hidden_0] -> [M, H]``.
    """

    def __init__(self, num_heads: int, hidden_dims: Sequence[int], layer_norm_eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(EnsembleLayerNorm(num_heads, w, layer_norm_eps) for w in hidden_dims)
        self.hidden = nn.ModuleList(EnsembleLinear(num_heads, i, o) for i, o in zip(hidden_dims[:-1], hidden_dims[1:]))
        self.output = EnsembleLinear(num_heads, hidden_dims[-1], 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norms[0](x), inplace=True)
        for layer, norm in zip(self.hidden, self.norms[1:]):
            x = F.relu(norm(layer(x)), inplace=True)
        return self.output(x).squeeze(-1).transpose(0, 1)


class EnsembleCritic(nn.Module):
    """H critic heads Q_k(s, a), k = 1..H, each an MLP Linear -> LayerNorm -> ReLU per hidden layer -> Linear(1).

    All heads run in one batched product per layer (weights [H, in, out]); outputs are ``[..., H]``.
    ``encode_obs(s)`` = W_s s + b of the first layer, ``[H, B, 1, hidden]``; ``forward_from_encoding`` adds
    W_a a for particles ``[B, N, A]`` and runs the ``trunk``, giving ``[B, N, H]``.
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
        self.trunk = EnsembleTrunk(num_heads, tuple(hidden_dims), layer_norm_eps)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Q of every head for matched pairs: obs ``[..., O]``, actions ``[..., A]`` -> ``[..., H]``."""
        batch_shape = actions.shape[:-1]
        x = torch.cat([obs, actions], dim=-1).reshape(1, -1, self.obs_dim + self.action_dim)
        x = self.first(x.expand(self.num_heads, -1, -1))
        return self.trunk(x).reshape(*batch_shape, self.num_heads)

    def encode_obs(self, obs: Tensor) -> Tensor:
        """State part of the first layer, W_s s + b: obs ``[B, O]`` -> ``[H, B, 1, hidden]``."""
        weight_s = self.first.weight[:, : self.obs_dim]
        return torch.baddbmm(self.first.bias, obs.expand(self.num_heads, -1, -1), weight_s).unsqueeze(-2)

    def forward_from_encoding(self, encoded: Tensor, actions: Tensor) -> Tensor:
        """Q of every head at particles ``[B, N, A]`` of the states encoded as ``[H, B, 1, hidden]`` -> ``[B, N, H]``.

        An autograd forward (gradients reach the parameters); without grad mode it runs the fused pass.
        """
        if fast_inference_allowed(self, encoded, actions) and self._fusable():
            return _fused(self).values(self, encoded, actions, save=False)
        flat = actions.reshape(1, -1, self.action_dim).expand(self.num_heads, -1, -1)
        x = torch.bmm(flat, self.first.weight[:, self.obs_dim :])  # W_a a: [H, B * N, hidden]
        x = x.view(self.num_heads, *actions.shape[:-1], -1) + encoded
        return self.trunk(x.flatten(1, 2)).reshape(*actions.shape[:-1], self.num_heads)

    def particle_values(self, encoded: Tensor, actions: Tensor) -> Tensor:
        """``forward_from_encoding`` differentiable with respect to ``actions`` only: what a value gradient
        flow needs. The parameters get no graph (``torch.autograd.grad`` wrt the particles is the use).

        Fused (`_FusedEnsemble`): all heads in one batched product per layer, activations in reused buffers,
        and a hand-written backward that runs only the products with the transposed weights (no weight
        gradients, no autograd graph of the layers). Under a bfloat16 autocast it computes in bfloat16; a
        torch.compile'd trunk takes the autograd forward instead. Not for concurrent calls on one critic from
        several threads (the buffers are shared).
        """
        if not self._fusable():
            return self.forward_from_encoding(encoded, actions)
        if torch.is_grad_enabled() and actions.requires_grad and not torch.is_inference_mode_enabled():
            return _ParticleCritic.apply(actions, encoded, self)
        return _fused(self).values(self, encoded, actions, save=False)

    def _fusable(self) -> bool:
        trunk = self.trunk
        return (
            type(trunk) is EnsembleTrunk
            and type(self.first) is EnsembleLinear
            and getattr(trunk, "_compiled_call_impl", None) is None
        )


def _fused(critic: EnsembleCritic) -> _FusedEnsemble:
    fused = critic.__dict__.get("_fused_passes")
    if fused is None:
        fused = critic.__dict__["_fused_passes"] = _FusedEnsemble()
    return fused


class _FusedEnsemble:
    """Hand-written forward and action-gradient passes of an `EnsembleCritic` at particles, all heads at once.

    Forward per hidden layer l (one batched product for all heads): z_l = h_{l-1} W_l + b_l (layer 0: the
    encoded state + a W_a), u_l = LayerNorm(z_l), h_l = ReLU(gamma_l u_l + beta_l); Q = h_L w_out + b_out.
    Backward for dLoss/da given g = dLoss/dQ: g_h = g (gamma_L w_out)^T, then per layer from the top
    g_u = 1[h_l > 0] g_h, g_z = LayerNorm backward(g_u), g_h <- g_z (gamma_{l-1} W_l)^T (each gamma folded
    into the transposed weight above it); finally dLoss/da = sum over heads of g_z0 W_a^T. Activations live
    in a `Workspace` (reused, no page faults). A saved forward carries a token: if another saving forward
    ran before its backward, the backward recomputes its own forward first (correct, only slower).
    """

    def __init__(self) -> None:
        self.workspace = Workspace()
        self.token = 0
        self._weights: dict[torch.dtype, tuple[tuple, dict[str, list]]] = {}
        self.saved_dtype: torch.dtype | None = None
        self.few_rows_saved: list[tuple[Tensor, ...]] | None = None

    def __deepcopy__(self, memo: dict) -> _FusedEnsemble:
        return _FusedEnsemble()

    def __getstate__(self) -> dict:
        return _FusedEnsemble().__dict__

    def weights(self, critic: EnsembleCritic, dtype: torch.dtype) -> dict[str, list]:
        """Per-layer parameters in the compute dtype and the gamma-folded transposed weights of the backward,
        rebuilt only when a parameter changed (optimiser steps bump the tensors' versions)."""
        params = list(critic.parameters())
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device, p.shape) for p in params)
        cached = self._weights.get(dtype)
        if cached is None or cached[0] != key:
            trunk = critic.trunk
            with torch.no_grad(), torch.inference_mode(False):
                cast = [p.detach().to(dtype) for p in params]
                named = dict(zip([name for name, _ in critic.named_parameters()], cast))
                n_layers = len(trunk.norms)
                gammas = [named[f"trunk.norms.{i}.weight"] for i in range(n_layers)]
                above = [named[f"trunk.hidden.{i}.weight"] for i in range(n_layers - 1)] + [named["trunk.output.weight"]]
                # (gamma_l * W_{l+1})^T as [H, D_{l+1}, D_l]: g_h_l * gamma_l = g_z_{l+1} @ this
                folded = [(gamma.transpose(1, 2) * weight).transpose(1, 2) for gamma, weight in zip(gammas, above)]
            weights = {
                "w_a": named["first.weight"][:, critic.obs_dim :],
                "gamma": gammas,
                "beta": [named[f"trunk.norms.{i}.bias"] for i in range(n_layers)],
                "eps": [norm.eps for norm in trunk.norms],
                "w": [named[f"trunk.hidden.{i}.weight"] for i in range(n_layers - 1)],
                "b": [named[f"trunk.hidden.{i}.bias"] for i in range(n_layers - 1)],
                "w_out": named["trunk.output.weight"],
                "b_out": named["trunk.output.bias"],
                "folded_t": folded,
            }
            hidden_weights = weights["w"] + [None]
            hidden_biases = weights["b"] + [None]
            weights["few_rows_layers"] = list(zip(gammas, weights["beta"], weights["eps"], hidden_weights,
                                                  hidden_biases))
            cached = self._weights[dtype] = (key, weights)
        return cached[1]

    @torch.no_grad()
    def values(self, critic: EnsembleCritic, encoded: Tensor, actions: Tensor, save: bool,
               dtype: torch.dtype | None = None) -> Tensor:
        """Q ``[*lead, H]`` at ``actions [*lead, A]``, lead = (B, N) broadcast against ``encoded [H, B, 1, D0]``.

        Up to ``FEW_ROWS`` rows (float32/float64) `_values_few_rows` runs. Otherwise LayerNorm runs in place on
        the product's buffer: mean, subtract, norm, scale (faster at 2560 rows than the fused kernel, whose fresh
        output page-faults). ``save`` keeps each layer's normalised u, 1/std and output h for ``action_grad``;
        without it one set of buffers (kept apart from the saved ones) serves all layers.
        """
        dtype = dtype or compute_dtype(actions, critic.first.weight.dtype)
        encoded, actions_c = encoded.to(dtype), actions.to(dtype)
        lead = broadcast_lead(encoded.shape[1:-1], actions.shape[:-1])
        with autocast_off(actions.device.type):
            if math.prod(lead) <= FEW_ROWS and dtype != torch.bfloat16:
                q = self._values_few_rows(critic, encoded, actions_c, lead, save, dtype)
            else:
                q = self._values(critic, encoded, actions_c, save, dtype)
        return q.to(actions.dtype)

    def _values_few_rows(self, critic: EnsembleCritic, encoded: Tensor, actions: Tensor, lead: torch.Size,
                         save: bool, dtype: torch.dtype) -> Tensor:
        """The forward for a few rows (acting on one state), where Python and per-op costs dominate: fresh
        tensors, the fused LayerNorm kernel, four ops per layer. ``save`` keeps (z, mean, 1/std, h) per layer."""
        w = self.weights(critic, dtype)
        heads, width = encoded.shape[0], encoded.shape[-1]
        rows = math.prod(lead)
        start = encoded.expand(heads, *lead, width).reshape(heads, rows, width)
        z = torch.baddbmm(start, actions.expand(*lead, actions.shape[-1]).reshape(1, rows, -1).expand(heads, -1, -1),
                          w["w_a"])
        saved = []
        for gamma, beta, eps, weight, bias in w["few_rows_layers"]:
            u, mean, rstd = torch.native_layer_norm(z, [z.shape[-1]], None, None, eps)
            h = torch.addcmul(beta, u, gamma).relu_()
            if save:
                saved.append((z, mean, rstd, h))
            z = torch.baddbmm(bias, h, weight) if weight is not None else None
        if save:
            self.token += 1
            self.saved_dtype = dtype
            self.few_rows_saved = saved
        q = torch.baddbmm(w["b_out"], h, w["w_out"])  # [H, M, 1]
        return q.squeeze(-1).t().reshape(*lead, heads)

    def _values(self, critic: EnsembleCritic, encoded: Tensor, actions: Tensor, save: bool,
                dtype: torch.dtype) -> Tensor:
        w = self.weights(critic, dtype)
        ws = self.workspace
        heads, width = encoded.shape[0], encoded.shape[-1]
        lead = actions.shape[:-1]
        rows = math.prod(lead)
        prefix = "" if save else "eval_"
        u = ws.get(f"{prefix}u0", (heads, rows, width), encoded)
        u.view(heads, *lead, width).copy_(encoded.expand(heads, *lead, width))
        flat = actions.reshape(1, rows, actions.shape[-1]).expand(heads, rows, actions.shape[-1])
        u.baddbmm_(flat, w["w_a"])
        layers = len(w["gamma"])
        if save:
            self.token += 1
            self.saved_dtype = dtype
            self.few_rows_saved = None
        for layer in range(layers):
            tag = layer if save else 0
            d = u.shape[-1]
            stat_dtype = torch.promote_types(u.dtype, torch.float32)  # statistics in float32 at least
            stat_like = u.new_empty((), dtype=stat_dtype)
            mean = ws.get("mean", (heads, rows, 1), stat_like)
            rstd = ws.get(f"{prefix}rstd{tag}", (heads, rows, 1), stat_like)
            torch.mean(u, -1, keepdim=True, dtype=stat_dtype, out=mean)
            u.sub_(mean.to(u.dtype))  # (same-dtype in-place ops: a mixed-dtype one copies the whole tensor)
            torch.linalg.vector_norm(u, 2, -1, keepdim=True, dtype=stat_dtype, out=rstd)
            rstd.square_().div_(d).add_(w["eps"][layer]).rsqrt_()
            u.mul_(rstd.to(u.dtype))
            h = ws.get(f"{prefix}h{tag}", (heads, rows, d), u)
            torch.addcmul(w["beta"][layer], u, w["gamma"][layer], out=h)
            h.relu_()
            if layer + 1 < layers:
                weight = w["w"][layer]
                u = ws.get(f"{prefix}u{layer + 1 if save else (layer + 1) % 2}", (heads, rows, weight.shape[-1]), h)
                torch.baddbmm(w["b"][layer], h, weight, out=u)
        q = torch.baddbmm(w["b_out"], h, w["w_out"])  # [H, M, 1]
        return q.squeeze(-1).t().reshape(*lead, heads)

    @torch.no_grad()
    def action_grad(self, grad_q: Tensor) -> Tensor:
        """dLoss/da ``[M, A]`` from dLoss/dQ ``[M, H]``, through the activations of the last saving forward.

        Every step of the backward is linear per row, so the LayerNorms' 1/std row factors are applied
        once, to the final ``[H, M, A]`` gradient (the LayerNorm backward runs on u with mean 0, std 1).
        """
        w = self._weights[self.saved_dtype][1]
        if self.few_rows_saved is not None:
            return self._action_grad_few_rows(w, grad_q)
        ws = self.workspace
        out_dtype = grad_q.dtype
        grad_q = grad_q.to(w["w_out"].dtype)
        rows, heads = grad_q.shape
        folded = w["folded_t"]
        g = ws.get("g_h", (heads, rows, folded[-1].shape[-1]), grad_q)
        torch.mul(grad_q.t().unsqueeze(-1), folded[-1], out=g)
        row_scale = grad_q.new_ones(heads, rows, 1, dtype=torch.promote_types(grad_q.dtype, torch.float32))
        for layer in reversed(range(len(folded))):
            d = g.shape[-1]
            h = ws.get(f"h{layer}", (heads, rows, d), grad_q)
            u = ws.get(f"u{layer}", (heads, rows, d), grad_q)
            rstd = ws.get(f"rstd{layer}", (heads, rows, 1), row_scale)
            row_scale.mul_(rstd)
            g_u = ws.get("g_u", (heads, rows, d), grad_q)
            torch.ops.aten.threshold_backward.grad_input(g, h, 0.0, grad_input=g_u)
            g_z = _unit_layer_norm_backward(ws, g_u, u)
            if layer == 0:
                grad = torch.bmm(g_z, w["w_a"].transpose(1, 2)).to(row_scale.dtype).mul_(row_scale).sum(0)
                return grad.to(out_dtype)
            g = ws.get("g_h", (heads, rows, folded[layer - 1].shape[-1]), grad_q)
            torch.bmm(g_z, folded[layer - 1], out=g)
        raise AssertionError("unreachable")

    def _action_grad_few_rows(self, w: dict[str, list], grad_q: Tensor) -> Tensor:
        """``action_grad`` after a few-rows forward: per layer from the top, the ReLU mask, the LayerNorm
        backward from the saved (z, mean, 1/std), then g_z W^T scaled by the gamma below. It reuses the forward's
        weight matrices (transposed views), which the forward has just brought into cache: 8-9 % faster at
        10 rows than the separate gamma-folded copies the large-batch backward uses."""
        out_dtype = grad_q.dtype
        grad_q = grad_q.to(w["w_out"].dtype)
        folded = w["folded_t"]
        g = grad_q.t().unsqueeze(-1) * folded[-1]
        for layer in reversed(range(len(folded))):
            z, mean, rstd, h = self.few_rows_saved[layer]
            g_u = torch.ops.aten.threshold_backward(g, h, 0.0)
            g_z = torch.ops.aten.native_layer_norm_backward(g_u, z, [z.shape[-1]], mean, rstd, None, None,
                                                            [True, False, False])[0]
            if layer == 0:
                return torch.bmm(g_z, w["w_a"].transpose(1, 2)).sum(0).to(out_dtype)
            g = torch.bmm(g_z, w["w"][layer - 1].transpose(1, 2)).mul_(w["gamma"][layer - 1])
        raise AssertionError("unreachable")


def _unit_layer_norm_backward(ws: Workspace, g_u: Tensor, u: Tensor) -> Tensor:
    """Input gradient of a LayerNorm whose output ``u`` has zero mean and unit variance per row (1/std = 1):
    g_z = g_u - mean(g_u) - u * mean(g_u * u) over the last dim.

    float32/float64: into reused buffers (``g_u`` is overwritten); torch's kernel allocates its output, and on
    CPU the fresh activation's page faults made it 7-10 % of the small configuration's update. bfloat16:
    torch's kernel (it accumulates in float32 without the full-size casts the formula would need)."""
    rows = g_u.shape[:-1]
    if g_u.dtype == torch.bfloat16:
        unit = ws.get("ln_unit_stats", (2, *rows, 1), g_u)
        unit[0].zero_()
        unit[1].fill_(1.0)
        return torch.ops.aten.native_layer_norm_backward(g_u, u, [u.shape[-1]], unit[0], unit[1], None, None,
                                                         [True, False, False])[0]
    stats = ws.get("ln_grad_stats", (2, *rows, 1), g_u)
    product = ws.get("ln_grad_product", g_u.shape, g_u)
    torch.mean(g_u, -1, keepdim=True, out=stats[0])
    torch.mul(g_u, u, out=product)
    torch.mean(product, -1, keepdim=True, out=stats[1])
    return g_u.sub_(stats[0]).addcmul_(u, stats[1], value=-1.0)


class _ParticleCritic(torch.autograd.Function):
    """Q of an `EnsembleCritic` at particles: fused forward, hand-written backward to the particles only."""

    @staticmethod
    def forward(ctx, actions: Tensor, encoded: Tensor, critic: EnsembleCritic) -> Tensor:  # type: ignore[override]
        fused = _fused(critic)
        q = fused.values(critic, encoded, actions, save=True)
        ctx.critic, ctx.token, ctx.dtype = critic, fused.token, fused.saved_dtype
        ctx.save_for_backward(actions, encoded)
        return q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        actions, encoded = ctx.saved_tensors
        fused = _fused(ctx.critic)
        if fused.token != ctx.token:  # another saving forward overwrote our activations: redo ours
            fused.values(ctx.critic, encoded, actions, save=True, dtype=ctx.dtype)
        grad = fused.action_grad(grad_q.reshape(-1, grad_q.shape[-1]).to(actions.dtype))
        return grad.reshape(actions.shape), None, None


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
