"""Acting latency of the offline VGF agent for one observation: N reference draws (K Euler steps of the BC
flow), L_test flow steps, argmax of the online critic over the particles.

    python benchmarks/acting.py                      # paper config, L_test in {0, 1, 3}
    python benchmarks/acting.py --budgets 0,1,2,3,5 --batch 1 --device cuda --json out.json

Latency is the median over timed blocks of many calls (each call synchronised on CUDA); the per-call
minimum is reported too.
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
    JAX_ANCHOR_MS,
    OBS_DIM,
    UPDATE_CONFIGS,
    add_common_arguments,
    calls_for,
    describe,
    environment,
    make_generator,
    setup,
    synchronize,
    table,
    time_blocks,
    write_json,
)

from vgf_prob.rl.agent import VGFAgent  # noqa: E402
from vgf_prob.rl.config import VGFConfig  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--budgets", default="0,1,3", help="comma list of L_test values")
    parser.add_argument("--batch", type=int, default=1, help="observations per call (1: one observation, shape [O])")
    parser.add_argument("--config", default="paper", choices=sorted(UPDATE_CONFIGS))
    parser.add_argument("--block-seconds", type=float, default=0.5)
    parser.add_argument("--plain", action="store_true", help="config.fast_path=False")
    parser.add_argument("--bf16", action="store_true", help="config.flow_autocast_bf16=True (changes numerics)")
    args = parser.parse_args(argv)
    if args.warmup < 5:
        args.warmup = 5
    device, dtype = setup(args)
    env = environment(device, dtype)
    print(f"# acting latency on {describe(env)}", flush=True)
    config = VGFConfig(**UPDATE_CONFIGS[args.config], fast_path=not args.plain, flow_autocast_bf16=args.bf16)
    torch.manual_seed(args.seed)
    agent = VGFAgent(OBS_DIM, ACTION_DIM, config, device=device, dtype=dtype)
    shape = (OBS_DIM,) if args.batch == 1 else (args.batch, OBS_DIM)
    obs = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device=device, dtype=dtype)
    generator = make_generator(device, args.seed)
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        def act(budget: int = budget) -> None:
            agent.act(obs, budget=budget, generator=generator)

        probe = time_blocks(act, device, blocks=1, calls_per_block=5, warmup=args.warmup)
        timing = time_blocks(act, device, blocks=args.blocks,
                             calls_per_block=calls_for(probe["median_s"], args.block_seconds), warmup=0)
        per_call = single_call_times(act, device, 50)
        row: dict[str, Any] = {
            "L_test": budget,
            "batch": args.batch,
            "ms": timing["median_s"] * 1e3,
            "ms_min_call": min(per_call) * 1e3,
            "ms_median_call": sorted(per_call)[len(per_call) // 2] * 1e3,
            "timing": timing,
            "env": environment(device, dtype),
        }
        key = f"act_L{budget}"
        if args.batch == 1 and args.config == "paper" and key in JAX_ANCHOR_MS:
            row["jax_ms"] = JAX_ANCHOR_MS[key]
            row["speedup_vs_jax"] = JAX_ANCHOR_MS[key] / row["ms"]
        rows.append(row)
        print(f"  L_test={budget}: {row['ms']:.2f} ms (fastest call {row['ms_min_call']:.2f} ms), "
              f"threads {row['env']['threads']}, load {row['env']['load_average']}", flush=True)
    print(table(["L_test", "batch", "ms (median block)", "ms (fastest call)", "JAX ms", "x JAX", "threads"],
                [[r["L_test"], r["batch"], r["ms"], r["ms_min_call"], r.get("jax_ms"), r.get("speedup_vs_jax"),
                  r["env"]["threads"]] for r in rows]))
    payload = {"benchmark": "acting", "config": args.config, "env": env, "options": {"fast_path": not args.plain,
               "flow_autocast_bf16": args.bf16}, "rows": rows}
    write_json(args.json, payload)
    return payload


def single_call_times(fn, device: torch.device, calls: int) -> list[float]:
    import time

    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
