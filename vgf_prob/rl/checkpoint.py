"""Training checkpoints that survive crashes: atomic writes, verified before they replace anything.

A run directory holds ``latest.pt`` and ``previous.pt`` (the checkpoint before it). `save_checkpoint`

1. removes the temporary files that writers killed mid-save left behind (``.latest.pt.<pid>.tmp`` of a
   process that no longer exists),
2. writes the payload to a temporary file in the same directory and fsyncs it,
3. loads that file back (``torch.load(weights_only=True)``) and checks its format: a file that does not
   read back raises `CheckpointError` and is deleted, so a broken file never replaces a good one,
4. if the current ``latest.pt`` reads back, hard-links it to ``previous.pt`` (so a ``latest.pt`` exists at
   every instant); if it does not (corrupted on disk after it was written), ``previous.pt`` stays as it is
   and the unreadable file is kept aside as ``latest.pt.unreadable`` with a warning,
5. ``os.replace``-s the temporary file over ``latest.pt`` and fsyncs the directory.

`RunLock` makes one process the only writer of a run directory: an exclusive ``flock`` on
``<run_dir>/.vgf-prob.lock`` that the kernel releases when the process ends, however it ends.

The payload is a plain dict of tensors, numbers, strings, lists/tuples and dicts, so it loads with
``weights_only=True`` (no pickled code runs on load). `load_checkpoint` turns any read error (truncated
file, not a checkpoint, wrong format version) into a `CheckpointError` naming the file, and
`config_mismatch` explains how a checkpoint's config differs from the one a resume asked for.

RNG state: `capture_rng_state` / `restore_rng_state` cover torch's CPU generator, every CUDA device's
generator (when CUDA is available), numpy's and python's global generators, and any named
``torch.Generator`` the training loop owns (batch sampling, agent noise).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
LATEST = "latest.pt"
PREVIOUS = "previous.pt"
UNREADABLE = "latest.pt.unreadable"
LOCK_FILE = ".vgf-prob.lock"
_TMP = re.compile(r"^\.(latest|previous)\.pt\.(\d+)\.tmp$")
REQUIRED_KEYS = ("format_version", "step", "config", "agent", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read, or does not fit the run that wants it."""


class RunDirBusy(CheckpointError):
    """Another live process holds the run directory's lock."""


# ----------------------------------------------------------------------------------------------- lock
class RunLock:
    """Exclusive ownership of a run directory by this process, for as long as the lock is held.

    ``acquire`` creates the directory if needed, opens ``<run_dir>/.vgf-prob.lock`` and takes a
    non-blocking exclusive ``fcntl.flock`` on it, then writes this process's PID into it. The kernel drops
    the lock when the descriptor closes, including when the process is killed, so a lock is never stale.
    A second process gets `RunDirBusy` naming the holder's PID. Within one process the lock is
    re-entrant: `train` takes it again when the CLI already holds it. POSIX only (``fcntl.flock``).
    """

    _held: dict[Path, tuple[int, int]] = {}  # resolved directory -> (descriptor, hold count) in this process

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)

    def acquire(self) -> None:
        key = self.run_dir.resolve()
        if key in RunLock._held:
            fd, count = RunLock._held[key]
            RunLock._held[key] = (fd, count + 1)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(
                    f"{self.run_dir} is in use by another vgf-prob process (PID {holder}); wait for it to end "
                    "or choose another output directory"
                ) from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            os.close(fd)
            raise
        RunLock._held[key] = (fd, 1)

    def release(self) -> None:
        key = self.run_dir.resolve()
        fd, count = RunLock._held[key]
        if count > 1:
            RunLock._held[key] = (fd, count - 1)
            return
        del RunLock._held[key]
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random stream a run draws from, as weights_only-loadable values.

    ``generators`` are the loop's own ``torch.Generator`` objects by name; their states are stored
    with their device so `restore_rng_state` can check it gets the same generators back.
    """
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": random.getstate(),
        "generators": {
            name: {"device": str(g.device), "state": g.get_state()} for name, g in (generators or {}).items()
        },
    }


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what `capture_rng_state` saved; ``generators`` must be the same names on the same devices.

    CUDA states are restored when CUDA is available and the checkpoint has them for as many devices
    (a CPU checkpoint resumed on a GPU machine keeps the fresh CUDA seeds, with a warning).
    """
    generators = dict(generators or {})
    saved = state["generators"]
    if set(saved) != set(generators):
        raise CheckpointError(
            f"checkpoint holds RNG generators {sorted(saved)} but the run has {sorted(generators)}"
        )
    for name, gen in generators.items():
        if saved[name]["device"] != str(gen.device):
            raise CheckpointError(
                f"generator {name!r} was saved on {saved[name]['device']} but the run's lives on {gen.device}"
            )
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = list(state["torch_cuda"])
    if torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda_states)} device(s), this machine has "
                f"{torch.cuda.device_count()}; CUDA generators keep their current seeds",
                stacklevel=2,
            )
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for name, gen in generators.items():
        gen.set_state(saved[name]["state"])


# ------------------------------------------------------------------------------------------ saving
def save_checkpoint(run_dir: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Atomically write ``payload`` as ``<run_dir>/latest.pt`` (the old one becomes ``previous.pt``).

    ``payload`` must contain `REQUIRED_KEYS` but ``format_version`` (added here). Returns the path of
    ``latest.pt``. On any failure the existing ``latest.pt``/``previous.pt`` are left as they were,
    no temporary file remains, and `CheckpointError` is raised.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "format_version": FORMAT_VERSION}
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint payload lacks key(s) {missing}; required: {list(REQUIRED_KEYS)}")
    latest, previous = run_dir / LATEST, run_dir / PREVIOUS
    remove_orphaned_tmp_files(run_dir)
    tmp = run_dir / f".{LATEST}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        load_checkpoint(tmp)  # verify: a file that does not read back must not replace anything
        if latest.exists():
            _rotate(latest, previous, run_dir / UNREADABLE)
        os.replace(tmp, latest)
    except CheckpointError as err:
        raise CheckpointError(
            f"not saving checkpoint to {latest}: the written file does not read back ({err})"
        ) from err
    except Exception as err:
        raise CheckpointError(f"could not write checkpoint {latest}: {type(err).__name__}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(run_dir)
    return latest


def _rotate(latest: Path, previous: Path, unreadable: Path) -> None:
    """``latest`` becomes ``previous`` if it reads back; an unreadable one is moved aside instead."""
    try:
        load_checkpoint(latest)
    except CheckpointError as err:
        os.replace(latest, unreadable)
        warnings.warn(
            f"{err}; kept it as {unreadable} and left {previous.name} as it was (it is not replaced by an "
            "unreadable file)",
            stacklevel=3,
        )
        return
    _link_or_copy(latest, previous)


def remove_orphaned_tmp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete ``.latest.pt.<pid>.tmp`` / ``.previous.pt.<pid>.tmp`` files whose writer process is gone.

    A process killed while writing a checkpoint leaves its temporary file behind (checkpoint-sized).
    Files of this process and of live processes are kept. Returns the removed paths.
    """
    removed = []
    for path in Path(run_dir).iterdir():
        match = _TMP.match(path.name)
        if match is None or int(match.group(2)) == os.getpid() or _process_alive(int(match.group(2))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically (a hard link where the filesystem allows it)."""
    staging = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    try:
        try:
            os.link(src, staging)
        except OSError:
            staging.write_bytes(src.read_bytes())
        os.replace(staging, dst)
    finally:
        staging.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file; any problem raises `CheckpointError` naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/... for broken files
        raise CheckpointError(f"cannot read checkpoint {path}: {_describe_load_error(err)}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a vgf-prob checkpoint (it holds a {type(payload).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a vgf-prob checkpoint: missing key(s) {missing}")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}, this vgf-prob reads format {FORMAT_VERSION}"
        )
    return payload


def _describe_load_error(err: Exception) -> str:
    """What went wrong reading a file, in one line, without torch's advice to load it unsafely.

    torch's messages for refused pickles suggest ``weights_only=False``, which would run whatever code an
    untrusted file holds; they are replaced here by what the failure means for a vgf-prob checkpoint.
    """
    if isinstance(err, pickle.UnpicklingError):
        refused = [line.strip() for line in str(err).splitlines() if "global" in line.lower()]
        detail = f" ({refused[0]})" if refused else ""
        return (
            "it holds Python objects beyond tensors, numbers, strings and containers, which a safe load refuses"
            f"{detail}; vgf-prob checkpoints never do, so the file is foreign or tampered with"
        )
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if "zip archive" in text:
        return "the file is truncated or corrupt (not a readable zip archive)"
    if "weights_only" in text:
        text = ""
    return f"the file is truncated, corrupt or not a checkpoint ({type(err).__name__}{': ' + text if text else ''})"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file from a file path or a run directory (its ``latest.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (give a .pt file or a run directory that holds {LATEST})"
        )
    return path


def load_latest(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The newest readable checkpoint of a run: ``latest.pt``, else ``previous.pt`` with a warning.

    Raises `CheckpointError` when the directory holds neither, or when both are unreadable.
    """
    run_dir = Path(run_dir)
    latest, previous = run_dir / LATEST, run_dir / PREVIOUS
    if not latest.exists() and not previous.exists():
        raise CheckpointError(f"nothing to resume: no {LATEST} or {PREVIOUS} in {run_dir}")
    try:
        return load_checkpoint(latest, map_location)
    except CheckpointError as err:
        if not previous.exists():
            raise CheckpointError(f"{err}; and there is no {PREVIOUS} in {run_dir} to fall back on") from err
        try:
            payload = load_checkpoint(previous, map_location)
        except CheckpointError as err_previous:
            raise CheckpointError(f"no readable checkpoint in {run_dir}: {err}; {err_previous}") from err_previous
        warnings.warn(f"{err}; resuming from {previous} (step {payload['step']}) instead", stacklevel=2)
        return payload


def config_mismatch(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """Human-readable differences ``key: checkpoint X, requested Y`` between two config dicts."""
    lines = []
    for key in sorted(set(saved) | set(requested)):
        old, new = saved.get(key, "<absent>"), requested.get(key, "<absent>")
        if old != new:
            lines.append(f"{key}: checkpoint {old!r}, requested {new!r}")
    return lines
