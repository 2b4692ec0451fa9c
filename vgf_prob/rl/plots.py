"""Figures for training logs and budget sweeps (matplotlib, Agg backend: no display needed).

Importing this module switches matplotlib to the Agg backend. Each function saves one PNG, closes
its figure and returns the path.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

Rows = Sequence[Mapping[str, Any]]
_REFERENCE_COLORS = ("gray", "black", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def plot_learning_curve(
    source: str | Path | Rows,
    out_png: str | Path,
    metrics: Sequence[str] | None = None,
    step_key: str = "step",
    title: str | None = None,
) -> Path:
    """One panel per metric (score, losses, ...) against ``step_key``, from a CSV log or a list of rows.

    ``metrics`` defaults to every numeric column but the step. Empty cells (a metric not logged at that
    step) are skipped, so evaluation scores and per-step losses can share one log.
    """
    rows = _read_csv(Path(source)) if isinstance(source, str | Path) else list(source)
    if not rows:
        raise ValueError("no rows to plot")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if step_key not in columns:
        raise ValueError(f"step column {step_key!r} not found; columns: {columns}")
    if metrics is None:
        metrics = [c for c in columns if c != step_key and any(_number(row.get(c)) is not None for row in rows)]
    missing = [m for m in metrics if m not in columns]
    if missing or not metrics:
        raise ValueError(f"metrics {missing or metrics} not found among numeric columns of {columns}")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.4 * len(metrics)), sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        points = [(_number(row.get(step_key)), _number(row.get(metric))) for row in rows]
        points = sorted((x, y) for x, y in points if x is not None and y is not None)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="." if len(points) < 50 else None)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(step_key)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_budget_sweep(
    rows: Rows,
    out_png: str | Path,
    reference_lines: Mapping[str, float] | None = None,
    title: str | None = None,
    xlabel: str = "budget",
    ylabel: str = "score",
) -> Path:
    """Score against budget with ±std error bars, from `vgf_prob.rl.evaluate.budget_sweep` rows.

    Rows with a ``label`` key are drawn as one curve per label. Numeric budgets are placed on a numeric
    axis, anything else (budget objects) at evenly spaced ticks named by ``str(budget)``.
    ``reference_lines`` draws a dashed horizontal line per baseline, e.g. ``{"BC": 52.9}``.
    """
    if not rows:
        raise ValueError("no rows to plot")
    missing = [key for key in ("budget", "score") if any(key not in row for row in rows)]
    if missing:
        raise ValueError(f"every row needs keys {missing}; got keys {sorted(rows[0])}")
    numeric = all(isinstance(row["budget"], Real) for row in rows)
    names = list(dict.fromkeys(str(row["budget"]) for row in rows))  # budget objects need not be hashable

    def position(budget: Any) -> float:
        return float(budget) if numeric else float(names.index(str(budget)))

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(row.get("label") for row in rows):
        series = [row for row in rows if row.get("label") == label]
        ax.errorbar(
            [position(row["budget"]) for row in series],
            [row["score"] for row in series],
            yerr=[row.get("std", 0.0) or 0.0 for row in series],
            marker="o",
            capsize=4,
            label=label,
        )
    for i, (name, value) in enumerate((reference_lines or {}).items()):
        ax.axhline(value, linestyle="--", color=_REFERENCE_COLORS[i % len(_REFERENCE_COLORS)], label=name)
    if not numeric:
        ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, out_png)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"log file not found: {path}")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for empty cells and text."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _save(fig: plt.Figure, out_png: str | Path) -> Path:
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
