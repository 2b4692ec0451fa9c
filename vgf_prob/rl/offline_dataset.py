"""`OfflineDataset`: the one transition store used by every offline and offline-to-online RL loop.

Conventions (shared by every loader in `vgf_prob.rl.data`):

- one row per transition ``(s, a, r, s')``; every array is float32 and on one device;
- ``masks[i] = 1 - (s' is a true terminal state)``: a Bellman target bootstraps as
  ``r + discount * mask * V(s')``; a time-limit truncation is *not* terminal (mask 1);
- optional ``terminals[i] = 1`` at the last stored transition of each trajectory, whatever ended it
  (termination, time limit, end of file): the FQL/OGBench meaning, used to count episodes;
- optional ``timeouts[i] = 1`` where that trajectory ended by a time limit rather than a termination;
- actions are clipped to ``[-action_bound, action_bound]`` (default 1: the action box of every agent).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray
REQUIRED_KEYS = ("observations", "actions", "rewards", "next_observations", "masks")
FLAG_KEYS = ("terminals", "timeouts")
# Actions further than this outside the box trigger a warning before clipping (D4RL stores +-1 exactly).
_CLIP_WARN_TOL = 1e-3


class OfflineDataset:
    """A fixed-schema store of transitions ``(s, a, r, s', mask)`` with seeded uniform minibatch sampling.

    Fields are read-only views of ``[T, ...]`` float32 tensors: ``observations [T, O]``, ``actions [T, A]``,
    ``rewards [T]``, ``next_observations [T, O]``, ``masks [T]`` and, when given, ``terminals [T]`` and
    ``timeouts [T]`` (see the module docstring for their meaning). The only mutation is `append`, which
    adds transitions in amortised O(1) per row (capacity doubles), for offline-to-online fine-tuning.

    Validation happens before anything is stored: missing or unknown keys, wrong ranks, length or
    dimension mismatches, NaN/inf values, masks/flags outside [0, 1] and, with ``expected_action_dim``,
    a wrong action dimension all raise ``ValueError`` naming the key.
    """

    def __init__(
        self,
        data: Mapping[str, ArrayLike],
        *,
        device: torch.device | str | None = None,
        expected_action_dim: int | None = None,
        action_bound: float = 1.0,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not action_bound > 0:
            raise ValueError(f"action_bound must be positive, got {action_bound}")
        if device is None:
            obs = data.get("observations")
            device = obs.device if isinstance(obs, Tensor) else "cpu"
        tensors = _validate(data, expected_action_dim=expected_action_dim)
        if len(tensors["rewards"]) == 0:
            raise ValueError("an OfflineDataset needs at least one transition, got 0")
        self._device = torch.device(device)
        self._action_bound = float(action_bound)
        self._storage = {k: v.to(self._device) for k, v in tensors.items()}
        self._storage["actions"] = self._clip_actions(self._storage["actions"])
        self._size = len(tensors["rewards"])
        self.metadata: dict[str, Any] = dict(metadata or {})

    # ------------------------------------------------------------------ fields
    @property
    def observations(self) -> Tensor:
        return self._storage["observations"][: self._size]

    @property
    def actions(self) -> Tensor:
        return self._storage["actions"][: self._size]

    @property
    def rewards(self) -> Tensor:
        return self._storage["rewards"][: self._size]

    @property
    def next_observations(self) -> Tensor:
        return self._storage["next_observations"][: self._size]

    @property
    def masks(self) -> Tensor:
        return self._storage["masks"][: self._size]

    @property
    def terminals(self) -> Tensor | None:
        return self._storage["terminals"][: self._size] if "terminals" in self._storage else None

    @property
    def timeouts(self) -> Tensor | None:
        return self._storage["timeouts"][: self._size] if "timeouts" in self._storage else None

    @property
    def keys(self) -> tuple[str, ...]:
        """The stored fields, required ones first."""
        return REQUIRED_KEYS + tuple(k for k in FLAG_KEYS if k in self._storage)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def action_bound(self) -> float:
        return self._action_bound

    @property
    def obs_dim(self) -> int:
        return self._storage["observations"].shape[1]

    @property
    def action_dim(self) -> int:
        return self._storage["actions"].shape[1]

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"OfflineDataset(size={self._size}, obs_dim={self.obs_dim}, action_dim={self.action_dim}, "
            f"keys={list(self.keys)}, device={self._device})"
        )

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draw ``batch_size`` transitions uniformly with replacement.

        Indices come from ``torch.randint`` on the dataset's device with ``generator`` (which must live on
        that device), so a seeded generator gives the same batch on every run. Returns a dict with every
        stored field, each ``[batch_size, ...]``.
        """
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if generator is not None and generator.device.type != self._device.type:
            raise ValueError(
                f"generator lives on {generator.device} but the dataset on {self._device}; "
                f"create it with torch.Generator(device={str(self._device)!r})"
            )
        idx = torch.randint(0, self._size, (batch_size,), generator=generator, device=self._device)
        return {k: self._storage[k].index_select(0, idx) for k in self.keys}

    # ------------------------------------------------------------------ growth
    def append(self, transitions: Mapping[str, ArrayLike]) -> None:
        """Append transitions in place (offline-to-online fine-tuning).

        ``transitions`` holds the required keys, either as one transition (``observations [O]``,
        ``rewards []``) or as a batch (``[n, O]``, ``[n]``). Flags this dataset stores but the batch
        omits are filled with 0; a flag this dataset does not store is an error. Actions are clipped
        like the constructor's. The batch is validated in full before anything is written; storage
        grows by doubling, so appending one transition at a time costs amortised O(1) copies.
        """
        unknown = sorted(set(transitions) - set(self.keys))
        if unknown:
            raise ValueError(f"append got keys {unknown} that this dataset does not store {list(self.keys)}")
        batch = {k: _as_tensor(k, v) for k, v in transitions.items()}
        if "rewards" in batch and batch["rewards"].ndim == 0:  # a single transition
            batch = {k: v.unsqueeze(0) for k, v in batch.items()}
        n = batch["rewards"].shape[0] if "rewards" in batch else 0
        for k in FLAG_KEYS:
            if k in self._storage and k not in batch:
                batch[k] = torch.zeros(n)
        tensors = _validate(batch, expected_action_dim=self.action_dim)
        if tensors["observations"].shape[1] != self.obs_dim:
            raise ValueError(
                f"observations: dataset has obs_dim {self.obs_dim}, appended rows have "
                f"{tensors['observations'].shape[1]}"
            )
        tensors["actions"] = self._clip_actions(tensors["actions"])
        self._reserve(self._size + n)
        for k, v in tensors.items():
            self._storage[k][self._size : self._size + n] = v.to(self._device)
        self._size += n

    def _reserve(self, needed: int) -> None:
        capacity = self._storage["rewards"].shape[0]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        for k, v in self._storage.items():
            grown = v.new_zeros((new_capacity, *v.shape[1:]))
            grown[: self._size] = v[: self._size]
            self._storage[k] = grown

    def _clip_actions(self, actions: Tensor) -> Tensor:
        outside = int((actions.abs() > self._action_bound + _CLIP_WARN_TOL).sum())
        if outside:
            warnings.warn(
                f"{outside} action entries lie outside [-{self._action_bound:g}, {self._action_bound:g}] by "
                f"more than {_CLIP_WARN_TOL:g} and were clipped; is the action space normalised?",
                stacklevel=3,
            )
        return actions.clamp(-self._action_bound, self._action_bound)

    # ------------------------------------------------------------------ moving and saving
    def to(self, device: torch.device | str) -> OfflineDataset:
        """The same transitions on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if device == self._device:
            return self
        return OfflineDataset._trusted(
            {k: getattr(self, k).to(device) for k in self.keys}, device, self._action_bound, self.metadata
        )

    def state_dict(self) -> dict[str, Any]:
        """A checkpointable dict: trimmed tensors, ``action_bound`` and ``metadata``."""
        tensors = {k: getattr(self, k) for k in self.keys}
        if self._storage["rewards"].shape[0] != self._size:  # don't save the unused capacity
            tensors = {k: v.clone() for k, v in tensors.items()}
        return {**tensors, "action_bound": self._action_bound, "metadata": dict(self.metadata)}

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], device: torch.device | str | None = None
    ) -> OfflineDataset:
        """Rebuild (and re-validate) a dataset saved with `state_dict`."""
        data = {k: v for k, v in state.items() if k in REQUIRED_KEYS + FLAG_KEYS}
        return cls(
            data, device=device, action_bound=state.get("action_bound", 1.0), metadata=state.get("metadata")
        )

    @classmethod
    def _trusted(
        cls, tensors: dict[str, Tensor], device: torch.device, action_bound: float, metadata: Mapping[str, Any]
    ) -> OfflineDataset:
        """Wrap already-validated tensors without copying or re-checking them."""
        self = cls.__new__(cls)
        self._device = device
        self._action_bound = action_bound
        self._storage = tensors
        self._size = len(tensors["rewards"])
        self.metadata = dict(metadata)
        return self

    # ------------------------------------------------------------------ inspection
    def num_episodes(self) -> int:
        """Trajectories stored: from ``terminals`` when present, else from breaks ``s'_i != s_{i+1}``."""
        if self.terminals is not None:
            return int(self.terminals.sum().item()) + int(self.terminals[-1].item() == 0)
        breaks = (self.next_observations[:-1] != self.observations[1:]).any(dim=1)
        return 1 + int(breaks.sum().item())

    def summary(self) -> dict[str, Any]:
        """Plain-Python statistics for ``vgf-prob data inspect``."""
        r, a = self.rewards, self.actions
        return {
            "size": self._size,
            "episodes": self.num_episodes(),
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "terminations": int((self.masks == 0).sum().item()),
            "reward_min": r.min().item(),
            "reward_max": r.max().item(),
            "reward_mean": r.mean().item(),
            "reward_std": r.std().item() if self._size > 1 else 0.0,
            "action_min": a.min().item(),
            "action_max": a.max().item(),
            "keys": list(self.keys),
            "device": str(self._device),
            "metadata": dict(self.metadata),
        }


def check_numeric(key: str, values: ArrayLike) -> None:
    """Raise ValueError naming ``key`` when ``values`` are not numbers (e.g. byte strings or objects)."""
    if isinstance(values, Tensor):
        return
    dtype = np.asarray(values).dtype
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise ValueError(f"{key}: expected numbers, got an array of dtype {dtype}")


def check_finite(key: str, values: ArrayLike) -> None:
    """Raise ValueError naming ``key`` and how many entries of ``values`` are NaN or inf."""
    values = torch.as_tensor(values)
    if values.is_floating_point():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise ValueError(f"{key}: {bad} non-finite value(s) (NaN or inf) out of {values.numel()}")


def _as_tensor(key: str, value: ArrayLike) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}: cannot convert {type(value).__name__} to an array ({err})") from err
    check_numeric(key, array)
    return torch.as_tensor(array)


def _validate(data: Mapping[str, ArrayLike], *, expected_action_dim: int | None) -> dict[str, Tensor]:
    """Check a transition dict and return float32 tensors; raises ValueError naming the offending key."""
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"missing required key(s) {missing}; got keys {sorted(data)}")
    unknown = sorted(set(data) - set(REQUIRED_KEYS + FLAG_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {list(REQUIRED_KEYS + FLAG_KEYS)}")
    out = {k: _as_tensor(k, v) for k, v in data.items()}
    for k, v in out.items():
        want = 2 if k in ("observations", "next_observations", "actions") else 1
        if v.ndim != want:
            layout = "[T, dim]" if want == 2 else "[T]"
            raise ValueError(f"{k}: expected a {want}-D array {layout}, got shape {tuple(v.shape)}")
        out[k] = v.to(torch.float32)
    lengths = {k: v.shape[0] for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch between keys: {lengths}")
    if out["next_observations"].shape != out["observations"].shape:
        raise ValueError(
            f"next_observations: shape {tuple(out['next_observations'].shape)} differs from observations "
            f"{tuple(out['observations'].shape)}"
        )
    if expected_action_dim is not None and out["actions"].shape[1] != expected_action_dim:
        raise ValueError(
            f"actions: expected action dim {expected_action_dim}, got shape {tuple(out['actions'].shape)}"
        )
    for k, v in out.items():
        check_finite(k, v)
        if k in ("masks", *FLAG_KEYS) and v.numel() and not bool(((v >= 0) & (v <= 1)).all()):
            raise ValueError(f"{k}: values must lie in [0, 1], got range [{v.min().item()}, {v.max().item()}]")
    return out
