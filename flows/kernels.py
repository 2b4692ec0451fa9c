"""RBF kernel on particle clouds with the per-state median bandwidth.

For a cloud x of shape [B, N, A] (B states, N particles each):

    d2_ij = ||x_i - x_j||^2,   s^2 = median_ij(d2_ij) / (2 log(N + 1)),   K_ij = exp(-d2_ij / (2 s^2 + 1e-6)).

The median runs over all N*N entries, diagonal zeros included, and is the mean of the two middle values
(as the VGF authors compute it); s^2 is floored at 1e-12 and 1e-6 is added to the denominator 2 s^2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BANDWIDTH_FLOOR = 1e-12
KERNEL_DENOMINATOR_EPS = 1e-6


def pairwise_sq_distances(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ||x_i - y_j||^2 of two [B, N, A] clouds, shape [B, N, N].

    Uses ||x||^2 + ||y||^2 - 2 x.y (no [B, N, N, A] intermediate), clamped at zero; when y is x the diagonal
    is set to exactly zero so that identical particles have distance zero.
    """
    same = y is None
    y = x if y is None else y
    sq_x = x.square().sum(-1)
    sq_y = sq_x if same else y.square().sum(-1)
    d2 = (sq_x.unsqueeze(-1) + sq_y.unsqueeze(-2) - 2.0 * x @ y.transpose(-1, -2)).clamp_min(0.0)
    if same:
        n = x.shape[-2]
        d2 = d2 * (1.0 - torch.eye(n, dtype=x.dtype, device=x.device))
    return d2


def median_bandwidth(sq_distances: Tensor) -> Tensor:
    """Per-state squared bandwidth s^2 = median(d2) / (2 log(N + 1)), shape [B] (floored at 1e-12)."""
    n = sq_distances.shape[-1]
    median = _median_of_all_entries(sq_distances.flatten(-2))
    return (median / (2.0 * math.log(n + 1))).clamp_min(BANDWIDTH_FLOOR)


def rbf_kernel(sq_distances: Tensor, bandwidth_sq: Tensor) -> Tensor:
    """K_ij = exp(-d2_ij / (2 s^2 + 1e-6)) with a per-state s^2 of shape [B]."""
    denominator = 2.0 * bandwidth_sq + KERNEL_DENOMINATOR_EPS
    return torch.exp(-sq_distances / denominator[..., None, None])


def _median_of_all_entries(values: Tensor) -> Tensor:
    """Median over the last dim, the mean of the two middle values for an even count (selection, not a sort)."""
    count = values.shape[-1]
    upper = torch.kthvalue(values, count // 2 + 1, dim=-1).values
    if count % 2:
        return upper
    return 0.5 * (upper + torch.kthvalue(values, count // 2, dim=-1).values)
