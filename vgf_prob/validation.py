"""One switch for validation and one for host reads, consulted where the checks happen (as ``pyro.validation_enabled``).

Validation is the checks of values: NaN/inf in particles, observations, batches and velocities, and the
distributions' argument checks. The switches also set torch's distribution-validation default while they
last (as pyro's do), so torch and pyro distributions follow them, and ``pyro.validation_enabled(False)``
turns vgf-prob's checks off too. vgf-prob does not read torch's default itself: torch turns it off for the
whole process the first time ``torch.compile`` runs.

    with vgf_prob.validation_enabled(False):     # no value checks inside the block
        ...

A check of a value reads it back to the host, which makes a GPU wait. ``host_reads(False)`` forbids every
read that vgf-prob can avoid: validation is off inside it, and a discrete solver no longer stops early once
every state has spent its budget (that test reads a flag). A training step wrapped in it reads nothing back
with step budgets known on the host, which CUDA graph capture needs:

    with vgf_prob.host_reads(False):
        agent.update(batch)

Reads that remain: per-state step budgets given as a tensor read their maximum (the loop's length) before a
discrete solve and their distinct values before an ODE solve; an adaptive ODE solver reads its error
estimates. Both switches are process-wide while a block lasts; ``enable_validation`` sets validation for
good. They replace the ``validate=`` and ``check_finite=`` arguments that functions took before.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch.distributions import Distribution

__all__ = ["enable_validation", "host_reads", "host_reads_allowed", "is_validation_enabled", "validation_enabled"]

_VALIDATION = True
_HOST_READS = True


def is_validation_enabled() -> bool:
    """Whether values are checked now: validation is on (here and in pyro) and host reads are allowed."""
    return _VALIDATION and _HOST_READS and _pyro_validation()


def host_reads_allowed() -> bool:
    """Whether vgf-prob may read device values back to the host now (False inside ``host_reads(False)``)."""
    return _HOST_READS


def enable_validation(enabled: bool = True) -> None:
    """Turn validation on or off for good (torch's distribution-validation default too, as pyro does)."""
    global _VALIDATION
    _check_bool("enable_validation", enabled)
    _VALIDATION = enabled
    Distribution.set_default_validate_args(enabled)


@contextmanager
def validation_enabled(enabled: bool = True) -> Iterator[None]:
    """Validation on or off inside the block (torch's distribution default with it), restored after it."""
    global _VALIDATION
    _check_bool("validation_enabled", enabled)
    previous, previous_torch = _VALIDATION, Distribution._validate_args
    _VALIDATION = enabled
    Distribution.set_default_validate_args(enabled and _HOST_READS)
    try:
        yield
    finally:
        _VALIDATION = previous
        Distribution.set_default_validate_args(previous_torch)


@contextmanager
def host_reads(allowed: bool) -> Iterator[None]:
    """Host reads allowed or forbidden inside the block (forbidden also turns validation off), restored after it."""
    global _HOST_READS
    _check_bool("host_reads", allowed)
    previous_reads, previous_validation = _HOST_READS, Distribution._validate_args
    _HOST_READS = allowed
    if not allowed:
        Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        _HOST_READS = previous_reads
        Distribution.set_default_validate_args(previous_validation)


def _pyro_validation() -> bool:
    """pyro's own switch (``pyro.validation_enabled``), read without importing pyro when nothing has yet."""
    util = sys.modules.get("pyro.distributions.util")
    return util is None or bool(util.is_validation_enabled())


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} takes True or False, got {value!r}")
