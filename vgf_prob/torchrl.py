"""VGF in TorchRL: a loss module whose TD target is the flow, an actor that acts by the flow, bounds from specs.

TorchRL losses train functional copies of the critic: ``convert_to_functional`` moves the critic's parameters
into ``loss.qvalue_network_params`` (stacked, one slice per head; the module keeps its own, untrained ones)
and a detached copy into ``loss.target_qvalue_network_params``, which TorchRL's target updaters
(`torchrl.objectives.SoftUpdate`, `HardUpdate`) move. So ``vgf.as_value(qvalue)`` on the module would run the
flow on weights that are never trained. `VGFLoss.value` instead reads the parameters being trained at every
call (``TensorDict.to_module``, one head after another), and `VGFActor` acts with that value::

    loss = VGFLoss(qvalue, reference, flow, action_spec=env.action_spec)   # the flow's box from the spec
    loss.make_value_estimator(gamma=0.99)                                  # TD(0), TorchRL's estimator
    updater = SoftUpdate(loss, tau=0.005)
    out = loss(batch); (out["loss_qvalue"] + out["loss_bc"]).backward(); optimizer.step(); updater.step()
    actor = loss.actor(num_particles=10, budget=3); env.rollout(200, actor)

The critic loss is TD3's with VGF's bootstrap (REFERENCE.md section 3):
y = r + gamma * (1 - terminated) * (1/N) sum_i Qbar(s', x_i^L), x^L the flow of N reference draws at s' driven
by the online heads, Qbar the target heads combined by the flow's ``target_aggregation``; loss = sum over
heads of ``loss_function``(Q_k(s, a), y), reduced over the batch. The reference's flow-matching BC loss is
``loss_bc``; its parameters are the loss's, so one optimizer over ``loss.parameters()`` trains both.
Install with ``pip install vgf-prob[torchrl]``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import TensorDictModule, dispatch
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.data.tensor_specs import Bounded, Composite, TensorSpec
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import ValueEstimators, dispatch_value_estimator, distance_loss

from vgf_prob.transport import BoxProjection, ValueGradientFlow
from vgf_prob.values import CriticValue, as_value, eval_mode

__all__ = ["VGFActor", "VGFLoss", "spec_bounds"]


def spec_bounds(spec: TensorSpec, action_key: NestedKey = "action") -> tuple[Tensor, Tensor]:
    """(low, high) of a bounded action spec (``env.action_spec``, or a Composite holding ``action_key``)."""
    if isinstance(spec, Composite):
        spec = spec[action_key]
    if not isinstance(spec, Bounded):
        raise TypeError(f"VGF needs a bounded action spec (torchrl.data.Bounded) for its box; got "
                        f"{type(spec).__name__}")
    return spec.space.low, spec.space.high


class _StackedCritic:
    """critic(obs [M, O], actions [M, A]) -> [M, H]: a TorchRL critic under each of its H stacked parameter sets.

    ``params()`` is read at every call, so the values are those of the parameters as they are now.
    """

    def __init__(self, network: TensorDictModule, params, obs_key: NestedKey, action_key: NestedKey,
                 value_key: NestedKey, frozen: bool) -> None:
        self.network, self.params = network, params
        self.obs_key, self.action_key, self.value_key, self.frozen = obs_key, action_key, value_key, frozen

    def __call__(self, obs: Tensor, actions: Tensor) -> Tensor:
        params = self.params()
        dtype = next(v for v in params.values(True, True) if v.is_floating_point()).dtype
        inputs = TensorDict({self.obs_key: obs.to(dtype), self.action_key: actions.to(dtype)}, batch_size=obs.shape[:1])
        heads = []
        with eval_mode(self.network) if self.frozen else nullcontext():
            for index in range(params.shape[0]):
                with params[index].to_module(self.network):
                    heads.append(self.network(inputs.clone(False)).get(self.value_key))
        return torch.cat([h.reshape(obs.shape[0], -1) for h in heads], dim=-1)


class VGFLoss(LossModule):
    """TorchRL loss: TD(0) critic loss with VGF's V(s') and the reference's behaviour-cloning loss (module docstring).

    :param qvalue_network: a TorchRL critic reading ``(observation, action)`` keys and writing
        ``state_action_value`` (e.g. a ``ValueOperator``); ``num_qvalue_nets`` stacked copies are trained.
    :param reference: the BC policy (``obs -> distribution``, with ``loss(obs, actions) -> (loss, info)``,
        e.g. `vgf_prob.distributions.FlowMatchingPolicy`), trained by ``loss_bc``.
    :param flow: the operator; ``action_spec`` (or ``flow.projection``) gives its box.
    :param num_particles: N per state in the TD target; ``budget`` overrides the flow's L_train.
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys: ``action``, ``state_action_value`` (the critic's output), ``priority`` (written: the
        TD error), and the ``reward``, ``done`` and ``terminated`` entries under ``"next"``."""

        action: NestedKey = "action"
        state_action_value: NestedKey = "state_action_value"
        priority: NestedKey = "td_error"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    default_value_estimator = ValueEstimators.TD0
    out_keys = ["loss_qvalue", "loss_bc", "pred_value", "target_value", "next_state_value"]
    qvalue_network: TensorDictModule
    qvalue_network_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams

    def __init__(self, qvalue_network: TensorDictModule, reference: nn.Module, flow: ValueGradientFlow, *,
                 action_spec: TensorSpec | None = None, num_qvalue_nets: int = 2, num_particles: int = 10,
                 budget: int | None = None, loss_function: str = "l2", reduction: str = "mean") -> None:
        super().__init__()
        if flow.projection is None and action_spec is None:
            raise ValueError("VGFLoss needs the action box: pass action_spec=env.action_spec or a flow with a "
                             "projection")
        self.convert_to_functional(qvalue_network, "qvalue_network", num_qvalue_nets, create_target_params=True)
        self.obs_key = _observation_key(qvalue_network, self.tensor_keys.action)
        self.reference = reference
        self.flow = flow if action_spec is None else replace(flow, projection=BoxProjection(*spec_bounds(action_spec)))
        self.num_qvalue_nets, self.num_particles, self.budget = num_qvalue_nets, num_particles, budget
        self.loss_function, self.reduction = loss_function, reduction

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        if self._value_estimator is not None:
            self._value_estimator.set_keys(value=self.tensor_keys.state_action_value, reward=self.tensor_keys.reward,
                                           done=self.tensor_keys.done, terminated=self.tensor_keys.terminated)

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams) -> None:
        """TD(0) (the only estimator for a one-step bootstrap from the flow); ``gamma`` among ``hyperparams``."""
        dispatch_value_estimator(
            self, self.default_value_estimator if value_type is None else value_type,
            supported=(ValueEstimators.TD0,), value_network=None, **hyperparams,
            tensor_keys={"value": self.tensor_keys.state_action_value, "reward": self.tensor_keys.reward,
                         "done": self.tensor_keys.done, "terminated": self.tensor_keys.terminated},
        )

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = {self.obs_key, self.tensor_keys.action, ("next", self.obs_key), ("next", self.tensor_keys.reward),
                ("next", self.tensor_keys.done), ("next", self.tensor_keys.terminated)}
        return sorted(keys, key=str)

    def value(self, target: bool = False) -> CriticValue:
        """The critic as a vgf-prob value, heads side by side: the parameters being trained (``target=False``) or
        the target parameters, read at every call, in eval mode."""
        name = "target_qvalue_network_params" if target else "qvalue_network_params"
        critic = _StackedCritic(self.qvalue_network, lambda: getattr(self, name), self.obs_key,
                                self.tensor_keys.action, self.tensor_keys.state_action_value, frozen=True)
        return as_value(critic, layout="rows")

    def actor(self, *, num_particles: int | None = None, budget: int | None = None,
              rule: str = "argmax") -> VGFActor:
        """A `VGFActor` acting by this loss's flow, reference and trained critic (``budget=0``: best-of-N)."""
        return VGFActor(self.reference, self.flow, self.value(), in_keys=[self.obs_key],
                        out_keys=[self.tensor_keys.action],
                        num_particles=self.num_particles if num_particles is None else num_particles,
                        budget=budget, rule=rule)

    def qvalue_loss(self, tensordict: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        """sum_k loss_function(Q_k(s, a), r + gamma (1 - terminated) V_VGF(s')), reduced over the batch."""
        with torch.no_grad():
            next_v = self.flow.next_value(self.reference, tensordict.get(("next", self.obs_key)), self.value(),
                                          self.value(target=True), num_particles=self.num_particles,
                                          budget=self.budget)
            target = self.value_estimator.value_estimate(tensordict, next_value=next_v.unsqueeze(-1)).squeeze(-1)
        online = _StackedCritic(self.qvalue_network, lambda: self.qvalue_network_params, self.obs_key,
                                self.tensor_keys.action, self.tensor_keys.state_action_value, frozen=False)
        obs, action = tensordict.get(self.obs_key), tensordict.get(self.tensor_keys.action)
        pred = online(obs.reshape(-1, obs.shape[-1]), action.reshape(-1, action.shape[-1]))
        pred = pred.reshape(*target.shape, self.num_qvalue_nets)
        loss = distance_loss(pred, target.unsqueeze(-1).expand_as(pred), loss_function=self.loss_function).sum(-1)
        info = {"td_error": (pred.detach() - target.unsqueeze(-1)).pow(2).amax(-1), "pred_value": pred.detach(),
                "target_value": target, "next_state_value": next_v}
        return self._reduce_loss(loss, reduction=self.reduction), info

    def bc_loss(self, tensordict: TensorDictBase) -> Tensor:
        """The reference's own behaviour-cloning loss on the batch's (observation, action) pairs."""
        loss, _ = self.reference.loss(tensordict.get(self.obs_key), tensordict.get(self.tensor_keys.action))
        return loss

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        loss_qvalue, info = self.qvalue_loss(tensordict)
        tensordict.set(self.tensor_keys.priority, info.pop("td_error"))
        return TensorDict({"loss_qvalue": loss_qvalue, "loss_bc": self.bc_loss(tensordict), **info})


class _Act(nn.Module):
    """obs [*B, O] (or [O]) -> flow.act(...) [*B, A] (or [A])."""

    def __init__(self, reference: nn.Module, flow: ValueGradientFlow, value, num_particles: int, budget, rule: str):
        super().__init__()
        self.reference, self.flow, self.value = reference, flow, value
        self.num_particles, self.budget, self.rule = num_particles, budget, rule

    def forward(self, obs: Tensor) -> Tensor:
        single = obs.dim() == 1
        batch = obs.unsqueeze(0) if single else obs
        action = self.flow.act(self.reference, batch, self.value, num_particles=self.num_particles,
                               budget=self.budget, rule=self.rule)
        return action[0] if single else action


class VGFActor(TensorDictModule):
    """A TorchRL actor: ``action = flow.act(reference, observation, value, N, budget)``, in the box of
    ``action_spec`` when it is given (else the flow's projection's box). ``budget=0`` is best-of-N."""

    def __init__(self, reference: nn.Module, flow: ValueGradientFlow, value, *, action_spec: TensorSpec | None = None,
                 in_keys: list[NestedKey] | None = None, out_keys: list[NestedKey] | None = None,
                 num_particles: int = 10, budget: int | None = None, rule: str = "argmax") -> None:
        if action_spec is not None:
            flow = replace(flow, projection=BoxProjection(*spec_bounds(action_spec)))
        if flow.projection is None:
            raise ValueError("VGFActor needs the action box: pass action_spec=env.action_spec or a flow with a "
                             "projection")
        super().__init__(_Act(reference, flow, value, num_particles, budget, rule),
                         in_keys=in_keys or ["observation"], out_keys=out_keys or ["action"])


def _observation_key(network: TensorDictModule, action_key: NestedKey) -> NestedKey:
    keys = [key for key in network.in_keys if key != action_key]
    if len(keys) != 1:
        raise ValueError(f"VGFLoss needs a critic that reads one observation key besides {action_key!r}; its in_keys "
                         f"are {network.in_keys}")
    return keys[0]
