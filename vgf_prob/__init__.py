"""vgf-prob: Value Gradient Flow, behaviour-regularised RL as budgeted optimal transport."""

from vgf_prob.budget import AllOf, Budget, DisplacementBudget, SinkhornBudget, StepBudget
from vgf_prob.distributions.particle import ParticlePolicy, TransportReport
from vgf_prob.flows import (
    AmortizedGradient,
    Euler,
    KernelSmoothedGradient,
    ODESolver,
    ParticleAdam,
    SteinField,
    ValueGradient,
)
from vgf_prob.transport import BoxProjection, ValueGradientFlow
from vgf_prob.values import HeadAggregation, broadcast_observations

__version__ = "0.1.0"

__all__ = [
    "AllOf",
    "AmortizedGradient",
    "BoxProjection",
    "Budget",
    "DisplacementBudget",
    "Euler",
    "HeadAggregation",
    "KernelSmoothedGradient",
    "ODESolver",
    "ParticleAdam",
    "ParticlePolicy",
    "SinkhornBudget",
    "SteinField",
    "StepBudget",
    "TransportReport",
    "ValueGradient",
    "ValueGradientFlow",
    "broadcast_observations",
]
