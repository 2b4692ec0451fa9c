"""OGBench single-task datasets through ogbench's own loader, from local files only (never downloads).

``ogbench.make_env_and_datasets(<name>-singletask[-taskN]-vK, dataset_path=...)`` reads ``<base>.npz`` and
its sibling ``<base>-val.npz`` and relabels them for the fixed task from the stored ``qpos`` (and
``button_states``): ``reward = (#subtasks solved) - (#subtasks)`` (0 on success, -1 per unsolved
subtask; ``success - 1`` in the mazes), ``mask = 0`` exactly on success states, 1 otherwise. The reward of
``(s, a, s')`` is computed from ``s``. ``terminals`` marks the end of each stored trajectory (trajectories
never stop at success: the scripted data collector is not task-aware).

Evaluation timing: from ogbench 1.2 the single-task *environments* compute reward, ``terminated`` and
``info['success']`` from the current state ``s`` (``success_timing='pre'``, matching the dataset); up to
1.1 they used the next state ``s'`` (``'post'``), which is what the published numbers (FQL, VGF) were
measured with. `load_ogbench` therefore defaults to ``success_timing='post'``; pass ``'pre'`` for the
ogbench >= 1.2 behaviour. The datasets themselves are the same either way.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from vgf_prob.rl.offline_dataset import OfflineDataset

DEFAULT_OGBENCH_DIR = "~/.ogbench/data"
OGBENCH_ARRAYS = ("observations", "actions", "terminals")  # what every OGBench dataset file holds
_VERSION = re.compile(r"^v\d+$")
_TASK = re.compile(r"^task\d+$")


def ogbench_names(dataset_name_or_path: str | os.PathLike, task_id: int | None = None) -> tuple[str, str]:
    """``(base dataset name, single-task name)``, e.g. ``('cube-single-play-v0',
    'cube-single-play-singletask-task2-v0')`` for ``'cube-single-play-v0'`` (or ``'.../cube-single-play-v0.npz'``)
    with ``task_id=2``; ``task_id=None`` selects the environment's default task (``...-singletask-v0``).
    A single-task name is accepted as input too (its task wins; a conflicting ``task_id`` is an error).
    """
    text = str(dataset_name_or_path)
    name = Path(text).name.removesuffix(".npz") if text.endswith(".npz") else text
    parts = name.split("-")
    if len(parts) < 3 or not _VERSION.match(parts[-1]):
        raise ValueError(f"not an OGBench dataset name: {name!r} (expected e.g. 'cube-single-play-v0')")
    if "singletask" in parts:
        pos = parts.index("singletask")
        named_task = parts[pos + 1] if _TASK.match(parts[pos + 1]) else None
        if task_id is not None and named_task not in (None, f"task{task_id}"):
            raise ValueError(f"{name!r} names {named_task or 'the default task'} but task_id={task_id}")
        base = parts[:pos] + parts[-1:]
        task = named_task or (f"task{task_id}" if task_id is not None else None)
    else:
        base = parts
        task = f"task{task_id}" if task_id is not None else None
    single = base[:-1] + ["singletask"] + ([task] if task else []) + base[-1:]
    return "-".join(base), "-".join(single)


def load_ogbench(
    dataset_name_or_path: str | os.PathLike,
    *,
    task_id: int | None = None,
    dataset_dir: str | os.PathLike = DEFAULT_OGBENCH_DIR,
    success_timing: Literal["pre", "post"] = "post",
    return_env: bool = False,
    device: torch.device | str = "cpu",
    **env_kwargs: Any,
) -> tuple[OfflineDataset, OfflineDataset] | tuple[OfflineDataset, OfflineDataset, Any]:
    """Load an OGBench dataset as single-task q-learning transitions: ``(train, val[, env])``.

    ``dataset_name_or_path`` is a dataset name (``'puzzle-3x3-play-v0'``, or a single-task name such as
    ``'puzzle-3x3-play-singletask-task4-v0'``), looked up as ``<dataset_dir>/<base>.npz``, or the path of
    a ``<base>.npz`` file (its ``-val.npz`` sibling must exist). ``success_timing`` and ``env_kwargs`` go
    to the environment (see the module docstring); ``return_env=True`` also returns it (else it is closed).
    ``metadata['env_name']`` is the single-task dataset name, which ``ogbench.make_env_and_datasets(name,
    env_only=True)`` turns into the evaluation environment; ``metadata['success_timing']`` is the timing.
    """
    from vgf_prob.rl.env_warnings import quiet_env_warnings

    with quiet_env_warnings():  # dm_control's headless GLFW probe at import
        import ogbench

    text = str(dataset_name_or_path)
    base, single = ogbench_names(text, task_id)
    if base.startswith("visual-") or base.startswith("powderworld"):
        raise ValueError(f"{base!r}: only state-based, continuous-action OGBench datasets are supported")
    if success_timing not in ("pre", "post"):
        raise ValueError(f"success_timing must be 'pre' or 'post', got {success_timing!r}")
    path = Path(text) if text.endswith(".npz") else Path(dataset_dir) / f"{base}.npz"
    path = path.expanduser()
    val_path = path.with_name(f"{path.stem}-val.npz")
    for p in (path, val_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"OGBench dataset file not found: {p} (vgf-prob never downloads; place the official file there "
                "or make one with vgf_prob.rl.data.ensure_ogbench_dataset)"
            )
    if str(path).count(".npz") != 1:  # ogbench finds the val file with str.replace('.npz', '-val.npz')
        raise ValueError(f"{path}: the path may contain '.npz' only once, as the file suffix")
    arrays = _check_npz(path)
    _check_npz(val_path)
    try:
        with quiet_env_warnings():
            env, train, val = ogbench.make_env_and_datasets(
                single, dataset_path=str(path), compact_dataset=False, success_timing=success_timing, **env_kwargs
            )
    except KeyError as err:  # the single-task relabelling reads arrays such as qpos / button_states
        raise ValueError(
            f"{path}: OGBench's loader needs the array {err.args[0]!r}, which the file lacks (it holds {arrays})"
        ) from err
    except ValueError as err:  # e.g. arrays of strings that do not convert to float32
        raise ValueError(f"{path}: {err}") from err
    metadata = {"source": "ogbench", "path": str(path), "env_name": single, "success_timing": success_timing}
    datasets = tuple(
        OfflineDataset(
            {k: d[k] for k in ("observations", "actions", "rewards", "next_observations", "masks", "terminals")},
            device=device,
            metadata={**metadata, "split": split},
        )
        for d, split in ((train, "train"), (val, "val"))
    )
    if return_env:
        return (*datasets, env)
    env.close()
    return datasets


def _check_npz(path: Path) -> list[str]:
    """The array names of an OGBench ``.npz`` file; ValueError if it is not an npz or lacks `OGBENCH_ARRAYS`.

    The file is opened with ``allow_pickle=False``: a dataset holds numeric arrays only.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive (not a zip file)")
    import numpy as np

    with np.load(path, allow_pickle=False) as npz:
        names = sorted(npz.files)
    missing = [k for k in OGBENCH_ARRAYS if k not in names]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing} of an OGBench dataset (it holds {names})")
    return names
