"""One switch for validation and one for host reads (`vgf_prob.validation`), consulted by the solvers, the
operator, the reference policies and the agent (issue 19)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vgf_prob as vgf
from rl_helpers import synthetic_batch
from vgf_prob.distributions import FlowMatchingPolicy, GaussianPolicy
from vgf_prob.rl.agent import VGFAgent
from vgf_prob.rl.config import VGFConfig

aten = torch.ops.aten
TINY = VGFConfig(critic_hidden_dims=(8,), bc_hidden_dims=(8,), num_particles=3, train_budget=2, test_budget=2,
                 batch_size=6, flow_steps=2)  # fmt: skip


class HostReads(TorchDispatchMode):
    """Counts the ops that read a value back to the host (``.item()``, ``bool(t)`` and friends), outside torch.optim."""

    SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.equal, aten._unique2}

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func.overloadpacket in self.SYNCING
        return func(*args, **(kwargs or {}))


def nan_gradient(obs, actions):
    """Q(a) = sqrt(-|a|^2): its gradient is NaN at every a != 0."""
    return torch.sqrt(-actions.square().sum(-1))


def test_defaults_and_restoration_after_an_error():
    assert vgf.is_validation_enabled() and vgf.host_reads_allowed()
    with pytest.raises(KeyError), vgf.validation_enabled(False):
        assert not vgf.is_validation_enabled() and vgf.host_reads_allowed()
        raise KeyError
    with pytest.raises(KeyError), vgf.host_reads(False):
        assert not vgf.is_validation_enabled() and not vgf.host_reads_allowed()
        with vgf.validation_enabled(True):  # host reads forbidden still means no value checks
            assert not vgf.is_validation_enabled()
        raise KeyError
    assert vgf.is_validation_enabled() and vgf.host_reads_allowed()


def test_torch_and_pyro_distributions_follow_the_switch_and_vgf_follows_pyros():
    """Inside the switches torch's distribution validation follows them; pyro's switch turns vgf-prob's checks
    off too, but torch's global default (which torch.compile turns off for the whole process) does not."""
    with vgf.validation_enabled(False):
        pyro.distributions.Normal(torch.zeros(1), -torch.ones(1))  # a negative scale passes unchecked
    with vgf.host_reads(False):
        pyro.distributions.Normal(torch.zeros(1), -torch.ones(1))
    with vgf.validation_enabled(True), pytest.raises(ValueError, match="scale"):
        pyro.distributions.Normal(torch.zeros(1), -torch.ones(1))
    with pyro.validation_enabled(False):
        assert not vgf.is_validation_enabled()
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        assert vgf.is_validation_enabled()
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


@pytest.mark.parametrize("switch", [vgf.validation_enabled, vgf.host_reads])
def test_switches_take_only_booleans(switch):
    with pytest.raises(TypeError, match="True or False"), switch(0):
        pass


@pytest.mark.parametrize("solver", [vgf.Euler(0.1), vgf.ParticleAdam(0.1), vgf.ODESolver("rk4", step_size=0.1)],
                         ids=["euler", "adam", "ode"])
def test_solvers_check_the_velocity_only_with_validation_on(solver):
    x0 = torch.full((2, 3, 2), 0.5)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), solver, budget=2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        flow(x0, None, nan_gradient)
    with vgf.validation_enabled(False):
        assert torch.isnan(flow(x0, None, nan_gradient).particles).all()


def test_operator_checks_the_starting_particles_only_with_validation_on():
    x0 = torch.tensor([[[0.0], [math.nan]]])
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=1)
    with pytest.raises(ValueError, match="1 NaN/inf"):
        flow(x0, None, lambda obs, a: a.sum(-1))
    with vgf.validation_enabled(False):
        out = flow(x0, None, lambda obs, a: a.sum(-1))
    assert out.particles[0, 0, 0].item() == pytest.approx(0.1)


def test_a_step_budget_flow_reads_nothing_inside_host_reads_false():
    x0 = torch.rand(4, 5, 2, generator=torch.Generator().manual_seed(0))
    flow = vgf.ValueGradientFlow(vgf.SteinField(0.5), vgf.ParticleAdam(0.05), budget=3, projection=vgf.BoxProjection())
    value = lambda obs, a: -(a - 0.3).square().sum(-1)  # noqa: E731
    with HostReads() as checked:
        expected = flow(x0, None, value).particles
    with vgf.host_reads(False), HostReads() as unchecked:
        particles = flow(x0, None, value).particles
    assert checked.reads > 0 and unchecked.reads == 0
    assert torch.equal(particles, expected)


def test_early_stop_of_a_discrete_flow_is_a_host_read():
    """Every state's displacement budget is spent after the first step: with host reads allowed the loop
    stops there (1 field call, plus the step that found it); without, it runs all 10 steps."""
    calls = []

    def counting_value(obs, actions):
        calls.append(1)
        return actions.sum(-1)

    budget = vgf.DisplacementBudget(0.1) & vgf.StepBudget(10)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(1.0), budget=budget)
    flow(torch.zeros(2, 1, 1), None, counting_value)
    allowed = len(calls)
    calls.clear()
    with vgf.host_reads(False):
        out = flow(torch.zeros(2, 1, 1), None, counting_value)
    assert allowed == 1 and len(calls) == 10
    assert torch.allclose(out.report.displacement, torch.full((2,), 0.1))


@pytest.mark.parametrize("policy", [GaussianPolicy(2, 1, hidden_dims=(4,)), FlowMatchingPolicy(2, 1, hidden_dims=(4,))],
                         ids=["gaussian", "flow-matching"])
def test_reference_policies_check_observations_only_with_validation_on(policy):
    obs = torch.tensor([[0.0, math.nan]])
    with pytest.raises(ValueError, match="NaN"):
        policy(obs)
    with pytest.raises(ValueError, match="NaN"):
        policy.loss(obs, torch.zeros(1, 1))
    with vgf.validation_enabled(False):
        policy(obs)
        policy.loss(obs, torch.zeros(1, 1))


def test_agent_checks_its_batch_and_observations_only_with_validation_on():
    torch.manual_seed(0)
    agent = VGFAgent(3, 2, TINY)
    batch = synthetic_batch(0, 6, 3, 2)
    batch["rewards"][2] = math.nan
    with pytest.raises(ValueError, match="rewards"):
        agent.update(batch)
    obs = torch.tensor([[math.nan, 0.0, 0.0]])
    with pytest.raises(ValueError, match="NaN"):
        agent.act(obs)
    with vgf.host_reads(False):
        info = agent.update(batch)
        agent.act(obs)
    assert torch.isnan(info["critic_loss"])
