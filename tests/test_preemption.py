"""Runs that survive a cluster (issue 24), each with a real ``vgf-prob train`` process: SIGTERM / SIGINT write a
checkpoint at the step reached and a resume continues bit-identically; a diverging run stops with one line and
leaves only finite checkpoints; ``--resume --out DIR`` alone continues the run with its own settings."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rl_helpers import one_thread  # noqa: F401 (one_thread: autouse fixture)

from vgf_prob import cli
from vgf_prob.rl.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_CLI = ["--config", "batch_size=8", "critic_hidden_dims=16,16", "bc_hidden_dims=16,16", "flow_steps=2",
            "num_particles=4", "train_budget=1"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small D4RL-format file (obs 11, actions 3; no environment is known for its name: no evaluation)."""
    path = tmp_path_factory.mktemp("data") / "data.hdf5"
    rng = np.random.default_rng(0)
    n = 60
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"] = rng.standard_normal((n, 11)), rng.uniform(-1, 1, (n, 3))
        f["rewards"], f["terminals"], f["timeouts"] = rng.standard_normal(n), np.zeros(n), np.arange(n) % 20 == 19
    return path


def start(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vgf_prob", "train", "--dataset", str(data), "--out", str(out), "--no-progress",
         "--threads", "1", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def rows(path: Path) -> list[dict[str, str]]:
    """A train.csv's rows without the wall-clock rate (the only column allowed to differ between runs)."""
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "steps_per_second"} for row in csv.DictReader(f)]


def wait_for_rows(process: subprocess.Popen, log: Path, count: int) -> None:
    deadline = time.monotonic() + 180
    while not (log.exists() and log.read_text().count("\n") > count):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the run logged too slowly"
        time.sleep(0.1)


def assert_same_tensors(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_tensors(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}[{i}]")


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_the_step_reached_and_resume_equals_the_uninterrupted_run(data, tmp_path, sig, status):
    """Stopped mid-run (twice in a row: the second signal must not cut the save), the run exits 128 + signal with
    one line naming the resume command; ``--resume --out DIR --steps N`` with no other flag then ends exactly
    where an uninterrupted N-step run ends: the same log rows and bit-identical weights and optimiser states."""
    out = tmp_path / "stopped"
    process = start(data, out, "--steps", "100000", "--log-every", "1", "--checkpoint-every", "100000", *TINY_CLI)
    wait_for_rows(process, out / "train.csv", 5)
    process.send_signal(sig)
    process.send_signal(sig)  # a second signal while it stops
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"stopped by {sig.name} at step" in lines[0], err
    assert f"continue with: vgf-prob train --resume --out {out}" in lines[0]
    step = load_checkpoint(out / "latest.pt")["step"]
    assert f"at step {step};" in lines[0] and len(rows(out / "train.csv")) == step  # no row past the checkpoint

    total = step + 3
    assert cli.main(["train", "--dataset", str(data), "--out", str(tmp_path / "full"), "--steps", str(total),
                     "--log-every", "1", "--checkpoint-every", "100000", "--no-progress", "--threads", "1",
                     *TINY_CLI]) == 0  # fmt: skip
    resumed = subprocess.run([sys.executable, "-m", "vgf_prob", "train", "--resume", "--out", str(out), "--steps",
                              str(total), "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert rows(out / "train.csv") == rows(tmp_path / "full" / "train.csv")
    ours, theirs = load_checkpoint(out / "latest.pt"), load_checkpoint(tmp_path / "full" / "latest.pt")
    assert ours["step"] == theirs["step"] == total
    assert_same_tensors(ours["agent"], theirs["agent"])


def test_a_diverging_run_stops_with_one_line_and_leaves_only_finite_checkpoints(data, tmp_path):
    """lr = 1e30: the first update is finite (a checkpoint at step 1), the second overflows; the checkpoint due
    at step 2 is not written, the run exits 2 naming the step, the tensor and the last good checkpoint."""
    out = tmp_path / "run"
    process = start(data, out, "--steps", "400", "--log-every", "4", "--checkpoint-every", "1", *TINY_CLI, "lr=1e30")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vgf-prob: error: training diverged at step 2: non-finite "), err
    assert f"last good checkpoint: {out / 'latest.pt'} (step 1)" in lines[0] and "Traceback" not in err
    for name in ("latest.pt", "previous.pt"):
        if (out / name).exists():
            payload = load_checkpoint(out / name)
            assert payload["step"] == 1
            assert all(torch.isfinite(t).all() for t in _tensors(payload["agent"]))

    quiet = tmp_path / "logged"  # the log step sees it first when no checkpoint is due
    assert cli.main(["train", "--dataset", str(data), "--out", str(quiet), "--steps", "400", "--log-every", "4",
                     "--no-progress", *TINY_CLI, "lr=1e30"]) == 2  # fmt: skip
    assert not (quiet / "latest.pt").exists()
    (last,) = rows(quiet / "train.csv")  # the diverged window's row is logged: it shows what went wrong
    assert last["step"] == "4" and not all(np.isfinite(float(v)) for v in last.values())


def test_allow_nonfinite_keeps_training(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(data), "--out", str(out), "--steps", "8", "--log-every", "4",
                     "--no-progress", "--allow-nonfinite", *TINY_CLI, "lr=1e30"]) == 0  # fmt: skip
    assert load_checkpoint(out / "latest.pt")["step"] == 8
    assert not all(np.isfinite(float(r["critic_loss"])) for r in rows(out / "train.csv"))


def test_resume_takes_every_setting_from_the_checkpoint_and_refuses_a_differing_one_by_name(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(data), "--out", str(out), "--steps", "4", "--log-every", "2",
                     "--seed", "7", "--no-progress", *TINY_CLI]) == 0  # fmt: skip
    before = load_checkpoint(out / "latest.pt")
    assert cli.main(["train", "--resume", "--out", str(out), "--seed", "8", "--config", "batch_size=16"]) == 2
    line = capsys.readouterr().err.strip()
    assert "--seed: checkpoint 7, given 8" in line and "--config batch_size: checkpoint 8, given 16" in line
    assert "--steps" in line and "\n" not in line  # it lists what may change
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the dataset path was stored absolute: a resume from elsewhere finds it
    try:
        assert cli.main(["train", "--resume", "--out", str(out), "--steps", "6", "--seed", "7"]) == 0
    finally:
        os.chdir(cwd)
    after = load_checkpoint(out / "latest.pt")
    assert after["step"] == 6 and after["config"] == before["config"] and after["run"]["seed"] == 7
    assert [r["step"] for r in rows(out / "train.csv")] == ["2", "4", "6"]


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, list | tuple):
        for value in state:
            yield from _tensors(value)


def test_non_finite_values_at_an_evaluation_are_one_line(data, tmp_path, capsys, monkeypatch):
    """The operator refuses a non-finite velocity with FloatingPointError; the run ends with one line, exit 2."""
    from vgf_prob.rl.run import trainer

    def diverged(*args, **kwargs):
        raise FloatingPointError("the velocity field returned 40 non-finite values")

    monkeypatch.setattr(trainer, "compare_policies", diverged)
    assert cli.main(["train", "--dataset", str(data), "--env", "hopper-medium-v2", "--out", str(tmp_path / "run"),
                     "--steps", "2", "--log-every", "1", "--no-progress", *TINY_CLI]) == 2  # fmt: skip
    line = capsys.readouterr().err.strip()
    assert line == ("vgf-prob: error: training diverged at step 2: non-finite values at evaluation (the velocity field "
                    f"returned 40 non-finite values); last good checkpoint: {tmp_path / 'run' / 'latest.pt'} (step 1) "
                    "(lower lr, or --allow-nonfinite to keep going)")  # fmt: skip


def write_recipe(path: Path, data_dir: Path, steps: int) -> Path:
    path.write_text(f"""
[run]
steps = {steps}
seeds = [0]
eval_every = {steps}
eval_episodes = 1
budgets = [0]
checkpoint_every = {steps}
log_every = 1
dataset_dir = "{data_dir}"
out_dir = "{path.parent / 'runs'}"

[config]
batch_size = 8
critic_hidden_dims = [16, 16]
bc_hidden_dims = [16, 16]
flow_steps = 2
num_particles = 4
train_budget = 1

[tasks.hopper-medium-v2]
""")
    return path


def test_reproduce_script_stops_on_sigterm_and_continues_when_run_again(data, tmp_path):
    """``recipes/reproduce.py`` trains in its own process: SIGTERM checkpoints the run in progress and exits 143
    naming the command to continue; run again (here with fewer steps in the recipe), it resumes and finishes."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hopper-medium-v2.hdf5").write_bytes(data.read_bytes())
    recipe = write_recipe(tmp_path / "tiny.toml", tmp_path / "data", 100000)
    run_dir = tmp_path / "runs" / "hopper-medium-v2" / "seed0"
    command = [sys.executable, "recipes/reproduce.py", str(recipe)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_rows(process, run_dir / "train.csv", 3)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("reproduce.py: stopped by signal 15 at step ")
    assert f"continue with: python recipes/reproduce.py {recipe}" in err
    step = load_checkpoint(run_dir / "latest.pt")["step"]
    write_recipe(recipe, tmp_path / "data", step + 2)
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(run_dir / "latest.pt")["step"] == step + 2
    assert [int(r["step"]) for r in rows(run_dir / "train.csv")] == list(range(1, step + 3))
