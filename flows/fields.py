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
    expansion_sq_distances,
    median_bandwidth,
    median_selection,
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
    """Stein variational (SVGD) field toward pi* ∝ exp(Q / alpha), in one of two forms of its repulsion:

        phi_i = (1/N) [ sum_j K_ij grad Q(x_j) / alpha + r_i ],   K_ij = exp(-d_ij / (2 s^2 + 1e-6)),

    with d_ij = ||x_i - x_j||^2 and the per-state median bandwidth s^2 = median(d) / (2 log(N + 1)). The
    first term pulls particles toward high value (smoothed by the kernel), r keeps the cloud spread.

    - **textbook** (``differentiate_bandwidth=False``, `SteinField.textbook`): s held fixed, so
      r_i = sum_j grad_{x_j} K(x_j, x_i) = sum_j K_ij (x_i - x_j) * 2 / (2 s^2 + 1e-6).
    - **the paper's / authors'** (``differentiate_bandwidth=True``, `SteinField.paper`): exactly what the
      authors' code computes (REFERENCE.md section 2): r = -grad_X sum_ij K_ij(X) with the kernel built
      from d(X, stopgrad(X)), so the gradient also runs through the median bandwidth, and there it reaches
      only the row particle of each selected median entry (`authors_kernel_and_repulsion`).

    The agent uses the paper's form. Both are closed forms (no autograd graph beyond the value's).
    """

    def __init__(self, alpha: float = 1.0, differentiate_bandwidth: bool = False) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)
        self.differentiate_bandwidth = differentiate_bandwidth

    @classmethod
    def paper(cls, alpha: float = 1.0) -> SteinField:
        """The authors' Stein step (bandwidth differentiated, as in ryanxhr/vgf): paper-faithful."""
        return cls(alpha, differentiate_bandwidth=True)

    @classmethod
    def textbook(cls, alpha: float = 1.0) -> SteinField:
        """Textbook SVGD (Liu & Wang 2016): the bandwidth held fixed when the kernel is differentiated."""
        return cls(alpha, differentiate_bandwidth=False)

    def __repr__(self) -> str:
        form = "paper" if self.differentiate_bandwidth else "textbook"
        return f"SteinField.{form}(alpha={self.alpha})"

    def __call__(self, obs: Tensor | None, x: Tensor, value: ValueFn) -> Tensor:
        score = action_gradient(value, obs, x)[1]
        kernel, repulsion = authors_kernel_and_repulsion(x, through_bandwidth=self.differentiate_bandwidth)
        return (kernel @ score / self.alpha + repulsion) / x.shape[-2]


def authors_kernel_and_repulsion(x: Tensor, through_bandwidth: bool = True) -> tuple[Tensor, Tensor]:
    """The RBF kernel K [B, N, N] and the repulsion r = -grad_X sum_ij K_ij(X) [B, N, A] (not yet divided
    by N) of the authors' Stein step, in closed form. Per state, with Y = stopgrad(X) (REFERENCE.md sec. 2):

    1. d_ij = max(||x_i||^2 + ||y_j||^2 - 2 x_i . y_j, 0): depends on x_i only, dd_ij/dx_i = 2 (x_i - x_j)
       (times 1 where the unclamped value is > 0, 1/2 where it is exactly 0, else 0, as jnp.maximum's).
    2. m = jnp.median of the N*N entries (`median_selection`); dm/dx_i = sum_j W_ij dd_ij/dx_i with W the
       weights of the selected entries on their ROW particle.
    3. h = m / (2 log(N + 1)), c = 2 max(h, 1e-12) + 1e-6, K_ij = exp(-d_ij / c).
    4. grad_i sum_kl K_kl = sum_j [ -K_ij / c + T (dc/dm) W_ij ] dd_ij/dx_i, T = sum_kl K_kl d_kl / c^2,
       dc/dm = 2 / (2 log(N + 1)) while h is above its floor (else 0).

    ``through_bandwidth=False`` drops the W term: the textbook repulsion with s fixed. The pairs' directions
    x_i - x_j are explicit differences (exact zeros for equal particles). d is symmetric by construction, so
    the stable sort breaks every tie of (i, j) with (j, i) by flat position, as the authors' jnp.median does.
    """
    n = x.shape[-2]
    with torch.no_grad():
        unclamped = expansion_sq_distances(x)
        sq_distances = unclamped.clamp_min(0.0)
        slope = (unclamped > 0).to(x.dtype) + 0.5 * (unclamped == 0).to(x.dtype)  # d max(u, 0) / du
        median, row_weights = median_selection(sq_distances)
        log_term = 2.0 * math.log(n + 1)
        bandwidth_sq = (median / log_term).clamp_min(BANDWIDTH_FLOOR)
        denominator = (2.0 * bandwidth_sq + KERNEL_DENOMINATOR_EPS)[..., None, None]
        kernel = torch.exp(-sq_distances / denominator)
        coefficient = kernel * (-1.0 / denominator)
        if through_bandwidth:
            through_median = (kernel * sq_distances).sum((-1, -2), keepdim=True) / denominator.square()
            dc_dm = (median / log_term >= BANDWIDTH_FLOOR).to(x.dtype)[..., None, None] * (2.0 / log_term)
            coefficient = coefficient + (through_median * dc_dm) * row_weights
        difference = x.unsqueeze(-2) - x.unsqueeze(-3)
        grad = ((2.0 * coefficient * slope).unsqueeze(-1) * difference).sum(-2)
    return kernel, -grad


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
