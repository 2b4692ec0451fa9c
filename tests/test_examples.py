"""The runnable examples run end to end and show what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
