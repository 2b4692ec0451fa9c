"""vgf-prob: Value Gradient Flow, behaviour-regularised RL as budgeted optimal transport."""

from typing import TYPE_CHECKING

# Public names -> the submodule that defines them. They are imported on first access (PEP 562), so that
# `import vgf_prob` and the `vgf-prob` command's --help/--version do not pay for torch (about 1.5 s).
_EXPORTS = {
    "vgf_prob.budget": ("AllOf", "Budget", "DisplacementBudget", "SinkhornBudget", "StepBudget"),
    "vgf_prob.distributions.flow_matching": ("FlowMatchingPolicy",),  # the BC reference a drop-in user trains
    "vgf_prob.distributions.particle": ("ParticlePolicy", "TransportReport"),
    "vgf_prob.flows": (
        "AmortizedGradient", "Euler", "KernelSmoothedGradient", "ODESolver", "ParticleAdam", "SteinField",
        "ValueGradient",
    ),
    "vgf_prob.transport": ("BoxProjection", "ValueGradientFlow"),
    "vgf_prob.validation": (
        "enable_validation", "host_reads", "host_reads_allowed", "is_validation_enabled", "validation_enabled",
    ),
    "vgf_prob.values": (
        "CriticValue", "HeadAggregation", "NoActionGradientWarning", "as_value", "broadcast_observations", "eval_mode",
        "evaluate", "td_target",
    ),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    from vgf_prob.budget import AllOf, Budget, DisplacementBudget, SinkhornBudget, StepBudget
    from vgf_prob.distributions.flow_matching import FlowMatchingPolicy
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
    from vgf_prob.validation import (
        enable_validation,
        host_reads,
        host_reads_allowed,
        is_validation_enabled,
        validation_enabled,
    )
    from vgf_prob.values import (
        CriticValue,
        HeadAggregation,
        NoActionGradientWarning,
        as_value,
        broadcast_observations,
        eval_mode,
        evaluate,
        td_target,
    )


def __getattr__(name: str):
    """Import a public name's submodule on first access and cache the name here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'vgf_prob' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


__version__ = "0.1.0"

__all__ = [
    "AllOf",
    "AmortizedGradient",
    "BoxProjection",
    "Budget",
    "CriticValue",
    "DisplacementBudget",
    "Euler",
    "FlowMatchingPolicy",
    "HeadAggregation",
    "KernelSmoothedGradient",
    "NoActionGradientWarning",
    "ODESolver",
    "ParticleAdam",
    "ParticlePolicy",
    "SinkhornBudget",
    "SteinField",
    "StepBudget",
    "TransportReport",
    "ValueGradient",
    "ValueGradientFlow",
    "as_value",
    "broadcast_observations",
    "enable_validation",
    "eval_mode",
    "evaluate",
    "host_reads",
    "host_reads_allowed",
    "is_validation_enabled",
    "td_target",
    "validation_enabled",
]
