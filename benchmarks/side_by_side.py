"""The issue's table in one run: the four update configurations and acting, float32 and the bfloat16 option,
in interleaved rounds (each configuration in its own process), with the CPU model, its ISA flags and the
matrix-product rates (float32 and bfloat16, MKL and oneDNN) measured at the start and at the end.

    python benchmarks/side_by_side.py --threads 2 --rounds 2
    python benchmarks/side_by_side.py --threads 2 --compare /path/to/other/checkout   # before/after, interleaved
    python benchmarks/side_by_side.py --threads 2 --compile-rows small                # + config.compile=True rows
    python benchmarks/side_by_side.py --threads 2 --jax-python /tmp/jaxenv/bin/python --vgf-repo /path/to/vgf
                                                    # + the authors' JAX agents (jax_anchor.py), interleaved

Writes benchmarks/results/<tag>.json and .md. The ratio columns are JAX ms / ours against the JAX figures in
common.JAX_ANCHOR_MS (the issue's side-by-side run on its machine kind): name the CPU when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import JAX_ANCHOR_MS, UPDATE_CONFIGS, environment, load_average, matmul_rate, table, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


def rates() -> dict[str, float]:
    """GFLOP/s of the update's product shape (2560 x 512 @ 512 x 512) in float32 and bfloat16, MKL and oneDNN."""
    cpu = torch.device("cpu")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for kernel in ("torch.mm", "onednn"):
            name = f"{str(dtype).replace('torch.', '')} {kernel}"
            out[name] = matmul_rate(cpu, dtype, (2560, 512, 512), blocks=3, block_seconds=0.3, kernel=kernel)["gflops"]
    return out


def run(tree: Path, script: str, args: list[str], threads: int) -> dict[str, Any]:
    """One benchmark script of the checkout ``tree`` in a fresh process (its own imports, its own peak memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree) if tree != HERE.parent else ""}
        command = [sys.executable, str(tree / "benchmarks" / script), *args, "--threads", str(threads), "--json", str(out)]
        subprocess.run(command, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def run_jax(args: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/jax_anchor.py under ``--jax-python`` (the authors' agents, same problem, same threads)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "jax.json"
        env = {**os.environ, "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}",
               "OMP_NUM_THREADS": str(args.threads), "JAX_COMPILATION_CACHE_DIR": str(Path(tempfile.gettempdir()) / "jax-cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # later rounds skip XLA's compilation
        # XLA's CPU runtime runs independent operations on its own thread pool whatever the Eigen flag says:
        # with --threads 1 the JAX process is pinned to one core (taskset), as torch's single thread is
        pin = ["taskset", "-c", "0"] if args.threads == 1 and shutil.which("taskset") else []
        command = [*pin, args.jax_python, str(HERE / "jax_anchor.py"), "--vgf-repo", str(args.vgf_repo), "--rows",
                   args.rows, "--blocks", str(args.blocks), "--json", str(out)]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--rows", default=",".join(UPDATE_CONFIGS))
    parser.add_argument("--compare", type=Path, default=None, help="another checkout run interleaved with this one")
    parser.add_argument("--compile-rows", default="", help="rows also run with config.compile=True (float32)")
    parser.add_argument("--jax-python", default=None, help="a python with JAX: run jax_anchor.py in each round")
    parser.add_argument("--vgf-repo", type=Path, default=None, help="the authors' checkout, for --jax-python")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trees = {"this": HERE.parent} | ({"compare": args.compare.resolve()} if args.compare else {})
    env = environment(torch.device("cpu"), torch.float32)
    started = time.time()
    print(f"# side by side on {env['cpu_model']}, flags {' '.join(env['cpu_flags'])}, {args.threads} threads, "
          f"load {env['load_average']}", flush=True)
    rate_start = rates()
    print("# product GFLOP/s at 2560x512 @ 512x512:", {k: round(v) for k, v in rate_start.items()}, flush=True)
    variants = [("fp32", []), ("bf16", ["--bf16"])] + [("compile", ["--compile"])] * bool(args.compile_rows)
    results: dict[tuple, list[float]] = {}
    jax_runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        if args.jax_python:
            jax_runs.append(run_jax(args))
            print(f"  round {round_} JAX     " + " ".join(f"{k} {v:.1f}" for k, v in
                                                  {**jax_runs[-1]["update_ms"], **jax_runs[-1]["act_ms"]}.items()),
                  flush=True)
        for tree_name, tree in trees.items():
            for variant, flags in variants:
                rows = args.compile_rows.split(",") if variant == "compile" else args.rows.split(",")
                for row in rows:
                    payload = run(tree, "update.py", ["--rows", row, "--blocks", str(args.blocks), "--block-seconds",
                                                      "1.0", "--no-ceiling", *flags], args.threads)
                    ms = payload["rows"][0]["ms_per_update"]
                    results.setdefault((tree_name, variant, row), []).append(ms)
                    print(f"  round {round_} {tree_name:7s} {variant:7s} {row:10s} {ms:8.1f} ms  load {load_average()}",
                          flush=True)
                if variant == "compile":
                    continue
                acting = run(tree, "acting.py", ["--blocks", str(args.blocks), *flags], args.threads)
                for r in acting["rows"]:
                    results.setdefault((tree_name, variant, f"act_L{r['L_test']}"), []).append(r["ms"])
                print(f"  round {round_} {tree_name:7s} {variant:7s} acting  "
                      + " ".join(f"L{r['L_test']} {r['ms']:.2f}" for r in acting["rows"]), flush=True)
    rate_end = rates()
    medians = {key: statistics.median(v) for key, v in results.items()}
    names = args.rows.split(",") + ["act_L0", "act_L1", "act_L3"]
    body = []
    measured_jax = {name: statistics.median(r["update_ms"].get(name, r["act_ms"].get(name)) for r in jax_runs)
                    for name in names if jax_runs and (name in jax_runs[0]["update_ms"] or name in jax_runs[0]["act_ms"])}
    for name in names:
        jax = measured_jax.get(name, JAX_ANCHOR_MS.get(name))
        row = [name, jax]
        for tree_name in trees:
            for variant in ("fp32", "bf16"):
                ms = medians.get((tree_name, variant, name))
                row += [ms, jax / ms if jax and ms else None]
        body.append(row)
    headers = ["config", "JAX ms (this run)" if measured_jax else "JAX ms (issue)"]
    for tree_name in trees:
        headers += [f"{tree_name} fp32 ms", "ratio", f"{tree_name} bf16 ms", "ratio"]
    lines = [f"CPU {env['cpu_model']} ({env['cpu_cores']} cores), flags {' '.join(env['cpu_flags'])}; torch "
             f"{env['torch']}; {args.threads} threads; {args.rounds} interleaved rounds (median shown); load average "
             f"{env['load_average']} at start, {load_average()} at end; {time.time() - started:.0f} s.",
             "", "Product rate at 2560x512 @ 512x512, GFLOP/s (start / end): "
             + ", ".join(f"{k} {rate_start[k]:.0f} / {rate_end[k]:.0f}" for k in rate_start), "",
             table(headers, body)]
    compiled = [(row, medians[("this", "compile", row)]) for row in args.compile_rows.split(",") if row]
    if compiled:
        lines += ["", table(["config (float32)", "compile=True ms", "eager fast path ms"],
                            [[row, ms, medians.get(("this", "fp32", row))] for row, ms in compiled])]
    summary = "\n".join(lines)
    print(summary)
    tag = args.tag or f"side-by-side-{args.threads}t-{time.strftime('%Y%m%d-%H%M')}"
    payload = {"env": env, "rates_start": rate_start, "rates_end": rate_end, "trees": {k: str(v) for k, v in trees.items()},
               "results_ms": {" / ".join(k): v for k, v in results.items()}, "medians_ms": {" / ".join(k): v for k, v in medians.items()},
               "jax_runs": jax_runs, "load_average_end": load_average()}
    write_json(HERE / "results" / f"{tag}.json", payload)
    (HERE / "results" / f"{tag}.md").write_text(summary + "\n")
    print(f"# wrote results/{tag}.json and .md")
    return payload


if __name__ == "__main__":
    main()
