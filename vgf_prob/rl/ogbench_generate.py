"""Generate OGBench manipulation 'play' datasets with the scripted plan oracles shipped in ogbench.

The procedure is ogbench's own ``data_gen_scripts/generate_manipspace.py`` (``dataset_type='play'``):
the environment is made with ``terminate_at_goal=False, mode='data_collection',
max_episode_steps=episode_length``; a `PlanOracle` per subtask type (noise 0.1, noise smoothing 0.5;
puzzle: buttons only, gripper always closed) is picked by ``info['privileged/target_task']``; when it
reports done, ``env.unwrapped.set_new_target(p_stack=...)`` draws the next target and that oracle is
reset. ``p_stack`` is drawn per episode: 0 (cube-single), U(0, 0.25) (double), U(0.05, 0.35) (triple),
U(0.1, 0.5) (quadruple), U(0, 0.35) (octuple), 0.5 otherwise. Actions are clipped to [-1, 1]. Scene
episodes in which the cube leaves the visible area are regenerated (ogbench's health check).

Files: ``<out_dir>/<env>-play-vK.npz`` and ``...-val.npz`` with ``observations`` (float32), ``actions``
(float32), ``terminals`` (bool, 1 at each episode's last step), ``qpos``/``qvel`` (float32, the state
*before* each step, i.e. of ``observations``) and ``button_states`` (int64, scene/puzzle): exactly what
``ogbench.load_dataset`` reads. A ``.json`` sidecar records the settings and the oracle statistics.
Seeding: episode ``i`` resets the environment and numpy's global RNG (which the oracles use) with a seed
drawn from ``SeedSequence([seed, i])``, so a file depends on ``seed`` only, not on ``num_workers``; an
in-process run restores numpy's global RNG afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

NOISE = 0.1
NOISE_SMOOTHING = 0.5
_P_STACK_RANGES = {"single": (0.0, 0.0), "double": (0.0, 0.25), "triple": (0.05, 0.35),
                   "quadruple": (0.1, 0.5), "octuple": (0.0, 0.35)}  # fmt: skip


def play_dataset_name(env_name: str) -> str:
    """``'cube-single-v0'`` -> ``'cube-single-play-v0'``; raises for environments without plan oracles."""
    parts = env_name.split("-")
    if parts[0] not in ("cube", "scene", "puzzle") or len(parts) < 2 or not parts[-1].startswith("v"):
        raise ValueError(
            f"{env_name!r} is not an OGBench state-based manipulation environment id "
            "(expected e.g. 'cube-single-v0', 'cube-double-v0', 'scene-v0', 'puzzle-3x3-v0')"
        )
    return "-".join(parts[:-1] + ["play", parts[-1]])


def default_cache_dir() -> Path:
    """``$VGF_PROB_CACHE/ogbench`` when set, else ``~/.cache/vgf-prob/ogbench``."""
    root = os.environ.get("VGF_PROB_CACHE")
    return (Path(root) if root else Path("~/.cache/vgf-prob")).expanduser() / "ogbench"


def generate_ogbench_dataset(
    env_name: str,
    num_episodes: int,
    episode_length: int = 1001,
    num_val_episodes: int | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike = ".",
    progress: bool = True,
    num_workers: int = 1,
) -> Path:
    """Roll out the plan oracles and write ``<name>.npz``/``<name>-val.npz`` (atomically); returns the first.

    ``num_val_episodes`` defaults to ``max(1, num_episodes // 10)`` (ogbench: 1000 + 100 episodes of
    1001 steps). Each episode stores ``episode_length`` steps, i.e. ``episode_length - 1`` transitions.
    Episode ``i`` is seeded from ``(seed, i)``, so the files do not depend on ``num_workers``. With
    ``num_workers > 1`` episodes run in that many *spawned* processes: each pays some seconds of start-up
    (imports, environment build), and a script must call this under ``if __name__ == "__main__":``.
    """
    name = play_dataset_name(env_name)
    if num_episodes < 1 or episode_length < 2:
        raise ValueError(f"need num_episodes >= 1 and episode_length >= 2, got {num_episodes}, {episode_length}")
    num_val = max(1, num_episodes // 10) if num_val_episodes is None else num_val_episodes
    if num_val < 1:
        raise ValueError(f"num_val_episodes must be >= 1 (ogbench always loads a -val file), got {num_val}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    splits, stats = _collect(env_name, num_episodes + num_val, episode_length, seed, progress, num_workers)
    elapsed = time.perf_counter() - start
    boundary = num_episodes * episode_length
    train_path, val_path = out_dir / f"{name}.npz", out_dir / f"{name}-val.npz"
    _atomic_write(val_path, lambda f: np.savez_compressed(f, **{k: v[boundary:] for k, v in splits.items()}))
    _atomic_write(train_path, lambda f: np.savez_compressed(f, **{k: v[:boundary] for k, v in splits.items()}))
    total_steps = (num_episodes + num_val) * episode_length
    sidecar = {
        "env_name": env_name,
        "num_episodes": num_episodes,
        "num_val_episodes": num_val,
        "episode_length": episode_length,
        "seed": seed,
        "noise": NOISE,
        "noise_smoothing": NOISE_SMOOTHING,
        "ogbench_version": version("ogbench"),
        "num_workers": num_workers,
        "seconds": round(elapsed, 2),
        "steps_per_second": round(total_steps / elapsed, 1),
        **stats,
    }
    _atomic_write(train_path.with_suffix(".json"), lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
    logger.info("wrote %s (%d steps, %.0f steps/s): %s", train_path, total_steps, total_steps / elapsed, stats)
    return train_path


def ensure_ogbench_dataset(
    env_name: str,
    num_episodes: int,
    episode_length: int = 1001,
    *,
    num_val_episodes: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int = 1,
) -> Path:
    """The cached ``<name>.npz`` for these settings, generating it first when absent.

    Files live in ``<cache_dir>/<name>-ep{episodes}-len{length}-val{val}-seed{seed}/`` (``cache_dir``
    defaults to `default_cache_dir`) so the file names stay the ones ogbench's loader expects.
    """
    name = play_dataset_name(env_name)
    num_val = max(1, num_episodes // 10) if num_val_episodes is None else num_val_episodes
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    folder = root / f"{name}-ep{num_episodes}-len{episode_length}-val{num_val}-seed{seed}"
    train_path = folder / f"{name}.npz"
    if train_path.is_file() and (folder / f"{name}-val.npz").is_file():
        return train_path
    return generate_ogbench_dataset(
        env_name, num_episodes, episode_length, num_val, seed, folder, progress, num_workers
    )


def _make_oracles(env_name: str, env: Any) -> dict[str, Any]:
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    kw = dict(env=env, noise=NOISE, noise_smoothing=NOISE_SMOOTHING)
    if env_name.startswith("cube"):
        return {"cube": CubePlanOracle(**kw)}
    if env_name.startswith("puzzle"):
        return {"button": ButtonPlanOracle(**kw, gripper_always_closed=True)}
    return {
        "cube": CubePlanOracle(**kw),
        "button": ButtonPlanOracle(**kw),
        "drawer": DrawerPlanOracle(**kw),
        "window": WindowPlanOracle(**kw),
    }


def _p_stack(env_name: str) -> float:
    kind = env_name.split("-")[1] if env_name.startswith("cube") else None
    low, high = _P_STACK_RANGES.get(kind, (0.5, 0.5))
    return float(np.random.uniform(low, high)) if high > low else low


class _Collector:
    """One environment and its oracles; `episode` rolls out one seeded episode."""

    def __init__(self, env_name: str, episode_length: int) -> None:
        import gymnasium

        from vgf_prob.rl.env_warnings import quiet_env_warnings

        with quiet_env_warnings():  # headless GLFW probe, float64 action bounds: nothing a user can act on
            import ogbench.manipspace  # noqa: F401  (registers the environments)

            self.env = gymnasium.make(
                env_name, terminate_at_goal=False, mode="data_collection", max_episode_steps=episode_length
            )
        self.env_name = env_name
        self.oracles = _make_oracles(env_name, self.env)
        self.has_buttons = hasattr(self.env.unwrapped, "_cur_button_states")

    def episode(self, episode_seed: int) -> tuple[dict[str, list], int, int, int]:
        """``(steps, oracle tasks, tasks solved, unhealthy retries)``; reseeds numpy's global RNG."""
        np.random.seed(episode_seed)
        p_stack = _p_stack(self.env_name)
        retries = 0
        while True:  # a retry continues the seeded RNG streams
            steps, tasks, solved = self._rollout(p_stack, episode_seed if retries == 0 else None)
            if not self.env_name.startswith("scene") or _scene_healthy(np.asarray(steps["qpos"])):
                return steps, tasks, solved, retries
            retries += 1

    def _rollout(self, p_stack: float, seed: int | None) -> tuple[dict[str, list], int, int]:
        """One episode; a task counts as solved when its oracle finishes with ``info['success']`` set."""
        env = self.env
        ob, info = env.reset(seed=seed)
        oracle = self.oracles[info["privileged/target_task"]]
        oracle.reset(ob, info)
        steps: dict[str, list] = defaultdict(list)
        tasks = solved = 0
        done = False
        while not done:
            action = np.clip(np.asarray(oracle.select_action(ob, info)), -1, 1)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            if oracle.done:
                tasks += 1
                solved += bool(info["success"])
                agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
                oracle = self.oracles[agent_info["privileged/target_task"]]
                oracle.reset(agent_ob, agent_info)
            steps["observations"].append(ob)
            steps["actions"].append(action)
            steps["terminals"].append(done)
            steps["qpos"].append(info["prev_qpos"])
            steps["qvel"].append(info["prev_qvel"])
            if self.has_buttons:
                steps["button_states"].append(info["prev_button_states"])
            ob = next_ob
        return steps, tasks, solved


_WORKER: _Collector | None = None


def _init_worker(env_name: str, episode_length: int) -> None:
    global _WORKER
    _WORKER = _Collector(env_name, episode_length)


def _worker_episode(episode_seed: int) -> tuple[dict[str, list], int, int, int]:
    assert _WORKER is not None
    return _WORKER.episode(episode_seed)


def _collect(
    env_name: str, num_episodes: int, episode_length: int, seed: int, progress: bool, num_workers: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run ``num_episodes`` oracle episodes in order; returns stacked arrays and oracle statistics."""
    from tqdm.auto import tqdm

    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(num_episodes)]
    with ExitStack() as stack:
        if num_workers == 1:
            stack.enter_context(_preserved_numpy_rng())
            collector = _Collector(env_name, episode_length)
            stack.callback(collector.env.close)
            results = map(collector.episode, seeds)
        else:
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    num_workers, mp_context=get_context("spawn"), initializer=_init_worker,
                    initargs=(env_name, episode_length),
                )  # fmt: skip
            )
            results = pool.map(_worker_episode, seeds)
        data: dict[str, list] = defaultdict(list)
        tasks = solved = with_success = retries = 0
        bar = tqdm(results, total=num_episodes, desc=f"oracle {env_name}", unit="ep", disable=not progress)
        for steps, ep_tasks, ep_solved, ep_retries in bar:
            for k, v in steps.items():
                data[k].extend(v)
            tasks, solved, retries = tasks + ep_tasks, solved + ep_solved, retries + ep_retries
            with_success += ep_solved > 0
            bar.set_postfix(task_success=f"{solved / max(tasks, 1):.2f}")
    dtypes = {"terminals": bool, "button_states": np.int64}
    arrays = {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in data.items()}
    stats = {
        "oracle_tasks": tasks,
        "oracle_task_success_rate": solved / max(tasks, 1),
        "episodes_with_a_solved_task": with_success / num_episodes,
        "unhealthy_episodes_regenerated": retries,
    }
    return arrays, stats


def _scene_healthy(qpos: np.ndarray) -> bool:
    """ogbench's check: the cube never goes too far right, nor too far left unless inside the drawer."""
    xyz = qpos[:, 14:17]
    too_right = (xyz[:, 1] >= 0.29).any()
    too_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_right or too_left)


@contextmanager
def _preserved_numpy_rng() -> Iterator[None]:
    """Restore numpy's global RNG (which the oracles draw from) after an in-process run."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
