"""The ``vgf-prob`` command: the quick start on a tiny generated dataset, eval sweeps, data, errors, recipes."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vgf_prob
from vgf_prob import cli
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.evaluate import make_budget
from vgf_prob.rl.run import experiment
from vgf_prob.rl.run.experiment import build_config
from vgf_prob.rl.run.spec import TrainingSetupError, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = {"batch_size": 8, "critic_hidden_dims": (16, 16), "bc_hidden_dims": (16, 16),
                  "amortized_hidden_dims": (16, 16), "flow_steps": 2}  # fmt: skip
TINY_QUICKSTART = dataclasses.replace(experiment.QUICKSTART, steps=4, eval_every=4, eval_episodes=1, budgets=(0, 1),
                                      overrides={**experiment.QUICKSTART.overrides, **TINY_OVERRIDES})  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets torch's global thread count; give the next test the original one back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """``vgf-prob train`` without a dataset, shrunk: generates and caches data, trains, evaluates."""
    root = tmp_path_factory.mktemp("quickstart")
    patch = pytest.MonkeyPatch()
    patch.setenv("VGF_PROB_CACHE", str(root / "cache"))
    patch.setattr(experiment, "QUICKSTART", TINY_QUICKSTART)
    patch.setattr(experiment, "GENERATED_EPISODES", 2)
    threads = torch.get_num_threads()
    try:
        out = root / "run"
        status = cli.main(["train", "--out", str(out), "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
        patch.undo()
    assert status == 0
    cached = sorted((root / "cache").rglob(f"{TINY_QUICKSTART.dataset}.hdf5"))
    return out, cached


def test_quickstart_trains_and_compares_bc_best_of_n_and_vgf(quickstart_run, capsys):
    out, cached = quickstart_run
    assert len(cached) == 1  # the quick start's generated Reacher data, 2 episodes
    summary = json.loads((out / "summary.json").read_text())
    policies = [(row["policy"], row["budget"]) for row in summary["final_scores"]]
    # N 10 particles, K 2 BC steps: VGF L_test 1 costs 10 (2 + 1 + 2) = 50 critic passes, best-of-M 50 / 3 -> 17
    matched = "best-of-M=17 (matched to VGF L_test=1)"
    assert policies == [("BC reference", None), ("best-of-N", 0), ("VGF", 1), (matched, None)]
    costs = {row["policy"]: row.get("passes_per_action") for row in summary["final_scores"]}
    assert costs["BC reference"] is None  # agent.bc_action is not a metered call
    assert costs["VGF"] == 50 and costs[matched] == 17 * 3 and costs["best-of-N"] == 10 * 3
    assert summary["run"]["env_name"] == TINY_QUICKSTART.dataset
    assert (out / "latest.pt").exists() and (out / "learning_curve.png").stat().st_size > 0
    assert (out / "eval.csv").read_text().count("\n") == 5


def test_eval_budget_sweep_writes_json_and_png(quickstart_run, tmp_path, capsys):
    out, _ = quickstart_run
    assert cli.main(["eval", str(out), "--budgets", "0", "2", "--episodes", "1", "--out", str(tmp_path),
                     "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "budget_sweep-steps-step4.json").read_text())
    matched = ("best-of-M=23 (matched to VGF L_test=2)", None)  # N 10, K 2: 10 (3 + 4) / 3 = 23.3 -> 23
    assert [(row["policy"], row["budget"]) for row in report["rows"]] == [
        ("BC reference", None), ("best-of-N", 0), ("VGF", 2), matched]  # fmt: skip
    assert (tmp_path / "budget_sweep-steps-step4.png").stat().st_size > 0
    assert "budget sweep" in capsys.readouterr().out


def test_eval_frontier_of_a_trained_run_writes_finite_rows_in_the_row_schema_and_a_plot(quickstart_run, tmp_path,
                                                                                        capsys):
    from vgf_prob.rl.evaluate import COST_COLUMNS, ROW_COLUMNS

    out, _ = quickstart_run
    other = tmp_path / "seed1.pt"  # a second "seed": the same checkpoint under another name
    shutil.copy(out / "latest.pt", other)
    assert cli.main(["eval", str(out), str(other), "--frontier", "--particles", "2", "--budgets", "1", "--episodes",
                     "2", "--out", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "frontier.json").read_text())
    # N 10, K 2: best-of-N at 2 and at the matched 17; each flow operator at L_test 1; two runs of one checkpoint
    labels = ["best-of-N N=2", "best-of-N N=17", "VGF N=10 L_test=1", "GradStep N=10 L_test=1", "SMC N=10 L_test=1"]
    assert [row["label"] for row in saved["rows"]] == labels * 2
    for row in saved["rows"]:
        assert set(ROW_COLUMNS) | set(COST_COLUMNS) | {"score_low", "score_high", "num_particles", "run"} <= set(row)
        numbers = [row[c] for c in (*COST_COLUMNS, "score", "score_low", "score_high")]
        assert all(math.isfinite(v) for v in numbers) and row["episodes"] == 2 and row["cpu_ms_per_action"] >= 0
    assert {row["label"]: row["passes_per_action"] for row in saved["rows"][:2]} == {"best-of-N N=2": 6,
                                                                                      "best-of-N N=17": 51}
    assert [row["label"] for row in saved["aggregate"]] == labels and all(r["runs"] == 2 for r in saved["aggregate"])
    assert [r["score"] for r in saved["aggregate"]] == [r["score"] for r in saved["rows"][:5]]  # equal runs: their IQM
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert "test-time frontier" in capsys.readouterr().out
    assert cli.main(["eval", str(out), str(out)]) == 2
    assert "several runs need --frontier" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--frontier", "--budgets", "0"]) == 2
    assert "whole numbers >= 1" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--frontier", "--operators", "beam"]) == 2
    assert "--operators: unknown ['beam']" in capsys.readouterr().err
    assert cli.main(["eval", str(out), str(out), "--frontier"]) == 2  # one seed twice: before any episode
    assert "each run name needs one run of every task" in capsys.readouterr().err


def test_data_inspect_prints_a_summary(quickstart_run, capsys):
    _, cached = quickstart_run
    assert cli.main(["data", "inspect", str(cached[0])]) == 0
    text = capsys.readouterr().out
    assert "obs_dim" in text and TINY_QUICKSTART.dataset in text and "Reacher-v5" in text  # env known from the file


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--dataset", "/nonexistent/hopper-medium-v2.hdf5"], "dataset file not found"),
        (["train", "--dataset", "./missing_dir/data.npz"], "dataset file not found"),
        (["train", "--dataset", "not-a-dataset"], "neither an existing file"),
        (["train", "--dataset", "puzzle-4x4-play-v0"], "vgf-prob data generate --env puzzle-4x4-v0"),
        (["eval", "/nonexistent/run"], "checkpoint not found"),
    ],
)
def test_user_errors_are_one_clear_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vgf-prob: error:") and message in err


def test_bad_preset_and_bad_override_are_clear_errors():
    with pytest.raises(TrainingSetupError, match=r"unknown preset 'hoper'( \(offline\))?; known presets:"):
        build_config("hoper", "x", {})
    with pytest.raises(TrainingSetupError, match=r"unknown VGFConfig field\(s\) \['bach_size'\]"):
        build_config(None, "x", parse_overrides(["bach_size=3"]))
    with pytest.raises(TrainingSetupError, match="KEY=VALUE"):
        parse_overrides(["batch_size"])
    with pytest.raises(TrainingSetupError, match="batch_size must be an int"):
        build_config(None, "x", parse_overrides(["batch_size=0"]))


def test_overrides_and_presets_build_the_config():
    overrides = ["critic_hidden_dims=64,64", "alpha=0.5", "target_aggregation=min", "test_budget=null"]
    config = build_config(None, "cube-double-play-singletask-task2-v0", parse_overrides(overrides))
    assert config.variant == "stein" and config.train_budget == 1 and config.vgf_lr == 0.1  # the cube-double preset
    assert config.critic_hidden_dims == (64, 64) and config.alpha == 0.5 and config.target_aggregation == "min"
    assert build_config("hopper", "my-data", {}).target_aggregation == "min"
    assert build_config(None, "my-data", {}) == VGFConfig()


def test_budget_objects_for_each_budget_type():
    assert make_budget(3.0, "steps", 20) == 3
    assert "DisplacementBudget(0.5)" in repr(make_budget(0.5, "displacement", 20).parts())
    with pytest.raises(ValueError, match="whole numbers"):
        make_budget(1.5, "steps", 20)


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "vgf_prob", "data", "--help"], capture_output=True, text=True,
                            cwd=ROOT, check=True)  # fmt: skip
    assert "generate" in result.stdout and "inspect" in result.stdout


def _reproduce_module():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "recipes" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_parses_into_valid_configs(recipe):
    reproduce = _reproduce_module()
    runs = reproduce.expand_runs(reproduce.load_recipe(recipe))
    assert runs
    for run in runs:
        config = run.config()
        assert isinstance(config, VGFConfig)
        args = cli.build_parser().parse_args(run.command(reproduce.load_recipe(recipe)["run"])[1:])
        assert build_config(args.preset, run.task, parse_overrides(args.overrides)) == config
    tasks = {run.task for run in runs}
    if recipe.name == "d4rl.toml":
        assert len(tasks) == 15
        for run in runs:  # the authors' one shared D4RL setting (REFERENCE.md section 3)
            cfg = run.config()
            assert (cfg.variant, cfg.train_budget, cfg.vgf_lr, cfg.alpha, cfg.num_particles) == ("stein", 5, 0.1, 0.1, 10)
            assert (cfg.flow_aggregation, cfg.target_aggregation) == ("mean", "min")
    if recipe.name == "ogbench.toml":
        assert len(tasks) == 50
        puzzle = next(run.config() for run in runs if run.task.startswith("puzzle-4x4"))
        assert (puzzle.variant, puzzle.train_budget, puzzle.vgf_lr, puzzle.alpha) == ("stein", 3, 0.01, 0.2)
        giant = next(run for run in runs if run.task.startswith("antmaze-giant"))
        assert giant.steps == 3_000_000 and giant.config().target_aggregation == "min"


def test_llm_subcommand_delegates_to_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["llm", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: vgf-prob llm")


# ------------------------------------------------------------------------------- a clean first run (issue 10)
def _all_parsers(parser):
    """The parser and every subcommand parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_option_and_subcommand_has_help_text():
    missing = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in _all_parsers(cli.build_parser())
        for a in p._actions
        if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()
    ]
    assert missing == []


def test_version_and_help_answer_without_loading_torch():
    code = ("import sys, contextlib, io\nfrom vgf_prob import cli\nfor argv in (['--version'], ['train', '--help'], "
            "['eval', '--help']):\n    with contextlib.redirect_stdout(io.StringIO()) as out:\n        try:\n"
            "            cli.main(argv)\n        except SystemExit as e:\n            assert e.code == 0\n"
            "    print(out.getvalue().splitlines()[0])\n"
            "print(sorted(m for m in ('torch', 'gymnasium', 'ogbench', 'numpy', 'h5py') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == f"vgf-prob {vgf_prob.__version__}"
    assert lines[1].startswith("usage: vgf-prob train") and lines[2].startswith("usage: vgf-prob eval")
    assert lines[3] == "[]"


def test_eval_takes_the_thread_count_the_run_trained_with(quickstart_run, tmp_path):
    out, _ = quickstart_run  # trained with --threads 1, recorded in the checkpoint
    torch.set_num_threads(2)
    assert cli.main(["eval", str(out), "--episodes", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert torch.get_num_threads() == 1
    assert cli.main(["eval", str(out), "--episodes", "1", "--out", str(tmp_path), "--no-progress",
                     "--threads", "2"]) == 0  # fmt: skip
    assert torch.get_num_threads() == 2


def test_final_scores_print_once_under_a_title_line_of_their_own(quickstart_run, tmp_path, capsys):
    _, cached = quickstart_run
    title = "reacher-noisy-v0: 2 steps, seed 0"
    assert cli.main(["train", "--dataset", str(cached[0]), "--env", "reacher-noisy-v0", "--out", str(tmp_path / "r"),
                     "--steps", "2", "--eval-every", "1", "--eval-episodes", "1", "--budgets", "0", "--no-progress",
                     "--config", *(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                   for k, v in TINY_OVERRIDES.items())]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("step 1: BC reference") for line in lines)  # the evaluation during training
    assert not any(line.startswith("step 2:") for line in lines)  # the final one is the table, not a line too
    assert lines.count(title) == 1  # the table's title, whole on its line
    assert "BC reference" in lines[lines.index(title) + 4]


def test_os_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/x.hdf5")

    monkeypatch.setattr(cli, "_inspect", denied)
    assert cli.main(["data", "inspect", "x"]) == 2
    assert capsys.readouterr().err == "vgf-prob: error: /data/x.hdf5: Permission denied\n"

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_inspect", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["data", "inspect", "x"])


def test_config_values_follow_their_annotations():
    values = parse_overrides(["critic_hidden_dims=[32, 32]", "bc_hidden_dims=64", "lr=1", 'variant="amortized"',
                                  "test_budget=null", "compile=false", "max_grad_norm=0"])  # fmt: skip
    assert values == {"critic_hidden_dims": (32, 32), "bc_hidden_dims": (64,), "lr": 1.0, "variant": "amortized",
                      "test_budget": None, "compile": False, "max_grad_norm": 0.0}  # fmt: skip
    assert type(values["lr"]) is float and type(values["max_grad_norm"]) is float  # 0 is 0, not "use the default"


def test_every_spec_field_is_a_train_option_and_a_spec_round_trips_through_its_command_line(tmp_path):
    """Adding a run setting is a `TrainSpec` field plus its option: the CLI maps options to fields by name, so a
    spec with every field set survives `to_argv` -> the parser -> `train_spec` unchanged."""
    from vgf_prob.rl.run.spec import TrainSpec

    data = tmp_path / "data.hdf5"
    data.write_bytes(b"")  # a file: the CLI stores its absolute path
    spec = TrainSpec(dataset=str(data), env="hopper-medium-v2", task_id=2, preset="hopper",
                     preset_source="offline-to-online", overrides={"alpha": 0.5, "critic_hidden_dims": (32, 32)},
                     steps=10, out=str(tmp_path / "run"), resume=True, device="cpu", seed=3, eval_every=5,
                     eval_episodes=2, budgets=(0, 4), log_every=2, checkpoint_every=5, threads=1, progress=False,
                     log=("csv", "tensorboard"), allow_nonfinite=True)  # fmt: skip
    unset = [name for name in dataclasses.asdict(TrainSpec()) if name not in spec.given()]
    assert unset == []  # the spec above sets every field
    args = cli.build_parser().parse_args(spec.to_argv())
    assert cli.train_spec(args) == spec
    assert TrainSpec.from_dict(spec.to_dict()) == spec
