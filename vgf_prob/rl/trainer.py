"""The training loop: offline VGF training and offline-to-online fine-tuning, CleanRL style.

`train` and `finetune` share one loop (`_run`) that reads top to bottom::

    for step in start+1 .. total_steps:
        (fine-tuning only) take one environment step with agent.explore (best-of-N), append it to the buffer
        batch = dataset.sample(batch_size, data_generator)
        info  = agent.update(batch, generator=agent_generator)      # dict of scalar tensors
        every log_every:        window means -> floats -> train.csv, progress bar, TensorBoard
        every eval_every:       BC / best-of-N (L_test = 0) / VGF (L_test > 0) in the real env -> eval.csv
        every checkpoint_every: atomic checkpoint (agent + optimisers, RNG streams, log positions, appends)

Exact resume on CPU: every random draw of the loop comes from two seeded ``torch.Generator`` objects
(batch sampling, agent noise) and the global RNGs, all checkpointed; evaluation draws from its own
generator seeded by ``(seed, step)`` and restores every global RNG afterwards, so evaluating never
changes training; the metric window and the byte length of each CSV log are checkpointed too, so a
resumed run truncates rows written after its checkpoint and its logs equal an uninterrupted run's.

One writer per run directory: the loop holds `vgf_prob.rl.checkpoint.RunLock` on ``out_dir`` from its
first file operation to the summary, so a second process writing the same directory stops with an error
naming the first one's PID. Before anything is written, everything that can fail early is checked: the
numeric arguments, the device, the environment (it must exist and match the dataset's obs/action
dimensions) and the run directory (see `check_run_dir`). A fresh run in a directory that holds logs but
no checkpoint (a run killed before its first checkpoint) moves those files aside into ``stale-<time>/``.
Log rows are appended with one ``write`` each and taken back on failure, so a crash or a full disk never
leaves half a row; a partial row found past the checkpoint on resume is dropped with a warning.

Fine-tuning and resume: an environment's internal state cannot be checkpointed in general, so an
episode in progress at a checkpoint step is cut there (stored as a time-limit truncation: mask 1) and
the next step starts a new episode seeded by the episode counter. The uninterrupted run does the same,
so a resumed fine-tuning run also equals the uninterrupted one.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vgf_prob.rl.checkpoint import (
    LATEST,
    LOCK_FILE,
    PREVIOUS,
    CheckpointError,
    RunLock,
    capture_rng_state,
    config_mismatch,
    load_checkpoint,
    load_latest,
    remove_orphaned_tmp_files,
    restore_rng_state,
    save_checkpoint,
)
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.offline_dataset import OfflineDataset

TRAIN_LOG = "train.csv"
EVAL_LOG = "eval.csv"
EVAL_COLUMNS = ("step", "policy", "L_test", "score", "score_std", "mean_return", "return_std", "episodes", "score_kind")
ONLINE_COLUMNS = ("online_episodes", "online_return", "online_success")
PROGRESS_KEYS = ("critic_loss", "bc_loss", "q_mean")
RUN_MARKERS = (LOCK_FILE, LATEST, PREVIOUS, TRAIN_LOG, EVAL_LOG)  # any of these: a vgf-prob run directory
STALE_PREFIX = "stale-"


class TrainingSetupError(ValueError):
    """A run that cannot start as asked (arguments, device, environment, run directory); nothing was written."""


@dataclass
class TrainResult:
    """What a `train` / `finetune` run produced.

    ``final_scores`` has one row per evaluated policy at the last step (``policy``, ``L_test``, ``score``,
    ``score_std``, ``mean_return``, ``return_std``, ``episodes``, ``score_kind``); ``table`` is them rendered
    as text. ``phase_seconds`` splits the wall time into ``training``, ``evaluation``, ``checkpoints``
    and ``online`` (environment steps while fine-tuning).
    """

    agent: Any
    out_dir: Path
    step: int
    final_scores: list[dict[str, Any]]
    table: str
    train_log: Path
    eval_log: Path
    checkpoint: Path
    learning_curve: Path | None
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)


# ============================================================================================ entry points
def train(
    config: VGFConfig,
    dataset: OfflineDataset,
    env_name: str | None,
    out_dir: str | Path,
    total_steps: int,
    eval_every: int | None = None,
    eval_episodes: int = 10,
    log_every: int = 1000,
    checkpoint_every: int = 10_000,
    resume: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    eval_budgets: Sequence[int] = (0, 1, 2, 3),
    env_kwargs: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train a `VGFAgent` offline on ``dataset`` for ``total_steps`` gradient steps, in ``out_dir``.

    ``env_name`` is the environment to evaluate in (None: no evaluation). Every ``eval_every`` steps
    (default: only at the end) the BC reference, best-of-N (L_test = 0 in ``eval_budgets``) and VGF at
    each L_test > 0 of ``eval_budgets`` run ``eval_episodes`` episodes. ``resume=True`` continues from
    ``out_dir``'s latest checkpoint (same config, dataset and seed required; ``total_steps`` may grow);
    ``resume=False`` refuses an ``out_dir`` that already holds a checkpoint. ``env_kwargs`` go to the
    environment (default for OGBench data: the dataset's ``success_timing``).
    """
    return _run(
        config, dataset, env_name, Path(out_dir), total_steps, eval_every, eval_episodes, log_every,
        checkpoint_every, resume, seed, device, progress, tuple(eval_budgets), env_kwargs,
        online=None,
    )  # fmt: skip


def finetune(
    config: VGFConfig,
    dataset: OfflineDataset,
    env_name: str,
    out_dir: str | Path,
    total_steps: int,
    init_checkpoint: str | Path | None = None,
    eval_every: int | None = None,
    eval_episodes: int = 10,
    log_every: int = 1000,
    checkpoint_every: int = 10_000,
    resume: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    eval_budgets: Sequence[int] = (0, 1, 2, 3),
    env_kwargs: Mapping[str, Any] | None = None,
    reward_scale: float | None = None,
    reward_shift: float | None = None,
) -> TrainResult:
    """Offline-to-online fine-tuning: each step explores one environment step with ``agent.explore``
    (best-of-N from the reference), appends it to ``dataset`` (in place) and takes one update.

    ``init_checkpoint`` is an offline run's checkpoint (file or run directory) whose agent and
    optimisers start the fine-tuning (its config must equal ``config``); None starts from scratch.
    Online rewards become ``reward * reward_scale + reward_shift`` to match the dataset's processing;
    None infers them from ``dataset.metadata['reward_processing']`` (antmaze: shift -1; D4RL
    locomotion needs an explicit ``reward_scale``). Other arguments as in `train`.
    """
    scale, shift = _online_reward_transform(dataset, reward_scale, reward_shift)
    online = _Online(env_name, scale, shift, init_checkpoint)
    return _run(
        config, dataset, env_name, Path(out_dir), total_steps, eval_every, eval_episodes, log_every,
        checkpoint_every, resume, seed, device, progress, tuple(eval_budgets), env_kwargs,
        online=online,
    )  # fmt: skip


# ============================================================================================ the loop
def _run(
    config: VGFConfig,
    dataset: OfflineDataset,
    env_name: str | None,
    out_dir: Path,
    total_steps: int,
    eval_every: int | None,
    eval_episodes: int,
    log_every: int,
    checkpoint_every: int,
    resume: bool,
    seed: int,
    device: str | torch.device,
    progress: bool,
    eval_budgets: tuple[int, ...],
    env_kwargs: Mapping[str, Any] | None,
    online: _Online | None,
) -> TrainResult:
    _check_positive(total_steps=total_steps, log_every=log_every, checkpoint_every=checkpoint_every,
                    eval_episodes=eval_episodes)  # fmt: skip
    if eval_every is not None:
        _check_positive(eval_every=eval_every)
    eval_every = total_steps if eval_every is None else eval_every
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TrainingSetupError(f"seed must be an int >= 0, got {seed!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in eval_budgets):
        raise TrainingSetupError(f"evaluation budgets (L_test) must be ints >= 0 flow steps, got {list(eval_budgets)}")
    device = check_device(device)
    check_run_dir(out_dir, resume)
    env_kwargs = dict(env_kwargs) if env_kwargs is not None else _default_env_kwargs(dataset)
    if env_name is not None:
        check_env(env_name, dataset.obs_dim, dataset.action_dim, env_kwargs)
    with RunLock(out_dir):
        return _run_locked(
            config, dataset, env_name, out_dir, total_steps, eval_every, eval_episodes, log_every,
            checkpoint_every, resume, seed, device, progress, eval_budgets, env_kwargs, online,
        )  # fmt: skip


def _run_locked(
    config: VGFConfig,
    dataset: OfflineDataset,
    env_name: str | None,
    out_dir: Path,
    total_steps: int,
    eval_every: int,
    eval_episodes: int,
    log_every: int,
    checkpoint_every: int,
    resume: bool,
    seed: int,
    device: torch.device,
    progress: bool,
    eval_budgets: tuple[int, ...],
    env_kwargs: dict[str, Any],
    online: _Online | None,
) -> TrainResult:
    """`_run` once the arguments are checked and this process holds ``out_dir``'s lock."""
    from tqdm.auto import tqdm

    from vgf_prob.rl.agent import VGFAgent

    check_run_dir(out_dir, resume)  # again under the lock: another process may have written in between
    if not resume:
        _set_aside_stale_logs(out_dir)
    started = time.perf_counter()
    phase = {"training": 0.0, "evaluation": 0.0, "checkpoints": 0.0, "online": 0.0}

    # ---- seeding, data, agent ---------------------------------------------------------------------------
    _seed_everything(seed)
    dataset = dataset.to(device)
    base_size = len(dataset)
    fingerprint = _fingerprint(dataset)
    data_generator = torch.Generator(device=dataset.device).manual_seed(seed)
    agent_generator = torch.Generator(device=device).manual_seed(seed + 1)
    generators = {"data": data_generator, "agent": agent_generator}
    agent = VGFAgent(dataset.obs_dim, dataset.action_dim, config, device=device)
    run_info = {
        "env_name": env_name, "obs_dim": dataset.obs_dim, "action_dim": dataset.action_dim, "seed": seed,
        "mode": "offline" if online is None else "finetune", "dataset": fingerprint,
        "dataset_metadata": _jsonable(dataset.metadata), "threads": torch.get_num_threads(),
    }  # fmt: skip

    window = _MetricWindow()
    train_log = _CSVLog(out_dir / TRAIN_LOG)
    eval_log = _CSVLog(out_dir / EVAL_LOG, EVAL_COLUMNS)
    start_step = 0
    if resume:
        payload = load_latest(out_dir)  # on the CPU: RNG states must stay there; weights are copied over
        _check_resumable(payload, config, run_info, out_dir)
        if payload["step"] >= total_steps:
            raise TrainingSetupError(
                f"{out_dir} is already at step {payload['step']} >= total_steps={total_steps}; raise total_steps"
            )
        agent.load_training_state(payload["agent"])
        if online is not None:
            dataset.append(payload["online"]["appended"])
            online.load_state_dict(payload["online"])
        window.load_state_dict(payload["logs"]["window"], device)
        train_log.truncate(payload["logs"][TRAIN_LOG])
        eval_log.truncate(payload["logs"][EVAL_LOG])
        restore_rng_state(payload["rng"], generators)
        start_step = payload["step"]
    elif online is not None and online.init_checkpoint is not None:
        _load_initial_agent(agent, online.init_checkpoint, config)
    if online is not None:
        online.start(env_kwargs, seed)
    tensorboard = _tensorboard_writer(out_dir, purge_step=start_step + 1)

    # ---- main loop -----------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=start_step, desc="train" if online is None else "finetune",
               unit="step", disable=not progress, dynamic_ncols=True)  # fmt: skip
    last_scores: list[dict[str, Any]] = []
    tick = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        checkpoint_now = step % checkpoint_every == 0 or step == total_steps

        if online is not None:  # one environment step with best-of-N exploration, appended to the buffer
            t0 = time.perf_counter()
            dataset.append(online.step(agent, agent_generator, cut_episode=checkpoint_now))
            phase["online"] += time.perf_counter() - t0

        batch = dataset.sample(config.batch_size, data_generator)
        info = agent.update(batch, generator=agent_generator, check_finite=False)  # validated data
        window.add(info)
        bar.update(1)

        if step % log_every == 0 or step == total_steps:
            now = time.perf_counter()
            row = {"step": step, **window.means(), "steps_per_second": (step - window.since) / (now - tick)}
            if online is not None:
                row.update(online.pop_stats())
            window.reset(step)
            train_log.write(row)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in PROGRESS_KEYS if k in row})
            if tensorboard is not None:
                for key, value in row.items():
                    if key != "step" and isinstance(value, float) and math.isfinite(value):
                        tensorboard.add_scalar(f"train/{key}", value, step)
            tick = now

        if env_name is not None and (step % eval_every == 0 or step == total_steps):
            t0 = time.perf_counter()
            last_scores = evaluate_policies(agent, env_name, eval_budgets, eval_episodes, seed, step, env_kwargs,
                                            progress)  # fmt: skip
            for row in last_scores:
                eval_log.write({"step": step, **row})
                if tensorboard is not None:
                    tensorboard.add_scalar(f"eval/{_label(row)}", row["score"], step)
            if step != total_steps:  # the final scores are the result's table
                bar.write(f"step {step}: " + ", ".join(f"{_label(r)} {r['score']:.1f}" for r in last_scores))
            spent = time.perf_counter() - t0
            phase["evaluation"] += spent
            tick += spent  # steps/s (log and bar) count training time only
            bar.unpause()

        if checkpoint_now:
            t0 = time.perf_counter()
            payload = {
                "step": step,
                "config": config.to_dict(),
                "agent": agent.training_state(),
                "rng": capture_rng_state(generators),
                "logs": {TRAIN_LOG: train_log.position(), EVAL_LOG: eval_log.position(), "window": window.state_dict()},
                "run": run_info,
            }
            if online is not None:
                payload["online"] = online.state_dict(dataset, base_size)
            checkpoint = save_checkpoint(out_dir, payload)
            phase["checkpoints"] += time.perf_counter() - t0
    bar.close()
    if tensorboard is not None:
        tensorboard.close()
    if online is not None:
        online.close()

    # ---- summary ------------------------------------------------------------------------------------
    phase["training"] = time.perf_counter() - started - phase["evaluation"] - phase["checkpoints"] - phase["online"]
    table = format_scores(last_scores, f"{env_name} after {total_steps} steps") if last_scores else ""
    curve = _plot_learning_curve(out_dir, f"{env_name or out_dir.name}: {total_steps} training steps, seed {seed}")
    seconds = time.perf_counter() - started
    summary = {"step": total_steps, "final_scores": last_scores, "seconds": seconds, "phase_seconds": phase,
               "config": config.to_dict(), "run": run_info}  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
    return TrainResult(
        agent=agent, out_dir=out_dir, step=total_steps, final_scores=last_scores, table=table,
        train_log=train_log.path, eval_log=eval_log.path, checkpoint=checkpoint, learning_curve=curve,
        seconds=seconds, phase_seconds=phase,
    )  # fmt: skip


# ============================================================================================ evaluation
def evaluate_policies(
    agent: Any,
    env_name: str,
    budgets: Sequence[int],
    num_episodes: int,
    seed: int,
    step: int = 0,
    env_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score the BC reference, best-of-N (budget 0) and VGF (each budget > 0) on the same episodes.

    Episode ``k`` of every policy resets the environment with seed ``seed + k``; the agent's noise comes
    from a generator seeded by ``(seed, step)`` and every global RNG is restored afterwards.
    Returns rows ``policy, L_test, score, score_std, mean_return, return_std, episodes, score_kind``;
    ``progress`` shows a bar per policy.
    """
    from vgf_prob.rl.evaluate import evaluate, make_envs

    generator = torch.Generator(device=agent.device).manual_seed(_mix_seed(seed, step))
    policies: list[tuple[str, int | None, Callable[[Tensor], Tensor]]] = [
        ("BC reference", None, lambda obs: agent.bc_action(obs, generator=generator))
    ]
    for budget in budgets:
        name = "best-of-N" if budget == 0 else "VGF"
        policies.append((name, budget, _budget_act_fn(agent, budget, generator)))
    rows = []
    with preserved_rng():
        envs = make_envs(env_name, min(num_episodes, 10), **(env_kwargs or {}))
        try:
            for name, budget, act_fn in policies:
                result = evaluate(act_fn, env_name, num_episodes, seed, device=agent.device, envs=envs,
                                  progress=progress, label=_label({"policy": name, "L_test": budget}))  # fmt: skip
                rows.append({
                    "policy": name, "L_test": budget, "score": result.score, "score_std": result.score_std,
                    "mean_return": result.mean_return, "return_std": result.std_return,
                    "episodes": result.num_episodes, "score_kind": result.score_kind,
                })  # fmt: skip
        finally:
            for env in envs:
                env.close()
    return rows


def _budget_act_fn(agent: Any, budget: Any, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    return lambda obs: agent.act(obs, budget=budget, generator=generator)


def format_scores(rows: Sequence[Mapping[str, Any]], title: str, print_table: bool = False) -> str:
    """The final comparison table (policy, L_test, score ± std, mean return ± std over episodes) as text."""
    from vgf_prob.rl.evaluate import format_table

    kind = rows[0]["score_kind"] if rows else "score"
    unit = {"success_rate": "success %", "d4rl_normalized": "D4RL score", "return": "return"}.get(kind, kind)
    table_rows = [
        {"policy": r["policy"], "L_test": "-" if r["L_test"] is None else r["L_test"],
         unit: f"{r['score']:.1f} ± {r['score_std']:.1f}",
         "mean return": f"{r['mean_return']:.1f} ± {r['return_std']:.1f}", "episodes": r["episodes"]}
        for r in rows
    ]  # fmt: skip
    if print_table:  # a line of its own: a rich table title wraps (mid-word) at the table's width
        print(title)
    return f"{title}\n" + format_table(table_rows, print_table=print_table)


def _label(row: Mapping[str, Any]) -> str:
    return row["policy"] if row["L_test"] in (None, 0) else f"{row['policy']} L={row['L_test']}"


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch's, numpy's and python's global RNG state on exit (evaluation must not move them)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


# ============================================================================================ fine-tuning
class _Online:
    """The environment side of fine-tuning: one exploration step at a time, episode bookkeeping."""

    def __init__(self, env_name: str, reward_scale: float, reward_shift: float, init_checkpoint: str | Path | None):
        self.env_name = env_name
        self.reward_scale, self.reward_shift = reward_scale, reward_shift
        self.init_checkpoint = init_checkpoint
        self.episodes = 0  # episodes started so far: episode k resets with seed + k
        self.needs_reset = True
        self.stats: list[tuple[float, float]] = []  # (return, success) of episodes finished since the last log
        self._env: Any = None
        self._obs: np.ndarray | None = None
        self._return = 0.0
        self._success = 0.0

    def start(self, env_kwargs: Mapping[str, Any], seed: int) -> None:
        from vgf_prob.rl.evaluate import make_env

        self._env = make_env(self.env_name, **env_kwargs)
        self._seed = seed

    def step(self, agent: Any, generator: torch.Generator, cut_episode: bool) -> dict[str, np.ndarray]:
        """Act with ``agent.explore``, step the environment, return the transition to append."""
        if self.needs_reset:
            self._obs, _ = self._env.reset(seed=self._seed + self.episodes)
            self.episodes += 1
            self.needs_reset = False
            self._return = self._success = 0.0
        obs = torch.as_tensor(self._obs, dtype=torch.float32, device=agent.device)[None]
        action = agent.explore(obs, generator=generator)[0].detach().cpu().numpy()
        space = self._env.action_space
        action = np.clip(action, space.low, space.high)
        next_obs, reward, terminated, truncated, info = self._env.step(action)
        self._return += float(reward)
        self._success = float(info.get("success", self._success))
        ended = terminated or truncated or cut_episode
        transition = {
            "observations": self._obs, "actions": action, "next_observations": next_obs,
            "rewards": np.float32(reward * self.reward_scale + self.reward_shift),
            "masks": np.float32(0.0 if terminated else 1.0),
            "terminals": np.float32(ended), "timeouts": np.float32(ended and not terminated),
        }  # fmt: skip
        if ended:
            if terminated or truncated:
                self.stats.append((self._return, self._success))
            self.needs_reset = True
        self._obs = next_obs
        return transition

    def pop_stats(self) -> dict[str, float | int | str]:
        """Episodes finished since the last call: count, mean return, success rate (blank if none)."""
        stats, self.stats = self.stats, []
        if not stats:
            return {"online_episodes": 0, "online_return": "", "online_success": ""}
        returns, successes = zip(*stats, strict=True)
        return {"online_episodes": len(stats), "online_return": float(np.mean(returns)),
                "online_success": 100.0 * float(np.mean(successes))}  # fmt: skip

    def state_dict(self, dataset: OfflineDataset, base_size: int) -> dict[str, Any]:
        """Episode counter, pending stats and the transitions appended so far (rows after ``base_size``)."""
        if not self.needs_reset:
            raise RuntimeError("an online checkpoint must be taken at an episode boundary")
        appended = {k: getattr(dataset, k)[base_size:].cpu().clone() for k in dataset.keys}
        return {"episodes": self.episodes, "stats": [list(s) for s in self.stats], "appended": appended}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.episodes = int(state["episodes"])
        self.stats = [(float(r), float(s)) for r, s in state["stats"]]
        self.needs_reset = True

    def close(self) -> None:
        if self._env is not None:
            self._env.close()


def _online_reward_transform(
    dataset: OfflineDataset, scale: float | None, shift: float | None
) -> tuple[float, float]:
    processing = dataset.metadata.get("reward_processing", "none")
    if processing == "locomotion" and scale is None:
        raise ValueError(
            "this D4RL locomotion dataset's rewards were scaled by 1000 / (max - min episode return); pass "
            "the same factor as reward_scale= so that online rewards match"
        )
    default_shift = -1.0 if processing == "antmaze" else 0.0
    return (1.0 if scale is None else float(scale)), (default_shift if shift is None else float(shift))


def _load_initial_agent(agent: Any, path: str | Path, config: VGFConfig) -> None:
    from vgf_prob.rl.checkpoint import resolve_checkpoint

    payload = load_checkpoint(resolve_checkpoint(path))
    diff = config_mismatch(payload["config"], config.to_dict())
    if diff:
        raise CheckpointError(f"{path} was trained with another config: " + "; ".join(diff))
    agent.load_training_state(payload["agent"])


# ============================================================================================ logging
class _CSVLog:
    """An append-only CSV file whose header is fixed by its first row (or given); resumable by byte offset.

    Each row (with the header, for the first) is one ``os.write`` on an ``O_APPEND`` descriptor; if the
    write fails or comes up short (a full disk), the file is cut back to its previous size before the
    error propagates, so the file only ever holds whole rows.
    """

    def __init__(self, path: Path, columns: Sequence[str] | None = None) -> None:
        self.path = path
        self.columns = list(columns) if columns is not None else None

    def write(self, row: Mapping[str, Any]) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if self.columns is None:
            self.columns = self._read_header() if size else list(row)
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise ValueError(f"{self.path}: row has columns {unknown} that the header {self.columns} lacks")
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, restval="")
        if not size:
            writer.writeheader()
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
        data = text.getvalue().encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])  # a full disk: a short write, then ENOSPC
        except OSError as err:
            os.ftruncate(fd, size)
            raise OSError(err.errno, f"{err.strerror} (appending a row; the log keeps its complete rows)",
                          str(self.path)) from err  # fmt: skip
        finally:
            os.close(fd)

    def position(self) -> int:
        """Bytes written so far, flushed to disk: what `truncate` returns the file to on resume."""
        if not self.path.exists():
            return 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # a checkpoint must never point past what the log has on disk
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def truncate(self, position: int) -> None:
        """Drop what was written after ``position`` (rows of a killed run past its last checkpoint).

        A partial last row (a crash mid-write outside this class's control) is reported with a warning.
        """
        if not self.path.exists():
            if position:
                raise CheckpointError(f"{self.path} is missing but the checkpoint expects {position} bytes of log")
            return
        with self.path.open("r+b") as f:
            content = f.read()
            if len(content) < position:
                raise CheckpointError(
                    f"{self.path} has {len(content)} bytes but the checkpoint expects at least {position}"
                )
            if position and content[position - 1 : position] != b"\n":
                raise CheckpointError(f"{self.path} does not match the checkpoint: byte {position} is not a row end")
            tail = content[position:]
            if tail and not tail.endswith(b"\n"):
                partial = len(tail) - (tail.rfind(b"\n") + 1)
                warnings.warn(f"{self.path}: dropped a partial last row ({partial} bytes) left by a crash",
                              stacklevel=2)  # fmt: skip
            f.truncate(position)

    def _read_header(self) -> list[str]:
        with self.path.open(newline="") as f:
            return next(csv.reader(f))


def _csv_cell(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value  # repr: the shortest exact float text


class _MetricWindow:
    """Running sums of the agent's scalar tensors between two log rows; floats only at `means`."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.since = 0

    def add(self, info: Mapping[str, Tensor]) -> None:
        for key, value in info.items():
            value = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: float(v.double().item()) / self.count for k, v in self.sums.items()}

    def reset(self, step: int) -> None:
        self.sums, self.count, self.since = {}, 0, step

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count, "since": self.since}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count, self.since = int(state["count"]), int(state["since"])


def _tensorboard_writer(out_dir: Path, purge_step: int) -> Any:
    """A TensorBoard SummaryWriter under ``out_dir/tb`` when the tensorboard package is installed, else None."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tb"), purge_step=purge_step)


def _plot_learning_curve(out_dir: Path, title: str) -> Path | None:
    """``learning_curve.png``: the main losses and, once evaluated twice or more, each policy's score."""
    from vgf_prob.rl.plots import SCORE_LABELS, plot_learning_curve

    rows: list[dict[str, Any]] = []
    metrics: list[str] = []
    scores: list[str] = []
    score_label = "score"
    eval_path = out_dir / EVAL_LOG
    if eval_path.exists():
        with eval_path.open(newline="") as f:
            eval_rows = list(csv.DictReader(f))
        if len({r["step"] for r in eval_rows}) > 1:  # one point per panel is no curve
            for r in eval_rows:
                label = _label({"policy": r["policy"], "L_test": int(r["L_test"]) if r["L_test"] else None})
                rows.append({"step": r["step"], label: r["score"]})
                scores.append(label)
            score_label = SCORE_LABELS.get(eval_rows[0]["score_kind"], "score")
    train_path = out_dir / TRAIN_LOG
    if train_path.exists():
        with train_path.open(newline="") as f:
            train_rows = list(csv.DictReader(f))
        rows.extend(train_rows)
        if train_rows:
            metrics.extend(k for k in PROGRESS_KEYS if k in train_rows[0])
    metrics, scores = list(dict.fromkeys(metrics)), list(dict.fromkeys(scores))
    if not rows or not (metrics or scores):
        return None
    return plot_learning_curve(rows, out_dir / "learning_curve.png", metrics=metrics, title=title, scores=scores,
                               score_label=score_label)  # fmt: skip


# ============================================================================================ helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mix_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainingSetupError(f"{name} must be a positive int, got {value!r}")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a `torch.device`, or `TrainingSetupError` when it does not exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise TrainingSetupError(f"unknown device {str(device)!r}: {str(err).splitlines()[0]}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise TrainingSetupError(f"device {str(device)!r} requested but {why}; use --device cpu")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as err:
            raise TrainingSetupError(f"device {str(device)!r} is not usable here: {str(err).splitlines()[0]}") from err
    return dev


def check_env(env_name: str, obs_dim: int, action_dim: int, env_kwargs: Mapping[str, Any] | None = None) -> None:
    """Make ``env_name`` once and check that its observation and action sizes are the dataset's.

    Raises `TrainingSetupError` for an unknown name, a missing environment package or other dimensions.
    """
    from vgf_prob.rl.evaluate import make_env

    try:
        env = make_env(env_name, **(env_kwargs or {}))
    except (ValueError, ImportError) as err:
        raise TrainingSetupError(f"cannot evaluate in {env_name!r}: {err}") from err
    try:
        obs_shape, action_shape = env.observation_space.shape, env.action_space.shape
    finally:
        env.close()
    if obs_shape != (obs_dim,) or action_shape != (action_dim,):
        raise TrainingSetupError(
            f"environment {env_name!r} has observations of shape {obs_shape} and actions of shape {action_shape}, "
            f"but the data has obs_dim {obs_dim} and action_dim {action_dim}; pass the environment of this data"
        )


def check_run_dir(out_dir: str | os.PathLike, resume: bool) -> None:
    """Refuse a run directory that this run must not write into (`TrainingSetupError`/`CheckpointError`).

    - not a directory, or not writable (checked on it, or on its nearest existing parent);
    - held by another live process (`vgf_prob.rl.checkpoint.RunDirBusy`, naming its PID);
    - ``resume=False``: it holds a checkpoint (resume it instead), or it is not empty and not a vgf-prob
      run directory (none of `RUN_MARKERS` in it);
    - ``resume=True``: it holds no checkpoint.

    Creates nothing; the lock is only probed (taken and released), when its file exists.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingSetupError(f"run directory {out_dir} is a file, not a directory")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise TrainingSetupError(f"cannot create run directory {out_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == out_dir else f" (its parent {existing} is not writable)"
        raise TrainingSetupError(f"run directory {out_dir} is not writable{where}")
    if existing != out_dir:  # a new directory: nothing else to check
        if resume:
            raise CheckpointError(f"nothing to resume: {out_dir} does not exist")
        return
    if (out_dir / LOCK_FILE).exists():
        RunLock(out_dir).acquire()  # raises RunDirBusy while another process holds it
        RunLock(out_dir).release()
    names = sorted(p.name for p in out_dir.iterdir())
    has_checkpoint = LATEST in names or PREVIOUS in names
    if resume:
        if not has_checkpoint:
            raise CheckpointError(f"nothing to resume: no {LATEST} or {PREVIOUS} in {out_dir}")
        return
    if has_checkpoint:
        raise CheckpointError(
            f"{out_dir} already holds a run ({LATEST}); pass resume=True (--resume) to continue it, "
            "or choose another output directory"
        )
    if names and not set(names) & set(RUN_MARKERS):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise TrainingSetupError(
            f"{out_dir} is not empty and is not a vgf-prob run directory (it holds {shown}); choose a new or empty "
            "directory"
        )


def _set_aside_stale_logs(out_dir: Path) -> Path | None:
    """Move the files of a run killed before its first checkpoint into ``out_dir/stale-<time>/``.

    Called for a fresh run once `check_run_dir` has ruled out a checkpoint; the lock file, earlier
    ``stale-*`` folders and dead writers' temporary files (deleted) are not moved. Returns the folder.
    """
    remove_orphaned_tmp_files(out_dir)
    entries = [p for p in out_dir.iterdir() if p.name != LOCK_FILE and not p.name.startswith(STALE_PREFIX)]
    if not entries:
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = out_dir / f"{STALE_PREFIX}{stamp}"
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = out_dir / f"{STALE_PREFIX}{stamp}-{suffix}"
    aside.mkdir()
    for entry in entries:
        os.replace(entry, aside / entry.name)
    warnings.warn(
        f"{out_dir} held logs but no checkpoint (a run that ended before its first checkpoint); moved "
        f"{', '.join(sorted(p.name for p in entries))} to {aside} and starting afresh",
        stacklevel=3,
    )
    return aside


def _fingerprint(dataset: OfflineDataset) -> dict[str, Any]:
    """Size, dimensions and float64 sums of the offline data: enough to notice another dataset on resume."""
    return {
        "size": len(dataset), "obs_dim": dataset.obs_dim, "action_dim": dataset.action_dim,
        **{f"sum_{k}": float(getattr(dataset, k).double().sum().item())
           for k in ("observations", "actions", "rewards", "masks")},
    }  # fmt: skip


def _check_resumable(payload: Mapping[str, Any], config: VGFConfig, run_info: Mapping[str, Any], out_dir: Path) -> None:
    """Refuse to resume with another config, dataset, environment, seed or mode; say what differs."""
    problems = config_mismatch(payload["config"], config.to_dict())
    saved = payload.get("run", {})
    for key in ("env_name", "seed", "mode", "obs_dim", "action_dim"):
        if saved.get(key) != run_info[key]:
            problems.append(f"{key}: checkpoint {saved.get(key)!r}, requested {run_info[key]!r}")
    if saved.get("dataset") != run_info["dataset"]:
        problems.append(f"dataset: checkpoint {saved.get('dataset')}, requested {run_info['dataset']}")
    if problems:
        raise CheckpointError(
            f"cannot resume {out_dir} (step {payload['step']}): the run differs from the checkpoint's: "
            + "; ".join(problems)
            + "; use the original settings, or start a new run in another directory"
        )


def _default_env_kwargs(dataset: OfflineDataset) -> dict[str, Any]:
    """OGBench data records the success timing its rewards used; evaluate with the same one."""
    timing = dataset.metadata.get("success_timing")
    return {} if timing is None else {"success_timing": timing}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


__all__ = [
    "TrainResult",
    "TrainingSetupError",
    "check_device",
    "check_env",
    "check_run_dir",
    "evaluate_policies",
    "finetune",
    "format_scores",
    "preserved_rng",
    "train",
]
