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


METRIC_LABELS = {
    "critic_loss": "critic TD loss",
    "bc_loss": "BC flow-matching loss",
    "q_mean": "mean Q(s, a)",
    "amortized_loss": "amortised-gradient loss",
}
"""Axis labels of the trainer's logged metrics (`plot_learning_curve` uses the column name otherwise)."""

SCORE_LABELS = {
    "d4rl_normalized": "D4RL score (0 = random, 100 = expert)",
    "success_rate": "success rate (%)",
    "return": "mean return per episode",
}
"""Axis label of each ``score_kind`` of `vgf_prob.rl.evaluate.EvalResult`."""


_SERIES_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink")  # labelled curves beside VGF's blue


def plot_learning_curve(
    source: str | Path | Rows,
    out_png: str | Path,
    metrics: Sequence[str] | None = None,
    step_key: str = "step",
    title: str | None = None,
    scores: Sequence[str] = (),
    score_label: str = "score",
) -> Path:
    """Evaluation scores and losses against training steps, from a CSV log or a list of rows.

    ``scores`` (columns, one per evaluated policy) share the top panel, with a legend and the y label
    ``score_label``; each of ``metrics`` gets a panel below (y label from `METRIC_LABELS`, else the
    column name), all sharing the x axis (gradient steps). ``metrics`` defaults to every numeric column
    but the step and the scores. Empty cells (a metric not logged at that step) are skipped, so scores
    and per-step losses can share one log.
    """
    rows = _read_csv(Path(source)) if isinstance(source, str | Path) else list(source)
    if not rows:
        raise ValueError("no rows to plot")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if step_key not in columns:
        raise ValueError(f"step column {step_key!r} not found; columns: {columns}")
    if metrics is None:
        metrics = [c for c in columns if c not in (step_key, *scores) and any(_number(row.get(c)) is not None
                                                                        for row in rows)]  # fmt: skip
    missing = [m for m in (*metrics, *scores) if m not in columns]
    if missing or not (metrics or scores):
        raise ValueError(f"metrics {missing or list(metrics)} not found among numeric columns of {columns}")

    def series(metric: str) -> tuple[list[float], list[float]]:
        points = [(_number(row.get(step_key)), _number(row.get(metric))) for row in rows]
        points = sorted((x, y) for x, y in points if x is not None and y is not None)
        return [x for x, _ in points], [y for _, y in points]

    heights = ([1.6] if scores else []) + [1.0] * len(metrics)
    fig, axes = plt.subplots(len(heights), 1, figsize=(7, 1.2 + 2.2 * sum(heights)), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    panels = list(axes[:, 0])
    if scores:
        ax = panels.pop(0)
        for metric in scores:
            xs, ys = series(metric)
            ax.plot(xs, ys, marker="o", label=metric)
        ax.set_ylabel(score_label)
        ax.set_title("evaluation", fontsize="medium")
        ax.legend(fontsize="small", ncol=2)
        ax.grid(alpha=0.3)
    for ax, metric in zip(panels, metrics, strict=True):
        xs, ys = series(metric)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("gradient step" if step_key == "step" else step_key)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_budget_sweep(
    rows: Rows,
    out_png: str | Path,
    reference_lines: Mapping[str, float | Mapping[str, float]] | None = None,
    title: str | None = None,
    xlabel: str = "budget",
    ylabel: str | None = None,
    show_return: bool | None = None,
) -> Path:
    """Score against budget with ±std error bars (over episodes), from `vgf_prob.rl.evaluate.ScoreRow` dicts.

    Rows hold ``budget``, ``score`` and optionally ``score_std``, ``mean_return``, ``return_std``, ``score_kind``
    and ``label`` (one curve per label). Whole-number budgets are steps: ticks sit at exactly those
    values, and in an unlabelled sweep the budget-0 point (no flow step: the best of the reference's
    samples) is drawn as "best-of-N". Other numeric budgets go on a numeric axis, anything else (budget
    objects) at evenly spaced ticks named by ``str(budget)``.
    ``reference_lines``: name -> score, or name -> ``{"score", "score_std", "mean_return", "return_std"}``;
    each is a dashed horizontal line, with a shaded ± std band when the std is given (e.g. BC).
    ``ylabel`` defaults to the label of the rows' ``score_kind`` (`SCORE_LABELS`). ``show_return`` adds
    a panel of the mean return per episode; by default when the rows carry it and the score can
    saturate (success rates, or every score equal), where the return still tells the budgets apart.
    """
    if not rows:
        raise ValueError("no rows to plot")
    missing = [key for key in ("budget", "score") if any(key not in row for row in rows)]
    if missing:
        raise ValueError(f"every row needs keys {missing}; got keys {sorted(rows[0])}")
    numeric = all(isinstance(row["budget"], Real) for row in rows)
    steps = numeric and all(float(row["budget"]).is_integer() for row in rows)
    names = list(dict.fromkeys(str(row["budget"]) for row in rows))  # budget objects need not be hashable
    kind = rows[0].get("score_kind")
    has_return = all(row.get("mean_return") is not None for row in rows)
    if show_return is None:
        saturated = len(rows) > 1 and len({row["score"] for row in rows}) == 1
        show_return = has_return and (kind == "success_rate" or saturated)
    elif show_return and not has_return:
        raise ValueError("show_return=True needs 'mean_return' in every row")

    def position(budget: Any) -> float:
        return float(budget) if numeric else float(names.index(str(budget)))

    panels = [("score", "score_std", ylabel or SCORE_LABELS.get(kind, "score"))]
    if show_return:
        panels.append(("mean_return", "return_std", "mean return per episode"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, std_key, label_y) in zip(axes[0], panels, strict=True):
        for i, (name, ref) in enumerate((reference_lines or {}).items()):
            ref = {"score": ref} if isinstance(ref, Real) else ref
            value = ref.get(key)
            if value is None:
                continue
            color = _REFERENCE_COLORS[i % len(_REFERENCE_COLORS)]
            ax.axhline(value, linestyle="--", color=color, label=name)
            spread = ref.get(std_key)
            if spread:
                ax.axhspan(value - spread, value + spread, color=color, alpha=0.12)
        for i, label in enumerate(dict.fromkeys(row.get("label") for row in rows)):
            series = [row for row in rows if row.get("label") == label]
            if steps and label is None and any(row["budget"] == 0 for row in series):
                base = next(row for row in series if row["budget"] == 0)
                ax.errorbar([0.0], [base[key]], yerr=[base.get(std_key) or 0.0], marker="*", markersize=14,
                            capsize=4, linestyle="none", color="tab:orange", label="best-of-N (L_test = 0)",
                            zorder=3)  # fmt: skip
                label = "VGF"
                if all(row["budget"] == 0 for row in series):
                    continue
            ax.errorbar(
                [position(row["budget"]) for row in series],
                [row[key] for row in series],
                yerr=[row.get(std_key) or 0.0 for row in series],
                marker="o",
                capsize=4,
                label=label,
                color="tab:blue" if label == "VGF" else _SERIES_COLORS[i % len(_SERIES_COLORS)],
            )
        if steps:
            ax.set_xticks(sorted({int(row["budget"]) for row in rows}))
        elif not numeric:
            ax.set_xticks(range(len(names)), names)
        if key == "score" and kind == "success_rate":
            ax.set_ylim(-4, 104)  # the whole range of a rate, so 0 % reads as 0 % rather than as noise
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label_y)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium", wrap=True)
    note = "error bars and bands: ± std over episodes"
    fig.text(0.99, 0.01, note, ha="right", va="bottom", fontsize="x-small", color="gray")
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
