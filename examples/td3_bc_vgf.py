"""TD3+BC and VGF on one offline dataset, in one file, written the way CORL and CleanRL write theirs.

Everything an offline RL script has is here and is the script's own: the behaviour data (a D4RL-format HDF5
file generated locally from gymnasium's Pendulum-v1), the loader (as ``d4rl.qlearning_dataset`` reads such a
file), a replay buffer with state normalisation, the critic (``torch.cat([state, action], 1)`` -> ``[M, 1]``,
two of them), the training loop and the evaluation. TD3+BC (Fujimoto & Gu, 2021) is trained as CORL's
``td3_bc.py`` trains it. VGF keeps the same critics, buffer and loop and replaces the actor: a BC reference
(flow matching) is trained on the data, and the policy is its samples moved along the critic's action
gradient, in the TD target and at acting time. The lines that use vgf-prob are marked ``# [VGF]``.

Data: Pendulum-v1 (swing up and balance; 200-step episodes that end by time limit only; torque in
[-2, 2]). The behaviour mixes a scripted energy-pumping / PD controller (mean return about -140) per step
with uniform random torques (probability ``behaviour_epsilon``). Scores: mean return over evaluation
episodes, and the D4RL-style normalised score 100 (R - R_random) / (R_expert - R_random) with the uniform
random policy and the scripted controller run on the same evaluation seeds.

Run: ``python examples/td3_bc_vgf.py [--steps 5000] [--algo both|td3_bc|vgf] [--out results.json]``
(``--help`` lists every setting).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import vgf_prob as vgf  # [VGF]
from vgf_prob.distributions import FlowMatchingPolicy  # [VGF]


@dataclass
class Args:
    env: str = "Pendulum-v1"
    """gymnasium environment the data is collected in and the policies are evaluated in"""
    dataset: str = "pendulum-noisy.hdf5"
    """D4RL-format HDF5 file; generated here when it does not exist"""
    dataset_episodes: int = 100
    """episodes of behaviour data to generate (200 steps each)"""
    behaviour_epsilon: float = 0.5
    """probability that a step of the behaviour takes a uniform random action instead of the controller's"""
    algo: str = "both"
    """td3_bc, vgf or both"""
    steps: int = 5_000
    """gradient steps per algorithm"""
    batch_size: int = 256
    hidden: int = 128
    """width of the two hidden layers of every network"""
    lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target networks"""
    policy_noise: float = 0.2
    """TD3+BC: target policy smoothing noise, in units of max_action"""
    noise_clip: float = 0.5
    """TD3+BC: clip of that noise, in units of max_action"""
    policy_freq: int = 2
    """TD3+BC: actor and target updates every policy_freq critic updates"""
    td3_alpha: float = 2.5
    """TD3+BC: weight of the Q term against the BC term"""
    vgf_particles: int = 10
    """VGF: particles N per state"""
    vgf_train_budget: int = 3
    """VGF: flow steps L_train in the TD target"""
    vgf_test_budgets: tuple[int, ...] = (0, 1, 3)
    """VGF: flow steps L_test evaluated (0 is best-of-N from the reference)"""
    vgf_lr: float = 0.1
    """VGF: Adam step on the particles (about this much per action coordinate per step; the box is [-2, 2])"""
    vgf_alpha: float = 0.1
    """VGF: Stein temperature (attraction |grad Q| / alpha against the kernel's repulsion)"""
    bc_flow_steps: int = 10
    """VGF: Euler steps of the flow-matching reference's sampler"""
    eval_episodes: int = 10
    seed: int = 0
    threads: int = 1
    """torch threads (on a shared machine give torch only the free cores)"""
    out: str | None = None
    """write the results as JSON here"""


# ------------------------------------------------------------------------------------------- data
def pendulum_controller(obs: np.ndarray) -> np.ndarray:
    """Energy pumping far from the top, PD control near it (theta = 0 is upright)."""
    cos, sin, velocity = obs
    angle = np.arctan2(sin, cos)
    energy = velocity**2 / 6.0 + 5.0 * (cos - 1.0)  # (1/2) (m l^2 / 3) w^2 + (m g l / 2)(cos - 1), zero upright
    if cos > 0.85:
        torque = -(12.0 * angle + 2.5 * velocity)
    else:
        torque = 2.0 * np.sign(velocity + 1e-6) * (1.0 if energy < 0 else -0.3)
    return np.clip(np.array([torque], dtype=np.float32), -2.0, 2.0)


def rollout(env: gym.Env, policy, seed: int) -> dict[str, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    steps: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    done = False
    while not done:
        action = policy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(steps, (obs, action, reward, terminated, truncated and not terminated)):
            steps[key].append(value)
        obs, done = next_obs, terminated or truncated
    return {k: np.asarray(v) for k, v in steps.items()}


def generate_dataset(path: Path, args: Args) -> None:
    """Behaviour episodes written with D4RL's keys (observations, actions, rewards, terminals, timeouts)."""
    env = gym.make(args.env)
    rng = np.random.default_rng(args.seed)
    low, high = env.action_space.low, env.action_space.high

    def behaviour(obs: np.ndarray) -> np.ndarray:
        if rng.random() < args.behaviour_epsilon:
            return rng.uniform(low, high).astype(np.float32)
        return pendulum_controller(obs)

    episodes = [rollout(env, behaviour, seed=args.seed * 100_000 + i) for i in range(args.dataset_episodes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key in episodes[0]:
            f[key] = np.concatenate([e[key] for e in episodes])
        f["metadata/behaviour_epsilon"] = args.behaviour_epsilon
        f["metadata/mean_return"] = float(np.mean([e["rewards"].sum() for e in episodes]))


def qlearning_dataset(path: Path) -> dict[str, np.ndarray]:
    """(s, a, r, s', done) as d4rl.qlearning_dataset builds them: s' = the next row, timeout steps dropped."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    keep = ~data["timeouts"].astype(bool)
    keep[-1] = False  # the last row has no successor in the file
    index = np.flatnonzero(keep)
    return {
        "observations": data["observations"][index],
        "actions": data["actions"][index],
        "rewards": data["rewards"][index],
        "next_observations": data["observations"][index + 1],
        "terminals": data["terminals"][index].astype(np.float32),
    }


class ReplayBuffer:
    """The whole offline dataset on the device, states normalised by the dataset's mean and std (as CORL)."""

    def __init__(self, data: dict[str, np.ndarray], device: str) -> None:
        self.state_mean = data["observations"].mean(0)
        self.state_std = data["observations"].std(0) + 1e-3

        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.float32, device=device)

        self.states = tensor(self.normalize(data["observations"]))
        self.actions = tensor(data["actions"])
        self.rewards = tensor(data["rewards"]).reshape(-1, 1)
        self.next_states = tensor(self.normalize(data["next_observations"]))
        self.dones = tensor(data["terminals"]).reshape(-1, 1)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        return (obs - self.state_mean) / self.state_std

    def __len__(self) -> int:
        return self.states.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        index = torch.randint(len(self), (batch_size,), generator=generator, device=self.states.device)
        return [self.states[index], self.actions[index], self.rewards[index], self.next_states[index], self.dones[index]]


# ------------------------------------------------------------------------------------------- networks
class Actor(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, max_action: float, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, action_dim), nn.Tanh())
        self.max_action = max_action

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.max_action * self.net(state)


class Critic(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim + action_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        sa = torch.cat([state, action], 1)
        return self.net(sa)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for target_param, source_param in zip(target.parameters(), source.parameters()):
            target_param.lerp_(source_param, tau)


# ------------------------------------------------------------------------------------------- TD3+BC
class TD3BC:
    def __init__(self, state_dim: int, action_dim: int, max_action: float, args: Args) -> None:
        self.actor = Actor(state_dim, action_dim, max_action, args.hidden)
        self.actor_target = copy.deepcopy(self.actor)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.lr)
        self.critic_1, self.critic_2 = Critic(state_dim, action_dim, args.hidden), Critic(state_dim, action_dim, args.hidden)
        self.critic_1_target, self.critic_2_target = copy.deepcopy(self.critic_1), copy.deepcopy(self.critic_2)
        self.critic_optimizer = torch.optim.Adam([*self.critic_1.parameters(), *self.critic_2.parameters()], lr=args.lr)
        self.max_action, self.args, self.total_it = max_action, args, 0

    def train(self, batch: list[torch.Tensor], generator: torch.Generator) -> dict[str, float]:
        self.total_it += 1
        state, action, reward, next_state, done = batch
        a = self.args
        with torch.no_grad():
            noise = torch.randn(action.shape, generator=generator, device=action.device) * a.policy_noise * self.max_action
            noise = noise.clamp(-a.noise_clip * self.max_action, a.noise_clip * self.max_action)
            next_action = (self.actor_target(next_state) + noise).clamp(-self.max_action, self.max_action)
            target_q = torch.min(self.critic_1_target(next_state, next_action), self.critic_2_target(next_state, next_action))
            target_q = reward + (1 - done) * a.discount * target_q
        critic_loss = F.mse_loss(self.critic_1(state, action), target_q) + F.mse_loss(self.critic_2(state, action), target_q)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()
        log = {"critic_loss": critic_loss.item()}
        if self.total_it % a.policy_freq == 0:
            pi = self.actor(state)
            q = self.critic_1(state, pi)
            lmbda = a.td3_alpha / q.abs().mean().detach()
            actor_loss = -lmbda * q.mean() + F.mse_loss(pi, action)
            self.actor_optimizer.zero_grad()
            actor_loss.backward()
            self.actor_optimizer.step()
            soft_update(self.critic_1_target, self.critic_1, a.tau)
            soft_update(self.critic_2_target, self.critic_2, a.tau)
            soft_update(self.actor_target, self.actor, a.tau)
            log["actor_loss"] = actor_loss.item()
        return log

    @torch.no_grad()
    def act(self, state: torch.Tensor) -> torch.Tensor:
        return self.actor(state)


# ------------------------------------------------------------------------------------------- VGF
class VGF:
    """The same twin critics and loop; the actor is replaced by a flow-matching BC reference moved by VGF."""

    def __init__(self, state_dim: int, action_dim: int, low: np.ndarray, high: np.ndarray, args: Args) -> None:
        self.critic_1, self.critic_2 = Critic(state_dim, action_dim, args.hidden), Critic(state_dim, action_dim, args.hidden)
        self.critic_1_target, self.critic_2_target = copy.deepcopy(self.critic_1), copy.deepcopy(self.critic_2)
        self.critic_optimizer = torch.optim.Adam([*self.critic_1.parameters(), *self.critic_2.parameters()], lr=args.lr)
        self.reference = FlowMatchingPolicy(state_dim, action_dim, (args.hidden, args.hidden), args.bc_flow_steps,  # [VGF]
                                            action_low=torch.as_tensor(low), action_high=torch.as_tensor(high))  # [VGF]
        self.reference_optimizer = torch.optim.Adam(self.reference.parameters(), lr=args.lr)
        self.q = vgf.as_value(self.critic_1, self.critic_2)  # [VGF] twin critics as two heads
        self.q_target = vgf.as_value(self.critic_1_target, self.critic_2_target)  # [VGF]
        self.flow = vgf.ValueGradientFlow(  # [VGF] flow on the mean of the heads; targets and choice by their min
            vgf.SteinField.paper(alpha=args.vgf_alpha), vgf.ParticleAdam(lr=args.vgf_lr), budget=args.vgf_train_budget,
            projection=vgf.BoxProjection(low, high), target_aggregation="min",
        )
        self.args = args

    def train(self, batch: list[torch.Tensor], generator: torch.Generator) -> dict[str, float]:
        state, action, reward, next_state, done = batch
        a = self.args
        with torch.no_grad():
            next_v = self.flow.next_value(self.reference, next_state, self.q, self.q_target,  # [VGF]
                                          num_particles=a.vgf_particles, generator=generator)  # [VGF]
            target_q = reward + (1 - done) * a.discount * next_v.unsqueeze(-1)
        critic_loss = F.mse_loss(self.critic_1(state, action), target_q) + F.mse_loss(self.critic_2(state, action), target_q)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()
        bc_loss, _ = self.reference.loss(state, action, generator=generator)  # [VGF] flow-matching BC
        self.reference_optimizer.zero_grad()
        bc_loss.backward()
        self.reference_optimizer.step()
        soft_update(self.critic_1_target, self.critic_1, a.tau)
        soft_update(self.critic_2_target, self.critic_2, a.tau)
        return {"critic_loss": critic_loss.item(), "bc_loss": bc_loss.item()}

    def act(self, state: torch.Tensor, budget: int, num_particles: int | None = None) -> torch.Tensor:
        return self.flow.act(self.reference, state, self.q, num_particles=num_particles or self.args.vgf_particles,  # [VGF]
                             budget=budget)  # [VGF]


# ------------------------------------------------------------------------------------------- evaluation
def evaluate(env: gym.Env, policy, seeds: list[int]) -> np.ndarray:
    """Returns of ``policy(obs) -> action`` (raw env observations) on the episodes seeded ``seeds``."""
    return np.array([rollout(env, policy, seed)["rewards"].sum() for seed in seeds])


def torch_policy(act, buffer: ReplayBuffer):
    """A numpy obs -> numpy action policy from ``act(normalised state [1, O]) -> [1, A]``."""

    def policy(obs: np.ndarray) -> np.ndarray:
        state = torch.as_tensor(buffer.normalize(obs), dtype=torch.float32).reshape(1, -1)
        return act(state)[0].numpy()

    return policy


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Args):
        default = field.default
        name = "--" + field.name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(name, type=int, nargs="+", default=default)
        elif default is None:
            parser.add_argument(name, default=None)
        else:
            parser.add_argument(name, type=type(default), default=default)
    parsed = vars(parser.parse_args(argv))
    parsed["vgf_test_budgets"] = tuple(parsed["vgf_test_budgets"])
    args = Args(**parsed)
    if args.algo not in ("td3_bc", "vgf", "both"):
        parser.error(f"--algo must be td3_bc, vgf or both, got {args.algo!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = Path(args.dataset)
    if not path.exists():
        started = time.perf_counter()
        generate_dataset(path, args)
        print(f"generated {path} ({args.dataset_episodes} episodes) in {time.perf_counter() - started:.1f} s", flush=True)
    buffer = ReplayBuffer(qlearning_dataset(path), device="cpu")
    env = gym.make(args.env)
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    seeds = [10**6 + i for i in range(args.eval_episodes)]
    uniform = np.random.default_rng(args.seed)
    random_returns = evaluate(env, lambda obs: uniform.uniform(low, high).astype(np.float32), seeds)
    expert_returns = evaluate(env, pendulum_controller, seeds)
    r_random, r_expert = float(random_returns.mean()), float(expert_returns.mean())

    def summary(returns: np.ndarray) -> dict[str, float]:
        return {"return": float(returns.mean()), "return_std": float(returns.std()),
                "score": float(100 * (returns.mean() - r_random) / (r_expert - r_random))}

    results: dict = {"dataset": {"path": str(path), "transitions": len(buffer)},
                     "reference_returns": {"random": r_random, "expert": r_expert}, "policies": {}}
    with h5py.File(path, "r") as f:
        results["dataset"]["behaviour_return"] = float(f["metadata/mean_return"][()])
    generator = torch.Generator().manual_seed(args.seed)
    algos = ("td3_bc", "vgf") if args.algo == "both" else (args.algo,)
    for algo in algos:
        agent = (TD3BC(state_dim, action_dim, float(high[0]), args) if algo == "td3_bc"
                 else VGF(state_dim, action_dim, low, high, args))
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            log = agent.train(buffer.sample(args.batch_size, generator), generator)
            if step % max(1, args.steps // 5) == 0:
                print(f"{algo} step {step}: " + ", ".join(f"{k} {v:.3g}" for k, v in log.items()), flush=True)
        seconds = time.perf_counter() - started
        results[f"{algo}_ms_per_update"] = 1e3 * seconds / max(args.steps, 1)
        if algo == "td3_bc":
            results["policies"]["TD3+BC"] = summary(evaluate(env, torch_policy(agent.act, buffer), seeds))
        else:
            results["policies"]["VGF reference (BC, one draw)"] = summary(
                evaluate(env, torch_policy(lambda s: agent.act(s, budget=0, num_particles=1), buffer), seeds))
            for budget in args.vgf_test_budgets:
                label = f"VGF L_test={budget}" + (" (best-of-N)" if budget == 0 else "")
                results["policies"][label] = summary(
                    evaluate(env, torch_policy(lambda s, b=budget: agent.act(s, budget=b), buffer), seeds))
    print(f"\n{args.env}, {len(buffer)} transitions (behaviour return {results['dataset']['behaviour_return']:.0f}), "
          f"{args.steps} steps, seed {args.seed}; random {r_random:.0f}, scripted controller {r_expert:.0f}")
    print(f"{'policy':34s} {'return':>16s} {'score':>7s}")
    for name, r in results["policies"].items():
        print(f"{name:34s} {r['return']:8.1f} ± {r['return_std']:5.1f} {r['score']:7.1f}")
    for algo in algos:
        print(f"{algo}: {results[f'{algo}_ms_per_update']:.1f} ms per update ({args.threads} thread(s))")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": dataclasses.asdict(args), **results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
