"""examples/cleanrl_td3_vgf.py: CleanRL's TD3 script turned into offline VGF with at most 10 marked glue lines."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch

import vgf_prob as vgf

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cleanrl_td3_vgf.py"
MARK = "# VGF glue"


def glue_lines() -> list[str]:
    """Code lines that end in the marker (the header comment that names the marker is not code)."""
    return [line for line in SCRIPT.read_text().splitlines() if MARK in line and line.split("#", 1)[0].strip()]


def test_at_most_ten_marked_glue_lines_and_every_vgf_use_is_marked():
    glue = glue_lines()
    assert 0 < len(glue) <= 10, f"{len(glue)} glue lines"
    lines = SCRIPT.read_text().splitlines()
    vgf_names = {"vgf", "reference", "flow", "q", "q_target", "low", "high"}  # what the glue introduces
    uses = {node.lineno for node in ast.walk(ast.parse(SCRIPT.read_text()))
            if isinstance(node, ast.Name) and node.id in vgf_names}
    unmarked = [lines[n - 1] for n in sorted(uses) if MARK not in lines[n - 1]]
    assert unmarked == [], unmarked


def test_the_scripts_critic_is_a_cleanrl_qnetwork_the_adapter_reads_as_rows():
    spec = importlib.util.spec_from_file_location("cleanrl_td3_vgf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines only: the script runs under __main__
    envs = gym.vector.SyncVectorEnv([module.make_env("Pendulum-v1", 0, 200)])
    qf = module.QNetwork(envs)
    assert [name for name, _ in qf.named_children()] == ["fc1", "fc2", "fc3"]
    obs, actions = torch.randn(4, 3), torch.rand(4, 5, 1) * 4 - 2
    value = vgf.as_value(qf, qf)
    q = value(obs, actions)
    assert value.layout == "rows" and q.shape == (4, 5, 2)
    with torch.no_grad():
        rows = qf(obs.repeat_interleave(5, 0), actions.reshape(20, 1)).reshape(4, 5)
    assert torch.allclose(q[..., 0], rows, atol=1e-6)
    envs.close()


@pytest.mark.slow
def test_the_cleanrl_example_runs_offline_at_tiny_size(tmp_path):
    out = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset-steps", "300", "--max-episode-steps", "50", "--total-timesteps", "6",
         "--batch-size", "16", "--particles", "3", "--eval-episodes", "1", "--test-budgets", "0", "2",
         "--out", str(out)],
        check=True, timeout=300, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    results = json.loads(out.read_text())
    assert results["transitions"] == 300
    assert set(results["returns"]) == {"VGF L_test=0", "VGF L_test=2"}
    assert all(len(r) == 1 and -50 * 16.3 <= r[0] <= 0 for r in results["returns"].values())
