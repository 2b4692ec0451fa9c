"""Reference and result policies as pyro distributions (installed as ``vgf_prob.distributions``)."""

from .boltzmann import Boltzmann
from .flow_matching import FlowMatchingDistribution, FlowMatchingPolicy
from .gaussian import DiagonalNormal, GaussianPolicy
from .mixture import GaussianMixture, MixtureReference
from .networks import ConditionalMLP
from .particle import SELECTION_RULES, ParticlePolicy, TransportReport

__all__ = [
    "SELECTION_RULES",
    "Boltzmann",
    "ConditionalMLP",
    "DiagonalNormal",
    "FlowMatchingDistribution",
    "FlowMatchingPolicy",
    "GaussianMixture",
    "GaussianPolicy",
    "MixtureReference",
    "ParticlePolicy",
    "TransportReport",
]
