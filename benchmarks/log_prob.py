"""Cost of FlowMatchingPolicy.log_prob and of its backward, before and after the density matched its sampler.

before: the previous default, the continuous-time density for any sampler: a dopri5 solve (rtol = atol = 1e-5)
of the instantaneous change of variables from t = 1 to 0, the exact divergence by one autograd backward per
action dimension (reproduced below as `previous_log_prob`, from the previous revision of
distributions/flow_matching.py).
after: the exact density of the Euler sampler (Newton inversion of each step, log|det(I + dt J)| with J by
torch.func.jacfwd over rows), and for an rk4 sampler the density ODE on the fixed grid with the divergence by
torch.func. ``rsample_and_log_prob`` (a sample with its density in one pass) is timed too.

    python benchmarks/log_prob.py --threads 1 --hidden 512 512 512 512 --batch 256

Each number is the median of ``--blocks`` calls; the environment (CPU model, threads, load) is printed with it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from common import add_common_arguments, describe, environment, setup, table, write_json
from torchdiffeq import odeint

from vgf_prob.distributions import FlowMatchingPolicy


def previous_log_prob(policy: FlowMatchingPolicy, obs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The previous default log_prob: dopri5 on the continuous density, divergence by A backward passes."""
    differentiable = torch.is_grad_enabled()

    def dynamics(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = state[0] if state[0].requires_grad else state[0].detach().requires_grad_()
            v = policy.velocity(obs, x, t)
            diagonal = [
                torch.autograd.grad(v[..., i].sum(), x, create_graph=differentiable, retain_graph=True)[0][..., i]
                for i in range(v.shape[-1])
            ]
            div = torch.stack(diagonal, -1).sum(-1)
        return (v, div) if differentiable else (v.detach(), div.detach())

    grid = torch.linspace(1.0, 0.0, policy.num_steps + 1, dtype=value.dtype)
    start = (value, value.new_zeros(value.shape[:-1]))
    x0, delta = (y[-1] for y in odeint(dynamics, start, grid, method="dopri5", rtol=1e-5, atol=1e-5))
    return -0.5 * x0.square().sum(-1) - 0.5 * value.shape[-1] * math.log(2 * math.pi) + delta


def median_seconds(fn, blocks: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512, 512, 512])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--obs-dim", type=int, default=17)
    parser.add_argument("--action-dim", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device, dtype = setup(args)
    torch.manual_seed(args.seed)
    euler = FlowMatchingPolicy(args.obs_dim, args.action_dim, args.hidden, args.steps, bound="none").to(device, dtype)
    rk4 = FlowMatchingPolicy(args.obs_dim, args.action_dim, args.hidden, args.steps, method="rk4",
                             bound="none").to(device, dtype)
    rk4.load_state_dict(euler.state_dict())
    obs = torch.randn(args.batch, args.obs_dim, device=device, dtype=dtype)
    with torch.no_grad():
        value = euler(obs).sample()

    def forward(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def backward(fn):
        def run():
            euler.zero_grad(set_to_none=True)
            rk4.zero_grad(set_to_none=True)
            fn().sum().backward()
        return run

    cases = {
        "before: dopri5 density, A backward passes": lambda: previous_log_prob(euler, obs, value),
        "after: Euler exact density (Newton)": lambda: euler(obs).log_prob(value),
        "after: rk4 fixed-grid density, torch.func": lambda: rk4(obs).log_prob(value),
        "after: Euler rsample_and_log_prob": lambda: euler(obs).rsample_and_log_prob()[1],
    }
    rows, results = [], {}
    for name, fn in cases.items():
        fwd = median_seconds(forward(fn), args.blocks, args.warmup)
        bwd = median_seconds(backward(fn), args.blocks, args.warmup)
        results[name] = {"log_prob_ms": 1e3 * fwd, "log_prob_and_backward_ms": 1e3 * bwd}
        rows.append([name, f"{1e3 * fwd:.1f}", f"{1e3 * bwd:.1f}"])
    env = environment(device, dtype)
    config = {"hidden": args.hidden, "batch": args.batch, "obs_dim": args.obs_dim, "action_dim": args.action_dim,
              "steps": args.steps}
    print(describe(env))
    print(config)
    print(table(["log_prob", "no-grad ms", "with backward ms"], rows))
    write_json(args.json, {"environment": env, "config": config, "results": results})


if __name__ == "__main__":
    main()
