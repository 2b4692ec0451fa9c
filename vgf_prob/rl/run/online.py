"""Offline-to-online fine-tuning: the environment side of the loop (`vgf_prob.rl.run.trainer.finetune`).

Each training step first takes one environment step with ``agent.explore`` (best-of-N from the reference)
and appends the transition to the offline buffer. An environment's internal state cannot be checkpointed
in general, so an episode in progress at a checkpoint step is cut there (stored as a time-limit truncation:
mask 1) and the next step starts a new episode seeded by the episode counter. The uninterrupted run does
the same at its checkpoint steps, so a resumed fine-tuning run equals the uninterrupted one; a run stopped
by a signal cuts its episode at the step it stopped, which the uninterrupted run does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgf_prob.rl.checkpoint import CheckpointError, config_mismatch, load_checkpoint, resolve_checkpoint
from vgf_prob.rl.config import VGFConfig
from vgf_prob.rl.envs import make_env
from vgf_prob.rl.offline_dataset import OfflineDataset


class Online:
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

    def cut(self) -> None:
        """End the episode in progress at this step (a run stopped by a signal): the next step resets."""
        self.needs_reset = True

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


def online_reward_transform(
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


def load_initial_agent(agent: Any, path: str | Path, config: VGFConfig) -> None:
    payload = load_checkpoint(resolve_checkpoint(path))
    diff = config_mismatch(payload["config"], config.to_dict())
    if diff:
        raise CheckpointError(f"{path} was trained with another config: " + "; ".join(diff))
    agent.load_training_state(payload["agent"])
