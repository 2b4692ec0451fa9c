"""`TrainSpec`: one typed description of a training run, shared by the CLI, the sweep, the recipes and Python.

A field left at its default (None; False for ``resume``; empty ``overrides``) means "not given": `resolved`
fills in the documented default, and ``--resume`` fills it from the checkpoint's spec (`merge_for_resume`).
This module imports neither torch nor the simulators, so ``vgf-prob --help`` stays instant.

Adding a run setting touches two places: a field here (with its default and a line below) and its
``vgf-prob train`` option in `vgf_prob.cli.build_parser` (same name; `to_argv` and the CLI map it by name).
The code that uses the setting reads it from the spec.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

LOG_SINKS = ("csv", "tensorboard", "wandb", "mlflow")
RESUME_MAY_CHANGE = ("out", "resume", "steps", "eval_every", "checkpoint_every", "threads", "progress", "log")
"""Fields a resume may change; any other given field must equal the checkpoint's. (The device may not
change: the random generators' states are device-specific, so the run could not continue as it was.)"""
FLAGS = {"overrides": "--config", "progress": "--no-progress"}  # option names that are not --<field-name>


class TrainingSetupError(ValueError):
    """A run that cannot start as asked (settings, data, device, environment, run directory); nothing was written."""


@dataclass(frozen=True)
class TrainSpec:
    """A training run: data, agent settings, length, evaluation, checkpoints and logging.

    - ``dataset``: OGBench name, .npz / .hdf5 file, Minari id, or a generated dataset name (``reacher-mixed-v0``);
    - ``env``: environment to evaluate in (default: inferred from the dataset; none known: no evaluation);
    - ``task_id``: OGBench single task to relabel the data for; ``preset`` / ``preset_source``: the authors'
      settings to start from (default: the dataset's preset, "offline" script); ``overrides``: VGFConfig fields;
    - ``steps`` (default 1,000,000), ``seed`` (0), ``device`` ("cpu"), ``threads`` (torch's choice);
    - ``eval_every`` (default: only at the end), ``eval_episodes`` (10), ``budgets`` (L_test values, (0, 1, 2, 3));
    - ``log_every`` (steps // 100), ``checkpoint_every`` (steps // 10), ``log`` (sinks, ("csv",)), ``progress`` (True);
    - ``out`` (run directory), ``resume`` (continue ``out``); ``allow_nonfinite``: keep training through NaN/inf
      losses, gradients and parameters, and save such checkpoints (default False: stop with one line).
    """

    dataset: str | None = None
    env: str | None = None
    task_id: int | None = None
    preset: str | None = None
    preset_source: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    steps: int | None = None
    out: str | None = None
    resume: bool = False
    device: str | None = None
    seed: int | None = None
    eval_every: int | None = None
    eval_episodes: int | None = None
    budgets: tuple[int, ...] | None = None
    log_every: int | None = None
    checkpoint_every: int | None = None
    threads: int | None = None
    progress: bool | None = None
    log: tuple[str, ...] | None = None
    allow_nonfinite: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", {k: tuple(v) if isinstance(v, list) else v for k, v in self.overrides.items()})
        for name in ("budgets", "log"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.out is not None:
            object.__setattr__(self, "out", str(self.out))

    def given(self) -> dict[str, Any]:
        """The fields set to something other than "not given"."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not _unset(f, getattr(self, f.name))}

    def resolved(self) -> TrainSpec:
        """This spec with defaults filled in and every value checked (`TrainingSetupError` naming the field).

        ``eval_every`` stays None (evaluate at the end only), ``threads`` None (torch's choice) and ``env``
        None (no evaluation) when not given.
        """
        steps = _positive("steps", 1_000_000 if self.steps is None else self.steps)
        spec = dataclasses.replace(
            self, steps=steps, device="cpu" if self.device is None else self.device,
            preset_source="offline" if self.preset_source is None else self.preset_source,
            seed=0 if self.seed is None else self.seed,
            eval_episodes=10 if self.eval_episodes is None else self.eval_episodes,
            budgets=(0, 1, 2, 3) if self.budgets is None else self.budgets,
            log_every=max(1, steps // 100) if self.log_every is None else self.log_every,
            checkpoint_every=max(1, steps // 10) if self.checkpoint_every is None else self.checkpoint_every,
            progress=True if self.progress is None else self.progress, log=("csv",) if self.log is None else self.log,
            allow_nonfinite=bool(self.allow_nonfinite),
        )  # fmt: skip
        spec._check()
        return spec

    def _check(self) -> None:
        for name in ("eval_episodes", "log_every", "checkpoint_every", "eval_every", "threads", "task_id"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TrainingSetupError(f"seed must be an int >= 0, got {self.seed!r}")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in self.budgets):
            raise TrainingSetupError(f"evaluation budgets (L_test) must be ints >= 0 flow steps, got {list(self.budgets)}")
        unknown = [s for s in self.log if s not in LOG_SINKS]
        if unknown or "csv" not in self.log:
            raise TrainingSetupError(f"log sinks must include csv (resume and reports read it) and be among "
                                     f"{', '.join(LOG_SINKS)}; got {','.join(self.log)}")  # fmt: skip
        if self.preset_source not in ("offline", "offline-to-online"):
            raise TrainingSetupError(f"preset_source must be 'offline' or 'offline-to-online', got {self.preset_source!r}")

    def to_argv(self) -> list[str]:
        """The ``vgf-prob train`` arguments of this spec (given fields only), e.g. for a subprocess."""
        argv = ["train"]
        for name, value in self.given().items():
            option = flag(name)
            if name == "overrides":
                argv += [option, *(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in value.items())]
            elif isinstance(value, bool):
                argv += [option] if value == (name != "progress") else []
            elif name == "log":
                argv += [option, ",".join(value)]
            elif isinstance(value, tuple):
                argv += [option, *map(str, value)]
            else:
                argv += [option, str(value)]
        return argv

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists): what a checkpoint stores; `from_dict` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingSetupError(f"unknown run setting(s) {unknown}")
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in values.get("overrides", {}).items()}
        return cls(**{**values, "overrides": overrides})


def merge_for_resume(saved: TrainSpec, given: TrainSpec, saved_config: Mapping[str, Any]) -> TrainSpec:
    """The spec a resume runs with: the checkpoint's ``saved`` spec, with the ``given`` fields that
    `RESUME_MAY_CHANGE` lists. Any other given field (``--config`` values: against ``saved_config``) must equal
    the checkpoint's; otherwise `TrainingSetupError` names each option that differs."""
    values, problems = {}, []
    for name, value in given.given().items():
        if name == "overrides":
            differ = {k: v for k, v in value.items() if _plain(v) != _plain(saved_config.get(k, "<absent>"))}
            problems += [f"--config {k}: checkpoint {_plain(saved_config.get(k, '<absent>'))!r}, given {_plain(v)!r}"
                         for k, v in differ.items()]  # fmt: skip
        elif name in RESUME_MAY_CHANGE or value == getattr(saved, name):
            values[name] = value
        else:
            problems.append(f"{flag(name)}: checkpoint {getattr(saved, name)!r}, given {value!r}")
    if problems:
        raise TrainingSetupError(
            "--resume continues the run with the checkpoint's settings; these differ: " + "; ".join(problems)
            + f" (options that may change on resume: {', '.join(map(flag, RESUME_MAY_CHANGE[2:]))}; drop the others)"
        )
    return dataclasses.replace(saved, **values)


def flag(name: str) -> str:
    """The ``vgf-prob train`` option of a `TrainSpec` field."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _unset(f: dataclasses.Field, value: Any) -> bool:
    return value == {} if f.name == "overrides" else value is None or (f.name == "resume" and value is False)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainingSetupError(f"{name} must be a positive int, got {value!r}")
    return value


# ============================================================================================ --config values
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{field: value}``, each value typed by its `VGFConfig` field's annotation.

    ``int``: a whole number; ``float``: a finite number; ``bool``: true/false; ``str``: the text (JSON
    quotes allowed); ``tuple[int, ...]``: ``256,256`` or ``[256, 256]``; ``X | None``: also null/none. A
    value that does not fit raises `TrainingSetupError` naming the field and the type it expects. A key that
    is not a field is passed on as text, for `VGFConfig.from_dict` to reject (or to read as a renamed field).
    """
    from vgf_prob.rl.config import VGFConfig

    hints = typing.get_type_hints(VGFConfig)
    names = {f.name for f in fields(VGFConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise TrainingSetupError(f"--config expects KEY=VALUE, got {item!r}")
        if key not in names:
            out[key] = text
            continue
        try:
            out[key] = _typed_value(text, hints[key])
        except ValueError:
            raise TrainingSetupError(f"--config {key}: expected {_type_name(hints[key])}, got {text!r}") from None
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
        match = [a for a in args if str(a) == _typed_value(text, str)]
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
    return _scalar(text, annotation)


def _scalar(text: str, annotation: Any) -> Any:
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
