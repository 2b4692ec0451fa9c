"""Recipes: a TOML file naming a suite of training runs, its expansion into runs, and the report on them.

Both runners use this module: ``recipes/reproduce.py`` (one run after another) and ``vgf-prob sweep``
(`vgf_prob.rl.sweep`, the same runs as Ray Tune trials); each run is `Run.spec`, a
`vgf_prob.rl.run.spec.TrainSpec` given to `vgf_prob.rl.run.experiment.run_training`. A recipe has

- ``[run]``: ``seeds``, ``eval_every``, ``eval_episodes``, ``budgets`` (the L_test values evaluated),
  ``checkpoint_every``, ``dataset_dir``, ``out_dir``, optional ``steps`` (default 1M), ``device``
  (default cpu), ``log_every`` (default gcd(steps // 100, eval_every), which divides every evaluation step),
  and for OGBench ``tasks_per_env``;
- ``[config]``: VGFConfig fields shared by every task;
- ``[tasks.<task>]`` (D4RL: data ``<dataset_dir>/<task>.hdf5``) or ``[envs.<dataset>]`` (OGBench: data
  ``<dataset_dir>/<dataset>.npz``, one task per id of ``tasks_per_env``), each with optional ``steps``,
  ``config`` and the published numbers `REFERENCE_KEYS`;
- optional ``[grid]``: VGFConfig field -> list of values; every run is repeated for each point of the
  Cartesian product (e.g. ``alpha = [0.05, 0.1]``).

A run's config is `vgf_prob.rl.config.preset` of its task name, then ``[config]``, then the task's or
environment's ``config``, then its grid point. Runs write to ``<out_dir>/<task>[/<grid point>]/seed<k>``
(relative paths are taken from the current directory when the recipe is expanded).

The report on a set of runs reads each run directory's ``eval.csv`` and ``train.csv`` only, so it is
the same whichever runner (or machine) trained them:

- results: one row per run that has evaluated at least once: the final score (at the last evaluation),
  the best score (maximum over evaluations) and the mean of the last three evaluations (``last3``, the FQL /
  OGBench protocol) of each policy (named by `vgf_prob.rl.evaluate.policy_label`: ``BC reference``,
  ``best-of-N L_test=0``, ``VGF L_test=k``, and at the final evaluation the compute-matched
  ``best-of-M=<M> (matched to VGF L_test=k)``), the last evaluated
  step, and the loop's wall time summed from ``train.csv`` (``sum_rows (step - previous step) /
  steps_per_second``: training, evaluation and checkpoints of the kept history; start-up and work lost
  to a crash are not in it);
- summary: per group (a D4RL task, an OGBench environment) and grid point, over the runs that reached
  their last step: the group's score of seed ``k`` is the mean final score over the group's tasks run with
  that seed, and the summary gives mean ± std over seeds (population std, ``statistics.pstdev``) of the final
  and of the last-three scores, and rliable's interquartile mean of the final scores over seeds x the group's
  tasks with its 95 % stratified bootstrap interval (and, with several groups, over seeds x every task of the
  recipe: the ``all tasks`` rows), next to the recipe's published numbers;
- a PNG with one panel per task: mean final score ± std over seeds against L_test, one line per grid
  point, the BC reference dashed.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_KEYS = {"published": "published VGF", "fql": "published FQL"}
REQUIRED_RUN_KEYS = ("seeds", "eval_every", "eval_episodes", "budgets", "checkpoint_every", "dataset_dir", "out_dir")
RESULTS_CSV, RESULTS_JSON = "results.csv", "results.json"
SUMMARY_JSON, BUDGET_PNG = "summary.json", "score_vs_budget.png"


class RecipeError(ValueError):
    """A recipe (or a selection from it) that cannot be run: the message says what to fix."""


@dataclass(frozen=True)
class Run:
    """One training run of a recipe: a task, a seed and a grid point.

    ``overrides`` are the VGFConfig fields on top of the task's preset (grid values included); ``grid``
    the grid point alone; ``group`` the D4RL task or OGBench environment the summary averages over;
    ``references`` the published numbers of the group (`REFERENCE_KEYS`).
    """

    task: str
    seed: int
    steps: int
    dataset: str
    env: str
    task_id: int | None
    out: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    references: dict[str, float] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``<task>[-<grid point>]-seed<k>``: unique within a recipe."""
        return "-".join([self.task, *([grid_label(self.grid)] if self.grid else []), f"seed{self.seed}"])

    def config(self):
        """The run's VGFConfig: the task's preset, then the overrides (raises on an invalid field/value)."""
        from vgf_prob.rl.config import preset

        return preset(self.task, **self.overrides)

    def command(self, run: Mapping[str, Any]) -> list[str]:
        """The ``vgf-prob train`` command line of this run under the recipe's ``[run]`` settings ``run``."""
        return ["vgf-prob", *self.spec(run).to_argv()]

    def spec(self, run: Mapping[str, Any], steps: int | None = None, threads: int | None = None, progress: bool = True):
        """This run's `vgf_prob.rl.run.spec.TrainSpec` under the recipe's ``[run]`` settings (``steps`` instead of
        the run's, to stop early and continue later with the same logs); ``resume`` when the run directory holds
        a checkpoint."""
        from vgf_prob.rl.checkpoint import LATEST
        from vgf_prob.rl.run.spec import TrainSpec

        return TrainSpec(
            dataset=self.dataset, env=self.env, task_id=self.task_id, preset=self.task, overrides=self.overrides,
            steps=self.steps if steps is None else steps, seed=self.seed, out=str(self.out),
            device=run.get("device", "cpu"), eval_every=int(run["eval_every"]), eval_episodes=int(run["eval_episodes"]),
            budgets=tuple(run["budgets"]), checkpoint_every=int(run["checkpoint_every"]),
            log_every=log_every(run, self.steps), threads=threads, progress=None if progress else False,
            resume=(self.out / LATEST).exists(),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the path as text), e.g. for a Ray Tune trial's config; `from_dict` inverts it."""
        return {**asdict(self), "out": str(self.out)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Run:
        return cls(**{**values, "out": Path(values["out"])})


def log_every(run: Mapping[str, Any], steps: int) -> int:
    """Steps between log rows: ``[run] log_every``, else gcd(steps // 100, eval_every)."""
    if "log_every" in run:
        return int(run["log_every"])
    return math.gcd(max(1, steps // 100), int(run["eval_every"]))


def grid_label(point: Mapping[str, Any]) -> str:
    """``alpha=0.05,vgf_lr=0.1``: a grid point as a file and trial name."""
    return ",".join(f"{k}={json.dumps(v).replace(' ', '')}" for k, v in point.items())


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The parsed TOML; raises `RecipeError` when it does not read or lacks ``[run]`` keys or task tables."""
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML ({err})") from None
    if "run" not in recipe or not ("tasks" in recipe or "envs" in recipe):
        raise RecipeError(f"{path}: a recipe needs a [run] table and [tasks.*] or [envs.*] tables")
    missing = [k for k in REQUIRED_RUN_KEYS if k not in recipe["run"]]
    if "envs" in recipe and "tasks_per_env" not in recipe["run"]:
        missing.append("tasks_per_env")
    if missing:
        raise RecipeError(f"{path}: [run] lacks {', '.join(missing)}")
    return recipe


def out_dir(recipe: Mapping[str, Any]) -> Path:
    """The recipe's ``[run] out_dir`` as an absolute path (relative: from the current directory)."""
    return Path(recipe["run"]["out_dir"]).expanduser().absolute()


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["alpha=[0.05,0.1]", ...]`` (KEY=JSON list) -> ``{"alpha": [0.05, 0.1]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        try:
            values = json.loads(text) if sep and key else None
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list) or not values:
            raise RecipeError(f"--grid expects KEY=[value, ...] (a non-empty JSON list), got {item!r}")
        grid[key.strip()] = values
    return grid


def expand_runs(recipe: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None = None) -> list[Run]:
    """Every (task, grid point, seed) run of a recipe, in file order; ``grid`` adds to the recipe's ``[grid]``."""
    run, shared = recipe["run"], recipe.get("config", {})
    axes = {**recipe.get("grid", {}), **(grid or {})}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise RecipeError(f"[grid] {key} must be a non-empty list of values, got {values!r}")
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    data_dir = Path(run["dataset_dir"]).expanduser().absolute()
    default_steps = run.get("steps", 1_000_000)
    entries = []  # (task, dataset file, task id, group, spec)
    for task, spec in recipe.get("tasks", {}).items():
        entries.append((task, data_dir / f"{task}.hdf5", None, task, spec))
    for env, spec in recipe.get("envs", {}).items():
        stem, version = env.rsplit("-", 1)
        for task_id in run["tasks_per_env"]:
            entries.append((f"{stem}-singletask-task{task_id}-{version}", data_dir / f"{env}.npz", task_id, env, spec))
    runs = []
    for task, dataset, task_id, group, spec in entries:
        references = {k: spec[k] for k in REFERENCE_KEYS if k in spec}
        for point in points:
            folder = out_dir(recipe) / task / grid_label(point) if point else out_dir(recipe) / task
            for seed in run["seeds"]:
                runs.append(Run(task, seed, spec.get("steps", default_steps), str(dataset), task, task_id,
                                folder / f"seed{seed}", {**shared, **spec.get("config", {}), **point}, group,
                                references, point))  # fmt: skip
    return runs


def select_runs(
    runs: Sequence[Run], tasks: Sequence[str] | None = None, seeds: Sequence[int] | None = None
) -> list[Run]:
    """The runs of the given tasks (or groups: OGBench environments) and seeds; None keeps all.

    Raises `RecipeError` for a task or seed that matches no run.
    """
    known_tasks = {r.task for r in runs} | {r.group for r in runs}
    unknown = [t for t in tasks or () if t not in known_tasks]
    if unknown:
        raise RecipeError(f"unknown task(s) {unknown}; the recipe has {sorted({r.task for r in runs})}")
    unknown_seeds = [s for s in seeds or () if s not in {r.seed for r in runs}]
    if unknown_seeds:
        raise RecipeError(f"seed(s) {unknown_seeds} are not in the recipe's seeds {sorted({r.seed for r in runs})}")
    return [r for r in runs if (tasks is None or r.task in tasks or r.group in tasks)
            and (seeds is None or r.seed in seeds)]  # fmt: skip


def check_runs(runs: Sequence[Run]) -> None:
    """Fail before anything runs: an empty selection, two runs in one directory, or an invalid config."""
    if not runs:
        raise RecipeError("no runs selected")
    folders = [r.out for r in runs]
    twice = sorted({str(f) for f in folders if folders.count(f) > 1})
    if twice:
        raise RecipeError(f"several runs would write to {twice[0]} (repeated seeds?)")
    for r in runs:
        try:
            r.config()
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{r.name}: invalid config: {err}") from err


# ============================================================================================== report
def scores_at(run_dir: Path, step: int) -> dict[str, float]:
    """``{policy label: score}`` of the evaluation at ``step`` in ``run_dir/eval.csv`` (empty if none)."""
    from vgf_prob.rl.run.logs import read_eval_rows

    return {row.label: row.score for s, row in read_eval_rows(run_dir / "eval.csv") if s == step}


def run_results(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run that has evaluated: task, seed, grid point, step, complete, and per policy the final score,
    the best score and (with at least three evaluations of it) ``last3``, the mean of its last three evaluations
    (`vgf_prob.rl.aggregate.last_k_mean`, the FQL / OGBench protocol); then the loop's seconds."""
    from vgf_prob.rl.aggregate import last_k_mean
    from vgf_prob.rl.run.logs import read_eval_rows

    rows = []
    for r in runs:
        evals = read_eval_rows(r.out / "eval.csv")
        if not evals:
            continue
        last = max(step for step, _ in evals)
        history: dict[str, list[float]] = {}
        for _, e in sorted(evals, key=lambda item: item[0]):  # evaluation order
            history.setdefault(e.label, []).append(e.score)
        final = {e.label: e.score for step, e in evals if step == last}
        row: dict[str, Any] = {"task": r.task, "seed": r.seed}
        if r.grid:
            row["grid"] = grid_label(r.grid)
        row.update({"step": last, "complete": last == r.steps})
        row.update({f"final {k}": v for k, v in final.items()})
        row.update({f"best {k}": max(v) for k, v in history.items()})
        row.update({f"last3 {k}": last_k_mean(v) for k, v in history.items() if len(v) >= 3})
        row["seconds"] = round(_loop_seconds(r.out / "train.csv"), 1)
        rows.append(row)
    return rows


def summarize(runs: Sequence[Run], results: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per group and grid point, over the complete runs, per policy: mean ± std over seeds of the group's mean final
    score (``<policy>``) and of its mean last-three score (``last3 <policy>``), and rliable's interquartile mean of
    the final scores [seeds, the group's tasks] with its 95 % stratified bootstrap interval (``IQM <policy>``,
    `vgf_prob.rl.aggregate.iqm_with_ci`; seeds that ran every task of the group). With several groups, a last row
    per grid point (task ``all tasks``) gives the IQM over seeds x every task of the recipe.

    ``runs`` says how many of the group's runs are complete.
    """
    results = run_results(runs) if results is None else results
    by_run = {(row["task"], row.get("grid", ""), row["seed"]): row for row in results if row["complete"]}
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.group, grid_label(r.grid)), []).append(r)
    rows = []
    for (group, point), members in groups.items():
        done = [by_run[key] for r in members if (key := (r.task, point, r.seed)) in by_run]
        row: dict[str, Any] = {"task": group}
        if point:
            row["grid"] = point
        row["runs"] = f"{len(done)}/{len(members)}"
        row.update({label: members[0].references.get(key) for key, label in REFERENCE_KEYS.items()
                    if any(key in r.references for r in runs)})  # fmt: skip
        seeds = sorted({d["seed"] for d in done})
        row["seeds"] = len(seeds)
        for label in dict.fromkeys(k[len("final "):] for d in done for k in d if k.startswith("final ")):
            for prefix, name in (("final ", label), ("last3 ", f"last3 {label}")):
                per_seed = [statistics.mean(v) for s in seeds
                            if (v := [d[prefix + label] for d in done if d["seed"] == s and prefix + label in d])]
                if per_seed:
                    row[name] = f"{statistics.mean(per_seed):.1f} ± {statistics.pstdev(per_seed):.1f}"
            row[f"IQM {label}"] = _iqm_text(done, [r.task for r in members], label)
        rows.append(row)
    if len({group for group, _ in groups}) > 1:
        rows += _recipe_iqm_rows(runs, list(by_run.values()))
    return rows


def _iqm_text(done: Sequence[Mapping[str, Any]], tasks: Sequence[str], label: str) -> str | None:
    """``IQM [low, high]`` of the final ``label`` scores [seeds, tasks] of the seeds that ran every task (None:
    no such seed)."""
    from vgf_prob.rl.aggregate import iqm_with_ci

    tasks = list(dict.fromkeys(tasks))
    cells = {(d["seed"], d["task"]): d[f"final {label}"] for d in done if f"final {label}" in d}
    seeds = sorted({s for s, _ in cells if all((s, t) in cells for t in tasks)})
    if not seeds:
        return None
    iqm, low, high = iqm_with_ci([[cells[s, t] for t in tasks] for s in seeds])
    return f"{iqm:.1f} [{low:.1f}, {high:.1f}]"


def _recipe_iqm_rows(runs: Sequence[Run], done: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per grid point: the IQM over seeds x every task of the recipe, per policy (`_iqm_text`)."""
    rows = []
    for point in dict.fromkeys(grid_label(r.grid) for r in runs):
        mine = [d for d in done if d.get("grid", "") == point]
        row: dict[str, Any] = {"task": "all tasks", **({"grid": point} if point else {})}
        row["runs"] = f"{len(mine)}/{sum(grid_label(r.grid) == point for r in runs)}"
        tasks = [r.task for r in runs if grid_label(r.grid) == point]
        for label in dict.fromkeys(k[len("final "):] for d in mine for k in d if k.startswith("final ")):
            row[f"IQM {label}"] = _iqm_text(mine, tasks, label)
        rows.append(row)
    return rows


def write_report(runs: Sequence[Run], out_dir: str | Path, title: str, print_tables: bool = True) -> dict[str, Path]:
    """Results table (CSV + JSON), summary (JSON) and the score-vs-budget PNG in ``out_dir``; prints the tables.

    Returns the paths written by kind (``results_csv``, ``results_json``, ``summary``, ``plot``); the
    plot only when some run is complete.
    """
    from vgf_prob.rl.evaluate import format_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = run_results(runs)
    summary = summarize(runs, results)
    paths = {"results_csv": out / RESULTS_CSV, "results_json": out / RESULTS_JSON, "summary": out / SUMMARY_JSON}
    columns = list(dict.fromkeys(k for row in results for k in row))
    with paths["results_csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(results)
    paths["results_json"].write_text(json.dumps(results, indent=2))
    paths["summary"].write_text(json.dumps(summary, indent=2))
    plot = plot_score_vs_budget(runs, results, out / BUDGET_PNG, title)
    if plot is not None:
        paths["plot"] = plot
    if print_tables:
        print(f"{title}: {len(results)} of {len(runs)} runs evaluated")
        format_table(results)
        print(f"{title}: final and last-3 scores, mean ± std over seeds of complete runs; IQM [95 % CI] of final")
        format_table(summary)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def plot_score_vs_budget(
    runs: Sequence[Run], results: Sequence[Mapping[str, Any]], out_png: Path, title: str
) -> Path | None:
    """One panel per task: mean final score ± std over complete seeds against L_test; None if nothing is complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [row for row in results if row["complete"]]
    tasks = list(dict.fromkeys(r.task for r in runs if any(row["task"] == r.task for row in complete)))
    if not tasks:
        return None
    references = {r.task: r.references.get("published") for r in runs if r.group == r.task}
    cols = min(len(tasks), 5)
    rows_n = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 2.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        mine = [row for row in complete if row["task"] == task]
        for point in dict.fromkeys(row.get("grid", "") for row in mine):
            group = [row for row in mine if row.get("grid", "") == point]
            budgets = sorted({b for row in group for b in _budget_columns(row)})
            means, stds = [], []
            for b in budgets:
                values = [row[_budget_columns(row)[b]] for row in group if b in _budget_columns(row)]
                means.append(statistics.mean(values))
                stds.append(statistics.pstdev(values))
            label = f"VGF {point}" if point else "VGF"
            line = ax.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, label=label)
            bc = [row["final BC reference"] for row in group if "final BC reference" in row]
            if bc:
                ax.axhline(statistics.mean(bc), linestyle="--", color=line[0].get_color(), alpha=0.6,
                           label=f"BC {point}".strip())  # fmt: skip
        if references.get(task) is not None:
            ax.axhline(references[task], linestyle=":", color="black", label="published VGF")
        ax.set_title(f"{task} ({len({row['seed'] for row in mine})} seeds)", fontsize=8)
        ax.set_xticks(sorted({b for row in mine for b in _budget_columns(row)}))
        ax.set_xlabel("L_test (flow steps; 0 = best-of-N)")
        ax.set_ylabel("final score")
        ax.legend(fontsize=6)
    fig.suptitle(f"{title}: final score, mean ± std over complete seeds")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _budget_columns(row: Mapping[str, Any]) -> dict[int, str]:
    """``{L_test: column}`` of a results row's ``final <policy> L_test=<k>`` columns."""
    return {int(m.group(1)): k for k in row if (m := re.fullmatch(r"final .+ L_test=(\d+)", k))}


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _loop_seconds(train_log: Path) -> float:
    """Wall time of the kept log rows: sum of (step - previous row's step) / steps_per_second."""
    total, previous = 0.0, 0
    for row in _read_csv(train_log):
        step = int(row["step"])
        total += (step - previous) / float(row["steps_per_second"])
        previous = step
    return total
