"""Evaluation in real environments (gymnasium MuJoCo, OGBench), budget sweeps, tables and plots."""

from __future__ import annotations

import importlib.util
import json
import statistics
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from vgf_prob.rl.data import D4RL_REF_SCORES
from vgf_prob.rl.envs import make_env, make_envs, resolve_env_name
from vgf_prob.rl.evaluate import (
    COST_COLUMNS,
    ROW_COLUMNS,
    EvalResult,
    Policy,
    ScoreRow,
    compare_policies,
    evaluate,
    format_scores,
    format_table,
    policy_label,
    score_row,
)
from vgf_prob.rl.plots import plot_budget_sweep, plot_learning_curve

HOPPER = "hopper-medium-v2"
CUBE = "cube-single-play-singletask-task1-v0"


def random_act_fn(action_dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return lambda obs: torch.rand(obs.shape[0], action_dim, generator=generator) * 2 - 1


def deterministic_act_fn(obs: torch.Tensor) -> torch.Tensor:
    """Row-wise (no reduction across the batch), so batch size cannot change a single bit."""
    return torch.sin(3.0 * obs[:, :3]) * 1.5  # partly outside [-1, 1]: exercises the clipping


@pytest.mark.parametrize(("name", "dim"), [(HOPPER, 11), ("halfcheetah-medium-expert-v2", 17),
                                           ("walker2d-medium-replay-v2", 17), ("ant-medium-v2", 111)])
def test_observation_dims_match_d4rl(name, dim):
    env = make_env(name, seed=0)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.shape == (dim,) and obs.shape == (dim,)
    if name.startswith("ant"):  # ant-v2's contact forces were always zero in D4RL
        assert np.all(obs[27:] == 0)


def test_random_policy_on_hopper_gives_finite_returns_and_normalized_score():
    result = evaluate(random_act_fn(3), HOPPER, num_episodes=2, max_episode_steps=15)
    assert result.returns.shape == (2,) and np.all(np.isfinite(result.returns))
    assert np.all((result.lengths >= 1) & (result.lengths <= 15))
    r_min, r_max = D4RL_REF_SCORES["hopper"]
    expected = 100 * (result.returns - r_min) / (r_max - r_min)
    assert result.score_kind == "d4rl_normalized" and result.successes is None
    assert result.score == pytest.approx(expected.mean())
    assert result.score_std == pytest.approx(expected.std())
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["returns"] == pytest.approx(result.returns.tolist()) and summary["wall_time"] > 0


def test_ogbench_singletask_reports_success_flags():
    result = evaluate(random_act_fn(5), CUBE, num_episodes=2, max_episode_steps=25)
    assert result.successes is not None and set(result.successes.tolist()) <= {False, True}
    assert result.score_kind == "success_rate"
    assert result.score == pytest.approx(100 * result.successes.mean()) == result.success_rate
    assert np.all(result.lengths <= 25) and np.all(np.isfinite(result.returns))


def test_batched_and_sequential_evaluation_agree():
    sequential = evaluate(deterministic_act_fn, HOPPER, num_episodes=5, seed=3, num_envs=1, max_episode_steps=60)
    batched = evaluate(deterministic_act_fn, HOPPER, num_episodes=5, seed=3, num_envs=3, max_episode_steps=60)
    np.testing.assert_array_equal(sequential.returns, batched.returns)
    np.testing.assert_array_equal(sequential.lengths, batched.lengths)
    assert len(set(batched.returns.tolist())) > 1  # episodes differ: seed + k per episode


class RecordingAgent:
    """An agent stand-in: acts with `deterministic_act_fn` and records each call's budget ("bc" for BC)."""

    device = torch.device("cpu")
    config = SimpleNamespace(num_particles=10, flow_steps=10)  # N and K: what the matched best-of-M reads

    def __init__(self) -> None:
        self.calls: list = []
        self.particles: list = []

    def bc_action(self, obs, generator=None):
        self.calls.append("bc")
        return deterministic_act_fn(obs)

    def act(self, obs, budget=None, generator=None, num_particles=None):
        self.calls.append(budget)
        self.particles.append(num_particles)
        return deterministic_act_fn(obs)


def test_compare_policies_scores_every_policy_on_the_same_episodes():
    agent = RecordingAgent()
    extra = Policy("best-of-N N=40", lambda a, g: deterministic_act_fn)  # a caller's own policy, e.g. matched N
    torch.manual_seed(1)
    before = torch.get_rng_state()
    rows = compare_policies(agent, HOPPER, [0, 2], 2, seed=0, extra=[extra], env_kwargs={"max_episode_steps": 10})
    assert torch.equal(torch.get_rng_state(), before)  # evaluation leaves the global RNGs where they were
    # N 10, K 10: VGF L_test 2 costs 10 (11 + 4) = 150 critic passes; best-of-M costs 11 M -> M = 13.6 -> 14
    matched = "best-of-M=14 (matched to VGF L_test=2)"
    assert [r.label for r in rows] == ["BC reference", "best-of-N L_test=0", "VGF L_test=2", matched, "best-of-N N=40"]
    assert set(agent.calls) == {"bc", 0, 2} and set(agent.particles) == {None, 14} and rows[3].num_particles == 14
    assert len({(r.score_low, r.score_high) for r in rows}) == 1 and rows[0].score_low < rows[0].score  # episode CI
    assert len({r.score for r in rows}) == 1 and all(r.episodes == 2 for r in rows)  # same policy, same episodes
    as_csv = [{k: "" if v is None else str(v) for k, v in r.to_dict().items()} for r in rows]
    assert [ScoreRow.from_dict(cells) for cells in as_csv] == rows  # the one schema round-trips through eval.csv
    text = format_scores(rows, "hopper", print_table=False)
    assert "hopper" in text and "D4RL score" in text and "best-of-N N=40" in text

    agent.calls.clear()
    (bc, radius) = compare_policies(agent, HOPPER, [0.5], 1, seed=0, budget_type="displacement",
                                    env_kwargs={"max_episode_steps": 5})  # fmt: skip
    assert radius.label == "VGF displacement=0.5" and "DisplacementBudget(0.5)" in repr(agent.calls[-1].parts())
    assert policy_label("VGF", 3) == "VGF L_test=3" and policy_label("BC reference") == "BC reference"
    assert "│ best-of-N N=40 │      - │" in format_table([r.to_dict() for r in rows[4:]], print_table=False)
    unmatched = compare_policies(agent, HOPPER, [0, 2], 1, seed=0, env_kwargs={"max_episode_steps": 5}, matched=False)
    assert [r.label for r in unmatched] == ["BC reference", "best-of-N L_test=0", "VGF L_test=2"]


def test_a_score_row_carries_its_episode_interval_and_its_cost_per_action():
    from vgf_prob.cost import Cost

    scores = [1.0, 2.0, 3.0, 6.0]
    result = EvalResult("x", np.zeros(4), np.ones(4, dtype=np.int64), None, np.array(scores), 0.1)
    cost = Cost(value_evaluations=40, value_gradient_evaluations=20, reference_passes=80, particles=10, states=2,
                wall_s=0.004, cpu_s=0.002)  # fmt: skip
    row = score_row("VGF", 3, "steps", result, cost, num_particles=5)
    half = 1.959963984540054 * statistics.stdev(scores) / 2  # 95 %: 1.96 sample std / sqrt(4)
    assert row.score == 3.0
    assert (row.score_low, row.score_high) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    assert (row.passes_per_action, row.reference_passes_per_action, row.value_gradient_evaluations_per_action,
            row.particles_per_action, row.ms_per_action, row.cpu_ms_per_action) == (80, 40, 10, 5, 2, 1)  # fmt: skip
    assert set(row.to_dict()) == {*ROW_COLUMNS, *COST_COLUMNS, "score_low", "score_high", "num_particles"}
    assert ScoreRow.from_dict({k: str(v) for k, v in row.to_dict().items()}) == row  # through text cells
    bare = score_row("BC reference", None, None, EvalResult("x", np.zeros(1), np.ones(1), None, np.ones(1), 0.1))
    assert list(bare.to_dict()) == list(ROW_COLUMNS)  # one episode: no interval; no meter: no cost columns


def test_reused_envs_and_bad_act_fn_output():
    envs = make_envs(HOPPER, 2, max_episode_steps=5)
    first = evaluate(deterministic_act_fn, HOPPER, num_episodes=3, envs=envs)
    again = evaluate(deterministic_act_fn, HOPPER, num_episodes=3, envs=envs)
    np.testing.assert_array_equal(first.returns, again.returns)
    with pytest.raises(ValueError, match="give them to make_envs"):
        evaluate(deterministic_act_fn, HOPPER, envs=envs, max_episode_steps=5)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        evaluate(lambda obs: obs[:, :2], HOPPER, num_episodes=2, envs=envs)


@pytest.mark.parametrize("name", ["pong-v5", "hopper-medium-v9", "humanoid-medium-v2"])
def test_unknown_env_names_list_the_valid_families(name):
    with pytest.raises(ValueError, match="families: hopper, halfcheetah"):
        make_env(name)


def test_unknown_ogbench_task_is_a_clear_error():
    with pytest.raises(ValueError, match="OGBench has no environment"):
        make_env("cube-nonagonal-play-v0")


def test_gymnasium_robotics_missing_is_a_clear_error(monkeypatch):
    real_import = importlib.import_module

    def no_robotics(name, *args):
        if name == "gymnasium_robotics":
            raise ImportError("No module named 'gymnasium_robotics'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_robotics)
    with pytest.raises(ImportError, match="needs the 'gymnasium-robotics' package"):
        make_env("antmaze-umaze-v2")


@pytest.mark.parametrize(("name", "d4rl_goal"), [("antmaze-umaze-v2", (0, 8)), ("antmaze-large-diverse-v2", (32, 24)),
                                               ("pen-human-v1", None)])
def test_gymnasium_robotics_families(name, d4rl_goal):
    pytest.importorskip("gymnasium_robotics", reason="gymnasium-robotics (in the dev extra) is not installed")
    env = make_env(name, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (resolve_env_name(name)[1].obs_dim,)
    if d4rl_goal is None:  # Adroit: a short random rollout scored with D4RL's reference returns
        result = evaluate(random_act_fn(env.action_space.shape[0]), name, num_episodes=2, max_episode_steps=5)
        r_min, r_max = D4RL_REF_SCORES[name.split("-")[0]]
        assert result.score_kind == "d4rl_normalized" and np.all(result.lengths == 5)
        np.testing.assert_allclose(result.normalized_scores, 100 * (result.returns - r_min) / (r_max - r_min))
        return
    # D4RL frame: start cell at the origin, goal where D4RL's evaluation put it
    maze = env.unwrapped
    goal = maze.goal - maze.maze.unique_reset_locations[0]
    np.testing.assert_allclose(goal, d4rl_goal, atol=1.0)
    np.testing.assert_allclose(obs[:2], 0.0, atol=1.0)
    # away from the goal: sparse reward 0, no success, the episode goes on
    obs, reward, terminated, _, info = env.step(np.zeros(env.action_space.shape))
    assert (reward, terminated, info["success"]) == (0.0, False, False), "antmaze rewards a step far from the goal"
    # the ant put on the goal: reward 1, success reported, episode ends (D4RL antmaze: return = success)
    qpos, qvel = maze.ant_env.data.qpos.copy(), maze.ant_env.data.qvel.copy()
    qpos[:2] = maze.goal
    maze.ant_env.set_state(qpos, qvel)
    obs, reward, terminated, _, info = env.step(np.zeros(env.action_space.shape))
    assert (reward, terminated, info["success"]) == (1.0, True, True), "antmaze does not score the ant at its goal"
    np.testing.assert_allclose(obs[:2], goal, atol=1e-6, err_msg="the observation's position is not in D4RL's frame")
    env.close()


def test_plots_write_png_files(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,critic_loss,bc_loss,score\n0,1.5,0.9,\n100,1.1,0.7,12.5\n200,0.8,0.6,\n300,0.6,0.5,40.0\n")
    sweep = [{"budget": b, "score": s, "score_std": 3.0, "episodes": 10} for b, s in [(0, 40.0), (1, 55.0), (3, 61.0)]]
    paths = [
        plot_learning_curve(log, tmp_path / "curve.png"),
        plot_learning_curve([{"step": 1, "score": 3.0}, {"step": 2, "score": 5.0}], tmp_path / "rows.png", ["score"]),
        plot_budget_sweep(sweep, tmp_path / "sub" / "sweep.png", reference_lines={"BC": 30.0, "FQL": 50.0}),
        plot_budget_sweep([{"budget": "W2<=0.1", "score": 1.0}, {"budget": "W2<=1", "score": 2.0}],
                          tmp_path / "categorical.png"),
    ]
    for path in paths:
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="not found"):
        plot_learning_curve(log, tmp_path / "bad.png", ["actor_loss"])


def test_making_and_stepping_an_ogbench_env_warns_nothing():
    """No gymnasium "precision lowered" warning (OGBench's float64 +-1 action bounds), however often the
    action space is read, and no GLFW "DISPLAY is missing" warning when ogbench is first imported."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = make_env(CUBE, seed=0)
        for _ in range(3):
            env.step(np.zeros(env.action_space.shape))
        env.close()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "precision lowered" in m or "DISPLAY" in m], messages


def test_progress_bars_name_the_policy_and_count_episodes_without_a_rate(capsys):
    compare_policies(RecordingAgent(), HOPPER, [0, 3], 2, seed=0, env_kwargs={"max_episode_steps": 5}, progress=True)
    err = capsys.readouterr().err
    assert "best-of-N L_test=0" in err and "VGF L_test=3" in err and "2/2 episodes" in err
    assert "/s" not in err and "it/s" not in err  # no rate: lockstep episodes finish in bursts
    evaluate(deterministic_act_fn, HOPPER, num_episodes=1, max_episode_steps=5, progress=True, label="BC reference")
    assert "BC reference" in capsys.readouterr().err


class ScriptedEnv(gym.Env):
    """Two-step episodes: ``info['success']`` is True after the first step and False after the last one, and
    every action the policy sends is recorded (the box is [-1, 1]^2)."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.received: list[np.ndarray] = []
        self.t = 0

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(3), {}

    def step(self, action):
        self.received.append(np.asarray(action))
        self.t += 1
        return np.zeros(3), 1.0, self.t == 2, False, {"success": self.t == 1}


def test_success_is_the_final_steps_flag_and_actions_reach_the_env_inside_the_box():
    """OGBench's rule: an episode succeeds when ``info['success']`` holds at its last step (a goal touched and
    left is not a success). Actions outside the box are clipped before ``env.step``, never passed on."""
    env = ScriptedEnv()
    result = evaluate(lambda obs: torch.tensor([[5.0, -0.25]]).expand(obs.shape[0], 2), CUBE, num_episodes=3,
                      envs=[env])  # fmt: skip
    assert result.score_kind == "success_rate" and result.success_rate == 0.0  # successful mid-way, not at the end
    np.testing.assert_array_equal(np.stack(env.received), np.tile([1.0, -0.25], (6, 1)))


def test_matched_budget_reads_back_the_budget_each_matched_policy_was_named_for():
    from vgf_prob.rl.evaluate import matched_budget, matched_policies

    names = [p.name for p in matched_policies([0, 1, 3, 8], num_particles=10, flow_steps=10)]
    assert [matched_budget(n) for n in names] == [1, 3, 8]
    assert names[2].startswith("best-of-M=25 ")  # 10 (10 + 1 + 2 * 8) / (10 + 1) = 24.5, rounded up
    for other in ("VGF", "best-of-N", "BC reference", "best-of-M=12 (matched to VGF L_test=x)"):
        assert matched_budget(other) is None


def test_a_zero_step_time_limit_is_refused_not_replaced_by_the_default():
    from vgf_prob.rl.envs import make_env

    with pytest.raises(ValueError, match="max_episode_steps must be at least 1, got 0"):
        make_env("reacher-spin-v0", max_episode_steps=0)
    env = make_env("reacher-spin-v0", max_episode_steps=3)
    try:
        env.reset(seed=0)
        steps = [env.step(env.action_space.sample()) for _ in range(3)]
        assert steps[-1][3] and not any(s[3] for s in steps[:-1])  # truncated exactly at the third step
    finally:
        env.close()
