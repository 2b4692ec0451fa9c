"""Values: the protocol the operator calls, adapters for critics written for other codebases, head aggregation.

**The protocol.** A value is any callable ``value(obs, actions)`` with obs ``[*B, O]`` (or None) and actions
``[*B, N, A]`` (N particles per state) that returns ``[*B, N]`` or ``[*B, N, H]`` (H critic heads). The
operator differentiates it with respect to the actions only: no graph is left on its parameters.

**Critics from other codebases** are usually written for matched rows instead. ``as_value(*critics)``
adapts them; the layout is found by shapes (``layout="auto"``) or named:

=============  =====================================================================  ======================
layout         what vgf-prob calls                                                    typical source
=============  =====================================================================  ======================
``rows``       ``critic(obs [M, O], actions [M, A])`` with M = B * N rows (obs        CORL / CleanRL critics:
               repeated per particle) -> ``[M]``, ``[M, 1]``, ``[M, H]`` or a tuple   ``torch.cat([s, a], 1)``
               or list of ``[M]`` / ``[M, 1]`` heads
``concat``     ``critic(torch.cat([obs, actions], -1) [M, O + A])`` -> as ``rows``       one-input critics
               (``critic(actions [M, A])`` when obs is None)                          (an MLP on the joint input)
``particles``  ``critic(obs [B, O], actions [B, N, A])`` -> ``[B, N]``, ``[B, N, H]``  critics that broadcast
               or a tuple of heads (the protocol itself)                              over particles already
``encoded``    ``critic.forward_from_encoding(critic.encode_obs(obs), actions)``     ``vgf_prob.rl.networks.
               with the state encoding computed once per batch of states, and       EnsembleCritic``
               `vgf_prob.fast`'s fused pass where it serves the critic
=============  =====================================================================  ======================

Several critics (twin or ensemble modules) become heads side by side: ``as_value(q1, q2)`` returns
``[*B, N, 2]``. ``HeadAggregation`` combines heads into one number per particle by ``mean`` or ``min``.
Inside a call the critic modules run in eval mode (`eval_mode`), so train-mode BatchNorm statistics are never
updated on particles. ``td_target`` builds r + discount * (1 - done) * V(s') in the reward's own shape.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from vgf_prob.flows.fields import action_gradient

ValueCallable = Callable[[Tensor | None, Tensor], Tensor]
AGGREGATIONS = ("mean", "min")
LAYOUTS = ("auto", "rows", "concat", "particles", "encoded")
# exception classes a critic raises on inputs of the wrong shape or dtype; re-raised with what vgf-prob passed
_SHAPE_ERRORS = (RuntimeError, TypeError, ValueError, IndexError)

__all__ = [
    "AGGREGATIONS",
    "LAYOUTS",
    "CriticValue",
    "HeadAggregation",
    "NoActionGradientWarning",
    "action_gradient",
    "as_value",
    "broadcast_observations",
    "eval_mode",
    "evaluate",
    "td_target",
]


class NoActionGradientWarning(UserWarning):
    """The value's output does not depend on the actions, so the flow's attraction term is zero."""


NO_GRADIENT_MESSAGE = (
    "the value gives no gradient to the actions (its output was computed without them, detached from them, or "
    "under torch.no_grad inside the value): the flow's attraction term is zero, and only the field's repulsion "
    "moves the particles. Return Q computed from the actions passed in, with autograd on"
)
_PROTOCOL_HINT = (
    "the protocol is value(obs [B, O], actions [B, N, A]) -> [B, N] or [B, N, heads]; a critic written for matched "
    "rows, critic(obs [M, O], actions [M, A]) -> [M] or [M, 1] (e.g. torch.cat([obs, actions], dim=1)), one "
    "returning a tuple of heads, or several critic modules: wrap them with vgf.as_value(critic, ...)"
)


def _shape(x: Tensor | None) -> str:
    return "None" if x is None else str(list(x.shape))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _reraise(err: Exception, message: str) -> None:
    """Raise ``err``'s class (when it takes one message) with ``message``, chained to ``err``."""
    if type(err) in _SHAPE_ERRORS:
        raise type(err)(message) from err
    raise err


# ---------------------------------------------------------------------------------------------- heads
class HeadAggregation:
    """Q(s, a) = mean_k Q_k(s, a) or min_k Q_k(s, a) over critic heads; a value without heads passes through.

    Also where vgf-prob first meets a user's value: a value that raises on the protocol's shapes is re-raised
    with the shapes passed and the adapter to use, and a value whose output does not depend on the actions
    it was handed for a gradient gets one `NoActionGradientWarning` (checked once per instance: the operator
    makes one per flow).
    """

    def __init__(self, value: ValueCallable, aggregation: str = "mean") -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown head aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
        self.value = value
        self.aggregation = aggregation
        self._gradient_checked = False

    def __call__(self, obs: Tensor | None, actions: Tensor) -> Tensor:
        try:
            q = self.value(obs, actions)
        except _SHAPE_ERRORS as err:
            if isinstance(self.value, CriticValue):  # its own message already names shapes and layouts
                raise
            _reraise(err, f"value(obs, actions) raised {type(err).__name__}: {_first_line(err)} (vgf-prob passed obs "
                          f"{_shape(obs)} and actions {_shape(actions)}); {_PROTOCOL_HINT}")
        if not isinstance(q, Tensor):
            raise TypeError(f"value(obs, actions) must return a tensor, got {type(q).__name__}; {_PROTOCOL_HINT}")
        if not self._gradient_checked and actions.requires_grad and torch.is_grad_enabled():
            self._gradient_checked = True
            if not _depends_on(q, actions):
                warnings.warn(NO_GRADIENT_MESSAGE, NoActionGradientWarning, stacklevel=2)
        particle_shape = actions.shape[:-1]
        if q.shape == particle_shape:
            return q
        if q.dim() == actions.dim() and q.shape[:-1] == particle_shape:
            return q.mean(-1) if self.aggregation == "mean" else q.amin(-1)
        raise ValueError(
            f"value(obs, actions) returned shape {tuple(q.shape)} for actions {tuple(actions.shape)}; expected "
            f"{tuple(particle_shape)} or {tuple(particle_shape)} + (heads,); {_PROTOCOL_HINT}"
        )


def _depends_on(output: Tensor, inputs: Tensor) -> bool:
    """Whether autograd can reach ``inputs`` from ``output`` (a walk of the graph, no backward pass)."""
    if not output.requires_grad:
        return False
    target = inputs.grad_fn
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        reached = node is target if target is not None else getattr(node, "variable", None) is inputs
        if reached:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def evaluate(value: ValueCallable, obs: Tensor | None, actions: Tensor, aggregation: str = "mean") -> Tensor:
    """Q of every particle with heads combined by ``aggregation``, ``[*B, N]``, without building a graph."""
    with torch.no_grad():
        return HeadAggregation(value, aggregation)(obs, actions)


def broadcast_observations(critic: Callable[[Tensor, Tensor], Tensor]) -> ValueCallable:
    """Adapt ``critic(obs [..., O], actions [..., A])`` (any matching leading dims) by expanding obs over
    particles. ``as_value`` covers this and the critics that need flat ``[M, O]`` rows."""

    def value(obs: Tensor | None, actions: Tensor) -> Tensor:
        if obs is None:
            raise ValueError("broadcast_observations needs observations; got obs=None")
        expanded = obs.unsqueeze(-2).expand(*actions.shape[:-1], obs.shape[-1])
        return critic(expanded, actions)

    return value


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode inside the block, each back in its own mode after it.

    A flow calls the critic on particles, not on data: in train mode BatchNorm would add the particles to its
    running statistics (and refuse a batch of one row), and dropout would make the value gradient noise.
    """
    switched = [m for module in modules for m in module.modules() if m.training]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True


def td_target(reward: Tensor, next_value: Tensor, *, discount: float | Tensor, done: Tensor | float | None = None,
              not_done: Tensor | float | None = None) -> Tensor:
    """y = r + discount * (1 - done) * V(s'), in the reward's shape.

    ``next_value`` is ``flow.next_value(...)``'s ``[*B]`` (or ``[*B, 1]``); ``reward`` and the termination
    mask (exactly one of ``done`` and ``not_done`` = 1 - done, a tensor or a number) are ``[*B]`` or ``[*B, 1]``,
    as codebases keep them. The plain expression ``reward + not_done * discount * next_value`` silently
    broadcasts ``[B, 1]`` against ``[B]`` to ``[B, B]``; here any other shape is refused by name.
    """
    if (done is None) == (not_done is None):
        raise ValueError("td_target takes exactly one of done= (1 where the episode terminated) and "
                         "not_done= (1 - done)")
    lead = next_value.shape[:-1] if next_value.dim() > 1 and next_value.shape[-1] == 1 else next_value.shape
    if not isinstance(reward, Tensor) or reward.dim() == 0:
        raise TypeError(f"td_target: reward must be a tensor [*B] or [*B, 1], got {type(reward).__name__}")
    allowed = (tuple(lead), (*lead, 1))
    mask_name, mask = ("done", done) if done is not None else ("not_done", not_done)
    for name, tensor in (("reward", reward), (mask_name, mask), ("discount", discount)):
        if not isinstance(tensor, (Tensor, numbers.Real)):
            raise TypeError(f"td_target: {name} must be a tensor or a number, got {type(tensor).__name__}")
        if isinstance(tensor, Tensor) and tensor.dim() > 0 and tuple(tensor.shape) not in allowed:
            raise ValueError(f"td_target: {name} has shape {list(tensor.shape)} but next_value has "
                             f"{list(next_value.shape)}; expected {list(allowed[0])} or {list(allowed[1])} (one number per state)")
    if isinstance(mask, Tensor):
        mask = mask.reshape(reward.shape) if mask.dim() > 0 else mask
        mask = mask.to(reward.dtype) if not mask.is_floating_point() else mask
    if isinstance(discount, Tensor) and discount.dim() > 0:
        discount = discount.reshape(reward.shape)
    keep = 1 - mask if done is not None else mask
    return reward + discount * keep * next_value.reshape(reward.shape)


# ---------------------------------------------------------------------------------------------- adapters
def as_value(*critics: Callable[..., object], layout: str = "auto") -> CriticValue:
    """A protocol value from one or several critics of another codebase (see the module docstring).

    ``layout="auto"`` takes ``encoded`` when every critic has ``encode_obs`` and ``forward_from_encoding``, and
    ``concat`` when every critic's signature takes one positional argument; otherwise the first call with two
    distinct states decides by a probe on two of them: ``particles`` when each critic accepts the particle layout
    and agrees with ``rows`` on the probe, else ``rows`` (correct for every critic that takes matched rows). Pass
    ``layout`` to skip the probe. A critic whose signature cannot take the layout's arguments is refused here.
    """
    return CriticValue(*critics, layout=layout)


class CriticValue:
    """value(obs [*B, O], actions [*B, N, A]) -> [*B, N] (one head) or [*B, N, H] from critics in a named layout.

    Inputs are cast to the first critic module's floating dtype when they differ (the cast is differentiable,
    and the result is returned in the actions' dtype), and rejected with a named error when they sit on
    another device. The critic modules run in eval mode during a call and get their modes back after it, so
    BatchNorm running statistics never see particles. In the ``encoded`` layout the critic's parameters get no
    gradient; call the critic itself for its training loss.
    """

    def __init__(self, *critics: Callable[..., object], layout: str = "auto") -> None:
        if not critics:
            raise ValueError("as_value needs at least one critic")
        for index, critic in enumerate(critics):
            if not callable(critic):
                raise TypeError(f"critic {index} is not callable: {type(critic).__name__}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        encodable = all(_has_encoding(critic) for critic in critics)
        if layout == "encoded" and not encodable:
            raise ValueError("layout 'encoded' needs critics with encode_obs(obs) and forward_from_encoding(encoded, actions)")
        self.critics = critics
        arities = [_positional_arity(critic) for critic in critics]
        if layout == "auto" and not encodable and all(a is not None and a[1] == 1 for a in arities):
            layout = "concat"
        self.layout: str | None = "encoded" if layout == "auto" and encodable else (None if layout == "auto" else layout)
        if self.layout != "encoded":
            for index, arity in enumerate(arities):
                _check_arity(self._name(index), arity, self.layout or "auto")
        self.modules = [module for critic in critics if (module := _module_of(critic)) is not None]
        self._encodings: dict[int, tuple[Tensor, int, tuple[int, ...], Tensor, ValueCallable]] = {}

    def __repr__(self) -> str:
        names = ", ".join(type(c).__name__ if isinstance(c, nn.Module) else getattr(c, "__qualname__", repr(c))
                          for c in self.critics)
        return f"CriticValue({names}, layout={self.layout or 'auto (undecided)'!r})"

    def __call__(self, obs: Tensor | None, actions: Tensor) -> Tensor:
        if actions.dim() < 2:
            raise ValueError(f"actions must have shape [*B, N, A]; got {_shape(actions)}")
        obs_in, actions_in = self._match(obs, actions)
        with eval_mode(*self.modules):
            layout = self.layout if self.layout is not None else self._decide(obs_in, actions_in)
            return self._values(layout, obs_in, actions_in).to(actions.dtype)

    # -------------------------------------------------------------------- matching dtype and device
    def _match(self, obs: Tensor | None, actions: Tensor) -> tuple[Tensor | None, Tensor]:
        if obs is not None and obs.device != actions.device:
            raise ValueError(f"obs are on {obs.device} but the actions on {actions.device}; put both on one device")
        for module in self.modules:
            parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
            if parameter is None:
                continue
            if parameter.device != actions.device:
                raise ValueError(
                    f"the critic {type(module).__name__} has its parameters on {parameter.device} but the actions "
                    f"are on {actions.device}; move the critic (critic.to(device)) or the data to one device"
                )
            dtype = parameter.dtype
            if actions.is_floating_point() and actions.dtype != dtype:
                actions = actions.to(dtype)
            if obs is not None and obs.is_floating_point() and obs.dtype != dtype:
                obs = obs.to(dtype)
            break
        return obs, actions

    # -------------------------------------------------------------------- layouts
    def _values(self, layout: str, obs: Tensor | None, actions: Tensor) -> Tensor:
        lead = actions.shape[:-1]
        if layout in ("rows", "concat"):
            rows = lead.numel()
            args = (None if obs is None else obs.unsqueeze(-2).expand(*lead, obs.shape[-1]).reshape(rows, -1),
                    actions.reshape(rows, actions.shape[-1]))
            if layout == "concat":
                args = (args[1] if args[0] is None else torch.cat(args, dim=-1),)
            out_lead = torch.Size([rows])
        elif layout == "particles":
            args, out_lead = (obs, actions), lead
        else:
            if obs is None:
                raise ValueError("layout 'encoded' needs observations; got obs=None")
            args = (obs.reshape(-1, obs.shape[-1]), actions.reshape(-1, *actions.shape[-2:]))
            out_lead = args[1].shape[:-1]
        heads = []
        for index, critic in enumerate(self.critics):
            try:
                if layout == "encoded":
                    encoded, at_particles = self._encoding(index, critic, args[0])
                    out = at_particles(encoded, args[1])
                else:
                    out = critic(*args)
            except _SHAPE_ERRORS as err:
                _reraise(err, self._call_error(index, layout, args, err))
            heads.append(_as_heads(out, out_lead, self._name(index), layout, _described(layout, args)))
        q = torch.cat(heads, dim=-1) if len(heads) > 1 else heads[0]
        q = q.reshape(*lead, q.shape[-1])
        return q.squeeze(-1) if q.shape[-1] == 1 else q

    def _encoding(self, index: int, critic, obs: Tensor) -> tuple[Tensor, ValueCallable]:
        """``critic.encode_obs(obs)`` without a graph and the pass that reads it (`vgf_prob.fast.particle_pass`
        where it serves the critic, else ``critic.forward_from_encoding``), reused while obs (the same tensor,
        not modified in place) and the critic's parameters are unchanged: once per flow, not once per step."""
        from vgf_prob import fast

        versions = tuple(p._version for p in critic.parameters()) if isinstance(critic, nn.Module) else ()
        cached = self._encodings.get(index)
        if cached is not None and cached[0] is obs and cached[1] == obs._version and cached[2] == versions:
            return cached[3], cached[4]
        with torch.no_grad():
            encoded = critic.encode_obs(obs)
        at_particles = fast.particle_pass(critic) or critic.forward_from_encoding
        self._encodings[index] = (obs, obs._version, versions, encoded, at_particles)
        return encoded, at_particles

    def _decide(self, obs: Tensor | None, actions: Tensor) -> str:
        """Probe two distinct states with two particles each in both layouts; keep 'particles' only when it
        agrees with 'rows' (a critic that pairs state b with particle b instead of every particle of state b
        agrees in shape exactly when B == N, so the probe has B == N == 2 and compares values)."""
        probe = _probe(obs, actions)
        if probe is None:  # one state (or all states equal) so far: rows is right; decide on a later call
            return "rows"
        results: dict[str, Tensor | Exception] = {}
        with torch.no_grad():
            for layout in ("rows", "particles"):
                try:
                    results[layout] = self._values(layout, *probe)
                except Exception as err:  # noqa: BLE001 - a probe: the critic's own error is reported below
                    results[layout] = err
        rows, particles = results["rows"], results["particles"]
        if isinstance(rows, Exception) and isinstance(particles, Exception):
            raise ValueError(
                f"{self._name(0)} fails in both layouts vgf-prob tries: as matched rows (obs {_shape(probe[0])} -> "
                f"[M, O], actions [M, A]) it raised {_first_line(rows)}; with particles (obs {_shape(probe[0])}, "
                f"actions {_shape(probe[1])}) it raised {_first_line(particles)}. Expected critic(obs [M, O], "
                "actions [M, A]) -> [M], [M, 1], [M, H] or a tuple of heads, or critic(obs [B, O], actions [B, N, A]) "
                "-> [B, N] or [B, N, H]"
            ) from rows
        if isinstance(rows, Exception):
            self.layout = "particles"
        elif isinstance(particles, Exception) or particles.shape != rows.shape:
            self.layout = "rows"
        else:
            eps = torch.finfo(rows.dtype).eps if rows.is_floating_point() else 0.0
            tolerance = max(1e-4, 64 * eps) * (1.0 + float(rows.abs().max()))
            self.layout = "particles" if bool(((particles - rows).abs() <= tolerance).all()) else "rows"
        return self.layout

    # -------------------------------------------------------------------- messages
    def _name(self, index: int) -> str:
        critic = self.critics[index]
        name = type(critic).__name__ if isinstance(critic, nn.Module) else getattr(critic, "__qualname__", "critic")
        return f"critic {index} ({name})" if len(self.critics) > 1 else f"the critic ({name})"

    def _call_error(self, index: int, layout: str, args: Sequence[Tensor | None], err: Exception) -> str:
        passed = _described(layout, args) + {
            "rows": ": matched rows, B * N of them", "concat": ": one input, obs and actions joined per row",
            "particles": ": particles [B, N, A]", "encoded": ""}[layout]
        hint = {
            "rows": "a critic that takes obs [B, O] with actions [B, N, A] needs as_value(critic, layout='particles')",
            "concat": "a critic that takes (obs, actions) needs as_value(critic, layout='rows') (or layout='auto')",
            "particles": "a critic written for matched rows (torch.cat([obs, actions], dim=1)) needs "
                         "as_value(critic, layout='rows') (or layout='auto')",
            "encoded": "a critic whose encode_obs/forward_from_encoding differ from vgf_prob.rl.networks.EnsembleCritic's "
                       "needs as_value(critic, layout='rows')",
        }[layout]
        return f"{self._name(index)} raised {type(err).__name__}: {_first_line(err)} (vgf-prob called {passed}); {hint}"


def _module_of(critic) -> nn.Module | None:
    """The module behind a critic: itself, or the module of a bound method such as ``twin_q.both``."""
    if isinstance(critic, nn.Module):
        return critic
    owner = getattr(critic, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _has_encoding(critic) -> bool:
    return callable(getattr(critic, "encode_obs", None)) and callable(getattr(critic, "forward_from_encoding", None))


def _described(layout: str, args: Sequence[Tensor | None]) -> str:
    """The call vgf-prob made, with the shapes it passed."""
    if layout == "concat":
        return f"critic(inputs {_shape(args[0])})"
    if layout == "encoded":
        return f"critic.forward_from_encoding(critic.encode_obs(obs {_shape(args[0])}), actions {_shape(args[1])})"
    return f"critic(obs {_shape(args[0])}, actions {_shape(args[1])})"


def _positional_arity(critic) -> tuple[int, float] | None:
    """(required, most) positional arguments of ``critic`` (a module's ``forward``), or None when unknown."""
    try:
        signature = inspect.signature(critic.forward if isinstance(critic, nn.Module) else critic)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in signature.parameters.values() if p.kind in kinds]
    required = sum(p.default is inspect.Parameter.empty for p in positional)
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values())
    return required, math.inf if variadic else len(positional)


def _check_arity(name: str, arity: tuple[int, float] | None, layout: str) -> None:
    """A TypeError naming the fix when ``layout`` calls the critic with a number of arguments it cannot take."""
    count = 1 if layout == "concat" else 2
    if arity is None or arity[0] <= count <= arity[1]:
        return
    takes = f"{arity[0]}" if arity[0] == arity[1] else f"{arity[0]} to {arity[1]}"
    if arity[1] == 1:
        fix = ("a critic on one joined input, critic(torch.cat([obs, actions], -1)), takes as_value(critic, "
               "layout='concat'); a state-value network V(obs) (IQL's) cannot drive the flow, which needs Q(obs, "
               "actions): train V with its own target and pass the Q network")
    elif layout == "concat":
        fix = "a critic(obs, actions) takes as_value(critic, layout='rows') (or layout='auto')"
    else:
        fix = "wrap it so that it takes (obs, actions), e.g. lambda obs, actions: critic(obs, actions, ...)"
    raise TypeError(f"{name} takes {takes} positional argument(s), but layout '{layout}' calls it with {count} "
                    f"({'the joined input' if count == 1 else 'obs, actions'}); {fix}")


def _as_heads(out: object, lead: torch.Size, name: str, layout: str, called: str) -> Tensor:
    """One critic's output as ``[*lead, h]``: a tensor ``lead``, ``lead + (1,)`` or ``lead + (h,)``, or a
    tuple/list of tensors ``lead`` or ``lead + (1,)`` (one head each)."""
    if isinstance(out, Tensor):
        if out.shape == lead:
            return out.unsqueeze(-1)
        if out.dim() == len(lead) + 1 and out.shape[:-1] == lead:
            return out
    elif isinstance(out, (tuple, list)) and out and all(isinstance(h, Tensor) for h in out):
        if all(h.shape == lead or h.shape == lead + (1,) for h in out):
            return torch.stack([h.reshape(lead) for h in out], dim=-1)
    got = (f"a {type(out).__name__} of shapes {[list(h.shape) if isinstance(h, Tensor) else type(h).__name__ for h in out]}"
           if isinstance(out, (tuple, list)) else _shape(out) if isinstance(out, Tensor) else type(out).__name__)
    want = list(lead)
    raise ValueError(
        f"{name} returned {got} for {called} (layout '{layout}'); expected "
        f"{want}, {want + [1]}, {want + ['heads']} or a tuple/list of {want} or {want + [1]} heads"
    )


def _probe(obs: Tensor | None, actions: Tensor) -> tuple[Tensor | None, Tensor] | None:
    """Two distinct states with two particles each (obs ``[2, O]``, actions ``[2, 2, A]``), or None."""
    flat_actions = actions.reshape(-1, *actions.shape[-2:])
    pick = torch.tensor([0, min(1, flat_actions.shape[-2] - 1)], device=actions.device)
    if obs is None:
        states = flat_actions[:2]
        return None if states.shape[0] < 2 else (None, states.index_select(-2, pick))
    flat_obs = obs.reshape(-1, obs.shape[-1])
    differs = (flat_obs != flat_obs[:1]).flatten(1).any(-1).nonzero()
    if differs.numel() == 0:
        return None
    other = int(differs[0, 0])
    states = torch.tensor([0, other], device=actions.device)
    return flat_obs.index_select(0, states), flat_actions.index_select(0, states).index_select(-2, pick)
