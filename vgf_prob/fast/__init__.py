"""The speed layer: hand-written passes for the library's networks, kept apart from the models.

A model that wants them describes its layers (`describe_layers`, returning a `Network`: the input part of
its first affine map and the layers after it as `Affine` / `LayerNorm` / `ReLU`); the passes read only
that description, never the model's class or parameter names. Whatever a pass cannot run falls back to
the model's own autograd forward with one warning saying why. One switch turns every pass off::

    with vgf_prob.fast.enabled(False):   # plain autograd everywhere (BC sampling included)
        ...

The passes (all numerically the same arithmetic as the plain modules, up to float rounding):

- `ensemble.particle_pass`: an ensemble critic's Q at particles, all heads in one batched product per
  layer, activations in reused buffers, and a hand-written backward to the particles only (no weight
  gradients, no autograd graph of the layers);
- `mlp.forward_without_graph`: a conditional MLP without autograd into reused buffers, or, for a few rows
  on CPU, oneDNN products with pre-packed weights (`packed`);
- `buffers.Workspace`: scratch tensors reused from call to call (CPU has no caching allocator; a fresh
  activation costs a page fault per 4 KiB);
- `graphs.CapturedStep`: a training step (e.g. ``agent.update(batch)`` inside ``vgf_prob.host_reads(False)``) captured as one
  CUDA graph, with `graphs.make_capturable` for its optimisers.

This package imports torch only; the models import it, never the other way round.
"""

from vgf_prob.fast.dispatch import (
    autocast_enabled,
    autocast_off,
    broadcast_lead,
    capturing,
    compute_dtype,
    enabled,
    is_enabled,
    set_enabled,
)
from vgf_prob.fast.ensemble import particle_pass
from vgf_prob.fast.graphs import CapturedStep, make_capturable
from vgf_prob.fast.layers import Affine, LayerNorm, Network, ReLU, Unsupported, describe
from vgf_prob.fast.mlp import forward_without_graph, packed_program
from vgf_prob.fast.packed import PACKED_MAX_ROWS, packed_linear_available, run_packed_steps

__all__ = [
    "PACKED_MAX_ROWS",
    "Affine",
    "CapturedStep",
    "LayerNorm",
    "Network",
    "ReLU",
    "Unsupported",
    "autocast_enabled",
    "autocast_off",
    "broadcast_lead",
    "capturing",
    "compute_dtype",
    "describe",
    "enabled",
    "forward_without_graph",
    "is_enabled",
    "make_capturable",
    "packed_linear_available",
    "packed_program",
    "particle_pass",
    "run_packed_steps",
    "set_enabled",
]
