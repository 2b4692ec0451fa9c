"""``vgf-prob sweep RECIPE.toml``: a recipe's runs as Ray Tune trials, on this machine or a Ray cluster.

    vgf-prob sweep recipes/d4rl.toml --dry-run                      # the trials and their resources; no Ray
    vgf-prob sweep recipes/d4rl.toml --gpus-per-trial 0.25          # 4 runs per GPU, embedded Ray
    vgf-prob sweep recipes/d4rl.toml --grid 'alpha=[0.05,0.1]' --seeds 0 1 2
    vgf-prob sweep recipes/d4rl.toml --address auto --storage /shared/ray   # join a running cluster
    vgf-prob sweep recipes/d4rl.toml --resume                       # continue a stopped sweep

The same from Python: ``sweep("recipes/d4rl.toml", seeds=[0, 1], device="cpu")``. Needs the ``[sweep]``
extra (``ray[tune]``); ``--dry-run`` does not. Ray is imported only when a sweep starts.

Runs are `vgf_prob.rl.recipes` expansions, the same as ``recipes/reproduce.py``'s. Each trial is one run
(`train_trial`); it calls `vgf_prob.rl.run.experiment.run_training` in-process with the run's
`vgf_prob.rl.run.spec.TrainSpec`, in segments that end at each evaluation step ``eval_every, 2 eval_every,
..., steps``: a segment is the spec with ``steps=<segment end>`` (and ``resume`` once the run directory
holds a checkpoint), and the run's checkpoints make the segments one exact run (a resumed run equals an
uninterrupted one: weights, RNG streams and logs, since every segment end is an evaluation step and a
multiple of ``log_every``). After each segment the trial reports the evaluation's scores (by
`vgf_prob.rl.evaluate.policy_label`) with a Ray checkpoint holding the run's ``latest.pt``, ``train.csv``
and ``eval.csv``. A trial that fails for a reason that would fail again (a bad setting, missing data, a
checkpoint that does not fit, a diverging run: `is_deterministic`) reports its message once and ends; the
sweep lists it with the other failures and does not restart it. A trial that fails otherwise (an
exception, a killed or lost worker) is restarted up to ``max_failures`` times; the restarted trial copies
its last Ray checkpoint into the run directory (unless the directory holds a later checkpoint of its own,
e.g. on the same machine) and continues from it. ``--resume`` restores a stopped sweep with
``Tuner.restore`` (unfinished and errored trials continue from their checkpoints). Ray runs a trial in a
thread of its worker, where signals cannot be caught: a preempted Ray worker is a lost worker, and the
trial restarts from its last Ray checkpoint.

Run directories are the ones ``vgf-prob train`` writes (``<out_dir>/<task>[/<grid point>]/seed<k>``), so
``vgf-prob eval`` works on any trial. At the end the driver copies each trial's last Ray checkpoint into
its run directory when the directory is missing or behind (a trial that ran on another node without a
shared file system), then writes the report of `vgf_prob.rl.recipes.write_report` (results table,
summary next to the published numbers, score-vs-budget PNG): the code path of ``reproduce.py --summary``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgf_prob.rl.recipes import (
    RecipeError,
    Run,
    check_runs,
    expand_runs,
    load_recipe,
    log_every,
    out_dir,
    parse_grid,
    scores_at,
    select_runs,
    write_report,
)

CHECKPOINT_FILES = ("latest.pt", "train.csv", "eval.csv")
RAY_MISSING = "vgf-prob sweep needs Ray Tune: python -m pip install 'vgf-prob[sweep]' (or \"ray[tune]>=2.9\")"


class SweepError(RecipeError):
    """A sweep that cannot start, or trials that failed more often than ``max_failures``."""


@dataclass(frozen=True)
class Plan:
    """A sweep before it starts: the runs, the ``[run]`` settings, resources per trial and where Ray runs."""

    recipe: Path
    runs: list[Run]
    settings: dict[str, Any]
    cpus_per_trial: float
    gpus_per_trial: float
    address: str | None
    num_cpus: int
    num_gpus: int
    storage: str
    name: str
    out_dir: Path

    @property
    def threads(self) -> int:
        """torch CPU threads of a trial: its whole CPUs, at least 1."""
        return max(1, math.floor(self.cpus_per_trial))

    def local_problem(self) -> str | None:
        """Why the embedded Ray could never start a trial (None if it can, or on a cluster)."""
        if self.address is not None:
            return None
        if self.cpus_per_trial > self.num_cpus:
            return f"--cpus-per-trial {self.cpus_per_trial:g} exceeds the {self.num_cpus} CPUs of the embedded Ray"
        if self.gpus_per_trial > self.num_gpus:
            return (f"--gpus-per-trial {self.gpus_per_trial:g} but this machine has {self.num_gpus} GPU(s); pass "
                    "--device cpu, or --address to use a cluster's GPUs")  # fmt: skip
        return None

    @property
    def concurrent(self) -> int | None:
        """How many trials the embedded Ray runs at once (None on a cluster: it depends on the cluster)."""
        if self.address is not None:
            return None
        limits = [math.floor(self.num_cpus / self.cpus_per_trial + 1e-9)]
        if self.gpus_per_trial > 0:
            limits.append(math.floor(self.num_gpus / self.gpus_per_trial + 1e-9))
        return min(limits)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vgf-prob sweep`` options."""
    parser.add_argument("recipe", type=Path, help="a recipe TOML (recipes/d4rl.toml, recipes/ogbench.toml)")
    parser.add_argument("--tasks", nargs="+", help="only these tasks (or OGBench environments)")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=[V,...]",
                        help="VGFConfig field values to sweep (JSON list), added to the recipe's [grid]")  # fmt: skip
    parser.add_argument("--device", help="device of every run (default: the recipe's [run] device)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs Ray reserves per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float,
                        help="GPUs per trial, fractional to share one (0.25: 4 runs per GPU); "
                             "default 1 on cuda, else 0")  # fmt: skip
    parser.add_argument("--max-failures", type=int, default=2, help="restarts of a failed trial (default 2)")
    parser.add_argument("--address", help="a running Ray cluster: 'auto' or ray://host:port (default: embedded Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all this process may use)")
    parser.add_argument("--storage", help="Ray's experiment storage, a path or fsspec URL (default <out_dir>/tune)")
    parser.add_argument("--name", help="experiment name under --storage (default: the recipe's file name)")
    parser.add_argument("--resume", action="store_true", help="restore the stopped sweep --storage/--name")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their resources; no Ray")


def run_from_args(args: argparse.Namespace) -> None:
    """What ``vgf-prob sweep`` does with its parsed arguments (raises `RecipeError` for the user's mistakes)."""
    plan = make_plan(args.recipe, args.tasks, args.seeds, parse_grid(args.grid), args.device, args.cpus_per_trial,
                     args.gpus_per_trial, args.address, args.num_cpus, args.storage, args.name)  # fmt: skip
    if args.dry_run:
        print_plan(plan)
        return
    execute(plan, max_failures=args.max_failures, resume=args.resume)


def sweep(
    recipe: str | Path,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    device: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    storage: str | None = None,
    name: str | None = None,
    max_failures: int = 2,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
) -> dict[str, Path]:
    """Run a recipe's runs as Ray Tune trials; returns the report's paths (see `vgf_prob.rl.recipes.write_report`).

    Arguments as the ``vgf-prob sweep`` options; ``callbacks`` are extra ``ray.tune.Callback`` objects
    (e.g. a W&B or MLflow logger). Raises `SweepError` when trials failed more than ``max_failures`` times.
    """
    plan = make_plan(recipe, tasks, seeds, grid, device, cpus_per_trial, gpus_per_trial, address, num_cpus,
                     storage, name)  # fmt: skip
    return execute(plan, max_failures=max_failures, resume=resume, callbacks=callbacks)


# ============================================================================================== plan
def make_plan(
    recipe_path: str | Path,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    device: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    storage: str | None = None,
    name: str | None = None,
) -> Plan:
    """Expand and check the runs and the resources, without starting Ray; raises `SweepError`/`RecipeError`."""
    recipe = load_recipe(recipe_path)
    settings = dict(recipe["run"])
    if device is not None:
        settings["device"] = device
    device = settings.get("device", "cpu")
    runs = select_runs(expand_runs(recipe, grid), tasks, seeds)
    check_runs(runs)
    for r in runs:
        interval = int(settings["eval_every"])
        if interval % log_every(settings, r.steps):
            raise SweepError(f"{r.name}: [run] log_every {log_every(settings, r.steps)} must divide eval_every "
                             f"{interval} (each trial segment ends at an evaluation step, which must be a log "
                             "step too)")  # fmt: skip
    if gpus_per_trial is None:
        gpus_per_trial = 1.0 if device.startswith("cuda") else 0.0
    if not cpus_per_trial > 0:
        raise SweepError(f"--cpus-per-trial must be > 0, got {cpus_per_trial}")
    if gpus_per_trial < 0:
        raise SweepError(f"--gpus-per-trial must be >= 0, got {gpus_per_trial}")
    if device.startswith("cuda") and gpus_per_trial == 0:
        raise SweepError(f"the runs use device {device!r} but --gpus-per-trial is 0; give each trial a GPU share")
    if not device.startswith("cuda") and gpus_per_trial > 0:
        raise SweepError(f"--gpus-per-trial {gpus_per_trial} reserves GPUs that device {device!r} runs never use")
    local_cpus = len(os.sched_getaffinity(0))
    if num_cpus is not None and not 1 <= num_cpus:
        raise SweepError(f"--num-cpus must be >= 1, got {num_cpus}")
    num_cpus = local_cpus if num_cpus is None else num_cpus
    num_gpus = _local_gpus() if address is None else 0
    storage = storage or str(out_dir(recipe) / "tune")
    return Plan(Path(recipe_path), runs, settings, cpus_per_trial, gpus_per_trial, address, num_cpus, num_gpus,
                storage, name or Path(recipe_path).stem, out_dir(recipe))  # fmt: skip


def print_plan(plan: Plan) -> None:
    """One line per trial (name, steps, resources, run directory), then the totals and where they would run."""
    for r in plan.runs:
        print(f"{r.name}  steps {r.steps:,}  CPU {plan.cpus_per_trial:g}  GPU {plan.gpus_per_trial:g}  {r.out}")
    if plan.address is not None:
        where = f"on the Ray cluster at {plan.address}"
    elif plan.local_problem() is None:
        where = f"on an embedded Ray with {plan.num_cpus} CPUs and {plan.num_gpus} GPUs, {plan.concurrent} at once"
    else:
        where = f"not here: {plan.local_problem()}"
    print(f"{len(plan.runs)} trials, {sum(r.steps for r in plan.runs):,} gradient steps in all, {plan.threads} torch "
          f"thread(s) each, {where}; Ray storage {plan.storage}/{plan.name}")  # fmt: skip
    first = plan.runs[0]
    ends = report_steps(first.steps, int(plan.settings["eval_every"]))
    shown = ", ".join(f"{s:,}" for s in ends[:2]) + (f", ..., {ends[-1]:,}" if len(ends) > 2 else "")
    argv = first.spec(plan.settings, steps=ends[0], threads=plan.threads, progress=False).to_argv()
    print(f"each trial runs `vgf-prob train` in segments ending at steps {shown}; {first.name}'s first: "
          + shlex.join(["vgf-prob", *argv]))


# ============================================================================================== run
def execute(
    plan: Plan, max_failures: int = 2, resume: bool = False, callbacks: Sequence[Any] = ()
) -> dict[str, Path]:
    """Start (or join) Ray, run the trials, gather their run directories and write the report."""
    try:
        import ray
        from ray import tune
    except ImportError as err:
        raise SweepError(RAY_MISSING) from err
    if max_failures < 0:
        raise SweepError(f"--max-failures must be >= 0, got {max_failures}")
    if plan.local_problem() is not None:
        raise SweepError(plan.local_problem())
    experiment = f"{plan.storage.rstrip('/')}/{plan.name}"
    if resume and not tune.Tuner.can_restore(experiment):
        raise SweepError(f"--resume: no sweep to restore at {experiment}")
    if plan.address is None:
        ray.init(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, include_dashboard=False)
    else:
        ray.init(address=plan.address)
    try:
        runs = {r.name: r.to_dict() for r in plan.runs}
        trainable = tune.with_resources(tune.with_parameters(train_trial, runs=runs, settings=plan.settings,
                                                             threads=plan.threads),
                                        {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial})  # fmt: skip
        param_space = {"run": tune.grid_search(list(runs))}
        if resume:
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
            restored = {r.config["run"] for r in tuner.get_results()}
            if restored != set(runs):
                raise SweepError(
                    f"--resume continues the trials of {experiment} ({len(restored)}), but this selection has "
                    f"{len(runs)} runs, {len(set(runs) - restored)} of them new and {len(restored - set(runs))} "
                    "missing: pass the recipe, --tasks, --seeds and --grid the sweep started with"
                )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                            reuse_actors=True),  # one worker process (imports) for several trials
                run_config=tune.RunConfig(
                    name=plan.name, storage_path=plan.storage,
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    callbacks=[_progress_lines(), *callbacks],
                ),
            )  # fmt: skip
        grid = tuner.fit()
        for result in grid:
            if result.checkpoint is not None and result.config["run"] in runs:
                _gather(result.checkpoint, Path(runs[result.config["run"]]["out"]))
        failed = [(r.config["run"], r.error) for r in grid if r.error is not None]
        failed += [(r.config["run"], (r.metrics or {})["error"]) for r in grid if (r.metrics or {}).get("error")]
        finished = {r.config["run"] for r in grid
                    if r.error is None and (r.metrics or {}).get("done") and not (r.metrics or {}).get("error")}  # fmt: skip
    finally:
        ray.shutdown()
    paths = write_report(plan.runs, plan.out_dir, title=plan.name)
    stopped = [r.name for r in plan.runs if r.name not in finished and r.name not in dict(failed)]
    if stopped:
        shown = ", ".join(stopped[:3]) + (", ..." if len(stopped) > 3 else "")
        raise SweepError(f"the sweep stopped with {len(stopped)} of {len(plan.runs)} trials unfinished ({shown}); "
                         "continue it with --resume")  # fmt: skip
    if failed:
        lines = "; ".join(f"{name}: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"
                          for name, err in failed)  # fmt: skip
        raise SweepError(f"{len(failed)} of {len(plan.runs)} trials failed ({lines}); fix the cause and rerun with "
                         f"--resume (the report covers the others)")  # fmt: skip
    return paths


def report_steps(steps: int, eval_every: int) -> list[int]:
    """Where a trial's segments end: every multiple of ``eval_every`` below ``steps``, then ``steps``."""
    return [*range(eval_every, steps, eval_every), steps]


def train_trial(
    config: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any], threads: int
) -> None:
    """The Ray Tune function trainable of one run: ``runs[config["run"]]`` (`Run.to_dict`) under the
    recipe's ``[run]`` ``settings``, with ``threads`` torch threads.

    Restores the trial's last Ray checkpoint into the run directory when it is ahead of the directory's
    own checkpoint, then runs the run's spec segment by segment (`report_steps`) and reports after each:
    ``step``, ``start_step`` (where this attempt started), ``restored_step`` (the Ray checkpoint's step
    copied in, 0 if none) and the scores of the evaluation at ``step``, with a Ray checkpoint. An error that
    `is_deterministic` is reported once as ``error`` (the trial then ends) instead of being raised.
    """
    from ray import tune

    from vgf_prob.rl.run.experiment import run_training

    run = Run.from_dict(runs[config["run"]])  # execute() checked that every trial is among them
    restored = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if checkpoint_step(Path(folder)) > checkpoint_step(run.out):
                _copy_files(Path(folder), run.out)
                restored = checkpoint_step(run.out)
    start = checkpoint_step(run.out)
    stops = [s for s in report_steps(run.steps, int(settings["eval_every"])) if s > start]
    if not stops:  # the run was complete before this trial started
        _report(run, start, start, restored)
    for stop in stops:
        try:
            run_training(run.spec(settings, steps=stop, threads=threads, progress=False))
        except Exception as err:
            if not is_deterministic(err):
                raise
            tune.report({"step": checkpoint_step(run.out), "start_step": start, "restored_step": restored,
                         "error": f"{type(err).__name__}: {err}"})  # fmt: skip
            return
        _report(run, stop, start, restored)


def is_deterministic(err: BaseException) -> bool:
    """Whether ``err`` would happen again on a retry: a setting, the data, a checkpoint that does not fit,
    divergence; not a run directory held by another process (`RunDirBusy`)."""
    from vgf_prob.rl.checkpoint import CheckpointError, RunDirBusy
    from vgf_prob.rl.run.spec import TrainingSetupError
    from vgf_prob.rl.run.trainer import TrainingDiverged

    return isinstance(err, TrainingSetupError | CheckpointError | TrainingDiverged) and not isinstance(err, RunDirBusy)


def checkpoint_step(run_dir: Path) -> int:
    """The step of ``run_dir/latest.pt``, 0 when there is none."""
    from vgf_prob.rl.checkpoint import LATEST, load_checkpoint

    path = run_dir / LATEST
    return int(load_checkpoint(path)["step"]) if path.exists() else 0


def _report(run: Run, step: int, start: int, restored: int) -> None:
    from ray import tune

    metrics = {"step": step, "start_step": start, "restored_step": restored, **scores_at(run.out, step)}
    with tempfile.TemporaryDirectory() as folder:
        _copy_files(run.out, Path(folder))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _copy_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def _gather(checkpoint: Any, run_dir: Path) -> None:
    """Copy a finished trial's last checkpoint into its run directory when that is missing or behind."""
    with checkpoint.as_directory() as folder:
        if checkpoint_step(Path(folder)) > checkpoint_step(run_dir):
            _copy_files(Path(folder), run_dir)


def _trial_name(trial: Any) -> str:
    return trial.config["run"]


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _progress_lines() -> Any:
    """A ``ray.tune.Callback`` printing one line per finished, restarted or failed trial."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            if result.get("error"):
                print(f"[sweep] {trial} failed at step {result.get('step')}: {result['error']} (not retried: it "
                      "would fail the same way)", flush=True)  # fmt: skip
                return
            scores = ", ".join(f"{k} {v:.1f}" for k, v in result.items() if k.startswith(("BC", "best-of-N", "VGF")))
            print(f"[sweep] finished {trial}: step {result.get('step')}, {scores or 'no evaluation'}, "
                  f"{result.get('time_total_s', 0.0):.0f} s", flush=True)  # fmt: skip

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            step = (trial.last_result or {}).get("step", 0)
            print(f"[sweep] {trial} failed; restarting from its checkpoint at step {step} "
                  f"(failure {trial.num_failures})", flush=True)  # fmt: skip

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"[sweep] {trial} failed {trial.num_failures} times; giving up on it", flush=True)

    return TrialLines()
