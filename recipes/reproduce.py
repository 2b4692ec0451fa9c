"""Run (or print) the paper's D4RL / OGBench suites from a recipe, one run after another, and report on them.

    python recipes/reproduce.py recipes/d4rl.toml --dry-run             # the vgf-prob commands, one a line
    python recipes/reproduce.py recipes/ogbench.toml --tasks cube-double-play-singletask-task2-v0 --seeds 0
    python recipes/reproduce.py recipes/d4rl.toml --grid 'alpha=[0.05,0.1]' --seeds 0 1
    python recipes/reproduce.py recipes/d4rl.toml --summary             # results table, summary, PNG

The recipe format, its expansion into runs and the report are `vgf_prob.rl.recipes`, shared with
``vgf-prob sweep`` (the same runs as Ray Tune trials, in parallel, on one machine or a cluster; it needs
the ``[sweep]`` extra). A run directory that already holds a checkpoint is resumed, so re-running this
script after a crash continues where each run stopped. ``--summary`` writes ``results.csv``,
``results.json``, ``summary.json`` and ``score_vs_budget.png`` to the recipe's ``out_dir``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
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
        cmd = r.command(recipe["run"])
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
