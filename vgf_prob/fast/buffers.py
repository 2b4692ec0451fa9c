"""Reused scratch tensors and weights prepared once per parameter change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from vgf_prob.fast.dispatch import capturing


class Workspace:
    """Scratch tensors reused from call to call by the fast passes.

    ``get(name, shape, like)`` returns the tensor kept under ``name`` while shape, dtype and device match, and
    allocates a new one otherwise. On CPU a fresh activation-sized tensor costs a page fault per 4 KiB page
    (torch has no caching allocator there), which is a sizeable part of a flow step; reusing buffers removes
    that. A few shapes are kept per name (e.g. acting on one state and training on a batch alternate).
    """

    SHAPES_PER_NAME = 3

    def __init__(self) -> None:
        self._buffers: dict[str, list[Tensor]] = {}

    def get(self, name: str, shape: Sequence[int], like: Tensor) -> Tensor:
        shape = torch.Size(shape)
        kept = self._buffers.setdefault(name, [])
        for i, buffer in enumerate(kept):
            if buffer.shape == shape and buffer.dtype == like.dtype and buffer.device == like.device:
                if i:
                    kept.insert(0, kept.pop(i))
                return buffer
        with torch.inference_mode(False):  # a normal tensor even when first asked for inside inference mode
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        kept.insert(0, buffer)
        del kept[self.SHAPES_PER_NAME:]
        return buffer

    def clear(self) -> None:
        self._buffers.clear()


class Prepared:
    """Something derived from a set of tensors (casts, packed or folded weights), rebuilt only when one of
    them changed: another object, or an in-place update (optimiser steps bump a tensor's version). Inside a
    CUDA graph capture it is rebuilt at every call, so that the graph recomputes it on replay."""

    def __init__(self) -> None:
        self._cached: dict[Any, tuple[tuple, Any]] = {}

    def get(self, slot: Any, tensors: Sequence[Tensor], structure: Any, build: Callable[[], Any]) -> Any:
        key = (structure, *((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors))
        cached = self._cached.get(slot)
        if cached is None or cached[0] != key or capturing():
            with torch.no_grad(), torch.inference_mode(False):
                cached = self._cached[slot] = (key, build())
        return cached[1]


def cast(tensors: Sequence[Tensor | None], dtype: torch.dtype) -> list[Tensor | None]:
    """Detached copies in ``dtype`` (the tensors themselves, detached, where already in it)."""
    return [None if t is None else t.detach().to(dtype) for t in tensors]
