"""When a fast pass may run: the one switch, the compute dtype under autocast, and per-module pass state.

``enabled(False)`` (a context manager, process-wide while it lasts, as ``pyro.validation_enabled``) or
``set_enabled(False)`` turns every pass of `vgf_prob.fast` off: every network then runs its plain autograd
forward. ``is_enabled()`` is what the dispatch points ask.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

_ENABLED = True


def is_enabled() -> bool:
    """Whether the fast passes may run (the switch; default on)."""
    return _ENABLED


def set_enabled(flag: bool) -> None:
    """Turn every fast pass on or off for the process."""
    global _ENABLED
    if not isinstance(flag, bool):
        raise ValueError(f"vgf_prob.fast.set_enabled takes a bool, got {flag!r}")
    _ENABLED = flag


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """The fast passes on (``True``) or off (``False``) for the duration, restored afterwards."""
    previous = _ENABLED
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for device types autocast does not know (e.g. the
    ``meta`` device, on which a whole update can be traced without data)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def compute_dtype(like: Tensor, parameter_dtype: torch.dtype) -> torch.dtype:
    """The dtype a pass computes in: the autocast dtype when autocast is on for ``like``'s device and the
    parameters are float32 (bfloat16 products and activations, as autocast's own products give), else the
    parameters' dtype."""
    device_type = like.device.type
    if autocast_enabled(device_type) and parameter_dtype == torch.float32:
        return torch.get_autocast_dtype(device_type)
    return parameter_dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device_type``, or a no-op one when autocast is already off."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def broadcast_lead(a: Sequence[int], b: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes(a, b)`` for two shapes, in plain Python (the torch function goes through its
    reference implementation, tens of microseconds: a sizeable part of a small network's call)."""
    if a == b:
        return torch.Size(a)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
        out.append(y if x == 1 else x)
    return torch.Size(out)


def graph_needed(inputs: Sequence[Tensor], parameters: Sequence[Tensor]) -> bool:
    """Whether autograd would record a graph for a pass over ``inputs`` and ``parameters``."""
    return torch.is_grad_enabled() and (any(t.requires_grad for t in inputs) or any(p.requires_grad for p in parameters))


def capturing() -> bool:
    """Whether a CUDA graph is being captured: cached derived weights are then rebuilt inside the capture, so
    that a replay recomputes them from the parameters the captured optimiser step changed."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def state(owner: Any, kind: str, make: Callable[[], Any]) -> Any:
    """The pass state (buffers, cached weights) of kind ``kind`` for ``owner``, made on first use.

    Kept here, keyed weakly by the owner's identity: nothing lands on the model (copies and pickles of a
    model start without state; a deleted model frees its buffers)."""
    states = _STATES.get(owner)
    if states is None:
        states = _STATES[owner] = {}
    found = states.get(kind)
    if found is None:
        found = states[kind] = make()
    return found


def description(owner: Any) -> Any:
    """``owner.describe_layers()``, rebuilt only when the module tree changed: another submodule, another
    parameter object or another storage behind one (``.to()``), or a torch.compile. Building a description
    walks every layer (about 0.1 ms for the paper's critic); the check is a few microseconds."""
    cached = state(owner, "description", dict)
    key = _module_tree_key(owner)
    if cached.get("key") != key:
        cached["key"], cached["net"] = key, owner.describe_layers()
    return cached["net"]


def _module_tree_key(module: Any) -> tuple:
    key: list = []
    stack = [module]
    while stack:
        m = stack.pop()
        key += (id(m), m.__dict__.get("_compiled_call_impl") is not None)
        for p in m._parameters.values():
            key += (id(p), p.data_ptr()) if p is not None else (None,)
        stack.extend(m._modules.values())
    return tuple(key)


def warn_fallback(owner: Any, reason: str) -> None:
    """One warning per model and reason that a fast pass falls back to autograd."""
    warned = state(owner, "warned", set)
    if reason not in warned:
        warned.add(reason)
        warnings.warn(f"vgf_prob.fast: {type(owner).__name__} runs its autograd forward: {reason}", stacklevel=3)
