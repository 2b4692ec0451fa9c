"""The training loop: offline VGF training and offline-to-online fine-tuning, CleanRL style.

`train` and `finetune` share one loop (`_Loop.run`) that reads top to bottom::

    for step in start+1 .. spec.steps:
        (fine-tuning only) one environment step with agent.explore (best-of-N), appended to the buffer
        batch = dataset.sample(batch_size, data_generator); info = agent.update(batch, generator=agent_generator)
        every log_every:        window means -> floats -> the log sinks; the divergence guard reads them
        every eval_every:       `vgf_prob.rl.evaluate.compare_policies` in the real env -> the log sinks
        every checkpoint_every: atomic checkpoint (agent + optimisers, RNG streams, log positions, spec)
        SIGTERM / SIGINT seen:  checkpoint at this step, then `Preempted` (exit status 128 + signal)

The loop calls collaborators and holds none of their logic: the logs and sinks (`vgf_prob.rl.run.logs`), the
evaluator (`compare_policies`), the checkpointer (`vgf_prob.rl.checkpoint`), the run-directory checks and the
signal flag (`vgf_prob.rl.run.run_dir`) and the environment side of fine-tuning (`vgf_prob.rl.run.online`).

Exact resume on CPU: every random draw of the loop comes from two seeded ``torch.Generator`` objects (batch
sampling, agent noise) and the global RNGs, all checkpointed; evaluation draws from its own generator seeded
by ``(seed, step)`` and restores every global RNG afterwards; the metric window and the byte length of each
CSV log are checkpointed too, so a resumed run truncates rows written after its checkpoint and its logs
equal an uninterrupted run's. That holds for a checkpoint written at any step, so a run stopped by a signal
also resumes exactly (offline; a fine-tuning run cuts its episode where it stopped).

Divergence guard: at every log step, the window means already read for the log, then the last step's
gradients and the parameters (one host read of one flag) must be finite, and so must every tensor of a
checkpoint before it is written; otherwise `TrainingDiverged` names the step, the quantity and the last good
checkpoint, and no checkpoint with a non-finite tensor is ever written. A divergence is thus seen up to
``log_every - 1`` steps after it happens; a checkpoint taken inside that window is written only if all of
its tensors are still finite. ``spec.allow_nonfinite`` turns the guard off (and evaluation failures into
warnings).
"""

from __future__ import annotations

import json
import random
import signal
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgf_prob.rl.checkpoint import LATEST, RunLock, capture_rng_state, load_latest, restore_rng_state, save_checkpoint
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.evaluate import MATCHED_PREFIX, ScoreRow, compare_policies, format_scores
from vgf_prob.rl.offline_dataset import OfflineDataset
from vgf_prob.rl.run.logs import CSVSink, MetricWindow, check_sinks, make_sinks, read_eval_rows
from vgf_prob.rl.run.online import Online, load_initial_agent, online_reward_transform
from vgf_prob.rl.run.run_dir import (
    TRAIN_LOG,
    StopSignals,
    check_device,
    check_env,
    check_resumable,
    check_run_dir,
    default_env_kwargs,
    fingerprint,
    jsonable,
    set_aside_stale_logs,
)
from vgf_prob.rl.run.spec import TrainingSetupError, TrainSpec
from vgf_prob.validation import host_reads

PROGRESS_KEYS = ("critic_loss", "bc_loss", "q_mean")


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient, parameter or evaluation stopped the run; the message says where."""


class Preempted(Exception):
    """The run stopped on SIGTERM / SIGINT after writing a checkpoint at ``step``; ``exit_status`` is 128 + signal."""

    def __init__(self, signum: int, step: int, out_dir: Path) -> None:
        self.signum, self.step, self.exit_status = signum, step, 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {out_dir / LATEST}; continue with: "
            f"vgf-prob train --resume --out {out_dir}"
        )


@dataclass
class TrainResult:
    """What a run produced: the agent, the final evaluation's `ScoreRow` objects (``table``: them rendered),
    the files, and the wall time split into ``training``, ``evaluation``, ``checkpoints`` and ``online``."""

    agent: Any
    out_dir: Path
    step: int
    final_scores: list[ScoreRow]
    table: str
    train_log: Path
    eval_log: Path
    checkpoint: Path
    learning_curve: Path | None
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)


def train(config: VGFConfig, dataset: OfflineDataset, spec: TrainSpec) -> TrainResult:
    """Train a `VGFAgent` offline on ``dataset`` as ``spec`` says (``spec.out``, ``spec.steps``, ... ; its
    ``dataset``, ``preset`` and ``overrides`` are what `vgf_prob.rl.run.experiment.run_training` reads, not this).

    ``spec.env`` is the environment to evaluate in (None: no evaluation). ``spec.resume`` continues
    ``spec.out``'s latest checkpoint (same config, dataset, seed and environment required; ``steps`` may grow);
    otherwise a directory that already holds a checkpoint is refused.
    """
    return _run(config, dataset, spec, None)


def finetune(
    config: VGFConfig,
    dataset: OfflineDataset,
    spec: TrainSpec,
    init_checkpoint: str | Path | None = None,
    reward_scale: float | None = None,
    reward_shift: float | None = None,
) -> TrainResult:
    """Offline-to-online fine-tuning in ``spec.env``: each step explores one environment step, appends it to
    ``dataset`` (in place) and takes one update.

    ``init_checkpoint`` is an offline run's checkpoint (file or run directory) to start from (its config must
    equal ``config``). Online rewards become ``reward * reward_scale + reward_shift`` to match the dataset's
    processing; None infers them from ``dataset.metadata['reward_processing']`` (antmaze: shift -1; D4RL
    locomotion needs an explicit ``reward_scale``).
    """
    if spec.env is None:
        raise TrainingSetupError("fine-tuning needs an environment (spec.env)")
    scale, shift = online_reward_transform(dataset, reward_scale, reward_shift)
    return _run(config, dataset, spec, Online(spec.env, scale, shift, init_checkpoint))


def _run(config: VGFConfig, dataset: OfflineDataset, spec: TrainSpec, online: Online | None) -> TrainResult:
    spec = spec.resolved()
    if spec.out is None:
        raise TrainingSetupError("a run needs its directory: spec.out (--out)")
    out = Path(spec.out)
    device = check_device(spec.device)
    check_run_dir(out, spec.resume)
    check_sinks(spec.log)
    env_kwargs = default_env_kwargs(dataset)
    if spec.env is not None:
        check_env(spec.env, dataset.obs_dim, dataset.action_dim, env_kwargs)
    with RunLock(out), StopSignals() as stop:
        try:
            loop = _Loop(config, dataset, replace(spec, device=str(device)), out, env_kwargs, online, stop)
        except BaseException:
            if online is not None:
                online.close()
            raise
        try:
            return loop.run()
        finally:
            loop.close()


class _Loop:
    """One run's state between steps: agent, data, generators, logs, phase timers."""

    def __init__(self, config: VGFConfig, dataset: OfflineDataset, spec: TrainSpec, out: Path,
                 env_kwargs: dict[str, Any], online: Online | None, stop: StopSignals) -> None:  # fmt: skip
        from vgf_prob.rl.agent import VGFAgent

        check_run_dir(out, spec.resume)  # again under the lock: another process may have written in between
        if not spec.resume:
            set_aside_stale_logs(out)
        self.config, self.spec, self.out, self.env_kwargs, self.online, self.stop = (
            config, spec, out, env_kwargs, online, stop)  # fmt: skip
        self.started = time.perf_counter()
        self.phase = {"training": 0.0, "evaluation": 0.0, "checkpoints": 0.0, "online": 0.0}
        _seed_everything(spec.seed)
        self.dataset = dataset.to(spec.device)
        self.base_size = len(self.dataset)
        self.generators = {"data": torch.Generator(device=self.dataset.device).manual_seed(spec.seed),
                           "agent": torch.Generator(device=spec.device).manual_seed(spec.seed + 1)}  # fmt: skip
        self.agent = VGFAgent(dataset.obs_dim, dataset.action_dim, config, device=spec.device)
        self.run_info = {
            "env_name": spec.env, "obs_dim": dataset.obs_dim, "action_dim": dataset.action_dim, "seed": spec.seed,
            "mode": "offline" if online is None else "finetune", "dataset": fingerprint(self.dataset),
            "dataset_metadata": jsonable(dataset.metadata), "threads": torch.get_num_threads(),
        }  # fmt: skip
        self.window, self.csv = MetricWindow(), CSVSink(out)
        self.checkpoint_path, self._saved_step, self.last_scores = None, 0, []
        self.start = self._restore()
        if online is not None:
            online.start(env_kwargs, spec.seed)
        self.sinks = [self.csv, *make_sinks(spec.log, out, self.start, config.to_dict())]  # last: `close` ends them

    def _restore(self) -> int:
        """Resume from the checkpoint (returns its step), or load fine-tuning's initial agent (returns 0)."""
        if not self.spec.resume:
            if self.online is not None and self.online.init_checkpoint is not None:
                load_initial_agent(self.agent, self.online.init_checkpoint, self.config)
            return 0
        payload = load_latest(self.out)  # on the CPU: RNG states must stay there; weights are copied over
        check_resumable(payload, self.config, self.run_info, self.out)
        if payload["step"] >= self.spec.steps:
            raise TrainingSetupError(
                f"{self.out} is already at step {payload['step']} >= steps={self.spec.steps}; raise --steps"
            )
        self.agent.load_training_state(payload["agent"])
        if self.online is not None:
            self.dataset.append(payload["online"]["appended"])
            self.online.load_state_dict(payload["online"])
        self.window.load_state_dict(payload["logs"]["window"], torch.device(self.spec.device))
        self.csv.truncate(payload["logs"])
        restore_rng_state(payload["rng"], self.generators)
        self.checkpoint_path, self._saved_step = self.out / LATEST, payload["step"]
        return payload["step"]

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        spec = self.spec
        self.bar = tqdm(total=spec.steps, initial=self.start, desc="train" if self.online is None else "finetune",
                        unit="step", disable=not spec.progress, dynamic_ncols=True)  # fmt: skip
        self.tick = time.perf_counter()
        for step in range(self.start + 1, spec.steps + 1):
            checkpoint_now = step % spec.checkpoint_every == 0 or step == spec.steps
            self._train_step(step, cut_episode=checkpoint_now)
            if step % spec.log_every == 0 or step == spec.steps:
                self._log(step)
            if spec.env is not None and (step % (spec.eval_every or spec.steps) == 0 or step == spec.steps):
                self._evaluate(step)
            if checkpoint_now:
                self._checkpoint(step)
            if self.stop.signum is not None:
                self._preempt(step, saved=checkpoint_now)
        self.bar.close()
        return self._summary()

    def _train_step(self, step: int, cut_episode: bool) -> None:
        if self.online is not None:  # one environment step with best-of-N exploration, appended to the buffer
            t0 = time.perf_counter()
            self.dataset.append(self.online.step(self.agent, self.generators["agent"], cut_episode=cut_episode))
            self.phase["online"] += time.perf_counter() - t0
        batch = self.dataset.sample(self.config.batch_size, self.generators["data"])
        with host_reads(False):  # validated data: the step reads nothing back to the host
            info = self.agent.update(batch, generator=self.generators["agent"])
        self.window.add(info)
        self.bar.update(1)

    def _log(self, step: int) -> None:
        now = time.perf_counter()
        row = {**self.window.means(), "steps_per_second": (step - self.window.since) / (now - self.tick)}
        losses, since = dict(row), self.window.since
        if self.online is not None:
            row.update(self.online.pop_stats())
        self.window.reset(step)
        for sink in self.sinks:  # a diverged row is logged too: it shows what went wrong
            sink.log_train(step, row)
        if not self.spec.allow_nonfinite:
            self._guard(step, losses, since)
        self.bar.set_postfix({k: f"{row[k]:.3g}" for k in PROGRESS_KEYS if k in row})
        self.tick = now

    def _guard(self, step: int, row: dict[str, float], since: int) -> None:
        """`TrainingDiverged` when a logged mean, the last gradients or the parameters are not finite."""
        bad = next((k for k, v in row.items() if not np.isfinite(v)), None)
        if bad is not None:
            self._diverged(step, f"{bad} (mean over steps {since + 1}-{step})")
        named = list(self.agent.named_parameters())
        finite = torch.stack([torch.isfinite(t).all() for _, p in named for t in (p, p.grad) if t is not None])
        if not bool(finite.all()):  # the one host read; then find the culprit (we are stopping anyway)
            for name, p in named:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    self._diverged(step, f"gradient of {name}")
                if not torch.isfinite(p).all():
                    self._diverged(step, f"parameter {name}")

    def _diverged(self, step: int, what: str) -> None:
        good = f"{self.checkpoint_path} (step {self._saved_step})" if self.checkpoint_path else "none yet"
        raise TrainingDiverged(
            f"training diverged at step {step}: non-finite {what}; last good checkpoint: {good} (lower lr, or "
            "--allow-nonfinite to keep going)"
        )

    def _evaluate(self, step: int) -> None:
        t0 = time.perf_counter()
        spec = self.spec
        try:
            rows = compare_policies(self.agent, spec.env, spec.budgets, spec.eval_episodes, spec.seed, step,
                                    env_kwargs=self.env_kwargs, progress=spec.progress)  # fmt: skip
        except FloatingPointError as err:
            if not spec.allow_nonfinite:
                self._diverged(step, f"values at evaluation ({err})")
            warnings.warn(f"evaluation at step {step} skipped: {err}", stacklevel=2)
            rows = []
        for sink in self.sinks:
            sink.log_eval(step, rows)
        self.last_scores = rows
        if step != spec.steps and rows:  # the final scores are the result's table
            self.bar.write(f"step {step}: " + ", ".join(f"{r.label} {r.score:.1f}" for r in rows))
        spent = time.perf_counter() - t0
        self.phase["evaluation"] += spent
        self.tick += spent  # steps/s (log and bar) count training time only
        self.bar.unpause()

    def _checkpoint(self, step: int) -> None:
        t0 = time.perf_counter()
        agent_state = self.agent.training_state()
        bad = None if self.spec.allow_nonfinite else _first_nonfinite(agent_state["agent"], "")
        if bad is not None:
            self._diverged(step, f"{bad} in the checkpoint (not written)")
        payload = {
            "step": step, "config": self.config.to_dict(), "agent": agent_state,
            "rng": capture_rng_state(self.generators), "run": self.run_info, "spec": self.spec.to_dict(),
            "logs": {**self.csv.positions(), "window": self.window.state_dict()},
        }  # fmt: skip
        if self.online is not None:
            payload["online"] = self.online.state_dict(self.dataset, self.base_size)
        self.checkpoint_path, self._saved_step = save_checkpoint(self.out, payload), step
        self.phase["checkpoints"] += time.perf_counter() - t0

    def _preempt(self, step: int, saved: bool) -> None:
        """Checkpoint at ``step`` (unless just done) and raise `Preempted`."""
        if not saved:
            if self.online is not None:
                self.online.cut()
            self._checkpoint(step)
        self.bar.close()
        raise Preempted(self.stop.signum, step, self.out)

    def _summary(self) -> TrainResult:
        spec, phase = self.spec, self.phase
        phase["training"] = time.perf_counter() - self.started - phase["evaluation"] - phase["checkpoints"] - phase["online"]
        rows = self.last_scores
        table = format_scores(rows, f"{spec.env} after {spec.steps} steps") if rows else ""
        curve = _plot_learning_curve(self.out, f"{spec.env or self.out.name}: {spec.steps} training steps, seed {spec.seed}")
        seconds = time.perf_counter() - self.started
        summary = {"step": spec.steps, "final_scores": [r.to_dict() for r in rows], "seconds": seconds,
                   "phase_seconds": phase, "config": self.config.to_dict(), "run": self.run_info}  # fmt: skip
        (self.out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
        return TrainResult(self.agent, self.out, spec.steps, rows, table, self.csv.train.path, self.csv.eval.path,
                           self.checkpoint_path, curve, seconds, phase)  # fmt: skip

    def close(self) -> None:
        for sink in getattr(self, "sinks", []):
            sink.close()
        if self.online is not None:
            self.online.close()


def _first_nonfinite(state: Any, path: str) -> str | None:
    """The dotted name of the first floating tensor in ``state`` (nested dicts / lists) with a NaN or inf."""
    if isinstance(state, torch.Tensor):
        return path if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list | tuple) else ()
    return next((bad for k, v in items if (bad := _first_nonfinite(v, f"{path}.{k}".lstrip("."))) is not None), None)


def _plot_learning_curve(out_dir: Path, title: str) -> Path | None:
    """``learning_curve.png``: the main losses and, once evaluated twice or more, each policy's score."""
    from vgf_prob.rl.plots import SCORE_LABELS, plot_learning_curve

    # the compute-matched best-of-M rows stay out of the curve (they are in eval.csv and the tables): five more
    # lines in the quick start's panel would hide the rest
    evaluations = [(s, r) for s, r in read_eval_rows(out_dir / "eval.csv") if not r.policy.startswith(MATCHED_PREFIX)]
    rows: list[dict[str, Any]] = []
    scores: list[str] = []
    if len({step for step, _ in evaluations}) > 1:  # one point per panel is no curve
        rows = [{"step": step, r.label: r.score} for step, r in evaluations]
        scores = list(dict.fromkeys(r.label for _, r in evaluations))
    score_label = SCORE_LABELS.get(evaluations[0][1].score_kind, "score") if evaluations else "score"
    train_rows = _read_rows(out_dir / TRAIN_LOG)
    rows.extend(train_rows)
    metrics = [k for k in PROGRESS_KEYS if train_rows and k in train_rows[0]]
    if not rows or not (metrics or scores):
        return None
    return plot_learning_curve(rows, out_dir / "learning_curve.png", metrics=metrics, title=title, scores=scores,
                               score_label=score_label)  # fmt: skip


def _read_rows(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
