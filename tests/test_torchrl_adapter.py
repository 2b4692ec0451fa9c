"""vgf_prob.torchrl: the flow reads the parameters TorchRL trains, targets, actor and the example, at tiny size.

The critic values are recomputed by hand from the stacked parameter tensors (``F.linear`` and ReLU, head by
head), not through TorchRL or tensordict, so a loss that ran the flow on the module's own (never trained)
weights, or on a stale copy, fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torchrl = pytest.importorskip("torchrl")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from torch import nn  # noqa: E402
from torchrl.data import Bounded, Unbounded  # noqa: E402
from torchrl.modules import MLP, ValueOperator  # noqa: E402
from torchrl.objectives import SoftUpdate  # noqa: E402

import vgf_prob as vgf  # noqa: E402
from vgf_prob.distributions import FlowMatchingPolicy  # noqa: E402
from vgf_prob.torchrl import VGFActor, VGFLoss, spec_bounds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBS, ACT, B, N, GAMMA = 3, 2, 5, 4, 0.9
SPEC = Bounded(low=torch.tensor([-2.0, -1.0]), high=torch.tensor([2.0, 1.0]), shape=(ACT,))


def make_loss(budget: int = 2) -> VGFLoss:
    torch.manual_seed(0)
    qvalue = ValueOperator(MLP(in_features=OBS + ACT, out_features=1, num_cells=[8, 8], activation_class=nn.ReLU),
                           in_keys=["observation", "action"])
    reference = FlowMatchingPolicy(OBS, ACT, (8, 8), action_low=SPEC.space.low, action_high=SPEC.space.high)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.05), budget=budget)
    loss = VGFLoss(qvalue, reference, flow, action_spec=SPEC, num_particles=N)
    loss.make_value_estimator(gamma=GAMMA)
    return loss


def by_hand(params, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q_k(s_b, a_bi) for every head k from the stacked tensors: [B, N, K]."""
    x = torch.cat([obs.unsqueeze(1).expand(-1, actions.shape[1], -1), actions], -1)
    heads = []
    for k in range(params.shape[0]):
        h = x
        for layer in ("0", "2", "4"):
            h = F.linear(h, params["module", layer, "weight"][k], params["module", layer, "bias"][k])
            h = torch.relu(h) if layer != "4" else h
        heads.append(h.squeeze(-1))
    return torch.stack(heads, -1)


def batch(generator_seed: int = 1) -> TensorDict:
    g = torch.Generator().manual_seed(generator_seed)
    return TensorDict({
        "observation": torch.randn(B, OBS, generator=g), "action": SPEC.rand((B,)),
        ("next", "observation"): torch.randn(B, OBS, generator=g), ("next", "reward"): torch.randn(B, 1, generator=g),
        ("next", "done"): torch.tensor([[False], [True], [False], [True], [False]]),
        ("next", "terminated"): torch.tensor([[False], [True], [False], [False], [False]]),
    }, batch_size=[B])


def test_the_flow_sees_the_parameters_being_trained_not_the_modules_own():
    loss = make_loss()
    obs, x = torch.randn(B, OBS), SPEC.rand((B, N))
    value, params = loss.value(), loss.qvalue_network_params
    with torch.no_grad():
        assert torch.allclose(value(obs, x), by_hand(params, obs, x), atol=1e-6)
        stale = vgf.as_value(loss.qvalue_network)(obs, x)  # the module keeps its own, untrained weights
        assert not torch.allclose(stale, value(obs, x)[..., 0], atol=1e-3)
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    out = loss(batch())
    (out["loss_qvalue"] + out["loss_bc"]).backward()
    before = value(obs, x).detach()
    optimizer.step()
    with torch.no_grad():
        after = value(obs, x)
        assert not torch.allclose(after, before, atol=1e-4)
        assert torch.allclose(after, by_hand(params, obs, x), atol=1e-6)
        params["module", "4", "bias"][0] += 0.5  # perturb head 0 of the trained parameters in place
        shifted = value(obs, x)
    assert torch.allclose(shifted[..., 0], after[..., 0] + 0.5, atol=1e-5)
    assert torch.equal(shifted[..., 1], after[..., 1])
    moved = loss.flow(x, obs, value).particles  # the flow follows the perturbed critic by hand too
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(by_hand(params, obs, leaf).mean(-1).sum(), leaf)
    low, high = spec_bounds(SPEC)
    first_step = (x + 0.05 * grad).clamp(low, high)
    assert torch.allclose(loss.flow.with_budget(1)(x, obs, value).particles, first_step, atol=1e-6)
    assert moved.shape == x.shape


def test_the_td_target_bootstraps_the_target_heads_at_particles_moved_by_the_online_heads():
    loss = make_loss()
    data = batch()
    with torch.no_grad():
        loss.target_qvalue_network_params["module", "4", "bias"] -= 3.0  # targets now differ from the online heads
    x = SPEC.rand((B, N))
    next_obs = data["next", "observation"]
    torch.manual_seed(5)
    out = loss(data)
    torch.manual_seed(5)  # the same reference draws, moved by the online value
    next_obs_draws = loss.reference(next_obs).sample_particles(N)
    moved = loss.flow(next_obs_draws, next_obs, loss.value()).particles
    with torch.no_grad():
        expected_v = by_hand(loss.target_qvalue_network_params, next_obs, moved).amin(-1).mean(-1)
    assert torch.allclose(out["next_state_value"], expected_v, atol=1e-5)
    not_terminated = 1.0 - data["next", "terminated"].float().squeeze(-1)  # done by time limit still bootstraps
    expected = data["next", "reward"].squeeze(-1) + GAMMA * not_terminated * expected_v
    assert torch.allclose(out["target_value"], expected, atol=1e-5)
    pred = by_hand(loss.qvalue_network_params, data["observation"], data["action"].unsqueeze(1)).squeeze(1)
    assert torch.allclose(out["pred_value"], pred, atol=1e-6)
    assert torch.allclose(out["loss_qvalue"], ((pred - expected.unsqueeze(-1)) ** 2).sum(-1).mean(), atol=1e-4)
    assert data["td_error"].shape == (B,)
    assert x.shape == (B, N, ACT)


def test_soft_update_moves_the_targets_the_flow_scores_with():
    loss = make_loss()
    updater = SoftUpdate(loss, tau=0.25)
    online, target = loss.qvalue_network_params, loss.target_qvalue_network_params
    with torch.no_grad():
        online["module", "4", "bias"] += 1.0
    expected = target["module", "4", "bias"] + 0.25 * (online["module", "4", "bias"] - target["module", "4", "bias"])
    updater.step()
    assert torch.allclose(target["module", "4", "bias"], expected)
    obs, x = torch.randn(B, OBS), SPEC.rand((B, N))
    with torch.no_grad():
        assert torch.allclose(loss.value(target=True)(obs, x), by_hand(target, obs, x), atol=1e-6)


def test_the_actor_acts_in_the_specs_box_batched_and_unbatched():
    loss = make_loss()
    actor = loss.actor(budget=3)
    low, high = spec_bounds(SPEC)
    out = actor(TensorDict({"observation": torch.randn(7, OBS)}, batch_size=[7]))
    assert out["action"].shape == (7, ACT) and ((out["action"] >= low) & (out["action"] <= high)).all()
    single = actor(TensorDict({"observation": torch.randn(OBS)}, batch_size=[]))["action"]
    assert single.shape == (ACT,)
    unboxed = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(10.0), budget=3)  # big steps leave any box
    boxed = VGFActor(loss.reference, unboxed, loss.value(), action_spec=SPEC, num_particles=N)
    action = boxed(TensorDict({"observation": torch.randn(64, OBS)}, batch_size=[64]))["action"]
    assert ((action >= low) & (action <= high)).all() and (action.abs() == high).any()


def test_missing_boxes_and_unbounded_specs_are_refused_by_name():
    loss = make_loss()
    unboxed = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=1)
    with pytest.raises(ValueError, match="VGFActor needs the action box"):
        VGFActor(loss.reference, unboxed, loss.value())
    with pytest.raises(TypeError, match="bounded action spec .* got Unbounded"):
        spec_bounds(Unbounded(shape=(ACT,)))
    qvalue = ValueOperator(nn.Linear(OBS + ACT + 1, 1), in_keys=["observation", "goal", "action"])
    with pytest.raises(ValueError, match="one observation key besides 'action'"):
        VGFLoss(qvalue, loss.reference, unboxed, action_spec=SPEC)


@pytest.mark.slow
def test_the_torchrl_example_trains_offline_and_rolls_out_in_a_gym_env(tmp_path):
    out = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "torchrl_vgf.py"), "--episodes", "2", "--episode-steps", "30",
         "--steps", "4", "--batch-size", "16", "--hidden", "16", "--particles", "3", "--eval-episodes", "1",
         "--test-budgets", "0", "2", "--out", str(out)],
        check=True, timeout=300, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    results = json.loads(out.read_text())
    assert results["transitions"] == 60
    assert set(results["policies"]) == {"reference (BC, one draw)", "VGF L_test=0 (best-of-N)", "VGF L_test=2"}
    assert all(-30 * 16.3 <= p["return"] <= 0 for p in results["policies"].values())  # Pendulum's reward range
