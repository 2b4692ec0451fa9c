"""What a flow costs on a foreign critic (plain autograd) against the agent's own fast path, at the paper's shapes.

    python benchmarks/foreign_critic.py                  # L in {0, 1, 3, 5}
    python benchmarks/foreign_critic.py --threads 1 --json out.json

The call timed is the bootstrap term of a TD target, ``flow.next_value(x0, obs, q, q_target)``: L flow steps
driven by the online critic (Stein field with the authors' bandwidth gradient, ParticleAdam, box [-1, 1]) and
one scoring pass of the target critic, for B = 256 states x N = 10 particles x 6 action dims, obs 17. The
reference's sampling is not included (x0 is given). Critics: two heads, each 4 x 512 Linear -> LayerNorm ->
ReLU, then Linear(1) (the paper's), with the same weights in every row:

- ``foreign (rows)``: two separate modules written as CORL writes them (``torch.cat([s, a], 1)`` -> ``[M, 1]``)
  through ``vgf.as_value(q1, q2)``: obs repeated for every particle, autograd forward and backward of both
  modules on B * N rows at every step;
- ``EnsembleCritic, autograd``: the agent's critic class through ``vgf.as_value(critic)`` (the ``encoded``
  layout: the state part of the first layer computed once per flow) with `vgf_prob.fast` switched off;
- ``EnsembleCritic, fast``: the same with the fused passes on (one batched product per layer for both heads,
  a hand-written backward to the particles only): what the agent's own update runs.

Also timed, for scale: one critic-loss step of TD3+BC with the foreign twin (forward and backward of both
modules on the B = 256 dataset pairs, with weight gradients). Every number is printed with the CPU model, its
ISA flags, torch's threads, the load average, and the float32 matrix-product rate measured in the same run
(the machine may be shared with other jobs: compare rows of one run, not runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common import (  # noqa: E402
    ACTION_DIM,
    BATCH_SIZE,
    OBS_DIM,
    add_common_arguments,
    calls_for,
    count_flops,
    describe,
    environment,
    matmul_rate,
    setup,
    table,
    time_blocks,
    write_json,
)

import vgf_prob as vgf  # noqa: E402
from vgf_prob import fast  # noqa: E402
from vgf_prob.rl.networks import EnsembleCritic, EnsembleLayerNorm, EnsembleLinear  # noqa: E402

BUDGETS = (0, 1, 3, 5)
PARTICLES = 10


class ForeignCritic(nn.Module):
    """One head as a user's codebase writes it: cat on dim 1, 4 x (Linear -> LayerNorm -> ReLU), Linear(1)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...] = (512, 512, 512, 512)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim + action_dim
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LayerNorm(out, eps=1e-6), nn.ReLU()]
            width = out
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([state, action], 1))


def copy_into_foreign(ensemble: EnsembleCritic, head: int, foreign: ForeignCritic) -> None:
    """Give ``foreign`` the weights of ``ensemble``'s head ``head`` (so every row computes the same Q)."""
    affine_ensemble = [ensemble.first] + [m for m in ensemble.trunk.modules() if isinstance(m, EnsembleLinear)]
    norms_ensemble = [m for m in ensemble.trunk.modules() if isinstance(m, EnsembleLayerNorm)]
    affine_foreign = [m for m in foreign.net if isinstance(m, nn.Linear)]
    norms_foreign = [m for m in foreign.net if isinstance(m, nn.LayerNorm)]
    if len(affine_ensemble) != len(affine_foreign) or len(norms_ensemble) != len(norms_foreign):
        raise RuntimeError("EnsembleCritic's layers changed; update copy_into_foreign")
    with torch.no_grad():
        for source, target in zip(affine_ensemble, affine_foreign):
            target.weight.copy_(source.weight[head].T)
            target.bias.copy_(source.bias[head].reshape(-1))
        for source, target in zip(norms_ensemble, norms_foreign):
            target.weight.copy_(source.weight[head].reshape(-1))
            target.bias.copy_(source.bias[head].reshape(-1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="flow steps L, comma-separated")
    parser.add_argument("--block-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    env = environment(device, dtype)
    print(f"# a flow on a foreign critic: {describe(env)}", flush=True)
    print(f"# CPU {env['cpu_model']}; ISA flags {' '.join(env['cpu_flags']) or '-'}", flush=True)
    rate = matmul_rate(device, dtype, (BATCH_SIZE * PARTICLES, 512, 512))
    print(f"# measured torch.mm rate at 2560x512 @ 512x512: {rate['gflops']:.0f} GFLOP/s", flush=True)

    g = torch.Generator().manual_seed(args.seed)
    obs = torch.randn(BATCH_SIZE, OBS_DIM, generator=g).to(device, dtype)
    x0 = (torch.rand(BATCH_SIZE, PARTICLES, ACTION_DIM, generator=g) * 2 - 1).to(device, dtype)
    online, target = (EnsembleCritic(OBS_DIM, ACTION_DIM).to(device, dtype) for _ in range(2))
    foreign_online = [ForeignCritic(OBS_DIM, ACTION_DIM).to(device, dtype) for _ in range(2)]
    foreign_target = [ForeignCritic(OBS_DIM, ACTION_DIM).to(device, dtype) for _ in range(2)]
    for head in range(2):
        copy_into_foreign(online, head, foreign_online[head])
        copy_into_foreign(target, head, foreign_target[head])
    values = {
        "foreign (rows, autograd)": (vgf.as_value(*foreign_online), vgf.as_value(*foreign_target), True),
        "EnsembleCritic, autograd": (vgf.as_value(online), vgf.as_value(target), False),
        "EnsembleCritic, fast": (vgf.as_value(online), vgf.as_value(target), True),
    }
    with torch.no_grad():  # the rows measure one computation: check it before timing it
        reference = vgf.evaluate(values["EnsembleCritic, fast"][0], obs, x0)
        for name, (q, _, fast_on) in values.items():
            with fast.enabled(fast_on):
                error = float((vgf.evaluate(q, obs, x0) - reference).abs().max())
            if error > 1e-3:
                raise RuntimeError(f"{name} computes another Q (max difference {error:.2e})")

    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        flow = vgf.ValueGradientFlow(vgf.SteinField(0.1, differentiate_bandwidth=True), vgf.ParticleAdam(0.1),
                                     budget=budget, projection=vgf.BoxProjection(-1.0, 1.0))
        for name, (q, q_target, fast_on) in values.items():
            def run(q=q, q_target=q_target, fast_on=fast_on) -> None:
                with torch.no_grad(), fast.enabled(fast_on):
                    flow.next_value(x0, obs, q, q_target)

            probe = time_blocks(run, device, blocks=1, calls_per_block=1, warmup=args.warmup)
            timing = time_blocks(run, device, blocks=args.blocks,
                                 calls_per_block=calls_for(probe["median_s"], args.block_seconds), warmup=0)
            flops, _ = count_flops(run) if not fast_on or name.startswith("foreign") else (None, None)
            row = {"L": budget, "critic": name, "ms": timing["median_s"] * 1e3, "ms_min": timing["min_s"] * 1e3,
                   "gflop": flops / 1e9 if flops else None,
                   "gflops_per_s": flops / timing["median_s"] / 1e9 if flops else None,
                   "timing": timing, "load_average": environment(device, dtype)["load_average"]}
            rows.append(row)
            print(f"  L={budget} {name}: {row['ms']:.1f} ms", flush=True)

    state = obs
    actions = x0[:, 0]
    y = torch.randn(BATCH_SIZE, 1, generator=g).to(device, dtype)
    optimizer = torch.optim.Adam([p for c in foreign_online for p in c.parameters()], lr=3e-4)

    def td3_critic_step() -> None:
        loss = sum((c(state, actions) - y).square().mean() for c in foreign_online)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    probe = time_blocks(td3_critic_step, device, blocks=1, calls_per_block=1, warmup=args.warmup)
    td3 = time_blocks(td3_critic_step, device, blocks=args.blocks,
                      calls_per_block=calls_for(probe["median_s"], args.block_seconds), warmup=0)
    print(f"  TD3+BC critic step on {BATCH_SIZE} pairs (twin, forward + backward): {td3['median_s'] * 1e3:.1f} ms")

    by_budget: dict[int, dict[str, float]] = {}
    for row in rows:
        by_budget.setdefault(row["L"], {})[row["critic"]] = row["ms"]
    names = list(values)
    lines = [[budget, *[by[n] for n in names], by[names[0]] / by[names[-1]]] for budget, by in by_budget.items()]
    print()
    print(table(["L", *[f"{n} ms" for n in names], "foreign / fast"], lines))
    print(f"\nTD3+BC critic step for scale: {td3['median_s'] * 1e3:.1f} ms; torch.mm {rate['gflops']:.0f} GFLOP/s; "
          f"{describe(env)}")
    payload = {"env": env, "matmul": rate, "rows": rows, "td3_critic_step_ms": td3["median_s"] * 1e3,
               "td3_timing": td3, "states": BATCH_SIZE, "particles": PARTICLES}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
