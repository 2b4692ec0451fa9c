"""The agent's TD target and acting against REFERENCE.md section 3, with the expectation built here by hand.

One iteration of the authors' agent:
  1. x^0_i ~ mu(. | s'), then L_train flow steps driven by the ONLINE critic, heads combined by
     ``flow_aggregation`` (vgf_q_agg, mean);
  2. y = r + gamma * mask * (1/N) sum_i Qbar(s', x_i), Qbar the TARGET critic, heads by ``target_aggregation``
     (train_q_agg: min on D4RL);
acting: N draws of mu(. | s) -> L_test flow steps (online critic, flow_aggregation) -> argmax over particles
of the online critic with heads by target_aggregation.

The flow is written out below: the textbook Stein field (bandwidth held fixed, ``differentiate_bandwidth=
False``; the authors' bandwidth gradient is pinned by the parity tests), a fresh Adam on -phi per flow with
clipping to [-1, 1]. Only the networks (critics, BC reference) come from the agent. The target critic is
moved away from the online one so that using the wrong critic shows; the batch has terminal transitions.
"""

from __future__ import annotations

import math

import pytest
import torch

from vgf_prob.rl.agent import VGFAgent
from vgf_prob.rl.config import VGFConfig

OBS, ACT, BATCH, SEED = 4, 2, 12, 7
CONFIG = VGFConfig(
    critic_hidden_dims=(32, 32), bc_hidden_dims=(32, 32), num_particles=5, flow_steps=3, batch_size=BATCH,
    train_budget=3, test_budget=2, vgf_lr=0.1, alpha=0.5, discount=0.9, differentiate_bandwidth=False,
)  # fmt: skip


def make_agent(flow_aggregation: str = "mean", target_aggregation: str = "min") -> VGFAgent:
    torch.manual_seed(0)
    config = CONFIG.replace(flow_aggregation=flow_aggregation, target_aggregation=target_aggregation)
    agent = VGFAgent(OBS, ACT, config, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # in training Qbar lags Q by Polyak averaging; here it clearly differs
        for p in agent.target_critic.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return agent


def terminal_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "observations": torch.randn(BATCH, OBS, generator=g, dtype=torch.float64),
        "actions": torch.rand(BATCH, ACT, generator=g, dtype=torch.float64) * 2 - 1,
        "rewards": torch.randn(BATCH, generator=g, dtype=torch.float64),
        "next_observations": torch.randn(BATCH, OBS, generator=g, dtype=torch.float64),
        "masks": torch.tensor([0.0, 1.0] * (BATCH // 2), dtype=torch.float64),  # every other transition terminal
    }


# ------------------------------------------------------------------------------------------ by hand
def heads(critic, obs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Q_k(s, x_i) of every head, [B, N, H], from the critic's plain forward on matched pairs."""
    return critic(obs.unsqueeze(-2).expand(*x.shape[:-1], obs.shape[-1]), x)


def combine(q: torch.Tensor, how: str) -> torch.Tensor:
    return q.mean(-1) if how == "mean" else q.amin(-1)


def stein_step_field(critic, obs: torch.Tensor, x: torch.Tensor, how: str, alpha: float) -> torch.Tensor:
    """phi_i = (1/N) sum_j [K_ij grad Q(x_j) / alpha + K_ij (x_i - x_j) 2 / (2 s^2 + 1e-6)],
    s^2 = median of the N*N squared distances / (2 log(N + 1)), Q the critic's heads combined by ``how``."""
    leaf = x.detach().requires_grad_(True)
    (score,) = torch.autograd.grad(combine(heads(critic, obs, leaf), how).sum(), leaf)
    n = x.shape[-2]
    diff = x[:, :, None, :] - x[:, None, :, :]
    d2 = diff.square().sum(-1)
    s2 = torch.quantile(d2.flatten(-2), 0.5, dim=-1) / (2 * math.log(n + 1))  # mean of the middle two when N*N is even
    c = (2 * s2.clamp_min(1e-12) + 1e-6)[:, None, None]
    kernel = torch.exp(-d2 / c)
    return (kernel @ score / alpha + (kernel[..., None] * diff).sum(2) * 2 / c) / n


def flow_by_hand(critic, obs, x0, how: str, steps: int, lr: float, alpha: float) -> torch.Tensor:
    """Fresh Adam (0.9, 0.999, eps 1e-8) on g = -phi, clipped to [-1, 1] after every step."""
    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    for t in range(1, steps + 1):
        g = -stein_step_field(critic, obs, x, how, alpha)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.square()
        x = (x - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)).clamp(-1.0, 1.0)
    return x.detach()


def mu_particles(agent: VGFAgent, obs: torch.Tensor) -> torch.Tensor:
    """x^0 ~ mu(. | s), drawn with the generator seed the agent is given below."""
    return agent.reference_particles(obs, agent.config.num_particles, torch.Generator().manual_seed(SEED))


def td_target_by_hand(agent: VGFAgent, batch, flow_how: str, target_how: str, flow_critic=None, mask: bool = True):
    cfg = agent.config
    next_obs = batch["next_observations"]
    x = flow_by_hand(flow_critic or agent.critic, next_obs, mu_particles(agent, next_obs), flow_how,
                     cfg.train_budget, cfg.vgf_lr, cfg.alpha)  # fmt: skip
    with torch.no_grad():
        next_q = combine(heads(agent.target_critic, next_obs, x), target_how).mean(-1)
    return batch["rewards"] + cfg.discount * (batch["masks"] if mask else 1.0) * next_q


def act_by_hand(agent: VGFAgent, obs, flow_how: str, choice_how: str, steps: int, chooser=None) -> torch.Tensor:
    cfg = agent.config
    x = mu_particles(agent, obs)
    if steps:
        x = flow_by_hand(agent.critic, obs, x, flow_how, steps, cfg.vgf_lr, cfg.alpha)
    with torch.no_grad():
        best = combine(heads(chooser or agent.critic, obs, x), choice_how).argmax(-1)
    return x[torch.arange(len(obs)), best]


# ------------------------------------------------------------------------------------------ TD target
@pytest.mark.parametrize(("flow_how", "target_how"), [("mean", "min"), ("mean", "mean"), ("min", "mean")])
def test_td_target_is_built_as_the_specification_says(flow_how, target_how):
    agent = make_agent(flow_how, target_how)
    batch = terminal_batch()
    expected = td_target_by_hand(agent, batch, flow_how, target_how)
    other = "min" if flow_how == "mean" else "mean"
    # the mistakes this test must tell apart really change the target
    separations = {
        "terminal mask ignored": td_target_by_hand(agent, batch, flow_how, target_how, mask=False),
        "flow driven by the target critic": td_target_by_hand(agent, batch, flow_how, target_how,
                                                              flow_critic=agent.target_critic),
        f"flow on the {other} of the heads": td_target_by_hand(agent, batch, other, target_how),
        f"targets by the {'min' if target_how == 'mean' else 'mean'} of the heads":
            td_target_by_hand(agent, batch, flow_how, "min" if target_how == "mean" else "mean"),
    }  # fmt: skip
    for mistake, wrong in separations.items():
        assert (wrong - expected).abs().max() > 1e-4, f"test data cannot detect: {mistake}"

    got, info = agent.td_target(batch, generator=torch.Generator().manual_seed(SEED))
    error = (got - expected).abs()
    if error.max() > 1e-9:
        diagnosis = [m for m, wrong in separations.items() if (got - wrong).abs().max() < 1e-9]
        pytest.fail(
            f"TD target (flow {flow_how}, target {target_how}) is off the specification by {error.max():.3g} "
            f"(terminal rows {error[batch['masks'] == 0].max():.3g}, others {error[batch['masks'] == 1].max():.3g}); "
            f"it matches: {diagnosis or 'none of the known mistakes'}"
        )
    assert float(info["target_q"]) == pytest.approx(float(expected.mean()), abs=1e-9)


def test_terminal_transitions_bootstrap_nothing():
    """mask = 0: y = r exactly, whatever the critics say."""
    agent = make_agent()
    batch = terminal_batch()
    got, _ = agent.td_target(batch, generator=torch.Generator().manual_seed(SEED))
    terminal = batch["masks"] == 0
    assert torch.equal(got[terminal], batch["rewards"][terminal]), "terminal transitions bootstrap from s'"
    assert (got[~terminal] - batch["rewards"][~terminal]).abs().min() > 0


# ------------------------------------------------------------------------------------------ acting
@pytest.mark.parametrize("steps", [0, 2])
@pytest.mark.parametrize(("flow_how", "choice_how"), [("mean", "min"), ("mean", "mean")])
def test_act_moves_with_the_online_critic_and_chooses_by_the_target_aggregation(steps, flow_how, choice_how):
    agent = make_agent(flow_how, choice_how)
    obs = torch.randn(16, OBS, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = act_by_hand(agent, obs, flow_how, choice_how, steps)
    other = "min" if choice_how == "mean" else "mean"
    separations = {
        f"particle chosen by the {other} of the heads": act_by_hand(agent, obs, flow_how, other, steps),
        "particle chosen by the target critic": act_by_hand(agent, obs, flow_how, choice_how, steps,
                                                            chooser=agent.target_critic),
    }  # fmt: skip
    if steps:
        separations["flow on the min of the heads"] = act_by_hand(agent, obs, "min", choice_how, steps)
    for mistake, wrong in separations.items():
        assert (wrong - expected).abs().max() > 1e-4, f"test data cannot detect: {mistake}"

    got = agent.act(obs, budget=steps, generator=torch.Generator().manual_seed(SEED))
    error = (got - expected).abs().max()
    if error > 1e-9:
        diagnosis = [m for m, wrong in separations.items() if (got - wrong).abs().max() < 1e-9]
        pytest.fail(
            f"act (L_test {steps}, flow {flow_how}, choice {choice_how}) is off the specification by {error:.3g}; "
            f"it matches: {diagnosis or 'none of the known mistakes'}"
        )


def test_min_and_mean_target_aggregation_choose_different_particles():
    obs = torch.randn(16, OBS, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    chosen = {how: make_agent("mean", how).act(obs, budget=2, generator=torch.Generator().manual_seed(SEED))
              for how in ("min", "mean")}  # fmt: skip
    differ = (chosen["min"] - chosen["mean"]).abs().amax(-1) > 0
    assert differ.any(), "target_aggregation='min' acted exactly like 'mean' on 16 states"
