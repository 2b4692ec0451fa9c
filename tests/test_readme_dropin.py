"""The README's drop-in snippet ("Use VGF in your own codebase") runs as written, with a codebase's shapes.

The block is read out of README.md and executed in a namespace holding what a CORL-style script has at that
point: a gymnasium env with a [-2, 2] box, twin critics on ``torch.cat([s, a], 1)`` -> ``[M, 1]``, a batch
with ``[B, 1]`` rewards and masks. So a change to the README that breaks its code, or a change to the library
that breaks the README, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
B = 8


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use VGF in your own codebase"):]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match is not None, "no python block in the README's drop-in section"
    return match.group(1)


class Critic(nn.Module):
    """CORL td3_bc.py's critic: one Q network on cat(state, action) along dim 1, output [M, 1]."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim + action_dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, state, action):
        return self.net(torch.cat([state, action], 1))


def codebase(reward_shape: tuple[int, ...]) -> dict:
    torch.manual_seed(0)
    env = gym.make("Pendulum-v1")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    critics = [Critic(obs_dim, act_dim) for _ in range(4)]
    return {
        "env": env, "obs_dim": obs_dim, "act_dim": act_dim, "discount": 0.99,
        "critic_1": critics[0], "critic_2": critics[1], "critic_1_target": critics[2], "critic_2_target": critics[3],
        "obs": torch.randn(B, obs_dim), "next_obs": torch.randn(B, obs_dim),
        "actions": torch.rand(B, act_dim) * 4 - 2,  # Pendulum's torque in [-2, 2]
        "reward": torch.randn(reward_shape), "not_done": (torch.arange(B) % 3 != 0).float().reshape(reward_shape),
    }


@pytest.mark.parametrize("reward_shape", [(B, 1), (B,)], ids=["CORL [B, 1]", "CleanRL [B]"])
def test_the_readme_snippet_runs_as_written_and_keeps_the_rewards_shape(reward_shape):
    namespace = codebase(reward_shape)
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    reward, not_done, next_v = namespace["reward"], namespace["not_done"], namespace["next_v"]
    target_q = namespace["target_q"]
    assert next_v.shape == (B,) and target_q.shape == reward_shape
    expected = reward.flatten() + not_done.flatten() * 0.99 * next_v
    assert torch.allclose(target_q.flatten(), expected)
    action = namespace["action"]
    assert action.shape == (B, 1) and ((action >= -2) & (action <= 2)).all()
    reference = namespace["reference"]
    assert reference.action_high.tolist() == [2.0] and reference.action_low.tolist() == [-2.0]
    assert all(p.grad is not None for p in reference.parameters())  # the BC step ran
    assert all(p.grad is None for c in ("critic_1", "critic_2") for p in namespace[c].parameters())
    with torch.no_grad():
        draws = reference(namespace["obs"]).sample((64,))
    assert draws.abs().max() > 1  # samples use the env's box, not the default [-1, 1]


def test_the_plain_expression_the_readme_replaced_is_the_trap():
    namespace = codebase((B, 1))
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102
    plain = namespace["reward"] + namespace["not_done"] * namespace["discount"] * namespace["next_v"]
    assert plain.shape == (B, B)


def test_the_readmes_torchrl_block_runs_as_written():
    pytest.importorskip("torchrl")
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
    from torchrl.envs import GymEnv
    from torchrl.modules import MLP, ValueOperator

    import vgf_prob as vgf

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index("### TorchRL"):], flags=re.S).group(1)
    torch.manual_seed(0)
    env = GymEnv("Pendulum-v1")
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(20), batch_size=8)
    buffer.extend(env.rollout(20))
    qvalue = ValueOperator(MLP(in_features=4, out_features=1, num_cells=[16]), in_keys=["observation", "action"])
    namespace = {"torch": torch, "vgf": vgf, "env": env, "obs_dim": 3, "act_dim": 1, "qvalue": qvalue,
                 "buffer": buffer, "steps": 2}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert set(namespace["out"].keys()) >= {"loss_qvalue", "loss_bc", "target_value"}
    action = namespace["actor"](TensorDict({"observation": torch.randn(3)}, batch_size=[]))["action"]
    assert action.shape == (1,) and -2 <= float(action) <= 2
