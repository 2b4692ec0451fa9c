"""Cost accounting: the counters equal the rows that hooks on the critic's and the reference's last layers see."""

from __future__ import annotations

import pytest
import torch

from rl_helpers import one_thread, synthetic_batch  # noqa: F401  (autouse fixture)
from vgf_prob import fast
from vgf_prob.cost import Cost, CountingValue, count, measure, timed
from vgf_prob.distributions.flow_matching import FlowMatchingPolicy
from vgf_prob.flows import Euler, ValueGradient
from vgf_prob.rl.agent import VGFAgent
from vgf_prob.rl.config import VGFConfig
from vgf_prob.transport import ValueGradientFlow

OBS, ACT, N, K, B = 5, 3, 4, 3, 3
TINY = VGFConfig(critic_hidden_dims=(16, 16), bc_hidden_dims=(16, 16), num_particles=N, flow_steps=K, train_budget=2)


class RowCounter:
    """Counts rows through a module from hooks: forwards by its input, backwards by a hook on its output."""

    def __init__(self, module: torch.nn.Module, row_dim: int) -> None:
        self.forward_rows = self.backward_rows = 0
        self.row_dim = row_dim
        module.register_forward_hook(self._forward)

    def _forward(self, module, inputs, output) -> None:
        x = inputs[0]
        rows = x.shape[self.row_dim] if self.row_dim >= 0 else x.shape[:-1].numel()
        self.forward_rows += rows
        if output.requires_grad:
            output.register_hook(lambda grad: self._backward(rows))

    def _backward(self, rows: int) -> None:
        self.backward_rows += rows


def hooked_agent(fast_path: bool) -> tuple[VGFAgent, RowCounter, RowCounter, RowCounter]:
    torch.manual_seed(0)
    agent = VGFAgent(OBS, ACT, TINY.replace(fast_path=fast_path))
    # ensemble layers see [H, rows, width]; the BC velocity net's Linear sees [..., width]
    return (agent, RowCounter(agent.critic.trunk.output, 1), RowCounter(agent.target_critic.trunk.output, 1),
            RowCounter(agent.reference.velocity_net.trunk[-1], -1))


def test_act_counters_equal_the_rows_the_critic_and_the_reference_saw():
    agent, critic, _, reference = hooked_agent(fast_path=False)
    obs = torch.randn(B, OBS)
    with measure() as cost:
        agent.act(obs, budget=2, generator=torch.Generator().manual_seed(0))
    assert cost.reference_passes == reference.forward_rows == B * N * K
    assert cost.value_gradient_evaluations == critic.backward_rows == B * N * 2
    assert cost.value_evaluations == critic.forward_rows - critic.backward_rows == B * N
    assert cost.particles == B * N and cost.states == B and cost.calls == 1 and cost.wall_s > 0
    assert cost.passes == B * N * (K + 1 + 2 * 2)
    assert cost.per_state()["passes"] == N * (K + 1 + 2 * 2)


def test_td_target_counts_the_flow_the_online_and_the_target_critic():
    agent, critic, target, reference = hooked_agent(fast_path=False)
    batch = synthetic_batch(0, B, OBS, ACT)
    with measure() as cost:
        agent.td_target(batch, torch.Generator().manual_seed(0))
    assert cost.reference_passes == reference.forward_rows == B * N * K
    assert cost.value_gradient_evaluations == critic.backward_rows == critic.forward_rows == B * N * 2
    assert cost.value_evaluations == target.forward_rows == B * N and target.backward_rows == 0


@pytest.mark.parametrize("num_particles", [1, 7])
def test_the_fast_path_counts_what_the_plain_path_counts_at_any_n(num_particles):
    costs = []
    for fast_path in (False, True):
        agent = hooked_agent(fast_path)[0]
        with measure() as cost:
            agent.act(torch.randn(2, OBS), budget=1, num_particles=num_particles)
        costs.append((cost.reference_passes, cost.value_evaluations, cost.value_gradient_evaluations, cost.particles))
    assert costs[0] == costs[1] == (2 * num_particles * K, 2 * num_particles, 2 * num_particles, 2 * num_particles)


def test_an_ode_sampler_counts_every_velocity_evaluation():
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(OBS, ACT, (8,), num_steps=4, method="rk4")
    counter = RowCounter(policy.velocity_net.trunk[-1], -1)
    with measure() as cost, fast.enabled(False):  # the fast pass runs no module, so no hook would fire
        policy(torch.randn(2, OBS)).sample_particles(5)
    assert cost.reference_passes == counter.forward_rows == 2 * 5 * 4 * 4  # rk4: 4 evaluations per step


def test_the_operator_result_carries_its_own_cost_and_meters_nest():
    calls = []

    def value(obs, x):
        calls.append(x.shape[:-1].numel())
        return -(x - 0.5).square().sum(-1)

    flow = ValueGradientFlow(ValueGradient(), Euler(0.1), budget=3)
    with measure() as outer:
        policy = flow(torch.zeros(2, 6, ACT), None, value)
        flow.act(torch.zeros(2, 6, ACT), None, value, budget=1)
    assert policy.cost.value_gradient_evaluations == 3 * 12 and policy.cost.value_evaluations == 0
    assert policy.cost.states == 2 and policy.cost.calls == 1 and policy.cost.reference_passes == 0
    assert outer.value_gradient_evaluations == 4 * 12 and outer.value_evaluations == 12
    assert outer.value_gradient_evaluations + outer.value_evaluations == sum(calls)
    assert outer.calls == 2 and outer.states == 4  # the act call's inner transport is not counted twice
    assert outer.wall_s >= policy.cost.wall_s > 0


def test_counting_value_moves_a_forward_to_the_gradient_counter_only_when_its_backward_runs():
    x = torch.randn(2, 3, ACT, requires_grad=True)
    value = CountingValue(lambda obs, a: a.sum(-1))
    with measure() as cost:
        value(None, x)  # forward only: the graph is dropped
        value(None, x).sum().backward()
    assert (cost.value_evaluations, cost.value_gradient_evaluations) == (6, 6)


def test_timed_counts_only_outermost_calls_and_per_state_divides():
    with measure() as cost:
        with timed() as call:
            call.states = 4
            with timed() as inner:
                inner.states = 4
            count(reference_passes=8, value_evaluations=4, value_gradient_evaluations=2)
    assert (cost.calls, cost.states) == (1, 4)
    row = cost.per_state()
    assert row["passes"] == (8 + 4 + 2 * 2) / 4 and row["ms"] == pytest.approx(1e3 * cost.wall_s / 4)
    assert cost.to_dict()["passes_per_state"] == row["passes"]
    with pytest.raises(ValueError, match="no timed call"):
        Cost().per_state()
    count(reference_passes=1)  # no meter: nothing to do, no error
