"""D4RL-format offline datasets generated from gymnasium MuJoCo environments with a scripted behaviour policy.

One task for now, **reacher** (gymnasium ``Reacher-v5``: a two-link arm moves its fingertip to a random
target; 50-step episodes, no termination; reward per step ``-||fingertip - target|| - 0.1 ||a||^2``).

Behaviour. The expert is a scripted controller: inverse kinematics of the two links (lengths
``l1 = 0.1``, ``l2 = 0.11``) gives the joint angles ``q*`` that put the fingertip on the target (of the two
elbow solutions, the one nearer the current angles), and a PD law drives the joints there,
``a = clip(kp * wrap(q* - q) - kd * dq, -1, 1)`` with ``kp = 0.35``, ``kd = 0.06`` (the best of a grid,
`EXPERT_GAINS`). A dataset corrupts it per step: a constant ``bias`` and Gaussian noise of std ``sigma``
are added to the expert's action (then clipped to the box), and with probability ``epsilon`` a substitute
action takes its place: a uniform random one ``U([-1, 1]^2)``, or with ``spin`` the constant ``(1, 1)``
(full torque on both joints, which spins the arm). `DATASETS` names the settings: ``reacher-expert-v0``
(clean), ``reacher-noisy-v0`` (sigma 0.4), ``reacher-mixed-v0`` (epsilon 0.5), ``reacher-random-v0``
(epsilon 1), and two whose mean action is poor, made for the search for a main job
(benchmarks/main_job_search.md): ``reacher-spin-v0`` (the expert or the spin, 1/2 each: two far-apart
modes, mean action score 47, behaviour -101) and ``reacher-biased-v0`` (expert + (0.5, -0.5) + N(0, 0.1^2):
better actions lie just outside the data, behaviour about 80).

Score (as D4RL scores its tasks): ``100 (R - R_random) / (R_expert - R_random)`` with ``R`` an episode's
return and `REF_RETURNS` the mean returns of the uniform random policy and of the scripted expert over
the 1000 episodes seeded 10**6 + k (`reference_returns` recomputes them), so 0 is random play and 100 the
scripted expert.

File (what `vgf_prob.rl.d4rl.load_d4rl_hdf5` reads): ``observations``, ``actions``, ``next_observations``
(float32), ``rewards`` (float32), ``terminals`` (bool, all 0: Reacher never terminates), ``timeouts``
(bool, 1 at each episode's last step) and ``metadata/*`` (settings, versions, the behaviour's mean return
and score). Episode ``i`` resets the environment and draws its noise from ``SeedSequence([seed, i])``.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

GYM_ID = "Reacher-v5"
LINKS = (0.1, 0.11)
EXPERT_GAINS = (0.35, 0.06)
REF_SEED = 10**6
REF_EPISODES = 1000
# (random, expert) mean returns over REF_EPISODES episodes seeded REF_SEED + k, as `reference_returns()` printed
# (-42.5138, -3.6312) with gymnasium 1.4.0 and mujoco 4.0.0.
REF_RETURNS: dict[str, tuple[float, float]] = {"reacher": (-42.5138, -3.6312)}
DATASETS: dict[str, dict[str, Any]] = {  # name -> Behaviour's arguments
    "expert": {"epsilon": 0.0}, "noisy": {"epsilon": 0.0, "sigma": 0.4}, "mixed": {"epsilon": 0.5},
    "random": {"epsilon": 1.0}, "spin": {"epsilon": 0.5, "spin": True},
    "biased": {"epsilon": 0.0, "sigma": 0.1, "bias": (0.5, -0.5)},
}
NAME_PATTERN = r"reacher-(expert|noisy|mixed|random|spin|biased)-v0"


@dataclass(frozen=True)
class Behaviour:
    """clip(expert + bias + N(0, sigma^2)), replaced w.p. ``epsilon`` by U([-1, 1]^2) (or by (1, 1) with ``spin``)."""

    epsilon: float
    sigma: float = 0.0
    kp: float = EXPERT_GAINS[0]
    kd: float = EXPERT_GAINS[1]
    spin: bool = False
    bias: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {self.epsilon}")
        if not self.sigma >= 0.0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # every draw happens every step, so the random stream does not depend on epsilon or sigma
        random_action = rng.uniform(-1.0, 1.0, size=2)
        noise = rng.standard_normal(2)
        if rng.random() < self.epsilon:
            return np.ones(2) if self.spin else random_action
        return np.clip(reacher_expert(obs, self.kp, self.kd) + np.asarray(self.bias) + self.sigma * noise, -1.0, 1.0)


def reacher_expert(obs: np.ndarray, kp: float = EXPERT_GAINS[0], kd: float = EXPERT_GAINS[1]) -> np.ndarray:
    """The scripted Reacher-v5 controller: IK to the target, then ``clip(kp * wrap(q* - q) - kd * dq, -1, 1)``.

    Reacher-v5 observations: ``cos q (2), sin q (2), target x, y, dq (2), fingertip - target (x, y)``.
    For a target at distance d the elbow angle is ``q1* = +-arccos((d^2 - l1^2 - l2^2) / (2 l1 l2))``
    (clipped to reachable) and ``q0* = atan2(y, x) - atan2(l2 sin q1*, l1 + l2 cos q1*)``.
    """
    obs = np.asarray(obs, dtype=np.float64)
    if obs.shape != (10,):
        raise ValueError(f"reacher_expert expects one Reacher-v5 observation of shape (10,), got {obs.shape}")
    l1, l2 = LINKS
    q = np.arctan2(obs[2:4], obs[0:2])
    x, y = obs[4], obs[5]
    cos_elbow = np.clip((x * x + y * y - l1 * l1 - l2 * l2) / (2 * l1 * l2), -1.0, 1.0)
    best = None
    for sign in (1.0, -1.0):
        elbow = sign * np.arccos(cos_elbow)
        shoulder = np.arctan2(y, x) - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
        error = _wrap(np.array([shoulder, elbow]) - q)
        if best is None or np.abs(error).sum() < np.abs(best).sum():
            best = error
    return np.clip(kp * best - kd * obs[6:8], -1.0, 1.0)


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def dataset_behaviour(name: str) -> Behaviour:
    """``'reacher-noisy-v0'`` -> ``Behaviour(epsilon=0, sigma=0.4)`` (`DATASETS`); raises for other names."""
    match = re.fullmatch(NAME_PATTERN, name)
    if match is None:
        raise ValueError(f"unknown generated dataset {name!r}; known: {', '.join(f'reacher-{k}-v0' for k in DATASETS)}")
    return Behaviour(**DATASETS[match.group(1)])


def normalized_score(env_name: str, returns: Any) -> np.ndarray:
    """``100 (R - R_random) / (R_expert - R_random)`` with `REF_RETURNS` of ``env_name``'s task."""
    family = env_name.split("-")[0]
    if family not in REF_RETURNS:
        raise ValueError(f"no reference returns for {env_name!r}; known tasks: {sorted(REF_RETURNS)}")
    r_random, r_expert = REF_RETURNS[family]
    return 100.0 * (np.asarray(returns, dtype=np.float64) - r_random) / (r_expert - r_random)


def _make_env() -> Any:
    import gymnasium as gym

    return gym.make(GYM_ID)


def rollout(policy: Any, env: Any, seed: int) -> dict[str, np.ndarray]:
    """One episode of ``policy(obs, rng)`` reset with ``seed`` (its noise from the same seed)."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    steps: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "next_observations")}
    while True:
        action = np.asarray(policy(obs, rng), dtype=np.float64)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(steps, (obs, action, reward, next_obs), strict=True):
            steps[key].append(value)
        obs = next_obs
        if terminated or truncated:
            break
    out = {k: np.asarray(v) for k, v in steps.items()}
    out["terminated"] = np.zeros(len(out["rewards"]), dtype=bool)
    out["terminated"][-1] = terminated
    return out


def reference_returns(episodes: int = REF_EPISODES, seed: int = REF_SEED) -> tuple[float, float]:
    """Mean returns of the uniform random policy and the scripted expert over episodes seeded ``seed + k``."""
    env = _make_env()
    means = []
    for policy in (Behaviour(1.0), Behaviour(0.0)):
        means.append(float(np.mean([rollout(policy, env, seed + k)["rewards"].sum() for k in range(episodes)])))
    env.close()
    return means[0], means[1]


def generate_gym_dataset(name: str, num_episodes: int, out: str | os.PathLike, seed: int = 0) -> Path:
    """Roll out ``name``'s behaviour for ``num_episodes`` episodes and write the D4RL-format HDF5 ``out``.

    Written atomically (a temporary file renamed into place). Returns the path.
    """
    import h5py

    behaviour = dataset_behaviour(name)
    if isinstance(num_episodes, bool) or not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes must be a positive int, got {num_episodes!r}")
    env = _make_env()
    started = time.perf_counter()
    episodes = []
    for i in range(num_episodes):
        episode_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        episodes.append(rollout(behaviour, env, episode_seed))
    env.close()
    returns = np.array([ep["rewards"].sum() for ep in episodes])
    timeouts = np.concatenate([np.arange(len(ep["rewards"])) == len(ep["rewards"]) - 1 for ep in episodes])
    terminals = np.concatenate([ep["terminated"] for ep in episodes])
    timeouts &= ~terminals
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for key in ("observations", "actions", "next_observations", "rewards"):
                f[key] = np.concatenate([ep[key] for ep in episodes]).astype(np.float32)
            f["terminals"] = terminals
            f["timeouts"] = timeouts
            meta = {
                "name": name, "gym_id": GYM_ID, "episodes": num_episodes, "seed": seed,
                "epsilon": behaviour.epsilon, "sigma": behaviour.sigma, "spin": behaviour.spin,
                "bias": np.asarray(behaviour.bias),
                "expert_kp": behaviour.kp, "expert_kd": behaviour.kd,
                "behaviour_mean_return": float(returns.mean()),
                "behaviour_score": float(normalized_score(name, returns).mean()),
                "seconds": time.perf_counter() - started,
                "gymnasium_version": version("gymnasium"), "mujoco_version": version("mujoco"),
            }  # fmt: skip
            for key, value in meta.items():
                f[f"metadata/{key}"] = value
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def default_cache_dir() -> Path:
    """``$VGF_PROB_CACHE/gym`` when set, else ``~/.cache/vgf-prob/gym``."""
    root = os.environ.get("VGF_PROB_CACHE")
    return (Path(root) if root else Path("~/.cache/vgf-prob")).expanduser() / "gym"


def ensure_gym_dataset(
    name: str, num_episodes: int, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The cached ``<cache_dir>/ep<episodes>-seed<seed>/<name>.hdf5``, generated first when absent.

    The file keeps the dataset's name, so ``vgf-prob train --dataset <file>`` knows its environment.
    """
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path = root / f"ep{num_episodes}-seed{seed}" / f"{name}.hdf5"
    if not path.is_file():
        generate_gym_dataset(name, num_episodes, path, seed)
    return path


__all__ = [
    "DATASETS",
    "EXPERT_GAINS",
    "NAME_PATTERN",
    "REF_RETURNS",
    "Behaviour",
    "dataset_behaviour",
    "ensure_gym_dataset",
    "generate_gym_dataset",
    "normalized_score",
    "reacher_expert",
    "reference_returns",
]
