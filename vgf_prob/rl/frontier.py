"""The compute frontier: every test-time operator of one checkpoint, scored against what it costs per action.

One trained agent acts with each `Setting` on the same seeded episodes (`vgf_prob.rl.evaluate.evaluate`):

- ``best-of-N``: N draws of the reference, the one of highest Q (no flow), at each N;
- ``VGF``: the agent's flow (Stein field, ParticleAdam) for L_test steps;
- ``GradStep``: plain value-gradient ascent (`vgf_prob.flows.ValueGradient`) with the same solver and L_test;
- ``SMC``: the agent's flow with the cloud resampled by exp(Q / alpha) before every step
  (`vgf_prob.flows.resampling.BoltzmannResampling`).

Each row holds the score with its episode interval and the cost per action counted while the episodes ran
(`vgf_prob.cost`: critic-pass equivalents, network rows by kind, milliseconds). Rows of several runs (seeds)
aggregate to rliable's interquartile mean with stratified bootstrap intervals (`aggregate_frontier`), and
`plot_frontier` draws score against both cost axes.

    rows = frontier_rows(agent, "reacher-mixed-v0", sweep_settings(agent.config.num_particles), run="seed0")
    plot_frontier(aggregate_frontier(rows_of_all_seeds), "frontier.png")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vgf_prob.cost import measure
from vgf_prob.flows import ValueGradient
from vgf_prob.flows.resampling import BoltzmannResampling
from vgf_prob.rl.aggregate import iqm_with_ci
from vgf_prob.rl.evaluate import COST_COLUMNS, evaluate, score_row

OPERATORS = ("best-of-N", "VGF", "GradStep", "SMC")


@dataclass(frozen=True)
class Setting:
    """One test-time operator at one size: ``operator`` (one of `OPERATORS`), N particles, L_test flow steps
    (0 for best-of-N), and for SMC the temperature ``alpha`` of its weights (None: the agent's ``config.alpha``)."""

    operator: str
    num_particles: int
    steps: int = 0
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"unknown test-time operator {self.operator!r}; expected one of {OPERATORS}")
        if isinstance(self.num_particles, bool) or not isinstance(self.num_particles, int) or self.num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {self.num_particles!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps (L_test) must be a whole number >= 0, got {self.steps!r}")
        if (self.operator == "best-of-N") != (self.steps == 0):
            raise ValueError(f"best-of-N takes no flow step and the flows take at least one; got {self}")

    @property
    def label(self) -> str:
        if self.operator == "best-of-N":
            return f"best-of-N N={self.num_particles}"
        return f"{self.operator} N={self.num_particles} L_test={self.steps}"

    def act_fn(self, agent: Any, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
        """``obs [n, O] -> actions [n, A]``: the agent acting with this operator."""
        field = ValueGradient() if self.operator == "GradStep" else None
        resampling = None
        if self.operator == "SMC":
            resampling = BoltzmannResampling(agent.config.alpha if self.alpha is None else self.alpha)
        return lambda obs: agent.act(obs, budget=self.steps, generator=generator, num_particles=self.num_particles,
                                     field=field, resampling=resampling)  # fmt: skip


def matched_particles(num_particles: int, steps: int, flow_steps: int) -> int:
    """best-of-N's N at the critic-pass equivalents of a flow of N particles and L steps with a K-step BC sampler:
    N (K + 1 + 2L) / (K + 1), rounded half up (a best-of-N particle costs K + 1, a flow step 2 per particle)."""
    return math.floor(num_particles * (flow_steps + 1 + 2 * steps) / (flow_steps + 1) + 0.5)


def sweep_settings(
    num_particles: int,
    particle_counts: Iterable[int] = (1, 5, 10, 20, 40, 80),
    budgets: Iterable[int] = (1, 2, 3, 5, 8),
    operators: Iterable[str] = OPERATORS,
    flow_steps: int | None = None,
) -> list[Setting]:
    """best-of-N at each of ``particle_counts`` (and, given the BC sampler's ``flow_steps`` K, at the N that
    costs what each flow of ``budgets`` costs: `matched_particles`), then each flow operator at
    N = ``num_particles`` and each L_test of ``budgets`` (the agent's N, as it was trained)."""
    operators, budgets = tuple(operators), tuple(budgets)
    sizes = set(particle_counts)
    if flow_steps is not None:
        sizes |= {matched_particles(num_particles, steps, flow_steps) for steps in budgets}
    settings = [Setting("best-of-N", n) for n in sorted(sizes)] if "best-of-N" in operators else []
    for operator in (op for op in operators if op != "best-of-N"):
        settings += [Setting(operator, num_particles, steps) for steps in budgets]
    return settings


def frontier_rows(
    agent: Any,
    env_name: str,
    settings: Sequence[Setting],
    *,
    num_episodes: int = 10,
    seed: int = 0,
    num_envs: int = 1,
    run: str = "",
    max_episode_steps: int | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score every setting on the same ``num_episodes`` seeded episodes (episode k resets with ``seed + k``)
    and count its cost; one row per setting, in order.

    Each setting's noise comes from its own generator seeded by ``seed``. Acting runs ``num_envs`` episodes in
    lockstep (1: one state per act call, the deployment case for ``ms_per_action``); ``max_episode_steps`` and
    ``env_kwargs`` go to the environments. A row is the `vgf_prob.rl.evaluate.ScoreRow` of the setting (the
    evaluation schema, with the episode interval ``score_low``/``score_high``, N and `COST_COLUMNS`: per action,
    critic-pass equivalents, wall and CPU milliseconds inside the act calls, rows by kind) and its context:
    ``env_name``, ``label``, ``operator``, ``run``, ``num_envs``.
    """
    rows = []
    for setting in settings:
        generator = torch.Generator(device=agent.device).manual_seed(seed)
        with measure() as cost:
            result = evaluate(setting.act_fn(agent, generator), env_name, num_episodes, seed, device=agent.device,
                              num_envs=num_envs, max_episode_steps=max_episode_steps, env_kwargs=env_kwargs,
                              progress=progress, label=setting.label)  # fmt: skip
        row = score_row(setting.operator, setting.steps, "steps", result, cost, setting.num_particles)
        rows.append({**row.to_dict(), "env_name": env_name, "label": setting.label, "operator": setting.operator,
                     "run": run, "num_envs": num_envs})  # fmt: skip
    return rows


def aggregate_frontier(rows: Sequence[Mapping[str, Any]], reps: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per setting label over runs (and tasks): rliable's IQM of the scores [runs, tasks] with its
    stratified bootstrap interval (`vgf_prob.rl.aggregate.iqm_with_ci`) as ``score``/``score_low``/
    ``score_high``, the cost columns averaged, and ``runs`` counted. Every run must have every task."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    table = []
    for label, group in groups.items():
        runs = sorted({row["run"] for row in group})
        tasks = sorted({row["env_name"] for row in group})
        cells = {(row["run"], row["env_name"]): row["score"] for row in group}
        missing = [(r, t) for r in runs for t in tasks if (r, t) not in cells]
        if missing or len(cells) != len(group):
            raise ValueError(
                f"{label}: every run needs exactly one row per task; missing or repeated {missing or 'rows'}"
            )
        iqm, low, high = iqm_with_ci([[cells[r, t] for t in tasks] for r in runs], reps=reps, seed=seed)
        first = group[0]
        table.append({
            "label": label, "operator": first["operator"], "num_particles": first["num_particles"],
            "budget": first["budget"], "runs": len(runs), "tasks": len(tasks), "score": iqm, "score_low": low,
            "score_high": high, **{c: sum(row[c] for row in group) / len(group) for c in COST_COLUMNS},
        })  # fmt: skip
    return table


def plot_frontier(
    rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "test-time compute frontier"
) -> Path:
    """Score (with its interval) against critic-pass equivalents per action and against CPU ms per action (process
    time in the act calls: steady on a shared machine, where wall time is not), both on a log x axis, one line
    per operator (best-of-N along N, the flows along L_test); written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, column, name in ((axes[0], "passes_per_action", "critic-pass equivalents per action"),
                               (axes[1], "cpu_ms_per_action", "CPU ms per action")):  # fmt: skip
        for operator in OPERATORS:
            # along the operator's own knob (N, then L_test): a noisy time axis shows as a path that turns back
            line = sorted((row for row in rows if row["operator"] == operator),
                          key=lambda row: (row["num_particles"], row["budget"]))
            if not line:
                continue
            x = [row[column] for row in line]
            y = [row["score"] for row in line]
            bars = None
            if all(row.get("score_low") is not None for row in line):
                bars = [[v - row["score_low"] for v, row in zip(y, line)],
                        [row["score_high"] - v for v, row in zip(y, line)]]  # fmt: skip
            axis.errorbar(x, y, yerr=bars, marker="o", capsize=3, label=operator)
        axis.set_xscale("log")
        axis.set_xlabel(name)
        axis.grid(True, which="both", alpha=0.3)
    aggregated = all("runs" in row for row in rows)  # `aggregate_frontier` rows: IQM with a bootstrap interval
    axes[0].set_ylabel("score: IQM over runs, 95 % bootstrap interval" if aggregated
                       else "score, 95 % interval over episodes")
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def frontier_from_runs(
    run_dirs: Sequence[str | Path],
    settings: Sequence[Setting] | None = None,
    *,
    particle_counts: Iterable[int] = (1, 5, 10, 20, 40, 80),
    budgets: Iterable[int] = (1, 2, 3, 5, 8),
    operators: Iterable[str] = OPERATORS,
    num_episodes: int = 50,
    seed: int = 0,
    num_envs: int = 1,
    out: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`frontier_rows` for the agent of each run directory (or checkpoint file; one run = one seed, labelled by
    its folder), on the same episodes, then `aggregate_frontier` over them. ``settings`` default to
    `sweep_settings` of ``particle_counts``, ``budgets`` and ``operators`` at the first agent's N and K
    (compute-matched best-of-N included). With ``out``, writes ``frontier.json`` (rows and aggregate) and
    ``frontier.png`` there. Returns ``(rows, aggregate)``."""
    import json

    rows = []
    for run_dir in run_dirs:
        agent, payload, path = load_run(run_dir, device)
        run = payload.get("run", {})
        if settings is None:
            settings = sweep_settings(agent.config.num_particles, particle_counts, budgets, operators,
                                      agent.config.flow_steps)  # fmt: skip
        timing = run.get("dataset_metadata", {}).get("success_timing")  # OGBench: as the data was labelled
        rows += frontier_rows(agent, run["env_name"], settings, num_episodes=num_episodes, seed=seed,
                              num_envs=num_envs, run=run_label(path),
                              env_kwargs=None if timing is None else {"success_timing": timing},
                              progress=progress)  # fmt: skip
    table = aggregate_frontier(rows)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "frontier.json").write_text(json.dumps({"rows": rows, "aggregate": table}, indent=2))
        plot_frontier(table, folder / "frontier.png", f"test-time compute frontier, {len(run_dirs)} run(s), "
                                                      f"{num_episodes} episodes")  # fmt: skip
    return rows, table


def run_label(path: Path) -> str:
    """The run name of a checkpoint path in frontier rows: its folder's name for a run directory's latest.pt
    (``runs/hopper/seed0/latest.pt`` -> ``seed0``, so seeds pair up across tasks), else the file's stem."""
    return path.parent.name if path.name == "latest.pt" else path.stem


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any], Path]:
    """``(agent on device, checkpoint payload, checkpoint path)`` of a run directory (its latest.pt) or checkpoint
    file."""
    from vgf_prob.rl.checkpoint import load_checkpoint, resolve_checkpoint
    from vgf_prob.rl.run.experiment import restore_agent

    path = resolve_checkpoint(run_dir)
    payload = load_checkpoint(path)
    return restore_agent(payload, device), payload, path


__all__ = ["COST_COLUMNS", "OPERATORS", "Setting", "aggregate_frontier", "frontier_from_runs", "frontier_rows",
           "load_run", "matched_particles", "plot_frontier", "run_label", "sweep_settings"]
