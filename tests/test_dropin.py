"""VGF on critics written the way other RL codebases write them, through the documented calls only.

The critics below are copied in style from CORL (td3_bc.py's ``Critic``, iql.py's ``TwinQ``) and CleanRL
(``SoftQNetwork``): ``torch.cat([state, action], 1)``, ``[M, 1]`` outputs, twin modules, a tuple of heads. The
tests use ``vgf.as_value``, ``flow.act`` and ``flow.next_value`` and nothing else; the expected results are
computed by hand, state by state, from the critics themselves.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, Normal

import vgf_prob as vgf
from vgf_prob.rl.networks import EnsembleCritic

OBS, ACT, B, N = 5, 2, 4, 6
LOW, HIGH = np.array([-2.0, -1.0], dtype=np.float32), np.array([2.0, 1.0], dtype=np.float32)  # an env's Box


class CorlCritic(nn.Module):
    """CORL td3_bc.py: one Q network on cat(state, action) along dim 1, output [M, 1]."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim + action_dim, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 1))

    def forward(self, state, action):
        sa = torch.cat([state, action], 1)
        return self.net(sa)


class CleanRLSoftQ(nn.Module):
    """CleanRL sac_continuous_action.py's SoftQNetwork."""

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(obs_dim + action_dim, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 1)

    def forward(self, x, a):
        x = torch.cat([x, a], 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CorlTwinQ(nn.Module):
    """CORL iql.py's TwinQ: ``both`` returns a tuple of [M] heads, ``forward`` their min."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.q1, self.q2 = CorlCritic(state_dim, action_dim), CorlCritic(state_dim, action_dim)

    def both(self, state, action):
        return self.q1(state, action).squeeze(-1), self.q2(state, action).squeeze(-1)

    def forward(self, state, action):
        return torch.min(*self.both(state, action))


class SplitCritic(nn.Module):
    """Q = w . relu(E_s s + E_a a): broadcasts obs [B, O] against actions [B, N, A] without complaint, and pairs
    state b with particle b when B == N (so the particle layout would be silently wrong); rows are right."""

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.state, self.action, self.out = nn.Linear(obs_dim, 16), nn.Linear(action_dim, 16), nn.Linear(16, 1)

    def forward(self, state, action):
        return self.out(torch.relu(self.state(state) + self.action(action))).squeeze(-1)


class ParticleCritic(nn.Module):
    """A critic that broadcasts over a particle dimension itself: obs [B, O], actions [B, N, A] -> [B, N]."""

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.inner = CorlCritic(obs_dim, action_dim)

    def forward(self, obs, actions):
        if actions.dim() != 3:
            raise ValueError("ParticleCritic takes actions [B, N, A]")
        expanded = obs.unsqueeze(1).expand(-1, actions.shape[1], -1)
        return self.inner.net(torch.cat([expanded, actions], -1)).squeeze(-1)


def per_state(critic, obs, particles):
    """critic(s_b, x_bi) for every state b and particle i, one state at a time: [B, N]."""
    return torch.stack([critic(obs[b].expand(particles.shape[1], -1), particles[b]).reshape(-1)
                        for b in range(obs.shape[0])])


def gradient_steps_by_hand(critics, obs, x0, steps, lr):
    """Euler on grad_a mean_k Q_k(s, a), per state, by autograd on the critics themselves."""
    x = x0.clone()
    for _ in range(steps):
        leaf = x.detach().requires_grad_(True)
        q = torch.stack([per_state(c, obs, leaf) for c in critics]).mean(0)
        (grad,) = torch.autograd.grad(q.sum(), leaf)
        x = (x + lr * grad).clamp(torch.as_tensor(LOW), torch.as_tensor(HIGH))
    return x


@pytest.fixture
def setting():
    torch.manual_seed(0)
    obs = torch.randn(B, OBS)
    x0 = torch.rand(B, N, ACT) * torch.as_tensor(HIGH - LOW) + torch.as_tensor(LOW)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.05), budget=3,
                                 projection=vgf.BoxProjection(LOW, HIGH))
    return obs, x0, flow


def test_twin_corl_critics_act_and_build_td_targets(setting):
    obs, x0, flow = setting
    q1, q2 = CorlCritic(OBS, ACT), CorlCritic(OBS, ACT)
    t1, t2 = CorlCritic(OBS, ACT), CorlCritic(OBS, ACT)
    q, q_target = vgf.as_value(q1, q2), vgf.as_value(t1, t2)

    action = flow.act(x0, obs, q)
    moved = gradient_steps_by_hand([q1, q2], obs, x0, 3, 0.05)
    with torch.no_grad():
        chosen = torch.min(per_state(q1, obs, moved), per_state(q2, obs, moved)).argmax(-1)
        assert torch.allclose(action, moved[torch.arange(B), chosen], atol=1e-6)

        reward, not_done, discount = torch.randn(B), torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.99
        target_q = reward + not_done * discount * flow.next_value(x0, obs, q, q_target)
        by_hand = reward + not_done * discount * torch.min(per_state(t1, obs, moved), per_state(t2, obs, moved)).mean(-1)
    assert torch.allclose(target_q, by_hand, atol=1e-5)
    assert all(p.grad is None for c in (q1, q2, t1, t2) for p in c.parameters())


def test_a_tuple_of_heads_and_cleanrl_critics(setting):
    obs, x0, flow = setting
    twin, soft_q = CorlTwinQ(OBS, ACT), CleanRLSoftQ(OBS, ACT)
    moved = gradient_steps_by_hand([twin.q1, twin.q2], obs, x0, 3, 0.05)
    assert torch.allclose(flow(x0, obs, vgf.as_value(twin.both)).particles, moved, atol=1e-6)
    assert torch.allclose(vgf.evaluate(vgf.as_value(twin.both), obs, moved, "min"),
                          per_state(twin, obs, moved), atol=1e-6)
    moved = gradient_steps_by_hand([soft_q], obs, x0, 2, 0.05)
    assert torch.allclose(flow.with_budget(2)(x0, obs, vgf.as_value(soft_q)).particles, moved, atol=1e-6)


def test_auto_layout_keeps_a_critic_that_broadcasts_and_refuses_a_silent_mispairing():
    torch.manual_seed(1)
    obs, x = torch.randn(3, OBS), torch.rand(3, 3, ACT)  # B == N: where the split critic pairs wrongly
    broadcasting = vgf.as_value(ParticleCritic(OBS, ACT))
    split_critic = SplitCritic(OBS, ACT)
    split = vgf.as_value(split_critic)
    broadcasting(obs, x), split(obs, x)
    assert broadcasting.layout == "particles" and split.layout == "rows"
    with torch.no_grad():
        assert not torch.allclose(split_critic(obs, x), per_state(split_critic, obs, x))  # the trap is real
        assert torch.allclose(split(obs, x), per_state(split_critic, obs, x))
        inner = broadcasting.critics[0].inner
        assert torch.allclose(broadcasting(obs, x), per_state(inner, obs, x))


def test_the_agents_ensemble_critic_takes_its_encoded_fast_path_with_the_same_values():
    torch.manual_seed(2)
    critic = EnsembleCritic(OBS, ACT, hidden_dims=(32, 32))
    obs, x = torch.randn(B, OBS), (torch.rand(B, N, ACT) * 2 - 1).requires_grad_(True)
    fast, rows = vgf.as_value(critic), vgf.as_value(critic, layout="rows")
    assert fast.layout == "encoded"
    q_fast, q_rows = fast(obs, x), rows(obs, x)
    assert q_fast.shape == (B, N, 2) and torch.allclose(q_fast, q_rows, atol=1e-5)
    g_fast, g_rows = (torch.autograd.grad(q.sum(), x)[0] for q in (q_fast, q_rows))
    assert torch.allclose(g_fast, g_rows, atol=1e-5)
    with torch.no_grad():  # a parameter update invalidates the cached state encoding
        critic.first.bias.add_(1.0)
    assert torch.allclose(fast(obs, x), rows(obs, x), atol=1e-5)


def test_every_particle_is_in_the_box_at_L0_and_with_zero_budgets():
    """An unbounded Gaussian actor as the reference (CORL-style mean network, wrapped in a Normal)."""
    torch.manual_seed(3)
    actor = nn.Linear(OBS, ACT)
    obs = torch.randn(64, OBS)

    def reference(states):
        return Independent(Normal(actor(states), 1.5), 1)

    value = vgf.as_value(CorlCritic(OBS, ACT), CorlCritic(OBS, ACT))
    box = vgf.BoxProjection(LOW, HIGH)
    per_state_zero = torch.arange(64) % 2 * 3  # every other state has budget 0
    low, high = torch.as_tensor(LOW), torch.as_tensor(HIGH)
    for budget in (0, vgf.StepBudget(per_state_zero), vgf.DisplacementBudget(torch.zeros(64)) & vgf.StepBudget(3)):
        flow = vgf.ValueGradientFlow(vgf.SteinField(0.3), vgf.ParticleAdam(0.1), budget=budget, projection=box)
        policy = flow(reference, obs, value, num_particles=10)
        assert ((policy.particles >= low) & (policy.particles <= high)).all()
        action = flow.act(reference, obs, value, num_particles=10)
        assert ((action >= low) & (action <= high)).all()
    with torch.no_grad():
        raw = reference(obs).sample((10,))
    assert ((raw < low) | (raw > high)).any()  # unprojected draws would have failed


def test_gymnasium_float64_observations_with_float32_critics_and_reference(setting):
    _, x0, flow = setting
    obs64 = np.random.default_rng(0).normal(size=(B, OBS))  # what gymnasium's vector envs return
    obs = torch.as_tensor(obs64)
    actor = nn.Linear(OBS, ACT)
    q = vgf.as_value(CorlCritic(OBS, ACT), CorlCritic(OBS, ACT))
    action = flow.act(lambda s: Independent(Normal(actor(s.float()), 0.5), 1), obs, q, num_particles=N)
    assert action.dtype == torch.float32 and action.shape == (B, ACT)
    assert torch.equal(flow.act(x0, obs, q), flow.act(x0, obs.float(), q))


def test_a_raw_corl_critic_gets_the_shapes_and_the_adapter_in_one_line(setting):
    obs, x0, flow = setting
    with pytest.raises(RuntimeError, match=r"obs \[4, 5\] and actions \[4, 6, 2\].*vgf\.as_value\(critic") as info:
        flow.act(x0, obs, CorlCritic(OBS, ACT))
    assert "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match=r"critic\(obs \[4, 5\], actions \[4, 6, 2\]\).*layout='rows'"):
        flow.act(x0, obs, vgf.as_value(CorlCritic(OBS, ACT), layout="particles"))
    with pytest.raises(ValueError, match=r"returned a tuple of shapes \[\[24, 2\]\]"):
        vgf.as_value(lambda s, a: (a,), layout="rows")(obs, x0)
    with pytest.raises(ValueError, match="fails in both layouts"):
        vgf.as_value(lambda s, a: s.missing)(obs, x0)


def test_a_critic_detached_from_its_actions_warns():
    torch.manual_seed(4)
    critic = CorlCritic(OBS, ACT)
    obs, x0 = torch.randn(B, OBS), torch.rand(B, N, ACT)
    flow = vgf.ValueGradientFlow(vgf.SteinField(0.5), vgf.ParticleAdam(0.05), budget=2)
    with pytest.warns(vgf.NoActionGradientWarning):
        flow(x0, obs, vgf.as_value(lambda s, a: critic(s, a.detach())))
    with warnings.catch_warnings():
        warnings.simplefilter("error", vgf.NoActionGradientWarning)
        flow(x0, obs, vgf.as_value(critic))


def test_critic_on_another_device_is_named():
    critic = CorlCritic(OBS, ACT).to("meta")
    with pytest.raises(ValueError, match="parameters on meta but the actions are on cpu"):
        vgf.as_value(critic, layout="rows")(torch.zeros(B, OBS), torch.zeros(B, N, ACT))


# ------------------------------------------------------------------------------------ critics the adapters miss
class JointCritic(nn.Module):
    """One input: q(torch.cat([obs, act], -1)) -> [M, 1] (an MLP on the joint vector)."""

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim + action_dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, joint):
        return self.net(joint)


class BatchNormCritic(CorlCritic):
    """A CORL critic with BatchNorm after its first layer, left in train mode as a training loop leaves it."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__(state_dim, action_dim)
        self.net = nn.Sequential(nn.Linear(state_dim + action_dim, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(32, 1))


def test_a_one_input_critic_is_the_concat_layout_found_by_its_signature(setting):
    obs, x0, flow = setting
    q1, q2 = JointCritic(OBS, ACT), JointCritic(OBS, ACT)
    value = vgf.as_value(q1, q2)
    assert value.layout == "concat" and vgf.as_value(q1, layout="concat").layout == "concat"

    def two_argument(critic):
        return lambda s, a: critic(torch.cat([s, a], 1))

    moved = gradient_steps_by_hand([two_argument(q1), two_argument(q2)], obs, x0, 3, 0.05)
    assert torch.allclose(flow(x0, obs, value).particles, moved, atol=1e-6)
    with torch.no_grad():
        by_hand = torch.stack([per_state(two_argument(q), obs, moved) for q in (q1, q2)], -1)
        assert torch.allclose(value(obs, moved), by_hand, atol=1e-6)
        assert torch.allclose(vgf.as_value(q1.double(), layout="concat")(obs, moved), by_hand[..., 0], atol=1e-6)


def test_a_critic_with_the_wrong_number_of_arguments_is_refused_with_the_fix():
    v_network = nn.Sequential(nn.Linear(OBS, 32), nn.ReLU(), nn.Linear(32, 1))  # IQL's V(s): one input
    with pytest.raises(TypeError, match=r"takes 1 positional argument\(s\), but layout 'rows' calls it with 2 .*"
                                        r"layout='concat'.*IQL's"):
        vgf.as_value(v_network, layout="rows")
    with pytest.raises(TypeError, match=r"takes 2 positional .* layout 'concat' calls it with 1 .*layout='rows'"):
        vgf.as_value(CorlCritic(OBS, ACT), layout="concat")
    with pytest.raises(TypeError, match=r"takes 3 positional .*wrap it so that it takes \(obs, actions\)"):
        vgf.as_value(lambda s, a, t: s)
    # V(s) through the auto layout reaches concat by its signature and fails on the joined width, by name
    with pytest.raises(RuntimeError, match=r"critic\(inputs \[24, 7\]\).*layout='rows'"):
        vgf.as_value(v_network)(torch.randn(B, OBS), torch.randn(B, N, ACT))


def test_a_train_mode_batchnorm_critic_keeps_its_statistics_and_its_mode(setting):
    obs, x0, flow = setting
    critic, target = BatchNormCritic(OBS, ACT), BatchNormCritic(OBS, ACT)
    critic(torch.randn(32, OBS), torch.randn(32, ACT))  # a training step's forward: statistics move off their init
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    q, q_target = vgf.as_value(critic), vgf.as_value(target)
    policy = flow(x0, obs, q)
    with torch.no_grad():
        flow.next_value(x0, obs, q, q_target)
    flow.act(x0[:1, :1], obs[:1], q)  # one state, one particle: a train-mode BatchNorm would raise
    for module, saved in ((critic, before), (target, before_target)):
        assert module.training and all(m.training for m in module.modules())
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, saved[key]), key
    eval_critic = copy.deepcopy(critic).eval()
    moved = gradient_steps_by_hand([eval_critic], obs, x0, 3, 0.05)  # deterministic: dropout off, running stats on
    assert torch.allclose(policy.particles, moved, atol=1e-6)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # the trap the adapter avoids
        critic(obs[:1], x0[0, :1])


# ---------------------------------------------------------------------------------------------- TD targets
@pytest.mark.parametrize("shape", [(B,), (B, 1)])
def test_td_target_keeps_the_rewards_shape(setting, shape):
    obs, x0, flow = setting
    q = vgf.as_value(CorlCritic(OBS, ACT), CorlCritic(OBS, ACT))
    reward, done = torch.randn(shape), torch.tensor([0.0, 1.0, 0.0, 1.0]).reshape(shape)
    with torch.no_grad():
        next_v = flow.next_value(x0, obs, q, q)
    expected = torch.stack([reward.flatten()[b] + 0.9 * (1 - done.flatten()[b]) * next_v[b] for b in range(B)])
    for target in (vgf.td_target(reward, next_v, discount=0.9, done=done),
                   vgf.td_target(reward, next_v, discount=0.9, not_done=1 - done),
                   vgf.td_target(reward, next_v.unsqueeze(-1), discount=torch.tensor(0.9), done=done.bool())):
        assert target.shape == shape and torch.allclose(target.flatten(), expected)
    assert torch.equal(vgf.td_target(reward, next_v, discount=0.0, not_done=1.0), reward)  # 0 means 0


def test_td_target_refuses_shapes_that_would_broadcast_to_a_square():
    next_v = torch.randn(B)
    assert (torch.randn(B, 1) + next_v).shape == (B, B)  # the silent trap of the plain expression
    with pytest.raises(ValueError, match=r"reward has shape \[1, 4\] but next_value has \[4\]; expected \[4\] or "
                                         r"\[4, 1\]"):
        vgf.td_target(torch.randn(1, B), next_v, discount=0.99, done=torch.zeros(B))
    with pytest.raises(ValueError, match=r"done has shape \[4, 4\]"):
        vgf.td_target(torch.randn(B, 1), next_v, discount=0.99, done=torch.zeros(B, B))
    with pytest.raises(ValueError, match="exactly one of done= .* and not_done="):
        vgf.td_target(torch.randn(B), next_v, discount=0.99)
    with pytest.raises(TypeError, match="not_done must be a tensor or a number, got list"):
        vgf.td_target(torch.randn(B), next_v, discount=0.99, not_done=[1.0])
