# VGF in CleanRL's style: cleanrl/td3_continuous_action.py (https://github.com/vwxyzjn/cleanrl) turned offline.
# The critic keeps CleanRL's QNetwork interface (built from the vector env; forward(x, a) on torch.cat([x, a], 1)
# -> [M, 1]; layers fc1, fc2, fc3, so CleanRL's saved state dicts load), the twin critics, the Polyak targets, the
# TD loss and CleanRL's loop shape. The offline data is CleanRL's own warm-up phase (uniform random actions, its
# `learning_starts` steps) kept as a fixed buffer. VGF replaces the actor: a flow-matching BC reference trained on
# the buffer, moved along the critics' action gradient in the TD target and when acting. The lines that use
# vgf-prob are marked `# VGF glue` (tests/test_cleanrl_example.py counts them: at most 10).
# Run: python examples/cleanrl_td3_vgf.py [--total-timesteps 20000] [--out results.json]
import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import vgf_prob as vgf  # VGF glue


@dataclass
class Args:
    seed: int = 1
    """seed of the experiment"""
    env_id: str = "Pendulum-v1"
    """the id of the environment"""
    max_episode_steps: int = 200
    """time limit of an episode (Pendulum's own is 200)"""
    dataset_steps: int = 20000
    """environment steps of uniform random actions collected into the offline buffer"""
    total_timesteps: int = 20000
    """gradient steps on the offline buffer"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizers"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    policy_frequency: int = 2
    """the frequency of training the reference and updating the targets (delayed, as TD3)"""
    particles: int = 10
    """VGF: particles N per state"""
    train_budget: int = 3
    """VGF: flow steps L_train in the TD target"""
    test_budgets: tuple[int, ...] = (0, 3)
    """VGF: flow steps L_test evaluated (0 is best-of-N)"""
    flow_lr: float = 0.1
    """VGF: Adam step on the particles per flow step (Pendulum's box is [-2, 2])"""
    alpha: float = 0.1
    """VGF: Stein temperature"""
    eval_episodes: int = 5
    """evaluation episodes per L_test"""
    out: str = ""
    """write the results as JSON here"""


def make_env(env_id, seed, max_episode_steps):
    def thunk():
        env = gym.make(env_id, max_episode_steps=max_episode_steps)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env.action_space.seed(seed)
        return env

    return thunk


class QNetwork(nn.Module):
    """CleanRL's TD3 critic interface: Q(x, a) = MLP(cat(x, a)), two hidden layers of 256, output [M, 1]."""

    def __init__(self, env):
        super().__init__()
        in_features = int(np.prod(env.single_observation_space.shape) + np.prod(env.single_action_space.shape))
        self.fc1, self.fc2, self.fc3 = nn.Linear(in_features, 256), nn.Linear(256, 256), nn.Linear(256, 1)

    def forward(self, x, a):
        x = torch.cat([x, a], 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ReplayBuffer:
    """The fields of cleanrl_utils.buffers.ReplayBuffer's samples: rewards and dones [B, 1]."""

    def __init__(self, obs, next_obs, actions, rewards, dones, device):
        def tensor(x):
            return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)

        self.observations, self.next_observations, self.actions = tensor(obs), tensor(next_obs), tensor(actions)
        self.rewards, self.dones = tensor(rewards).reshape(-1, 1), tensor(dones).reshape(-1, 1)

    def sample(self, batch_size):
        index = torch.randint(len(self.rewards), (batch_size,), device=self.rewards.device)
        names = ("observations", "actions", "next_observations", "dones", "rewards")
        return argparse.Namespace(**{name: getattr(self, name)[index] for name in names})


def parse_args():
    parser = argparse.ArgumentParser()
    for field in dataclasses.fields(Args):
        kind = type(field.default)
        nargs = "+" if kind is tuple else None
        parser.add_argument("--" + field.name.replace("_", "-"), type=int if kind is tuple else kind,
                            nargs=nargs, default=field.default)
    parsed = vars(parser.parse_args())
    return Args(**{**parsed, "test_budgets": tuple(parsed["test_budgets"])})


if __name__ == "__main__":
    args = parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, args.seed, args.max_episode_steps)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    assert isinstance(envs.single_action_space, gym.spaces.Box), "only continuous action space is supported"

    # offline data: CleanRL's warm-up phase (uniform random actions), kept; `final_obs` replaces the reset obs
    columns = {"obs": [], "next_obs": [], "actions": [], "rewards": [], "dones": []}
    obs, _ = envs.reset(seed=args.seed)
    for global_step in range(args.dataset_steps):
        actions = np.array([envs.single_action_space.sample() for _ in range(envs.num_envs)])
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        real_next_obs = next_obs.copy()
        for idx, trunc in enumerate(truncations):
            if trunc:
                real_next_obs[idx] = infos["final_obs"][idx]
        for key, value in zip(columns, (obs, real_next_obs, actions, rewards, terminations)):
            columns[key].extend(value)
        obs = next_obs
    rb = ReplayBuffer(*columns.values(), device=device)

    qf1, qf2 = QNetwork(envs).to(device), QNetwork(envs).to(device)
    qf1_target, qf2_target = QNetwork(envs).to(device), QNetwork(envs).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_optimizer = optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.learning_rate)
    low, high = envs.single_action_space.low, envs.single_action_space.high  # VGF glue
    reference = vgf.FlowMatchingPolicy(obs.shape[1], len(low), (256, 256), action_low=low, action_high=high)  # VGF glue
    q, q_target = vgf.as_value(qf1, qf2), vgf.as_value(qf1_target, qf2_target)  # VGF glue
    flow = vgf.ValueGradientFlow(vgf.SteinField.paper(alpha=args.alpha), vgf.ParticleAdam(lr=args.flow_lr),  # VGF glue
                                 budget=args.train_budget, projection=vgf.BoxProjection(low, high))  # VGF glue
    actor_optimizer = optim.Adam(list(reference.parameters()), lr=args.learning_rate)  # VGF glue
    start_time = time.time()

    for global_step in range(args.total_timesteps):
        data = rb.sample(args.batch_size)
        with torch.no_grad():
            min_qf_next_target = flow.next_value(reference, data.next_observations, q, q_target, args.particles)  # VGF glue
            next_q_value = data.rewards.flatten() + (1 - data.dones.flatten()) * args.gamma * (min_qf_next_target).view(-1)

        qf1_a_values = qf1(data.observations, data.actions).view(-1)
        qf2_a_values = qf2(data.observations, data.actions).view(-1)
        qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
        qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
        qf_loss = qf1_loss + qf2_loss

        q_optimizer.zero_grad()
        qf_loss.backward()
        q_optimizer.step()

        if global_step % args.policy_frequency == 0:
            actor_loss, _ = reference.loss(data.observations, data.actions)  # VGF glue
            actor_optimizer.zero_grad()
            actor_loss.backward()
            actor_optimizer.step()

            for param, target_param in zip(qf1.parameters(), qf1_target.parameters()):
                target_param.data.copy_(args.tau * param.data + (1 - args.tau) * target_param.data)
            for param, target_param in zip(qf2.parameters(), qf2_target.parameters()):
                target_param.data.copy_(args.tau * param.data + (1 - args.tau) * target_param.data)

        if global_step % max(1, args.total_timesteps // 5) == 0:
            print(f"global_step={global_step}, qf_loss={qf_loss.item() / 2.0:.3f}, actor_loss={actor_loss.item():.3f}, "
                  f"SPS={int((global_step + 1) / (time.time() - start_time))}", flush=True)

    results = {"args": dataclasses.asdict(args), "transitions": len(rb.rewards), "returns": {}}
    for budget in args.test_budgets:
        episodic_returns, episodic_return = [], 0.0
        obs, _ = envs.reset(seed=10**6)
        while len(episodic_returns) < args.eval_episodes:
            actions = flow.act(reference, torch.Tensor(obs).to(device), q, args.particles, budget=budget)  # VGF glue
            obs, rewards, terminations, truncations, infos = envs.step(actions.cpu().numpy())
            episodic_return += float(rewards[0])
            if terminations[0] or truncations[0]:
                episodic_returns.append(episodic_return)
                episodic_return = 0.0
        results["returns"][f"VGF L_test={budget}"] = episodic_returns
        print(f"L_test={budget}: episodic_return={np.mean(episodic_returns):.1f} over {len(episodic_returns)} episodes")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    envs.close()
