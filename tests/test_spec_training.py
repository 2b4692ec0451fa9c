"""The training loop's promises, checked from outside: OGBench success timing reaches every evaluation
environment (in `train` and in `vgf-prob eval`), and a resumed run whose checkpoint holds a non-empty
metrics window and follows a mid-run evaluation writes the same logs as the uninterrupted run (README:
"the metric window and the byte length of each CSV log are checkpointed")."""

from __future__ import annotations

import csv
from pathlib import Path

import ogbench
import pytest
import torch
from rl_helpers import Crash, crash_after, one_thread, spec  # noqa: F401 (one_thread: autouse fixture)

from vgf_prob import cli
from vgf_prob.rl.checkpoint import load_checkpoint
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.offline_dataset import OfflineDataset
from vgf_prob.rl.run.trainer import train

TINY = VGFConfig(batch_size=8, critic_hidden_dims=(16, 16), bc_hidden_dims=(16, 16), num_particles=3, flow_steps=2,
                 train_budget=1)  # fmt: skip
MAZE = "pointmaze-medium-navigate-singletask-task1-v0"  # observations 2, actions 2; quick to build
HOPPER = "hopper-medium-v2"  # observations 11, actions 3


def dataset(obs_dim: int, action_dim: int, metadata: dict | None = None, size: int = 48) -> OfflineDataset:
    g = torch.Generator().manual_seed(0)
    return OfflineDataset({
        "observations": torch.randn(size, obs_dim, generator=g),
        "actions": torch.rand(size, action_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(size, generator=g),
        "next_observations": torch.randn(size, obs_dim, generator=g),
        "masks": (torch.rand(size, generator=g) > 0.2).float(),
        "terminals": torch.zeros(size),
    }, metadata=metadata)  # fmt: skip


@pytest.fixture
def ogbench_timings(monkeypatch) -> list[str]:
    """The success timing of every OGBench environment made from here on (read off the environment itself);
    episodes are cut to 3 steps to keep evaluation short."""
    made: list[str] = []
    real = ogbench.make_env_and_datasets

    def spy(name, *args, **kwargs):
        env = real(name, *args, **{**kwargs, "max_episode_steps": 3})
        made.append(env.unwrapped._success_timing)
        return env

    monkeypatch.setattr(ogbench, "make_env_and_datasets", spy)
    return made


def test_success_timing_of_the_dataset_reaches_train_and_cli_evaluation(tmp_path, ogbench_timings):
    """ogbench >= 1.2 environments default to 'pre'; data labelled with 'post' must be evaluated with 'post'."""
    data = dataset(2, 2, {"source": "ogbench", "env_name": MAZE, "success_timing": "post"})
    run = train(TINY, data, spec(tmp_path / "run", 2, env=MAZE, eval_episodes=1, eval_budgets=(0,), log_every=2,
                                 checkpoint_every=2))  # fmt: skip  # fmt: skip
    assert run.final_scores and ogbench_timings, "train() evaluated nothing"
    assert set(ogbench_timings) == {"post"}, (
        f"train() evaluated in environments with success timing {ogbench_timings}, but the dataset was labelled 'post'"
    )
    for argv in (["eval", str(run.out_dir), "--episodes", "1", "--no-progress"],
                 ["eval", str(run.out_dir), "--episodes", "1", "--budgets", "0", "1", "--no-progress"]):
        ogbench_timings.clear()
        assert cli.main(argv) == 0
        assert ogbench_timings and set(ogbench_timings) == {"post"}, (
            f"`vgf-prob {' '.join(argv[:1] + argv[2:])}` evaluated with success timing {ogbench_timings}, "
            "not the dataset's 'post'"
        )


def read(path: Path, drop: tuple[str, ...] = ()) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def test_resume_restores_a_non_empty_metrics_window_after_a_mid_run_evaluation(tmp_path, monkeypatch):
    """Logs and evaluates every 3 steps, checkpoints every 4, killed during step 10: the checkpoint at step 8
    holds the window of steps 7-8 and follows the evaluations at steps 3 and 6; the killed run's log row and
    evaluation at step 9 come after it. The resumed run must drop those, log step 9 as the mean over steps
    7-9 and evaluate at steps 9 and 10 exactly as the uninterrupted run does."""
    kwargs = dict(eval_every=3, eval_episodes=1, eval_budgets=(0, 1), log_every=3, checkpoint_every=4, seed=5)
    full = train(TINY, dataset(11, 3), spec(tmp_path / "full", 10, env=HOPPER, **kwargs))

    killed = dataset(11, 3)
    crash_after(monkeypatch, killed, 9)  # dies inside step 10
    with pytest.raises(Crash):
        train(TINY, killed, spec(tmp_path / "killed", 10, env=HOPPER, **kwargs))
    monkeypatch.undo()
    saved = load_checkpoint(tmp_path / "killed" / "latest.pt")
    assert saved["step"] == 8 and saved["logs"]["window"]["count"] == 2, "the checkpoint should hold steps 7-8"
    # BC, best-of-N, VGF L_test 1 and the best-of-M matched to its cost at each evaluation
    assert [r["step"] for r in read(tmp_path / "killed" / "eval.csv")] == ["3"] * 4 + ["6"] * 4 + ["9"] * 4

    resumed = train(TINY, dataset(11, 3), spec(tmp_path / "killed", 10, env=HOPPER, resume=True, **kwargs))
    timing = ("steps_per_second",)  # wall-clock rate: the only column allowed to differ
    full_rows, resumed_rows = read(full.train_log, timing), read(resumed.train_log, timing)
    assert [r["step"] for r in resumed_rows] == ["3", "6", "9", "10"]
    for expected, got in zip(full_rows, resumed_rows, strict=True):
        assert got == expected, (
            f"train.csv row at step {expected['step']} differs after resume (the metrics window of the steps "
            f"before the checkpoint was not restored?):\n  uninterrupted {expected}\n  resumed       {got}"
        )
    assert read(resumed.eval_log) == read(full.eval_log), (
        "eval.csv after resume differs from the uninterrupted run's (rows after the checkpoint kept, or the "
        "evaluation after resume not the same)"
    )
    assert [r["step"] for r in read(resumed.eval_log)] == [str(s) for s in (3, 6, 9, 10) for _ in range(4)]
