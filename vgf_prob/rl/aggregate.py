"""Aggregates across runs and tasks, as the field reports them: rliable's interquartile mean with stratified
bootstrap intervals (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice"), and the mean of
the last k evaluations of a run (the protocol FQL and OGBench report, k = 3).

    iqm, low, high = iqm_with_ci(scores)        # scores [runs, tasks]
    last_k_mean([71.0, 80.5, 78.0, 83.5])       # 80.67: the mean of the last three evaluations

rliable (an optional dependency, in the ``rl`` extra) is imported on first use.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

IQM_KEY = "scores"


def _score_matrix(scores: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """``scores`` as a float matrix [runs, tasks] (a vector is one task), checked for size and finiteness."""
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(
            f"scores must be a non-empty [runs, tasks] matrix or a vector of runs, got shape {matrix.shape}"
        )
    if not np.isfinite(matrix).all():
        raise ValueError("scores contain NaN or inf; every run needs a finite score on every task")
    return matrix


def iqm_with_ci(
    scores: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(IQM, low, high)`` of ``scores [runs, tasks]`` (a vector is one task's runs).

    IQM = the mean of the middle 50 % of all runs x tasks scores (`rliable.metrics.aggregate_iqm`, a 25 %
    trimmed mean); the interval is rliable's percentile stratified bootstrap over runs within each task
    (`rliable.library.get_interval_estimates`, ``reps`` resamples, ``confidence`` coverage, numpy
    ``RandomState(seed)``). One run gives a zero-width interval: it shows no spread it has not seen.
    """
    from rliable import library, metrics

    matrix = _score_matrix(scores)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    # rliable 1.2 draws its resampled runs from numpy's global generator (its random_state reaches arch only),
    # so the global generator is seeded for the call and restored after it
    global_state = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():  # arch 7 deprecates the random_state that rliable 1.2 passes it
            warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
            point, interval = library.get_interval_estimates(
                {IQM_KEY: matrix}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps,
                confidence_interval_size=confidence, random_state=np.random.RandomState(seed),
            )  # fmt: skip
    finally:
        np.random.set_state(global_state)
    return float(point[IQM_KEY][0]), float(interval[IQM_KEY][0, 0]), float(interval[IQM_KEY][1, 0])


def last_k_mean(scores: Sequence[float], k: int = 3) -> float:
    """The mean of the last ``k`` scores of one run's evaluations, in evaluation order (FQL / OGBench: k = 3).

    A run with fewer than ``k`` evaluations is an error, not a shorter mean."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) < k:
        raise ValueError(f"last_k_mean needs at least k={k} evaluations in order, got {len(values)}")
    return float(values[-k:].mean())


__all__ = ["iqm_with_ci", "last_k_mean"]
