"""Flow-matching behaviour cloning: a conditional velocity field and the law of the map it defines from N(0, I).

Which law ``policy(obs)`` is depends on the sampler, and its ``log_prob`` is the density of exactly that law:

- ``method="euler"`` (the paper's sampler): x_{k+1} = x_k + dt v(s, x_k, t_k), t_k = k dt, dt = 1 / K. The density
  of x_K is the discrete change of variables log p(x_K) = log N(x_0; 0, I) - sum_k log|det(I + dt dv/dx(x_k))|,
  with x_k recovered from x_{k+1} by Newton's method (exact when each step is injective, e.g. dt Lip(v) < 1).
- any other torchdiffeq ``method``: the continuous-time flow dx/dt = v(s, x, t) on [0, 1]; its density is the
  instantaneous change of variables log p(x(1)) = log N(x(0); 0, I) - int_0^1 div_x v(s, x(t), t) dt, solved
  with ``density_method`` on a fixed grid by default, so that no value depends on its batch-mates.

``bound`` maps the result into the action box: ``"clip"`` clamps (the authors' agent; the law then has atoms on
the box's faces and no density, so ``log_prob`` raises), ``"tanh"`` squashes by a = c + h tanh(z) (a pyro
``TransformedDistribution`` with the log-determinant, BC fitted on z = atanh((a - c) / h)), ``"none"`` leaves x.
"""

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, TransformedDistribution, constraints
from pyro.distributions.transforms import AffineTransform, TanhTransform
from torch import Tensor, nn
from torch.func import functional_call, jacfwd, jvp, vmap
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS

from vgf_prob import cost, fast

from .networks import ConditionalMLP, check_obs

BOUNDS = ("clip", "tanh", "none")
DIVERGENCES = ("auto", "exact", "hutchinson")
MAX_EXACT_DIVERGENCE_DIM = 16
TANH_TARGET_MARGIN = 1e-6
"""``bound="tanh"`` fits the flow to z = atanh(u) with u = (a - c) / h clamped into [-1 + m, 1 - m] (dataset actions
often sit exactly on the box's faces, where atanh is infinite); m = 1e-6 bounds |z| by 7.3."""
MAX_NEWTON_ITERATIONS = 50


def _check_method(name: str, method: str) -> None:
    if method not in SOLVERS:
        raise ValueError(f"unknown {name} {method!r}; valid torchdiffeq methods: {', '.join(sorted(SOLVERS))}")


def _time_column(t: Tensor, x: Tensor) -> Tensor:
    """``t`` as a ``[..., 1]`` input column next to ``x [..., A]`` (a scalar ``t`` is broadcast)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[:-1] + (1,)) if t.ndim == 0 else t


@dataclass(frozen=True)
class FlowSpec:
    """How a flow-matching policy turns noise into an action (see the module docstring)."""

    action_dim: int
    num_steps: int
    method: str
    clip: bool
    ode_options: dict[str, Any] = field(default_factory=dict)
    density_method: str = "rk4"
    density_steps: int = 10
    divergence: str = "exact"


class FlowMatchingPolicy(nn.Module):
    """Flow-matching BC: v(s, x_t, t) regresses x1 - x0 at x_t = (1 - t) x0 + t x1, x0 ~ N(0, I), t ~ U[0, 1].

    ``policy(obs)`` is the law of the sampler's output (module docstring). ``method="euler"`` takes ``num_steps``
    hand-written Euler steps (the paper's sampler, with an exact discrete density); any other torchdiffeq method
    integrates the ODE on the grid t = k / num_steps with ``ode_options`` (default ``rtol=atol=1e-5``), and its
    ``log_prob`` solves the density ODE with ``density_method`` (default ``"rk4"``) over ``density_steps`` fixed
    steps (default ``num_steps``) and ``divergence`` ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact when
    ``action_dim <= 16``). ``bound`` is ``"clip"`` (default, the authors' agent), ``"tanh"`` or ``"none"``.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (512, 512, 512, 512),
        num_steps: int = 10,
        method: str = "euler",
        action_low: float | Sequence[float] | Tensor = -1.0,
        action_high: float | Sequence[float] | Tensor = 1.0,
        bound: str = "clip",
        ode_options: dict[str, Any] | None = None,
        density_method: str | None = None,
        density_steps: int | None = None,
        divergence: str | None = None,
    ) -> None:
        super().__init__()
        _check_method("method", method)
        if bound not in BOUNDS:
            raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        ode_only = {"ode_options": ode_options, "density_method": density_method, "density_steps": density_steps,
                    "divergence": divergence}
        given = [name for name, value in ode_only.items() if value is not None]
        if method == "euler" and given:
            raise ValueError(
                f"{', '.join(given)} apply to ODE samplers only: method='euler' has an exact discrete density"
            )
        density_method = "rk4" if density_method is None else density_method
        _check_method("density_method", density_method)
        density_steps = num_steps if density_steps is None else density_steps
        if density_steps < 1:
            raise ValueError(f"density_steps must be >= 1, got {density_steps}")
        divergence = "auto" if divergence is None else divergence
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if divergence == "auto":
            divergence = "exact" if action_dim <= MAX_EXACT_DIVERGENCE_DIM else "hutchinson"
        low = torch.as_tensor(action_low, dtype=torch.get_default_dtype()).expand(action_dim).clone()
        high = torch.as_tensor(action_high, dtype=torch.get_default_dtype()).expand(action_dim).clone()
        if not (low < high).all():
            raise ValueError(f"action_low must be < action_high elementwise, got {low.tolist()} and {high.tolist()}")
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.bound = bound
        self.spec = FlowSpec(action_dim, num_steps, method, bound == "clip",
                             {"rtol": 1e-5, "atol": 1e-5, **(ode_options or {})}, density_method, density_steps,
                             divergence)
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)
        self.velocity_net = ConditionalMLP(obs_dim, action_dim + 1, action_dim, hidden_dims)

    @property
    def num_steps(self) -> int:
        return self.spec.num_steps

    @property
    def method(self) -> str:
        return self.spec.method

    def velocity(self, obs: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """v(s, x, t) through the plain concat path; ``t`` is ``[..., 1]`` or a scalar."""
        return self.velocity_net(obs, torch.cat([x, _time_column(t, x)], dim=-1))

    def flow_target(self, actions: Tensor) -> Tensor:
        """The variable the flow transports noise to: the action, or z = atanh((a - c) / h) when ``bound="tanh"``
        (clamped by `TANH_TARGET_MARGIN` so that actions on the box's faces stay finite)."""
        if self.bound != "tanh":
            return actions
        center, half = _center_half(self.action_low.to(actions), self.action_high.to(actions))
        margin = 1.0 - TANH_TARGET_MARGIN
        return torch.atanh(((actions - center) / half).clamp(-margin, margin))

    def loss(
        self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-matching MSE between v(s, x_t, t) and x1 - x0 for dataset pairs ``obs [*B, O]``, ``actions [*B, A]``
        (x1 = `flow_target` of the action)."""
        check_obs(obs, self.obs_dim)
        expected = obs.shape[:-1] + (self.action_dim,)
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {tuple(expected)}, got {tuple(actions.shape)}")
        target = self.flow_target(actions)
        noise = torch.randn(actions.shape, generator=generator, dtype=actions.dtype, device=actions.device)
        t = torch.rand(expected[:-1] + (1,), generator=generator, dtype=actions.dtype, device=actions.device)
        x_t = torch.lerp(noise, target, t)
        loss = F.mse_loss(self.velocity(obs, x_t, t), target - noise)
        return loss, {"flow_matching_loss": loss.detach()}

    def forward(self, obs: Tensor) -> "FlowMatchingDistribution | SquashedFlowMatching":
        """The law of a BC sample at ``obs [*B, O]``; with validation off (`vgf_prob.validation`) nothing reads a
        value back to the host (NaN/inf in ``obs``, argument and sample checks)."""
        check_obs(obs, self.obs_dim)
        low, high = self.action_low.to(obs), self.action_high.to(obs)
        flow = FlowMatchingDistribution(self.velocity_net, self.spec, obs, low, high)
        if self.bound != "tanh":
            return flow
        return SquashedFlowMatching(flow, low, high)


def _center_half(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    return 0.5 * (high + low), 0.5 * (high - low)


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version


class ParameterSnapshot:
    """A network and the parameter and buffer tensors a distribution evaluates it with.

    Taken when the distribution is built (inside ``torch.func.functional_call`` these are the substituted
    tensors). While they are still the network's own, unchanged tensors, the network runs directly (its fast
    inference path included); otherwise (after ``functional_call`` returned, ``copy.deepcopy``, pyro's
    ``deep_to``) it runs through ``torch.func.functional_call`` with the snapshot. An in-place change of the
    network's parameters after the snapshot (an optimiser step) is an error, not a silent change of the law.
    Copies share the network (it is only a structure here) and copy the tensors.
    """

    def __init__(self, net: nn.Module) -> None:
        sampled = [f"{prefix}.{name}".lstrip(".") for prefix, module in net.named_modules()
                   for name in getattr(module, "_pyro_samples", {})]
        if sampled:
            raise TypeError(
                f"PyroSample priors on the velocity network ({', '.join(sampled[:3])}) are not supported: the "
                "distribution evaluates a snapshot of the parameters. Sample the weights in the model and pass them "
                "with torch.func.functional_call(policy, {'velocity_net.<name>': w}, (obs,))"
            )
        self.net = net
        self.tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        self.versions = {name: _version(t) for name, t in self.tensors.items()}

    def check_unchanged(self) -> None:
        """Raise if a snapshot tensor was changed in place since the snapshot was taken."""
        changed = [name for name, t in self.tensors.items() if _version(t) != self.versions[name]]
        if changed:
            raise RuntimeError(
                f"the policy's parameters ({', '.join(changed[:3])}...) changed in place after this distribution "
                "was built (e.g. an optimiser step); build a new one with policy(obs)"
            )

    def is_live(self) -> bool:
        """Whether the snapshot's tensors are the network's current ones (then run the network directly)."""
        self.check_unchanged()
        current = {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}
        return current.keys() == self.tensors.keys() and all(current[k] is t for k, t in self.tensors.items())

    def __call__(self, context: Tensor, inputs: Tensor) -> Tensor:
        """The network's plain ``forward(context, inputs)`` evaluated with the snapshot's tensors."""
        return functional_call(self.net, self.tensors, (context, inputs))

    def __setstate__(self, state: dict) -> None:  # unpickled tensors start new version counters
        self.__dict__.update(state)
        self.versions = {name: _version(t) for name, t in self.tensors.items()}

    def __deepcopy__(self, memo: dict) -> "ParameterSnapshot":
        new = ParameterSnapshot.__new__(ParameterSnapshot)
        new.net = self.net
        new.tensors = copy.deepcopy(self.tensors, memo)
        new.versions = {name: _version(t) for name, t in new.tensors.items()}
        return new


class _MomentsByMonteCarlo:
    """A flow's mean, variance and entropy have no closed form: each raises and names the estimate to use."""

    @property
    def mean(self) -> Tensor:
        raise NotImplementedError("a flow's mean has no closed form: estimate it with dist.sample((n,)).mean(0)")

    @property
    def variance(self) -> Tensor:
        raise NotImplementedError("a flow's variance has no closed form: estimate it with dist.sample((n,)).var(0)")

    def entropy(self) -> Tensor:
        raise NotImplementedError(
            "a flow's entropy has no closed form: estimate it with -dist.rsample_and_log_prob((n,))[1].mean(0)"
        )


class FlowMatchingDistribution(_MomentsByMonteCarlo, TorchDistribution):
    """Law of the flow's output x (module docstring) at ``obs [*B, O]``, clamped into the box when ``spec.clip``.

    ``log_prob`` is the exact discrete density of the Euler map (``method="euler"``) or the continuous-time density
    to the accuracy of the density solve (other methods). With ``spec.clip`` the law has atoms on the faces of
    the box and ``log_prob`` raises. ``rsample_and_log_prob`` gives both in one pass; with the Euler sampler,
    ``log_prob`` of the tensor the last ``rsample`` returned reuses its path (pyro's ``cache_size=1`` convention:
    no inversion, the same number and gradient).
    """

    arg_constraints = {"obs": constraints.real_vector}
    has_rsample = True

    def __init__(
        self,
        velocity_net: nn.Module | ParameterSnapshot,
        spec: FlowSpec,
        obs: Tensor,
        action_low: Tensor,
        action_high: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        self.snapshot = velocity_net if isinstance(velocity_net, ParameterSnapshot) else ParameterSnapshot(velocity_net)
        self.spec = spec
        self.obs = obs
        self.action_low = action_low
        self.action_high = action_high
        self._cache: tuple[Tensor, list[Tensor]] | None = None
        super().__init__(obs.shape[:-1], torch.Size([spec.action_dim]), validate_args=validate_args)

    def __getstate__(self) -> dict:  # the cached path may hold an autograd graph, which does not pickle
        return {**self.__dict__, "_cache": None}

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        if not self.spec.clip:
            return constraints.real_vector
        return constraints.independent(constraints.interval(self.action_low, self.action_high), 1)

    @classmethod
    def infer_shapes(cls, obs: torch.Size, action_low: torch.Size, **other_shapes):
        """``(batch_shape, event_shape)`` of ``FlowMatchingDistribution(net, spec, obs, action_low, ...)``:
        ``obs [*B, O]`` and ``action_low [A]`` give ``(B, (A,))``."""
        return torch.Size(obs[:-1]), torch.Size(action_low[-1:])

    def expand(
        self, batch_shape: torch.Size, _instance: "FlowMatchingDistribution | None" = None
    ) -> "FlowMatchingDistribution":
        new = self._get_checked_instance(FlowMatchingDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        new.snapshot = self.snapshot
        new.spec = self.spec
        new.obs = self.obs.expand(batch_shape + self.obs.shape[-1:])
        new.action_low, new.action_high = self.action_low, self.action_high
        new._cache = None
        super(FlowMatchingDistribution, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


    # ---------------------------------------------------------------------------------------------- sampling

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """Transport fresh N(0, I) noise of shape ``sample_shape + batch_shape + (A,)``; differentiable."""
        noise = torch.randn(self._extended_shape(sample_shape), dtype=self.obs.dtype, device=self.obs.device)
        if self.spec.method != "euler":  # log_prob solves back from the value; a cached path would solve forward
            return self._transport(noise, False)
        path: list[Tensor] = []
        value = self._transport(noise, False, path)
        self._cache = (value, path)
        return value

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def sample_particles(self, num_particles: int, generator: torch.Generator | None = None) -> Tensor:
        """``[*B, N, A]`` samples; the context is encoded once per state and shared by its particles."""
        shape = self.batch_shape + (num_particles,) + self.event_shape
        with torch.no_grad():
            noise = torch.randn(shape, generator=generator, dtype=self.obs.dtype, device=self.obs.device)
            return self._transport(noise, True)

    def _time_grid(self, start: float, end: float, steps: int | None = None) -> Tensor:
        steps = self.spec.num_steps if steps is None else steps
        return torch.linspace(start, end, steps + 1, dtype=self.obs.dtype, device=self.obs.device)

    def _velocity(self, per_particle: bool) -> tuple[Tensor, Callable[[Tensor, Tensor, Tensor], Tensor], bool]:
        """``(context, v(context, x, t), live)``: the network's encoded pass on its own parameters, or its plain
        ``forward`` through the snapshot (``obs`` broadcast against x) when the snapshot is not live. The
        context gets a particle axis when ``per_particle``."""
        net = self.snapshot.net
        if self.snapshot.is_live():
            def encoded_velocity(encoded: Tensor, x: Tensor, t: Tensor) -> Tensor:
                return net.forward_from_context(encoded, torch.cat([x, _time_column(t, x)], dim=-1))
            encoded = net.encode_context(self.obs)
            return encoded.unsqueeze(-2) if per_particle else encoded, encoded_velocity, True
        obs = self.obs.unsqueeze(-2) if per_particle else self.obs

        def snapshot_velocity(context: Tensor, x: Tensor, t: Tensor) -> Tensor:
            lead = fast.broadcast_lead(context.shape[:-1], x.shape[:-1])
            inputs = torch.cat([x, _time_column(t, x)], dim=-1).expand(*lead, x.shape[-1] + 1)
            return self.snapshot(context.expand(*lead, context.shape[-1]), inputs)
        return obs, snapshot_velocity, False

    def _transport(self, x: Tensor, per_particle: bool, path: list[Tensor] | None = None) -> Tensor:
        """The sampler applied to noise ``x`` (``[*S, *B, A]``, or ``[*B, N, A]`` when ``per_particle``); ``path``
        (when given) collects the Euler states x_0..x_{K-1}."""
        spec = self.spec
        context, velocity, live = self._velocity(per_particle)
        if spec.method == "euler":
            net = self.snapshot.net
            lead = fast.broadcast_lead(context.shape[:-1], x.shape[:-1])
            packed = fast.packed_program(net, x, math.prod(lead)) if live and path is None else None
            if packed is not None:
                x = self._euler_packed(x, context, lead, *packed)
            else:
                dt = 1.0 / spec.num_steps
                for t in self._time_grid(0.0, 1.0)[:-1]:
                    if path is not None:
                        path.append(x)
                    x = x.add(velocity(context, x, t), alpha=dt)
                    cost.count(reference_passes=math.prod(lead))
        else:
            field = partial(_ode_field, _counted(velocity), context)
            x = odeint(field, x, self._time_grid(0.0, 1.0), method=spec.method, **spec.ode_options)[-1]
        if spec.clip:
            x = torch.clamp(x, self.action_low, self.action_high)
        return x

    def _euler_packed(self, x: Tensor, encoded: Tensor, lead: torch.Size, inputs_weight_t: Tensor,
                      steps: list[tuple]) -> Tensor:
        """The Euler loop for a few rows (acting on one state) with the velocity network's oneDNN pass inlined.

        The first layer's input is [x, t]: its time part t_k w_t is added to the encoded state once per step,
        outside the loop, so a step is one small product for x, the packed ops, and the update (the same
        arithmetic as ``velocity_from_context``, up to the order of two additions)."""
        action_dim = x.shape[-1]
        dtype = inputs_weight_t.dtype
        rows, width = math.prod(lead), inputs_weight_t.shape[-1]
        dt = 1.0 / self.spec.num_steps
        times = self._time_grid(0.0, 1.0)[:-1].to(dtype)
        encoded = encoded.to(dtype)
        step_encodings = encoded + times.view(-1, *(1,) * encoded.dim()) * inputs_weight_t[action_dim]
        action_weight_t = inputs_weight_t[:action_dim]
        for encoded_t in step_encodings:
            hidden = encoded_t.expand(*lead, width).reshape(rows, width).addmm(
                x.expand(*lead, action_dim).reshape(rows, action_dim).to(dtype), action_weight_t)
            x = x.add(fast.run_packed_steps(steps, hidden).view(*lead, action_dim), alpha=dt)
            cost.count(reference_passes=rows)
        return x

    # ---------------------------------------------------------------------------------------------- density

    def _check_density(self) -> None:
        if torch.jit.is_tracing():
            raise NotImplementedError(
                "the flow's density takes Jacobians with torch.func, which torch.jit.trace cannot record "
                "(JitTrace_ELBO): use Trace_ELBO"
            )
        self.snapshot.check_unchanged()
        if self.spec.clip:
            raise NotImplementedError(
                "bound='clip' puts probability mass on the faces of the action box, so the law has no density: "
                "build the policy with bound='tanh' (a squashed flow with an exact density) or bound='none'"
            )

    def _rows(self, value: Tensor) -> tuple[torch.Size, Tensor, Tensor]:
        """``value [..., *B, A]`` and ``obs`` broadcast to one shape and flattened to rows ``[R, A]``, ``[R, O]``."""
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        rows = value.expand(shape + self.event_shape).reshape(-1, self.spec.action_dim)
        obs = self.obs.expand(shape + self.obs.shape[-1:]).reshape(-1, self.obs.shape[-1])
        return shape, rows, obs

    def log_prob(self, value: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """log p(value) for ``value [..., *B, A]`` (module docstring); ``generator`` draws Hutchinson probes.

        Each value is solved on its own (Newton per row, fixed density grid), so no value depends on the others
        in its batch (an adaptive ``density_method`` shares its step control across the batch)."""
        self._check_density()
        if self._validate_args:
            self._validate_sample(value)
        if self._cache is not None and value is self._cache[0]:
            return self._path_log_prob(value, self._cache[1])
        shape, rows, obs = self._rows(value)
        if self.spec.method == "euler":
            log_density = self._euler_log_prob(rows, obs)
        else:
            log_density = self._ode_log_prob(rows, obs, backward=True, generator=generator)[1]
        return log_density.reshape(shape)

    def rsample_and_log_prob(
        self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x, log p(x))`` from one pass: the log-determinants accumulate along the sampler's own path."""
        self._check_density()
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, dtype=self.obs.dtype, device=self.obs.device)
        _, rows, obs = self._rows(noise)
        if self.spec.method == "euler":
            x, log_det = self._euler_forward(rows, obs)
            log_density = _standard_normal_log_prob(rows) - log_det
        else:
            x, log_density = self._ode_log_prob(rows, obs, backward=False, generator=generator)
        return x.reshape(shape), log_density.reshape(shape[:-1])

    def _path_log_prob(self, value: Tensor, path: list[Tensor]) -> Tensor:
        """log p of the last Euler ``rsample``'s output from its recorded path x_0..x_{K-1}."""
        shape = value.shape[:-1]
        obs = self.obs.expand(shape + self.obs.shape[-1:]).reshape(-1, self.obs.shape[-1])
        rows = [x.reshape(-1, self.spec.action_dim) for x in path]
        times = self._time_grid(0.0, 1.0)[:-1]
        dt = 1.0 / self.spec.num_steps
        log_det = sum(_log_abs_det(self._jacobian(obs, x, t)[0], dt, k) for k, (x, t) in enumerate(zip(rows, times)))
        return (_standard_normal_log_prob(rows[0]) - log_det).reshape(shape)

    def _row_velocity(self, obs: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """v(s, x, t) for ONE row (``obs [O]``, ``x [A]``) through the network's plain forward, twice (a value and
        the auxiliary output ``jacfwd`` returns with its Jacobian)."""
        v = self.snapshot(obs, torch.cat([x, t.reshape(1).to(x)]))
        return v, v

    def _rows_velocity(self, obs: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """v(s, x, t) for rows ``obs [R, O]``, ``x [R, A]`` through the network's plain forward."""
        return self.snapshot(obs, torch.cat([x, _time_column(t, x)], dim=-1))

    def _jacobian(self, obs: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(dv/dx [R, A, A], v [R, A])`` per row by forward-mode differentiation (A tangents, vectorised)."""
        return vmap(jacfwd(self._row_velocity, argnums=1, has_aux=True), in_dims=(0, 0, None))(obs, x, t)

    def _euler_forward(self, x: Tensor, obs: Tensor) -> tuple[Tensor, Tensor]:
        """The Euler map on rows with sum_k log|det(I + dt dv/dx(x_k))| accumulated along the way."""
        dt = 1.0 / self.spec.num_steps
        log_det = x.new_zeros(x.shape[:-1])
        for k, t in enumerate(self._time_grid(0.0, 1.0)[:-1]):
            jacobian, v = self._jacobian(obs, x, t)
            log_det = log_det + _log_abs_det(jacobian, dt, k)
            x = x + dt * v
        return x, log_det

    def _euler_log_prob(self, y: Tensor, obs: Tensor) -> Tensor:
        """log p(x_K = y): invert the steps from the last to the first, summing their log-determinants.

        Step k is solved for x in x + dt v(s, x, t_k) = y by Newton's method without a graph, row by row (a row
        stops once its residual is below 64 eps |y|); one more Newton step with a graph, from the solution, then
        carries the implicit-function gradient dx/dy = (I + dt J)^-1, dx/dtheta = -(I + dt J)^-1 dt dv/dtheta."""
        dt = 1.0 / self.spec.num_steps
        eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
        tolerance = 64 * torch.finfo(y.dtype).eps
        differentiable = torch.is_grad_enabled()
        log_det = y.new_zeros(y.shape[:-1])
        times = self._time_grid(0.0, 1.0)[:-1]
        for k in reversed(range(self.spec.num_steps)):
            t = times[k]
            with torch.no_grad():
                target = y.detach()
                x = target - dt * self._rows_velocity(obs, target, t)
                done = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
                for _ in range(MAX_NEWTON_ITERATIONS):
                    jacobian, v = self._jacobian(obs, x, t)
                    residual = x + dt * v - target
                    done = done | (residual.abs().amax(-1) <= tolerance * (1 + target.abs().amax(-1)))
                    if done.all():
                        break
                    x = torch.where(done[:, None], x, x - torch.linalg.solve(eye + dt * jacobian, residual))
                else:
                    raise ValueError(
                        f"inverting Euler step {k} did not converge for {int((~done).sum())} of {len(done)} values: "
                        "the step is not injective there (dt Lip(v) >= 1); use more num_steps"
                    )
            if differentiable:
                x = x - torch.linalg.solve(eye + dt * jacobian, x + dt * self._rows_velocity(obs, x, t) - y)
                jacobian = self._jacobian(obs, x, t)[0]
            log_det = log_det + _log_abs_det(jacobian, dt, k)
            y = x
        return _standard_normal_log_prob(y) - log_det

    def _ode_log_prob(
        self, x: Tensor, obs: Tensor, backward: bool, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Solve the flow with its log-density: from x(1) = ``x`` back to t = 0 (``backward``), or from x(0) = ``x``
        forward; returns ``(x at the other end, log p(x(1)))``. d log p / dt = -div v, with div v the trace of
        the row Jacobian (``exact``) or probe^T (dv/dx) probe for one Rademacher probe per row held along the
        path (``hutchinson``), both by forward-mode differentiation."""
        spec = self.spec
        probe = None
        if spec.divergence == "hutchinson":
            probe = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1

        def divergence(t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
            if probe is None:
                jacobian, v = self._jacobian(obs, x, t)
                return v, jacobian.diagonal(dim1=-2, dim2=-1).sum(-1)

            v, directional = jvp(lambda x: self._rows_velocity(obs, x, t), (x,), (probe,))
            return v, (directional * probe).sum(-1)

        def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            v, div = divergence(t, state[0])
            return v, -div

        grid = self._time_grid(1.0, 0.0, spec.density_steps) if backward else self._time_grid(0.0, 1.0,
                                                                                               spec.density_steps)
        start = (x, x.new_zeros(x.shape[:-1]))
        end, change = (y[-1] for y in odeint(dynamics, start, grid, method=spec.density_method, **spec.ode_options))
        if backward:  # change = int_1^0 -div dt = int_0^1 div dt
            return end, _standard_normal_log_prob(end) - change
        return end, _standard_normal_log_prob(x) + change


def _ode_field(velocity: Callable[[Tensor, Tensor, Tensor], Tensor], context: Tensor, t: Tensor, x: Tensor) -> Tensor:
    return velocity(context, x, t)


def _counted(velocity: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``velocity`` that adds its rows to the active cost meters as reference passes (`vgf_prob.cost`)."""

    def counted(context: Tensor, x: Tensor, t: Tensor) -> Tensor:
        v = velocity(context, x, t)
        cost.count(reference_passes=v.shape[:-1].numel())
        return v

    return counted


def _standard_normal_log_prob(x: Tensor) -> Tensor:
    return -0.5 * x.square().sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def _log_abs_det(jacobian: Tensor, dt: float, step: int) -> Tensor:
    """log|det(I + dt J)| per row; an orientation-reversing step (det <= 0) folds the Euler map, whose law then
    has no single-preimage density: that is an error, not a number."""
    eye = torch.eye(jacobian.shape[-1], dtype=jacobian.dtype, device=jacobian.device)
    sign, log_abs = torch.linalg.slogdet(eye + dt * jacobian)
    if not (sign > 0).all():
        raise ValueError(
            f"Euler step {step} is not invertible at {int((sign <= 0).sum())} value(s) (det(I + dt dv/dx) <= 0): "
            "the map folds there and has no density of this form; use more num_steps"
        )
    return log_abs


class SquashedFlowMatching(_MomentsByMonteCarlo, TransformedDistribution, TorchDistribution):
    """a = c + h tanh(z), z ~ the unbounded flow (``bound="tanh"``): c, h the box's center and half-width.

    log p(a) = log p_z(z) - sum_i log(h_i (1 - tanh(z_i)^2)) (pyro's ``TransformedDistribution``, transforms
    cached so that ``log_prob`` of a sample reuses its z). ``sample_particles`` squashes the flow's particles.
    """

    def __init__(self, flow: FlowMatchingDistribution, action_low: Tensor, action_high: Tensor,
                 validate_args: bool | None = None) -> None:
        center, half = _center_half(action_low, action_high)
        transforms = [TanhTransform(cache_size=1), AffineTransform(center, half, event_dim=1, cache_size=1)]
        super().__init__(flow, transforms, validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size, _instance: "SquashedFlowMatching | None" = None
    ) -> "SquashedFlowMatching":
        new = self._get_checked_instance(SquashedFlowMatching, _instance)
        return super().expand(batch_shape, _instance=new)

    @classmethod
    def infer_shapes(cls, **arg_shapes):
        raise NotImplementedError("the event shape is the policy's action_dim, not a function of argument shapes")


    def _squash(self, z: Tensor) -> Tensor:
        for transform in self.transforms:
            z = transform(z)
        return z

    def sample_particles(self, num_particles: int, generator: torch.Generator | None = None) -> Tensor:
        """``[*B, N, A]``: the flow's particles, squashed into the box."""
        return self._squash(self.base_dist.sample_particles(num_particles, generator=generator))

    def rsample_and_log_prob(
        self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(a, log p(a))`` from one pass of the flow plus the squash's log-determinant."""
        z, log_density = self.base_dist.rsample_and_log_prob(sample_shape, generator=generator)
        a = z
        for transform in self.transforms:
            squashed = transform(a)
            log_jacobian = transform.log_abs_det_jacobian(a, squashed)
            log_density = log_density - (log_jacobian.sum(-1) if log_jacobian.dim() > log_density.dim()
                                         else log_jacobian)
            a = squashed
        return a, log_density
