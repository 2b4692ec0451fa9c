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
    """Per-state squared bandwidth s^2 = median(d2) / (2 log(N + 1)), shape [B] (floored at 1e-12).

    The median is over all N*N entries of the symmetric matrix d2 with its zero diagonal, and is read off
    the N(N-1)/2 distinct off-diagonal values: the k-th smallest entry is 0 for k <= N and otherwise the
    ceil((k - N) / 2)-th smallest off-diagonal value (each appears twice).
    """
    n = sq_distances.shape[-1]
    median = _median_of_symmetric(sq_distances)
    return (median / (2.0 * math.log(n + 1))).clamp_min(BANDWIDTH_FLOOR)


def rbf_kernel(sq_distances: Tensor, bandwidth_sq: Tensor) -> Tensor:
    """K_ij = exp(-d2_ij / (2 s^2 + 1e-6)) with a per-state s^2 of shape [B]."""
    denominator = 2.0 * bandwidth_sq + KERNEL_DENOMINATOR_EPS
    return torch.exp(-sq_distances / denominator[..., None, None])


def _median_of_symmetric(sq_distances: Tensor) -> Tensor:
    """Median of all N*N entries (mean of the two middle ones for even N*N), by selection on the triangle."""
    n = sq_distances.shape[-1]
    if n == 1:
        return sq_distances[..., 0, 0]
    rows, cols = torch.triu_indices(n, n, offset=1, device=sq_distances.device)
    off_diagonal = sq_distances[..., rows, cols]
    count = n * n

    def kth_smallest(k: int) -> Tensor:
        if k <= n:
            return torch.zeros_like(off_diagonal[..., 0])
        return torch.kthvalue(off_diagonal, (k - n + 1) // 2, dim=-1).values

    upper = kth_smallest(count // 2 + 1)
    if count % 2:
        return upper
    lower_rank, upper_rank = (count // 2 - n + 1) // 2, (count // 2 + 1 - n + 1) // 2
    lower = upper if lower_rank == upper_rank and count // 2 > n else kth_smallest(count // 2)
    return 0.5 * (upper + lower)
