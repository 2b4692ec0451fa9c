"""Recipes and sweeps: expansion into runs, the shared report, the dry run, and a real local Ray sweep
whose trial is killed mid-way and resumes from its Ray checkpoint to the same result as an uninterrupted run."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vgf_prob import cli
from vgf_prob.rl.run.experiment import build_config
from vgf_prob.rl.run.spec import parse_overrides
from vgf_prob.rl.recipes import (
    RecipeError,
    check_runs,
    expand_runs,
    load_recipe,
    parse_grid,
    run_results,
    select_runs,
    summarize,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = """
[config]
batch_size = 8
critic_hidden_dims = [16, 16]
bc_hidden_dims = [16, 16]
amortized_hidden_dims = [16, 16]
flow_steps = 2
"""


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def d4rl_recipe(tmp_path: Path, steps: int = 8, seeds: str = "[0, 1]") -> Path:
    return write_recipe(tmp_path / "tiny.toml", f"""
[run]
steps = {steps}
seeds = {seeds}
eval_every = 4
eval_episodes = 1
budgets = [0, 1]
checkpoint_every = 2
device = "cpu"
dataset_dir = "{tmp_path / 'data'}"
out_dir = "{tmp_path / 'runs'}"
{TINY_CONFIG}
[tasks.hopper-medium-v2]
published = 97.9
[tasks.walker2d-medium-v2]
""")


def write_tiny_d4rl(path: Path, obs_dim: int, action_dim: int, seed: int) -> None:
    """40 random transitions in 4 episodes that end by timeout (the D4RL file layout)."""
    rng = np.random.default_rng(seed)
    n = 40
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.standard_normal((n, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, (n, action_dim)).astype(np.float32)
        f["rewards"] = rng.uniform(0, 1, n).astype(np.float32)
        f["terminals"] = np.zeros(n, dtype=bool)
        f["timeouts"] = np.arange(n) % 10 == 9


def write_run_logs(run_dir: Path, evals: list[tuple[int, str, str, float]], sps: list[tuple[int, float]]) -> None:
    """A run directory's eval.csv rows (step, policy, L_test, score) and train.csv rows (step, steps/s)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "eval.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "policy", "budget", "budget_type", "score", "score_std", "mean_return", "return_std",
                         "episodes", "score_kind"])  # fmt: skip
        for step, policy, l_test, score in evals:
            writer.writerow([step, policy, l_test, "steps" if l_test else "", score, 0.0, score, 0.0, 1, "return"])
    with (run_dir / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "critic_loss", "steps_per_second"])
        for step, rate in sps:
            writer.writerow([step, 0.5, rate])


# ============================================================================================== expansion
def test_expansion_tasks_envs_grid_and_config_precedence(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", f"""
[run]
steps = 100
seeds = [0, 1]
eval_every = 50
eval_episodes = 2
budgets = [0, 2]
checkpoint_every = 50
dataset_dir = "{tmp_path}/data"
out_dir = "out"
tasks_per_env = [2, 4]

[config]
alpha = 0.3
discount = 0.9

[grid]
alpha = [0.05, 0.1]

[tasks.hopper-medium-v2]
published = 97.9
config = {{ discount = 0.95 }}

[envs.puzzle-3x3-play-v0]
steps = 20
fql = 30
"""))
    monkeypatch.chdir(tmp_path)
    runs = expand_runs(recipe, parse_grid(["vgf_lr=[0.01]"]))
    assert len(runs) == (1 + 2) * 2 * 2  # (one D4RL task + 2 OGBench tasks) x 2 alphas x 2 seeds
    hopper = runs[0]
    assert (hopper.task, hopper.seed, hopper.steps, hopper.group) == ("hopper-medium-v2", 0, 100, "hopper-medium-v2")
    assert hopper.dataset == str(tmp_path / "data" / "hopper-medium-v2.hdf5")
    # the grid point wins over [config], the task's config over [config]
    assert hopper.overrides == {"alpha": 0.05, "discount": 0.95, "vgf_lr": 0.01}
    assert hopper.out == tmp_path / "out" / "hopper-medium-v2" / "alpha=0.05,vgf_lr=0.01" / "seed0"
    assert hopper.references == {"published": 97.9}
    puzzle = [r for r in runs if r.group == "puzzle-3x3-play-v0"]
    assert {r.task for r in puzzle} == {"puzzle-3x3-play-singletask-task2-v0", "puzzle-3x3-play-singletask-task4-v0"}
    assert {r.task_id for r in puzzle} == {2, 4} and all(r.steps == 20 and r.references == {"fql": 30} for r in puzzle)
    assert puzzle[0].dataset == str(tmp_path / "data" / "puzzle-3x3-play-v0.npz")
    assert len({r.name for r in runs}) == len(runs)
    assert len(select_runs(runs, tasks=["puzzle-3x3-play-v0"], seeds=[1])) == 4
    spec = hopper.spec(recipe["run"], steps=50, threads=1, progress=False)
    args = cli.build_parser().parse_args(spec.to_argv())
    assert (args.steps, args.eval_every, args.log_every, args.threads, args.progress) == (50, 50, 1, 1, False)
    assert cli.train_spec(args) == spec  # the command line round-trips to the same spec
    assert build_config(args.preset, hopper.task, parse_overrides(args.overrides)) == hopper.config()


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "none.toml")
    bad = write_recipe(tmp_path / "bad.toml", "[run]\nseeds = [0]\n[tasks.hopper-medium-v2]\n")
    with pytest.raises(RecipeError, match=r"\[run\] lacks eval_every, eval_episodes"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="KEY=\\[value"):
        parse_grid(["alpha=0.1"])
    runs = expand_runs(load_recipe(d4rl_recipe(tmp_path)))
    with pytest.raises(RecipeError, match="unknown task"):
        select_runs(runs, tasks=["hopper-expert-v2"])
    with pytest.raises(RecipeError, match=r"seed\(s\) \[5\]"):
        select_runs(runs, seeds=[5])
    with pytest.raises(RecipeError, match="walker2d-medium-v2-batch_size=0-seed0: invalid config: batch_size must be"):
        check_runs(expand_runs(load_recipe(d4rl_recipe(tmp_path)), {"batch_size": [0]})[2:3])
    with pytest.raises(RecipeError, match="several runs would write to"):
        check_runs(expand_runs(load_recipe(d4rl_recipe(tmp_path, seeds="[0, 0]"))))


# ============================================================================================== report
def test_results_and_summary_from_run_logs(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", f"""
[run]
steps = 20
seeds = [0, 1, 2]
eval_every = 10
eval_episodes = 1
budgets = [0, 1]
checkpoint_every = 10
dataset_dir = "{tmp_path}"
out_dir = "{tmp_path / 'runs'}"
tasks_per_env = [1, 2]

[envs.cube-double-play-v0]
published = 70
"""))
    runs = expand_runs(recipe)
    by = {(r.task_id, r.seed): r for r in runs}
    for (task_id, seed), score in {(1, 0): 10.0, (2, 0): 30.0, (1, 1): 40.0, (2, 1): 60.0}.items():
        write_run_logs(by[task_id, seed].out,
                       [(10, "BC reference", "", 1.0), (10, "best-of-N", "0", score + 5), (10, "VGF", "1", score + 50),
                        (20, "BC reference", "", 2.0), (20, "best-of-N", "0", score), (20, "VGF", "1", score + 1)],
                       [(10, 5.0), (20, 2.0)])  # fmt: skip
    write_run_logs(by[1, 2].out, [(10, "best-of-N", "0", 99.0)], [(10, 1.0)])  # stopped half-way

    results = run_results(runs)
    assert len(results) == 5
    first = results[0]
    assert (first["task"], first["seed"], first["step"], first["complete"]) == (runs[0].task, 0, 20, True)
    assert (first["final best-of-N L_test=0"], first["best best-of-N L_test=0"], first["final VGF L_test=1"],
            first["best VGF L_test=1"]) == (10.0, 15.0, 11.0, 60.0)  # fmt: skip
    assert first["final BC reference"] == 2.0 and first["seconds"] == 10 / 5 + 10 / 2
    partial = next(r for r in results if r["seed"] == 2)
    assert (partial["step"], partial["complete"]) == (10, False)

    (row,) = summarize(runs, results)
    # seed 0's environment score is the 2-task mean (10 + 30) / 2 = 20, seed 1's (40 + 60) / 2 = 50
    assert row["best-of-N L_test=0"] == "35.0 ± 15.0" and row["VGF L_test=1"] == "36.0 ± 15.0"
    assert row["BC reference"] == "2.0 ± 0.0"
    assert (row["task"], row["runs"], row["seeds"], row["published VGF"]) == ("cube-double-play-v0", "4/6", 2, 70)

    paths = write_report(runs, tmp_path / "report", "tiny", print_tables=False)
    assert json.loads(paths["results_json"].read_text()) == results
    assert len(paths["results_csv"].read_text().splitlines()) == 1 + 5
    assert json.loads(paths["summary"].read_text()) == [row]
    assert paths["plot"].stat().st_size > 0


def _rliable_iqm_text(scores: list[list[float]]) -> str:
    """rliable called directly (as `iqm_with_ci` promises to: numpy's global generator seeded 0, 2000 resamples)."""
    import warnings

    from rliable import library, metrics

    np.random.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        point, interval = library.get_interval_estimates(
            {"x": np.array(scores)}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=2000,
            random_state=np.random.RandomState(0))  # fmt: skip
    return f"{point['x'][0]:.1f} [{interval['x'][0, 0]:.1f}, {interval['x'][1, 0]:.1f}]"


def test_the_summary_gives_rliables_iqm_over_seeds_and_tasks_and_the_mean_of_the_last_three_evaluations(tmp_path):
    runs = expand_runs(load_recipe(d4rl_recipe(tmp_path, steps=8, seeds="[0, 1, 2, 3]")))
    finals = {"hopper-medium-v2": [10.0, 20.0, 90.0, 40.0], "walker2d-medium-v2": [30.0, 35.0, 0.0, 70.0]}
    for r in runs:
        final = finals[r.task][r.seed]
        # VGF at steps 2, 4, 6, 8: 0, then final - 6, final - 3, final: the last three average to final - 3
        write_run_logs(r.out, [(2, "VGF", "1", 0.0), (4, "VGF", "1", final - 6), (6, "VGF", "1", final - 3),
                               (8, "VGF", "1", final)], [(8, 1.0)])  # fmt: skip
    results = run_results(runs)
    assert [row["last3 VGF L_test=1"] for row in results] == [finals[r.task][r.seed] - 3 for r in runs]
    hopper, walker, recipe = summarize(runs, results)
    assert hopper["VGF L_test=1"] == "40.0 ± 30.8" and hopper["last3 VGF L_test=1"] == "37.0 ± 30.8"
    assert hopper["IQM VGF L_test=1"] == _rliable_iqm_text([[10.0], [20.0], [90.0], [40.0]])
    assert walker["IQM VGF L_test=1"] == _rliable_iqm_text([[30.0], [35.0], [0.0], [70.0]])
    assert (recipe["task"], recipe["runs"]) == ("all tasks", "8/8")
    assert recipe["IQM VGF L_test=1"] == _rliable_iqm_text([[10.0, 30.0], [20.0, 35.0], [90.0, 0.0], [40.0, 70.0]])
    # the IQM of 8 scores is the mean of the middle 4: (20 + 30 + 35 + 40) / 4 = 31.25
    assert recipe["IQM VGF L_test=1"].startswith("31.2 [")


def test_reproduce_summary_writes_the_shared_report(tmp_path, capsys):
    recipe = d4rl_recipe(tmp_path)
    runs = expand_runs(load_recipe(recipe))
    write_run_logs(runs[0].out, [(8, "best-of-N", "0", 3.0)], [(8, 4.0)])
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "recipes" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    assert reproduce.main([str(recipe), "--summary"]) == 0
    assert json.loads((tmp_path / "runs" / "results.json").read_text()) == run_results(runs)
    assert "1 of 4 runs evaluated" in capsys.readouterr().out
    assert reproduce.main([str(recipe), "--seeds", "3"]) == 2
    assert "seed(s) [3] are not in the recipe's seeds" in capsys.readouterr().err


# ============================================================================================== dry run
def test_dry_run_prints_trials_and_resources_without_ray():
    code = ("import sys; from vgf_prob import cli; "
            "status = cli.main(['sweep', 'recipes/d4rl.toml', '--dry-run', '--seeds', '0', '1', "
            "'--gpus-per-trial', '0.25', '--address', 'auto']); "
            "assert 'ray' not in sys.modules, 'the dry run imported ray'; sys.exit(status)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    trials = [line for line in lines if "  steps 1,000,000  CPU 1  GPU 0.25  " in line]
    assert len(trials) == 15 * 2 and trials[0].startswith("halfcheetah-medium-v2-seed0 ")
    assert any("30 trials" in line and "on the Ray cluster at auto" in line for line in lines)


def test_sweep_user_errors(tmp_path, capsys):
    recipe = str(d4rl_recipe(tmp_path))
    assert cli.main(["sweep", recipe, "--dry-run", "--device", "cuda", "--gpus-per-trial", "0"]) == 2
    assert "--gpus-per-trial is 0" in capsys.readouterr().err
    assert cli.main(["sweep", recipe, "--dry-run", "--cpus-per-trial", "0"]) == 2
    assert "--cpus-per-trial must be > 0" in capsys.readouterr().err
    assert cli.main(["sweep", recipe, "--dry-run", "--cpus-per-trial", "64", "--num-cpus", "2"]) == 0
    assert "not here: --cpus-per-trial 64 exceeds the 2 CPUs" in capsys.readouterr().out


# ============================================================================================== Ray
def test_gather_copies_a_trials_last_checkpoint_only_into_a_missing_or_older_run_dir(tmp_path):
    pytest.importorskip("ray.tune")
    from ray.tune import Checkpoint

    from vgf_prob.rl.checkpoint import save_checkpoint
    from vgf_prob.rl.sweep import _gather, checkpoint_step

    def run_dir(name: str, step: int) -> Path:
        save_checkpoint(tmp_path / name, {"step": step, "config": {}, "agent": {}, "rng": {}})
        (tmp_path / name / "eval.csv").write_text(f"logs of {name}")
        return tmp_path / name

    trial = Checkpoint.from_directory(run_dir("ray", 8))  # what a trial on another node left in storage
    _gather(trial, tmp_path / "missing")  # the trial ran on a node without shared files
    assert checkpoint_step(tmp_path / "missing") == 8
    assert (tmp_path / "missing" / "eval.csv").read_text() == "logs of ray"
    _gather(trial, run_dir("older", 4))
    assert checkpoint_step(tmp_path / "older") == 8
    _gather(trial, run_dir("same", 8))
    assert (tmp_path / "same" / "eval.csv").read_text() == "logs of same"
    assert checkpoint_step(tmp_path / "nothing") == 0


class KillOnFirstCheckpoint:
    """A Tune callback (runs in the driver) that SIGKILLs one trial's worker right after Tune registered its
    first checkpoint, then deletes the trial's run directory, as if its node had been lost."""

    def __init__(self, trial_name: str, run_dir: Path, marker: Path) -> None:
        from ray import tune

        self.callback = type("Kill", (tune.Callback,), {"on_checkpoint": self.on_checkpoint})()
        self.trial_name, self.run_dir, self.marker = trial_name, run_dir, marker

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if str(trial) != self.trial_name or self.marker.exists():
            return
        pid = trial.last_result["pid"]
        self.marker.write_text(json.dumps({"pid": pid, "step": trial.last_result["step"]}))
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # until the process is gone or a zombie (its writes have stopped)
            try:
                if "zombie" in Path(f"/proc/{pid}/status").read_text().lower():
                    break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        shutil.rmtree(self.run_dir)


@pytest.mark.slow
def test_local_ray_sweep_survives_a_killed_trial(tmp_path, capsys):
    pytest.importorskip("ray.tune")
    from vgf_prob.rl.checkpoint import load_checkpoint
    from vgf_prob.rl.sweep import sweep

    write_tiny_d4rl(tmp_path / "data" / "hopper-medium-v2.hdf5", 11, 3, seed=0)
    write_tiny_d4rl(tmp_path / "data" / "walker2d-medium-v2.hdf5", 17, 6, seed=1)
    recipe = d4rl_recipe(tmp_path)
    runs = expand_runs(load_recipe(recipe))
    victim = runs[0]  # hopper-medium-v2-seed0
    marker = tmp_path / "killed.json"
    killer = KillOnFirstCheckpoint(victim.name, victim.out, marker)

    paths = sweep(recipe, num_cpus=2, max_failures=1, callbacks=[killer.callback])

    assert json.loads(marker.read_text())["step"] == 4  # killed after its first segment (steps 1-4), mid-way
    results = json.loads(paths["results_json"].read_text())
    assert len(results) == 4 and all(row["complete"] and row["step"] == 8 for row in results)
    assert {(row["task"], row["seed"]) for row in results} == {(r.task, r.seed) for r in runs}
    with (tmp_path / "runs" / "tune" / "tiny" / victim.name / "result.json").open() as f:
        reports = [json.loads(line) for line in f]
    assert reports[-1]["step"] == 8 and reports[-1]["restored_step"] == 4 and reports[-1]["start_step"] == 4
    assert "restarting from its checkpoint at step 4" in capsys.readouterr().out

    # the resumed trial equals an uninterrupted `vgf-prob train` of the same run
    settings = load_recipe(recipe)["run"]
    reference = dataclasses.replace(victim, out=tmp_path / "uninterrupted")
    assert cli.main(reference.spec(settings, threads=1, progress=False).to_argv()) == 0
    assert (victim.out / "eval.csv").read_text() == (reference.out / "eval.csv").read_text()
    with (victim.out / "train.csv").open() as a, (reference.out / "train.csv").open() as b:
        rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert len(rows_a) == 8 and [{**r, "steps_per_second": ""} for r in rows_a] == [
        {**r, "steps_per_second": ""} for r in rows_b]  # fmt: skip
    ours, theirs = load_checkpoint(victim.out / "latest.pt"), load_checkpoint(reference.out / "latest.pt")
    _assert_same_tree(ours["agent"], theirs["agent"])

    assert paths["plot"].stat().st_size > 0
    summary = json.loads(paths["summary"].read_text())
    assert [(row["task"], row["runs"], row.get("published VGF")) for row in summary] == [
        ("hopper-medium-v2", "2/2", 97.9), ("walker2d-medium-v2", "2/2", None), ("all tasks", "4/4", None)]  # fmt: skip


def _assert_same_tree(a, b, path="agent"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow
def test_a_trial_failing_for_a_deterministic_reason_is_reported_once_not_retried(tmp_path, capsys):
    """walker2d's data file is missing: its trial reports the error once and ends (no restart, though
    max_failures allows 2); the other trial completes, and the sweep ends with one line naming the failure."""
    pytest.importorskip("ray.tune")
    from vgf_prob.rl.sweep import SweepError, sweep

    write_tiny_d4rl(tmp_path / "data" / "hopper-medium-v2.hdf5", 11, 3, seed=0)
    recipe = d4rl_recipe(tmp_path, steps=4, seeds="[0]")
    with pytest.raises(SweepError) as info:
        sweep(recipe, num_cpus=2, max_failures=2)
    message = str(info.value)
    assert message.startswith("1 of 2 trials failed (walker2d-medium-v2-seed0: TrainingSetupError: dataset file "
                              "not found")  # fmt: skip
    assert "\n" not in message
    out = capsys.readouterr().out
    assert out.count("[sweep] walker2d-medium-v2-seed0 failed at step 0: TrainingSetupError") == 1
    assert "restarting" not in out and "giving up" not in out
    with (tmp_path / "runs" / "tune" / "tiny" / "walker2d-medium-v2-seed0" / "result.json").open() as f:
        assert len(f.readlines()) == 1  # one report: the trial ran once
    assert json.loads((tmp_path / "runs" / "results.json").read_text())[0]["complete"]  # hopper finished
