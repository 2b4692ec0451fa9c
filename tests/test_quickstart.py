"""The quick start's task: the generated Reacher data (scripted expert, D4RL format, D4RL-style score) and plots."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from vgf_prob import cli
from vgf_prob.rl import gym_generate as gg
from vgf_prob.rl.d4rl import load_d4rl_hdf5
from vgf_prob.rl.envs import make_env
from vgf_prob.rl.evaluate import evaluate
from vgf_prob.rl.plots import plot_budget_sweep, plot_learning_curve
from vgf_prob.rl.run import experiment


def test_inverse_kinematics_puts_the_fingertip_on_the_target():
    """Set the arm to the expert's IK solution (the angles its error term aims at): fingertip = target."""
    env = make_env("reacher-noisy-v0")
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        u = env.unwrapped
        q = np.arctan2(obs[2:4], obs[0:2])
        # kd = 0 and a kp too small to clip: the action is kp * wrap(q* - q), so it gives the IK angles q*
        error = gg.reacher_expert(obs, kp=1e-3, kd=0.0) / 1e-3
        qpos = u.data.qpos.copy()
        qpos[:2] = q + error
        u.set_state(qpos, np.zeros_like(u.data.qvel))
        tip, target = u.get_body_com("fingertip")[:2], u.get_body_com("target")[:2]
        np.testing.assert_allclose(tip, target, atol=1e-6)
    env.close()


def test_reference_returns_are_what_the_policies_score():
    """The first 20 of the reference episodes give means close to the 1000-episode constants."""
    r_random, r_expert = gg.reference_returns(episodes=20)
    ref_random, ref_expert = gg.REF_RETURNS["reacher"]
    assert abs(r_random - ref_random) < 3.0  # per-episode std about 3.6: 20 episodes give a std error of 0.8
    assert abs(r_expert - ref_expert) < 1.0  # per-episode std about 1.4
    assert r_expert > -5.0 > -40.0 > r_random  # the expert reaches the target, random play does not
    np.testing.assert_allclose(gg.normalized_score("reacher-noisy-v0", [ref_random, ref_expert]), [0.0, 100.0])


def test_evaluation_scores_reacher_against_the_generated_references():
    expert = lambda obs: torch.as_tensor(np.stack([gg.reacher_expert(o) for o in obs.numpy()]), dtype=torch.float32)  # noqa: E731
    result = evaluate(expert, "reacher-expert-v0", num_episodes=4, seed=gg.REF_SEED)
    assert result.score_kind == "d4rl_normalized"
    r_random, r_expert = gg.REF_RETURNS["reacher"]
    np.testing.assert_allclose(result.normalized_scores, 100 * (result.returns - r_random) / (r_expert - r_random))
    assert result.score > 80


def test_generated_file_is_d4rl_format_and_loads_as_qlearning_transitions(tmp_path):
    path = gg.generate_gym_dataset("reacher-expert-v0", 3, tmp_path / "expert.hdf5", seed=7)
    with h5py.File(path) as f:
        obs, actions, next_obs = f["observations"][()], f["actions"][()], f["next_observations"][()]
        timeouts, terminals = f["timeouts"][()], f["terminals"][()]
        assert obs.shape == (150, 10) and actions.shape == (150, 2) and f["rewards"].shape == (150,)
        assert f["metadata/epsilon"][()] == 0.0 and f["metadata/name"][()].decode() == "reacher-expert-v0"
    assert np.flatnonzero(timeouts).tolist() == [49, 99, 149] and not terminals.any()
    within = ~timeouts[:-1]  # inside an episode the next observation is the following row's
    np.testing.assert_array_equal(next_obs[:-1][within], obs[1:][within])
    # the clean dataset's actions are the scripted expert's
    expected = np.stack([gg.reacher_expert(o) for o in obs])
    np.testing.assert_allclose(actions, expected, atol=1e-6)
    dataset = load_d4rl_hdf5(path, env_name="reacher-expert-v0")
    assert len(dataset) == 147  # D4RL convention: each episode's timeout step is dropped
    assert dataset.masks.min() == 1.0 and dataset.metadata["reward_processing"] == "none"


def test_noise_kinds_and_seeding(tmp_path):
    a = gg.generate_gym_dataset("reacher-mixed-v0", 2, tmp_path / "a.hdf5", seed=1)
    b = gg.generate_gym_dataset("reacher-mixed-v0", 2, tmp_path / "b.hdf5", seed=1)
    c = gg.generate_gym_dataset("reacher-mixed-v0", 2, tmp_path / "c.hdf5", seed=2)
    noisy = gg.generate_gym_dataset("reacher-noisy-v0", 2, tmp_path / "n.hdf5", seed=1)
    read = lambda p: (h5py.File(p)["observations"][()], h5py.File(p)["actions"][()])  # noqa: E731
    (obs_a, act_a), (obs_b, act_b), (_, act_c) = read(a), read(b), read(c)
    np.testing.assert_array_equal(act_a, act_b)
    assert not np.array_equal(act_a, act_c)
    expert = np.stack([gg.reacher_expert(o) for o in obs_a])
    replaced = np.any(np.abs(act_a - expert) > 1e-5, axis=1)
    assert 0.3 < replaced.mean() < 0.7  # epsilon 0.5 over 100 steps
    obs_n, act_n = read(noisy)
    residual = act_n - np.stack([gg.reacher_expert(o) for o in obs_n])
    inside = np.all(np.abs(act_n) < 0.999, axis=1)  # unclipped steps: the residual is the N(0, 0.4^2) noise
    assert 0.3 < residual[inside].std() < 0.5
    with pytest.raises(ValueError, match="unknown generated dataset"):
        gg.generate_gym_dataset("reacher-medium-v0", 2, tmp_path / "x.hdf5")
    with pytest.raises(ValueError, match="num_episodes"):
        gg.generate_gym_dataset("reacher-noisy-v0", 0, tmp_path / "x.hdf5")


def test_ensure_caches_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VGF_PROB_CACHE", str(tmp_path))
    path = gg.ensure_gym_dataset("reacher-noisy-v0", 2)
    assert path == tmp_path / "gym" / "ep2-seed0" / "reacher-noisy-v0.hdf5" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert gg.ensure_gym_dataset("reacher-noisy-v0", 2) == path and path.stat().st_mtime_ns == stamp


TINY = dataclasses.replace(
    experiment.QUICKSTART, steps=6, eval_episodes=2, budgets=(0, 2), eval_every=3,
    overrides={**experiment.QUICKSTART.overrides, "batch_size": 16, "critic_hidden_dims": (16, 16),
               "bc_hidden_dims": (16, 16), "flow_steps": 2},
)  # fmt: skip


def test_quickstart_path_at_tiny_size(tmp_path, monkeypatch, capsys):
    """`vgf-prob train` without arguments, shrunk: data generated and cached, trained, compared, plotted."""
    monkeypatch.setenv("VGF_PROB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(experiment, "QUICKSTART", TINY)
    monkeypatch.setattr(experiment, "GENERATED_EPISODES", 4)
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "D4RL score" in out and "best-of-N" in out and "VGF" in out
    assert (tmp_path / "cache" / "gym" / "ep4-seed0" / f"{TINY.dataset}.hdf5").is_file()
    eval_rows = (tmp_path / "run" / "eval.csv").read_text().splitlines()
    # two evaluations (steps 3 and 6) of BC, best-of-N, VGF L=2 and best-of-M matched to VGF L=2's cost
    assert len(eval_rows) == 1 + 2 * 4 and "best-of-M=23 (matched to VGF L_test=2)" in eval_rows[-1]
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000


def test_budget_sweep_plot_options(tmp_path):
    rows = [{"budget": b, "score": s, "score_std": 5.0, "mean_return": -20 + s / 5, "return_std": 1.0,
             "score_kind": "success_rate"} for b, s in [(0, 0.0), (1, 0.0), (3, 0.0)]]  # fmt: skip
    path = plot_budget_sweep(rows, tmp_path / "s.png", reference_lines={"BC": {"score": 0.0, "score_std": 0.0}})
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="show_return=True needs"):
        plot_budget_sweep([{"budget": 0, "score": 1.0}], tmp_path / "t.png", show_return=True)
    curve = [{"step": 10, "critic_loss": 1.0}, {"step": 20, "critic_loss": 0.5, "VGF L=1": 40.0},
             {"step": 30, "VGF L=1": 60.0}]  # fmt: skip
    assert plot_learning_curve(curve, tmp_path / "c.png", scores=["VGF L=1"]).stat().st_size > 1000
    with pytest.raises(ValueError, match="not found"):
        plot_learning_curve(curve, tmp_path / "d.png", scores=["best-of-N"])
