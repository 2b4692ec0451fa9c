"""Run every speed benchmark and write one JSON file and one markdown summary.

    python benchmarks/run_all.py                          # CPU, torch's default threads
    python benchmarks/run_all.py --device cuda            # a GPU (CUDA events, synchronised blocks)
    python benchmarks/run_all.py --threads 1 --quick      # fewer blocks, no scaling rows
    python benchmarks/run_all.py --bf16                   # bfloat16 autocast in the flows (changes numerics)

Each update configuration runs in its own process (so its peak-memory number is its own); the matrix-product
ceiling is measured in this process at the start and again at the end. Output: benchmarks/results/<tag>.json
and <tag>.md (tag: device, threads, time), and the tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    TARGET_SPEEDUP,
    UPDATE_CONFIGS,
    describe,
    environment,
    load_average,
    matmul_ceiling,
    scaling_configs,
    table,
    write_json,
)

HERE = Path(__file__).resolve().parent


def run_script(script: str, args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        command = [sys.executable, str(HERE / script), *args, "--json", str(out)]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 blocks, no scaling rows, no operator rows")
    parser.add_argument("--bf16", action="store_true", help="flow_autocast_bf16=True in the agent rows")
    parser.add_argument("--extra", default="", help="extra flags for update.py/acting.py, e.g. --extra=--plain")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    blocks = 3 if args.quick else args.blocks
    common = ["--device", args.device, "--blocks", str(blocks)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    extra = (args.extra.split() if args.extra else []) + (["--bf16"] if args.bf16 else [])
    env = environment(device, torch.float32)
    print(f"# all benchmarks on {describe(env)}", flush=True)
    started = time.time()
    ceiling_start = matmul_ceiling(device)

    update_rows = []
    names = list(UPDATE_CONFIGS) + ([] if args.quick else [n for n in scaling_configs() if n not in ("N10", "L5")])
    for name in names:
        result = run_script("update.py", [*common, *extra, "--rows", name, "--no-ceiling",
                                          *(["--parts"] if name in UPDATE_CONFIGS else [])])
        update_rows += result["rows"]
    acting = run_script("acting.py", [*common, *extra])
    operator = None if args.quick else run_script("flow_operator.py", common)
    ceiling_end = matmul_ceiling(device)
    rate = min(ceiling_start["update_shape"]["gflops"], ceiling_end["update_shape"]["gflops"])
    for row in update_rows:
        row["fraction_of_matmul_rate"] = row["achieved_gflops"] / rate

    payload = {
        "env": env,
        "load_average_end": load_average(),
        "wall_s": time.time() - started,
        "matmul_ceiling": {"start": ceiling_start, "end": ceiling_end},
        "update": update_rows,
        "acting": acting,
        "operator": operator,
        "extra_flags": extra,
    }
    tag = args.tag or f"{device.type}-{env['threads']}t-{time.strftime('%Y%m%d-%H%M%S')}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{tag}.json", payload)
    summary = markdown(payload)
    (args.out / f"{tag}.md").write_text(summary + "\n")
    print()
    print(summary)
    print(f"\nwrote {args.out / tag}.json and .md")
    return payload


def markdown(payload: dict[str, Any]) -> str:
    env = payload["env"]
    ceiling = payload["matmul_ceiling"]
    lines = [
        f"Device: {env['device']} ({env['device_name']}, {env['cpu_cores']} cores), torch {env['torch']}, "
        f"float32, {env['threads']} torch threads; load average at start {env['load_average']}, at end "
        f"{payload['load_average_end']}.",
        "",
        "float32 matrix product rate measured in the same run (start / end): "
        f"{ceiling['start']['update_shape']['shape']} {ceiling['start']['update_shape']['gflops']:.0f} / "
        f"{ceiling['end']['update_shape']['gflops']:.0f} GFLOP/s, {ceiling['start']['large']['shape']} "
        f"{ceiling['start']['large']['gflops']:.0f} / {ceiling['end']['large']['gflops']:.0f} GFLOP/s (torch.mm, "
        "the kernel the update's products use)."
        + (f" oneDNN with a packed weight at {ceiling['start']['update_shape_onednn']['shape']}: "
           f"{ceiling['start']['update_shape_onednn']['gflops']:.0f} / {ceiling['end']['update_shape_onednn']['gflops']:.0f}"
           " GFLOP/s." if "update_shape_onednn" in ceiling['start'] else ""),
        "",
    ]
    main_rows = [r for r in payload["update"] if r["row"] in UPDATE_CONFIGS]
    lines.append(table(
        ["configuration", "ms/update", "updates/s", "JAX ms", "x JAX (target 1.5)", "GFLOP", "GFLOP/s",
         "of matmul rate", "BC sampling ms", "flow steps ms", "peak RSS + MiB"],
        [[r["row"], r["ms_per_update"], r["updates_per_s"], r.get("jax_ms"), r.get("speedup_vs_jax"),
          r["gflop_per_update"], r["achieved_gflops"], r["fraction_of_matmul_rate"],
          r.get("parts", {}).get("bc_sampling_ms"), r.get("parts", {}).get("flow_steps_ms"),
          r["peak_memory"]["delta_mib"]] for r in main_rows],
    ))
    acting = payload["acting"]["rows"]
    lines += ["", table(["acting, one observation", "ms (median block)", "ms (fastest call)", "JAX ms", "x JAX"],
                        [[f"L_test = {r['L_test']}", r["ms"], r["ms_min_call"], r.get("jax_ms"),
                          r.get("speedup_vs_jax")] for r in acting])]
    scaling = {r["row"]: r for r in payload["update"]}
    n_rows = [scaling[k] for k in ("N5", "paper", "N20", "N40") if k in scaling]
    l_rows = [scaling[k] for k in ("L0", "L1", "L3", "paper") if k in scaling]
    if len(n_rows) > 2:
        lines += ["", table(["N (paper config, L=5)", "ms/update", "ms per particle", "GFLOP/s"],
                            [[r["config"]["num_particles"], r["ms_per_update"],
                              r["ms_per_update"] / r["config"]["num_particles"], r["achieved_gflops"]]
                             for r in n_rows])]
    if len(l_rows) > 2:
        lines += ["", table(["L_train (paper config, N=10)", "ms/update", "GFLOP/s"],
                            [[r["config"]["train_budget"], r["ms_per_update"], r["achieved_gflops"]] for r in l_rows])]
    if payload.get("operator"):
        op = payload["operator"]
        lines += ["", table(["operator (256 x 10 x 6, 5 steps)", "ms / flow", "particle-steps/s"],
                            [[r["row"], r["ms_per_flow"], r["particle_steps_per_s"]] for r in op["rows"]]
                            + [[op["sinkhorn"]["row"] + " (one call)", op["sinkhorn"]["ms_per_call"], None]])]
    below = [r["row"] for r in main_rows if r.get("speedup_vs_jax", TARGET_SPEEDUP) < TARGET_SPEEDUP]
    below += [f"act L{r['L_test']}" for r in acting if r.get("speedup_vs_jax", TARGET_SPEEDUP) < TARGET_SPEEDUP]
    lines += ["", f"Rows below the {TARGET_SPEEDUP}x target: {', '.join(below) if below else 'none'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
