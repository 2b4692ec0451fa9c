"""The log sinks of ``--log csv,tensorboard,wandb,mlflow``: one short run writes to all four, and each is read back
with its own reader (TensorBoard's EventAccumulator, W&B's record protobuf from the offline run file, MLflow's
client on the run's SQLite store) and compared with the CSV log, the run's record."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from rl_helpers import one_thread, spec  # noqa: F401 (one_thread: autouse fixture)

from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.offline_dataset import OfflineDataset
from vgf_prob.rl.run.spec import TrainingSetupError
from vgf_prob.rl.run.trainer import train

TINY = VGFConfig(batch_size=8, critic_hidden_dims=(16, 16), bc_hidden_dims=(16, 16), num_particles=3, flow_steps=2,
                 train_budget=1)  # fmt: skip
METRICS = ("critic_loss", "bc_loss", "q_mean")


def dataset(size: int = 48) -> OfflineDataset:
    g = torch.Generator().manual_seed(0)
    return OfflineDataset({
        "observations": torch.randn(size, 3, generator=g), "actions": torch.rand(size, 2, generator=g) * 2 - 1,
        "rewards": torch.randn(size, generator=g), "next_observations": torch.randn(size, 3, generator=g),
        "masks": torch.ones(size),
    })  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    """A 6-step run logging every 2 steps to every sink; the CSV's values by metric and step."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path_factory.mktemp("sinks") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TINY, dataset(), spec(out, 6, log_every=2, checkpoint_every=6, log=("csv", "tensorboard", "wandb",
                                                                                  "mlflow")))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    with (out / "train.csv").open(newline="") as f:
        logged = list(csv.DictReader(f))
    return out, {m: {int(r["step"]): float(r[m]) for r in logged} for m in METRICS}


def test_tensorboard_reads_back_what_the_csv_holds(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, expected = run
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    for metric in METRICS:
        got = {e.step: e.value for e in events.Scalars(f"train/{metric}")}
        assert got.keys() == expected[metric].keys() == {2, 4, 6}
        assert all(math.isclose(got[s], expected[metric][s], rel_tol=1e-6) for s in got)  # float32 events


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file: its 32 KiB-block record log (7-byte header per chunk:
    checksum, length, type; full / first / middle / last), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_reads_back_what_the_csv_holds(run):
    out, expected = run
    (run_file,) = (out / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    assert run_file.name == f"run-{(out / 'wandb' / 'run_id').read_text().strip()}.wandb"
    history = [row for row in wandb_history(run_file) if "train/critic_loss" in row]
    for metric in METRICS:
        got = {row["_step"]: row[f"train/{metric}"] for row in history}
        assert got == expected[metric]  # JSON numbers: exact


def test_mlflow_store_reads_back_what_the_csv_holds(run):
    from mlflow.tracking import MlflowClient

    out, expected = run
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.params["batch_size"] == "8"
    for metric in METRICS:
        got = {m.step: m.value for m in client.get_metric_history(run_id, f"train/{metric}")}
        assert got == expected[metric]


def test_a_sink_without_its_package_or_without_csv_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrainingSetupError, match=r"--log wandb needs the wandb package: pip install 'vgf-prob\[wandb\]'"):
        train(TINY, dataset(), spec(tmp_path / "run", 2, log=("csv", "wandb")))
    with pytest.raises(TrainingSetupError, match="must include csv"):
        train(TINY, dataset(), spec(tmp_path / "run", 2, log=("tensorboard",)))
    assert not (tmp_path / "run").exists()
