"""Run the quick-start job (``vgf-prob train`` without arguments) over several seeds and summarise it.

    python benchmarks/quickstart_seeds.py                       # the default: seeds 0 1 2, as `vgf-prob train`
    python benchmarks/quickstart_seeds.py --seeds 0 --steps 3000 --config num_particles=16 --budgets 0 1 2 4 8

Each seed trains its own agent on the quick start's cached data (`vgf_prob.rl.run.experiment.QUICKSTART`; the data is
the same for every seed) and evaluates BC, best-of-N (L_test = 0) and VGF (L_test > 0) on the same seeded
episodes, exactly as `vgf-prob train --seed S` does. The summary gives, per policy, the mean and the
std over seeds of each seed's mean score (and of the mean return). Each seed also reports the CPU time its
process used: with one torch thread, about the wall time on an idle machine (the wall time on a shared
one is longer). ``--dataset``/``--episodes``/
``--config``/``--steps``/``--budgets`` change the job, for the search recorded in
benchmarks/main_job_search.md. ``--json`` writes every seed's rows and the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def run_seed(args: argparse.Namespace, seed: int, out_root: Path) -> dict[str, Any]:
    """Train and evaluate one seed; returns its final rows and phase timings."""
    from vgf_prob.rl.d4rl import load_d4rl_hdf5
    from vgf_prob.rl.gym_generate import ensure_gym_dataset
    from vgf_prob.rl.run.experiment import QUICKSTART, build_config
    from vgf_prob.rl.run.spec import TrainSpec, parse_overrides
    from vgf_prob.rl.run.trainer import train

    t0, cpu0 = time.perf_counter(), time.process_time()
    path = ensure_gym_dataset(args.dataset, args.episodes)
    dataset = load_d4rl_hdf5(path, env_name=args.dataset)
    data_seconds = time.perf_counter() - t0
    config = build_config(None, args.dataset, {**QUICKSTART.overrides, **parse_overrides(args.config)})
    spec = TrainSpec(env=args.dataset, out=str(out_root / f"seed{seed}"), steps=args.steps, eval_every=args.eval_every,
                     eval_episodes=args.eval_episodes, checkpoint_every=args.steps, seed=seed, progress=False,
                     budgets=tuple(args.budgets))  # fmt: skip
    result = train(config, dataset, spec)
    return {
        "seed": seed, "rows": [r.to_dict() for r in result.final_scores], "data_seconds": data_seconds,
        "phase_seconds": result.phase_seconds, "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
    }  # fmt: skip


def _label(row: dict[str, Any]) -> str:
    return row["policy"] + ("" if row["budget"] in (None, 0) else f" L={row['budget']}")


def _finished_run(path: Path) -> dict[str, Any]:
    """A run directory's final rows and timings, from its summary.json."""
    summary = json.loads((path / "summary.json").read_text())
    return {"seed": summary["run"]["seed"], "dir": str(path), "rows": summary["final_scores"],
            "phase_seconds": summary["phase_seconds"], "seconds": summary["seconds"]}  # fmt: skip


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (policy, L_test): mean and std over seeds of the per-seed mean score and mean return."""
    keys = [(r["policy"], r["budget"]) for r in runs[0]["rows"]]
    out = []
    for policy, budget in keys:
        rows = [next(r for r in run["rows"] if (r["policy"], r["budget"]) == (policy, budget)) for run in runs]
        scores, returns = [r["score"] for r in rows], [r["mean_return"] for r in rows]
        spread = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)  # noqa: E731
        out.append({
            "policy": policy, "L_test": "-" if budget is None else budget,
            "score": f"{statistics.fmean(scores):.1f} ± {spread(scores):.1f}",
            "mean return": f"{statistics.fmean(returns):.2f} ± {spread(returns):.2f}",
            "per seed": " ".join(f"{s:.1f}" for s in scores),
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    from vgf_prob.rl.run.experiment import GENERATED_EPISODES, QUICKSTART

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--dataset", default=QUICKSTART.dataset, help="generated dataset name (gym_generate)")
    parser.add_argument("--episodes", type=int, default=GENERATED_EPISODES, help="dataset episodes")
    parser.add_argument("--steps", type=int, default=QUICKSTART.steps, help="gradient steps")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="VGFConfig overrides on top of the quick start's")  # fmt: skip
    parser.add_argument("--budgets", type=int, nargs="+", default=list(QUICKSTART.budgets), help="L_test values")
    parser.add_argument("--eval-episodes", type=int, default=QUICKSTART.eval_episodes, help="episodes per policy")
    parser.add_argument("--eval-every", type=int, default=QUICKSTART.eval_every,
                        help="steps between evaluations (default: the quick start's)")
    parser.add_argument("--threads", type=int, default=QUICKSTART.threads, help="torch threads per seed (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once, in separate processes (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart-seeds"), help="run directories")
    parser.add_argument("--json", type=Path, help="write the rows and the summary here")
    parser.add_argument("--with-runs", type=Path, nargs="*", default=[],
                        help="finished run directories (e.g. of `vgf-prob train --seed S`) to summarise with the "
                             "seeds trained here; their summary.json gives the rows")  # fmt: skip
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from vgf_prob.rl.evaluate import format_table

    stamp = f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # one folder per invocation
    from vgf_prob.rl.gym_generate import ensure_gym_dataset

    ensure_gym_dataset(args.dataset, args.episodes)  # once, before any worker reads it
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(args.threads,)) as pool:  # fmt: skip
            count = len(args.seeds)
            results = list(pool.map(run_seed, [args] * count, args.seeds, [args.out / stamp] * count))
    else:
        results = (run_seed(args, seed, args.out / stamp) for seed in args.seeds)
    runs = [_finished_run(path) for path in args.with_runs]
    for run in runs:
        print(f"seed {run['seed']} ({run['dir']}): " + ", ".join(f"{_label(r)} {r['score']:.1f}" for r in run["rows"]))
    for seed, run in zip(args.seeds, results, strict=True):
        runs.append(run)
        cells = ", ".join(f"{_label(r)} {r['score']:.1f}" for r in run["rows"])
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in run["phase_seconds"].items() if v > 0)
        print(f"seed {seed}: {cells} ({run['seconds']:.0f} s wall: data {run['data_seconds']:.0f} s, {phases}; "
              f"{run['cpu_seconds']:.0f} s of CPU time)", flush=True)  # fmt: skip
    summary = summarise(runs)
    load = os.getloadavg()
    format_table(summary, title=f"{args.dataset}: {args.steps} steps, {len(runs)} seeds (score: mean ± std over seeds)")
    print(f"config overrides {args.config or 'none'}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "summary": summary, "load_average": load}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
