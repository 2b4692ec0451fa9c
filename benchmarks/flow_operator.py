"""The transport operator alone: particles moved per second by the Stein field and by plain gradient ascent,
what the Stein kernel itself costs, and what a Sinkhorn budget costs.

    python benchmarks/flow_operator.py
    python benchmarks/flow_operator.py --device cuda --json out.json

Value: a fresh 2-head 4 x 512 critic (the paper's) with its state part cached, as the agent uses it; cloud:
256 states x 10 particles x 6 action dims, ParticleAdam(0.05), 5 steps, clipped to [-1, 1]. "Particle-steps/s"
is states x particles x steps / seconds. The "kernel only" rows replace the critic by a quadratic value, so
they show the field's own cost (pairwise distances, median bandwidth, kernel products).
(The file is not called operator.py: run as a script, that name would shadow Python's operator module.)
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
    OBS_DIM,
    add_common_arguments,
    calls_for,
    describe,
    environment,
    setup,
    table,
    time_blocks,
    write_json,
)

import vgf_prob as vgf  # noqa: E402
import vgf_prob.fast  # noqa: E402,F401
from vgf_prob.rl.networks import EnsembleCritic  # noqa: E402


def critic_value(critic: EnsembleCritic, obs: torch.Tensor):
    with torch.no_grad():
        encoded = critic.encode_obs(obs)
    at_particles = vgf.fast.particle_pass(critic) or critic.forward_from_encoding

    def value(_: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return at_particles(encoded, x)

    return value


def quadratic_value(_: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return -(x - 0.3).square().sum(-1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--states", type=int, default=256)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--block-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    env = environment(device, dtype)
    print(f"# transport operator on {describe(env)}", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    obs = torch.randn(args.states, OBS_DIM, generator=g).to(device, dtype)
    x0 = (torch.rand(args.states, args.particles, ACTION_DIM, generator=g) * 2 - 1).to(device, dtype)
    critic = EnsembleCritic(OBS_DIM, ACTION_DIM).to(device, dtype)
    value = critic_value(critic, obs)
    moved = args.states * args.particles * args.steps

    def flow_row(name: str, field, value_fn, budget, notes: str = "") -> dict[str, Any]:
        flow = vgf.ValueGradientFlow(field, vgf.ParticleAdam(0.05), budget=budget,
                                     projection=vgf.BoxProjection(-1.0, 1.0))

        def run() -> None:
            flow(x0, obs, value_fn)

        probe = time_blocks(run, device, blocks=1, calls_per_block=1, warmup=args.warmup)
        timing = time_blocks(run, device, blocks=args.blocks,
                             calls_per_block=calls_for(probe["median_s"], args.block_seconds), warmup=0)
        seconds = timing["median_s"]
        row = {"row": name, "ms_per_flow": seconds * 1e3, "ms_per_step": seconds * 1e3 / args.steps,
               "particle_steps_per_s": moved / seconds, "timing": timing, "notes": notes,
               "env": environment(device, dtype)}
        print(f"  {name}: {row['ms_per_flow']:.1f} ms/flow, {row['particle_steps_per_s']:.3g} particle-steps/s",
              flush=True)
        return row

    steps = vgf.StepBudget(args.steps)
    rows = [
        flow_row("stein (authors' bandwidth gradient) + critic", vgf.SteinField(1.0, differentiate_bandwidth=True),
                 value, steps),
        flow_row("stein (textbook, fixed bandwidth) + critic", vgf.SteinField(1.0), value, steps),
        flow_row("plain gradient ascent + critic", vgf.ValueGradient(), value, steps),
        flow_row("stein (authors') kernel only", vgf.SteinField(1.0, differentiate_bandwidth=True), quadratic_value,
                 steps, "quadratic value: the field's own cost"),
        flow_row("plain gradient kernel only", vgf.ValueGradient(), quadratic_value, steps,
                 "quadratic value: the solver's own cost"),
    ]

    # Sinkhorn budget: the divergence alone, and a flow limited by it (bisection when a step crosses the limit)
    sinkhorn = vgf.SinkhornBudget(0.05)
    x1 = (x0 + 0.1 * torch.randn(x0.shape, generator=g).to(device, dtype)).clamp(-1, 1)

    def divergence() -> None:
        sinkhorn.spent(x0, x1)

    probe = time_blocks(divergence, device, blocks=1, calls_per_block=1, warmup=1)
    timing = time_blocks(divergence, device, blocks=args.blocks, calls_per_block=calls_for(probe["median_s"], 0.5),
                         warmup=0)
    sinkhorn_row = {"row": "sinkhorn divergence (geomloss, tensorized)", "ms_per_call": timing["median_s"] * 1e3,
                    "states_per_s": args.states / timing["median_s"], "timing": timing,
                    "env": environment(device, dtype)}
    print(f"  sinkhorn divergence: {sinkhorn_row['ms_per_call']:.2f} ms for {args.states} states", flush=True)
    rows.append(flow_row("stein + critic, SinkhornBudget(0.05) & steps", vgf.SteinField(1.0, differentiate_bandwidth=True),
                         value, sinkhorn & steps, "budget checked every step, bisection (12 halvings) when crossed"))
    radii = torch.linspace(0.05, 0.6, args.states, dtype=dtype, device=device)
    rows.append(flow_row("stein + critic, SinkhornBudget(0.05..0.6 per state) & steps",
                         vgf.SteinField(1.0, differentiate_bandwidth=True), value, vgf.SinkhornBudget(radii) & steps,
                         "states cross at different steps; only the crossing ones are bisected"))

    print(table(["operator", "ms / flow", "ms / step", "particle-steps/s", "threads"],
                [[r["row"], r["ms_per_flow"], r["ms_per_step"], r["particle_steps_per_s"], r["env"]["threads"]]
                 for r in rows]))
    print(table(["budget measure", "ms / call", "states / s", "threads"],
                [[sinkhorn_row["row"], sinkhorn_row["ms_per_call"], sinkhorn_row["states_per_s"],
                  sinkhorn_row["env"]["threads"]]]))
    payload = {"benchmark": "operator", "env": env, "shape": [args.states, args.particles, ACTION_DIM],
               "steps": args.steps, "rows": rows, "sinkhorn": sinkhorn_row}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
