"""Minari (the successor of D4RL) datasets from the local store only (never downloads).

A Minari episode of ``T`` steps holds ``T + 1`` observations and ``T`` actions, rewards, terminations and
truncations; every step becomes a transition ``(obs[t], a[t], r[t], obs[t+1])`` with
``mask = 1 - terminations[t]`` (a truncation is not terminal), ``terminals`` set on each episode's last
step and ``timeouts`` where that step was truncated.

Dict observations are flattened by concatenating their leaves in sorted key order, recursing into nested
dicts (for ``{'observation', 'desired_goal', 'achieved_goal'}``: achieved_goal, desired_goal,
observation), each leaf reshaped to ``[T + 1, -1]``; ``obs_keys`` selects and orders top-level keys instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgf_prob.rl.offline_dataset import OfflineDataset


def minari_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets`` (Minari's own resolution)."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")).expanduser()


def local_minari_ids(root: str | os.PathLike | None = None) -> list[str]:
    """Ids of the datasets stored under the Minari root (folders holding a ``data/`` directory)."""
    base = minari_root(root)
    if not base.is_dir():
        return []
    return sorted(p.parent.relative_to(base).as_posix() for p in base.rglob("data") if p.is_dir())


def flatten_observations(obs: Any, obs_keys: Sequence[str] | None = None) -> np.ndarray:
    """``[T + 1, O]`` float array from an array or a (nested) dict of arrays (order: module docstring)."""
    if not isinstance(obs, Mapping):
        arr = np.asarray(obs)
        return arr.reshape(len(arr), -1)
    keys = sorted(obs) if obs_keys is None else list(obs_keys)
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ValueError(f"obs_keys {missing} not in the observation dict (keys: {sorted(obs)})")
    return np.concatenate([flatten_observations(obs[k]) for k in keys], axis=1)


def load_minari(
    dataset_id: str,
    root: str | os.PathLike | None = None,
    *,
    obs_keys: Sequence[str] | None = None,
    rescale_actions: bool = False,
    device: torch.device | str = "cpu",
) -> OfflineDataset:
    """Load ``dataset_id`` (e.g. ``'mujoco/hopper/medium-v0'``) from the local Minari store as transitions.

    Actions must lie in a Box inside [-1, 1]; with ``rescale_actions=True`` a finite Box ``[low, high]``
    is mapped linearly onto [-1, 1] instead (wrap the environment with
    ``gymnasium.wrappers.RescaleAction(env, -1, 1)`` to act in the same space). Rewards are unchanged.
    """
    import gymnasium
    import minari

    base = minari_root(root)
    data_path = base / dataset_id / "data"
    if not data_path.is_dir():
        stored = local_minari_ids(base)
        raise FileNotFoundError(
            f"Minari dataset {dataset_id!r} is not in the local store {base} (vgf-prob never downloads); "
            f"stored: {stored or 'none'}"
        )
    try:
        dataset = minari.MinariDataset(data_path)
    except (OSError, ValueError, KeyError) as err:  # damaged metadata or HDF5 file, as minari reports it
        raise ValueError(_unreadable(dataset_id, data_path, err)) from err
    space = dataset.action_space
    if not isinstance(space, gymnasium.spaces.Box):
        raise ValueError(f"{dataset_id}: only Box action spaces are supported, got {space}")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    in_box = bool((low >= -1).all() and (high <= 1).all())
    if not in_box and not rescale_actions:
        raise ValueError(
            f"{dataset_id}: actions lie in [{low.min():g}, {high.max():g}], not inside [-1, 1]; "
            "pass rescale_actions=True to map them linearly onto [-1, 1]"
        )
    if rescale_actions and not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ValueError(f"{dataset_id}: cannot rescale an unbounded action space {space}")

    keys = ("observations", "actions", "rewards", "next_observations", "masks", "terminals", "timeouts")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for ep in _episodes(dataset, dataset_id, data_path):
        obs = flatten_observations(ep.observations, obs_keys)
        steps = len(ep.rewards)
        ends = np.zeros(steps, dtype=np.float32)
        ends[-1] = 1.0
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions, dtype=np.float64).reshape(steps, -1))
        parts["rewards"].append(np.asarray(ep.rewards, dtype=np.float64))
        parts["masks"].append(1.0 - np.asarray(ep.terminations, dtype=np.float32))
        parts["terminals"].append(ends)
        parts["timeouts"].append(ends * np.asarray(ep.truncations, dtype=np.float32))
    if not parts["rewards"]:
        raise ValueError(f"Minari dataset {dataset_id!r} holds no episodes")
    data = {k: np.concatenate(v) for k, v in parts.items()}
    if rescale_actions:
        data["actions"] = 2.0 * (data["actions"] - low) / (high - low) - 1.0
    metadata = {
        "source": "minari",
        "dataset_id": dataset_id,
        "path": str(data_path),
        "env_name": dataset.spec.env_spec.id if dataset.spec.env_spec is not None else None,
        "actions_rescaled_from": [low.tolist(), high.tolist()] if rescale_actions else None,
    }
    return OfflineDataset(data, device=device, expected_action_dim=int(np.prod(space.shape)), metadata=metadata)


def _episodes(dataset: Any, dataset_id: str, data_path: Path) -> Iterator[Any]:
    """``dataset.iterate_episodes()``, with minari's read errors (a damaged file) as one named ValueError."""
    episodes = iter(dataset.iterate_episodes())
    while True:
        try:
            episode = next(episodes)
        except StopIteration:
            return
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(_unreadable(dataset_id, data_path, err)) from err
        yield episode


def _unreadable(dataset_id: str, data_path: Path, err: Exception) -> str:
    return f"Minari dataset {dataset_id!r} at {data_path} is not readable ({type(err).__name__}: {err})"
