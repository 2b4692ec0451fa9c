"""The run directory and everything checked before a run starts, plus a graceful stop on SIGTERM / SIGINT.

One writer per run directory: the loop holds `vgf_prob.rl.checkpoint.RunLock` on it from its first file
operation to the summary, so a second process writing the same directory stops with an error naming the
first one's PID. Before anything is written, everything that can fail early is checked: the device
(`check_device`), the environment (`check_env`: it must exist and match the data's obs/action sizes) and
the directory (`check_run_dir`). A fresh run in a directory that holds logs but no checkpoint (a run killed
before its first checkpoint) moves those files aside into ``stale-<time>/`` (`set_aside_stale_logs`).
`StopSignals` turns the first SIGTERM / SIGINT into a request the loop reads after each step.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vgf_prob.rl.checkpoint import (
    LATEST,
    LOCK_FILE,
    PREVIOUS,
    CheckpointError,
    RunLock,
    config_mismatch,
    remove_orphaned_tmp_files,
)
from vgf_prob.rl.run.spec import TrainingSetupError

if TYPE_CHECKING:
    from vgf_prob.rl.config import VGFConfig
    from vgf_prob.rl.offline_dataset import OfflineDataset

TRAIN_LOG = "train.csv"
EVAL_LOG = "eval.csv"
RUN_MARKERS = (LOCK_FILE, LATEST, PREVIOUS, TRAIN_LOG, EVAL_LOG)  # any of these: a vgf-prob run directory
STALE_PREFIX = "stale-"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a `torch.device`, or `TrainingSetupError` when it does not exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise TrainingSetupError(f"unknown device {str(device)!r}: {str(err).splitlines()[0]}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise TrainingSetupError(f"device {str(device)!r} requested but {why}; use --device cpu")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as err:
            raise TrainingSetupError(f"device {str(device)!r} is not usable here: {str(err).splitlines()[0]}") from err
    return dev


def check_env(env_name: str, obs_dim: int, action_dim: int, env_kwargs: Mapping[str, Any] | None = None) -> None:
    """Make ``env_name`` once and check that its observation and action sizes are the dataset's.

    Raises `TrainingSetupError` for an unknown name, a missing environment package or other dimensions.
    """
    from vgf_prob.rl.envs import make_env

    try:
        env = make_env(env_name, **(env_kwargs or {}))
    except (ValueError, ImportError) as err:
        raise TrainingSetupError(f"cannot evaluate in {env_name!r}: {err}") from err
    try:
        obs_shape, action_shape = env.observation_space.shape, env.action_space.shape
    finally:
        env.close()
    if obs_shape != (obs_dim,) or action_shape != (action_dim,):
        raise TrainingSetupError(
            f"environment {env_name!r} has observations of shape {obs_shape} and actions of shape {action_shape}, "
            f"but the data has obs_dim {obs_dim} and action_dim {action_dim}; pass the environment of this data"
        )


def check_run_dir(out_dir: str | os.PathLike, resume: bool) -> None:
    """Refuse a run directory that this run must not write into (`TrainingSetupError`/`CheckpointError`).

    - not a directory, or not writable (checked on it, or on its nearest existing parent);
    - held by another live process (`vgf_prob.rl.checkpoint.RunDirBusy`, naming its PID);
    - ``resume=False``: it holds a checkpoint (resume it instead), or it is not empty and not a vgf-prob
      run directory (none of `RUN_MARKERS` in it);
    - ``resume=True``: it holds no checkpoint.

    Creates nothing; the lock is only probed (taken and released), when its file exists.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingSetupError(f"run directory {out_dir} is a file, not a directory")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise TrainingSetupError(f"cannot create run directory {out_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == out_dir else f" (its parent {existing} is not writable)"
        raise TrainingSetupError(f"run directory {out_dir} is not writable{where}")
    if existing != out_dir:  # a new directory: nothing else to check
        if resume:
            raise CheckpointError(f"nothing to resume: {out_dir} does not exist")
        return
    if (out_dir / LOCK_FILE).exists():
        RunLock(out_dir).acquire()  # raises RunDirBusy while another process holds it
        RunLock(out_dir).release()
    names = sorted(p.name for p in out_dir.iterdir())
    has_checkpoint = LATEST in names or PREVIOUS in names
    if resume:
        if not has_checkpoint:
            raise CheckpointError(f"nothing to resume: no {LATEST} or {PREVIOUS} in {out_dir}")
        return
    if has_checkpoint:
        raise CheckpointError(
            f"{out_dir} already holds a run ({LATEST}); pass resume=True (--resume) to continue it, "
            "or choose another output directory"
        )
    if names and not set(names) & set(RUN_MARKERS):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise TrainingSetupError(
            f"{out_dir} is not empty and is not a vgf-prob run directory (it holds {shown}); choose a new or empty "
            "directory"
        )


def set_aside_stale_logs(out_dir: Path) -> Path | None:
    """Move the files of a run killed before its first checkpoint into ``out_dir/stale-<time>/``.

    Called for a fresh run once `check_run_dir` has ruled out a checkpoint; the lock file, earlier
    ``stale-*`` folders and dead writers' temporary files (deleted) are not moved. Returns the folder.
    """
    remove_orphaned_tmp_files(out_dir)
    entries = [p for p in out_dir.iterdir() if p.name != LOCK_FILE and not p.name.startswith(STALE_PREFIX)]
    if not entries:
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = out_dir / f"{STALE_PREFIX}{stamp}"
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = out_dir / f"{STALE_PREFIX}{stamp}-{suffix}"
    aside.mkdir()
    for entry in entries:
        os.replace(entry, aside / entry.name)
    warnings.warn(
        f"{out_dir} held logs but no checkpoint (a run that ended before its first checkpoint); moved "
        f"{', '.join(sorted(p.name for p in entries))} to {aside} and starting afresh",
        stacklevel=3,
    )
    return aside


def fingerprint(dataset: OfflineDataset) -> dict[str, Any]:
    """Size, dimensions and float64 sums of the offline data: enough to notice another dataset on resume."""
    return {
        "size": len(dataset), "obs_dim": dataset.obs_dim, "action_dim": dataset.action_dim,
        **{f"sum_{k}": float(getattr(dataset, k).double().sum().item())
           for k in ("observations", "actions", "rewards", "masks")},
    }  # fmt: skip


def check_resumable(payload: Mapping[str, Any], config: VGFConfig, run_info: Mapping[str, Any], out_dir: Path) -> None:
    """Refuse to resume with another config, dataset, environment, seed or mode; say what differs."""
    problems = config_mismatch(payload["config"], config.to_dict())
    saved = payload.get("run", {})
    for key in ("env_name", "seed", "mode", "obs_dim", "action_dim"):
        if saved.get(key) != run_info[key]:
            problems.append(f"{key}: checkpoint {saved.get(key)!r}, requested {run_info[key]!r}")
    if saved.get("dataset") != run_info["dataset"]:
        problems.append(f"dataset: checkpoint {saved.get('dataset')}, requested {run_info['dataset']}")
    if problems:
        raise CheckpointError(
            f"cannot resume {out_dir} (step {payload['step']}): the run differs from the checkpoint's: "
            + "; ".join(problems)
            + "; use the original settings, or start a new run in another directory"
        )


def default_env_kwargs(dataset: OfflineDataset) -> dict[str, Any]:
    """OGBench data records the success timing its rewards used; evaluate with the same one."""
    timing = dataset.metadata.get("success_timing")
    return {} if timing is None else {"success_timing": timing}


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class StopSignals:
    """While entered (in the main thread), the first SIGTERM or SIGINT sets `signum` instead of ending the
    process; later ones while stopping are ignored, so a checkpoint being written is never cut. On exit the
    previous handlers come back. In another thread (a Ray trial) signals cannot be caught: `signum` stays None.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
