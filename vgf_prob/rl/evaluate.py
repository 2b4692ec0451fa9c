"""Policy evaluation in the real environments of D4RL and OGBench.

`make_env` turns a benchmark name into a gymnasium environment whose observations match the dataset's
(`ENV_FAMILIES` holds the whole mapping). `evaluate` runs full episodes with a torch ``act_fn``, many
environments in lockstep so that one ``act_fn`` call serves a batch of them; episode ``k`` always
resets with seed ``seed + k``, so results do not depend on how many environments run at once.
`budget_sweep` evaluates one checkpoint at several transport budgets (e.g. test-time flow steps).
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from io import StringIO
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from vgf_prob.rl.env_warnings import quiet_env_warnings

ActFn = Callable[[Tensor], Tensor]

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
    "reacher": EnvFamily("d4rl", r"reacher-(expert|noisy|mixed|random)-v0", "Reacher-v5", obs_dim=10),
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
    limit = max_episode_steps or family.max_episode_steps
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


@dataclass
class EvalResult:
    """Per-episode outcomes of `evaluate` and their summaries.

    ``score`` is the mean D4RL normalised score for D4RL tasks with reference returns, the success rate
    in % for OGBench, else the mean return (``score_kind`` says which); ``score_std`` is its standard
    deviation over episodes (population std, like ``mean_return``/``std_return``). ``wall_time``
    covers the episodes, not making the environments.
    """

    env_name: str
    returns: np.ndarray
    lengths: np.ndarray
    successes: np.ndarray | None
    normalized_scores: np.ndarray | None
    wall_time: float

    @property
    def num_episodes(self) -> int:
        return len(self.returns)

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std_return(self) -> float:
        return float(np.std(self.returns))

    @property
    def success_rate(self) -> float | None:
        """Percentage of successful episodes, or None where the environment reports no success."""
        return None if self.successes is None else 100.0 * float(np.mean(self.successes))

    @property
    def score_kind(self) -> Literal["d4rl_normalized", "success_rate", "return"]:
        if self.normalized_scores is not None:
            return "d4rl_normalized"
        return "return" if self.successes is None else "success_rate"

    @property
    def _per_episode_score(self) -> np.ndarray:
        kind = self.score_kind
        if kind == "d4rl_normalized":
            return self.normalized_scores
        return self.returns if kind == "return" else 100.0 * self.successes.astype(np.float64)

    @property
    def score(self) -> float:
        return float(np.mean(self._per_episode_score))

    @property
    def score_std(self) -> float:
        return float(np.std(self._per_episode_score))

    @property
    def env_steps_per_second(self) -> float:
        return float(np.sum(self.lengths)) / max(self.wall_time, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with the per-episode lists."""
        return {
            "env_name": self.env_name,
            "num_episodes": self.num_episodes,
            "score": self.score,
            "score_std": self.score_std,
            "score_kind": self.score_kind,
            "mean_return": self.mean_return,
            "std_return": self.std_return,
            "success_rate": self.success_rate,
            "mean_length": float(np.mean(self.lengths)),
            "wall_time": self.wall_time,
            "env_steps_per_second": self.env_steps_per_second,
            "returns": self.returns.tolist(),
            "lengths": self.lengths.tolist(),
            "successes": None if self.successes is None else self.successes.tolist(),
            "normalized_scores": None if self.normalized_scores is None else self.normalized_scores.tolist(),
        }


def evaluate(
    act_fn: ActFn,
    env_name: str,
    num_episodes: int = 10,
    seed: int = 0,
    max_episode_steps: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    num_envs: int | None = None,
    envs: Sequence[gym.Env] | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    label: str | None = None,
) -> EvalResult:
    """Run ``num_episodes`` full episodes of ``act_fn`` in ``env_name``'s environment.

    ``act_fn`` maps float32 observations ``[n, O]`` (on ``device``) to actions ``[n, A]``; they are
    clipped to the action box. ``num_envs`` new environments (default ``min(num_episodes, 10)``; 1 is
    the sequential loop), or the given ``envs`` from `make_envs`, step in lockstep and share each
    ``act_fn`` call. Episode ``k`` resets with seed ``seed + k`` (goal-conditioned OGBench names also
    cycle through the evaluation tasks). ``max_episode_steps`` and ``env_kwargs`` go to `make_env`, so
    they must be None when ``envs`` is given. ``act_fn`` runs with autograd enabled: a value-gradient
    flow differentiates its critic at acting time. ``progress`` shows a bar of finished episodes named
    by ``label`` (the policy and its budget, e.g. ``"VGF L_test=3"``; default: the environment name).
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    _, family = resolve_env_name(env_name)
    if envs is None:
        num_envs = num_envs or min(num_episodes, 10)
        envs = make_envs(env_name, num_envs, max_episode_steps=max_episode_steps, **(env_kwargs or {}))
    elif max_episode_steps is not None or env_kwargs is not None:
        raise ValueError("max_episode_steps/env_kwargs apply to environments made here; give them to make_envs")
    start = time.perf_counter()
    cycle_tasks = family.suite == "ogbench" and "singletask" not in env_name.split("-")
    bar_label = label or f"eval {env_name}"
    returns, lengths, successes = _run_episodes(
        act_fn, envs, env_name, num_episodes, seed, device, progress and bar_label, cycle_tasks
    )
    wall_time = time.perf_counter() - start
    return EvalResult(
        env_name=env_name,
        returns=returns,
        lengths=lengths,
        successes=successes if family.reports_success else None,
        normalized_scores=_normalized_scores(env_name, returns) if family.suite == "d4rl" else None,
        wall_time=wall_time,
    )


def _run_episodes(
    act_fn: ActFn,
    envs: Sequence[gym.Env],
    env_name: str,
    num_episodes: int,
    seed: int,
    device: torch.device | str | None,
    progress: str | bool,
    cycle_tasks: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lockstep episode loop: each free environment takes the next episode index until all are done.

    ``progress``: the progress bar's label, or False for none. The bar counts finished episodes and shows
    elapsed and remaining time only (no rate: episodes finish in bursts when environments run in lockstep).
    ``cycle_tasks``: episode ``k`` resets with ``options={"task_id": k % num_tasks + 1}`` (OGBench's
    goal-conditioned environments otherwise draw the task from numpy's global generator).
    """
    from tqdm.auto import tqdm

    returns = np.zeros(num_episodes)
    lengths = np.zeros(num_episodes, dtype=np.int64)
    successes = np.zeros(num_episodes, dtype=bool)
    episode_of: dict[int, int] = {}  # environment slot -> episode it is running
    obs: dict[int, np.ndarray] = {}
    queue = iter(range(num_episodes))

    def start_next(slot: int) -> None:
        k = next(queue, None)
        if k is None:
            return
        env = envs[slot]
        options = {"task_id": k % env.unwrapped.num_tasks + 1} if cycle_tasks else None
        obs[slot], _ = env.reset(seed=seed + k, options=options)
        episode_of[slot] = k

    for slot in range(len(envs)):
        start_next(slot)
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} episodes [{elapsed}<{remaining}]"
    with tqdm(total=num_episodes, desc=progress or "", disable=not progress, unit="episode",
              bar_format=bar_format, dynamic_ncols=True) as bar:  # fmt: skip
        while episode_of:
            slots = sorted(episode_of)
            batch = torch.as_tensor(np.stack([obs[s] for s in slots]), dtype=torch.float32, device=device)
            actions = act_fn(batch)
            space = envs[slots[0]].action_space
            if not isinstance(actions, Tensor) or actions.shape != (len(slots), *space.shape):
                got = tuple(actions.shape) if isinstance(actions, Tensor) else type(actions).__name__
                raise ValueError(f"act_fn must return a Tensor of shape {(len(slots), *space.shape)}, got {got}")
            actions = np.clip(actions.detach().to("cpu", torch.float64).numpy(), space.low, space.high)
            for row, slot in enumerate(slots):
                k = episode_of[slot]
                obs[slot], reward, terminated, truncated, info = envs[slot].step(actions[row])
                returns[k] += float(reward)
                lengths[k] += 1
                successes[k] = bool(info.get("success", False))
                if terminated or truncated:
                    del episode_of[slot]
                    bar.update(1)
                    start_next(slot)
    return returns, lengths, successes


def _normalized_scores(env_name: str, returns: np.ndarray) -> np.ndarray | None:
    """Per-episode D4RL normalised scores, or None for a family without reference returns (ant).

    Generated datasets (`vgf_prob.rl.gym_generate`) use their own random / scripted-expert references.
    """
    from vgf_prob.rl import gym_generate
    from vgf_prob.rl.data import d4rl_normalized_score

    if re.fullmatch(gym_generate.NAME_PATTERN, env_name):
        return gym_generate.normalized_score(env_name, returns)
    try:
        return np.asarray(d4rl_normalized_score(env_name, returns), dtype=np.float64)
    except ValueError:
        return None


def budget_sweep(
    make_act_fn: Callable[[Any], ActFn],
    env_name: str,
    budgets: Sequence[Any],
    num_episodes: int = 10,
    seed: int = 0,
    max_episode_steps: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    num_envs: int | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    policy_name: str = "VGF",
) -> list[dict[str, Any]]:
    """Evaluate ``make_act_fn(b)`` for each budget ``b`` on the same environments and episode seeds.

    A budget is anything ``make_act_fn`` accepts (an int L_test, a `vgf_prob.budget` object, ...).
    Progress bars read ``"<policy_name> budget=<b>"``; int budgets ``"<policy_name> L_test=<b>"``, and 0 (no
    flow step: the reference's best sample) ``"best-of-N L_test=0"``.
    Other arguments as in `evaluate`. Returns one row per budget:
    ``budget, score, std, episodes, mean_return, return_std, score_kind, wall_time`` (stds over episodes).
    """
    num_envs = num_envs or min(num_episodes, 10)
    envs = make_envs(env_name, num_envs, max_episode_steps=max_episode_steps, **(env_kwargs or {}))
    rows = []
    for budget in budgets:
        if isinstance(budget, int):
            label = "best-of-N L_test=0" if budget == 0 else f"{policy_name} L_test={budget}"
        else:
            label = f"{policy_name} budget={budget}"
        result = evaluate(
            make_act_fn(budget), env_name, num_episodes, seed, progress=progress, device=device, envs=envs,
            label=label,
        )
        rows.append(
            {
                "budget": budget,
                "score": result.score,
                "std": result.score_std,
                "episodes": result.num_episodes,
                "mean_return": result.mean_return,
                "return_std": result.std_return,
                "score_kind": result.score_kind,
                "wall_time": result.wall_time,
            }
        )
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], title: str | None = None, print_table: bool = True) -> str:
    """Render ``rows`` (e.g. from `budget_sweep`) as a rich table; print it and return it as plain text."""
    from rich.console import Console
    from rich.table import Table

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    if print_table:
        Console().print(table)
    buffer = StringIO()
    Console(file=buffer, width=max(80, 14 * len(columns)), no_color=True, color_system=None).print(table)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | np.floating):
        return f"{value:.2f}"
    return str(value)
