"""VGF in TorchRL: offline training from a TorchRL replay buffer, rollouts in a TorchRL ``GymEnv``.

Everything but the loss and the actor is TorchRL's own: the environment (``GymEnv("Pendulum-v1")``), the data
(``env.rollout`` of a behaviour policy into a ``TensorDictReplayBuffer``), the critic (a ``ValueOperator`` on an
``MLP``, trained as ``num_qvalue_nets`` stacked functional copies), TD(0) targets from TorchRL's value
estimator and the target-network updater (``SoftUpdate``). `vgf_prob.torchrl.VGFLoss` puts VGF's bootstrap
into the critic loss and trains the flow-matching BC reference beside it; ``loss.actor(...)`` acts by the flow
with the parameters being trained. The box comes from ``env.action_spec``.

Data: Pendulum-v1 (torque in [-2, 2], 200-step episodes that end by time limit only), a scripted energy-pumping
/ PD controller that takes a uniform random torque with probability ``--epsilon`` (as examples/td3_bc_vgf.py).
Scores: mean return over ``--eval-episodes`` rollouts of the actor at each L_test in ``--test-budgets``
(0 is best-of-N) and of one reference draw.

Run: ``python examples/torchrl_vgf.py [--steps 3000] [--out results.json]`` (``--help`` lists the settings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import GymEnv
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives import SoftUpdate

import vgf_prob as vgf
from vgf_prob.distributions import FlowMatchingPolicy
from vgf_prob.torchrl import VGFLoss, spec_bounds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--episodes", type=int, default=50, help="behaviour episodes in the replay buffer")
    add("--episode-steps", type=int, default=200, help="steps per behaviour and evaluation episode (Pendulum: 200)")
    add("--epsilon", type=float, default=0.5, help="probability of a uniform random torque in the behaviour")
    add("--steps", type=int, default=3000, help="gradient steps")
    add("--batch-size", type=int, default=256)
    add("--hidden", type=int, default=128, help="width of the two hidden layers of the critic and the reference")
    add("--lr", type=float, default=3e-4)
    add("--gamma", type=float, default=0.99)
    add("--tau", type=float, default=0.005, help="SoftUpdate's Polyak rate")
    add("--particles", type=int, default=10, help="N per state")
    add("--train-budget", type=int, default=3, help="L_train: flow steps in the TD target")
    add("--test-budgets", type=int, nargs="+", default=[0, 3], help="L_test evaluated (0 is best-of-N)")
    add("--flow-lr", type=float, default=0.1, help="ParticleAdam's step (the box is [-2, 2])")
    add("--alpha", type=float, default=0.1, help="Stein temperature")
    add("--eval-episodes", type=int, default=5)
    add("--seed", type=int, default=0)
    add("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


class Behaviour(nn.Module):
    """Energy pumping far from upright, PD control near it (theta = 0 upright); a uniform random torque with
    probability ``epsilon``."""

    def __init__(self, epsilon: float, generator: torch.Generator) -> None:
        super().__init__()
        self.epsilon, self.generator = epsilon, generator

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        cos, sin, velocity = obs.unbind(-1)
        energy = velocity**2 / 6.0 + 5.0 * (cos - 1.0)
        pump = 2.0 * torch.sign(velocity + 1e-6) * torch.where(energy < 0, 1.0, -0.3)
        torque = torch.where(cos > 0.85, -(12.0 * torch.atan2(sin, cos) + 2.5 * velocity), pump).clamp(-2.0, 2.0)
        explore = torch.rand(torque.shape, generator=self.generator) < self.epsilon
        uniform = torch.rand(torque.shape, generator=self.generator) * 4.0 - 2.0
        return torch.where(explore, uniform, torque).unsqueeze(-1)


def episode_returns(env: GymEnv, policy: TensorDictModule, episodes: int, steps: int, seed: int) -> list[float]:
    returns = []
    for episode in range(episodes):
        env.set_seed(seed + episode)
        with torch.no_grad():
            rollout = env.rollout(steps, policy)
        returns.append(float(rollout["next", "reward"].sum()))
    return returns


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    env = GymEnv("Pendulum-v1")
    obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    generator = torch.Generator().manual_seed(args.seed)
    behaviour = TensorDictModule(Behaviour(args.epsilon, generator), in_keys=["observation"], out_keys=["action"])
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(args.episodes * args.episode_steps),
                                    batch_size=args.batch_size)
    behaviour_returns = []
    for episode in range(args.episodes):
        env.set_seed(args.seed * 100_000 + episode)
        rollout = env.rollout(args.episode_steps, behaviour)
        behaviour_returns.append(float(rollout["next", "reward"].sum()))
        buffer.extend(rollout)

    qvalue = ValueOperator(MLP(in_features=obs_dim + act_dim, out_features=1, num_cells=[args.hidden] * 2,
                               activation_class=nn.ReLU), in_keys=["observation", "action"])
    low, high = spec_bounds(env.action_spec)
    reference = FlowMatchingPolicy(obs_dim, act_dim, (args.hidden, args.hidden), action_low=low, action_high=high)
    flow = vgf.ValueGradientFlow(vgf.SteinField.paper(alpha=args.alpha), vgf.ParticleAdam(lr=args.flow_lr),
                                 budget=args.train_budget)
    loss = VGFLoss(qvalue, reference, flow, action_spec=env.action_spec, num_particles=args.particles)
    loss.make_value_estimator(gamma=args.gamma)
    updater = SoftUpdate(loss, tau=args.tau)
    optimizer = torch.optim.Adam(loss.parameters(), lr=args.lr)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = loss(buffer.sample())
        optimizer.zero_grad()
        (out["loss_qvalue"] + out["loss_bc"]).backward()
        optimizer.step()
        updater.step()
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step}: loss_qvalue {out['loss_qvalue'].item():.3g}, loss_bc {out['loss_bc'].item():.3g}, "
                  f"mean target {out['target_value'].mean().item():.3g}", flush=True)
    seconds = time.perf_counter() - started

    seed = 10**6
    policies = {"reference (BC, one draw)": loss.actor(num_particles=1, budget=0)}
    policies.update({f"VGF L_test={b}" + (" (best-of-N)" if b == 0 else ""): loss.actor(budget=b)
                     for b in args.test_budgets})
    results = {"args": vars(args), "transitions": len(buffer), "ms_per_update": 1e3 * seconds / max(args.steps, 1),
               "behaviour_return": sum(behaviour_returns) / len(behaviour_returns), "policies": {}}
    for name, actor in policies.items():
        returns = episode_returns(env, actor, args.eval_episodes, args.episode_steps, seed)
        results["policies"][name] = {"return": sum(returns) / len(returns), "returns": returns}
        print(f"{name:28s} {results['policies'][name]['return']:8.1f}", flush=True)
    print(f"behaviour {results['behaviour_return']:.1f}; {results['ms_per_update']:.1f} ms per update")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
