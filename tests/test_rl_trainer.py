"""Training loop and checkpoints: exact resume, atomic and verified writes, clear errors."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from rl_helpers import Crash, crash_after, one_thread, spec  # noqa: F401 (one_thread: autouse fixture)

from vgf_prob.rl import checkpoint as ckpt
from vgf_prob.rl.checkpoint import CheckpointError, load_checkpoint, load_latest, save_checkpoint
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.offline_dataset import OfflineDataset
from vgf_prob.rl.run.trainer import finetune, train

TINY = dict(batch_size=8, critic_hidden_dims=(16, 16), bc_hidden_dims=(16, 16), amortized_hidden_dims=(16, 16),
            num_particles=4, flow_steps=2, train_budget=2)  # fmt: skip
LOSS_COLUMNS = ("critic_loss", "bc_loss", "q_mean", "target_q", "flow_displacement")


def tiny_dataset(obs_dim: int = 3, action_dim: int = 2, size: int = 64, seed: int = 0) -> OfflineDataset:
    g = torch.Generator().manual_seed(seed)
    return OfflineDataset({
        "observations": torch.randn(size, obs_dim, generator=g),
        "actions": torch.rand(size, action_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(size, generator=g),
        "next_observations": torch.randn(size, obs_dim, generator=g),
        "masks": (torch.rand(size, generator=g) > 0.1).float(),
        "terminals": torch.zeros(size),
        "timeouts": torch.zeros(size),
    })  # fmt: skip


def read_log(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def losses(rows: list[dict[str, str]]) -> list[tuple]:
    return [(r["step"], *(r[k] for k in LOSS_COLUMNS if k in r)) for r in rows]


def scramble_global_rng() -> None:
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


def assert_same_parameters(a, b) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("variant", ["stein", "amortized"])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, variant):
    config = VGFConfig(variant=variant, **TINY)
    kwargs = dict(log_every=1, checkpoint_every=4, seed=3)
    full = train(config, tiny_dataset(), spec(tmp_path / "full", 12, **kwargs))

    dataset = tiny_dataset()
    crash_after(monkeypatch, dataset, 10)  # checkpoints at 4 and 8, rows 9 and 10 logged after the last one
    with pytest.raises(Crash):
        train(config, dataset, spec(tmp_path / "killed", 12, **kwargs))
    monkeypatch.undo()
    assert [r["step"] for r in read_log(tmp_path / "killed" / "train.csv")][-1] == "10"
    assert load_checkpoint(tmp_path / "killed" / "latest.pt")["step"] == 8

    scramble_global_rng()  # a new process starts from other global RNG states
    resumed = train(config, tiny_dataset(), spec(tmp_path / "killed", 12, resume=True, **kwargs))

    assert losses(read_log(resumed.train_log)) == losses(read_log(full.train_log))
    assert len(read_log(resumed.train_log)) == 12
    assert_same_parameters(full.agent, resumed.agent)
    full_opt = full.agent.critic_optimizer.state_dict()["state"]
    resumed_opt = resumed.agent.critic_optimizer.state_dict()["state"]
    assert all(torch.equal(full_opt[k]["exp_avg_sq"], resumed_opt[k]["exp_avg_sq"]) for k in full_opt)


def test_resume_can_extend_a_finished_run(tmp_path):
    config = VGFConfig(**TINY)
    kwargs = dict(log_every=2, checkpoint_every=5)
    full = train(config, tiny_dataset(), spec(tmp_path / "full", 10, **kwargs))
    train(config, tiny_dataset(), spec(tmp_path / "short", 5, **kwargs))
    extended = train(config, tiny_dataset(), spec(tmp_path / "short", 10, resume=True, **kwargs))
    assert_same_parameters(full.agent, extended.agent)
    # the short run also logged its last step (5), which splits one averaging window differently
    assert [r["step"] for r in read_log(extended.train_log)] == ["2", "4", "5", "6", "8", "10"]


def test_resume_refuses_another_config_and_fresh_run_refuses_existing_dir(tmp_path):
    train(VGFConfig(**TINY), tiny_dataset(), spec(tmp_path, 3, log_every=1, checkpoint_every=3))
    with pytest.raises(CheckpointError, match=r"train_budget: checkpoint 2, requested 1"):
        train(VGFConfig(**{**TINY, "train_budget": 1}), tiny_dataset(), spec(tmp_path, 6, resume=True))
    with pytest.raises(CheckpointError, match=r"dataset"):
        train(VGFConfig(**TINY), tiny_dataset(seed=1), spec(tmp_path, 6, resume=True))
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(VGFConfig(**TINY), tiny_dataset(), spec(tmp_path, 3))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(VGFConfig(**TINY), tiny_dataset(), spec(tmp_path / "empty", 3, resume=True))


def test_finetune_appends_online_data_and_resumes_exactly(tmp_path, monkeypatch):
    """Offline-to-online on Hopper (obs 11, actions 3): explore, append, update; killed and resumed."""
    config = VGFConfig(**TINY)
    offline = train(config, tiny_dataset(11, 3), spec(tmp_path / "offline", 4, log_every=2, checkpoint_every=4))
    kwargs = dict(env="hopper-medium-v2", log_every=1, checkpoint_every=5)
    online = dict(init_checkpoint=offline.out_dir, reward_scale=1.0)
    data_full = tiny_dataset(11, 3)
    full = finetune(config, data_full, spec(tmp_path / "full", 12, **kwargs), **online)
    assert len(data_full) == 64 + 12
    assert read_log(full.train_log)[0]["online_episodes"] != ""

    data_killed = tiny_dataset(11, 3)
    crash_after(monkeypatch, data_killed, 7)
    with pytest.raises(Crash):
        finetune(config, data_killed, spec(tmp_path / "killed", 12, **kwargs), **online)
    monkeypatch.undo()
    scramble_global_rng()
    data_resumed = tiny_dataset(11, 3)
    resumed = finetune(config, data_resumed, spec(tmp_path / "killed", 12, resume=True, **kwargs), **online)
    assert losses(read_log(resumed.train_log)) == losses(read_log(full.train_log))
    for key in data_full.keys:
        assert torch.equal(getattr(data_full, key), getattr(data_resumed, key)), key


# ------------------------------------------------------------------------------------------ checkpoints
def payload(step: int) -> dict:
    return {"step": step, "config": VGFConfig(**TINY).to_dict(), "agent": {"w": torch.full((3,), float(step))},
            "rng": ckpt.capture_rng_state()}  # fmt: skip


def test_truncated_checkpoint_is_a_clear_error_and_previous_survives(tmp_path):
    save_checkpoint(tmp_path, payload(1))
    latest = save_checkpoint(tmp_path, payload(2))
    latest.write_bytes(latest.read_bytes()[:200])  # as if the disk filled up mid-write outside our control
    with pytest.raises(CheckpointError, match=r"latest\.pt: the file is truncated or corrupt"):
        load_checkpoint(latest)
    with pytest.warns(UserWarning, match="resuming from .*previous.pt"):
        assert load_latest(tmp_path)["step"] == 1
    assert load_checkpoint(tmp_path / "previous.pt")["step"] == 1


def test_crash_during_save_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, payload(1))
    save_checkpoint(tmp_path, payload(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*No space left"):
        save_checkpoint(tmp_path, payload(3))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left either

    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f: f.write(b"not a zip archive"))  # "succeeds"
    with pytest.raises(CheckpointError, match="does not read back"):
        save_checkpoint(tmp_path, payload(3))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 2


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt is not a vgf-prob checkpoint: missing key"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lacks key"):
        save_checkpoint(tmp_path, {"step": 1})
    assert ckpt.config_mismatch({"a": 1, "b": 2}, {"a": 1, "b": 3}) == ["b: checkpoint 2, requested 3"]


def test_rng_state_round_trip_covers_every_stream():
    gen = torch.Generator().manual_seed(7)
    state = ckpt.capture_rng_state({"data": gen})
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    scramble_global_rng()
    gen.manual_seed(99)
    ckpt.restore_rng_state(state, {"data": gen})
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])
    with pytest.raises(CheckpointError, match="generators"):
        ckpt.restore_rng_state(state, {"other": gen})
