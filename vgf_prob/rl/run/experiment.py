"""Running a job from its description: `run_training(spec)` and `evaluate_checkpoint`, the API behind the CLI.

`run_training` resolves a `TrainSpec` (with ``--resume``: the checkpoint's own spec, see
`vgf_prob.rl.run.spec.merge_for_resume`), loads the data (`load_dataset`), builds the config (`build_config`)
and calls `vgf_prob.rl.run.trainer.train`. The CLI, the sweep's Ray trials and ``recipes/reproduce.py`` all
make this one call; every expected failure is an exception with a one-line message (`TrainingSetupError`,
`vgf_prob.rl.checkpoint.CheckpointError`, `TrainingDiverged`, `Preempted`, OSError).

`QUICKSTART` is ``vgf-prob train`` without arguments, as a spec (3 min 35 s on 2 CPU cores from a fresh cache,
measured): a D4RL-format Reacher dataset generated offline by `vgf_prob.rl.gym_generate` (cached, about a
second): a scripted expert whose every action is replaced, with probability 1/2, by full torque on both
joints (``reacher-spin-v0``, `GENERATED_EPISODES` episodes: two far-apart modes whose mean action is poor, the
regime expressive references are for; the choice, with the peers measured first: benchmarks/main_job_search.md). The paper's D4RL setting (Stein variant, N = 10,
K = 10, TD targets with the min over the two heads, the flow with their mean, vgf_lr 0.1, alpha 0.1) with
2 x 128 networks instead of 4 x 512 and L_train = 1 instead of 5 (2.3x cheaper per update); then the BC
reference, best-of-N (L_test = 0), VGF (L_test > 0) and the best-of-M matched to each VGF budget's cost on
the same seeded episodes, every ``eval_every`` steps, scored as D4RL scores: 0 = uniform random actions,
100 = the scripted expert (the 3 min 35 s predate the matched rows: about 12 CPU s more). One torch thread: the
networks are small, and on a busy 2-core machine OpenMP oversubscription made an update 16x slower with 2
threads than with 1. The search that chose this: benchmarks/main_job_search.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from vgf_prob.rl.checkpoint import CheckpointError, load_checkpoint, load_latest, resolve_checkpoint
from vgf_prob.rl.run.spec import TrainingSetupError, TrainSpec, merge_for_resume

GENERATED_EPISODES = 200
"""Episodes of a generated dataset named by ``--dataset`` (e.g. ``reacher-mixed-v0``; 9,800 transitions)."""

QUICKSTART = TrainSpec(
    dataset="reacher-spin-v0", steps=3000, eval_every=1000, eval_episodes=50, budgets=(0, 1, 2, 3, 5, 8), threads=1,
    overrides={"variant": "stein", "target_aggregation": "min", "flow_aggregation": "mean",
               "critic_hidden_dims": (128, 128), "bc_hidden_dims": (128, 128), "train_budget": 1, "vgf_lr": 0.1,
               "alpha": 0.1},
)  # fmt: skip
QUICKSTART_NOTE = (
    "Reacher: D4RL score 0 = uniform random actions, 100 = the scripted expert; the data's behaviour scores -99 "
    "(half its actions full torque). ± is the std over the evaluation episodes"
)


@dataclasses.dataclass
class Experiment:
    """`run_training`'s result: the loop's `vgf_prob.rl.run.trainer.TrainResult`, the spec it ran, and the
    seconds spent loading the data."""

    result: Any
    spec: TrainSpec
    dataset_seconds: float


def run_training(spec: TrainSpec, say: Any = print) -> Experiment:
    """Run the training job ``spec`` describes; ``say`` prints the two lines about the data and the run directory.

    With ``spec.resume`` every setting not given comes from the checkpoint in ``spec.out`` (default: the
    newest ``runs/<dataset>-seed<seed>-*``); a given one that differs is refused by name, except those of
    `vgf_prob.rl.run.spec.RESUME_MAY_CHANGE`.
    """
    from vgf_prob.rl.run.run_dir import check_device, check_run_dir
    from vgf_prob.rl.run.trainer import train

    if spec.resume:
        spec = resume_spec(spec)
    spec = spec.resolved()
    check_device(spec.device)  # before the data is loaded (or generated)
    if spec.out is not None:
        check_run_dir(spec.out, spec.resume)
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    dataset, env_name, name = load_dataset(spec.dataset, spec.env, spec.task_id, spec.device)
    seconds = time.perf_counter() - t0
    config = build_config(spec.preset, name, spec.overrides, spec.preset_source)
    spec = dataclasses.replace(spec, env=env_name, out=spec.out or str(new_run_dir(name, spec.seed)))
    if env_name is None:
        say(f"vgf-prob: no environment known for {spec.dataset!r}; training without evaluation (pass --env)")
    say(f"dataset {name}: {len(dataset)} transitions, obs {dataset.obs_dim}, actions {dataset.action_dim} "
        f"({seconds:.0f} s)\nrun directory {spec.out}")  # fmt: skip
    try:
        result = train(config, dataset, spec)
    except OSError as err:
        if not (Path(spec.out) / "latest.pt").exists():
            raise
        hint = f"; the run continues from its last checkpoint with: vgf-prob train --resume --out {spec.out}"
        raise OSError(err.errno, f"{err.strerror or err}{hint}", err.filename) from err
    return Experiment(result, spec, seconds)


def resume_spec(given: TrainSpec) -> TrainSpec:
    """The spec a ``--resume`` runs: the checkpoint's, with the given fields `merge_for_resume` allows."""
    out = Path(given.out) if given.out is not None else newest_run_dir(given)
    payload = load_latest(out)
    if "spec" not in payload:
        raise CheckpointError(f"{out}'s checkpoint does not record its run settings (written before vgf-prob 0.2); "
                              "start a new run")  # fmt: skip
    saved = TrainSpec.from_dict(payload["spec"])
    return merge_for_resume(saved, dataclasses.replace(given, out=str(out)), payload["config"])


def new_run_dir(name: str, seed: int) -> Path:
    """A new ``runs/<name>-seed<seed>-<time>``."""
    return Path("runs") / f"{name}-seed{seed}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def newest_run_dir(spec: TrainSpec) -> Path:
    """The newest ``runs/<dataset name>-seed<seed>-*`` (the quick start's name without a dataset)."""
    name = Path(spec.dataset or QUICKSTART.dataset).stem.replace("/", "-")
    prefix = f"{name}-seed{0 if spec.seed is None else spec.seed}-"
    runs = sorted(p for p in Path("runs").glob(prefix + "*") if p.is_dir())
    if not runs:
        raise TrainingSetupError(f"--resume: no run directory runs/{prefix}* to resume (pass --out)")
    return runs[-1]


# ============================================================================================ data
def load_dataset(
    spec: str | None, env: str | None = None, task_id: int | None = None, device: str = "cpu"
) -> tuple[Any, str | None, str]:
    """``(dataset, env name to evaluate in or None, run name)`` for a dataset argument.

    ``spec`` is a D4RL ``.hdf5``/``.h5`` file, an OGBench ``.npz`` file, a Minari id (``a/b/c-v0`` present in
    the local store), a generated dataset's name (`vgf_prob.rl.gym_generate`, made and cached on first use)
    or an OGBench dataset name (looked up in ``~/.ogbench/data``). `TrainingSetupError` when it is none.
    """
    from vgf_prob.rl import data, gym_generate

    if spec is None:
        raise TrainingSetupError("no dataset given (--dataset)")
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    try:
        if suffix in (".hdf5", ".h5", ".npz"):
            return _load_file(path, env, task_id, device)
        if path.exists():
            raise TrainingSetupError(f"{path}: expected a .hdf5/.h5 (D4RL) or .npz (OGBench) file")
        if re.fullmatch(gym_generate.NAME_PATTERN, spec):
            file = gym_generate.ensure_gym_dataset(spec, GENERATED_EPISODES)
            return data.load_d4rl_hdf5(file, env_name=spec, device=device), env or spec, spec
        if "/" in spec and not spec.startswith((".", "/", "~")):
            return data.load_minari(_local_minari(spec), device=device), env, spec.replace("/", "-")
        if os.sep in spec or spec.startswith((".", "~")):
            raise TrainingSetupError(f"dataset not found: {path}")
        return _load_ogbench_name(spec, env, task_id, device)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, TrainingSetupError):
            raise
        raise TrainingSetupError(str(err)) from err


def _load_file(path: Path, env: str | None, task_id: int | None, device: str) -> tuple[Any, str | None, str]:
    from vgf_prob.rl import data

    if not path.is_file():
        raise TrainingSetupError(f"dataset file not found: {path}")
    if path.suffix.lower() == ".npz":
        dataset, _ = data.load_ogbench(path, task_id=task_id, device=device)
        name = dataset.metadata["env_name"]
        return dataset, name if env is None else env, name
    env = _d4rl_name_from_file(path) if env is None else env
    return data.load_d4rl_hdf5(path, env_name=env, device=device), env, path.stem if env is None else env


def _local_minari(spec: str) -> str:
    from vgf_prob.rl.minari_data import local_minari_ids, minari_root

    if spec not in local_minari_ids():
        raise TrainingSetupError(
            f"Minari dataset {spec!r} is not in the local store {minari_root()} (vgf-prob never downloads; "
            f"local ids: {local_minari_ids() or 'none'})"
        )
    return spec


def _load_ogbench_name(name: str, env: str | None, task_id: int | None, device: str) -> tuple[Any, str, str]:
    from vgf_prob.rl.data import load_ogbench
    from vgf_prob.rl.ogbench_data import DEFAULT_OGBENCH_DIR, ogbench_names

    try:
        base, _ = ogbench_names(name, task_id)
    except ValueError as err:
        raise TrainingSetupError(
            f"{name!r} is neither an existing file, a Minari id nor an OGBench dataset name ({err})"
        ) from err
    if not (Path(DEFAULT_OGBENCH_DIR).expanduser() / f"{base}.npz").is_file():
        env_id = re.sub(r"-play-v(\d+)$", r"-v\1", base)
        raise TrainingSetupError(
            f"OGBench dataset {base}.npz not found in {DEFAULT_OGBENCH_DIR} (vgf-prob never downloads); place the "
            f"official file there, or make one with `vgf-prob data generate --env {env_id}` and pass its .npz path"
        )
    dataset, _ = load_ogbench(name, task_id=task_id, device=device)
    single = dataset.metadata["env_name"]
    return dataset, env or single, single


def _d4rl_name_from_file(path: Path) -> str | None:
    """``hopper_medium-v2.hdf5`` / ``hopper-medium-v2.hdf5`` -> ``hopper-medium-v2`` when it is a known name."""
    from vgf_prob.rl.envs import resolve_env_name

    candidate = path.stem.replace("_", "-")
    try:
        resolve_env_name(candidate)
    except ValueError:
        return None
    return candidate


# ============================================================================================ config
def build_config(
    preset_name: str | None, dataset_name: str, overrides: Mapping[str, Any], preset_source: str = "offline"
):
    """The run's `VGFConfig`: ``preset_name`` (or the dataset's preset when one matches) from the authors'
    ``preset_source`` script ("offline" or "offline-to-online"), then ``overrides`` (typed values)."""
    from vgf_prob.rl.config import PRESET_SOURCES, VGFConfig, preset

    known = PRESET_SOURCES[preset_source]
    values = dict(overrides)
    try:
        if preset_name is not None:
            if not any(preset_name == k or preset_name.startswith(k + "-") for k in known):
                raise TrainingSetupError(
                    f"unknown preset {preset_name!r} ({preset_source}); known presets: {', '.join(sorted(known))}"
                )
            return preset(preset_name, preset_source, **values)
        try:
            return preset(dataset_name, preset_source, **values)
        except ValueError as err:
            if "no VGF preset" not in str(err):
                raise
            return VGFConfig.from_dict(values)
    except TrainingSetupError:
        raise
    except (TypeError, ValueError) as err:
        raise TrainingSetupError(f"bad --config: {err}") from err


def resolved_config(spec: TrainSpec):
    """The config a spec would train with, from names alone (no data is read); a ``preset`` without a
    ``dataset`` shows that preset as a full-size run would use it."""
    source = "offline" if spec.preset_source is None else spec.preset_source
    name = spec.preset if spec.dataset is None else Path(spec.dataset).stem
    return build_config(spec.preset, name or "", spec.overrides, source)


# ============================================================================================ evaluation
def restore_agent(payload: Mapping[str, Any], device: str = "cpu") -> Any:
    """The `VGFAgent` of a checkpoint payload (config, dimensions, weights and optimisers): the one way back."""
    from vgf_prob.rl.agent import VGFAgent

    try:
        return VGFAgent.from_training_state(payload["agent"], device=device)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint's agent does not load: {err}") from err


def evaluate_checkpoint(
    checkpoint: str | Path,
    env: str | None = None,
    episodes: int = 10,
    budgets: Sequence[float] | None = None,
    budget_type: str = "steps",
    max_flow_steps: int = 20,
    out: str | Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> tuple[list[Any], Path]:
    """``vgf-prob eval``: `compare_policies` on a checkpoint (``budgets`` None: 0 and the trained L_test);
    writes ``eval-step<N>.json`` (no budgets) or ``budget_sweep-<type>-step<N>.json`` and ``.png`` to ``out``
    (default: the checkpoint's folder), prints the table; returns the `ScoreRow` objects and the JSON path."""
    import json

    import torch

    from vgf_prob.rl.evaluate import compare_policies, format_scores, make_budget
    from vgf_prob.rl.run.run_dir import check_device, check_env

    check_device(device)
    try:
        for value in budgets or ():
            make_budget(value, budget_type, max_flow_steps)
    except ValueError as err:
        raise TrainingSetupError(f"--budgets: {err}") from err
    path = resolve_checkpoint(checkpoint)
    payload = load_checkpoint(path)
    run = payload.get("run", {})
    if threads is None and run.get("threads") is not None:  # the same default as the run's training
        threads = run["threads"]
    if threads is not None:
        torch.set_num_threads(threads)
    env_name = run.get("env_name") if env is None else env
    if env_name is None:
        raise TrainingSetupError(f"{path} does not record an environment; pass --env")
    agent = restore_agent(payload, device)
    timing = run.get("dataset_metadata", {}).get("success_timing")  # OGBench: evaluate as the data was labelled
    env_kwargs = {} if timing is None else {"success_timing": timing}
    check_env(env_name, run["obs_dim"], run["action_dim"], env_kwargs)
    sweep = budgets is not None
    budgets = budgets if sweep else sorted({0, agent.config.acting_budget})
    rows = compare_policies(agent, env_name, budgets, episodes, seed, payload["step"], budget_type, max_flow_steps,
                            env_kwargs=env_kwargs, progress=progress)  # fmt: skip
    kind = f"test-time {budget_type} budget sweep" if sweep else "BC, best-of-N and VGF"
    format_scores(rows, f"{env_name}: {kind}, {path} (step {payload['step']})", print_table=True)
    folder = Path(out) if out is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / (f"budget_sweep-{budget_type}-step{payload['step']}" if sweep else f"eval-step{payload['step']}")
    report = {"checkpoint": str(path), "step": payload["step"], "env_name": env_name, "budget_type": budget_type,
              "episodes": episodes, "seed": seed, "rows": [r.to_dict() for r in rows]}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    if sweep:
        _plot_sweep(rows, stem.with_suffix(".png"), env_name, budget_type, payload["step"], episodes)
    return rows, stem.with_suffix(".json")


def evaluate_frontier(
    runs: Sequence[str | Path],
    particles: Sequence[int],
    budgets: Sequence[float],
    operators: Sequence[str],
    episodes: int,
    seed: int,
    out: str | Path,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """``vgf-prob eval RUN [RUN ...] --frontier``: `vgf_prob.rl.frontier.frontier_from_runs` of the runs (one per
    seed) at best-of-N sizes ``particles`` and flow L_test ``budgets`` (whole numbers >= 1), on ``threads`` torch
    threads (default 1: the deployment case of the ms columns); prints the aggregate table, returns ``out``."""
    import torch

    from vgf_prob.rl.evaluate import format_table
    from vgf_prob.rl.frontier import OPERATORS, frontier_from_runs
    from vgf_prob.rl.run.run_dir import check_device

    if any(float(b) < 1 or not float(b).is_integer() for b in budgets):
        raise TrainingSetupError(f"--frontier: --budgets are the flows' L_test, whole numbers >= 1; got {budgets}")
    if unknown := [op for op in operators if op not in OPERATORS]:
        raise TrainingSetupError(f"--operators: unknown {unknown}; expected any of {', '.join(OPERATORS)}")
    check_device(device)
    _check_frontier_runs(runs)
    torch.set_num_threads(1 if threads is None else threads)
    _, table = frontier_from_runs(runs, particle_counts=particles, budgets=[int(b) for b in budgets],
                                  operators=operators, num_episodes=episodes, seed=seed, out=out, device=device,
                                  progress=progress)  # fmt: skip
    columns = ("label", "runs", "tasks", "score", "score_low", "score_high", "passes_per_action", "cpu_ms_per_action")
    format_table([{c: row[c] for c in columns} for row in table], title="test-time frontier (IQM over runs)")
    return Path(out)


def _check_frontier_runs(runs: Sequence[str | Path]) -> None:
    """Before any episode: the runs' (name, environment) cells fill a [runs, tasks] grid exactly once each, as
    the frontier's IQM over runs and tasks needs (runs pair up by `vgf_prob.rl.frontier.run_label`)."""
    from vgf_prob.rl.frontier import run_label

    cells = []
    for run in runs:
        path = resolve_checkpoint(run)
        env_name = load_checkpoint(path).get("run", {}).get("env_name")
        if env_name is None:
            raise TrainingSetupError(f"{path} does not record an environment; the frontier needs it")
        cells.append((run_label(path), env_name))
    names, tasks = {name for name, _ in cells}, {task for _, task in cells}
    if len(set(cells)) != len(cells) or len(cells) != len(names) * len(tasks):
        raise TrainingSetupError(f"--frontier: each run name needs one run of every task (names are run folders, "
                                 f"e.g. seed0); got {sorted(cells)}")  # fmt: skip


def _plot_sweep(rows: list[Any], png: Path, env_name: str, budget_type: str, step: int, episodes: int) -> None:
    from vgf_prob.rl.plots import plot_budget_sweep

    from vgf_prob.rl.evaluate import matched_budget

    bc = [r.to_dict() for r in rows if r.budget is None and matched_budget(r.policy) is None]
    points = [r.to_dict() for r in rows if r.budget is not None]
    points += [{**r.to_dict(), "budget": matched_budget(r.policy), "label": "best-of-M at VGF's cost (matched)"}
               for r in rows if matched_budget(r.policy) is not None]  # drawn at the L_test they are matched to
    xlabel = "L_test (flow steps)" if budget_type == "steps" else f"{budget_type} budget"
    plot_budget_sweep(points, png, reference_lines={"BC reference": bc[0]} if bc else None, xlabel=xlabel,
                      title=f"{env_name}: checkpoint after {step} training steps, {episodes} episodes per point")  # fmt: skip
