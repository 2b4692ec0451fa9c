"""Acting latency of the offline VGF agent for one observation: N reference draws (K Euler steps of the BC
flow), L_test flow steps, argmax of the online critic over the particles.

    python benchmarks/acting.py                      # paper config, L_test in {0, 1, 3}
    python benchmarks/acting.py --budgets 0,1,2,3,5 --batch 1 --device cuda --json out.json
    python benchmarks/acting.py --config quickstart --threads 1 --breakdown   # N 10, 2 x 128 critic, one state

Latency is the median over timed blocks of many calls (each call synchronised on CUDA); the per-call
minimum is reported too, and each row's cost per action in critic-pass equivalents (`vgf_prob.cost`, counted).
``--breakdown`` times, on the same rows (the agent's N particles of one batch of states), the critic's own
forward (no graph), its forward and backward to the actions, the Stein field (that gradient plus the kernel
arithmetic), and one flow step of the operator: (flow at L_test = L) - (flow at L_test = 0), divided by L.
Milliseconds are wall time; ``cpu ms`` is process CPU time (one thread: the same work without the wait on
other processes).
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

from vgf_prob.cost import measure  # noqa: E402
from vgf_prob.rl.agent import VGFAgent  # noqa: E402
from vgf_prob.rl.config import VGFConfig  # noqa: E402
from vgf_prob.values import HeadAggregation, action_gradient  # noqa: E402

ACTING_CONFIGS = {
    **UPDATE_CONFIGS,
    # the quick start's agent (vgf_prob.rl.run.experiment.QUICKSTART): 2 x 128 networks, N 10, K 10
    "quickstart": dict(critic_hidden_dims=(128, 128), bc_hidden_dims=(128, 128), train_budget=1, vgf_lr=0.1,
                       alpha=0.1, target_aggregation="min"),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--budgets", default="0,1,3", help="comma list of L_test values")
    parser.add_argument("--batch", type=int, default=1, help="observations per call (1: one observation, shape [O])")
    parser.add_argument("--config", default="paper", choices=sorted(ACTING_CONFIGS))
    parser.add_argument("--block-seconds", type=float, default=0.5)
    parser.add_argument("--plain", action="store_true", help="config.fast_path=False")
    parser.add_argument("--bf16", action="store_true", help="config.flow_autocast_bf16=True (changes numerics)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the critic's forward, forward+backward, the field and one flow step")
    args = parser.parse_args(argv)
    if args.warmup < 5:
        args.warmup = 5
    device, dtype = setup(args)
    env = environment(device, dtype)
    print(f"# acting latency on {describe(env)}", flush=True)
    config = VGFConfig(**ACTING_CONFIGS[args.config], fast_path=not args.plain, flow_autocast_bf16=args.bf16)
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
        with measure() as cost:
            act()
        row: dict[str, Any] = {
            "L_test": budget,
            "batch": args.batch,
            "passes_per_action": cost.per_state()["passes"],
            "ms": timing["median_s"] * 1e3,
            "cpu_ms": timing["cpu_s_per_call"] * 1e3 if "cpu_s_per_call" in timing else None,
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
    print(table(["L_test", "batch", "passes/action", "ms (median block)", "cpu ms", "ms (fastest call)", "JAX ms",
                 "x JAX", "threads"],
                [[r["L_test"], r["batch"], r["passes_per_action"], r["ms"], r["cpu_ms"], r["ms_min_call"],
                  r.get("jax_ms"), r.get("speedup_vs_jax"), r["env"]["threads"]] for r in rows]))  # fmt: skip
    payload = {"benchmark": "acting", "config": args.config, "env": env, "options": {"fast_path": not args.plain,
               "flow_autocast_bf16": args.bf16}, "rows": rows}
    if args.breakdown:
        payload["breakdown"] = step_breakdown(agent, obs, [r["L_test"] for r in rows if r["L_test"] > 0], device, args)
    write_json(args.json, payload)
    return payload


def step_breakdown(agent: VGFAgent, obs: torch.Tensor, budgets: list[int], device: torch.device,
                   args: argparse.Namespace) -> dict[str, Any]:
    """Wall and CPU ms of the critic's forward, its forward + backward to the actions, the Stein field and one
    flow step (from whole flows at L and at 0 on the same starting particles), all on the agent's N particles."""
    obs = obs if obs.dim() == 2 else obs.unsqueeze(0)
    start = agent.reference_particles(obs, agent.config.num_particles, make_generator(device, args.seed))
    critic = HeadAggregation(agent.particle_fn(agent.critic, obs), agent.config.flow_aggregation)

    def forward() -> None:
        with torch.no_grad():
            critic(obs, start)

    parts: dict[str, Any] = {
        "critic forward": forward,
        "critic forward + backward": lambda: action_gradient(critic, obs, start),
        "Stein field (gradient + kernel)": lambda: agent.stein_field(obs, start, critic),
        "flow L_test=0 (operator overhead)": lambda: agent.flow(obs, 0)(start, obs, critic),
    }
    parts |= {f"flow L_test={b}": (lambda b=b: agent.flow(obs, b)(start, obs, critic)) for b in budgets}
    timings = {}
    for name, fn in parts.items():
        probe = time_blocks(fn, device, blocks=1, calls_per_block=5, warmup=args.warmup)
        timings[name] = time_blocks(fn, device, blocks=args.blocks,
                                    calls_per_block=calls_for(probe["median_s"], args.block_seconds), warmup=0)
    ms = {name: t["median_s"] * 1e3 for name, t in timings.items()}
    cpu = {name: t.get("cpu_s_per_call", float("nan")) * 1e3 for name, t in timings.items()}
    base, base_cpu = ms["flow L_test=0 (operator overhead)"], cpu["flow L_test=0 (operator overhead)"]
    rows = [[name, ms[name], cpu[name]] for name in list(parts)[:4]]
    rows += [[f"one flow step (from L_test={b})", (ms[f"flow L_test={b}"] - base) / b,
              (cpu[f"flow L_test={b}"] - base_cpu) / b] for b in budgets]  # fmt: skip
    print(f"# the same rows: {tuple(start.shape)} particles, critic {agent.config.critic_hidden_dims}")
    print(table(["part", "ms", "cpu ms"], rows))
    return {"rows": [{"part": r[0], "ms": r[1], "cpu_ms": r[2]} for r in rows], "particles": list(start.shape)}


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
