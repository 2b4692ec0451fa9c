"""The benchmark environments: a D4RL or OGBench name -> a gymnasium environment whose observations match the data.

`ENV_FAMILIES` holds the whole mapping (one `EnvFamily` per family of names); `make_env` / `make_envs` build
environments from a name and `resolve_env_name` says which family a name belongs to. Evaluation
(`vgf_prob.rl.evaluate`) and fine-tuning (`vgf_prob.rl.run.online`) both make their environments here.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from vgf_prob.rl.env_warnings import quiet_env_warnings

# D4RL's antmaze-*-v2 evaluation mazes (d4rl.locomotion.maze_env *_TEST maps): start cell "r", goal "g".
# Rows run along +y in D4RL but along -y in gymnasium-robotics, so `_d4rl_maze` flips them.
_U_MAZE = ["11111", "1r001", "11101", "1g001", "11111"]
_MEDIUM_MAZE = ["11111111", "1r011001", "10010001", "11000111", "10010001", "10100101", "100010g1", "11111111"]
_LARGE_MAZE = [
    "111111111111",
    "1r0001000001",
    "101101010101",
    "100000010001",
    "101111011101",
    "100101000001",
    "110101010111",
    "100100010g01",
    "111111111111",
]


def _d4rl_maze(rows: list[str]) -> list[list[int | str]]:
    """A D4RL maze as a gymnasium-robotics ``maze_map`` (rows flipped so both share the +y direction)."""
    return [[int(c) if c.isdigit() else c for c in row] for row in reversed(rows)]


class _ZeroPadObservation(gym.ObservationWrapper):
    """Append zeros up to ``dim`` entries (D4RL ant-v2 stores 84 contact forces that are always 0)."""

    def __init__(self, env: gym.Env, dim: int) -> None:
        super().__init__(env)
        self._pad = dim - env.observation_space.shape[0]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float64)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.concatenate([observation, np.zeros(self._pad)])


class _D4RLAntMazeObservation(gym.ObservationWrapper):
    """gymnasium-robotics AntMaze dict -> D4RL's flat ``[x, y, qpos[2:], qvel]`` with the start cell at 0."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._origin = np.asarray(env.unwrapped.maze.unique_reset_locations[0], dtype=np.float64)
        dim = 2 + env.observation_space["observation"].shape[0]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float64)

    def observation(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([observation["achieved_goal"] - self._origin, observation["observation"]])


@dataclass(frozen=True)
class EnvFamily:
    """How the benchmark names matching ``pattern`` become a gymnasium environment.

    ``gym_id`` None means OGBench derives the id from the name (``ogbench.make_env_and_datasets``).
    ``obs_dim`` is the dataset's observation size, checked when the environment is made.
    ``max_episode_steps`` overrides the registered time limit where the benchmark's differs.
    ``requires`` names the package (import name, pip name) that registers ``gym_id``.
    ``reports_success``: the final step's ``info['success']`` is the episode's success flag.
    """

    suite: Literal["d4rl", "ogbench"]
    pattern: str
    gym_id: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    obs_dim: int | None = None
    max_episode_steps: int | None = None
    requires: tuple[str, str] | None = None
    wrapper: Callable[[gym.Env], gym.Env] | None = None
    reports_success: bool = False


_LOCO = r"-(random|medium|expert|medium-replay|medium-expert|full-replay)-v[0-2]"
_ROBOTICS = ("gymnasium_robotics", "gymnasium-robotics")
_ANTMAZE = dict(continuing_task=False, reset_target=False)

ENV_FAMILIES: dict[str, EnvFamily] = {
    "hopper": EnvFamily("d4rl", "hopper" + _LOCO, "Hopper-v5", obs_dim=11),
    "halfcheetah": EnvFamily("d4rl", "halfcheetah" + _LOCO, "HalfCheetah-v5", obs_dim=17),
    # walker2d.xml is the v2-v4 model (feet frictions 1.9 / 0.9); Walker2d-v5's default model changed them.
    "walker2d": EnvFamily("d4rl", "walker2d" + _LOCO, "Walker2d-v5", {"xml_file": "walker2d.xml"}, obs_dim=17),
    # ant-v2's 111 = 27 positions/velocities + 84 contact forces that mujoco-py 2 never filled in (all
    # zero, so no contact cost either): reproduce that instead of Ant-v5's live 78 forces.
    "ant": EnvFamily(
        "d4rl",
        "ant" + _LOCO,
        "Ant-v5",
        {"include_cfrc_ext_in_observation": False, "contact_cost_weight": 0.0},
        obs_dim=111,
        wrapper=lambda env: _ZeroPadObservation(env, 111),
    ),
    "antmaze-umaze": EnvFamily(
        "d4rl", r"antmaze-umaze(-diverse)?-v[0-2]", "AntMaze_UMaze-v4", {**_ANTMAZE, "maze_map": _d4rl_maze(_U_MAZE)},
        obs_dim=29, max_episode_steps=700, requires=_ROBOTICS, wrapper=_D4RLAntMazeObservation, reports_success=True,
    ),
    "antmaze-medium": EnvFamily(
        "d4rl", r"antmaze-medium-(play|diverse)-v[0-2]", "AntMaze_Medium-v4",
        {**_ANTMAZE, "maze_map": _d4rl_maze(_MEDIUM_MAZE)},
        obs_dim=29, max_episode_steps=1000, requires=_ROBOTICS, wrapper=_D4RLAntMazeObservation, reports_success=True,
    ),
    "antmaze-large": EnvFamily(
        "d4rl", r"antmaze-large-(play|diverse)-v[0-2]", "AntMaze_Large-v4",
        {**_ANTMAZE, "maze_map": _d4rl_maze(_LARGE_MAZE)},
        obs_dim=29, max_episode_steps=1000, requires=_ROBOTICS, wrapper=_D4RLAntMazeObservation, reports_success=True,
    ),
    "pen": EnvFamily("d4rl", r"pen-(human|cloned|expert)-v[01]", "AdroitHandPen-v1", obs_dim=45,
                     max_episode_steps=100, requires=_ROBOTICS),
    "door": EnvFamily("d4rl", r"door-(human|cloned|expert)-v[01]", "AdroitHandDoor-v1", obs_dim=39,
                      max_episode_steps=200, requires=_ROBOTICS),
    "hammer": EnvFamily("d4rl", r"hammer-(human|cloned|expert)-v[01]", "AdroitHandHammer-v1", obs_dim=46,
                        max_episode_steps=200, requires=_ROBOTICS),
    "relocate": EnvFamily("d4rl", r"relocate-(human|cloned|expert)-v[01]", "AdroitHandRelocate-v1", obs_dim=39,
                          max_episode_steps=200, requires=_ROBOTICS),
    # Data generated by vgf_prob.rl.gym_generate (scripted behaviour), scored against its own reference returns.
    "reacher": EnvFamily("d4rl", r"reacher-[a-z]+-v0", "Reacher-v5", obs_dim=10),
    # Any OGBench dataset name, e.g. cube-single-play-singletask-task1-v0 or puzzle-3x3-play-v0.
    "ogbench": EnvFamily(
        "ogbench",
        r"(visual-)?(cube|scene|puzzle|pointmaze|antmaze|humanoidmaze|antsoccer|powderworld)-[a-z0-9-]+-v\d+",
        reports_success=True,
    ),
}
"""Benchmark name -> gymnasium environment, tried in order (D4RL antmaze names before OGBench's).

D4RL tasks map to gymnasium's MuJoCo v5 locomotion (the d4rl package needs mujoco-py and cannot be
installed on Python >= 3.11) and to gymnasium-robotics for antmaze and Adroit; the datasets that
`vgf_prob.rl.gym_generate` makes (``reacher-noisy-v0``, ...) to their gymnasium env; OGBench names go
through ``ogbench.make_env_and_datasets(name, env_only=True)`` (no dataset is touched). OGBench >= 1.2
counts singletask success on the pre-action state; pass ``success_timing="post"`` to `make_env` to
restore the 1.1 timing of published numbers.
"""


def resolve_env_name(env_name: str) -> tuple[str, EnvFamily]:
    """The `ENV_FAMILIES` entry (key, family) whose pattern matches ``env_name``; ValueError if none."""
    for key, family in ENV_FAMILIES.items():
        if re.fullmatch(family.pattern, env_name):
            return key, family
    raise ValueError(
        f"unknown environment {env_name!r}; expected a D4RL name (hopper/halfcheetah/walker2d/ant-<dataset>-v2, "
        f"antmaze-<maze>[-<type>]-v2, pen/door/hammer/relocate-<dataset>-v1) or an OGBench dataset name "
        f"(e.g. cube-single-play-singletask-task1-v0); families: {', '.join(ENV_FAMILIES)}"
    )


def make_env(env_name: str, seed: int | None = None, max_episode_steps: int | None = None, **env_kwargs: Any) -> gym.Env:
    """A gymnasium environment for a D4RL or OGBench name (see `ENV_FAMILIES`).

    ``seed`` resets the environment once with it and seeds its action space. ``max_episode_steps``
    replaces the time limit; ``env_kwargs`` go to the environment's constructor.
    """
    key, family = resolve_env_name(env_name)
    if max_episode_steps is not None and max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be at least 1, got {max_episode_steps!r}")
    limit = family.max_episode_steps if max_episode_steps is None else max_episode_steps
    make_kwargs = {} if limit is None else {"max_episode_steps": limit}
    with quiet_env_warnings():
        env = _make(env_name, family, make_kwargs, env_kwargs)
        if family.suite == "ogbench":
            env = _QuietOGBench(env)
    if family.obs_dim is not None and env.observation_space.shape != (family.obs_dim,):
        raise RuntimeError(
            f"{env_name!r} ({key} family) gives observations of shape {env.observation_space.shape}, "
            f"expected ({family.obs_dim},) as in the dataset"
        )
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


class _QuietOGBench(gym.Wrapper):
    """OGBench's manipulation envs build a new float64-bounded ``Box`` (and gymnasium warns) each time their
    action space is read, also inside ``step``: keep one copy, and step and reset under `quiet_env_warnings`."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = env.action_space

    def step(self, action: Any) -> Any:
        with quiet_env_warnings():
            return self.env.step(action)

    def reset(self, **kwargs: Any) -> Any:
        with quiet_env_warnings():
            return self.env.reset(**kwargs)


def _make(env_name: str, family: EnvFamily, make_kwargs: dict[str, Any], env_kwargs: Mapping[str, Any]) -> gym.Env:
    """The bare environment of ``family`` (OGBench's factory or ``gym.make``), wrapped as the family says."""
    if family.suite == "ogbench":
        import ogbench

        try:
            env = ogbench.make_env_and_datasets(env_name, env_only=True, **make_kwargs, **env_kwargs)
        except gym.error.Error as err:
            raise ValueError(f"OGBench has no environment for {env_name!r}: {err}") from err
    else:
        if family.requires is not None:
            module, pip_name = family.requires
            try:
                gym.register_envs(importlib.import_module(module))
            except ImportError as err:
                raise ImportError(f"{env_name!r} needs the {pip_name!r} package: pip install {pip_name}") from err
        env = gym.make(family.gym_id, **make_kwargs, **{**family.kwargs, **env_kwargs})
        if family.wrapper is not None:
            env = family.wrapper(env)
    return env


def make_envs(env_name: str, num_envs: int, max_episode_steps: int | None = None, **env_kwargs: Any) -> list[gym.Env]:
    """``num_envs`` independent copies of `make_env` (to reuse across `evaluate` calls via ``envs=``)."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    return [make_env(env_name, max_episode_steps=max_episode_steps, **env_kwargs) for _ in range(num_envs)]
