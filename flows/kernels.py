"""RBF kernel on particle clouds with the per-state median bandwidth.

For a cloud x of shape [B, N, A] (B states, N particles each):

    d2_ij = ||x_i - x_j||^2,   s^2 = median_ij(d2_ij) / (2 log(N + 1)),   K_ij = exp(-d2_ij / (2 s^2 + 1e-6)).

The median runs over all N*N entries, diagonal zeros included, and is the mean of the two middle values
(as the VGF authors' jnp.median computes it, with a stable sort); s^2 is floored at 1e-12 and 1e-6 is added
to the denominator 2 s^2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BANDWIDTH_FLOOR = 1e-12
KERNEL_DENOMINATOR_EPS = 1e-6


def pairwise_sq_distances(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ||x_i - y_j||^2 of two [B, N, A] clouds, shape [B, N, N].

    Uses ||x||^2 + ||y||^2 - 2 x.y (no [B, N, N, A] intermediate), clamped at zero; when y is x the matrix
    is `expansion_sq_distances` (symmetric bit for bit, zero diagonal), clamped.
    """
    if y is None:
        return expansion_sq_distances(x).clamp_min(0.0)
    cross = x.square().sum(-1).unsqueeze(-1) + y.square().sum(-1).unsqueeze(-2) - 2.0 * x @ y.transpose(-1, -2)
    return cross.clamp_min(0.0)


def expansion_sq_distances(x: Tensor) -> Tensor:
    """||x_i||^2 + ||x_j||^2 - 2 x_i . x_j of one [B, N, A] cloud, not clamped, with the upper triangle
    mirrored so that every (i, j) entry equals its (j, i) entry bit for bit, and a zero diagonal."""
    sq_norms = x.square().sum(-1)
    raw = sq_norms.unsqueeze(-1) + sq_norms.unsqueeze(-2) - 2.0 * (x @ x.transpose(-1, -2))
    upper = torch.triu(raw, 1)
    return upper + upper.transpose(-1, -2)


def median_bandwidth(sq_distances: Tensor) -> Tensor:
    """Per-state squared bandwidth s^2 = median(d2) / (2 log(N + 1)), shape [B] (floored at 1e-12).

    The median is over all N*N entries of d2, diagonal zeros included, as jnp.median takes it
    (`median_selection`).
    """
    n = sq_distances.shape[-1]
    return (median_selection(sq_distances)[0] / (2.0 * math.log(n + 1))).clamp_min(BANDWIDTH_FLOOR)


def rbf_kernel(sq_distances: Tensor, bandwidth_sq: Tensor) -> Tensor:
    """K_ij = exp(-d2_ij / (2 s^2 + 1e-6)) with a per-state s^2 of shape [B]."""
    denominator = 2.0 * bandwidth_sq + KERNEL_DENOMINATOR_EPS
    return torch.exp(-sq_distances / denominator[..., None, None])


def median_selection(sq_distances: Tensor) -> tuple[Tensor, Tensor]:
    """jnp.median of the N*N entries of each [N, N] matrix, and where its gradient goes: (m [B], W [B, N, N]).

    The entries are flattened row-major and sorted ascending with a STABLE sort (ties keep flat order); m is
    the entry at position (N*N - 1) / 2 when N*N is odd, else the mean of positions N*N/2 - 1 and N*N/2. W
    holds the weight (1, or 1/2 each) of each selected entry at its own (row, column), so m = sum_ij W_ij d_ij
    and, for d = d(X, stopgrad(X)), the gradient of m reaches the row particle of each selected entry only.
    """
    n = sq_distances.shape[-1]
    flat = sq_distances.flatten(-2)
    count = n * n
    order = torch.sort(flat, dim=-1, stable=True).indices
    if count % 2:
        positions, weight = [(count - 1) // 2], 1.0
    else:
        positions, weight = [count // 2 - 1, count // 2], 0.5
    selected = order[..., positions]
    median = flat.gather(-1, selected).sum(-1) * weight
    selected_weights = torch.full(selected.shape, weight, dtype=flat.dtype, device=flat.device)
    weights = torch.zeros_like(flat).scatter_add_(-1, selected, selected_weights)
    return median, weights.view_as(sq_distances)
