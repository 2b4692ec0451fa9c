"""Velocity fields and solvers for particle transport (installed as ``vgf_prob.flows``)."""

from .fields import (
    AmortizedGradient,
    KernelSmoothedGradient,
    SteinField,
    ValueGradient,
    VelocityField,
    action_gradient,
)
from .kernels import median_bandwidth, pairwise_sq_distances, rbf_kernel
from .solvers import ODE_METHODS, Constraint, Euler, ODESolver, ParticleAdam, SolveResult

__all__ = [
    "AmortizedGradient",
    "Constraint",
    "Euler",
    "KernelSmoothedGradient",
    "ODE_METHODS",
    "ODESolver",
    "ParticleAdam",
    "SolveResult",
    "SteinField",
    "ValueGradient",
    "VelocityField",
    "action_gradient",
    "median_bandwidth",
    "pairwise_sq_distances",
    "rbf_kernel",
]
