"""The ``vgf-prob`` command (also ``python -m vgf_prob``): it parses, builds a spec and makes one call.

    vgf-prob train                      # the quick start: generated Reacher data, small agent, comparison table
    vgf-prob train --dataset cube-single-play-singletask-task1-v0 --steps 1000000 --config batch_size=512
    vgf-prob train --dataset ~/d4rl/hopper_medium-v2.hdf5 --env hopper-medium-v2 --preset hopper
    vgf-prob train --resume --out runs/<run>    # continue a run with its own settings
    vgf-prob eval runs/<run> --budgets 0 1 2 3 [--budget-type displacement]
    vgf-prob data generate --env cube-single-v0 --episodes 1000 --length 1001
    vgf-prob data inspect <file or id>
    vgf-prob llm ...                    # the LLM demo (vgf_prob.llm.demo)

``train`` builds a `vgf_prob.rl.run.spec.TrainSpec` from the options of the same names and calls
`vgf_prob.rl.run.experiment.run_training`; ``eval`` calls `vgf_prob.rl.run.experiment.evaluate_checkpoint`;
``sweep`` calls `vgf_prob.rl.sweep.run_from_args`. Every expected failure (a bad option or ``--config``
value, a missing or malformed file, an unknown environment or one whose dimensions differ from the data's,
a device this machine lacks, a run directory in use or not a run's, a diverging run, any OSError) prints
one line ``vgf-prob: error: ...`` and exits with status 2, before training starts wherever it can be
checked then. SIGTERM / SIGINT during training write a checkpoint at the step reached, print one line
naming the resume command and exit with 143 / 130. Anything else is a bug and keeps its traceback.
Numbers are taken as given: 0 is 0 (an error where it makes no sense), never "use the default".

Heavy modules (torch, gymnasium, ogbench) are imported inside the commands, so ``--help`` and
``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from vgf_prob.rl.run.spec import LOG_SINKS, RESUME_MAY_CHANGE, TrainingSetupError, TrainSpec, flag, parse_overrides


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


def _sinks(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated log sinks."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in LOG_SINKS]
    if unknown or "csv" not in names:
        raise argparse.ArgumentTypeError(f"expected csv and any of {', '.join(LOG_SINKS[1:])}, comma-separated; got {text!r}")
    return names


_POSITIVE = _int_at_least(1)
_NONNEGATIVE = _int_at_least(0)


def _version() -> str:
    from vgf_prob import __version__

    return __version__


# ============================================================================================== parser
EVAL_DESCRIPTION = """Evaluate a checkpoint: BC, best-of-N, VGF and best-of-M matched to each VGF budget's cost,
or a sweep over --budgets.

--frontier RUN [RUN ...] (one run per seed): every test-time operator of each checkpoint on the same seeded
episodes, one state per act call: best-of-N at each --particles N and at the N that costs what each flow
costs; VGF, GradStep (value-gradient ascent, no kernel) and SMC (resampling by exp(Q / alpha) before each
step) at the agent's N and each L_test of --budgets. Writes frontier.json (rows per run in the evaluation's
row schema, and the aggregate over runs and tasks: rliable's interquartile mean with a 95 % stratified
bootstrap interval) and frontier.png (score against both cost axes) to --out (default: ./frontier).

Cost columns, per action, counted while the episodes ran: passes_per_action, critic-pass equivalents (a BC
Euler step of one particle = 1, a value evaluation = 1, a value-gradient evaluation = 2; best-of-N with a
K-step sampler costs N (K + 1), each flow step adds 2 N); ms_per_action and cpu_ms_per_action, wall and
process-CPU milliseconds inside the act calls; {reference_passes, value_evaluations,
value_gradient_evaluations, particles}_per_action, the rows of each kind."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``llm``'s own options are parsed by the demo)."""
    parser = _Parser(
        prog="vgf-prob", description="Value Gradient Flow: behaviour-regularised RL as budgeted optimal transport."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the vgf-prob version and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,sweep,data,llm}")
    _add_train_arguments(sub)

    ev = sub.add_parser("eval", help="evaluate a checkpoint; --budgets sweeps the test-time budget; --frontier",
                        description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ev.add_argument("checkpoint", nargs="+", metavar="RUN",
                    help="a checkpoint file or a run directory (its latest.pt); with --frontier, one per seed")  # fmt: skip
    ev.add_argument("--frontier", action="store_true",
                    help="score every test-time operator against its cost per action (see above)")  # fmt: skip
    ev.add_argument("--particles", type=_POSITIVE, nargs="+", default=[1, 5, 10, 20, 40, 80],
                    help="--frontier: best-of-N sizes N (default 1 5 10 20 40 80; the matched sizes are added)")  # fmt: skip
    ev.add_argument("--operators", nargs="+", default=["best-of-N", "VGF", "GradStep", "SMC"],
                    help="--frontier: operators (default best-of-N VGF GradStep SMC)")  # fmt: skip
    ev.add_argument("--env", help="environment (default: the one the run trained for)")
    ev.add_argument("--episodes", type=_POSITIVE, help="episodes per policy and budget (default 10; --frontier 50)")
    ev.add_argument("--budgets", type=_nonnegative_number, nargs="+",
                    help="test-time budgets to sweep (steps: L_test; displacement/sinkhorn: radius); --frontier: the "
                         "flows' L_test values (default 1 2 3 5 8)")  # fmt: skip
    ev.add_argument("--budget-type", choices=("steps", "displacement", "sinkhorn"), default="steps",
                    help="what --budgets measure: flow steps, or a displacement / Sinkhorn radius (default steps)")  # fmt: skip
    ev.add_argument("--max-flow-steps", type=_POSITIVE, default=20,
                    help="step cap for displacement/sinkhorn budgets (default 20)")  # fmt: skip
    ev.add_argument("--out", type=Path, help="where the JSON and PNG go (default: the checkpoint's folder)")
    ev.add_argument("--seed", type=_NONNEGATIVE, default=0, help="seed of the evaluation episodes (default 0)")
    ev.add_argument("--device", default="cpu", help="torch device to act on (default cpu)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--threads", type=_POSITIVE,
                    help="torch CPU threads (default: the number the run trained with; --frontier 1)")  # fmt: skip

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


def _add_train_arguments(sub: argparse._SubParsersAction) -> None:
    """The ``vgf-prob train`` options: each one's dest is a `TrainSpec` field of the same name (see `train_spec`)."""
    tr = sub.add_parser("train", help="train a VGF agent offline (no arguments: the quick start)",
                        description="Train a VGF agent. Without --dataset: the quick-start job (3000 steps of "
                                    "generated Reacher data, 1 thread, 50 episodes per evaluation).")  # fmt: skip
    tr.add_argument("--dataset", help="OGBench dataset name, a .npz/.hdf5 file (OGBench / D4RL), a Minari id, or a "
                                      "generated dataset (reacher-mixed-v0, ...)")  # fmt: skip
    tr.add_argument("--env", help="environment to evaluate in (default: inferred from the dataset)")
    tr.add_argument("--task-id", type=_POSITIVE,
                    help="OGBench single task to relabel the data for (default: the env's)")  # fmt: skip
    tr.add_argument("--preset", help="task preset of the authors' settings (default: inferred from the dataset)")
    tr.add_argument("--preset-source", choices=("offline", "offline-to-online"),
                    help="which of the authors' scripts the preset follows (default offline)")  # fmt: skip
    tr.add_argument("--print-config", action="store_true",
                    help="print the resolved VGFConfig (preset, then --config) as JSON and exit; loads no data")  # fmt: skip
    tr.add_argument("--config", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="VGFConfig overrides, typed by the field (e.g. lr=1e-4 critic_hidden_dims=256,256 "
                         "test_budget=null)")  # fmt: skip
    tr.add_argument("--steps", type=_POSITIVE, help="gradient steps (default 1000000)")
    tr.add_argument("--out", help="run directory, new or a vgf-prob run's (default runs/<dataset>-seed<seed>-<time>)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out (default: the newest) with the checkpoint's settings; of the "
                         f"other options only {', '.join(map(flag, RESUME_MAY_CHANGE[2:]))} may differ from the run's")  # fmt: skip
    tr.add_argument("--device", help="torch device to train on: cpu, cuda, cuda:1, ... (default cpu)")
    tr.add_argument("--seed", type=_NONNEGATIVE, help="seed of every random stream (default 0)")
    tr.add_argument("--eval-every", type=_POSITIVE, help="steps between evaluations (default: only at the end)")
    tr.add_argument("--eval-episodes", type=_POSITIVE, help="episodes per policy and evaluation (default 10)")
    tr.add_argument("--budgets", type=_NONNEGATIVE, nargs="+",
                    help="L_test values to evaluate (0 = best-of-N; default 0 1 2 3)")  # fmt: skip
    tr.add_argument("--log-every", type=_POSITIVE,
                    help="steps between log rows and divergence checks (default steps/100)")  # fmt: skip
    tr.add_argument("--checkpoint-every", type=_POSITIVE, help="steps between checkpoints (default steps/10)")
    tr.add_argument("--log", type=_sinks,
                    help="log sinks, comma-separated: csv (always) and tensorboard, wandb (offline), mlflow "
                         "(local SQLite store) (default csv)")  # fmt: skip
    tr.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    tr.add_argument("--threads", type=_POSITIVE, help="torch CPU threads (default: torch's choice)")
    tr.add_argument("--allow-nonfinite", action="store_true", default=None,
                    help="keep training through NaN/inf losses, gradients and parameters (default: stop with one "
                         "line at the log step that sees them, keeping the last finite checkpoint)")  # fmt: skip



def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vgf-prob`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["llm"]:
        return _llm(argv[1:])
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    command = {"train": _train, "eval": _eval, "sweep": _sweep}.get(args.command)
    try:
        if command is None:
            command = _generate if args.data_command == "generate" else _inspect
        command(args)
    except OSError as err:  # a file the user named, a full disk, a read-only or missing folder
        return _fail(_os_error_text(err))
    except Exception as err:
        from vgf_prob.rl.checkpoint import CheckpointError
        from vgf_prob.rl.recipes import RecipeError
        from vgf_prob.rl.run.trainer import Preempted, TrainingDiverged

        if isinstance(err, Preempted):
            print(f"vgf-prob: {err}", file=sys.stderr)
            return err.exit_status
        if isinstance(err, CLIError | TrainingSetupError | CheckpointError | RecipeError | TrainingDiverged):
            return _fail(str(err))
        raise
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
def train_spec(args: argparse.Namespace) -> TrainSpec:
    """The `TrainSpec` of a parsed ``vgf-prob train`` command line (the quick start's without ``--dataset``).

    Options map to the spec's fields by name; only those given are set, so ``--resume`` takes the rest from
    the checkpoint. A ``--dataset`` that is a file becomes an absolute path (a later resume finds it).
    """
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSpec)
             if getattr(args, f.name, None) not in (None, [])}  # fmt: skip
    given["overrides"] = parse_overrides(args.overrides)
    if args.dataset is not None and Path(args.dataset).expanduser().is_file():
        given["dataset"] = str(Path(args.dataset).expanduser().absolute())
    if args.resume or (args.dataset is None and args.print_config and args.preset is not None):
        return TrainSpec(**given)
    if args.dataset is None:
        from vgf_prob.rl.run.experiment import QUICKSTART

        if args.env is not None or args.task_id is not None:
            raise CLIError("--env/--task-id need --dataset (without it the quick start's Reacher job runs)")
        return dataclasses.replace(QUICKSTART, **{**given, "overrides": {**QUICKSTART.overrides, **given["overrides"]}})
    return TrainSpec(**given)


def _train(args: argparse.Namespace) -> None:
    from vgf_prob.rl.evaluate import format_scores
    from vgf_prob.rl.run.experiment import QUICKSTART_NOTE, resolved_config, run_training

    spec = train_spec(args)
    if args.print_config:
        print(json.dumps(resolved_config(spec).to_dict(), indent=2))
        return
    t0 = time.perf_counter()
    experiment = run_training(spec)
    result, spec = experiment.result, experiment.spec
    if result.final_scores:
        format_scores(result.final_scores, f"{spec.env}: {spec.steps} steps, seed {spec.seed}", print_table=True)
        if args.dataset is None and not args.resume:
            print(QUICKSTART_NOTE)
    timings = {"dataset": experiment.dataset_seconds, **result.phase_seconds}
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if v > 0)
    print(f"total {time.perf_counter() - t0:.0f} s ({phases})")
    print(f"logs {result.train_log}, {result.eval_log}; checkpoint {result.checkpoint}")
    if result.learning_curve is not None:
        print(f"learning curve {result.learning_curve}")


# ============================================================================================== eval
def _eval(args: argparse.Namespace) -> None:
    from vgf_prob.rl.run.experiment import evaluate_checkpoint

    if args.frontier:
        return _frontier(args)
    if len(args.checkpoint) > 1:
        raise CLIError("several runs need --frontier (plain eval takes one checkpoint)")
    episodes = 10 if args.episodes is None else args.episodes
    _, report = evaluate_checkpoint(args.checkpoint[0], args.env, episodes, args.budgets, args.budget_type,
                                    args.max_flow_steps, args.out, args.seed, args.device, args.threads,
                                    progress=not args.no_progress)  # fmt: skip
    figure = report.with_suffix(".png")
    print(f"wrote {report}" + (f" and {figure}" if figure.exists() and args.budgets is not None else ""))


def _frontier(args: argparse.Namespace) -> None:
    from vgf_prob.rl.run.experiment import evaluate_frontier

    if args.env is not None or args.budget_type != "steps":
        raise CLIError("--frontier scores each run in its own environment with step budgets (no --env/--budget-type)")
    out = evaluate_frontier(args.checkpoint, args.particles, args.budgets or [1, 2, 3, 5, 8], args.operators,
                            50 if args.episodes is None else args.episodes, args.seed, args.out or Path("frontier"),
                            args.device, args.threads, progress=not args.no_progress)  # fmt: skip
    print(f"wrote {out / 'frontier.json'} and {out / 'frontier.png'}")


# ============================================================================================== sweep
def _sweep(args: argparse.Namespace) -> None:
    from vgf_prob.rl.sweep import run_from_args

    run_from_args(args)


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
    from vgf_prob.rl.run.experiment import load_dataset

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
