"""Training-update speed of the offline VGF agent: updates/s, achieved GFLOP/s against the measured
matrix-product rate, peak memory, and the split between BC sampling and the value-gradient flow.

    python benchmarks/update.py                          # the issue's four configurations
    python benchmarks/update.py --rows scaling           # N in {5, 10, 20, 40} and L in {0, 1, 3, 5}
    python benchmarks/update.py --rows paper --device cuda --json out.json
    python benchmarks/update.py --rows paper --plain     # the plain (un-cached) path, for comparison
    python benchmarks/update.py --rows paper --bf16      # bfloat16 autocast in the flows (changes numerics)

Synthetic batch of 256 transitions, obs dim 17, action dim 6; freshly initialised networks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    ACTION_DIM,
    BATCH_SIZE,
    JAX_ANCHOR_MS,
    OBS_DIM,
    UPDATE_CONFIGS,
    PeakMemory,
    add_common_arguments,
    calls_for,
    count_flops,
    describe,
    environment,
    make_generator,
    matmul_ceiling,
    scaling_configs,
    setup,
    synthetic_batch,
    table,
    time_blocks,
    write_json,
)

from vgf_prob.rl.agent import VGFAgent  # noqa: E402
from vgf_prob.rl.config import VGFConfig  # noqa: E402
from vgf_prob.validation import host_reads  # noqa: E402


def all_rows() -> dict[str, dict[str, Any]]:
    return {**UPDATE_CONFIGS, **scaling_configs()}


def resolve_rows(spec: str) -> list[str]:
    rows = all_rows()
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "main":
            names += list(UPDATE_CONFIGS)
        elif part == "scaling":
            names += list(scaling_configs())
        elif part in rows:
            names.append(part)
        else:
            raise SystemExit(f"unknown row {part!r}; choose from main, scaling, {', '.join(rows)}")
    return list(dict.fromkeys(names))


def build_agent(overrides: dict[str, Any], args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> VGFAgent:
    config = VGFConfig(
        batch_size=BATCH_SIZE,
        fast_path=not args.plain,
        flow_autocast_bf16=args.bf16,
        compile=args.compile,
        **overrides,
    )
    torch.manual_seed(args.seed)
    return VGFAgent(OBS_DIM, ACTION_DIM, config, device=device, dtype=dtype)


def measure_row(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    overrides = all_rows()[name]
    agent = build_agent(overrides, args, device, dtype)
    batch = synthetic_batch(BATCH_SIZE, device, dtype, args.seed)
    generator = make_generator(device, args.seed)

    def update() -> None:
        with host_reads(False):  # a training loop on validated data: no host read
            agent.update(batch, generator)

    with PeakMemory(device) as memory:
        probe = time_blocks(update, device, blocks=1, calls_per_block=1, warmup=args.warmup)
        timing = time_blocks(update, device, blocks=args.blocks,
                             calls_per_block=calls_for(probe["median_s"], args.block_seconds), warmup=0)
    flops, flops_by_op = count_flops(update)
    seconds = timing["median_s"]
    row: dict[str, Any] = {
        "row": name,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "options": {"fast_path": not args.plain, "flow_autocast_bf16": args.bf16, "compile": args.compile},
        "ms_per_update": seconds * 1e3,
        "ms_per_update_best_block": timing["min_s"] * 1e3,
        "updates_per_s": 1.0 / seconds,
        "timing": timing,
        "gflop_per_update": flops / 1e9,
        "gflops_by_op": {k: v / 1e9 for k, v in flops_by_op.items()},
        "achieved_gflops": flops / seconds / 1e9,
        "peak_memory": memory.as_dict(),
        "env": environment(device, dtype),
    }
    if name in JAX_ANCHOR_MS:
        row["jax_ms"] = JAX_ANCHOR_MS[name]
        row["speedup_vs_jax"] = JAX_ANCHOR_MS[name] / row["ms_per_update"]
    if args.parts:
        row["parts"] = measure_parts(agent, batch, args, device)
    if args.breakdown:
        row["breakdown"] = breakdown(update)
    return row


OP_CATEGORIES = (
    ("products", ("mm", "linear_pointwise", "matmul", "linear")),
    ("layer norm", ("layer_norm", "vector_norm")),
    ("sort (Stein median)", ("sort", "median", "kthvalue")),
    ("copies and casts", ("copy_", "_to_copy")),
    ("allocation and fills", ("empty", "zero_", "fill_", "zeros", "ones")),
)


def breakdown(update) -> dict[str, Any]:
    """Where an update's time goes, by torch's profiler over two updates: self time per operator category
    (products; LayerNorm; the Stein bandwidth's sort; copies and casts; allocation; the rest, elementwise)
    and the inclusive time of the optimisers' steps. Profiling adds overhead: read the shares, not the ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            update()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events if not e.key.startswith("Optimizer."))
    shares: dict[str, float] = {}
    for e in events:
        if e.key.startswith("Optimizer."):
            continue
        name = next((cat for cat, keys in OP_CATEGORIES if any(k in e.key for k in keys)), "elementwise and other")
        shares[name] = shares.get(name, 0.0) + e.self_cpu_time_total / total
    adam = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step")) / total
    top = sorted((e for e in events if not e.key.startswith("Optimizer.")), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"self_time_share": shares, "optimizer_step_share": adam,
            "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_update": e.count / 2}
                        for e in top]}


def measure_parts(agent: VGFAgent, batch: dict[str, torch.Tensor], args: argparse.Namespace,
                  device: torch.device) -> dict[str, float]:
    """ms of the update's two big pieces alone: drawing the N reference particles per next state (K Euler
    steps of the BC flow), and the L_train flow steps that move them (online critic's action-gradients)."""
    obs = batch["next_observations"]
    n = agent.config.num_particles
    generator = make_generator(device, args.seed)
    start = agent.reference_particles(obs, n, generator)

    def sample() -> None:
        agent.reference_particles(obs, n, generator)

    def flow() -> None:
        with torch.no_grad():
            _flow_from(agent, obs, start)

    parts = {}
    for key, fn in (("bc_sampling_ms", sample), ("flow_steps_ms", flow)):
        probe = time_blocks(fn, device, blocks=1, calls_per_block=1, warmup=1)
        parts[key] = time_blocks(fn, device, blocks=args.blocks, calls_per_block=calls_for(probe["median_s"], 0.5),
                                 warmup=0)["median_s"] * 1e3
    return parts


def _flow_from(agent: VGFAgent, obs: torch.Tensor, start: torch.Tensor) -> None:
    from vgf_prob.flows import AmortizedGradient
    from vgf_prob.transport import ValueGradientFlow

    critic_fn = agent.particle_fn(agent.critic, obs)
    field = agent.stein_field if agent.amortized is None else AmortizedGradient(agent.particle_fn(agent.amortized, obs))
    flow = ValueGradientFlow(field, agent.solver, budget=agent.train_budget, projection=agent.projection)
    flow(start, obs, critic_fn)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--rows", default="main", help="comma list of rows, or 'main' / 'scaling'")
    parser.add_argument("--block-seconds", type=float, default=1.5, help="about how long one timed block lasts")
    parser.add_argument("--plain", action="store_true", help="config.fast_path=False (plain concat networks)")
    parser.add_argument("--bf16", action="store_true", help="config.flow_autocast_bf16=True (changes numerics)")
    parser.add_argument("--compile", action="store_true", help="config.compile=True (torch.compile)")
    parser.add_argument("--parts", action="store_true", help="also time BC sampling and the flow steps alone")
    parser.add_argument("--breakdown", action="store_true", help="profile where the update's time goes")
    parser.add_argument("--no-ceiling", action="store_true", help="skip measuring the matrix-product rate")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    env = environment(device, dtype)
    print(f"# update speed on {describe(env)}", flush=True)
    ceiling = None if args.no_ceiling else matmul_ceiling(device, torch.float32)
    if ceiling:
        print(f"# matmul {ceiling['update_shape']['shape']}: {ceiling['update_shape']['gflops']:.0f} GFLOP/s, "
              f"{ceiling['large']['shape']}: {ceiling['large']['gflops']:.0f} GFLOP/s (float32)", flush=True)
    rows = []
    for name in resolve_rows(args.rows):
        row = measure_row(name, args, device, dtype)
        if ceiling:
            row["fraction_of_matmul_rate"] = row["achieved_gflops"] / ceiling["update_shape"]["gflops"]
        rows.append(row)
        print(f"  {name}: {row['ms_per_update']:.1f} ms/update ({row['updates_per_s']:.2f}/s), "
              f"{row['achieved_gflops']:.0f} GFLOP/s, threads {row['env']['threads']}, load {row['env']['load_average']}",
              flush=True)
        if "breakdown" in row:
            b = row["breakdown"]
            print("    self-time shares: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(
                b["self_time_share"].items(), key=lambda kv: -kv[1])) + f"; optimiser steps {b['optimizer_step_share']:.1%}")
            for op in b["top_ops"]:
                print(f"      {op['op']:40s} {op['share']:6.1%}  {op['calls_per_update']:.0f} calls/update")
    print(format_rows(rows))
    payload = {"benchmark": "update", "env": env, "matmul_ceiling": ceiling, "rows": rows}
    write_json(args.json, payload)
    return payload


def format_rows(rows: list[dict[str, Any]]) -> str:
    headers = ["row", "N", "K", "L", "ms/update", "updates/s", "JAX ms", "x JAX", "GFLOP", "GFLOP/s",
               "of matmul", "peak MiB +", "threads"]
    body = []
    for r in rows:
        c = r["config"]
        body.append([
            r["row"], c.get("num_particles"), c.get("flow_steps"), c.get("train_budget"), r["ms_per_update"],
            r["updates_per_s"], r.get("jax_ms"), r.get("speedup_vs_jax"), r["gflop_per_update"],
            r["achieved_gflops"], r.get("fraction_of_matmul_rate"), r["peak_memory"]["delta_mib"], r["env"]["threads"],
        ])
    return table(headers, body)


if __name__ == "__main__":
    main()
