"""The value-function protocol and head aggregation.

A value is any callable ``value(obs, actions)`` with obs ``[B, O]`` (one observation per state, or None)
and actions ``[B, N, A]`` (N particles per state) that returns ``[B, N]`` or ``[B, N, H]`` (H critic
heads). ``HeadAggregation`` combines heads into one number per particle by ``mean`` or ``min``. A critic
written for matched leading dims, ``critic(obs [..., O], actions [..., A])``, is adapted by
``broadcast_observations``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from vgf_prob.flows.fields import action_gradient

ValueCallable = Callable[[Tensor | None, Tensor], Tensor]
AGGREGATIONS = ("mean", "min")

__all__ = ["AGGREGATIONS", "HeadAggregation", "action_gradient", "broadcast_observations", "evaluate"]


class HeadAggregation:
    """Q(s, a) = mean_k Q_k(s, a) or min_k Q_k(s, a) over critic heads; a value without heads passes through."""

    def __init__(self, value: ValueCallable, aggregation: str = "mean") -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown head aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
        self.value = value
        self.aggregation = aggregation

    def __call__(self, obs: Tensor | None, actions: Tensor) -> Tensor:
        q = self.value(obs, actions)
        particle_shape = actions.shape[:-1]
        if q.shape == particle_shape:
            return q
        if q.dim() == actions.dim() and q.shape[:-1] == particle_shape:
            return q.mean(-1) if self.aggregation == "mean" else q.amin(-1)
        raise ValueError(
            f"value(obs, actions) returned shape {tuple(q.shape)} for actions {tuple(actions.shape)}; expected "
            f"{tuple(particle_shape)} or {tuple(particle_shape)} + (heads,). A critic that needs obs and actions "
            "with matching leading dims can be wrapped with vgf_prob.values.broadcast_observations"
        )


def broadcast_observations(critic: Callable[[Tensor, Tensor], Tensor]) -> ValueCallable:
    """Adapt ``critic(obs [..., O], actions [..., A])`` to the protocol by expanding obs over particles."""

    def value(obs: Tensor | None, actions: Tensor) -> Tensor:
        if obs is None:
            raise ValueError("broadcast_observations needs observations; got obs=None")
        expanded = obs.unsqueeze(-2).expand(*actions.shape[:-1], obs.shape[-1])
        return critic(expanded, actions)

    return value


def evaluate(value: ValueCallable, obs: Tensor | None, actions: Tensor, aggregation: str = "mean") -> Tensor:
    """Aggregated Q of every particle, [B, N], without building a graph."""
    with torch.no_grad():
        return HeadAggregation(value, aggregation)(obs, actions)
