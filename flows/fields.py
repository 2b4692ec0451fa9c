"""Velocity fields that move particle clouds toward higher value.

A field is called as ``field(obs, x, value) -> v`` with particles x of shape [B, N, A] and returns a
velocity of the same shape. ``value(obs, x)`` returns one number per particle, [B, N] (heads already
combined; ``vgf_prob.values.HeadAggregation`` does that). Fields differentiate the value with respect to the
particles only: no graph is left on the value's parameters.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from .kernels import (
    BANDWIDTH_FLOOR,
    KERNEL_DENOMINATOR_EPS,
    median_bandwidth,
    pairwise_sq_distances,
    rbf_kernel,
)

ValueFn = Callable[[Tensor | None, Tensor], Tensor]


class VelocityField(Protocol):
    def __call__(self, obs: Tensor | None, x: Tensor, value: ValueFn) -> Tensor: ...


def action_gradient(value: ValueFn, obs: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
    """Return (Q(s, x) [B, N], grad_x Q(s, x) [B, N, A]) with gradients taken with respect to x only.

    ``torch.autograd.grad`` is asked for the particles alone, so the value's parameters never receive a
    ``.grad`` and no graph survives the call. Works inside ``torch.no_grad()`` contexts; inside
    ``torch.inference_mode()`` no gradient can exist, so that is an error rather than a silent zero field.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "value gradients cannot be taken inside torch.inference_mode(); run the flow under torch.no_grad() "
            "(or without either) instead"
        )
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        q = value(obs, x_leaf)
        if q.shape != x.shape[:-1]:
            raise ValueError(
                f"value(obs, x) must return one number per particle, shape {tuple(x.shape[:-1])}; "
                f"got {tuple(q.shape)}"
            )
        if not q.requires_grad:
            return q.detach(), torch.zeros_like(x)
        (grad,) = torch.autograd.grad(q.sum(), x_leaf, allow_unused=True)
    return q.detach(), torch.zeros_like(x) if grad is None else grad


class ValueGradient:
    """Plain Wasserstein gradient ascent on Q: phi_i = grad_a Q(s, x_i) (no kernel, no repulsion)."""

    def __call__(self, obs: Tensor | None, x: Tensor, value: ValueFn) -> Tensor:
        return action_gradient(value, obs, x)[1]


class KernelSmoothedGradient:
    """Kernel-smoothed gradient without repulsion ("without MaxEnt"): phi_i = (1/N) sum_j K_ij grad Q(x_j).

    K is the RBF kernel with the per-state median bandwidth (``flows.kernels``).
    """

    def __call__(self, obs: Tensor | None, x: Tensor, value: ValueFn) -> Tensor:
        score = action_gradient(value, obs, x)[1]
        with torch.no_grad():
            d2 = pairwise_sq_distances(x)
            kernel = rbf_kernel(d2, median_bandwidth(d2))
        return kernel @ score / x.shape[-2]


class SteinField:
    """Stein variational (SVGD) field toward pi* ∝ exp(Q / alpha):

        phi_i = (1/N) sum_j [ K_ij grad Q(x_j) / alpha + grad_{x_j} K(x_j, x_i) ],
        grad_{x_j} K(x_j, x_i) = K_ij (x_i - x_j) * 2 / (2 s^2 + 1e-6).

    The first term pulls particles toward high value (smoothed by the kernel), the second keeps the
    cloud spread (the entropy term). The bandwidth s is the per-state median heuristic, held fixed as in
    textbook SVGD. With ``differentiate_bandwidth=True`` the repulsion is formed as the VGF authors' code
    does: -(1/N) grad_x sum_ij K_{s(x)}(x_i, stopgrad(x_j)) with s(x) computed from the same cloud, so the
    gradient also flows through the median (needed for paper-faithful behaviour; with s fixed the two
    coincide).
    """

    def __init__(self, alpha: float = 1.0, differentiate_bandwidth: bool = False) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)
        self.differentiate_bandwidth = differentiate_bandwidth

    def __call__(self, obs: Tensor | None, x: Tensor, value: ValueFn) -> Tensor:
        score = action_gradient(value, obs, x)[1]
        n = x.shape[-2]
        if self.differentiate_bandwidth:
            kernel, repulsion = _repulsion_through_bandwidth(x)
        else:
            with torch.no_grad():
                d2 = pairwise_sq_distances(x)
                bandwidth_sq = median_bandwidth(d2)
                kernel = rbf_kernel(d2, bandwidth_sq)
                scale = (2.0 / (2.0 * bandwidth_sq + 1e-6))[..., None, None]
                repulsion = scale * (x * kernel.sum(-1, keepdim=True) - kernel @ x)
        return (kernel @ score / self.alpha + repulsion) / n


def _repulsion_through_bandwidth(x: Tensor) -> tuple[Tensor, Tensor]:
    """Kernel and the authors' repulsion -grad_x sum_ij K_{s(x)}(x_i, stopgrad(x_j)) (not yet divided by N),
    in closed form (no autograd graph; `_repulsion_through_bandwidth_autograd` is the reference).

    With K_ij = exp(-d_ij / c), d_ij = ||x_i - x_j||^2, c = 2 s^2 + 1e-6, s^2 = max(m / (2 log(N + 1)), 1e-12)
    and m the median of the pairwise squared distances, m = (1/2) sum_ab W_ab d_ab with W_ab = W_ba = the
    weight of each selected entry (one, or two at 1/2), so dm/dx_i = 2 sum_j W_ij (x_i - x_j):
        grad_i = sum_j [K_ij (-2 / c) + (sum_kl K_kl d_kl / c^2) (2 / (2 log(N + 1))) 2 W_ij] (x_i - x_j),
    the first term from the kernel's first argument (the second is held), the second through the bandwidth.
    One reduction over j forms both.
    """
    n = x.shape[-2]
    with torch.no_grad():
        difference = x.unsqueeze(-2) - x.unsqueeze(-3)  # explicit x_i - x_j: exact zeros for equal particles
        sq = difference.square().sum(-1)
        median, median_weights = _median_and_weights(sq)
        raw = median / (2.0 * math.log(n + 1))
        bandwidth_sq = raw.clamp_min(BANDWIDTH_FLOOR)
        denominator = (2.0 * bandwidth_sq + KERNEL_DENOMINATOR_EPS)[..., None, None]
        kernel = torch.exp(-sq / denominator)
        through_bandwidth = (kernel * sq).sum((-1, -2), keepdim=True) / denominator.square()
        # c = 2 s^2 + eps and s^2 = m / (2 log(N + 1)) unless floored (clamp_min passes the gradient at >=)
        dc_dm = (raw >= BANDWIDTH_FLOOR).to(x.dtype)[..., None, None] * (2.0 / (2.0 * math.log(n + 1)))
        coefficient = kernel * (-2.0 / denominator) + (2.0 * through_bandwidth * dc_dm) * median_weights
        grad = (coefficient.unsqueeze(-1) * difference).sum(-2)
    return kernel, -grad


def _median_and_weights(sq_distances: Tensor) -> tuple[Tensor, Tensor]:
    """The median m of all N*N entries of ``sq_distances`` (as `flows.kernels.median_bandwidth` takes it) and
    symmetric weights W with m = (1/2) sum_ab W_ab d_ab: the weight of the selected off-diagonal entry (1, or
    1/2 each for two) at (a, b) and at (b, a); all zero when the median is a diagonal zero."""
    n = sq_distances.shape[-1]
    weights = torch.zeros_like(sq_distances)
    if n == 1:
        return sq_distances[..., 0, 0], weights
    rows, cols = torch.triu_indices(n, n, offset=1, device=sq_distances.device)
    off_diagonal = sq_distances[..., rows, cols]
    count = n * n

    def kth_smallest(k: int) -> tuple[Tensor, Tensor | None]:
        if k <= n:  # one of the N zeros of the diagonal: no gradient
            return torch.zeros_like(off_diagonal[..., 0]), None
        result = torch.kthvalue(off_diagonal, (k - n + 1) // 2, dim=-1)
        return result.values, result.indices

    upper, upper_index = kth_smallest(count // 2 + 1)
    if count % 2:
        terms, median = [(upper_index, 1.0)], upper
    else:
        lower_rank, upper_rank = (count // 2 - n + 1) // 2, (count // 2 + 1 - n + 1) // 2
        if lower_rank == upper_rank and count // 2 > n:
            terms, median = [(upper_index, 1.0)], upper
        else:
            lower, lower_index = kth_smallest(count // 2)
            terms, median = [(upper_index, 0.5), (lower_index, 0.5)], 0.5 * (upper + lower)
    flat_weights = weights.flatten(-2)
    for index, weight in terms:
        if index is None:
            continue
        a, b = rows[index].unsqueeze(-1), cols[index].unsqueeze(-1)
        value = torch.full(a.shape, weight, dtype=weights.dtype, device=weights.device)
        flat_weights.scatter_add_(-1, a * n + b, value)
        flat_weights.scatter_add_(-1, b * n + a, value)
    return median, flat_weights.view_as(weights)


def _repulsion_through_bandwidth_autograd(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference for `_repulsion_through_bandwidth`: the same quantity by autograd, as the authors form it."""
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        bandwidth_sq = median_bandwidth(pairwise_sq_distances(x_leaf))
        kernel = rbf_kernel(pairwise_sq_distances_to(x_leaf, x.detach()), bandwidth_sq)
        (grad,) = torch.autograd.grad(kernel.sum(), x_leaf)
    return kernel.detach(), -grad


def pairwise_sq_distances_to(x: Tensor, y: Tensor) -> Tensor:
    """||x_i - y_j||^2 computed from explicit differences, exact at x_i == y_j (safe to differentiate)."""
    return (x.unsqueeze(-2) - y.unsqueeze(-3)).square().sum(-1)


class AmortizedGradient:
    """Amortised field: phi = f(s, a), a network regressed onto grad_a Q (the authors' cheaper variant).

    ``network(obs [B, O], x [B, N, A]) -> [B, N, A]``; the value is not evaluated during the flow.
    """

    def __init__(self, network: nn.Module | Callable[[Tensor | None, Tensor], Tensor]) -> None:
        self.network = network

    def __call__(self, obs: Tensor | None, x: Tensor, value: ValueFn) -> Tensor:
        with torch.no_grad():
            velocity = self.network(obs, x)
        if velocity.shape != x.shape:
            raise ValueError(
                f"amortised gradient network must return the particles' shape {tuple(x.shape)}, "
                f"got {tuple(velocity.shape)}"
            )
        return velocity
