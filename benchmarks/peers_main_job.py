"""VGF against its peers on one generated dataset, over seeds, on the same seeded episodes.

    python benchmarks/peers_main_job.py --dataset reacher-spin-v0 --seeds 0 1 2 --out benchmarks/results/peers/spin.json
    python benchmarks/peers_main_job.py --dataset reacher-mixed-v0 --seeds 0 --peers --probes --config alpha=0.004
    python benchmarks/peers_main_job.py --merge a.json b.json --out all.json   # seeds run apart, one summary
    python benchmarks/peers_main_job.py --merge vgf.json --peers-from peers.json --out all.json  # + peer rows

Per seed: VGF (the quick start's agent, `QUICKSTART_AGENT`, plus ``--config`` overrides) trained by
`vgf_prob.rl.run.trainer.train`; then on the episodes seeded ``seed + k`` (as `vgf-prob train --seed S` evaluates):
the BC reference, best-of-N (N = the agent's), best-of-M at matched compute for each L_test, VGF at each
L_test, and the d3rlpy peers (`vgf_prob.rl.peers`, the same transitions). Matched compute is counted from the
config, and equals what the operator's counters (`vgf_prob.cost`) count (tests/test_peers.py): per state, a
BC Euler step of one particle is one critic-pass equivalent, a critic forward one, a flow step (forward +
backward) two, so

    VGF(N, K, L) = N (K + 1 + 2 L),   best-of-M = M (K + 1),   M = round(N (K + 1 + 2 L) / (K + 1)).

``--normalize-obs`` trains VGF on observations standardised by the data's mean and std (TD3+BC's scaling)
and standardises the evaluation's observations alike. ``--probes`` adds the measurements of
benchmarks/main_job_search.md's hypotheses (Reacher's scripted expert as the yardstick). Results are written
to ``--out`` (JSON) after every seed. CPU seconds are `time.process_time` of this process, one torch thread.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# The quick start's agent (vgf_prob.cli.QUICKSTART at commit a38f805): the paper's D4RL setting, 2 x 128 nets.
QUICKSTART_AGENT = {
    "variant": "stein", "target_aggregation": "min", "flow_aggregation": "mean", "critic_hidden_dims": (128, 128),
    "bc_hidden_dims": (128, 128), "train_budget": 1, "vgf_lr": 0.1, "alpha": 0.1,
}  # fmt: skip


def matched_n(num_particles: int, flow_steps: int, budget: int) -> int:
    """Best-of-M's M whose critic-pass equivalents equal VGF's with ``budget`` flow steps (module docstring)."""
    return round(num_particles * (flow_steps + 1 + 2 * budget) / (flow_steps + 1))


def _normalizer(dataset: Any, on: bool) -> tuple[Any, Any]:
    """(dataset with standardised observations, obs -> standardised obs), or the identity when ``on`` is False."""
    from vgf_prob.rl.offline_dataset import OfflineDataset

    if not on:
        return dataset, lambda obs: obs
    mean, std = dataset.observations.mean(0), dataset.observations.std(0) + 1e-3
    data = {k: getattr(dataset, k) for k in dataset.keys}
    data["observations"] = (data["observations"] - mean) / std
    data["next_observations"] = (data["next_observations"] - mean) / std
    return OfflineDataset(data, metadata=dataset.metadata), lambda obs: (obs - mean) / std


def vgf_rows(agent: Any, env_name: str, budgets: list[int], episodes: int, seed: int, norm: Any) -> list[dict]:
    """BC, best-of-N, matched best-of-M and VGF at each L_test, on the episodes seeded ``seed + k``."""
    from vgf_prob.rl.evaluate import evaluate

    cfg = agent.config
    n, k = cfg.num_particles, cfg.flow_steps
    generator = torch.Generator().manual_seed(10_007 * seed + 1)
    policies = [("BC reference", None, 1, k, lambda obs: agent.bc_action(norm(obs), generator=generator))]
    for budget in budgets:
        if budget == 0:
            policies.append(("best-of-N", 0, n, n * (k + 1), _act(agent, 0, n, generator, norm)))
            continue
        m = matched_n(n, k, budget)
        policies.append((f"best-of-N matched to L={budget}", 0, m, m * (k + 1), _act(agent, 0, m, generator, norm)))
        policies.append(("VGF", budget, n, n * (k + 1 + 2 * budget), _act(agent, budget, n, generator, norm)))
    rows = []
    for name, budget, particles, passes, act in policies:
        started = time.process_time()
        result = evaluate(act, env_name, episodes, seed)
        rows.append({"policy": name, "L_test": budget, "N": particles, "passes_per_state": passes,
                     "score": result.score, "score_std": result.score_std, "mean_return": result.mean_return,
                     "return_std": result.std_return, "episodes": result.num_episodes, "score_kind": result.score_kind,
                     "eval_cpu_s": time.process_time() - started})  # fmt: skip
    return rows


def _act(agent: Any, budget: int, particles: int, generator: torch.Generator, norm: Any) -> Any:
    return lambda obs: agent.act(norm(obs), budget=budget, generator=generator, num_particles=particles)


def train_vgf(args: argparse.Namespace, dataset: Any, seed: int, out: Path) -> tuple[Any, float, list[float]]:
    """(agent, training CPU seconds, q_mean at each log row) for one seed, trained without evaluation."""
    import csv

    from vgf_prob.rl.config import VGFConfig
    from vgf_prob.rl.run.spec import TrainSpec
    from vgf_prob.rl.run.trainer import train

    config = VGFConfig.from_dict({**QUICKSTART_AGENT, **dict(_parse(kv) for kv in args.config)})
    started = time.process_time()
    result = train(config, dataset, TrainSpec(out=str(out / f"vgf-seed{seed}"), steps=args.steps, seed=seed,
                                              log_every=max(1, args.steps // 10), checkpoint_every=args.steps,
                                              progress=False))  # fmt: skip
    seconds = time.process_time() - started
    with open(result.train_log, newline="") as f:
        q_means = [float(r["q_mean"]) for r in csv.DictReader(f) if r.get("q_mean")]
    return result.agent, seconds, q_means


def _parse(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--config takes KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per policy row: mean, std and standard error over seeds of the per-seed mean score."""
    keys = [(r["policy"], r["L_test"]) for r in runs[0]["rows"]]
    for run in runs[1:]:
        if sorted(map(str, keys)) != sorted(str((r["policy"], r["L_test"])) for r in run["rows"]):
            raise SystemExit(f"seed {run['seed']} scored other policies than seed {runs[0]['seed']}: not the same job")
    out = []
    for policy, budget in keys:
        scores = [next(r["score"] for r in run["rows"] if (r["policy"], r["L_test"]) == (policy, budget))
                  for run in runs]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        first = next(r for r in runs[0]["rows"] if (r["policy"], r["L_test"]) == (policy, budget))
        out.append({"policy": policy, "L_test": budget, "N": first.get("N"), "passes": first.get("passes_per_state"),
                    "mean": statistics.fmean(scores), "std": std, "se": std / len(scores) ** 0.5,
                    "per_seed": scores})  # fmt: skip
    return out


def merge(paths: list[Path], out: Path, peers_from: Path | None = None) -> int:
    """One result file from several: other seeds of the same job concatenate (seeds are independent), and a
    seed's runs from two files join when they scored different policies (e.g. the peers, which do not depend
    on VGF's settings, beside a VGF run with other settings on the same episodes)."""
    records = [json.loads(p.read_text()) for p in paths]
    if len({r["dataset"] for r in records}) != 1:
        raise SystemExit(f"--merge: the files hold different datasets: {sorted({r['dataset'] for r in records})}")
    by_seed: dict[int, dict[str, Any]] = {}
    for run in (run for r in records for run in r["runs"]):
        joined = by_seed.setdefault(run["seed"], {"seed": run["seed"], "rows": []})
        if {r["policy"] for r in joined["rows"]} & {r["policy"] for r in run["rows"]}:
            raise SystemExit(f"--merge: seed {run['seed']} scores a policy twice: each seed and policy once")
        joined["rows"] += run["rows"]
        joined |= {k: v for k, v in run.items() if k not in ("seed", "rows")}
    if peers_from is not None:  # the peers' rows of the same seeds (they do not depend on VGF's settings)
        from vgf_prob.rl.peers import POLICY_NAMES

        for run in json.loads(peers_from.read_text())["runs"]:
            if run["seed"] in by_seed:
                by_seed[run["seed"]]["rows"] += [r for r in run["rows"] if r["policy"] in POLICY_NAMES.values()]
    runs = [by_seed[seed] for seed in sorted(by_seed)]
    record = {"merged": [str(p) for p in paths], "dataset": records[0]["dataset"], "runs": runs,
              "summary": summarise(runs)}  # fmt: skip
    out.write_text(json.dumps(record, indent=1, default=float))
    _print_summary(record["summary"])
    plot(record["summary"], out.with_suffix(".png"), f"{record['dataset']}: {len(runs)} seeds, mean ± s.e.")
    return 0


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    """Score against L_test: VGF (L_test 0 = best-of-N) and best-of-M at matched cost, mean ± s.e. over seeds;
    the BC reference and every peer as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    vgf = sorted((r["L_test"], r["mean"], r["se"]) for r in summary if r["policy"] in ("VGF", "best-of-N"))
    ax.errorbar(*zip(*[(b, m) for b, m, _ in vgf]), yerr=[e for *_, e in vgf], marker="o", capsize=3, label="VGF")
    matched = sorted((int(r["policy"].rsplit("=", 1)[1]), r["mean"], r["se"]) for r in summary
                     if r["policy"].startswith("best-of-N matched"))  # fmt: skip
    if matched:
        ax.errorbar(*zip(*[(b, m) for b, m, _ in matched]), yerr=[e for *_, e in matched], marker="s", capsize=3,
                    linestyle="--", label="best-of-M at VGF's cost")  # fmt: skip
    for i, r in enumerate(r for r in summary if r["L_test"] is None):
        ax.axhline(r["mean"], color=f"C{i + 2}", linestyle=":", label=f"{r['policy']} {r['mean']:.1f}")
    ax.set_xlabel("L_test (flow steps at test time)")
    ax.set_ylabel("score (0 random, 100 scripted expert)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_summary(summary: list[dict[str, Any]]) -> None:
    for row in summary:
        print(f"{row['policy']:32s} L={row['L_test']!s:4s} {row['mean']:6.1f} ± {row['std']:.1f} (se {row['se']:.1f}; "
              f"per seed {' '.join(f'{s:.1f}' for s in row['per_seed'])})", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="reacher-mixed-v0", help="generated dataset name (gym_generate)")
    parser.add_argument("--episodes", type=int, default=200, help="dataset episodes (default 200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000, help="gradient steps of VGF and every peer")
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 3, 5, 8], help="L_test values")
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="VGFConfig overrides")
    parser.add_argument("--peers", nargs="*", default=["iql", "td3+bc", "awac"], help="d3rlpy peers (none: skip)")
    parser.add_argument("--no-vgf", action="store_true", help="peers only")
    parser.add_argument("--normalize-obs", action="store_true", help="VGF on standardised observations")
    parser.add_argument("--probes", action="store_true", help="measure the hypotheses (main_job_search.md)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--peers-from", type=Path, help="with --merge: add this file's peer rows of the same seeds")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="no training: summarise these files' runs into --out and a PNG beside it")  # fmt: skip
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.peers_from)
    torch.set_num_threads(1)
    from vgf_prob.rl.peers import quiet_d3rlpy, load_dataset, train_peer

    quiet_d3rlpy()
    dataset, env_name = load_dataset(args.dataset, args.episodes)
    train_set, norm = _normalizer(dataset, args.normalize_obs)
    record: dict[str, Any] = {"argv": sys.argv[1:], "dataset": args.dataset, "transitions": len(dataset), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            run: dict[str, Any] = {"seed": seed, "rows": []}
            if not args.no_vgf:
                agent, seconds, q_means = train_vgf(args, train_set, seed, Path(tmp))
                run |= {"vgf_train_cpu_s": seconds, "q_mean_log": q_means}
                run["rows"] += vgf_rows(agent, env_name, args.budgets, args.eval_episodes, seed, norm)
                if args.probes:
                    from peers_probes import probes

                    run["probes"] = probes(agent, dataset, train_set, args.budgets, seed, norm)
            for name in args.peers:
                for row in train_peer(name, dataset, env_name, args.steps, args.steps, args.eval_episodes, seed):
                    per_1k = 1000 * row["train_cpu_s"] / row["step"]
                    run["rows"].append(row | {"L_test": None, "train_cpu_s_per_1k": per_1k})
            record["runs"].append(run)
            record["summary"] = summarise(record["runs"])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1, default=float))
            _print_summary(record["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
