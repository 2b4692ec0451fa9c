"""Run (or print) the paper's D4RL / OGBench suites from a recipe, and summarise finished runs.

    python recipes/reproduce.py recipes/d4rl.toml --dry-run             # the vgf-prob commands, one a line
    python recipes/reproduce.py recipes/ogbench.toml --tasks cube-double-play-singletask-task2-v0 --seeds 0
    python recipes/reproduce.py recipes/d4rl.toml --summary             # final scores vs published numbers

A recipe (TOML) has ``[run]`` (steps, seeds, evaluation, device, dataset_dir, out_dir), ``[config]``
(VGFConfig fields for every task) and either ``[tasks.<name>]`` (D4RL: one task each) or
``[envs.<dataset>]`` expanded to the single tasks ``run.tasks_per_env`` (OGBench). A task's config is
`vgf_prob.rl.config.preset` of its name, then ``[config]``, then the task's or env's ``config``.
Runs go to ``<out_dir>/<task>/seed<k>``; a run directory that already holds a checkpoint is resumed,
so re-running the script after a crash continues where each run stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgf_prob.rl.config import VGFConfig, preset


@dataclass(frozen=True)
class Run:
    """One (task, seed) training run of a recipe."""

    task: str
    seed: int
    steps: int
    dataset: str
    env: str
    task_id: int | None
    out: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    published: float | None = None

    def config(self) -> VGFConfig:
        """The run's VGFConfig: the task's preset, then the recipe's overrides."""
        return preset(self.task, **self.overrides)

    def command(self, run: dict[str, Any]) -> list[str]:
        """The ``vgf-prob train`` command line of this run."""
        cmd = ["vgf-prob", "train", "--dataset", self.dataset, "--env", self.env, "--preset", self.task,
               "--steps", str(self.steps), "--seed", str(self.seed), "--out", str(self.out),
               "--device", run.get("device", "cpu"), "--eval-every", str(run["eval_every"]),
               "--eval-episodes", str(run["eval_episodes"]), "--checkpoint-every", str(run["checkpoint_every"]),
               "--budgets", *map(str, run["budgets"])]  # fmt: skip
        if self.task_id is not None:
            cmd += ["--task-id", str(self.task_id)]
        if self.overrides:
            cmd += ["--config", *(f"{k}={json.dumps(v)}" for k, v in self.overrides.items())]
        if (self.out / "latest.pt").exists():
            cmd.append("--resume")
        return cmd


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The parsed TOML; raises ValueError when ``[run]`` or the task tables are missing."""
    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    if "run" not in recipe or not ("tasks" in recipe or "envs" in recipe):
        raise ValueError(f"{path}: a recipe needs a [run] table and [tasks.*] or [envs.*] tables")
    return recipe


def expand_runs(recipe: dict[str, Any]) -> list[Run]:
    """Every (task, seed) run of a recipe, in file order."""
    run, shared = recipe["run"], recipe.get("config", {})
    data_dir, out_dir = Path(run["dataset_dir"]).expanduser(), Path(run["out_dir"])
    runs = []
    for task, spec in recipe.get("tasks", {}).items():  # D4RL: <dataset_dir>/<task>.hdf5
        for seed in run["seeds"]:
            runs.append(Run(task, seed, spec.get("steps", run.get("steps", 1_000_000)),
                            str(data_dir / f"{task}.hdf5"), task, None, out_dir / task / f"seed{seed}",
                            {**shared, **spec.get("config", {})}, task, spec.get("published")))  # fmt: skip
    for env, spec in recipe.get("envs", {}).items():  # OGBench: <dataset_dir>/<env>.npz, one run per task
        stem, version = env.rsplit("-", 1)
        for task_id in run["tasks_per_env"]:
            task = f"{stem}-singletask-task{task_id}-{version}"
            for seed in run["seeds"]:
                runs.append(Run(task, seed, spec.get("steps", run.get("steps", 1_000_000)),
                                str(data_dir / f"{env}.npz"), task, task_id, out_dir / task / f"seed{seed}",
                                {**shared, **spec.get("config", {})}, env, spec.get("published")))  # fmt: skip
    return runs


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """Per group (D4RL task / OGBench environment): mean final score of each policy over finished runs."""
    groups: dict[str, dict[str, list[float]]] = {}
    published: dict[str, float | None] = {}
    for r in runs:
        summary_path = r.out / "summary.json"
        published[r.group] = r.published
        if not summary_path.exists():
            continue
        for row in json.loads(summary_path.read_text())["final_scores"]:
            label = row["policy"] if row["L_test"] is None else f"L_test={row['L_test']}"
            groups.setdefault(r.group, {}).setdefault(label, []).append(row["score"])
    rows = []
    for group, scores in groups.items():
        row: dict[str, Any] = {"task": group, "published VGF": published[group]}
        row.update({label: round(statistics.mean(v), 1) for label, v in scores.items()})
        row["runs"] = max(len(v) for v in scores.values())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--tasks", nargs="+", help="only these tasks (or OGBench environments)")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("--summary", action="store_true", help="table of the finished runs' final scores")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    runs = [r for r in expand_runs(recipe)
            if (not args.tasks or r.task in args.tasks or r.group in args.tasks)
            and (not args.seeds or r.seed in args.seeds)]  # fmt: skip
    if args.summary:
        from vgf_prob.rl.evaluate import format_table

        format_table(summarize(runs), title=str(args.recipe))
        return 0
    for r in runs:
        r.config()  # fail before anything runs if a task's settings are invalid
    for r in runs:
        cmd = r.command(recipe["run"])
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
