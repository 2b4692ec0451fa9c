"""Peer baselines (d3rlpy): they see exactly VGF's transitions, and the command runs end to end at tiny size."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("d3rlpy")

from rl_helpers import one_thread  # noqa: E402,F401  (autouse fixture)

from vgf_prob.rl import peers  # noqa: E402
from vgf_prob.rl.d4rl import load_d4rl_hdf5  # noqa: E402
from vgf_prob.rl.gym_generate import generate_gym_dataset  # noqa: E402
from vgf_prob.rl.offline_dataset import OfflineDataset  # noqa: E402
from vgf_prob.rl.evaluate import ROW_COLUMNS  # noqa: E402


@pytest.fixture(scope="module")
def reacher(tmp_path_factory):
    """Six generated Reacher episodes loaded as VGF loads them (each timeout step dropped: 6 x 49 rows)."""
    path = generate_gym_dataset("reacher-mixed-v0", 6, tmp_path_factory.mktemp("gym") / "reacher-mixed-v0.hdf5")
    return load_d4rl_hdf5(path, env_name="reacher-mixed-v0")


def _synthetic_with_terminals() -> OfflineDataset:
    """Three trajectories: one ends in a true terminal (mask 0), one by a flag, one by a jump in observations."""
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(13, 4, generator=g)
    next_obs = torch.cat([obs[1:], torch.randn(1, 4, generator=g)])
    next_obs[4] = torch.randn(4, generator=g)  # terminal successor: not the next row
    next_obs[8] = torch.randn(4, generator=g)  # a jump without any flag
    masks = torch.ones(13)
    masks[4] = 0.0
    terminals = torch.zeros(13)
    terminals[[4, 12]] = 1.0
    return OfflineDataset({
        "observations": obs, "actions": torch.rand(13, 2, generator=g) * 2 - 1, "rewards": torch.randn(13, generator=g),
        "next_observations": next_obs, "masks": masks, "terminals": terminals,
    })  # fmt: skip


def _assert_identical(dataset: OfflineDataset, picked: dict[str, np.ndarray]) -> None:
    live = dataset.masks.numpy() == 1
    for key in ("observations", "actions", "rewards", "masks"):
        np.testing.assert_array_equal(picked[key], getattr(dataset, key).numpy(), err_msg=key)
    np.testing.assert_array_equal(picked["next_observations"][live], dataset.next_observations.numpy()[live])
    np.testing.assert_array_equal(picked["next_observations"][~live], 0.0)  # d3rlpy's zero terminal successor


def test_d3rlpy_sees_exactly_the_generated_transitions(reacher):
    assert len(reacher) == 6 * 49  # the D4RL convention: each episode's timeout step is dropped
    buffer = peers.to_replay_buffer(reacher)
    assert buffer.transition_count == len(reacher) and len(buffer.episodes) == 6
    _assert_identical(reacher, peers.picked_transitions(buffer))


def test_terminal_flag_and_jump_split_trajectories():
    dataset = _synthetic_with_terminals()
    buffer = peers.to_replay_buffer(dataset)
    assert [e.terminated for e in buffer.episodes] == [True, False, False]
    _assert_identical(dataset, peers.picked_transitions(buffer))
    peers.check_same_transitions(dataset, buffer)


def test_check_catches_a_changed_reward():
    dataset = _synthetic_with_terminals()
    buffer = peers.to_replay_buffer(dataset)
    data = {k: getattr(dataset, k).clone() for k in dataset.keys}
    data["rewards"][7] += 1e-3
    with pytest.raises(ValueError, match="rewards differ .* row 7"):
        peers.check_same_transitions(OfflineDataset(data), buffer)


def test_peer_config_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown peer 'bcq'"):
        peers.peer_config("bcq", (8,), 10)
    with pytest.raises(ValueError, match="hidden_dims"):
        peers.peer_config("iql", (), 10)
    with pytest.raises(ValueError, match="total_steps"):
        peers.peer_config("iql", (8,), 0)


def test_settings_follow_the_reproduction_scripts():
    iql = peers.peer_config("iql", (16, 16), 700)
    assert (iql.expectile, iql.weight_temp, iql.max_weight, iql.batch_size) == (0.7, 3.0, 100.0, 256)
    assert iql.reward_scaler.multiplier == 1000.0 and iql.actor_optim_factory.lr_scheduler_factory.T_max == 700
    assert iql.critic_encoder_factory.hidden_units == [16, 16]
    awac = peers.peer_config("awac", (16, 16), 10)
    assert (awac.batch_size, awac.lam, awac.actor_optim_factory.weight_decay) == (1024, 1.0, 1e-4)
    td3bc = peers.peer_config("td3+bc", (16, 16), 10)
    assert (td3bc.alpha, td3bc.update_actor_interval) == (2.5, 2) and td3bc.observation_scaler is not None


def test_command_end_to_end_at_tiny_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VGF_PROB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "peers"
    argv = ["--dataset", "reacher-mixed-v0", "--episodes", "6", "--algos", "td3+bc", "iql", "--steps", "60",
            "--eval-every", "30", "--eval-episodes", "2", "--hidden", "16", "16", "--out", str(out)]  # fmt: skip
    assert peers.main(argv) == 0
    with (out / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == ("step", *ROW_COLUMNS, "seed", "train_cpu_s")  # VGF's eval.csv columns, then two
    assert [(r["policy"], r["step"]) for r in rows] == [
        ("d3rlpy TD3+BC", "30"), ("d3rlpy TD3+BC", "60"), ("d3rlpy IQL", "30"), ("d3rlpy IQL", "60")
    ]
    assert all(r["episodes"] == "2" and r["budget"] == "" and r["score_kind"] == "d4rl_normalized" for r in rows)
    assert all(np.isfinite(float(r["score"])) and float(r["train_cpu_s"]) > 0 for r in rows)
    assert float(rows[1]["train_cpu_s"]) > float(rows[0]["train_cpu_s"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transitions"] == 6 * 49 and len(summary["rows"]) == 4


def test_command_refuses_an_unknown_file_without_env(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        peers.main(["--dataset", str(tmp_path / "x.hdf5"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "give its HDF5 file with --env" in capsys.readouterr().err


def test_candidate_behaviours_spin_and_bias():
    from vgf_prob.rl.gym_generate import Behaviour, dataset_behaviour, reacher_expert

    obs = np.array([1.0, 0.8, 0.0, 0.6, 0.1, -0.05, 0.2, -0.3, 0.02, 0.01])
    spin = dataset_behaviour("reacher-spin-v0")
    assert (spin.epsilon, spin.spin) == (0.5, True)
    np.testing.assert_array_equal(Behaviour(1.0, spin=True)(obs, np.random.default_rng(0)), [1.0, 1.0])
    biased = Behaviour(0.0, bias=(0.5, -0.5))
    np.testing.assert_allclose(biased(obs, np.random.default_rng(0)), np.clip(reacher_expert(obs) + [0.5, -0.5], -1, 1))
    # the substitute and the bias change no draw: the mixed data's random stream is the one it always had
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        Behaviour(0.5, spin=True)(obs, a), Behaviour(0.5)(obs, b)
    assert a.random() == b.random()


def test_matched_best_of_n_costs_what_the_operator_counts():
    """The benchmark's cost model N (K + 1 + 2 L) = M (K + 1) against the operator's exact counters."""
    import importlib.util
    from pathlib import Path

    from vgf_prob.cost import measure
    from vgf_prob.rl.agent import VGFAgent
    from vgf_prob.rl.config import VGFConfig

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "peers_main_job.py"
    spec = importlib.util.spec_from_file_location("peers_main_job", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = VGFConfig.from_dict({**bench.QUICKSTART_AGENT, "critic_hidden_dims": (8,), "bc_hidden_dims": (8,)})
    agent = VGFAgent(10, 2, config)
    obs, g = torch.randn(3, 10), torch.Generator().manual_seed(0)
    n, k = config.num_particles, config.flow_steps
    for budget in (1, 3, 8):
        with measure() as vgf:
            agent.act(obs, budget=budget, generator=g)
        m = bench.matched_n(n, k, budget)
        with measure() as best_of_m:
            agent.act(obs, budget=0, generator=g, num_particles=m)
        assert vgf.per_state()["passes"] == n * (k + 1 + 2 * budget)
        assert abs(best_of_m.per_state()["passes"] - vgf.per_state()["passes"]) <= (k + 1) / 2  # M is rounded
