"""Reference and result policies as pyro distributions (installed as ``vgf_prob.distributions``)."""

from .particle import SELECTION_RULES, ParticlePolicy, TransportReport

__all__ = ["SELECTION_RULES", "ParticlePolicy", "TransportReport"]
