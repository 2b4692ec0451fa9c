"""The speed paths give the plain paths' numbers: fused critic passes, buffer-reusing MLP inference, the
closed-form Stein repulsion, and whole agent updates (fast_path True vs False) on a fixed seed.

tests/test_rl_agent.py already pins one Stein and one amortised update sequence; here every fast piece is
checked on its own (float64, tight tolerances) and the agent over more settings (min heads, L = 0, Gaussian
reference). Tiny sizes: the file runs in a few seconds.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import traceback
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rl_helpers import synthetic_batch

from vgf_prob import fast
from vgf_prob.distributions.flow_matching import FlowMatchingPolicy
from vgf_prob.distributions.networks import ConditionalMLP
from vgf_prob.fast.buffers import Workspace
from vgf_prob.fast.dispatch import state as fast_state_or_make
from vgf_prob.rl.agent import VGFAgent
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.networks import EnsembleCritic
from vgf_prob.validation import host_reads

aten = torch.ops.aten
OBS, ACT, BATCH = 5, 3, 12
TINY = VGFConfig(
    critic_hidden_dims=(24, 16),
    bc_hidden_dims=(24, 16),
    amortized_hidden_dims=(24, 16),
    num_particles=4,
    flow_steps=3,
    batch_size=BATCH,
    train_budget=2,
)


def fast_state(module, kind: str):
    """The fast layer's state of ``module`` (buffers, cached weights), which a pass must have made already."""
    found = fast_state_or_make(module, kind, lambda: None)
    assert found is not None
    return found


def fused_pass(critic: EnsembleCritic):
    """The critic's fused particle pass (differentiable wrt the particles only)."""
    values = fast.particle_pass(critic)
    assert values is not None
    return values


def perturbed_critic(hidden=(24, 20, 16), heads=3, dtype=torch.float64) -> EnsembleCritic:
    """A critic whose LayerNorm scales/shifts and biases are not at their init values (so every term counts)."""
    torch.manual_seed(0)
    critic = EnsembleCritic(OBS, ACT, hidden, num_heads=heads).to(dtype)
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return critic


@pytest.mark.parametrize("aggregate", ["mean", "min", "weighted"])
@pytest.mark.parametrize("states, particles", [(4, 6), (10, 9)])  # few rows (<= FEW_ROWS) and many
def test_fused_critic_gradient_matches_autograd(aggregate: str, states: int, particles: int) -> None:
    critic = perturbed_critic()
    encoded = critic.encode_obs(torch.randn(states, OBS, dtype=torch.float64)).detach()
    x = torch.randn(states, particles, ACT, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(states, particles, 3, dtype=torch.float64)
    combine = {
        "mean": lambda q: q.mean(-1),
        "min": lambda q: q.amin(-1),
        "weighted": lambda q: (q * weights).sum(-1),
    }[aggregate]
    plain_q = critic.forward_from_encoding(encoded, x)
    (plain,) = torch.autograd.grad(combine(plain_q).sum(), x)
    fused_q = fused_pass(critic)(encoded, x)
    (fused,) = torch.autograd.grad(combine(fused_q).sum(), x)
    torch.testing.assert_close(fused_q, plain_q.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in critic.parameters())


@pytest.mark.parametrize("states, particles", [(3, 5), (9, 10)])
def test_fused_critic_without_grad_matches_and_float32_is_close(states: int, particles: int) -> None:
    critic = perturbed_critic()
    encoded = critic.encode_obs(torch.randn(states, OBS, dtype=torch.float64))
    x = torch.randn(states, particles, ACT, dtype=torch.float64)
    with torch.enable_grad():
        plain = critic.forward_from_encoding(encoded, x).detach()
    with torch.no_grad():
        torch.testing.assert_close(critic.forward_from_encoding(encoded, x), plain, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused_pass(critic)(encoded, x), plain, rtol=1e-12, atol=1e-12)
    critic32 = copy.deepcopy(critic).float()
    with torch.no_grad():
        fast32 = fused_pass(critic32)(encoded.float(), x.float())
    torch.testing.assert_close(fast32.double(), plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first, second", [(4, 4), (4, 40), (40, 4)])  # particles: few or many rows
def test_fused_critic_backward_after_another_forward_recomputes(first: int, second: int) -> None:
    critic = perturbed_critic()
    encoded = critic.encode_obs(torch.randn(2, OBS, dtype=torch.float64)).detach()
    x1 = torch.randn(2, first, ACT, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, second, ACT, dtype=torch.float64, requires_grad=True)
    q1 = fused_pass(critic)(encoded, x1)
    q2 = fused_pass(critic)(encoded, x2)  # overwrites the saved activations of q1
    (g1,) = torch.autograd.grad(q1.sum(), x1)
    (g2,) = torch.autograd.grad(q2.sum(), x2)
    (ref1,) = torch.autograd.grad(critic.forward_from_encoding(encoded, x1).sum(), x1)
    (ref2,) = torch.autograd.grad(critic.forward_from_encoding(encoded, x2).sum(), x2)
    torch.testing.assert_close(g1, ref1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, ref2, rtol=1e-10, atol=1e-12)


def test_fused_critic_sees_parameter_updates_and_survives_copies() -> None:
    critic = perturbed_critic()
    encoded = critic.encode_obs(torch.randn(2, OBS, dtype=torch.float64)).detach()
    x = torch.randn(2, 4, ACT, dtype=torch.float64, requires_grad=True)
    fused_pass(critic)(encoded, x).sum().backward()  # warms the cached weights
    with torch.no_grad():
        critic.trunk.norms[0].weight.mul_(1.5)  # an optimiser step changes parameters in place
        critic.trunk.hidden[0].weight.add_(0.1)
    (fused,) = torch.autograd.grad(fused_pass(critic)(encoded, x).sum(), x)
    (plain,) = torch.autograd.grad(critic.forward_from_encoding(encoded, x).sum(), x)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    for clone in (copy.deepcopy(critic), pickle.loads(pickle.dumps(critic))):
        (again,) = torch.autograd.grad(fused_pass(clone)(encoded, x).sum(), x)
        torch.testing.assert_close(again, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_mlp_inference_path_is_exact_and_reuses_buffers(layer_norm: bool) -> None:
    torch.manual_seed(0)
    net = ConditionalMLP(OBS, ACT + 1, ACT, hidden_dims=(16, 12, 8), layer_norm=layer_norm).double()
    context, inputs = torch.randn(4, OBS, dtype=torch.float64), torch.randn(4, 5, ACT + 1, dtype=torch.float64)
    encoded = net.encode_context(context).unsqueeze(-2)
    plain = net(context.unsqueeze(-2).expand(4, 5, OBS), inputs).detach()
    with torch.no_grad():
        first = net.forward_from_context(encoded, inputs)
        workspace = fast_state(net, "mlp").workspace
        buffers = {name: [b.data_ptr() for b in kept] for name, kept in workspace._buffers.items()}
        second = net.forward_from_context(encoded, inputs)
    torch.testing.assert_close(first, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, plain, rtol=1e-12, atol=1e-12)
    assert buffers and buffers == {name: [b.data_ptr() for b in kept] for name, kept in workspace._buffers.items()}
    # with grad enabled the autograd path runs (parameters get gradients)
    net(context.unsqueeze(-2).expand(4, 5, OBS), inputs).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_workspace_keeps_a_few_shapes() -> None:
    ws = Workspace()
    like = torch.zeros(1)
    a = ws.get("x", (2, 3), like)
    b = ws.get("x", (4, 3), like)
    assert ws.get("x", (2, 3), like) is a and ws.get("x", (4, 3), like) is b
    for n in range(Workspace.SHAPES_PER_NAME + 1):
        ws.get("x", (5 + n,), like)
    assert ws.get("x", (2, 3), like) is not a


@pytest.mark.parametrize(
    "dtype, states, particles",
    [(torch.float64, 3, 5), (torch.float32, 1, 10), (torch.float32, 3, 5), (torch.float32, 8, 10)],
)  # float32 with <= 64 rows: the Euler loop with the packed oneDNN pass inlined; otherwise reused buffers
def test_flow_matching_sampling_is_the_same_with_and_without_the_inference_path(
    dtype: torch.dtype, states: int, particles: int
) -> None:
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(OBS, ACT, hidden_dims=(16, 16), num_steps=4).to(dtype)
    obs = torch.randn(states, OBS, dtype=dtype)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5

    def draws() -> torch.Tensor:
        return policy(obs).sample_particles(particles, generator=torch.Generator().manual_seed(1))

    sampled = draws()
    with torch.no_grad():
        policy.velocity_net.trunk[0].weight.mul_(1.3)  # a parameter change must reach the cached pass
    fast_changed = draws()
    with fast.enabled(False):
        plain_changed = draws()
        with torch.no_grad():
            policy.velocity_net.trunk[0].weight.div_(1.3)
        plain = draws()
    torch.testing.assert_close(sampled, plain, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(fast_changed, plain_changed, rtol=tolerance, atol=tolerance)
    assert not torch.allclose(sampled, fast_changed)


def make_batch(step: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return synthetic_batch(100 + step, BATCH, OBS, ACT, dtype)


AGENT_SETTINGS = {
    "stein-min": dict(target_aggregation="min"),
    "stein-textbook-bandwidth": dict(differentiate_bandwidth=False, train_budget=3),
    "best-of-n": dict(train_budget=0),
    "amortized": dict(variant="amortized"),
    "gaussian-reference": dict(reference="gaussian"),
    "many-rows": dict(num_particles=8),  # 12 x 8 = 96 particle rows: the critic's large-batch passes
}


def plain_run(switch: str) -> contextlib.AbstractContextManager:
    """How the plain agent runs: under the process-wide switch, or built with ``fast_path=False``."""
    return fast.enabled(False) if switch == "switch" else contextlib.nullcontext()


@pytest.mark.parametrize("switch", ["switch", "config"])
@pytest.mark.parametrize("setting", sorted(AGENT_SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agent_fast_and_plain_paths_give_the_same_losses(setting: str, dtype: torch.dtype, switch: str) -> None:
    torch.manual_seed(0)
    config = TINY.replace(**AGENT_SETTINGS[setting])
    fast_agent = VGFAgent(OBS, ACT, config, dtype=dtype)
    plain_agent = VGFAgent(OBS, ACT, config.replace(fast_path=switch == "switch"), dtype=dtype)
    plain_agent.load_state_dict(fast_agent.state_dict())
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-10)
    g_fast, g_plain = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for step in range(3):
        batch = make_batch(step, dtype)
        info_fast = fast_agent.update(batch, g_fast)
        with plain_run(switch):
            info_plain = plain_agent.update(batch, g_plain)
        assert info_fast.keys() == info_plain.keys()
        for key in info_fast:
            torch.testing.assert_close(info_fast[key], info_plain[key], rtol=rtol, atol=atol, msg=key)
    for p_fast, p_plain in zip(fast_agent.parameters(), plain_agent.parameters()):
        torch.testing.assert_close(p_fast, p_plain, rtol=rtol, atol=atol)
    obs = torch.randn(6, OBS, dtype=dtype)
    for budget in (0, 1, 3):
        acted = fast_agent.act(obs, budget=budget, generator=torch.Generator().manual_seed(1))
        with plain_run(switch):
            reference = plain_agent.act(obs, budget=budget, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(acted, reference, rtol=rtol, atol=atol)


def test_bfloat16_autocast_runs_the_fused_passes_in_bfloat16_close_to_float32() -> None:
    critic = perturbed_critic(dtype=torch.float32)
    encoded = critic.encode_obs(torch.randn(4, OBS)).detach()
    x = torch.rand(4, 8, ACT) * 2 - 1
    x32 = x.clone().requires_grad_()
    (g32,) = torch.autograd.grad(fused_pass(critic)(encoded, x32).mean(-1).sum(), x32)
    x16 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q16 = fused_pass(critic)(encoded, x16)
        (g16,) = torch.autograd.grad(q16.mean(-1).sum(), x16)
    assert q16.dtype == torch.float32 and g16.dtype == torch.float32
    q32 = fused_pass(critic)(encoded, x)
    assert 1e-5 < (q16 - q32).abs().max() < 0.1  # computed in bfloat16 (about 3 significant digits)
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.97
    net = ConditionalMLP(OBS, ACT, ACT, hidden_dims=(16, 16), layer_norm=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        result = net.forward_from_context(net.encode_context(torch.randn(3, OBS)).unsqueeze(-2), torch.randn(3, 5, ACT))
    assert result.dtype == torch.bfloat16


def test_bfloat16_agent_trains_and_acts() -> None:
    torch.manual_seed(0)
    agent = VGFAgent(OBS, ACT, TINY.replace(flow_autocast_bf16=True))
    for step in range(2):
        info = agent.update(make_batch(step), torch.Generator().manual_seed(step))
        assert all(torch.isfinite(v) for v in info.values())
    action = agent.act(torch.randn(OBS), budget=2)
    assert action.dtype == torch.float32 and action.abs().max() <= 1


@pytest.mark.parametrize("rows", [(1, 10), (16, 10)])  # a few rows: oneDNN packed products; many: reused buffers
def test_mlp_inference_float32_small_and_large_row_counts(rows: tuple[int, int]) -> None:
    torch.manual_seed(0)
    for layer_norm in (False, True):
        net = ConditionalMLP(OBS, ACT + 1, ACT, hidden_dims=(64, 48, 32), layer_norm=layer_norm)
        context, inputs = torch.randn(rows[0], OBS), torch.randn(*rows, ACT + 1)
        plain = net(context.unsqueeze(-2).expand(*rows, OBS), inputs).detach()
        with torch.no_grad():
            for _ in range(2):  # the second call reuses packed weights / buffers
                result = net.forward_from_context(net.encode_context(context).unsqueeze(-2), inputs)
                torch.testing.assert_close(result, plain, rtol=1e-5, atol=1e-5)
            net.trunk[0].weight.add_(0.5)  # a parameter change must be seen (repacked)
            plain = net(context.unsqueeze(-2).expand(*rows, OBS), inputs)
            torch.testing.assert_close(net.forward_from_context(net.encode_context(context).unsqueeze(-2), inputs),
                                       plain, rtol=1e-5, atol=1e-5)


def test_inference_mode_acting_matches_the_plain_path_and_training_goes_on() -> None:
    torch.manual_seed(0)
    fast_agent = VGFAgent(OBS, ACT, TINY)
    plain_agent = VGFAgent(OBS, ACT, TINY.replace(fast_path=False))
    plain_agent.load_state_dict(fast_agent.state_dict())
    obs = torch.randn(6, OBS)
    with torch.inference_mode():  # buffers first allocated inside inference mode must serve normal mode later
        acted = fast_agent.act(obs, budget=0, generator=torch.Generator().manual_seed(3))
        reference = plain_agent.act(obs, budget=0, generator=torch.Generator().manual_seed(3))
        with pytest.raises(RuntimeError, match="inference_mode"):  # a flow needs value gradients
            fast_agent.act(obs, budget=2)
    torch.testing.assert_close(acted, reference, rtol=1e-4, atol=1e-5)
    info = fast_agent.update(make_batch(0), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in info.values())
    fast_agent.act(obs, budget=2)


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value back to the host: on a GPU each one waits for the device
    (``.item()``, ``bool(t)``, ``float(t)`` all go through ``_local_scalar_dense``; ``nonzero`` and friends
    need the result's size). Adam's step counters are CPU tensors even on a GPU (not capturable/fused), so
    reads issued from torch.optim are not device syncs and are left out."""

    SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
               aten._unique2, aten.unique_consecutive, aten.repeat_interleave}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNCING:
            frames = traceback.extract_stack()[:-1]
            if not any(f"torch{os.sep}optim{os.sep}" in frame.filename for frame in frames):
                here = [f"{frame.filename.rsplit(os.sep, 1)[-1]}:{frame.lineno}" for frame in frames[-6:]]
                self.reads.append(f"{func} at {' <- '.join(reversed(here))}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("setting", ["stein", "amortized", "gaussian-reference"])
def test_a_training_update_reads_nothing_back_to_the_host(setting: str) -> None:
    """The CUDA-path contract, checked on CPU: ``update(batch)`` inside ``host_reads(False)`` issues no op that
    would synchronise with a GPU, while with validation on it does read (its NaN/inf check of the batch)."""
    config = TINY.replace(**AGENT_SETTINGS.get(setting, {}), max_grad_norm=1.0)
    agent = VGFAgent(OBS, ACT, config)
    batch = make_batch(0, torch.float32)
    agent.update(batch)  # optimiser states exist from here on
    with HostReads() as unchecked:
        unchecked_update(agent, batch)
    assert unchecked.reads == []
    with HostReads() as checked:
        agent.update(batch)
    assert checked.reads


@pytest.mark.parametrize("setting", ["stein", "amortized", "gaussian-reference", "plain"])
def test_a_training_update_traces_on_the_meta_device(setting: str) -> None:
    """With no GPU to run on, the meta device stands in: tensors there carry no data, so an update that runs
    through makes every tensor on the agent's device (a stray CPU tensor would raise a device mismatch) and
    reads no value back (``item()`` on a meta tensor raises)."""
    overrides = {"plain": dict(fast_path=False)}.get(setting, AGENT_SETTINGS.get(setting, {}))
    agent = VGFAgent(OBS, ACT, TINY.replace(**overrides, max_grad_norm=1.0), device="meta")
    batch = {key: value.to("meta") for key, value in make_batch(0, torch.float32).items()}
    unchecked_update(agent, batch)
    with host_data_copies() as copies:
        info = unchecked_update(agent, batch)
    assert copies == []  # a tensor built from Python data on a GPU is a blocking copy: the host waits
    assert info and all(value.device.type == "meta" for value in info.values())
    assert all(p.device.type == "meta" for p in agent.parameters())


def unchecked_update(agent: VGFAgent, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``agent.update(batch)`` inside ``host_reads(False)``: a training loop on validated data."""
    with host_reads(False):
        return agent.update(batch)


@contextlib.contextmanager
def host_data_copies() -> Iterator[list[str]]:
    """Records ``torch.tensor`` / ``torch.as_tensor`` / ``Tensor.new_tensor`` calls that put host data on
    another device (dispatch modes do not see these: the copy happens below them)."""
    copies: list[str] = []
    originals = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}
    new_tensor = torch.Tensor.new_tensor

    def target(kwargs, default=None):
        device = kwargs.get("device", default)
        return torch.device(device) if device is not None else None

    def spy(name, make):
        def wrapper(data, *args, **kwargs):
            device = target(kwargs)
            if device is not None and device.type != "cpu" and not isinstance(data, torch.Tensor):
                copies.append(f"torch.{name}({data!r}, device={device})")
            return make(data, *args, **kwargs)
        return wrapper

    def spy_new_tensor(self, data, *args, **kwargs):
        if target(kwargs, self.device).type != "cpu" and not isinstance(data, torch.Tensor):
            copies.append(f"Tensor.new_tensor({data!r}) on {self.device}")
        return new_tensor(self, data, *args, **kwargs)

    try:
        for name, make in originals.items():
            setattr(torch, name, spy(name, make))
        torch.Tensor.new_tensor = spy_new_tensor
        yield copies
    finally:
        for name, make in originals.items():
            setattr(torch, name, make)
        torch.Tensor.new_tensor = new_tensor


def test_host_data_copies_sees_a_python_number_sent_to_the_device() -> None:
    with host_data_copies() as copies:
        torch.as_tensor(0.5, device="meta")
        torch.zeros(2, device="meta").new_tensor([1.0])
        torch.full((), 0.5, device="meta")  # a fill on the device: no copy
        torch.as_tensor(0.5)  # stays on the host
    assert len(copies) == 2


# ------------------------------------------------------------------ the fast layer reads the model's description
def other_trunks(heads: int = 3) -> dict[str, torch.nn.Module]:
    """Critic trunks ``[H, M, 24] -> [H, M, 1]`` other than the default: another layer order (ReLU before
    LayerNorm, a LayerNorm without scale/shift), and the default with an extra layer (its LayerNorm's scale
    and shift shared by the heads)."""
    from vgf_prob.rl.networks import EnsembleLayerNorm, EnsembleLinear

    nn = torch.nn
    reordered = nn.Sequential(
        nn.ReLU(), EnsembleLayerNorm(heads, 24, 1e-6), EnsembleLinear(heads, 24, 20), nn.ReLU(),
        nn.LayerNorm(20, elementwise_affine=False), nn.ReLU(), EnsembleLinear(heads, 20, 1),
    )
    extra = nn.Sequential(
        EnsembleLayerNorm(heads, 24, 1e-6), nn.ReLU(), EnsembleLinear(heads, 24, 16), EnsembleLayerNorm(heads, 16, 1e-6),
        nn.ReLU(), EnsembleLinear(heads, 16, 16), nn.LayerNorm(16), nn.ReLU(), EnsembleLinear(heads, 16, 1),
    )
    return {"reordered": reordered, "extra-layer": extra}


def critic_with_trunk(trunk: torch.nn.Module, heads: int = 3) -> EnsembleCritic:
    critic = perturbed_critic(hidden=(24, 16), heads=heads)
    critic.trunk = trunk.double()
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return critic


@pytest.mark.parametrize("states, particles", [(4, 6), (10, 9)])  # few rows and many
@pytest.mark.parametrize("name", ["reordered", "extra-layer"])
def test_a_critic_with_other_layers_gets_autograd_values_and_gradients(name: str, states: int, particles: int) -> None:
    critic = critic_with_trunk(other_trunks()[name])
    encoded = critic.encode_obs(torch.randn(states, OBS, dtype=torch.float64)).detach()
    x = torch.randn(states, particles, ACT, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(states, particles, 3, dtype=torch.float64)
    plain_q = critic.forward_from_encoding(encoded, x)
    (plain,) = torch.autograd.grad((plain_q * weights).sum(), x)
    fused_q = fused_pass(critic)(encoded, x)
    (fused,) = torch.autograd.grad((fused_q * weights).sum(), x)
    torch.testing.assert_close(fused_q, plain_q.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(fused_pass(critic)(encoded, x), plain_q.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["reordered", "extra-layer", "unsupported"])
def test_a_critic_with_other_layers_moves_particles_as_the_plain_flow(name: str) -> None:
    """Through the agent's flow (Stein field, ParticleAdam, box) and TD target: fast == plain (switch off)."""
    trunks = other_trunks(heads=2) | {"unsupported": torch.nn.Sequential(  # Tanh: not a layer the fast layer runs
        torch.nn.Tanh(), torch.nn.Linear(24, 1).double())}
    agent = VGFAgent(OBS, ACT, TINY.replace(num_particles=6, critic_hidden_dims=(24, 16)), dtype=torch.float64)
    agent.critic.trunk = copy.deepcopy(trunks[name]).double()
    agent.target_critic = copy.deepcopy(agent.critic)
    obs = torch.randn(5, OBS, dtype=torch.float64)
    batch = make_batch(0, torch.float64)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        policy, _ = agent.transport(obs, 3, torch.Generator().manual_seed(0))
        target, _ = agent.td_target(batch, torch.Generator().manual_seed(1))
        return policy.particles, target

    context = pytest.warns(UserWarning, match="Tanh") if name == "unsupported" else contextlib.nullcontext()
    with context:
        particles, target = run()
    if name == "unsupported":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per model and reason, not one per call
            run()
    else:
        assert fast.particle_pass(agent.critic) is not None
    with fast.enabled(False):
        plain_particles, plain_target = run()
    torch.testing.assert_close(particles, plain_particles, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(target, plain_target, rtol=1e-9, atol=1e-10)


def test_the_switch_turns_every_fast_pass_off_bc_sampling_included(monkeypatch) -> None:
    """Every fast pass prepares its weights through `Prepared.get`: with the switch off (or, inside the agent's
    methods, an agent built with fast_path=False) none runs, in acting (BC sampling, the flow, scoring) or in
    an update."""
    from vgf_prob.fast.buffers import Prepared

    calls = []
    original = Prepared.get
    monkeypatch.setattr(Prepared, "get", lambda self, *a: calls.append(a[0]) or original(self, *a))
    agent = VGFAgent(OBS, ACT, TINY)
    agent.act(torch.randn(2, OBS), budget=2)
    assert calls  # the fast layer serves this agent when on
    for off in (fast.enabled(False), contextlib.nullcontext()):
        plain = VGFAgent(OBS, ACT, TINY.replace(fast_path=not isinstance(off, contextlib.nullcontext)))
        calls.clear()
        with off:
            plain.act(torch.randn(2, OBS), budget=2)
            plain.act(torch.randn(OBS), budget=0)
            plain.update(make_batch(0))
            if not fast.is_enabled():  # outside the agent the process-wide switch governs
                plain.reference(torch.randn(3, OBS)).sample_particles(4)
        assert calls == []
    assert fast.is_enabled()  # the context restored the switch
    with pytest.raises(ValueError, match="bool"):
        fast.set_enabled(0)


# ------------------------------------------------------------------ CUDA (skipped without a GPU; run by gpu_check.sh)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_batch(step: int) -> dict[str, torch.Tensor]:
    return {key: value.cuda() for key, value in make_batch(step).items()}


@needs_cuda
@pytest.mark.parametrize("setting", ["stein-min", "amortized", "many-rows", "gaussian-reference"])
def test_cuda_agent_fast_and_plain_paths_give_the_same_losses(setting: str) -> None:
    torch.manual_seed(0)
    config = TINY.replace(**AGENT_SETTINGS[setting])
    fast_agent = VGFAgent(OBS, ACT, config, device="cuda")
    plain_agent = VGFAgent(OBS, ACT, config, device="cuda")
    plain_agent.load_state_dict(fast_agent.state_dict())
    for step in range(2):
        torch.cuda.manual_seed(step)
        info_fast = fast_agent.update(cuda_batch(step))
        torch.cuda.manual_seed(step)
        with fast.enabled(False):
            info_plain = plain_agent.update(cuda_batch(step))
        for key in info_fast:
            torch.testing.assert_close(info_fast[key], info_plain[key], rtol=1e-4, atol=1e-5, msg=key)
    obs = torch.randn(6, OBS, device="cuda")
    torch.cuda.manual_seed(7)
    acted = fast_agent.act(obs, budget=2)
    torch.cuda.manual_seed(7)
    with fast.enabled(False):
        torch.testing.assert_close(acted, plain_agent.act(obs, budget=2), rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("setting", ["stein", "amortized"])
def test_a_cuda_update_does_not_synchronise(setting: str) -> None:
    agent = VGFAgent(OBS, ACT, TINY.replace(**AGENT_SETTINGS.get(setting, {})), device="cuda")
    unchecked_update(agent, cuda_batch(0))
    batch = cuda_batch(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        unchecked_update(agent, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_a_cuda_graph_captured_update_is_the_eager_update(bf16: bool) -> None:
    """Same state and the same seed of the CUDA generator: one replay gives what one eager update gives, and a
    second replay (new batch, parameters changed by the first) still does (derived weights are recomputed)."""
    torch.manual_seed(0)
    graphed = VGFAgent(OBS, ACT, TINY.replace(flow_autocast_bf16=bf16), device="cuda")
    eager = copy.deepcopy(graphed)
    for agent in (graphed, eager):
        fast.make_capturable(agent._optimizers().values())
    torch.cuda.manual_seed(0)
    step = fast.CapturedStep(lambda b: unchecked_update(graphed, b), cuda_batch(0), warmup=3)
    torch.cuda.manual_seed(0)
    for _ in range(3):
        unchecked_update(eager, cuda_batch(0))
    for n in (1, 2):
        torch.cuda.manual_seed(10 + n)
        info = {key: value.clone() for key, value in step(cuda_batch(n)).items()}
        torch.cuda.manual_seed(10 + n)
        reference = unchecked_update(eager, cuda_batch(n))
        for key in reference:
            torch.testing.assert_close(info[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    for p_graphed, p_eager in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p_graphed, p_eager, rtol=1e-4, atol=1e-5)


def test_the_cached_description_follows_changes_to_the_module_tree() -> None:
    """The fast layer reuses a critic's description while its module tree is unchanged: a replaced layer, a
    dtype conversion in place (new storages behind the same parameters) and a compile must all be seen."""
    from vgf_prob.rl.networks import EnsembleLinear

    critic = perturbed_critic()
    encoded = critic.encode_obs(torch.randn(3, OBS, dtype=torch.float64)).detach()
    x = torch.randn(3, 5, ACT, dtype=torch.float64)

    def check(rtol: float) -> None:
        with torch.no_grad():
            enc, xs = encoded.to(critic.first.weight.dtype), x.to(critic.first.weight.dtype)
            torch.testing.assert_close(fused_pass(critic)(enc, xs), critic.forward_from_encoding(enc, xs), rtol=rtol,
                                       atol=rtol)

    check(1e-12)
    critic.trunk.hidden[0] = EnsembleLinear(3, 24, 20).double()
    check(1e-12)
    critic.float()
    check(1e-5)
    critic.trunk.compile()
    assert fast.particle_pass(critic) is None  # the compiled forward runs, without a warning
