"""The runnable examples run end to end and show what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bandit_2d_runs_and_a_moderate_budget_beats_best_of_n(tmp_path):
    png, results_json = tmp_path / "bandit.png", tmp_path / "results.json"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bandit_2d.py"), "--out", str(png), "--results-json", str(results_json)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    assert png.stat().st_size > 10_000
    results = json.loads(results_json.read_text())
    best_of_n = results["best-of-N (L=0)"]
    moderate = results["VGF L=5"]
    ascent = results["gradient ascent, no budget"]
    assert moderate["true reward"] > best_of_n["true reward"] + 0.05
    assert 0 < moderate["W2 bound"] < results["VGF L=25"]["W2 bound"]
    # plain ascent ends off the data, where the value model promises far more than the truth gives
    assert ascent["distance to data"] > 0.2
    assert ascent["value model"] - ascent["true reward"] > 0.5
    assert ascent["true reward"] < moderate["true reward"]


@pytest.mark.slow
def test_td3_bc_vgf_runs_at_tiny_size_on_a_d4rl_format_file(tmp_path):
    import h5py
    import numpy as np

    from vgf_prob.rl.d4rl import load_d4rl_hdf5

    dataset, results_json = tmp_path / "pendulum.hdf5", tmp_path / "results.json"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "td3_bc_vgf.py"), "--dataset", str(dataset), "--dataset-episodes", "3",
         "--steps", "4", "--batch-size", "32", "--hidden", "16", "--eval-episodes", "1", "--vgf-test-budgets", "0", "2",
         "--out", str(results_json)],
        check=True,
        timeout=300,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    with h5py.File(dataset, "r") as f:
        assert {"observations", "actions", "rewards", "terminals", "timeouts"} <= set(f)
        assert f["timeouts"][()].sum() == 3 and not f["terminals"][()].any()  # Pendulum ends by time limit only
    results = json.loads(results_json.read_text())
    # the library's D4RL reader takes the file as D4RL's own: the same q-learning rows as the script's loader
    with pytest.warns(UserWarning, match="clipped"):  # it assumes D4RL's [-1, 1] actions; Pendulum's torque is +-2
        library_rows = len(load_d4rl_hdf5(dataset, reward_scale="none"))
    assert library_rows == results["dataset"]["transitions"] == 3 * 199
    assert set(results["policies"]) == {"TD3+BC", "VGF reference (BC, one draw)", "VGF L_test=0 (best-of-N)",
                                        "VGF L_test=2"}
    assert all(np.isfinite(r["return"]) and -1700 < r["return"] <= 0 for r in results["policies"].values())
    assert results["reference_returns"]["expert"] > results["reference_returns"]["random"] + 300
