"""The offline-RL Value Gradient Flow agent (REFERENCE.md section 3).

One update, on a batch of transitions (s, a, r, s', mask):

    x^0_i ~ mu(. | s'), i = 1..N                 (BC reference, flow matching by default)
    x^L   = L_train steps of the value gradient flow driven by the online critic (heads by flow_aggregation)
    y     = r + gamma * mask * (1/N) sum_i Qbar(s', x^L_i)   (target critic, heads by target_aggregation)
    loss  = sum_k mean_batch (y - Q_k(s, a))^2,  plus one BC step on (s, a) and a Polyak step for Qbar.

Acting draws N particles from mu(. | s), runs L_test flow steps and returns the particle with the highest
online Q. L_test = 0 is best-of-N from the reference. The amortised variant replaces the Stein field by a
network f(s, a) regressed onto grad_a mean_k Q_k(s, a) at dataset actions.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgf_prob import fast
from vgf_prob.budget import Budget, StepBudget, as_budget
from vgf_prob.cost import timed
from vgf_prob.distributions.flow_matching import FlowMatchingPolicy
from vgf_prob.distributions.gaussian import GaussianPolicy
from vgf_prob.distributions.particle import ParticlePolicy
from vgf_prob.flows import AmortizedGradient, ParticleAdam, SteinField, VelocityField, action_gradient
from vgf_prob.flows.resampling import BoltzmannResampling
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.networks import AmortizedGradientNetwork, EnsembleCritic
from vgf_prob.transport import BoxProjection, ValueGradientFlow
from vgf_prob.validation import host_reads, is_validation_enabled
from vgf_prob.values import HeadAggregation

BATCH_KEYS = ("observations", "actions", "rewards", "next_observations", "masks")
ParticleFn = Callable[[Tensor | None, Tensor], Tensor]
TensorInfo = tuple[Tensor, dict[str, Tensor]]


class VGFAgent(nn.Module):
    """Twin critic + target critic + BC reference mu; the policy is mu's particles moved by a value gradient flow.

    TD target y = r + gamma * mask * (1/N) sum_i Qbar(s', x_i), x = L_train flow steps from N draws of mu(.|s');
    action = argmax_i Q(s, x_i) after L_test flow steps. ``config`` holds every hyperparameter (`VGFConfig`).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        config: VGFConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, dim in (("obs_dim", obs_dim), ("action_dim", action_dim)):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"{name} must be a positive int, got {dim!r}")
        self.config = cfg = config if config is not None else VGFConfig()
        self.obs_dim, self.action_dim = obs_dim, action_dim

        self.critic = EnsembleCritic(
            obs_dim, action_dim, cfg.critic_hidden_dims, cfg.num_critic_heads, cfg.critic_layer_norm_eps
        )
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        if cfg.reference == "flow_matching":
            self.reference: nn.Module = FlowMatchingPolicy(obs_dim, action_dim, cfg.bc_hidden_dims, cfg.flow_steps)
        else:
            self.reference = GaussianPolicy(obs_dim, action_dim, cfg.bc_hidden_dims, action_low=-1.0, action_high=1.0)
        self.amortized = (
            AmortizedGradientNetwork(obs_dim, action_dim, cfg.amortized_hidden_dims, cfg.critic_layer_norm_eps)
            if cfg.variant == "amortized"
            else None
        )
        self.to(device=device, dtype=dtype)

        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr)
        self.reference_optimizer = torch.optim.Adam(self.reference.parameters(), lr=cfg.lr)
        self.amortized_optimizer = (
            torch.optim.Adam(self.amortized.parameters(), lr=cfg.lr) if self.amortized is not None else None
        )

        self.stein_field = SteinField(cfg.alpha, differentiate_bandwidth=cfg.differentiate_bandwidth)
        self.solver = ParticleAdam(cfg.vgf_lr)
        self.projection = BoxProjection(-1.0, 1.0)
        self.train_budget = StepBudget(cfg.train_budget)
        if cfg.compile:
            self._compile_networks()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.critic.first.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.critic.first.weight.dtype

    # ------------------------------------------------------------------ the flow
    def particle_fn(self, network: nn.Module, obs: Tensor) -> ParticleFn:
        """``fn(obs, x [B, N, A])`` evaluating ``network`` (critic or f) at particles of the states ``obs [B, O]``.

        Fast path (``config.fast_path`` and `vgf_prob.fast` enabled): the state part of the first layer is
        encoded once here and reused by every call (all particles, all flow steps), through the critic's fused
        pass where `vgf_prob.fast.particle_pass` serves the network. Plain path: concat(obs, x) through the
        whole network at every call.
        """
        if self.config.fast_path and fast.is_enabled():
            with torch.no_grad():
                encoded = network.encode_obs(obs)
            # the fused pass: Q at particles, differentiable wrt the particles only; else the model's forward
            at_particles = fast.particle_pass(network) or network.forward_from_encoding

            def network_at(_: Tensor | None, x: Tensor) -> Tensor:
                return at_particles(encoded, x)
        else:

            def network_at(states: Tensor | None, x: Tensor) -> Tensor:
                return network(states.unsqueeze(-2).expand(*x.shape[:-1], states.shape[-1]), x)

        def fn(states: Tensor | None, x: Tensor) -> Tensor:
            with self._autocast(), self._fast_switch():
                return network_at(states, x).to(x.dtype)

        return fn

    def reference_particles(
        self, obs: Tensor, num_particles: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """x^0_i ~ mu(. | s): ``[B, N, A]`` draws from the BC reference, without a graph."""
        with torch.no_grad(), self._autocast(), self._fast_switch():
            particles = self.reference(obs).sample_particles(num_particles, generator=generator)
        return particles.to(obs.dtype)

    def flow(
        self,
        obs: Tensor,
        budget: Budget | int,
        *,
        field: VelocityField | None = None,
        resampling: BoltzmannResampling | None = None,
    ) -> ValueGradientFlow:
        """The operator this agent acts and bootstraps with at the states ``obs``: ParticleAdam(vgf_lr) on
        ``field`` (default the Stein field, or f(s, x) for the amortised variant), heads by
        ``config.flow_aggregation`` for the flow and ``config.target_aggregation`` for values, clipped to the box
        [-1, 1]. ``field=ValueGradient()`` is plain value-gradient ascent (GradStep); ``resampling`` makes the flow
        sequential Monte Carlo."""
        if field is None:
            amortized = self.amortized
            field = self.stein_field if amortized is None else AmortizedGradient(self.particle_fn(amortized, obs))
        return ValueGradientFlow(
            field,
            self.solver,
            budget=budget,
            projection=self.projection,
            aggregation=self.config.flow_aggregation,
            target_aggregation=self.config.target_aggregation,
            resampling=resampling,
        )

    def transport(
        self,
        obs: Tensor,
        budget: Budget | int,
        generator: torch.Generator | None = None,
    ) -> tuple[ParticlePolicy, ParticleFn]:
        """Draw N particles per state from mu and move them under ``budget`` with the online critic (`flow`).

        Returns the resulting `ParticlePolicy` and the critic's ``fn(obs, x) -> [B, N, H]`` (with its cached
        state encoding, for scoring the particles).
        """
        critic_fn = self.particle_fn(self.critic, obs)
        start = self.reference_particles(obs, self.config.num_particles, generator)
        return self.flow(obs, budget)(start, obs, critic_fn), critic_fn

    # ------------------------------------------------------------------ losses
    def td_target(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> TensorInfo:
        """y = r + gamma * mask * (1/N) sum_i Qbar(s', x_i), x the next-state particles after L_train flow steps.

        The flow is driven by the online critic with heads combined by ``config.flow_aggregation``; Qbar is the
        target critic with heads combined by ``config.target_aggregation``. Returns (y [B], info).
        """
        next_obs = batch["next_observations"]
        with torch.no_grad():
            start = self.reference_particles(next_obs, self.config.num_particles, generator)
            critic_fn = self.particle_fn(self.critic, next_obs)
            target_fn = self.particle_fn(self.target_critic, next_obs)
            next_q, policy = self.flow(next_obs, self.train_budget).next_value(
                start, next_obs, critic_fn, target_fn, return_policy=True)
            target = batch["rewards"] + self.config.discount * batch["masks"] * next_q
        info = {"target_q": target.mean(), "next_q": next_q.mean(), "flow_displacement": policy.report.displacement.mean()}
        return target, info

    def critic_loss(self, batch: Mapping[str, Tensor], target: Tensor) -> TensorInfo:
        """sum_k mean_batch (y - Q_k(s, a))^2 over the H critic heads."""
        q = self.critic(batch["observations"], batch["actions"])
        loss = (q - target.unsqueeze(-1)).square().mean(0).sum()
        return loss, {"critic_loss": loss.detach(), "q_mean": q.detach().mean()}

    def bc_loss(
        self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> TensorInfo:
        """The reference's BC loss on dataset pairs (flow-matching MSE, or Gaussian negative log-likelihood)."""
        obs, actions = batch["observations"], batch["actions"]
        if isinstance(self.reference, FlowMatchingPolicy):
            loss, info = self.reference.loss(obs, actions, generator=generator)
        else:
            loss, info = self.reference.loss(obs, actions)
        return loss, {"bc_loss": loss.detach(), **{f"bc_{k}": v for k, v in info.items()}}

    def amortized_loss(self, batch: Mapping[str, Tensor]) -> TensorInfo:
        """MSE between f(s, a) and grad_a Q(s, a) at dataset pairs, heads combined by ``config.flow_aggregation``
        (the field f replaces that gradient in the flow); the critic gets no gradient."""
        obs, actions = batch["observations"], batch["actions"]
        critic_fn = self.particle_fn(self.critic, obs)
        heads = HeadAggregation(critic_fn, self.config.flow_aggregation)
        _, score = action_gradient(heads, obs, actions.unsqueeze(-2))
        loss = F.mse_loss(self.amortized(obs, actions), score.squeeze(-2))
        return loss, {"amortized_loss": loss.detach(), "score_norm": score.norm(dim=-1).mean()}

    # ------------------------------------------------------------------ training
    def update(
        self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """One training iteration on ``batch`` (keys observations, actions, rewards, next_observations, masks).

        All losses are formed with the current parameters, then each network takes one Adam step (global
        grad norm clipped to ``config.max_grad_norm`` when positive) and the target critic a Polyak step.
        ``generator`` drives the reference's samples and the BC noise. With validation on (`vgf_prob.validation`)
        the batch is checked for NaN/inf, the one host read; inside ``vgf_prob.host_reads(False)`` (data already
        validated, e.g. an `OfflineDataset`) there is none. Returns detached scalar tensors.
        """
        batch = self._prepare_batch(batch)
        with host_reads(False):  # the batch is checked: the flows and losses read nothing back
            return self._step(batch, generator)

    def _step(self, batch: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Tensor]:
        """``update``'s losses, optimiser steps and Polyak step on a prepared batch."""
        target, info = self.td_target(batch, generator)
        critic_loss, critic_info = self.critic_loss(batch, target)
        bc_loss, bc_info = self.bc_loss(batch, generator)
        steps = [(critic_loss, self.critic_optimizer), (bc_loss, self.reference_optimizer)]
        info |= critic_info | bc_info
        if self.amortized is not None:
            amortized_loss, amortized_info = self.amortized_loss(batch)
            steps.append((amortized_loss, self.amortized_optimizer))
            info |= amortized_info
        for loss, optimizer in steps:
            self._optimizer_step(loss, optimizer)
        self._polyak_update()
        return info

    def _optimizer_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()

    @torch.no_grad()
    def _polyak_update(self) -> None:
        """theta_bar <- (1 - tau) theta_bar + tau theta."""
        for target, online in zip(self.target_critic.parameters(), self.critic.parameters()):
            target.lerp_(online, self.config.tau)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(
        self,
        obs: Tensor,
        budget: Budget | int | None = None,
        generator: torch.Generator | None = None,
        *,
        num_particles: int | None = None,
        field: VelocityField | None = None,
        resampling: BoltzmannResampling | None = None,
    ) -> Tensor:
        """argmax_i Q(s, x_i) over N reference particles moved by the flow under ``budget`` (`flow`'s ``act``).

        ``obs`` is ``[B, O]`` (or one ``[O]`` observation, giving ``[A]``); ``budget`` an int step count
        or any `vgf_prob.budget.Budget` (default ``config.test_budget``); ``num_particles`` N for this call
        (default ``config.num_particles``; with ``budget=0`` this is best-of-N at any N); ``field`` and
        ``resampling`` pick another test-time operator (`flow`). The flow's heads are combined by
        ``config.flow_aggregation``, the choice's by ``config.target_aggregation`` (as in the TD target). The
        critic receives no gradient. Its cost is counted by any active `vgf_prob.cost.measure` meter.
        """
        obs, single = self._prepare_obs(obs)
        budget = as_budget(self.config.acting_budget if budget is None else budget)
        num_particles = self.config.num_particles if num_particles is None else num_particles
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        with timed() as call:
            call.states = obs.shape[0]
            start = self.reference_particles(obs, num_particles, generator)
            flow = self.flow(obs, budget, field=field, resampling=resampling)
            actions = flow.act(start, obs, self.particle_fn(self.critic, obs), generator=generator)
        if is_validation_enabled() and not torch.isfinite(actions).all():
            raise ValueError("the chosen actions contain NaN or inf: the BC reference or the critic produced them")
        return actions[0] if single else actions

    def best_of_n(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """argmax_i Q(s, x_i) over N draws of mu(. | s): acting with L_test = 0."""
        return self.act(obs, budget=0, generator=generator)

    def explore(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Exploration action for offline-to-online fine-tuning: best-of-N (L = 0), as the authors do."""
        return self.best_of_n(obs, generator)

    @torch.no_grad()
    def bc_action(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One sample of the BC reference mu(. | s): the behaviour-cloning baseline."""
        obs, single = self._prepare_obs(obs)
        actions = self.reference_particles(obs, 1, generator).squeeze(-2)
        return actions[0] if single else actions

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        """Optimiser states, stored by ``state_dict()`` next to the parameters."""
        return {name: optimizer.state_dict() for name, optimizer in self._optimizers().items()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        optimizers = self._optimizers()
        if set(state) != set(optimizers):
            raise ValueError(f"optimiser states for {sorted(state)} do not match this agent's {sorted(optimizers)}")
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(copy.deepcopy(state[name]))

    def training_state(self) -> dict[str, Any]:
        """Everything needed to resume training: config, dims, parameters, target critic and optimiser states.

        Tensors share storage with the live agent (as ``state_dict`` does): save or deep-copy the result.
        """
        return {
            "config": self.config.to_dict(),
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "agent": self.state_dict(),
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `training_state` returned (modules and optimisers); dims must match this agent."""
        missing = [key for key in ("config", "obs_dim", "action_dim", "agent") if key not in state]
        if missing:
            raise ValueError(f"training state is missing {missing}; expected the output of VGFAgent.training_state()")
        dims = (state["obs_dim"], state["action_dim"])
        if dims != (self.obs_dim, self.action_dim):
            raise ValueError(
                f"training state is for obs_dim, action_dim = {dims}, this agent has {(self.obs_dim, self.action_dim)}"
            )
        self.load_state_dict(state["agent"])

    @classmethod
    def from_training_state(
        cls, state: Mapping[str, Any], device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> VGFAgent:
        """A new agent built from the config stored in ``state`` and loaded from it."""
        agent = cls(state["obs_dim"], state["action_dim"], VGFConfig.from_dict(state["config"]), device, dtype)
        agent.load_training_state(state)
        return agent

    # ------------------------------------------------------------------ helpers
    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = {"critic": self.critic_optimizer, "reference": self.reference_optimizer}
        if self.amortized_optimizer is not None:
            optimizers["amortized"] = self.amortized_optimizer
        return optimizers

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast when ``config.flow_autocast_bf16``, else a no-op context (any device type); inside a
        CUDA graph capture without autocast's weight-cast cache (which a replay would not refresh)."""
        if not self.config.flow_autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not fast.capturing())

    def _fast_switch(self) -> contextlib.AbstractContextManager:
        """`vgf_prob.fast` switched off while the networks run when ``config.fast_path`` is False (BC sampling
        included), else a no-op context (the process-wide switch then decides)."""
        return contextlib.nullcontext() if self.config.fast_path else fast.enabled(False)

    def _compile_networks(self) -> None:
        """torch.compile the MLP bodies in place (parameter names, hence checkpoints, are unchanged)."""
        self.critic.trunk.compile()
        self.target_critic.trunk.compile()
        if self.amortized is not None:
            self.amortized.net.trunk.compile()
        if isinstance(self.reference, FlowMatchingPolicy):
            self.reference.velocity_net.trunk.compile()
        else:
            self.reference.net.compile()

    def _prepare_obs(self, obs: Tensor) -> tuple[Tensor, bool]:
        """Observations as ``[B, O]`` on this agent's device and dtype, and whether one ``[O]`` was given."""
        try:  # any device and float dtype is moved to the agent's
            obs = torch.as_tensor(obs, device=self.device, dtype=self.dtype)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"obs must be numeric (a tensor or array of shape [B, {self.obs_dim}]): {err}") from None
        if obs.dim() not in (1, 2) or obs.shape[-1] != self.obs_dim:
            raise ValueError(f"obs must have shape [B, {self.obs_dim}] or [{self.obs_dim}], got {tuple(obs.shape)}")
        if obs.shape[0] == 0:
            raise ValueError(f"obs is an empty batch (shape {tuple(obs.shape)}); give at least one observation")
        if is_validation_enabled() and not torch.isfinite(obs).all():
            raise ValueError("obs contains NaN or infinite values")
        return (obs.unsqueeze(0), True) if obs.dim() == 1 else (obs, False)

    def _prepare_batch(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check shapes (and, with validation on, values) and move the batch to this agent's device and dtype."""
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise ValueError(f"batch is missing {missing}; expected keys {list(BATCH_KEYS)}")
        size = len(batch["rewards"])
        expected = {
            "observations": (size, self.obs_dim),
            "actions": (size, self.action_dim),
            "rewards": (size,),
            "next_observations": (size, self.obs_dim),
            "masks": (size,),
        }
        for key, shape in expected.items():
            if tuple(batch[key].shape) != shape:
                raise ValueError(
                    f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {shape} "
                    f"(batch size {size}, obs_dim {self.obs_dim}, action_dim {self.action_dim})"
                )
        tensors = {key: torch.as_tensor(batch[key]).to(device=self.device, dtype=self.dtype) for key in BATCH_KEYS}
        if is_validation_enabled() and not torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all():
            bad = [key for key, t in tensors.items() if not torch.isfinite(t).all()]
            raise ValueError(f"batch contains NaN or infinite values in {bad}")
        return tensors


__all__ = ["BATCH_KEYS", "VGFAgent"]
