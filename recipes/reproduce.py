"""Run (or print) the paper's D4RL / OGBench suites from a recipe, one run after another, and report on them.

    python recipes/reproduce.py recipes/d4rl.toml --dry-run             # the vgf-prob commands, one a line
    python recipes/reproduce.py recipes/ogbench.toml --tasks cube-double-play-singletask-task2-v0 --seeds 0
    python recipes/reproduce.py recipes/d4rl.toml --grid 'alpha=[0.05,0.1]' --seeds 0 1
    python recipes/reproduce.py recipes/d4rl.toml --summary             # results table, summary, PNG

The recipe format, its expansion into runs and the report are `vgf_prob.rl.recipes`, shared with
``vgf-prob sweep`` (the same runs as Ray Tune trials, in parallel, on one machine or a cluster; it needs
the ``[sweep]`` extra). Each run is `vgf_prob.rl.run.experiment.run_training` of the run's spec, in this
process (the line printed before it is the equivalent ``vgf-prob train`` command). A run directory that
already holds a checkpoint is resumed, so re-running this script after a crash continues where each run
stopped; SIGTERM / SIGINT checkpoint the run in progress and exit with 143 / 130, naming the command to
continue (this script again). ``--summary`` writes ``results.csv``,
``results.json``, ``summary.json`` and ``score_vs_budget.png`` to the recipe's ``out_dir``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from vgf_prob.rl.recipes import (
    RecipeError,
    check_runs,
    expand_runs,
    load_recipe,
    out_dir,
    parse_grid,
    select_runs,
    write_report,
)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--tasks", nargs="+", help="only these tasks (or OGBench environments)")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=[V,...]",
                        help="VGFConfig field values to sweep (JSON list), added to the recipe's [grid]")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("--summary", action="store_true", help="results table, summary and PNG of the finished runs")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        runs = select_runs(expand_runs(recipe, parse_grid(args.grid)), args.tasks, args.seeds)
        check_runs(runs)  # before anything runs: invalid settings, two runs in one directory
    except RecipeError as err:
        print(f"reproduce.py: error: {err}", file=sys.stderr)
        return 2
    if args.summary:
        write_report(runs, out_dir(recipe), title=args.recipe.stem)
        return 0
    for r in runs:
        print(shlex.join(r.command(recipe["run"])), flush=True)
        if not args.dry_run:
            status = _train(r.spec(recipe["run"]), argv)
            if status:
                return status
    return 0


def _train(spec, argv: list[str] | None) -> int:
    """One run in this process; a stop by signal or an expected failure is one line and its exit status."""
    from vgf_prob.rl.checkpoint import CheckpointError
    from vgf_prob.rl.run.experiment import run_training
    from vgf_prob.rl.run.spec import TrainingSetupError
    from vgf_prob.rl.run.trainer import Preempted, TrainingDiverged

    try:
        run_training(spec)
    except Preempted as err:
        again = shlex.join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
        print(f"reproduce.py: stopped by signal {err.signum} at step {err.step}; continue with: {again}",
              file=sys.stderr)  # fmt: skip
        return err.exit_status
    except (TrainingSetupError, CheckpointError, TrainingDiverged, OSError) as err:
        print(f"reproduce.py: error: {spec.out}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
