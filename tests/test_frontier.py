"""The compute frontier and the run aggregates: rliable's IQM and intervals, a tiny frontier with every column."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from rliable import library, metrics

from rl_helpers import one_thread  # noqa: F401  (autouse fixture)
from vgf_prob.rl.agent import VGFAgent
from vgf_prob.rl.aggregate import iqm_with_ci, last_k_mean
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.frontier import (
    COST_COLUMNS,
    Setting,
    aggregate_frontier,
    frontier_from_runs,
    frontier_rows,
    matched_particles,
    plot_frontier,
    sweep_settings,
)

HOPPER = "hopper-medium-v2"  # obs 11, actions 3
SCORES = np.array([[10.0, 55.0], [20.0, 60.0], [30.0, 75.0], [40.0, 70.0], [100.0, 65.0], [0.0, 50.0]])


def test_iqm_and_its_interval_equal_rliables_on_a_fixed_input():
    iqm, low, high = iqm_with_ci(SCORES, reps=500, seed=3)
    # the middle half of the 12 sorted scores: 30 40 50 55 60 65 -> 50
    assert iqm == pytest.approx(50.0) == metrics.aggregate_iqm(SCORES)
    before = np.random.get_state()[1].copy()
    assert iqm_with_ci(SCORES, reps=500, seed=3) == (iqm, low, high)  # seeded: reproducible
    assert np.array_equal(np.random.get_state()[1], before)  # and the global generator is left alone
    np.random.seed(3)  # rliable resamples runs with numpy's global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        point, interval = library.get_interval_estimates(
            {"x": SCORES}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=500,
            random_state=np.random.RandomState(3))  # fmt: skip
    assert (iqm, low, high) == (point["x"][0], interval["x"][0, 0], interval["x"][1, 0])
    assert low < iqm < high
    assert iqm_with_ci([7.0, 7.0, 7.0], reps=50) == (7.0, 7.0, 7.0)  # a vector is one task's runs


def test_aggregates_refuse_what_they_cannot_summarise():
    with pytest.raises(ValueError, match="NaN"):
        iqm_with_ci([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="non-empty"):
        iqm_with_ci([])
    assert last_k_mean([71.0, 80.5, 78.0, 83.5]) == pytest.approx((80.5 + 78.0 + 83.5) / 3)
    assert last_k_mean([0.0, 0.0, 5.0], k=1) == 5.0
    with pytest.raises(ValueError, match="at least k=3"):
        last_k_mean([1.0, 2.0])


def test_compute_matched_best_of_n_costs_what_the_flow_costs():
    # N 10, K 10: a flow of L steps costs 10 (11 + 2L) passes, best-of-N costs 11 N
    assert [matched_particles(10, steps, 10) for steps in (1, 2, 3, 5, 8)] == [12, 14, 15, 19, 25]
    sizes = [s.num_particles for s in sweep_settings(10, (5, 40), (1, 5), ("best-of-N",), flow_steps=10)]
    assert sizes == [5, 12, 19, 40]


def test_settings_name_their_operator_and_refuse_nonsense():
    settings = sweep_settings(10, particle_counts=(5, 40), budgets=(1, 3))
    assert [s.label for s in settings] == [
        "best-of-N N=5", "best-of-N N=40", "VGF N=10 L_test=1", "VGF N=10 L_test=3", "GradStep N=10 L_test=1",
        "GradStep N=10 L_test=3", "SMC N=10 L_test=1", "SMC N=10 L_test=3"]  # fmt: skip
    with pytest.raises(ValueError, match="unknown test-time operator"):
        Setting("beam", 4, 1)
    with pytest.raises(ValueError, match="best-of-N takes no flow step"):
        Setting("VGF", 4, 0)
    with pytest.raises(ValueError, match="num_particles"):
        Setting("best-of-N", 0)


def test_a_tiny_frontier_has_every_column_counts_its_cost_and_aggregates(tmp_path):
    torch.manual_seed(0)
    config = VGFConfig(critic_hidden_dims=(16,), bc_hidden_dims=(16,), num_particles=2, flow_steps=3)
    agent = VGFAgent(11, 3, config)
    settings = [Setting("best-of-N", 3), *(Setting(op, 2, 1) for op in ("VGF", "GradStep", "SMC"))]
    kwargs = dict(num_episodes=2, seed=1, max_episode_steps=4)
    rows = frontier_rows(agent, HOPPER, settings, run="a", **kwargs)
    again = frontier_rows(agent, HOPPER, settings, run="b", **kwargs)
    assert [r["score"] for r in rows] == [r["score"] for r in again]  # same seeded episodes, same noise
    for row in rows:
        assert set(COST_COLUMNS) | {"score", "score_low", "score_high", "label", "episodes", "run"} <= set(row)
        assert row["score_low"] <= row["score"] <= row["score_high"] and row["episodes"] == 2
        assert row["ms_per_action"] > 0
    # per action, K = 3 BC steps per particle; a flow step is 2 passes per particle; one scoring pass
    passes = {r["label"]: r["passes_per_action"] for r in rows}
    assert passes == {"best-of-N N=3": 3 * 4, "VGF N=2 L_test=1": 2 * 6, "GradStep N=2 L_test=1": 2 * 6,
                      "SMC N=2 L_test=1": 2 * 8}  # SMC weighs before the step and at the end  # fmt: skip
    table = aggregate_frontier(rows + again, reps=100)
    assert [t["runs"] for t in table] == [2] * 4
    assert all(t["score"] == t["score_low"] == t["score_high"] == r["score"] for t, r in zip(table, rows))
    assert plot_frontier(table, tmp_path / "frontier.png").stat().st_size > 0
    with pytest.raises(ValueError, match="exactly one row per task"):
        aggregate_frontier(rows + rows)


def test_the_frontier_of_run_directories_writes_its_rows_and_plot(tmp_path):
    from vgf_prob.rl.checkpoint import FORMAT_VERSION, REQUIRED_KEYS, save_checkpoint

    torch.manual_seed(0)
    agent = VGFAgent(11, 3, VGFConfig(critic_hidden_dims=(8,), bc_hidden_dims=(8,), num_particles=2, flow_steps=2))
    payload = {key: 0 for key in REQUIRED_KEYS} | {"format_version": FORMAT_VERSION, "agent": agent.training_state(),
                                                   "run": {"env_name": HOPPER}}  # fmt: skip
    for name in ("seed0", "seed1"):
        save_checkpoint(tmp_path / name, payload)
    settings = [Setting("best-of-N", 2), Setting("VGF", 2, 1)]
    rows, table = frontier_from_runs([tmp_path / "seed0", tmp_path / "seed1"], settings, num_episodes=1,
                                     out=tmp_path / "out")  # fmt: skip
    assert [r["run"] for r in rows] == ["seed0", "seed0", "seed1", "seed1"] and len(table) == 2
    saved = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert saved["aggregate"] == table and (tmp_path / "out" / "frontier.png").stat().st_size > 0
