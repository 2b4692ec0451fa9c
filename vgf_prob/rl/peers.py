"""Peer offline-RL baselines from d3rlpy, trained on exactly VGF's transitions and scored by VGF's evaluator.

    python -m vgf_prob.rl.peers --dataset reacher-mixed-v0 --algos iql td3+bc awac cql --steps 3000 --seeds 0 1 2

Each peer is d3rlpy 2.8.1's own algorithm (``pip install --no-deps d3rlpy==2.8.1``: its metadata pins
gymnasium 1.0.0, but it runs with the gymnasium this project uses). Its hyperparameters are those of
d3rlpy's reproduction scripts ``reproductions/offline/{iql,td3_plus_bc,awac,cql}.py`` (tag v2.8.1), with
two changes named in `PEER_SETTINGS`: every encoder has ``hidden_dims`` units (the scripts use 2 x 256,
4 x 256 or 3 x 256) and a cosine learning-rate schedule lasts the run (the IQL script's ``T_max`` equals
its step count). Everything else (batch sizes, learning rates, expectile, TD3+BC's observation
standardisation, IQL's return-based reward scaling, CQL's weights) is the script's.

The data. `to_replay_buffer` turns an `OfflineDataset` into d3rlpy episodes: one episode per stored
trajectory (a new one starts after a ``terminals`` flag, a ``mask`` of 0, or wherever a row's next
observation is not the following row's observation), holding the rows' observations plus the last row's
next observation. d3rlpy's transition picker then yields, row for row, the dataset's ``(s, a, r, s')``
with ``terminal = 1 - mask``; at a true terminal it gives a zero next observation, which both sides
multiply by ``mask = 0``. `picked_transitions` reads every transition back through d3rlpy's picker, and
`check_same_transitions` compares them with the dataset exactly (run before every training).

Scoring. The deterministic policy (``algo.predict``) plays the episodes of `vgf_prob.rl.evaluate.evaluate`
seeded ``eval_seed + k``, as VGF's evaluation does. Each evaluation makes one row of VGF's eval.csv
(``step`` and `vgf_prob.rl.evaluate.ROW_COLUMNS`, the one result-row schema; budget empty: no flow) plus
``seed`` and ``train_cpu_s`` (CPU seconds of this process spent in training since step 0, evaluation
excluded; `time.process_time`, one torch thread recommended).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgf_prob.rl.offline_dataset import OfflineDataset

# Departures from d3rlpy's reproduction scripts: encoders sized by ``hidden_dims``; schedules span the run.
PEER_SETTINGS = {
    "iql": "reproductions/offline/iql.py: lr 3e-4/3e-4, actor cosine schedule (T_max = steps), batch 256, "
           "expectile 0.7, weight_temp 3, max_weight 100, ReturnBasedRewardScaler(multiplier=1000)",
    "td3+bc": "reproductions/offline/td3_plus_bc.py: lr 3e-4/3e-4, batch 256, alpha 2.5, target smoothing "
              "0.2 clipped at 0.5, actor every 2 steps, StandardObservationScaler",
    "awac": "reproductions/offline/awac.py: lr 3e-4/3e-4, actor Adam weight decay 1e-4, batch 1024, lam 1",
    "cql": "reproductions/offline/cql.py: actor lr 1e-4, critic 3e-4, temperature 1e-4, alpha lr 0, batch 256, "
           "10 action samples, conservative_weight 5 (the script's value for every dataset but *-medium-v0)",
}  # fmt: skip
POLICY_NAMES = {"iql": "d3rlpy IQL", "td3+bc": "d3rlpy TD3+BC", "awac": "d3rlpy AWAC", "cql": "d3rlpy CQL"}


def _d3rlpy() -> Any:
    try:
        import d3rlpy
    except ImportError as err:
        raise ImportError(
            "the peer baselines need d3rlpy: pip install --no-deps d3rlpy==2.8.1 (with its dependencies click, "
            "colorama, dataclasses-json, gym, scikit-learn, structlog)"
        ) from err
    return d3rlpy


def peer_config(name: str, hidden_dims: Sequence[int], total_steps: int) -> Any:
    """d3rlpy's config for peer ``name`` (`PEER_SETTINGS`), encoders of ``hidden_dims`` units."""
    d3rlpy = _d3rlpy()
    if name not in PEER_SETTINGS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEER_SETTINGS)}")
    if not hidden_dims or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_dims):
        raise ValueError(f"hidden_dims must be positive ints, got {list(hidden_dims)}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    encoder = d3rlpy.models.encoders.VectorEncoderFactory(list(hidden_dims))
    algos, optimizers, preprocessing = d3rlpy.algos, d3rlpy.optimizers, d3rlpy.preprocessing
    if name == "iql":
        schedule = optimizers.CosineAnnealingLRFactory(T_max=total_steps)
        return algos.IQLConfig(
            actor_learning_rate=3e-4, critic_learning_rate=3e-4,
            actor_optim_factory=optimizers.AdamFactory(lr_scheduler_factory=schedule), batch_size=256,
            weight_temp=3.0, max_weight=100.0, expectile=0.7,
            reward_scaler=preprocessing.ReturnBasedRewardScaler(multiplier=1000.0),
            actor_encoder_factory=encoder, critic_encoder_factory=encoder, value_encoder_factory=encoder,
        )  # fmt: skip
    if name == "td3+bc":
        return algos.TD3PlusBCConfig(
            actor_learning_rate=3e-4, critic_learning_rate=3e-4, batch_size=256, target_smoothing_sigma=0.2,
            target_smoothing_clip=0.5, alpha=2.5, update_actor_interval=2,
            observation_scaler=preprocessing.StandardObservationScaler(),
            actor_encoder_factory=encoder, critic_encoder_factory=encoder,
        )  # fmt: skip
    if name == "awac":
        return algos.AWACConfig(
            actor_learning_rate=3e-4, actor_optim_factory=optimizers.AdamFactory(weight_decay=1e-4),
            critic_learning_rate=3e-4, batch_size=1024, lam=1.0,
            actor_encoder_factory=encoder, critic_encoder_factory=encoder,
        )  # fmt: skip
    return algos.CQLConfig(
        actor_learning_rate=1e-4, critic_learning_rate=3e-4, temp_learning_rate=1e-4, batch_size=256,
        n_action_samples=10, alpha_learning_rate=0.0, conservative_weight=5.0,
        actor_encoder_factory=encoder, critic_encoder_factory=encoder,
    )  # fmt: skip


def _trajectory_starts(dataset: OfflineDataset) -> np.ndarray:
    """Row indices where a trajectory starts: 0, and after an end flag, a terminal or a non-successor row."""
    obs = dataset.observations.cpu().numpy()
    next_obs = dataset.next_observations.cpu().numpy()
    not_successor = np.append(np.any(next_obs[:-1] != obs[1:], axis=1), True)
    ends = (dataset.masks.cpu().numpy() == 0) | not_successor
    if dataset.terminals is not None:
        ends |= dataset.terminals.cpu().numpy() == 1
    return np.concatenate([[0], np.flatnonzero(ends[:-1]) + 1])


def to_replay_buffer(dataset: OfflineDataset) -> Any:
    """The dataset's transitions as a d3rlpy ``ReplayBuffer`` of episodes (see the module docstring)."""
    d3rlpy = _d3rlpy()
    arrays = {k: getattr(dataset, k).cpu().numpy().astype(np.float32)
              for k in ("observations", "actions", "rewards", "next_observations", "masks")}  # fmt: skip
    starts = list(_trajectory_starts(dataset)) + [len(dataset)]
    episodes = []
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        obs, actions, rewards = arrays["observations"][lo:hi], arrays["actions"][lo:hi], arrays["rewards"][lo:hi]
        terminated = bool(arrays["masks"][hi - 1] == 0)
        if not terminated:  # one more observation (the last row's successor); its action and reward are unused
            obs = np.concatenate([obs, arrays["next_observations"][hi - 1 : hi]])
            actions = np.concatenate([actions, np.zeros_like(actions[:1])])
            rewards = np.concatenate([rewards, np.zeros(1, np.float32)])
        episodes.append(d3rlpy.dataset.Episode(obs, actions, rewards[:, None], terminated))
    return d3rlpy.dataset.ReplayBuffer(
        d3rlpy.dataset.InfiniteBuffer(), episodes=episodes,
        action_space=d3rlpy.ActionSpace.CONTINUOUS, action_size=dataset.action_dim,
    )  # fmt: skip


def picked_transitions(buffer: Any) -> dict[str, np.ndarray]:
    """Every transition of ``buffer`` as d3rlpy's transition picker yields it, in buffer order."""
    pairs = (buffer.buffer[k] for k in range(buffer.transition_count))
    rows = [buffer.transition_picker(episode, i) for episode, i in pairs]
    return {
        "observations": np.stack([t.observation for t in rows]),
        "actions": np.stack([t.action for t in rows]),
        "rewards": np.array([float(t.reward[0]) for t in rows], dtype=np.float32),
        "next_observations": np.stack([t.next_observation for t in rows]),
        "masks": np.array([1.0 - t.terminal for t in rows], dtype=np.float32),
    }


def check_same_transitions(dataset: OfflineDataset, buffer: Any) -> None:
    """Raise unless ``buffer`` yields exactly ``dataset``'s rows (next observation compared where mask = 1)."""
    picked = picked_transitions(buffer)
    if len(picked["rewards"]) != len(dataset):
        raise ValueError(f"d3rlpy sees {len(picked['rewards'])} transitions, the dataset holds {len(dataset)}")
    live = dataset.masks.cpu().numpy() == 1
    for key, values in picked.items():
        expected = getattr(dataset, key).cpu().numpy().astype(np.float32)
        got, want = (values[live], expected[live]) if key == "next_observations" else (values, expected)
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(np.any((got != want).reshape(len(got), -1), axis=1))[0])
            raise ValueError(f"d3rlpy's {key} differ from the dataset's (first at compared row {bad})")


def _eval_row(algo: Any, name: str, env_name: str, episodes: int, eval_seed: int) -> dict[str, Any]:
    from vgf_prob.rl.evaluate import ROW_COLUMNS, evaluate, score_row

    def act(obs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(algo.predict(obs.cpu().numpy()), dtype=torch.float32)

    row = score_row(POLICY_NAMES[name], None, None, evaluate(act, env_name, episodes, eval_seed)).to_dict()
    return {k: row[k] for k in ROW_COLUMNS}


def train_peer(
    name: str,
    dataset: OfflineDataset,
    env_name: str,
    total_steps: int,
    eval_every: int,
    eval_episodes: int = 50,
    seed: int = 0,
    hidden_dims: Sequence[int] = (128, 128),
    eval_seed: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train peer ``name`` for ``total_steps`` updates; evaluate every ``eval_every`` steps and at the end.

    Returns the rows (`columns()`), each also handed to ``on_row`` as it is made. Episodes are seeded
    ``eval_seed + k`` (default ``seed``, as VGF's evaluation of seed ``seed``).
    """
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive int, got {eval_every!r}")
    d3rlpy = _d3rlpy()
    config = peer_config(name, hidden_dims, total_steps)
    buffer = to_replay_buffer(dataset)
    check_same_transitions(dataset, buffer)
    d3rlpy.seed(seed)
    algo = config.create(device="cpu")
    rows: list[dict[str, Any]] = []
    done, train_cpu = 0, 0.0
    while done < total_steps:
        chunk = min(eval_every, total_steps - done)
        started = time.process_time()
        for _ in algo.fitter(buffer, n_steps=chunk, n_steps_per_epoch=chunk, show_progress=False,
                             logger_adapter=d3rlpy.logging.NoopAdapterFactory(), save_interval=10**9):  # fmt: skip
            pass
        train_cpu += time.process_time() - started
        done += chunk
        row = {"step": done, **_eval_row(algo, name, env_name, eval_episodes, seed if eval_seed is None else eval_seed),
               "seed": seed, "train_cpu_s": train_cpu}  # fmt: skip
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def load_dataset(
    dataset: str, episodes: int = 200, data_seed: int = 0, env_name: str | None = None
) -> tuple[OfflineDataset, str]:
    """``(transitions, environment)`` as VGF loads them: a generated name (`vgf_prob.rl.gym_generate`), cached
    with ``episodes`` and ``data_seed``, or a D4RL-format HDF5 file with its ``env_name``."""
    import re

    from vgf_prob.rl import gym_generate
    from vgf_prob.rl.d4rl import load_d4rl_hdf5

    if re.fullmatch(gym_generate.NAME_PATTERN, dataset):
        path = gym_generate.ensure_gym_dataset(dataset, episodes, data_seed)
        return load_d4rl_hdf5(path, env_name=dataset), dataset
    if env_name is None:
        raise ValueError(f"{dataset!r} is not a generated dataset name; give its HDF5 file with --env <environment>")
    return load_d4rl_hdf5(dataset, env_name=env_name), env_name


def columns() -> tuple[str, ...]:
    """A peer row's columns: VGF's eval.csv (``step`` and the result-row schema), then ``seed``, ``train_cpu_s``."""
    from vgf_prob.rl.evaluate import ROW_COLUMNS

    return ("step", *ROW_COLUMNS, "seed", "train_cpu_s")


class _RowFile:
    """``eval.csv`` in `columns` order, one row appended (and flushed) as each evaluation finishes."""

    def __init__(self, path: Path) -> None:
        self.path, self.columns = path, columns()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(self.columns)

    def __call__(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(["" if row[k] is None else row[k] for k in self.columns])
        print(f"{row['policy']} seed {row['seed']} step {row['step']}: score {row['score']:.1f} ± "
              f"{row['score_std']:.1f}, {row['train_cpu_s']:.1f} CPU s", flush=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vgf_prob.rl.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="reacher-mixed-v0", help="generated dataset name or HDF5 file")
    parser.add_argument("--env", help="environment of an HDF5 file (generated names know theirs)")
    parser.add_argument("--episodes", type=int, default=200, help="episodes of a generated dataset (default 200)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of a generated dataset (default 0)")
    parser.add_argument("--algos", nargs="+", choices=list(PEER_SETTINGS), default=["iql", "td3+bc", "awac"])
    parser.add_argument("--steps", type=int, default=3000, help="gradient steps (default 3000)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default: only at the end)")
    parser.add_argument("--eval-episodes", type=int, default=50, help="episodes per evaluation (default 50)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; episodes seeded alike")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="encoder units (default 128 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/peers"), help="folder for eval.csv and summary.json")
    args = parser.parse_args(argv)
    try:
        dataset, env_name = load_dataset(args.dataset, args.episodes, args.data_seed, args.env)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    torch.set_num_threads(args.threads)
    quiet_d3rlpy()
    write = _RowFile(args.out / "eval.csv")
    rows = []
    for name in args.algos:
        for seed in args.seeds:
            rows += train_peer(name, dataset, env_name, args.steps, args.eval_every or args.steps,
                               args.eval_episodes, seed, tuple(args.hidden), on_row=write)  # fmt: skip
    summary = {"dataset": args.dataset, "env_name": env_name, "transitions": len(dataset), "steps": args.steps,
               "hidden": args.hidden, "settings": {k: PEER_SETTINGS[k] for k in args.algos}, "rows": rows}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {write.path} and {args.out / 'summary.json'}")
    return 0


def quiet_d3rlpy() -> None:
    """d3rlpy logs every fit's setup through structlog at INFO; keep warnings only."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
