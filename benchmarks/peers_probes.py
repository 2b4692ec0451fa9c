"""Measurements behind benchmarks/main_job_search.md's hypotheses on why VGF trails (Reacher data only).

`probes(agent, ...)` on 1024 dataset states drawn with a fixed seed, Reacher's scripted expert
(`vgf_prob.rl.gym_generate.reacher_expert`) as the yardstick, Q = the online critic's heads combined by the
mean (``mean``) and by the min (``min``):

- ``bc_best_dist``: min over the N reference samples of ||x_i - expert(s)|| (does mu hold the expert mode?);
  ``bc_dist``: the mean over samples;
- ``chosen_dist[L]``: ||act(s, L_test=L) - expert(s)|| (does the critic's argmax pick it?), and
  ``q_gain[L]``: Q_mean(s, act(s, L)) - Q_mean(s, act(s, 0)), the critic's predicted gain of L flow steps;
- ``chosen_norm[L]`` / ``expert_norm``: mean ||action|| (the reward charges 0.1 ||a||^2 per step);
- ``expert_beats_chosen``: share of states where Q_min(s, expert(s)) > Q_min(s, act(s, 0));
- ``td_target_*``: at the next states of the same rows, the target critic's Q_min averaged over the N
  reference particles (what the TD target uses), its max over them, and at the expert's action;
- ``q_data`` (Q_min at the dataset's (s, a)) beside ``mean_reward / (1 - discount)`` (the value of a policy
  that earns the data's mean reward forever: where a converged behaviour critic sits);
- ``half_gain_q``: Q_mean at the data's mean action for mixed data (0.5 expert(s)) minus Q_mean at the expert.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _q(agent: Any, network: Any, obs: torch.Tensor, actions: torch.Tensor, how: str) -> torch.Tensor:
    heads = network(obs.unsqueeze(-2).expand(*actions.shape[:-1], obs.shape[-1]), actions)
    return heads.mean(-1) if how == "mean" else heads.min(-1).values


@torch.no_grad()
def _expert(obs_raw: torch.Tensor) -> torch.Tensor:
    from vgf_prob.rl.gym_generate import reacher_expert

    return torch.as_tensor(np.stack([reacher_expert(o) for o in obs_raw.numpy()]), dtype=torch.float32)


def probes(agent: Any, raw: Any, train_set: Any, budgets: list[int], seed: int, norm: Any) -> dict[str, Any]:
    """The measurements listed in the module docstring, as plain floats."""
    g = torch.Generator().manual_seed(seed + 99)
    idx = torch.randint(0, len(raw), (1024,), generator=g)
    obs_raw, next_raw = raw.observations[idx], raw.next_observations[idx]
    obs, next_obs = norm(obs_raw), norm(next_raw)
    expert, next_expert = _expert(obs_raw), _expert(next_raw)
    n = agent.config.num_particles
    with torch.no_grad():
        samples = agent.reference_particles(obs, n, g)  # [B, N, A]
        dist = (samples - expert[:, None]).norm(dim=-1)
        out: dict[str, Any] = {"bc_best_dist": dist.min(-1).values.mean().item(), "bc_dist": dist.mean().item()}
    chosen = {b: agent.act(obs, budget=b, generator=g).detach() for b in budgets}
    with torch.no_grad():
        q0 = _q(agent, agent.critic, obs, chosen[0][:, None], "mean")
        out["chosen_dist"] = {b: (a - expert).norm(dim=-1).mean().item() for b, a in chosen.items()}
        out["chosen_norm"] = {b: a.norm(dim=-1).mean().item() for b, a in chosen.items()}
        out["expert_norm"] = expert.norm(dim=-1).mean().item()
        out["q_gain"] = {b: (_q(agent, agent.critic, obs, a[:, None], "mean") - q0).mean().item()
                         for b, a in chosen.items()}  # fmt: skip
        q_expert_min = _q(agent, agent.critic, obs, expert[:, None], "min")
        q_chosen_min = _q(agent, agent.critic, obs, chosen[0][:, None], "min")
        out["expert_beats_chosen"] = (q_expert_min > q_chosen_min).float().mean().item()
        next_samples = agent.reference_particles(next_obs, n, g)
        q_next = _q(agent, agent.target_critic, next_obs, next_samples, "min")
        out["td_target_mean_over_particles"] = q_next.mean().item()
        out["td_target_max_over_particles"] = q_next.max(-1).values.mean().item()
        out["td_target_at_expert"] = _q(agent, agent.target_critic, next_obs, next_expert[:, None], "min").mean().item()
        out["q_data"] = _q(agent, agent.critic, obs, train_set.actions[idx][:, None], "min").mean().item()
        out["mean_reward_over_1_minus_discount"] = (raw.rewards.mean() / (1 - agent.config.discount)).item()
        q_expert_mean = _q(agent, agent.critic, obs, expert[:, None], "mean")
        out["half_gain_q"] = (_q(agent, agent.critic, obs, 0.5 * expert[:, None], "mean") - q_expert_mean).mean().item()
    return out
