"""A training step captured as one CUDA graph: the whole update replayed with one launch.

Requirements, all met by ``VGFAgent.update(batch)`` inside ``vgf_prob.host_reads(False)`` (the meta-device and host-read
tests pin the last two): static shapes; Adam with ``capturable=True`` (its step counters on the device);
no host reads and no host-to-device copies of Python data inside the step. The fast passes rebuild their
cached derived weights inside a capture (`vgf_prob.fast.buffers.Prepared`), so that a replay recomputes
them from the parameters the captured optimiser step changed. Random draws use the default CUDA generator,
which graphs replay safely (a ``torch.Generator`` passed to the step would have to be registered with
the graph).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def make_capturable(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Set ``capturable=True`` on every param group (before the optimisers' first step, so that their state,
    the step counters included, is created on the parameters' device)."""
    for optimizer in optimizers:
        if any(optimizer.state.values()):
            raise ValueError("make_capturable must run before the optimiser's first step (its state exists already)")
        for group in optimizer.param_groups:
            if "capturable" not in group:
                raise ValueError(f"{type(optimizer).__name__} has no capturable option")
            group["capturable"] = True


class CapturedStep:
    """``step(inputs) -> outputs`` (a mapping of tensors to anything holding tensors) captured once as a CUDA
    graph after ``warmup`` eager calls on a side stream; calling it copies new inputs into the static ones
    and replays the graph. The returned outputs are the graph's static tensors (overwritten by the next
    replay: copy what must be kept)."""

    def __init__(self, step: Callable[[Mapping[str, Tensor]], Any], example: Mapping[str, Tensor],
                 warmup: int = 3) -> None:
        if not all(t.is_cuda for t in example.values()):
            raise ValueError("CapturedStep needs its example inputs on a CUDA device")
        self.static = {key: value.clone() for key, value in example.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step(self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(self.static)

    def __call__(self, inputs: Mapping[str, Tensor]) -> Any:
        for key, value in inputs.items():
            if value.data_ptr() != self.static[key].data_ptr():
                self.static[key].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.outputs
