"""Run logs: the crash-safe CSV log, the metric window, and the sinks that receive each log row.

The CSV files (``train.csv``, ``eval.csv``) are the run's record: resume truncates them to the byte positions
stored in the checkpoint, and reports read them. Other destinations are `LogSink` objects, chosen by name
(`make_sinks`, ``--log csv,tensorboard,wandb,mlflow``), one small class each:

- ``csv``: `CSVSink`, always on;
- ``tensorboard``: event files under ``<run>/tb`` (``pip install 'vgf-prob[tensorboard]'``); a resumed run purges
  the steps after its checkpoint;
- ``wandb``: Weights & Biases in offline mode under ``<run>/wandb`` (``wandb sync <run>/wandb/offline-run-*``
  uploads it later); a resumed run continues the same run id;
- ``mlflow``: an MLflow run in the local SQLite store ``<run>/mlflow.db`` (``mlflow ui --backend-store-uri
  sqlite:///<run>/mlflow.db``; MLflow 3 keeps its plain-file store in maintenance mode); a resumed run
  continues the same MLflow run.

Rows that a killed run logged after its last checkpoint stay in the W&B and MLflow histories (those stores
cannot take them back); the resumed run logs those steps again.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from vgf_prob.rl.checkpoint import CheckpointError
from vgf_prob.rl.evaluate import ROW_COLUMNS, ScoreRow
from vgf_prob.rl.run.run_dir import EVAL_LOG, TRAIN_LOG
from vgf_prob.rl.run.spec import TrainingSetupError

SINK_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                 "mlflow": ("mlflow", "mlflow")}  # fmt: skip
"""Sink -> (import name, extra of vgf-prob that installs it)."""


class LogSink(Protocol):
    """Where log rows go: ``log_train`` gets each train row (floats, ints and blank cells), ``log_eval`` the
    `ScoreRow` objects of one evaluation; ``close`` flushes."""

    def log_train(self, step: int, row: Mapping[str, Any]) -> None: ...

    def log_eval(self, step: int, rows: Sequence[ScoreRow]) -> None: ...

    def close(self) -> None: ...


class CSVLog:
    """An append-only CSV file whose header is fixed by its first row (or given); resumable by byte offset.

    Each row (with the header, for the first) is one ``os.write`` on an ``O_APPEND`` descriptor; if the
    write fails or comes up short (a full disk), the file is cut back to its previous size before the
    error propagates, so the file only ever holds whole rows.
    """

    def __init__(self, path: Path, columns: Sequence[str] | None = None) -> None:
        self.path = path
        self.columns = list(columns) if columns is not None else None

    def write(self, row: Mapping[str, Any]) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if self.columns is None:
            self.columns = self._read_header() if size else list(row)
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise ValueError(f"{self.path}: row has columns {unknown} that the header {self.columns} lacks")
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, restval="")
        if not size:
            writer.writeheader()
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
        data = text.getvalue().encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])  # a full disk: a short write, then ENOSPC
        except OSError as err:
            os.ftruncate(fd, size)
            raise OSError(err.errno, f"{err.strerror} (appending a row; the log keeps its complete rows)",
                          str(self.path)) from err  # fmt: skip
        finally:
            os.close(fd)

    def position(self) -> int:
        """Bytes written so far, flushed to disk: what `truncate` returns the file to on resume."""
        if not self.path.exists():
            return 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # a checkpoint must never point past what the log has on disk
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def truncate(self, position: int) -> None:
        """Drop what was written after ``position`` (rows of a killed run past its last checkpoint).

        A partial last row (a crash mid-write outside this class's control) is reported with a warning.
        """
        if not self.path.exists():
            if position:
                raise CheckpointError(f"{self.path} is missing but the checkpoint expects {position} bytes of log")
            return
        with self.path.open("r+b") as f:
            content = f.read()
            if len(content) < position:
                raise CheckpointError(
                    f"{self.path} has {len(content)} bytes but the checkpoint expects at least {position}"
                )
            if position and content[position - 1 : position] != b"\n":
                raise CheckpointError(f"{self.path} does not match the checkpoint: byte {position} is not a row end")
            tail = content[position:]
            if tail and not tail.endswith(b"\n"):
                partial = len(tail) - (tail.rfind(b"\n") + 1)
                warnings.warn(f"{self.path}: dropped a partial last row ({partial} bytes) left by a crash",
                              stacklevel=2)  # fmt: skip
            f.truncate(position)

    def _read_header(self) -> list[str]:
        with self.path.open(newline="") as f:
            return next(csv.reader(f))


def csv_cell(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value  # repr: the shortest exact float text


class MetricWindow:
    """Running sums of the agent's scalar tensors between two log rows; floats only at `means`."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.since = 0

    def add(self, info: Mapping[str, Tensor]) -> None:
        for key, value in info.items():
            value = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: float(v.double().item()) / self.count for k, v in self.sums.items()}

    def reset(self, step: int) -> None:
        self.sums, self.count, self.since = {}, 0, step

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count, "since": self.since}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count, self.since = int(state["count"]), int(state["since"])


class CSVSink:
    """``train.csv`` and ``eval.csv`` (one `ROW_COLUMNS` row per policy, after the step): the run's record."""

    def __init__(self, out_dir: Path) -> None:
        self.train = CSVLog(out_dir / TRAIN_LOG)
        self.eval = CSVLog(out_dir / EVAL_LOG, ("step", *ROW_COLUMNS))

    def log_train(self, step: int, row: Mapping[str, Any]) -> None:
        self.train.write({"step": step, **row})

    def log_eval(self, step: int, rows: Sequence[ScoreRow]) -> None:
        for row in rows:
            values = row.to_dict()  # the cost and interval columns go to the JSON reports, not eval.csv
            self.eval.write({"step": step, **{k: "" if values[k] is None else values[k] for k in ROW_COLUMNS}})

    def positions(self) -> dict[str, int]:
        return {TRAIN_LOG: self.train.position(), EVAL_LOG: self.eval.position()}

    def truncate(self, positions: Mapping[str, int]) -> None:
        self.train.truncate(positions[TRAIN_LOG])
        self.eval.truncate(positions[EVAL_LOG])

    def close(self) -> None:
        pass


def read_eval_rows(path: Path) -> list[tuple[int, ScoreRow]]:
    """``(step, row)`` of every row of an ``eval.csv`` (empty when the file does not exist)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [(int(r["step"]), ScoreRow.from_dict(r)) for r in csv.DictReader(f)]


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float) and math.isfinite(v)}


class TensorBoardSink:
    """TensorBoard event files under ``<run>/tb``: ``train/<column>`` and ``eval/<policy label>`` scalars."""

    def __init__(self, out_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)

    def log_train(self, step: int, row: Mapping[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def log_eval(self, step: int, rows: Sequence[ScoreRow]) -> None:
        for row in rows:
            self.writer.add_scalar(f"eval/{row.label}", row.score, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run in offline mode under ``<run>/wandb``; its id is kept in ``<run>/wandb/run_id``."""

    def __init__(self, out_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        folder = out_dir / "wandb"
        folder.mkdir(exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None  # None: a new run, wandb names it
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
        self.run = wandb.init(mode="offline", dir=str(folder), id=run_id, name=out_dir.name, project="vgf-prob",
                              config=dict(config), resume="allow", settings=settings)  # fmt: skip
        id_file.write_text(self.run.id + "\n")

    def log_train(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log({f"train/{k}": v for k, v in _scalars(row).items()}, step=step)

    def log_eval(self, step: int, rows: Sequence[ScoreRow]) -> None:
        self.run.log({f"eval/{r.label}": r.score for r in rows}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowSink:
    """An MLflow run in the SQLite store ``<run>/mlflow.db`` (experiment ``vgf-prob``, run named after the
    directory); its id is kept in ``<run>/mlflow_run_id`` so a resumed run continues it."""

    def __init__(self, out_dir: Path, config: Mapping[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=f"sqlite:///{(out_dir / 'mlflow.db').absolute()}")
        id_file = out_dir / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            return
        experiment = self.client.get_experiment_by_name("vgf-prob")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("vgf-prob")
        self.run_id = self.client.create_run(experiment_id, run_name=out_dir.name).info.run_id
        for key, value in config.items():
            self.client.log_param(self.run_id, key, str(value)[:500])
        id_file.write_text(self.run_id + "\n")

    def _log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key.replace("=", "_"), value, stamp, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_train(self, step: int, row: Mapping[str, Any]) -> None:
        self._log(step, {f"train/{k}": v for k, v in _scalars(row).items()})

    def log_eval(self, step: int, rows: Sequence[ScoreRow]) -> None:
        self._log(step, {f"eval/{r.label}": r.score for r in rows})

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def check_sinks(names: Sequence[str]) -> None:
    """`TrainingSetupError` before training when a chosen sink's package is not installed."""
    for name in names:
        if name in SINK_PACKAGES and importlib.util.find_spec(SINK_PACKAGES[name][0]) is None:
            module, extra = SINK_PACKAGES[name]
            raise TrainingSetupError(f"--log {name} needs the {module} package: pip install 'vgf-prob[{extra}]'")


def make_sinks(names: Sequence[str], out_dir: Path, start_step: int, config: Mapping[str, Any]) -> list[LogSink]:
    """The sinks named (besides csv, which the loop keeps itself), in order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        factories = {"tensorboard": lambda: TensorBoardSink(out_dir, start_step),
                     "wandb": lambda: WandbSink(out_dir, config), "mlflow": lambda: MLflowSink(out_dir, config)}  # fmt: skip
        return [factories[name]() for name in names if name != "csv"]
