"""D4RL: read the HDF5 files directly (the ``d4rl`` package does not install on Python >= 3.11).

Q-learning semantics (as ``d4rl.qlearning_dataset`` plus the FQL/IQL reward processing):

- an episode ends at a step with ``terminals`` (true termination) or ``timeouts`` (time limit) set;
- ``next_observations[i]`` is the file's ``next_observations[i]`` when present, else ``observations[i+1]``;
- the last step of an episode that ended by timeout is dropped (its successor belongs to the next episode),
  as is the file's final step when there is no ``next_observations`` key;
- ``masks = 1 - terminals``; the returned ``terminals`` flag marks each trajectory's last kept step and
  ``timeouts`` the trajectories that ended by time limit (see `vgf_prob.rl.offline_dataset`);
- rewards by task family (inferred from ``env_name`` unless overridden): locomotion (hopper, halfcheetah,
  walker2d) ``r * 1000 / (max episode return - min episode return)``, returns summed over kept steps;
  antmaze ``r - 1``; otherwise unchanged;
- actions clipped to ``+-(1 - 1e-5)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vgf_prob.rl.offline_dataset import OfflineDataset, check_finite, check_numeric

D4RL_ACTION_BOUND = 1.0 - 1e-5
LOCOMOTION_TASKS = ("hopper", "halfcheetah", "walker2d")

# (R_min, R_max) of the D4RL normalised score 100 * (R - R_min) / (R_max - R_min), by task family.
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "antmaze": (0.0, 1.0),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867),
    "relocate": (-6.425911, 4233.877797728884),
}

RewardScale = Literal["auto", "locomotion", "antmaze", "none"] | float
_REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")


def task_family(env_name: str) -> str | None:
    """The `D4RL_REF_SCORES` key named in ``env_name``, or None.

    ``'hopper-medium-v2'``, ``'hopper_medium-v2'`` and Minari's ``'mujoco/hopper/medium-v0'`` all give
    ``'hopper'``; ``'antmaze-large-diverse-v2'`` gives ``'antmaze'``.
    """
    tokens = re.split(r"[/_\-]", env_name.lower())
    return next((tok for tok in tokens if tok in D4RL_REF_SCORES), None)


def d4rl_normalized_score(env_name: str, returns: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """``100 * (R - R_min) / (R_max - R_min)`` with the reference returns of ``env_name``'s family."""
    family = task_family(env_name)
    if family is None:
        raise ValueError(f"no D4RL reference scores for {env_name!r}; known families: {sorted(D4RL_REF_SCORES)}")
    r_min, r_max = D4RL_REF_SCORES[family]
    return 100.0 * (np.asarray(returns, dtype=np.float64) - r_min) / (r_max - r_min)


def load_d4rl_hdf5(
    path: str | Path,
    env_name: str | None = None,
    reward_scale: RewardScale = "auto",
    *,
    device: torch.device | str = "cpu",
) -> OfflineDataset:
    """Load a D4RL HDF5 file as q-learning transitions (conventions in the module docstring).

    ``reward_scale``: ``"auto"`` picks the processing from ``env_name`` (none when ``env_name`` is None),
    ``"locomotion"``/``"antmaze"``/``"none"`` force one, a float multiplies the rewards.
    ``metadata`` of the result records the path, env name, the reward processing (its name and the
    applied ``r -> reward_factor * r + reward_shift``, which online data must reuse), the file's
    ``metadata/*`` scalars and the names of its ``infos/*`` arrays.
    """
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"D4RL HDF5 file not found: {path}")
    mode = _reward_mode(reward_scale, env_name)
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not an HDF5 file (no HDF5 signature); D4RL datasets are HDF5 files")
    try:
        f = h5py.File(path, "r")
    except OSError as err:  # a damaged HDF5 file: h5py's message does not name it
        raise ValueError(f"{path}: cannot read this HDF5 file ({err})") from err
    with f:
        missing = [k for k in _REQUIRED if k not in f]
        if missing:
            raise ValueError(f"{path}: missing required key(s) {missing}; top-level keys: {sorted(f.keys())}")
        not_arrays = [k for k in (*_REQUIRED, "next_observations") if k in f and not isinstance(f[k], h5py.Dataset)]
        if not_arrays:
            raise ValueError(f"{path}: {not_arrays} must be arrays (HDF5 datasets), not groups")
        raw = {k: f[k][()] for k in _REQUIRED}
        if "next_observations" in f:
            raw["next_observations"] = f["next_observations"][()]
        file_meta = _scalars(f["metadata"]) if "metadata" in f else {}
        info_keys = sorted(f["infos"].keys()) if "infos" in f else []
    for k, v in raw.items():
        check_numeric(f"{path}: {k}", v)
    lengths = {k: len(v) for k, v in raw.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: length mismatch between keys: {lengths}")
    for k, v in raw.items():  # before reward scaling spreads a NaN over every reward
        check_finite(k, v)
    try:
        data = _qlearning(raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    factor, shift = _reward_transform(data["rewards"], data["terminals"], mode)
    data["rewards"] = factor * data["rewards"] + shift
    metadata = {
        "source": "d4rl",
        "path": str(path),
        "env_name": env_name,
        "reward_processing": mode if isinstance(mode, str) else f"scale {mode:g}",
        "reward_factor": factor,
        "reward_shift": shift,
        "file_metadata": file_meta,
        "infos": info_keys,
    }
    return OfflineDataset(data, device=device, action_bound=D4RL_ACTION_BOUND, metadata=metadata)


def load_d4rl(
    env_name: str, path: str | Path | None = None, reward_scale: RewardScale = "auto", **kwargs
) -> OfflineDataset:
    """Load ``env_name``'s dataset from ``path``; without a path, ask an importable ``d4rl`` for its file.

    The ``d4rl`` package is only used to locate an already-downloaded file (nothing is downloaded).
    Remaining keyword arguments go to `load_d4rl_hdf5`.
    """
    if path is None:
        try:
            import d4rl  # type: ignore[import-not-found]
        except ImportError as err:
            raise ImportError(
                f"cannot locate the D4RL file for {env_name!r}: the d4rl package is not installed (it cannot be "
                "installed on Python >= 3.11); pass the HDF5 path, e.g. "
                f"load_d4rl({env_name!r}, path='~/.d4rl/datasets/<file>.hdf5')"
            ) from err
        if env_name not in d4rl.infos.DATASET_URLS:
            raise ValueError(f"d4rl does not know the dataset {env_name!r}")
        path = d4rl.offline_env.filepath_from_url(d4rl.infos.DATASET_URLS[env_name])
    return load_d4rl_hdf5(path, env_name=env_name, reward_scale=reward_scale, **kwargs)


def _reward_mode(reward_scale: RewardScale, env_name: str | None) -> str | float:
    if isinstance(reward_scale, (int, float)) and not isinstance(reward_scale, bool):
        return float(reward_scale)
    if reward_scale in ("locomotion", "antmaze", "none"):
        return reward_scale
    if reward_scale != "auto":
        raise ValueError(
            f"reward_scale must be 'auto', 'locomotion', 'antmaze', 'none' or a float, got {reward_scale!r}"
        )
    family = task_family(env_name) if env_name else None
    if family in LOCOMOTION_TASKS:
        return "locomotion"
    return "antmaze" if family == "antmaze" else "none"


def _qlearning(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Build (s, a, r, s', mask) rows and trajectory flags from the raw D4RL arrays."""
    n = len(raw["rewards"])
    if n == 0:
        raise ValueError("the D4RL file holds no steps")
    terminals = raw["terminals"].astype(bool).reshape(n)
    timeouts = raw["timeouts"].astype(bool).reshape(n)
    obs = raw["observations"]
    if "next_observations" in raw:
        next_obs = raw["next_observations"]
        keep = ~timeouts
    else:
        next_obs = np.concatenate([obs[1:], obs[-1:]])  # the final row is dropped below
        keep = ~timeouts & (np.arange(n) < n - 1)
    if not keep.any():
        raise ValueError(
            f"no usable transitions: {int(timeouts.sum())} of the {n} steps end an episode by timeout (their "
            "successor belongs to the next episode, so D4RL drops them) and no other step is left"
        )
    episode = np.cumsum(terminals | timeouts) - (terminals | timeouts)  # episode index of each raw step
    ended_by_timeout = np.zeros(episode[-1] + 1, dtype=bool)
    ended_by_timeout[episode[timeouts]] = True
    kept_episode = episode[keep]
    last_of_trajectory = np.append(kept_episode[1:] != kept_episode[:-1], True)
    return {
        "observations": obs[keep],
        "actions": raw["actions"][keep],
        "rewards": raw["rewards"].reshape(n)[keep].astype(np.float64),
        "next_observations": next_obs[keep],
        "masks": 1.0 - terminals[keep],
        "terminals": last_of_trajectory.astype(np.float32),
        "timeouts": (last_of_trajectory & ended_by_timeout[kept_episode]).astype(np.float32),
    }


def _reward_transform(rewards: np.ndarray, trajectory_ends: np.ndarray, mode: str | float) -> tuple[float, float]:
    """``(factor, shift)`` of the processing ``r -> factor * r + shift`` that ``mode`` asks for."""
    if isinstance(mode, float):
        return mode, 0.0
    if mode == "antmaze":
        return 1.0, -1.0
    if mode == "locomotion":
        starts = np.concatenate([[0], np.flatnonzero(trajectory_ends[:-1]) + 1])
        returns = np.add.reduceat(rewards, starts)
        spread = returns.max() - returns.min()
        if spread <= 0:
            raise ValueError(
                f"locomotion reward scaling needs episodes with different returns; got {len(returns)} "
                f"episode(s) all with return {returns[0]:g} (pass reward_scale='none')"
            )
        return 1000.0 / float(spread), 0.0
    return 1.0, 0.0


def _scalars(group) -> dict[str, object]:
    """The scalar/string datasets of an HDF5 group (recursively), as plain Python values."""
    import h5py

    out: dict[str, object] = {}

    def visit(name: str, node) -> None:
        if isinstance(node, h5py.Dataset) and node.shape == ():
            value = node[()]
            out[name] = value.decode() if isinstance(value, bytes) else np.asarray(value).item()

    group.visititems(visit)
    return out
