"""The ``vgf-prob`` command (also ``python -m vgf_prob``).

    vgf-prob train                      # the quick start: generated Reacher data, small agent, comparison table
    vgf-prob train --dataset cube-single-play-singletask-task1-v0 --steps 1000000 --config batch_size=512
    vgf-prob train --dataset ~/d4rl/hopper_medium-v2.hdf5 --env hopper-medium-v2 --preset hopper
    vgf-prob eval runs/<run> --budgets 0 1 2 3 [--budget-type displacement]
    vgf-prob data generate --env cube-single-v0 --episodes 1000 --length 1001
    vgf-prob data inspect <file or id>
    vgf-prob llm ...                    # the LLM demo (vgf_prob.llm.demo)

Every expected failure (a bad option or ``--config`` value, a missing or malformed file, an unknown
environment or one whose dimensions differ from the data's, a device this machine lacks, a run directory
in use or not a run's, any OSError) prints one line ``vgf-prob: error: ...`` and exits with status 2,
before training starts wherever it can be checked then. Anything else is a bug and keeps its traceback.
Numbers are taken as given: 0 is 0 (an error where it makes no sense), never "use the default".

Heavy modules (torch, gymnasium, ogbench) are imported inside the commands, so ``--help`` and
``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_BUDGETS = (0, 1, 2, 3)


@dataclass(frozen=True)
class Quickstart:
    """What ``vgf-prob train`` does without arguments (3 min 35 s on 2 CPU cores from a fresh cache, measured).

    A D4RL-format Reacher dataset generated offline by `vgf_prob.rl.gym_generate` (cached, about a
    second): a scripted expert whose every action is replaced, with probability 1/2, by a uniform random
    one (``reacher-mixed-v0``, 200 episodes). The paper's D4RL setting (Stein variant, N = 10, K = 10, TD
    targets with the min over the two heads, the flow with their mean, vgf_lr 0.1, alpha 0.1) with 2 x 128
    networks instead of 4 x 512 and L_train = 1 instead of 5 (2.3x cheaper per update); then the BC
    reference, best-of-N (L_test = 0) and VGF (L_test > 0) on the same seeded episodes, every
    ``eval_every`` steps, scored as D4RL scores: 0 = uniform random actions, 100 = the scripted expert.
    The search that chose this: benchmarks/main_job_search.md.
    ``threads``: torch intra-op threads. The networks are small, so a second thread gains little, and on
    a busy 2-core machine OpenMP oversubscription made an update 16x slower with 2 threads than with 1.
    """

    dataset: str = "reacher-mixed-v0"
    episodes: int = 200
    threads: int = 1
    steps: int = 3000
    eval_every: int = 1000
    eval_episodes: int = 50
    budgets: tuple[int, ...] = (0, 1, 2, 3, 5, 8)
    note: str = (
        "Reacher: D4RL score 0 = uniform random actions, 100 = the scripted expert; the data's behaviour "
        "scores 42 (half its actions random). ± is the std over the 50 episodes"
    )
    overrides: tuple[tuple[str, Any], ...] = (
        ("variant", "stein"),
        ("target_aggregation", "min"),
        ("flow_aggregation", "mean"),
        ("critic_hidden_dims", (128, 128)),
        ("bc_hidden_dims", (128, 128)),
        ("train_budget", 1),
        ("vgf_lr", 0.1),
        ("alpha", 0.1),
    )


QUICKSTART = Quickstart()


class CLIError(Exception):
    """A user error: printed as ``vgf-prob: error: <message>``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's own prints the usage block first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum``, as given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _nonnegative_number(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


_POSITIVE = _int_at_least(1)
_NONNEGATIVE = _int_at_least(0)


def _version() -> str:
    from vgf_prob import __version__

    return __version__


# ============================================================================================== parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``llm``'s own options are parsed by the demo)."""
    parser = _Parser(
        prog="vgf-prob", description="Value Gradient Flow: behaviour-regularised RL as budgeted optimal transport."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the vgf-prob version and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,sweep,data,llm}")

    tr = sub.add_parser("train", help="train a VGF agent offline (no arguments: the quick start)",
                        description="Train a VGF agent. Without --dataset: the quick-start job.")  # fmt: skip
    tr.add_argument("--dataset", help="OGBench dataset name, a .npz/.hdf5 file (OGBench / D4RL), or a Minari id")
    tr.add_argument("--env", help="environment to evaluate in (default: inferred from the dataset)")
    tr.add_argument("--task-id", type=_POSITIVE,
                    help="OGBench single task to relabel the data for (default: the env's)")  # fmt: skip
    tr.add_argument("--preset", help="task preset of the authors' settings (default: inferred from the dataset)")
    tr.add_argument("--preset-source", choices=("offline", "offline-to-online"), default="offline",
                    help="which of the authors' scripts the preset follows (default offline)")  # fmt: skip
    tr.add_argument("--print-config", action="store_true",
                    help="print the resolved VGFConfig (preset, then --config) as JSON and exit; loads no data")  # fmt: skip
    tr.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                    help="VGFConfig overrides, typed by the field (e.g. lr=1e-4 critic_hidden_dims=256,256 "
                         "test_budget=null)")  # fmt: skip
    tr.add_argument("--steps", type=_POSITIVE,
                    help=f"gradient steps (default 1000000; quick start: {QUICKSTART.steps})")  # fmt: skip
    tr.add_argument("--out", type=Path,
                    help="run directory, new or a vgf-prob run's (default runs/<dataset>-seed<seed>-<time>)")  # fmt: skip
    tr.add_argument("--resume", action="store_true", help="continue the run in --out (default: the newest)")
    tr.add_argument("--device", default="cpu", help="torch device to train on: cpu, cuda, cuda:1, ... (default cpu)")
    tr.add_argument("--seed", type=_NONNEGATIVE, default=0, help="seed of every random stream (default 0)")
    tr.add_argument("--eval-every", type=_POSITIVE, help="steps between evaluations (default: only at the end)")
    tr.add_argument("--eval-episodes", type=_POSITIVE,
                    help=f"episodes per policy and evaluation (default 10; quick start: {QUICKSTART.eval_episodes})")  # fmt: skip
    tr.add_argument("--budgets", type=_NONNEGATIVE, nargs="+",
                    help="L_test values to evaluate (0 = best-of-N; default 0 1 2 3)")  # fmt: skip
    tr.add_argument("--log-every", type=_POSITIVE, help="steps between log rows (default steps/100)")
    tr.add_argument("--checkpoint-every", type=_POSITIVE, help="steps between checkpoints (default steps/10)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.add_argument("--threads", type=_POSITIVE,
                    help=f"torch CPU threads (default: torch's choice; quick start: {QUICKSTART.threads})")  # fmt: skip

    ev = sub.add_parser("eval", help="evaluate a checkpoint; --budgets sweeps the test-time budget",
                        description="Evaluate a checkpoint: BC, best-of-N and VGF, or a sweep over --budgets.")  # fmt: skip
    ev.add_argument("checkpoint", help="a checkpoint file or a run directory (its latest.pt)")
    ev.add_argument("--env", help="environment (default: the one the run trained for)")
    ev.add_argument("--episodes", type=_POSITIVE, default=10, help="episodes per policy and budget (default 10)")
    ev.add_argument("--budgets", type=_nonnegative_number, nargs="+",
                    help="test-time budgets to sweep (steps: L_test; displacement/sinkhorn: radius)")  # fmt: skip
    ev.add_argument("--budget-type", choices=("steps", "displacement", "sinkhorn"), default="steps",
                    help="what --budgets measure: flow steps, or a displacement / Sinkhorn radius (default steps)")  # fmt: skip
    ev.add_argument("--max-flow-steps", type=_POSITIVE, default=20,
                    help="step cap for displacement/sinkhorn budgets (default 20)")  # fmt: skip
    ev.add_argument("--out", type=Path, help="where the JSON and PNG go (default: the checkpoint's folder)")
    ev.add_argument("--seed", type=_NONNEGATIVE, default=0, help="seed of the evaluation episodes (default 0)")
    ev.add_argument("--device", default="cpu", help="torch device to act on (default cpu)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--threads", type=_POSITIVE,
                    help="torch CPU threads (default: the number the run trained with, as training chose it)")  # fmt: skip

    from vgf_prob.rl.sweep import add_arguments as add_sweep_arguments  # no Ray import

    add_sweep_arguments(sub.add_parser("sweep", help="a recipe's runs as Ray Tune trials (needs the [sweep] extra)",
                                       description="Run a recipe's runs in parallel with Ray Tune, here or on a cluster."))  # fmt: skip

    da = sub.add_parser("data", help="generate or inspect datasets", description="Generate or inspect datasets.")
    dsub = da.add_subparsers(dest="data_command", required=True)
    gen = dsub.add_parser("generate", help="an OGBench manipulation 'play' dataset from ogbench's oracles")
    gen.add_argument("--env", default="cube-single-v0", help="e.g. cube-single-v0, cube-double-v0, puzzle-3x3-v0")
    gen.add_argument("--episodes", type=_POSITIVE, default=1000, help="training episodes (the size; ogbench: 1000)")
    gen.add_argument("--length", type=_int_at_least(2), default=1001, help="steps per episode (ogbench: 1001)")
    gen.add_argument("--val-episodes", type=_POSITIVE, help="validation episodes (default: episodes / 10, at least 1)")
    gen.add_argument("--seed", type=_NONNEGATIVE, default=0, help="seed of the oracles and resets (default 0)")
    gen.add_argument("--workers", type=_POSITIVE, default=1, help="processes rolling out episodes (default 1)")
    gen.add_argument("--out", type=Path, help="folder (default: the vgf-prob cache, reused by later calls)")
    ins = dsub.add_parser("inspect", help="summary table of a dataset file or id")
    ins.add_argument("dataset", help="OGBench name, .npz/.hdf5 file, or Minari id")
    ins.add_argument("--env", help="D4RL env name for the reward processing of an .hdf5 file")
    ins.add_argument("--task-id", type=_POSITIVE, help="OGBench single task to relabel the data for")

    sub.add_parser("llm", help="LLM demo (vgf-prob llm --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vgf-prob`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["llm"]:
        return _llm(argv[1:])
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    try:
        threads = getattr(args, "threads", None)  # eval's default comes from its checkpoint (see _eval)
        if threads is None and args.command == "train" and args.dataset is None:
            threads = QUICKSTART.threads
        if threads is not None:
            _set_threads(threads)
        if args.command == "train":
            _train(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "sweep":
            _sweep(args)
        elif args.data_command == "generate":
            _generate(args)
        else:
            _inspect(args)
    except CLIError as err:
        return _fail(str(err))
    except OSError as err:  # a file the user named, a full disk, a read-only or missing folder
        return _fail(_os_error_text(err))
    return 0


def _fail(message: str) -> int:
    """Print ``vgf-prob: error: <message>`` as one line (a multi-line message joined by '; '); status 2."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"vgf-prob: error: {line}", file=sys.stderr)
    return 2


def _os_error_text(err: OSError) -> str:
    """``<file>: <reason>`` of an OSError (Python's str() adds '[Errno N]' and quotes)."""
    files = [str(f) for f in (err.filename, err.filename2) if f is not None]
    reason = err.strerror or str(err) or type(err).__name__
    return f"{' -> '.join(files)}: {reason}" if files else reason


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _one_line_warnings() -> None:
    """vgf-prob's own warnings print as ``vgf-prob: warning: <message>`` (other packages' keep Python's format)."""
    if getattr(warnings.formatwarning, "_vgf_prob", False):
        return
    package = Path(__file__).resolve().parent
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):  # noqa: ANN001 (warnings' signature)
        if Path(filename).resolve().is_relative_to(package):
            return f"vgf-prob: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning._vgf_prob = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning


# ============================================================================================== train
def _train(args: argparse.Namespace) -> None:
    from vgf_prob.rl.checkpoint import LATEST, CheckpointError
    from vgf_prob.rl.trainer import TrainingSetupError, check_device, check_run_dir, train

    quickstart = args.dataset is None
    if args.print_config:
        print(json.dumps(_resolved_config(args).to_dict(), indent=2))
        return
    try:  # before the data is loaded (or generated); the environment is checked by `train` before step 1
        check_device(args.device)
        if args.out is not None:
            check_run_dir(args.out, args.resume)
    except (CheckpointError, TrainingSetupError) as err:
        raise CLIError(str(err)) from err
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if quickstart:
        if args.env is not None or args.task_id is not None:
            raise CLIError("--env/--task-id need --dataset (without it the quick start's Reacher job runs)")
        dataset, env_name, name = _quickstart_dataset()
    else:
        dataset, env_name, name = load_dataset(args.dataset, args.env, args.task_id, args.device)
    timings["dataset"] = time.perf_counter() - t0
    config = build_config(args.preset, name, args.config, quickstart, args.preset_source)
    steps = args.steps if args.steps is not None else (QUICKSTART.steps if quickstart else 1_000_000)
    out = _run_dir(args.out, name, args.seed, args.resume)
    if args.budgets is not None:
        budgets = tuple(args.budgets)
    else:
        budgets = QUICKSTART.budgets if quickstart else DEFAULT_BUDGETS
    if args.eval_episodes is not None:
        eval_episodes = args.eval_episodes
    else:
        eval_episodes = QUICKSTART.eval_episodes if quickstart else 10
    if env_name is None:
        print(f"vgf-prob: no environment known for {args.dataset!r}; training without evaluation (pass --env)")
    print(f"dataset {name}: {len(dataset)} transitions, obs {dataset.obs_dim}, actions {dataset.action_dim} "
          f"({timings['dataset']:.0f} s)\nrun directory {out}")  # fmt: skip
    try:
        result = train(
            config, dataset, env_name, out, steps,
            eval_every=QUICKSTART.eval_every if quickstart and args.eval_every is None else args.eval_every,
            eval_episodes=eval_episodes,
            log_every=max(1, steps // 100) if args.log_every is None else args.log_every,
            checkpoint_every=max(1, steps // 10) if args.checkpoint_every is None else args.checkpoint_every,
            resume=args.resume, seed=args.seed, device=args.device, progress=not args.no_progress,
            eval_budgets=budgets,
        )  # fmt: skip
    except (CheckpointError, TrainingSetupError) as err:
        raise CLIError(str(err)) from err
    except OSError as err:
        if not (out / LATEST).exists():
            raise
        raise CLIError(f"{_os_error_text(err)}; the run continues from its last checkpoint with --out {out} "
                       "--resume") from err  # fmt: skip
    timings.update(result.phase_seconds)
    total = time.perf_counter() - t0
    if result.final_scores:
        from vgf_prob.rl.trainer import format_scores

        format_scores(result.final_scores, f"{env_name}: {steps} steps, seed {args.seed}", print_table=True)
        if quickstart:
            print(QUICKSTART.note)
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if v > 0)
    print(f"total {total:.0f} s ({phases})")
    print(f"logs {result.train_log}, {result.eval_log}; checkpoint {result.checkpoint}")
    if result.learning_curve is not None:
        print(f"learning curve {result.learning_curve}")


def _quickstart_dataset() -> tuple[Any, str, str]:
    """The quick start's cached Reacher data (generated on first use, in about a second) and its env name."""
    from vgf_prob.rl.d4rl import load_d4rl_hdf5
    from vgf_prob.rl.gym_generate import ensure_gym_dataset

    q = QUICKSTART
    path = ensure_gym_dataset(q.dataset, q.episodes)
    return load_d4rl_hdf5(path, env_name=q.dataset), q.dataset, q.dataset


def load_dataset(
    spec: str, env: str | None = None, task_id: int | None = None, device: str = "cpu"
) -> tuple[Any, str | None, str]:
    """``(dataset, env name to evaluate in or None, run name)`` for a dataset argument.

    ``spec`` is a D4RL ``.hdf5``/``.h5`` file, an OGBench ``.npz`` file, a Minari id (``a/b/c-v0``
    present in the local store) or an OGBench dataset name (looked up in ``~/.ogbench/data``).
    """
    from vgf_prob.rl import data

    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    try:
        if suffix in (".hdf5", ".h5"):
            if not path.is_file():
                raise CLIError(f"dataset file not found: {path}")
            env = env or _d4rl_name_from_file(path)
            dataset = data.load_d4rl_hdf5(path, env_name=env, device=device)
            return dataset, env, env or path.stem
        if suffix == ".npz":
            if not path.is_file():
                raise CLIError(f"dataset file not found: {path}")
            dataset, _ = data.load_ogbench(path, task_id=task_id, device=device)
            name = dataset.metadata["env_name"]
            return dataset, env or name, name
        if path.exists():
            raise CLIError(f"{path}: expected a .hdf5/.h5 (D4RL) or .npz (OGBench) file")
        if "/" in spec and not spec.startswith((".", "/", "~")):
            from vgf_prob.rl.minari_data import local_minari_ids, minari_root

            if spec not in local_minari_ids():
                raise CLIError(
                    f"Minari dataset {spec!r} is not in the local store {minari_root()} (vgf-prob never downloads; "
                    f"local ids: {local_minari_ids() or 'none'})"
                )
            return data.load_minari(spec, device=device), env, spec.replace("/", "-")
        if os.sep in spec or spec.startswith((".", "~")):
            raise CLIError(f"dataset not found: {path}")
        return _load_ogbench_name(spec, env, task_id, device)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err


def _load_ogbench_name(name: str, env: str | None, task_id: int | None, device: str) -> tuple[Any, str, str]:
    from vgf_prob.rl.data import load_ogbench
    from vgf_prob.rl.ogbench_data import DEFAULT_OGBENCH_DIR, ogbench_names

    try:
        base, _ = ogbench_names(name, task_id)
    except ValueError as err:
        raise CLIError(
            f"{name!r} is neither an existing file, a Minari id nor an OGBench dataset name ({err})"
        ) from err
    if not (Path(DEFAULT_OGBENCH_DIR).expanduser() / f"{base}.npz").is_file():
        env_id = re.sub(r"-play-v(\d+)$", r"-v\1", base)
        raise CLIError(
            f"OGBench dataset {base}.npz not found in {DEFAULT_OGBENCH_DIR} (vgf-prob never downloads); place the "
            f"official file there, or make one with `vgf-prob data generate --env {env_id}` and pass its .npz path"
        )
    dataset, _ = load_ogbench(name, task_id=task_id, device=device)
    single = dataset.metadata["env_name"]
    return dataset, env or single, single


def _d4rl_name_from_file(path: Path) -> str | None:
    """``hopper_medium-v2.hdf5`` / ``hopper-medium-v2.hdf5`` -> ``hopper-medium-v2`` when it is a known name."""
    from vgf_prob.rl.evaluate import resolve_env_name

    candidate = path.stem.replace("_", "-")
    try:
        resolve_env_name(candidate)
    except ValueError:
        return None
    return candidate


def _resolved_config(args: argparse.Namespace):
    """The config a ``train`` command line would run with, from names alone (no data is read); ``--preset``
    without ``--dataset`` shows that preset as a full-size run would use it (not the quick start's sizes)."""
    if args.dataset is None and args.preset is None:
        return build_config(None, QUICKSTART.dataset, args.config, True, args.preset_source)
    name = args.preset if args.dataset is None else Path(args.dataset).stem
    return build_config(args.preset, name, args.config, False, args.preset_source)


def build_config(
    preset_name: str | None,
    dataset_name: str,
    overrides: Sequence[str],
    quickstart: bool = False,
    preset_source: str = "offline",
):
    """The run's `VGFConfig`: ``--preset`` (or the dataset's preset when one matches) from the authors'
    ``preset_source`` script ("offline" or "offline-to-online"), then overrides."""
    from vgf_prob.rl.config import PRESET_SOURCES, VGFConfig, preset

    known = PRESET_SOURCES[preset_source]
    values = dict(QUICKSTART.overrides) if quickstart else {}
    values.update(parse_overrides(overrides))
    try:
        if preset_name is not None:
            if not any(preset_name == k or preset_name.startswith(k + "-") for k in known):
                raise CLIError(
                    f"unknown preset {preset_name!r} ({preset_source}); known presets: {', '.join(sorted(known))}"
                )
            return preset(preset_name, preset_source, **values)
        try:
            return preset(dataset_name, preset_source, **values)
        except ValueError as err:
            if "no VGF preset" not in str(err):
                raise
            return VGFConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CLIError(f"bad --config: {err}") from err


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{field: value}``, each value typed by its `VGFConfig` field's annotation.

    ``int``: a whole number; ``float``: a finite number; ``bool``: true/false; ``str``: the text (JSON
    quotes allowed); ``tuple[int, ...]``: ``256,256`` or ``[256, 256]``; ``X | None``: also null/none. A
    value that does not fit raises `CLIError` naming the field and the type it expects. A key that is not a
    field is passed on as text, for `VGFConfig.from_dict` to reject (or to read as a renamed field).
    """
    from vgf_prob.rl.config import VGFConfig

    hints = typing.get_type_hints(VGFConfig)
    fields = {f.name for f in dataclasses.fields(VGFConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise CLIError(f"--config expects KEY=VALUE, got {item!r}")
        if key not in fields:
            out[key] = text
            continue
        try:
            out[key] = _typed_value(text, hints[key])
        except ValueError:
            raise CLIError(f"--config {key}: expected {_type_name(hints[key])}, got {text!r}") from None
    return out


def _typed_value(text: str, annotation: Any) -> Any:
    """``text`` as a value of type ``annotation`` (see `parse_overrides`); ValueError if it is not one."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("null", "none"):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed_value(text, option)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is typing.Literal:
        value = _typed_value(text, str)
        match = [a for a in args if str(a) == value]
        if not match:
            raise ValueError(text)
        return match[0]
    if origin is tuple:
        if not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"--config cannot parse fields of type {annotation}")
        parts = json.loads(text) if text.startswith("[") else text.split(",")
        if not isinstance(parts, list) or not parts:
            raise ValueError(text)
        return tuple(_typed_value(str(part).strip(), args[0]) for part in parts)
    if annotation is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    if annotation is int:
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(text)
        return int(text)
    if annotation is float:
        if text.lower() in ("true", "false") or not math.isfinite(value := float(text)):
            raise ValueError(text)
        return value
    if annotation is str:
        if text.startswith('"'):
            value = json.loads(text)
            if not isinstance(value, str):
                raise ValueError(text)
            return value
        return text
    raise TypeError(f"--config cannot parse fields of type {annotation}")


def _type_name(annotation: Any) -> str:
    """How `_typed_value` reads a type, for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join([_type_name(a) for a in args if a is not type(None)] + ["null"] * (type(None) in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        plural = {int: "whole numbers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"comma-separated {plural.get(args[0], str(args[0]))} (e.g. 256,256)"
    names = {bool: "true or false (bool)", int: "a whole number (int)", float: "a finite number (float)",
             str: "a string"}  # fmt: skip
    return names.get(annotation, str(annotation))


def _run_dir(out: Path | None, name: str, seed: int, resume: bool) -> Path:
    """``--out``; else a new ``runs/<name>-seed<seed>-<time>``, or with --resume the newest such run."""
    if out is not None:
        return out
    prefix = f"{name}-seed{seed}-"
    if resume:
        runs = sorted(p for p in Path("runs").glob(prefix + "*") if p.is_dir())
        if not runs:
            raise CLIError(f"--resume: no run directory runs/{prefix}* to resume (pass --out)")
        return runs[-1]
    return Path("runs") / (prefix + datetime.now().strftime("%Y%m%d-%H%M%S"))


# ============================================================================================== eval
def _eval(args: argparse.Namespace) -> None:
    from vgf_prob.rl.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from vgf_prob.rl.plots import plot_budget_sweep
    from vgf_prob.rl.trainer import TrainingSetupError, check_device, check_env

    try:
        check_device(args.device)
        path = resolve_checkpoint(args.checkpoint)
        payload = load_checkpoint(path)
    except (CheckpointError, TrainingSetupError) as err:
        raise CLIError(str(err)) from err
    run = payload.get("run", {})
    if args.threads is None and run.get("threads") is not None:  # the same default as the run's training
        _set_threads(run["threads"])
    env_name = args.env or run.get("env_name")
    if env_name is None:
        raise CLIError(f"{path} does not record an environment; pass --env")
    agent = restore_agent(payload, args.device)
    timing = run.get("dataset_metadata", {}).get("success_timing")  # OGBench: evaluate as the data was labelled
    env_kwargs = {} if timing is None else {"success_timing": timing}
    try:
        check_env(env_name, run["obs_dim"], run["action_dim"], env_kwargs)
    except TrainingSetupError as err:
        raise CLIError(str(err)) from err
    out = args.out or path.parent
    out.mkdir(parents=True, exist_ok=True)
    if args.budgets is None:
        from vgf_prob.rl.trainer import evaluate_policies, format_scores

        budgets = tuple(sorted({0, agent.config.acting_budget}))
        rows = evaluate_policies(agent, env_name, budgets, args.episodes, args.seed, payload["step"], env_kwargs)
        format_scores(rows, f"{env_name}: {path} (step {payload['step']})", print_table=True)
        target = out / f"eval-step{payload['step']}.json"
        target.write_text(json.dumps({"checkpoint": str(path), "step": payload["step"], "rows": rows}, indent=2))
        print(f"wrote {target}")
        return
    rows, bc = budget_sweep_rows(agent, env_name, args.budgets, args.budget_type, args.max_flow_steps,
                                 args.episodes, args.seed, env_kwargs, progress=not args.no_progress)  # fmt: skip
    from vgf_prob.rl.evaluate import format_table

    print(f"{env_name}: test-time {args.budget_type} budget sweep (BC {bc['score']:.1f})")  # not a title that wraps
    format_table([{"L_test" if args.budget_type == "steps" else args.budget_type: r["budget"], "score": r["score"],
                   "std": r["std"], "mean_return": r["mean_return"]} for r in rows])  # fmt: skip
    stem = out / f"budget_sweep-{args.budget_type}-step{payload['step']}"
    report = {"checkpoint": str(path), "step": payload["step"], "env_name": env_name, "budget_type": args.budget_type,
              "episodes": args.episodes, "seed": args.seed, "bc": bc, "rows": rows}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    xlabel = "L_test (flow steps)" if args.budget_type == "steps" else f"{args.budget_type} budget"
    plot_budget_sweep(rows, stem.with_suffix(".png"), reference_lines={"BC reference": bc},
                      title=f"{env_name}: checkpoint after {payload['step']} training steps, "
                            f"{args.episodes} episodes per point", xlabel=xlabel)  # fmt: skip
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


def restore_agent(payload: dict[str, Any], device: str = "cpu") -> Any:
    """A `VGFAgent` rebuilt from a checkpoint payload (config, dimensions, weights and optimisers)."""
    from vgf_prob.rl.agent import VGFAgent
    from vgf_prob.rl.config import VGFConfig

    run = payload.get("run", {})
    if "obs_dim" not in run or "action_dim" not in run:
        raise CLIError("the checkpoint does not record obs_dim/action_dim (not written by vgf_prob.rl.trainer)")
    agent = VGFAgent(run["obs_dim"], run["action_dim"], VGFConfig.from_dict(payload["config"]), device=device)
    agent.load_training_state(payload["agent"])
    return agent


def make_budget(value: float, budget_type: str, max_flow_steps: int) -> Any:
    """An ``agent.act`` budget: an int L_test, or a displacement / Sinkhorn radius capped at ``max_flow_steps``."""
    from vgf_prob.budget import DisplacementBudget, SinkhornBudget, StepBudget

    if budget_type == "steps":
        if value < 0 or not float(value).is_integer():
            raise CLIError(f"--budget-type steps needs whole numbers >= 0, got {value}")
        return int(value)
    kind = DisplacementBudget if budget_type == "displacement" else SinkhornBudget
    try:
        return kind(value) & StepBudget(max_flow_steps)
    except ValueError as err:
        raise CLIError(str(err)) from err


def budget_sweep_rows(
    agent: Any, env_name: str, budgets: Sequence[float], budget_type: str, max_flow_steps: int,
    episodes: int, seed: int, env_kwargs: dict[str, Any] | None = None, progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Rows of `vgf_prob.rl.evaluate.budget_sweep` (budgets as numbers) and the BC reference's score.

    ``env_kwargs`` go to the environments; every policy runs the same seeded episodes.
    """
    import torch

    from vgf_prob.rl.evaluate import budget_sweep, evaluate

    objects = [make_budget(b, budget_type, max_flow_steps) for b in budgets]
    generator = torch.Generator(device=agent.device).manual_seed(seed)
    rows = budget_sweep(lambda b: (lambda obs: agent.act(obs, budget=b, generator=generator)),
                        env_name, objects, num_episodes=episodes, seed=seed, progress=progress, device=agent.device,
                        env_kwargs=env_kwargs)  # fmt: skip
    for row, value in zip(rows, budgets, strict=True):
        row["budget"] = int(value) if budget_type == "steps" else float(value)
    bc_act = lambda obs: agent.bc_action(obs, generator=generator)  # noqa: E731
    bc = evaluate(bc_act, env_name, episodes, seed, device=agent.device, progress=progress,
                  env_kwargs=env_kwargs, label="BC reference")
    return rows, {"score": bc.score, "std": bc.score_std, "mean_return": bc.mean_return,
                  "return_std": bc.std_return}


# ============================================================================================== sweep
def _sweep(args: argparse.Namespace) -> None:
    from vgf_prob.rl.recipes import RecipeError
    from vgf_prob.rl.sweep import run_from_args

    try:
        run_from_args(args)
    except RecipeError as err:
        raise CLIError(str(err)) from err


# ============================================================================================== data
def _generate(args: argparse.Namespace) -> None:
    from vgf_prob.rl.data import ensure_ogbench_dataset, generate_ogbench_dataset

    try:
        if args.out is None:
            path = ensure_ogbench_dataset(args.env, args.episodes, args.length, num_val_episodes=args.val_episodes,
                                          seed=args.seed, num_workers=args.workers)  # fmt: skip
        else:
            path = generate_ogbench_dataset(args.env, args.episodes, args.length, args.val_episodes, args.seed,
                                            args.out, num_workers=args.workers)  # fmt: skip
    except ValueError as err:
        raise CLIError(str(err)) from err
    print(f"{path}\n(train with: vgf-prob train --dataset {path} --task-id 1)")


def _inspect(args: argparse.Namespace) -> None:
    from vgf_prob.rl.evaluate import format_table

    dataset, env_name, name = load_dataset(args.dataset, args.env, args.task_id)
    summary = dataset.summary()
    metadata = summary.pop("metadata")
    rows = [{"field": k, "value": ", ".join(map(str, v)) if isinstance(v, list) else v} for k, v in summary.items()]
    rows += [{"field": f"metadata.{k}", "value": str(v)} for k, v in metadata.items()]
    rows.append({"field": "evaluation env", "value": env_name or "-"})
    print(name)
    format_table(rows)


# ============================================================================================== llm
def _llm(argv: list[str]) -> int:
    """``vgf-prob llm ...``: parse with the demo's own arguments and run it."""
    from vgf_prob.llm import demo

    parser = argparse.ArgumentParser(prog="vgf-prob llm", description=(demo.__doc__ or "").strip().split("\n")[0])
    demo.add_arguments(parser)
    result = demo.main(parser.parse_args(argv))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
