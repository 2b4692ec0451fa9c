"""`vgf-prob train --print-config`: the resolved settings, to compare with the authors' flags before a run."""

from __future__ import annotations

import json

from vgf_prob import cli


def printed_config(capsys, *argv: str) -> dict:
    assert cli.main(["train", *argv, "--print-config"]) in (0, None)
    return json.loads(capsys.readouterr().out)


def test_print_config_shows_the_d4rl_preset_without_reading_data(capsys, tmp_path):
    config = printed_config(capsys, "--preset", "hopper")
    assert (config["variant"], config["train_budget"], config["vgf_lr"], config["alpha"]) == ("stein", 5, 0.1, 0.1)
    assert (config["flow_aggregation"], config["target_aggregation"]) == ("mean", "min")
    assert config["critic_hidden_dims"] == [512] * 4 and config["num_particles"] == 10 and config["flow_steps"] == 10
    missing = tmp_path / "hopper-medium-v2.hdf5"  # never opened: the name alone selects the preset
    assert printed_config(capsys, "--dataset", str(missing), "--config", "alpha=0.05")["alpha"] == 0.05


def test_print_config_follows_the_preset_source(capsys):
    config = printed_config(capsys, "--preset", "cube-double-play", "--preset-source", "offline-to-online")
    assert (config["variant"], config["num_particles"], config["train_budget"], config["vgf_lr"]) == (
        "amortized", 5, 1, 0.05)
    offline = printed_config(capsys, "--preset", "cube-double-play")
    assert (offline["variant"], offline["train_budget"], offline["vgf_lr"]) == ("stein", 1, 0.1)
