"""The offline-RL VGF agent: config, critic ensemble, update, acting, fast path, checkpoints (tiny sizes)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from rl_helpers import synthetic_batch

from vgf_prob.budget import DisplacementBudget, StepBudget
from vgf_prob.rl.agent import VGFAgent
from vgf_prob.rl.config import OFFLINE_TO_ONLINE_PRESETS, PRESETS, VGFConfig, preset
from vgf_prob.rl.networks import AmortizedGradientNetwork, EnsembleCritic
from vgf_prob.transport import ValueGradientFlow

OBS, ACT, BATCH = 5, 3, 16
TINY = VGFConfig(
    critic_hidden_dims=(32, 32),
    bc_hidden_dims=(32, 32),
    amortized_hidden_dims=(32, 32),
    num_particles=4,
    flow_steps=3,
    batch_size=BATCH,
    train_budget=2,
)


def make_batch(seed: int = 0, batch_size: int = BATCH, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return synthetic_batch(seed, batch_size, OBS, ACT, dtype)


def make_agent(seed: int = 0, **changes) -> VGFAgent:
    torch.manual_seed(seed)
    return VGFAgent(OBS, ACT, TINY.replace(**changes))


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_papers():
    cfg = VGFConfig()
    assert cfg.batch_size == 256 and cfg.lr == 3e-4 and cfg.tau == 0.005 and cfg.discount == 0.99
    assert cfg.critic_hidden_dims == cfg.bc_hidden_dims == (512,) * 4
    assert cfg.num_critic_heads == 2 and cfg.critic_layer_norm_eps == 1e-6
    assert cfg.num_particles == 10 and cfg.flow_steps == 10 and cfg.max_grad_norm == 0
    assert cfg.reference == "flow_matching" and cfg.variant == "stein" and cfg.differentiate_bandwidth
    assert cfg.acting_budget == cfg.train_budget and cfg.fast_path
    assert not cfg.flow_autocast_bf16 and not cfg.compile
    amortized = VGFConfig(variant="amortized")
    assert amortized.num_particles == 5 and amortized.max_grad_norm == 1.0
    assert cfg.replace(variant="amortized") == amortized
    assert amortized.replace(variant="stein", num_particles=7).num_particles == 7


def test_config_round_trips_and_rejects_bad_fields():
    cfg = VGFConfig(train_budget=4, test_budget=1, target_aggregation="min", critic_hidden_dims=(64, 64))
    assert VGFConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown VGFConfig field.*'budget'"):
        VGFConfig.from_dict({"budget": 3})
    for bad in ({"target_aggregation": "max"}, {"variant": "svgd"}, {"num_particles": 0}, {"tau": 0.0},
                {"critic_hidden_dims": ()}, {"alpha": -1.0}, {"train_budget": 1.5}, {"reference": "diffusion"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            VGFConfig(**bad)


def test_d4rl_preset_is_the_authors_shared_setting():
    """REFERENCE.md section 3: the authors' D4RL offline script, one setting for every task."""
    for task in ("hopper-medium-v2", "halfcheetah-medium-expert-v2", "walker2d-medium-replay-v2",
                 "antmaze-large-diverse-v2"):
        cfg = preset(task)
        assert (cfg.variant, cfg.num_particles, cfg.flow_steps, cfg.train_budget, cfg.vgf_lr, cfg.alpha) == (
            "stein", 10, 10, 5, 0.1, 0.1), task
        assert (cfg.flow_aggregation, cfg.target_aggregation, cfg.discount) == ("mean", "min", 0.99), task
        assert cfg.differentiate_bandwidth and cfg.max_grad_norm == 0, task
    assert preset("antmaze-large-diverse-v2", train_budget=2).train_budget == 2


def test_ogbench_presets_follow_the_offline_and_offline_to_online_scripts():
    cube = preset("cube-double-play-singletask-task2-v0")
    assert (cube.variant, cube.train_budget, cube.vgf_lr, cube.alpha, cube.num_particles) == ("stein", 1, 0.1, 1.0, 10)
    assert (cube.discount, cube.flow_aggregation, cube.target_aggregation) == (0.99, "mean", "mean")
    giant = preset("antmaze-giant-navigate-v0")
    assert (giant.variant, giant.discount, giant.flow_aggregation, giant.target_aggregation) == (
        "stein", 0.995, "mean", "min")
    puzzle = preset("puzzle-4x4-play-singletask-task4-v0")
    assert (puzzle.train_budget, puzzle.vgf_lr, puzzle.alpha) == (3, 0.01, 0.2)
    online = preset("cube-double-play-singletask-task2-v0", source="offline-to-online")
    assert (online.variant, online.train_budget, online.vgf_lr, online.discount) == ("amortized", 1, 0.05, 0.99)
    assert online.num_particles == 5 and online.max_grad_norm == 1.0 and online.flow_aggregation == "mean"
    online_giant = preset("antmaze-giant-navigate-v0", source="offline-to-online")
    assert (online_giant.train_budget, online_giant.vgf_lr, online_giant.target_aggregation) == (5, 0.1, "min")
    assert all(isinstance(preset(name), VGFConfig) for name in PRESETS)
    assert all(isinstance(preset(name, "offline-to-online"), VGFConfig) for name in OFFLINE_TO_ONLINE_PRESETS)
    with pytest.raises(ValueError, match="no VGF preset .offline. for task 'pen-human-v1'"):
        preset("pen-human-v1")
    with pytest.raises(ValueError, match="preset source"):
        preset("hopper-medium-v2", source="online")


def test_config_saved_with_one_head_aggregation_loads_with_its_old_meaning():
    """Checkpoints before the split stored head_aggregation: TD target and selection; the flow took the mean."""
    old = VGFConfig().to_dict()
    del old["flow_aggregation"], old["target_aggregation"]
    old["head_aggregation"] = "min"
    with pytest.warns(UserWarning, match="head_aggregation .* read as target_aggregation"):
        cfg = VGFConfig.from_dict(old)
    assert (cfg.flow_aggregation, cfg.target_aggregation) == ("mean", "min")
    with pytest.raises(ValueError, match="not both"):
        VGFConfig.from_dict({"head_aggregation": "min", "target_aggregation": "mean"})


# ---------------------------------------------------------------------------------------------- networks


def test_critic_heads_are_independent_mlps_with_the_papers_layers():
    torch.manual_seed(0)
    critic = EnsembleCritic(OBS, ACT, (16, 8), num_heads=3, layer_norm_eps=1e-6)
    for p in critic.parameters():  # non-trivial LayerNorm affines and biases
        p.data.add_(0.1 * torch.randn_like(p))
    obs, actions = torch.randn(7, OBS), torch.rand(7, ACT) * 2 - 1
    q = critic(obs, actions)
    assert q.shape == (7, 3)
    layers = [critic.first, *critic.trunk.hidden]
    for k in range(3):
        x = torch.cat([obs, actions], -1)
        for layer, norm in zip(layers, critic.trunk.norms):
            x = x @ layer.weight[k] + layer.bias[k]
            x = torch.relu(nn.functional.layer_norm(x, x.shape[-1:], norm.weight[k, 0], norm.bias[k, 0], 1e-6))
        expected = x @ critic.trunk.output.weight[k] + critic.trunk.output.bias[k]
        torch.testing.assert_close(q[:, k], expected.squeeze(-1))
    q[:, 0].sum().backward()  # head 0's output does not depend on head 1's weights
    assert critic.first.weight.grad[1].abs().max() == 0 and critic.first.weight.grad[0].abs().max() > 0


def test_critic_init_is_xavier_uniform_with_zero_bias():
    critic = EnsembleCritic(OBS, ACT, (64,), num_heads=2)
    bound = math.sqrt(6 / (OBS + ACT + 64))
    weight = critic.first.weight
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert not torch.equal(weight[0], weight[1])
    assert all(layer.bias.abs().max() == 0 for layer in (critic.first, critic.trunk.output))


@pytest.mark.parametrize("network", ["critic", "amortized"])
def test_cached_encoding_matches_the_concat_path(network):
    torch.manual_seed(0)
    net = EnsembleCritic(OBS, ACT, (32, 32), 2) if network == "critic" else AmortizedGradientNetwork(OBS, ACT, (32, 32))
    obs, particles = torch.randn(6, OBS), torch.rand(6, 4, ACT) * 2 - 1
    plain = net(obs.unsqueeze(1).expand(6, 4, OBS), particles)
    torch.testing.assert_close(net.forward_from_encoding(net.encode_obs(obs), particles), plain)


# ---------------------------------------------------------------------------------------------- update


def test_update_gives_finite_scalar_losses_and_moves_every_network():
    agent = make_agent()
    before = {name: snapshot(getattr(agent, name)) for name in ("critic", "target_critic", "reference")}
    info = agent.update(make_batch(), generator=torch.Generator().manual_seed(0))
    assert {"critic_loss", "bc_loss", "target_q", "q_mean", "flow_displacement"} <= set(info)
    for value in info.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and torch.isfinite(value)
        assert not value.requires_grad
    for name, old in before.items():
        new = snapshot(getattr(agent, name))
        assert all(not torch.equal(a, b) for a, b in zip(old, new)), f"{name} did not change"


def test_target_critic_is_a_polyak_average():
    agent = make_agent(tau=0.25)
    torch.testing.assert_close(snapshot(agent.target_critic), snapshot(agent.critic))  # starts as a copy
    assert not any(p.requires_grad for p in agent.target_critic.parameters())
    target_before = snapshot(agent.target_critic)
    agent.update(make_batch())
    for old, new, online in zip(target_before, snapshot(agent.target_critic), snapshot(agent.critic)):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * online)


def test_td_target_changes_when_the_flow_moves_the_particles():
    batch = make_batch(1)
    targets = {}
    for budget in (0, 2):
        agent = make_agent(seed=3, train_budget=budget)
        targets[budget], info = agent.td_target(batch, torch.Generator().manual_seed(5))
        assert (info["flow_displacement"] > 0) == (budget > 0)
    assert not torch.allclose(targets[0], targets[2])


def test_td_target_is_the_target_critic_at_the_transported_particles(monkeypatch):
    agent = make_agent(target_aggregation="min")
    agent.update(make_batch(0))  # target critic != online critic from here on
    flows = []
    original = ValueGradientFlow._transport  # every public call (__call__, act, next_value) runs it

    def spy(self, reference, obs, value, *args, **kwargs):
        policy, used_obs = original(self, reference, obs, value, *args, **kwargs)
        flows.append((self, reference, obs, policy))
        return policy, used_obs

    monkeypatch.setattr(ValueGradientFlow, "_transport", spy)
    batch = make_batch(1)
    target, _ = agent.td_target(batch, torch.Generator().manual_seed(2))
    (flow, start, obs, policy), = flows
    assert repr(flow.budget) == "StepBudget(2)" and torch.equal(obs, batch["next_observations"])
    assert torch.all(policy.report.steps == 2) and not torch.allclose(policy.particles, start)
    with torch.no_grad():
        next_obs = obs.unsqueeze(1).expand(-1, policy.particles.shape[1], -1)
        q_bar = agent.target_critic(next_obs, policy.particles).amin(-1).mean(-1)
    torch.testing.assert_close(target, batch["rewards"] + 0.99 * batch["masks"] * q_bar)


def test_critic_loss_sums_the_heads_mean_squared_td_errors():
    agent = make_agent()
    batch, target = make_batch(), torch.randn(BATCH)
    loss, _ = agent.critic_loss(batch, target)
    q = agent.critic(batch["observations"], batch["actions"])
    torch.testing.assert_close(loss, ((q[:, 0] - target) ** 2).mean() + ((q[:, 1] - target) ** 2).mean())


@pytest.mark.parametrize(("variant", "reference"), [("amortized", "flow_matching"), ("stein", "gaussian")])
def test_amortized_and_gaussian_variants_train_and_act(variant, reference):
    agent = make_agent(variant=variant, reference=reference)
    g = torch.Generator().manual_seed(0)
    before = snapshot(agent.amortized) if agent.amortized is not None else None
    for step in range(2):
        info = agent.update(make_batch(step), generator=g)
    assert all(torch.isfinite(v) for v in info.values())
    if variant == "amortized":
        assert agent.config.num_particles == 5 and agent.config.max_grad_norm == 1.0
        assert "amortized_loss" in info
        assert all(not torch.equal(a, b) for a, b in zip(before, snapshot(agent.amortized)))
    actions = agent.act(torch.randn(3, OBS), budget=2, generator=g)
    assert actions.shape == (3, ACT) and actions.abs().max() <= 1


def test_amortized_network_regresses_onto_the_critics_action_gradient():
    agent = make_agent(variant="amortized")
    batch = make_batch()
    loss, _ = agent.amortized_loss(batch)
    actions = batch["actions"].clone().requires_grad_(True)
    (score,) = torch.autograd.grad(agent.critic(batch["observations"], actions).mean(-1).sum(), actions)
    f = agent.amortized(batch["observations"], batch["actions"])
    torch.testing.assert_close(loss, ((f - score) ** 2).mean())
    loss.backward()
    assert all(p.grad is None for p in agent.critic.parameters())


@pytest.mark.parametrize("variant", ["stein", "amortized"])
def test_fast_path_matches_the_plain_path(variant):
    fast = make_agent(fast_path=True, variant=variant)
    plain = VGFAgent(OBS, ACT, fast.config.replace(fast_path=False))
    plain.load_state_dict(fast.state_dict())
    g_fast, g_plain = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for step in range(3):
        batch = make_batch(step)
        info_fast, info_plain = fast.update(batch, g_fast), plain.update(batch, g_plain)
        for key in info_fast:
            torch.testing.assert_close(info_fast[key], info_plain[key], rtol=1e-4, atol=1e-5, msg=key)
    obs = torch.randn(8, OBS)
    torch.testing.assert_close(
        fast.act(obs, generator=torch.Generator().manual_seed(1)),
        plain.act(obs, generator=torch.Generator().manual_seed(1)), rtol=1e-4, atol=1e-5,
    )


def test_float64_agent_trains_and_acts_in_float64():
    torch.manual_seed(0)
    agent = VGFAgent(OBS, ACT, TINY, dtype=torch.float64)
    info = agent.update(make_batch(dtype=torch.float64))
    assert all(v.dtype == torch.float64 for v in info.values() if v.is_floating_point())
    assert agent.act(torch.randn(2, OBS, dtype=torch.float64)).dtype == torch.float64


def test_bf16_autocast_option_keeps_results_close_and_float32():
    exact, autocast = make_agent(), make_agent(flow_autocast_bf16=True)
    batch = make_batch()
    target, _ = exact.td_target(batch, torch.Generator().manual_seed(0))
    target_bf16, _ = autocast.td_target(batch, torch.Generator().manual_seed(0))
    assert target_bf16.dtype == torch.float32 and torch.isfinite(target_bf16).all()
    torch.testing.assert_close(target_bf16, target, rtol=0.05, atol=0.05)
    info = autocast.update(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in info.values())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("observations", torch.randn(BATCH, OBS + 1), r"batch\['observations'\] has shape \(16, 6\), expected \(16, 5\)"),
        ("actions", torch.rand(BATCH, ACT + 2), r"batch\['actions'\] has shape \(16, 5\), expected \(16, 3\)"),
        ("rewards", torch.tensor([math.nan] + [0.0] * (BATCH - 1)), r"NaN or infinite values in \['rewards'\]"),
        ("masks", None, r"batch is missing \['masks'\]"),
    ],
)
def test_bad_batches_raise_before_anything_changes(key, value, message):
    agent = make_agent()
    batch = make_batch()
    if value is None:
        del batch[key]
    else:
        batch[key] = value
    before = snapshot(agent)
    with pytest.raises(ValueError, match=message):
        agent.update(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(agent)))


# ---------------------------------------------------------------------------------------------- acting


@pytest.mark.parametrize("aggregation", ["mean", "min"])
def test_acting_with_budget_zero_is_best_of_n_from_the_reference(aggregation):
    agent = make_agent(target_aggregation=aggregation)
    agent.update(make_batch())
    obs = torch.randn(6, OBS)
    actions = agent.act(obs, budget=0, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        particles = agent.reference(obs).sample_particles(4, generator=torch.Generator().manual_seed(4))
        q = agent.critic(obs.unsqueeze(1).expand(-1, 4, -1), particles)
        q = q.mean(-1) if aggregation == "mean" else q.amin(-1)
    torch.testing.assert_close(actions, particles[torch.arange(6), q.argmax(-1)])
    torch.testing.assert_close(agent.best_of_n(obs, torch.Generator().manual_seed(4)), actions)
    torch.testing.assert_close(agent.explore(obs, torch.Generator().manual_seed(4)), actions)


def test_best_of_n_shortcut_matches_the_flow_with_no_steps_and_refuses_nan():
    agent = make_agent()
    obs = torch.randn(5, OBS)
    shortcut = agent.act(obs, budget=0, generator=torch.Generator().manual_seed(2))
    # a combined budget goes through the flow machinery; zero steps leave the particles where they are
    through_flow = agent.act(obs, budget=StepBudget(0) & DisplacementBudget(10.0),
                             generator=torch.Generator().manual_seed(2))
    assert torch.equal(shortcut, through_flow)
    with torch.no_grad():
        agent.reference.velocity_net.trunk[-1].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        agent.act(obs, budget=0)


def test_acting_moves_particles_and_stays_in_the_action_box():
    agent = make_agent(vgf_lr=0.5)
    obs = torch.randn(10, OBS)
    best_of_n = agent.act(obs, budget=0, generator=torch.Generator().manual_seed(0))
    for budget in (1, 3, StepBudget(2) & DisplacementBudget(0.3)):
        actions = agent.act(obs, budget=budget, generator=torch.Generator().manual_seed(0))
        assert actions.shape == (10, ACT) and actions.abs().max() <= 1
        assert not torch.allclose(actions, best_of_n)
    assert agent.bc_action(obs).abs().max() <= 1
    single = agent.act(obs[0], generator=torch.Generator().manual_seed(0))
    assert single.shape == (ACT,)
    with pytest.raises(ValueError, match=r"obs must have shape \[B, 5\]"):
        agent.act(torch.randn(2, OBS + 1))


def test_acting_puts_no_gradient_on_the_critic():
    agent = make_agent()
    agent.act(torch.randn(4, OBS), budget=3)
    assert all(p.grad is None for p in agent.parameters())


# ---------------------------------------------------------------------------------------------- checkpoints


def test_training_state_restores_modules_and_optimisers():
    agent = make_agent(variant="amortized")
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        agent.update(make_batch(step), g)
    state = copy.deepcopy(agent.training_state())
    assert set(state["agent"]["_extra_state"]) == {"critic", "reference", "amortized"}
    assert state["agent"]["_extra_state"]["critic"]["state"]  # Adam moments are in the checkpoint
    resumed = VGFAgent.from_training_state(state)
    g_resumed = torch.Generator().manual_seed(7)
    g.manual_seed(7)
    for step in range(2, 4):
        expected, got = agent.update(make_batch(step), g), resumed.update(make_batch(step), g_resumed)
        assert all(torch.equal(expected[key], got[key]) for key in expected)
    with pytest.raises(ValueError, match="obs_dim, action_dim"):
        VGFAgent(OBS + 1, ACT, agent.config).load_training_state(state)
    with pytest.raises(ValueError, match="missing"):
        agent.load_training_state({"agent": state["agent"]})


def test_act_names_bad_observations():
    agent = VGFAgent(3, 2, VGFConfig(critic_hidden_dims=(8,), bc_hidden_dims=(8,)))
    with pytest.raises(ValueError, match="empty batch"):
        agent.act(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="obs must be numeric"):
        agent.act(np.array([b"ab", b"cd", b"ef"]))
    assert agent.act(np.zeros(3, dtype=np.float64)).dtype == agent.dtype  # gymnasium's float64 is matched
