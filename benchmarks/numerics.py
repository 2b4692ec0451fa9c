"""What the numerics-changing speed options do to the results: the same agent (same initial weights, same
batches, same random streams) trained with the default float32 fast path, the plain path (the float
tolerance every path shares), and an option (bfloat16 autocast in the flows, or torch.compile).

    python benchmarks/numerics.py                       # paper config, 5 updates, --bf16
    python benchmarks/numerics.py --config small --updates 20 --compile

Reported per option: relative difference to the float32 fast path of the critic loss, the mean TD target and
the BC loss after each update; on a fixed probe batch after training, the RMS difference of the TD targets
y = r + gamma * mask * mean_i Qbar(s', x_i) relative to their own Monte-Carlo spread (the std of y over 8
reference draws of the same agent: the noise the N particles already carry), the mean distance between the
transported particles, and how often acting picks the same action.
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
    OBS_DIM,
    UPDATE_CONFIGS,
    describe,
    environment,
    synthetic_batch,
    table,
    write_json,
)

from vgf_prob.rl.agent import VGFAgent  # noqa: E402
from vgf_prob.rl.config import VGFConfig  # noqa: E402
from vgf_prob.validation import host_reads  # noqa: E402


def train(agent: VGFAgent, updates: int, seed: int) -> list[dict[str, float]]:
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step in range(updates):
        with host_reads(False):
            info = agent.update(synthetic_batch(BATCH_SIZE, agent.device, agent.dtype, seed=1000 + step), generator)
        history.append({k: float(v) for k, v in info.items()})
    return history


def probe(agent: VGFAgent, seed: int, draws: int = 8) -> dict[str, torch.Tensor]:
    batch = synthetic_batch(BATCH_SIZE, agent.device, agent.dtype, seed=99)
    targets = torch.stack([agent.td_target(batch, torch.Generator().manual_seed(seed + k))[0] for k in range(draws)])
    with torch.no_grad(), host_reads(False):
        policy, _ = agent.transport(batch["next_observations"], agent.train_budget, torch.Generator().manual_seed(seed))
        actions = agent.act(batch["observations"][:64], generator=torch.Generator().manual_seed(seed))
    return {"targets": targets, "particles": policy.particles, "actions": actions}


def compare(name: str, base_hist, base_probe, hist, probe_) -> dict[str, Any]:
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    keys = ("critic_loss", "target_q", "bc_loss")
    per_key = {k: max(rel(h[k], b[k]) for h, b in zip(hist, base_hist)) for k in keys}
    spread = base_probe["targets"].std(0).mean()
    diff = (probe_["targets"][0] - base_probe["targets"][0]).square().mean().sqrt()
    return {
        "option": name,
        **{f"max_rel_diff_{k}": v for k, v in per_key.items()},
        "td_target_rms_diff": float(diff),
        "td_target_mc_std": float(spread),
        "td_diff_over_mc_std": float(diff / spread),
        "particle_mean_distance": float((probe_["particles"] - base_probe["particles"]).norm(dim=-1).mean()),
        "same_action_fraction": float(((probe_["actions"] - base_probe["actions"]).abs().amax(-1) < 1e-4).float().mean()),
        "mean_action_distance": float((probe_["actions"] - base_probe["actions"]).norm(dim=-1).mean()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="paper", choices=sorted(UPDATE_CONFIGS))
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="compare flow_autocast_bf16=True (default if no option)")
    parser.add_argument("--compile", action="store_true", help="compare compile=True")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"plain path (fast_path=False)": {"fast_path": False}}
    if args.bf16 or not args.compile:
        options["bf16 autocast in the flows"] = {"flow_autocast_bf16": True}
    if args.compile:
        options["torch.compile"] = {"compile": True}
    device = torch.device("cpu")
    env = environment(device, torch.float32)
    print(f"# numerics of the speed options on {describe(env)}, config {args.config}, {args.updates} updates",
          flush=True)
    base_config = VGFConfig(**UPDATE_CONFIGS[args.config])
    torch.manual_seed(args.seed)
    base = VGFAgent(OBS_DIM, ACTION_DIM, base_config)
    initial = {k: v.clone() for k, v in base.state_dict().items() if isinstance(v, torch.Tensor)}
    base_hist = train(base, args.updates, args.seed)
    base_probe = probe(base, args.seed)
    rows = []
    for name, changes in options.items():
        agent = VGFAgent(OBS_DIM, ACTION_DIM, base_config.replace(**changes))
        agent.load_state_dict({**agent.state_dict(), **initial})
        hist = train(agent, args.updates, args.seed)
        rows.append(compare(name, base_hist, base_probe, hist, probe(agent, args.seed)))
        print(f"  {name}: done", flush=True)
    print(table(
        ["option vs float32 fast path", "max rel diff critic loss", "max rel diff mean target", "max rel diff BC loss",
         "TD target RMS diff / MC std", "mean particle distance", "same action", "mean action distance"],
        [[r["option"], r["max_rel_diff_critic_loss"], r["max_rel_diff_target_q"], r["max_rel_diff_bc_loss"],
          r["td_diff_over_mc_std"], r["particle_mean_distance"], r["same_action_fraction"],
          r["mean_action_distance"]] for r in rows],
    ))
    payload = {"benchmark": "numerics", "env": env, "config": args.config, "updates": args.updates, "rows": rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
