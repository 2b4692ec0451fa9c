"""Fault injection: a user's bad day (issue 11). Each case checks the message and that no earlier data is lost.

Two writers in one run directory, a run killed before its first checkpoint and rerun, a torn or unwritable
log row, a corrupt latest.pt followed by saves, dead writers' temporary files, zero and negative numbers,
a CUDA request on a CPU machine, files that are not what their names say, and directories that are not
runs. The CLI's promise: an expected failure is one line ``vgf-prob: error: ...`` with exit status 2.
"""

from __future__ import annotations

import csv
import errno
import os
import pickle
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rl_helpers import Crash, crash_after, one_thread, spec  # noqa: F401 (one_thread: autouse fixture)

from vgf_prob import cli
from vgf_prob.rl import checkpoint as ckpt
from vgf_prob.rl.run import logs
from vgf_prob.rl.checkpoint import CheckpointError, RunDirBusy, load_checkpoint, load_latest, save_checkpoint
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.offline_dataset import OfflineDataset
from vgf_prob.rl.run.spec import TrainingSetupError
from vgf_prob.rl.run.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(batch_size=8, critic_hidden_dims=(16, 16), bc_hidden_dims=(16, 16), amortized_hidden_dims=(16, 16),
            num_particles=4, flow_steps=2, train_budget=1)  # fmt: skip
TINY_CLI = ["--config", "batch_size=8", "critic_hidden_dims=16,16", "bc_hidden_dims=16,16",
            "amortized_hidden_dims=16,16", "flow_steps=2", "num_particles=4", "train_budget=1"]  # fmt: skip


def tiny_dataset(size: int = 48, seed: int = 0) -> OfflineDataset:
    g = torch.Generator().manual_seed(seed)
    return OfflineDataset({
        "observations": torch.randn(size, 3, generator=g), "actions": torch.rand(size, 2, generator=g) * 2 - 1,
        "rewards": torch.randn(size, generator=g), "next_observations": torch.randn(size, 3, generator=g),
        "masks": torch.ones(size),
    })  # fmt: skip


def write_hdf5(path: Path, obs_dim: int = 11, action_dim: int = 3, n: int = 60, **replace) -> Path:
    """A small D4RL-format file (episodes of 20 steps ended by timeouts); ``replace`` swaps arrays."""
    rng = np.random.default_rng(0)
    timeouts = np.zeros(n)
    timeouts[19::20] = 1
    arrays = {"observations": rng.standard_normal((n, obs_dim)), "actions": rng.uniform(-1, 1, (n, action_dim)),
              "rewards": rng.standard_normal(n), "terminals": np.zeros(n), "timeouts": timeouts, **replace}  # fmt: skip
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to prove that nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    """The one stderr line of a CLI error (asserts that there is exactly one and that it is the CLI's)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vgf-prob"), err
    assert "error:" in lines[0] and "Traceback" not in err
    return lines[0]


def read_steps(path: Path) -> list[int]:
    with path.open(newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def rows_without_timing(path: Path) -> list[dict[str, str]]:
    """The log's rows without ``steps_per_second`` (wall-clock speed differs between runs; all else may not)."""
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "steps_per_second"} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------ one writer
def test_second_writer_is_refused_with_the_holders_pid_and_the_lock_dies_with_its_process(tmp_path, capsys):
    """A real ``vgf-prob train`` holds the directory; a second one (same or other seed) exits 2 naming
    its PID and writes nothing; once the first is SIGKILLed, the directory is free again at once."""
    data = write_hdf5(tmp_path / "data.hdf5")
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "vgf_prob", "train", "--dataset", str(data), "--out", str(out), "--steps", "100000",
         "--checkpoint-every", "5", "--log-every", "1", "--no-progress", "--threads", "1", *TINY_CLI],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "latest.pt").exists():  # running and past its first checkpoint
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert (out / ".vgf-prob.lock").read_text().strip() == str(first.pid)
        for extra in ([], ["--seed", "1"], ["--resume"]):
            assert cli.main(["train", "--dataset", str(data), "--out", str(out), "--steps", "100000",
                             "--no-progress", *extra, *TINY_CLI]) == 2  # fmt: skip
            line = error_line(capsys)
            assert f"in use by another vgf-prob process (PID {first.pid})" in line
        with pytest.raises(RunDirBusy, match=f"PID {first.pid}"):
            train(VGFConfig(**TINY), tiny_dataset(), spec(out, 10))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = read_steps(out / "train.csv")
    assert steps == list(range(1, len(steps) + 1))  # one writer: no row twice, none from another seed
    before = load_checkpoint(out / "latest.pt")["step"]
    result = train(VGFConfig(**TINY), write_hdf5_dataset(data),
                   spec(out, before + 2, resume=True, log_every=1, checkpoint_every=5))  # fmt: skip
    assert result.step == before + 2  # the killed holder's lock is gone with it
    assert read_steps(out / "train.csv") == list(range(1, before + 3))


def write_hdf5_dataset(path: Path) -> OfflineDataset:
    from vgf_prob.rl.d4rl import load_d4rl_hdf5

    return load_d4rl_hdf5(path)


def test_lock_is_reentrant_in_one_process_and_released_after_the_run(tmp_path):
    out = tmp_path / "run"
    with ckpt.RunLock(out):
        train(VGFConfig(**TINY), tiny_dataset(), spec(out, 2, log_every=1, checkpoint_every=2))
    holder = subprocess.run(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')", str(out / ".vgf-prob.lock")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert holder.stdout.strip() == "free"


# ------------------------------------------------------------------------------ killed before a checkpoint
def test_kill_before_first_checkpoint_then_rerun_starts_clean_and_keeps_the_old_logs(tmp_path, monkeypatch):
    config, out = VGFConfig(**TINY), tmp_path / "run"
    dataset = tiny_dataset()
    crash_after(monkeypatch, dataset, 7)  # rows 1..7 logged, first checkpoint due at step 10
    with pytest.raises(Crash):
        train(config, dataset, spec(out, 10, log_every=1, checkpoint_every=10))
    monkeypatch.undo()
    old_log = (out / "train.csv").read_bytes()
    assert read_steps(out / "train.csv") == list(range(1, 8)) and not (out / "latest.pt").exists()

    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(config, tiny_dataset(), spec(out, 10, resume=True))
    with pytest.warns(UserWarning, match=r"held logs but no checkpoint.*moved train\.csv to .*stale-"):
        train(config, tiny_dataset(), spec(out, 10, log_every=1, checkpoint_every=10))

    assert read_steps(out / "train.csv") == list(range(1, 11))  # 10 rows, in order, none twice
    (aside,) = out.glob("stale-*")
    assert (aside / "train.csv").read_bytes() == old_log


# -------------------------------------------------------------------------------------------- csv rows
def test_disk_full_during_a_log_row_leaves_whole_rows_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    config, kwargs = VGFConfig(**TINY), dict(log_every=1, checkpoint_every=4, progress=False, seed=2)
    full = train(config, tiny_dataset(), spec(tmp_path / "full", 10, **kwargs))

    out = tmp_path / "run"
    calls = {"n": 0}

    def disk_fills(fd, data):  # the 7th row: half of it reaches the disk, then ENOSPC
        calls["n"] += 1
        if calls["n"] < 7:
            return os.write(fd, data)
        if calls["n"] == 7:
            return os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(logs, "os", types.SimpleNamespace(**{**vars(os), "write": disk_fills}))
    with pytest.raises(OSError, match="No space left on device") as info:
        train(config, tiny_dataset(), spec(out, 10, **kwargs))
    assert info.value.filename == str(out / "train.csv")
    monkeypatch.undo()
    text = (out / "train.csv").read_text()
    assert text.endswith("\n") and read_steps(out / "train.csv") == [1, 2, 3, 4, 5, 6]  # no half row
    assert load_checkpoint(out / "latest.pt")["step"] == 4

    resumed = train(config, tiny_dataset(), spec(out, 10, resume=True, **kwargs))
    assert rows_without_timing(resumed.train_log) == rows_without_timing(full.train_log)
    assert read_steps(resumed.train_log) == list(range(1, 11))


def test_partial_last_row_found_on_resume_is_dropped_with_a_warning(tmp_path, monkeypatch):
    config, kwargs = VGFConfig(**TINY), dict(log_every=1, checkpoint_every=4, progress=False)
    full = train(config, tiny_dataset(), spec(tmp_path / "full", 8, **kwargs))
    out = tmp_path / "run"
    dataset = tiny_dataset()
    crash_after(monkeypatch, dataset, 6)
    with pytest.raises(Crash):
        train(config, dataset, spec(out, 8, **kwargs))
    monkeypatch.undo()
    with (out / "train.csv").open("ab") as f:  # a crash outside our control: half of row 7
        f.write(b"7,0.12345")
    with pytest.warns(UserWarning, match=r"train\.csv: dropped a partial last row \(9 bytes\)"):
        resumed = train(config, tiny_dataset(), spec(out, 8, resume=True, **kwargs))
    assert rows_without_timing(resumed.train_log) == rows_without_timing(full.train_log)


# ---------------------------------------------------------------------------------------- checkpoints
def payload(step: int) -> dict:
    return {"step": step, "config": VGFConfig(**TINY).to_dict(), "agent": {"w": torch.full((3,), float(step))},
            "rng": ckpt.capture_rng_state()}  # fmt: skip


def test_corrupt_latest_then_two_saves_never_makes_previous_unreadable(tmp_path):
    save_checkpoint(tmp_path, payload(1))
    latest = save_checkpoint(tmp_path, payload(2))
    corrupt = latest.read_bytes()[:300]
    latest.write_bytes(corrupt)
    with pytest.warns(UserWarning, match="resuming from .*previous.pt"):
        assert load_latest(tmp_path)["step"] == 1

    with pytest.warns(UserWarning, match=r"latest\.pt.*kept it as .*latest\.pt\.unreadable"):
        save_checkpoint(tmp_path, payload(3))
    assert load_checkpoint(tmp_path / "previous.pt")["step"] == 1  # the good one stays
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 3
    assert (tmp_path / "latest.pt.unreadable").read_bytes() == corrupt  # kept, not destroyed

    save_checkpoint(tmp_path, payload(4))
    assert [load_checkpoint(tmp_path / n)["step"] for n in ("latest.pt", "previous.pt")] == [4, 3]


def test_resume_from_previous_after_a_corrupt_latest_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    config, kwargs = VGFConfig(**TINY), dict(log_every=1, checkpoint_every=4, progress=False)
    full = train(config, tiny_dataset(), spec(tmp_path / "full", 12, **kwargs))
    out = tmp_path / "run"
    dataset = tiny_dataset()
    crash_after(monkeypatch, dataset, 9)  # checkpoints at 4 and 8
    with pytest.raises(Crash):
        train(config, dataset, spec(out, 12, **kwargs))
    monkeypatch.undo()
    (out / "latest.pt").write_bytes(b"\0" * 100)
    with pytest.warns(UserWarning) as caught:
        resumed = train(config, tiny_dataset(), spec(out, 12, resume=True, **kwargs))
    messages = " | ".join(str(w.message) for w in caught)
    assert "resuming from" in messages and "step 4" in messages and "latest.pt.unreadable" in messages
    for (name, a), (_, b) in zip(full.agent.state_dict().items(), resumed.agent.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert [load_checkpoint(out / n)["step"] for n in ("latest.pt", "previous.pt")] == [12, 8]


def test_both_checkpoints_unreadable_names_both_and_never_advises_weights_only_false(tmp_path):
    class Payload:  # a pickle that would run code on an unsafe load
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"step": 1, "agent": Payload()}, tmp_path / "latest.pt")
    (tmp_path / "previous.pt").write_bytes(pickle.dumps([1, 2, 3])[:5])
    with pytest.raises(CheckpointError) as info:
        load_latest(tmp_path)
    message = str(info.value)
    assert "latest.pt" in message and "previous.pt" in message and "safe load refuses" in message
    assert "weights_only" not in message and "\n" not in message


def test_dead_writers_temp_files_are_removed_at_the_next_save_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan = tmp_path / f".latest.pt.{dead.pid}.tmp"
        orphan_previous = tmp_path / f".previous.pt.{dead.pid}.tmp"
        in_progress = tmp_path / f".latest.pt.{alive.pid}.tmp"
        for path in (orphan, orphan_previous, in_progress):
            path.write_bytes(b"x" * 1000)
        save_checkpoint(tmp_path, payload(1))
        assert not orphan.exists() and not orphan_previous.exists() and in_progress.exists()
    finally:
        alive.kill()
        alive.wait()


# -------------------------------------------------------------------------------------- numbers as given
@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["train", "--steps", "0"], "--steps"),
        (["train", "--eval-episodes", "0"], "--eval-episodes"),
        (["train", "--eval-every", "0"], "--eval-every"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every"),
        (["train", "--log-every", "0"], "--log-every"),
        (["train", "--threads", "0"], "--threads"),
        (["train", "--threads", "-1"], "--threads"),
        (["train", "--budgets", "0", "-1"], "--budgets"),
        (["train", "--seed", "-3"], "--seed"),
        (["train", "--steps", "1.5"], "--steps"),
        (["eval", "run", "--episodes", "0"], "--episodes"),
        (["eval", "run", "--budgets", "nan"], "--budgets"),
        (["eval", "run", "--max-flow-steps", "0"], "--max-flow-steps"),
        (["data", "generate", "--episodes", "0"], "--episodes"),
    ],
)
def test_zero_and_negative_numbers_are_errors_not_defaults(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, *(["--out", str(tmp_path / "run")] if argv[0] == "train" else [])])
    assert info.value.code == 2
    assert f"argument {option}:" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_zero_is_zero_where_it_makes_sense(tmp_path, capsys):
    """``--seed 0`` and ``--budgets 0`` are values, and ``--steps`` trains exactly what it says."""
    data = write_hdf5(tmp_path / "data.hdf5")
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(data), "--out", str(out), "--steps", "3", "--seed", "0",
                     "--budgets", "0", "--no-progress", *TINY_CLI]) == 0  # fmt: skip
    assert read_steps(out / "train.csv") == [1, 2, 3]
    with pytest.raises(TrainingSetupError, match="steps must be a positive int, got 0"):
        train(VGFConfig(**TINY), tiny_dataset(), spec(tmp_path / "zero", 0))
    assert not (tmp_path / "zero").exists()


# ------------------------------------------------------------------------------------------- the device
def test_cuda_request_on_a_cpu_machine_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_hdf5(tmp_path / "data.hdf5")
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(data), "--out", str(out), "--device", "cuda", *TINY_CLI]) == 2
    assert "device 'cuda' requested but" in error_line(capsys)
    assert not out.exists()
    assert cli.main(["train", "--dataset", str(data), "--out", str(out), "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in error_line(capsys)
    with pytest.raises(TrainingSetupError, match="device 'cuda:1' requested but"):
        train(VGFConfig(**TINY), tiny_dataset(), spec(out, 2, device="cuda:1"))


# ------------------------------------------------------------------------------------------- bad files
def test_files_that_are_not_what_they_claim_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "text.hdf5").write_text("this is not HDF5")
    assert cli.main(["train", "--dataset", str(tmp_path / "text.hdf5")]) == 2
    assert "is not an HDF5 file" in error_line(capsys)

    write_hdf5(tmp_path / "bytes.hdf5", observations=np.array([b"abc"] * 60))
    assert cli.main(["data", "inspect", str(tmp_path / "bytes.hdf5")]) == 2
    assert "observations: expected numbers, got an array of dtype |S3" in error_line(capsys)

    timeouts = np.ones(60)
    write_hdf5(tmp_path / "timeouts.hdf5", timeouts=timeouts)
    assert cli.main(["data", "inspect", str(tmp_path / "timeouts.hdf5")]) == 2
    assert "no usable transitions: 60 of the 60 steps end an episode by timeout" in error_line(capsys)

    for name in ("cube-single-play-v0.npz", "cube-single-play-v0-val.npz"):
        np.savez(tmp_path / name, observation=np.zeros((4, 3)))  # a typo'd key
    assert cli.main(["data", "inspect", str(tmp_path / "cube-single-play-v0.npz"), "--task-id", "1"]) == 2
    assert "missing array(s) ['observations', 'actions', 'terminals'] of an OGBench dataset" in error_line(capsys)

    for name in ("puzzle-3x3-play-v0.npz", "puzzle-3x3-play-v0-val.npz"):
        (tmp_path / name).write_bytes(pickle.dumps({"a": 1}))
    assert cli.main(["data", "inspect", str(tmp_path / "puzzle-3x3-play-v0.npz")]) == 2
    line = error_line(capsys)
    assert "is not an .npz archive" in line and "allow_pickle" not in line


def test_damaged_minari_dataset_is_one_named_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    data = tmp_path / "mujoco" / "hopper" / "medium-v0" / "data"
    data.mkdir(parents=True)
    (data / "metadata.json").write_text("{ not json")
    assert cli.main(["data", "inspect", "mujoco/hopper/medium-v0"]) == 2
    assert f"Minari dataset 'mujoco/hopper/medium-v0' at {data} is not readable" in error_line(capsys)


def test_unreadable_checkpoint_in_eval_is_one_line(tmp_path, capsys):
    (tmp_path / "latest.pt").write_bytes(b"garbage")
    assert cli.main(["eval", str(tmp_path)]) == 2
    line = error_line(capsys)
    assert "cannot read checkpoint" in line and "weights_only" not in line


# ---------------------------------------------------------------------------------- the run directory
def test_out_that_is_a_file_or_a_foreign_directory_is_refused_and_left_alone(tmp_path, capsys):
    data = write_hdf5(tmp_path / "data.hdf5")
    assert cli.main(["train", "--dataset", str(data), "--out", str(data)]) == 2
    assert "is a file, not a directory" in error_line(capsys)
    assert cli.main(["train", "--dataset", str(data), "--out", str(data / "sub")]) == 2
    assert "is a file" in error_line(capsys)

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "summary.json").write_text('{"mine": 1}')
    before = snapshot(foreign)
    assert cli.main(["train", "--dataset", str(data), "--out", str(foreign), "--steps", "2", *TINY_CLI]) == 2
    assert "is not empty and is not a vgf-prob run directory (it holds summary.json)" in error_line(capsys)
    assert snapshot(foreign) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only modes")
def test_out_in_a_read_only_directory_is_one_line(tmp_path, capsys):
    data = write_hdf5(tmp_path / "data.hdf5")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert cli.main(["train", "--dataset", str(data), "--out", str(locked / "run")]) == 2
        assert "is not writable" in error_line(capsys)
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------ environment and config, early
def test_wrong_environment_is_found_before_training(tmp_path, capsys):
    data = write_hdf5(tmp_path / "data.hdf5", obs_dim=4, action_dim=2)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(data), "--env", "hopper-medium-v2", "--out", str(out),
                     "--steps", "2", *TINY_CLI]) == 2  # fmt: skip
    line = error_line(capsys)
    assert "environment 'hopper-medium-v2' has observations of shape (11,)" in line and "obs_dim 4" in line
    assert not out.exists()
    assert cli.main(["train", "--dataset", str(data), "--env", "hopper-mediun-v2", "--out", str(out)]) == 2
    assert "unknown environment 'hopper-mediun-v2'" in error_line(capsys)
    assert not out.exists()


def test_eval_with_an_unknown_environment_is_one_line(tmp_path, capsys):
    train(VGFConfig(**TINY), tiny_dataset(), spec(tmp_path, 2, log_every=1, checkpoint_every=2))
    assert cli.main(["eval", str(tmp_path), "--env", "nowhere-v0", "--no-progress"]) == 2
    assert "unknown environment 'nowhere-v0'" in error_line(capsys)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("lr=abc", "--config lr: expected a finite number (float), got 'abc'"),
        ("discount=true", "--config discount: expected a finite number (float), got 'true'"),
        ("batch_size=12.5", "--config batch_size: expected a whole number (int), got '12.5'"),
        ("critic_hidden_dims=64,x", "--config critic_hidden_dims: expected comma-separated whole numbers"),
        ("compile=yes", "--config compile: expected true or false (bool), got 'yes'"),
        ("test_budget=-1", "test_budget must be an int >= 0, got -1"),
        ("bach_size=8", "unknown VGFConfig field(s) ['bach_size']"),
    ],
)
def test_config_values_are_typed_by_the_field(item, message, tmp_path, capsys):
    assert cli.main(["train", "--dataset", str(write_hdf5(tmp_path / "d.hdf5")), "--config", item]) == 2
    assert message in error_line(capsys)


def test_resume_refuses_a_log_whose_checkpoint_position_is_not_a_row_end(tmp_path):
    """The checkpoint stores train.csv's byte length; a log changed before that point (here one digit more in
    its first row) no longer ends a row there. Resume must refuse, naming the file, and leave it as it is,
    rather than cut a row in two."""
    config, out = VGFConfig(**TINY), tmp_path / "run"
    train(config, tiny_dataset(), spec(out, 4, log_every=1, checkpoint_every=4))
    log = out / "train.csv"
    data = log.read_bytes()
    comma = data.index(b",", data.index(b"\n"))  # row 1's second value gains a leading zero: later bytes move
    log.write_bytes(data[: comma + 1] + b"0" + data[comma + 1 :])
    before = log.read_bytes()
    with pytest.raises(CheckpointError, match=r"train\.csv does not match the checkpoint: byte \d+ is not a row end"):
        train(config, tiny_dataset(), spec(out, 6, resume=True, log_every=1, checkpoint_every=4))
    assert log.read_bytes() == before
