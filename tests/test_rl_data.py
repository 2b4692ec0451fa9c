"""Tests of the offline-RL data layer: OfflineDataset, D4RL HDF5, Minari, OGBench loading and generation."""

from __future__ import annotations

import json
import shutil
import sys
import types

import h5py
import numpy as np
import pytest
import torch

from vgf_prob.rl import ogbench_generate
from vgf_prob.rl.data import (
    D4RL_REF_SCORES,
    OfflineDataset,
    d4rl_normalized_score,
    ensure_ogbench_dataset,
    generate_ogbench_dataset,
    load_d4rl,
    load_d4rl_hdf5,
    load_minari,
    load_ogbench,
)
from vgf_prob.rl.ogbench_data import ogbench_names


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _transitions(n: int = 6, obs_dim: int = 3, action_dim: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n + 1, obs_dim))
    return {
        "observations": obs[:-1],
        "actions": rng.uniform(-1, 1, size=(n, action_dim)),
        "rewards": rng.normal(size=n),
        "next_observations": obs[1:],
        "masks": np.ones(n),
    }


# ---------------------------------------------------------------- OfflineDataset


def test_dataset_fields_dtype_and_clipping():
    data = _transitions()
    data["actions"][0] = [1.0 + 1e-4, -1.0 - 1e-4]
    ds = OfflineDataset(data)
    assert len(ds) == 6 and ds.obs_dim == 3 and ds.action_dim == 2
    assert all(getattr(ds, k).dtype == torch.float32 for k in ds.keys)
    assert ds.actions[0].tolist() == [1.0, -1.0]
    assert ds.terminals is None and ds.timeouts is None


def test_dataset_warns_when_clipping_far_outside_box():
    data = _transitions()
    data["actions"][0, 0] = 3.0
    with pytest.warns(UserWarning, match="1 action entries lie outside"):
        ds = OfflineDataset(data)
    assert ds.actions[0, 0].item() == 1.0


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("rewards"), r"missing required key\(s\) \['rewards'\]"),
        (lambda d: d.__setitem__("masks", np.ones(5)), "length mismatch"),
        (lambda d: d.__setitem__("observations", np.zeros(6)), r"observations: expected a 2-D array"),
        (lambda d: d.__setitem__("next_observations", np.zeros((6, 4))), "next_observations: shape"),
        (lambda d: d.__setitem__("masks", np.full(6, 2.0)), r"masks: values must lie in \[0, 1\]"),
        (lambda d: d.__setitem__("extra", np.ones(6)), r"unknown key\(s\) \['extra'\]"),
    ],
)
def test_dataset_rejects_bad_input(mutate, match):
    data = _transitions()
    mutate(data)
    with pytest.raises(ValueError, match=match):
        OfflineDataset(data)


def test_dataset_reports_non_finite_values_by_key_and_count():
    data = _transitions()
    data["rewards"][[1, 4]] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"rewards: 2 non-finite value\(s\)"):
        OfflineDataset(data)


def test_dataset_checks_expected_action_dim():
    with pytest.raises(ValueError, match=r"actions: expected action dim 3, got shape \(6, 2\)"):
        OfflineDataset(_transitions(), expected_action_dim=3)


def test_sample_is_reproducible_with_a_seeded_generator():
    ds = OfflineDataset(_transitions(n=50))
    a = ds.sample(16, torch.Generator().manual_seed(3))
    b = ds.sample(16, torch.Generator().manual_seed(3))
    c = ds.sample(16, torch.Generator().manual_seed(4))
    assert set(a) == set(ds.keys) and a["observations"].shape == (16, 3) and a["rewards"].shape == (16,)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["observations"], c["observations"])
    # every sampled row is a stored transition (fields stay aligned)
    rows = {tuple(o.tolist()): r.item() for o, r in zip(ds.observations, ds.rewards)}
    assert all(rows[tuple(o.tolist())] == r.item() for o, r in zip(a["observations"], a["rewards"]))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ds.sample(0)


def test_append_grows_with_amortised_capacity():
    data = {**_transitions(n=4), "terminals": np.array([0, 0, 0, 1.0])}
    ds = OfflineDataset(data)
    with pytest.warns(UserWarning, match="were clipped"):
        ds.append({"observations": [1.0, 2, 3], "actions": [0.5, 2.0], "rewards": 7.0,
                   "next_observations": [4.0, 5, 6], "masks": 0.0})  # fmt: skip
    assert len(ds) == 5
    assert ds.observations[-1].tolist() == [1, 2, 3] and ds.next_observations[-1].tolist() == [4, 5, 6]
    assert ds.actions[-1].tolist() == [0.5, 1.0]  # clipped like the constructor
    assert ds.rewards[-1].item() == 7 and ds.masks[-1].item() == 0 and ds.terminals[-1].item() == 0
    batch = _transitions(n=300, seed=1)
    for i in range(300):
        ds.append({k: v[i] for k, v in batch.items()})
    assert len(ds) == 305
    assert torch.allclose(ds.rewards[5:], torch.as_tensor(batch["rewards"], dtype=torch.float32))
    assert ds._storage["rewards"].shape[0] < 2 * 305  # capacity doubles, not +1 per append
    ds.append(_transitions(n=10, seed=2))
    assert len(ds) == 315


def test_append_validates_before_writing():
    ds = OfflineDataset(_transitions())
    before = ds.rewards.clone()
    bad = _transitions(n=2)
    bad["rewards"][1] = np.nan
    with pytest.raises(ValueError, match="rewards: 1 non-finite"):
        ds.append(bad)
    with pytest.raises(ValueError, match="expected action dim 2"):
        ds.append(_transitions(n=2, action_dim=3))
    with pytest.raises(ValueError, match="dataset has obs_dim 3"):
        ds.append(_transitions(n=2, obs_dim=4))
    with pytest.raises(ValueError, match=r"keys \['terminals'\] that this dataset does not store"):
        ds.append({**_transitions(n=2), "terminals": np.zeros(2)})
    assert len(ds) == 6 and torch.equal(ds.rewards, before)


def test_state_dict_roundtrip_to_and_summary():
    data = {**_transitions(n=5), "terminals": np.array([0, 1, 0, 0, 1.0])}
    data["masks"][1] = 0
    ds = OfflineDataset(data, metadata={"source": "test"})
    ds.append(_transitions(n=1, seed=3) | {"terminals": np.ones(1)})
    state = ds.state_dict()
    assert state["rewards"].shape == (6,) and state["rewards"].untyped_storage().nbytes() == 6 * 4
    again = OfflineDataset.from_state_dict(state)
    assert all(torch.equal(getattr(ds, k), getattr(again, k)) for k in ds.keys)
    assert again.metadata == {"source": "test"} and ds.to("cpu") is ds
    s = ds.summary()
    assert s["size"] == 6 and s["episodes"] == 3 and s["terminations"] == 1
    assert s["reward_min"] == pytest.approx(ds.rewards.min().item())
    assert -1 <= s["action_min"] <= s["action_max"] <= 1
    assert json.dumps(s)  # plain Python values


def test_episode_count_without_terminals_uses_observation_breaks():
    a, b = _transitions(n=3, seed=0), _transitions(n=2, seed=1)
    ds = OfflineDataset({k: np.concatenate([a[k], b[k]]) for k in a})
    assert ds.num_episodes() == 2


# ---------------------------------------------------------------- D4RL

# Three episodes: steps 0-2 end by termination, 3-5 by timeout, 6-7 are cut by the end of the file.
_D4RL_TERMINALS = [0, 0, 1, 0, 0, 0, 0, 0]
_D4RL_TIMEOUTS = [0, 0, 0, 0, 0, 1, 0, 0]


def _write_d4rl(path, next_observations: bool = False, **overrides) -> None:
    n = 8
    arrays = {
        "observations": np.stack([np.arange(n), 10 * np.arange(n)], axis=1).astype(np.float32),
        "actions": np.full((n, 1), 0.5, dtype=np.float32),
        "rewards": np.arange(1, n + 1, dtype=np.float32),
        "terminals": np.array(_D4RL_TERMINALS, dtype=bool),
        "timeouts": np.array(_D4RL_TIMEOUTS, dtype=bool),
    }
    arrays["actions"][0] = 1.0
    if next_observations:
        arrays["next_observations"] = arrays["observations"] + 100
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if v is not None:
                f[k] = v
        f["infos/qpos"] = np.zeros((n, 3))
        f["infos/goal"] = np.zeros((n, 2))
        f["metadata/algorithm"] = "scripted"
        f["metadata/policy/nonlinearity"] = "relu"


def test_d4rl_qlearning_semantics(tmp_path):
    path = tmp_path / "tiny.hdf5"
    _write_d4rl(path)
    ds = load_d4rl_hdf5(path, reward_scale="none")
    # kept raw steps: 0 1 2 3 4 6 (5 ended its episode by timeout, 7 has no next observation)
    assert ds.observations[:, 0].tolist() == [0, 1, 2, 3, 4, 6]
    assert ds.next_observations[:, 0].tolist() == [1, 2, 3, 4, 5, 7]
    assert ds.next_observations[:, 1].tolist() == [10, 20, 30, 40, 50, 70]
    assert ds.rewards.tolist() == [1, 2, 3, 4, 5, 7]
    assert ds.masks.tolist() == [1, 1, 0, 1, 1, 1]
    assert ds.terminals.tolist() == [0, 0, 1, 0, 1, 1]
    assert ds.timeouts.tolist() == [0, 0, 0, 0, 1, 0]
    assert ds.actions[0, 0].item() == pytest.approx(1 - 1e-5) and ds.action_bound == pytest.approx(1 - 1e-5)
    assert ds.metadata["file_metadata"] == {"algorithm": "scripted", "policy/nonlinearity": "relu"}
    assert ds.metadata["infos"] == ["goal", "qpos"]
    assert ds.num_episodes() == 3


def test_d4rl_uses_stored_next_observations(tmp_path):
    path = tmp_path / "tiny.hdf5"
    _write_d4rl(path, next_observations=True)
    ds = load_d4rl_hdf5(path, reward_scale="none")
    # only the timeout step is dropped; the file's last step has a stored next observation
    assert ds.observations[:, 0].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert ds.next_observations[:, 0].tolist() == [100, 101, 102, 103, 104, 106, 107]


@pytest.mark.parametrize(
    ("env_name", "reward_scale", "expected"),
    [
        # episode returns over kept steps: 1+2+3 = 6, 4+5 = 9, 7 -> spread 3 -> factor 1000/3
        ("hopper-medium-v2", "auto", [x * 1000 / 3 for x in (1, 2, 3, 4, 5, 7)]),
        ("walker2d-medium-replay-v2", "auto", [x * 1000 / 3 for x in (1, 2, 3, 4, 5, 7)]),
        ("antmaze-umaze-v2", "auto", [0, 1, 2, 3, 4, 6]),
        ("pen-human-v1", "auto", [1, 2, 3, 4, 5, 7]),
        (None, "auto", [1, 2, 3, 4, 5, 7]),
        ("pen-human-v1", "antmaze", [0, 1, 2, 3, 4, 6]),
        ("hopper-medium-v2", 0.5, [0.5, 1, 1.5, 2, 2.5, 3.5]),
    ],
)
def test_d4rl_reward_processing(tmp_path, env_name, reward_scale, expected):
    path = tmp_path / "tiny.hdf5"
    _write_d4rl(path)
    ds = load_d4rl_hdf5(path, env_name=env_name, reward_scale=reward_scale)
    assert ds.rewards.tolist() == pytest.approx(expected, rel=1e-6)
    raw = np.array([1, 2, 3, 4, 5, 7])
    factor, shift = ds.metadata["reward_factor"], ds.metadata["reward_shift"]
    assert (factor * raw + shift).tolist() == pytest.approx(expected, rel=1e-6)


def test_d4rl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="D4RL HDF5 file not found: .*nope.hdf5"):
        load_d4rl_hdf5(tmp_path / "nope.hdf5")
    _write_d4rl(tmp_path / "no_timeouts.hdf5", timeouts=None)
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['timeouts'\]"):
        load_d4rl_hdf5(tmp_path / "no_timeouts.hdf5")
    _write_d4rl(tmp_path / "nan.hdf5", rewards=np.array([1, np.nan, 3, 4, 5, 6, 7, 8], dtype=np.float32))
    with pytest.raises(ValueError, match=r"rewards: 1 non-finite value\(s\)"):
        load_d4rl_hdf5(tmp_path / "nan.hdf5", env_name="hopper-medium-v2")
    _write_d4rl(tmp_path / "short.hdf5", rewards=np.ones(7, dtype=np.float32))
    with pytest.raises(ValueError, match="length mismatch"):
        load_d4rl_hdf5(tmp_path / "short.hdf5")
    with pytest.raises(ValueError, match="reward_scale must be"):
        load_d4rl_hdf5(tmp_path / "nan.hdf5", reward_scale="bogus")


def test_load_d4rl_without_the_d4rl_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "d4rl", None)  # import d4rl -> ImportError
    with pytest.raises(ImportError, match=r"cannot be installed on Python >= 3.11\); pass the HDF5 path"):
        load_d4rl("hopper-medium-v2")
    _write_d4rl(tmp_path / "hopper_medium-v2.hdf5")
    assert len(load_d4rl("hopper-medium-v2", path=tmp_path / "hopper_medium-v2.hdf5")) == 6


def test_load_d4rl_locates_the_file_through_an_importable_d4rl(tmp_path, monkeypatch):
    url = "http://example.invalid/datasets/hopper_medium-v2.hdf5"
    fake = types.ModuleType("d4rl")
    fake.infos = types.SimpleNamespace(DATASET_URLS={"hopper-medium-v2": url})
    fake.offline_env = types.SimpleNamespace(filepath_from_url=lambda u: str(tmp_path / u.split("/")[-1]))
    monkeypatch.setitem(sys.modules, "d4rl", fake)
    _write_d4rl(tmp_path / "hopper_medium-v2.hdf5")
    ds = load_d4rl("hopper-medium-v2")
    assert ds.rewards[0].item() == pytest.approx(1000 / 3)


def test_d4rl_normalized_score_uses_the_reference_table():
    assert set(D4RL_REF_SCORES) >= {"hopper", "halfcheetah", "walker2d", "antmaze", "pen", "door", "hammer"}
    lo, hi = D4RL_REF_SCORES["hopper"]
    assert d4rl_normalized_score("hopper-medium-v2", [lo, hi]).tolist() == pytest.approx([0, 100])
    assert d4rl_normalized_score("antmaze-large-diverse-v2", 0.75) == pytest.approx(75)
    assert d4rl_normalized_score("halfcheetah_medium-v2", 12135.0) == pytest.approx(100)
    with pytest.raises(ValueError, match="no D4RL reference scores for 'maze2d-umaze-v1'"):
        d4rl_normalized_score("maze2d-umaze-v1", 1.0)


# ---------------------------------------------------------------- Minari


def _minari_dataset(dataset_id: str, episodes, **kwargs):
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, infos={}, **ep) for i, ep in enumerate(episodes)]
    with pytest.warns(UserWarning):  # minari nags about missing author/description metadata
        return minari.create_dataset_from_buffers(dataset_id, buffers, **kwargs)


def test_minari_transitions_and_masks():
    rng = np.random.default_rng(0)
    episodes = []
    for steps, terminated in [(4, True), (3, False)]:
        episodes.append(dict(
            observations=rng.normal(size=(steps + 1, 11)), actions=rng.uniform(-1, 1, size=(steps, 3)),
            rewards=list(np.arange(steps, dtype=float)),
            terminations=[False] * (steps - 1) + [terminated], truncations=[False] * (steps - 1) + [not terminated],
        ))  # fmt: skip
    _minari_dataset("test/hopper/tiny-v0", episodes, env="Hopper-v5")
    ds = load_minari("test/hopper/tiny-v0")
    assert (len(ds), ds.obs_dim, ds.action_dim) == (7, 11, 3)
    assert ds.masks.tolist() == [1, 1, 1, 0, 1, 1, 1]  # the truncated end bootstraps
    assert ds.terminals.tolist() == [0, 0, 0, 1, 0, 0, 1]
    assert ds.timeouts.tolist() == [0, 0, 0, 0, 0, 0, 1]
    obs0 = torch.as_tensor(episodes[0]["observations"], dtype=torch.float32)
    assert torch.equal(ds.observations[:4], obs0[:-1]) and torch.equal(ds.next_observations[:4], obs0[1:])
    assert ds.metadata["env_name"] == "Hopper-v5"


def test_minari_dict_observations_and_action_bounds():
    import gymnasium as gym

    rng = np.random.default_rng(1)
    obs = {"observation": rng.normal(size=(4, 3)), "achieved_goal": rng.normal(size=(4, 2))}
    space = gym.spaces.Dict({k: gym.spaces.Box(-np.inf, np.inf, v.shape[1:]) for k, v in obs.items()})
    episode = dict(observations=obs, actions=rng.uniform(-2, 2, size=(3, 2)), rewards=[0.0, 1.0, 2.0],
                   terminations=[False, False, True], truncations=[False] * 3)  # fmt: skip
    _minari_dataset("test/dict-v0", [episode], observation_space=space, action_space=gym.spaces.Box(-2, 2, (2,)))
    with pytest.raises(ValueError, match=r"not inside \[-1, 1\]; pass rescale_actions=True"):
        load_minari("test/dict-v0")
    ds = load_minari("test/dict-v0", rescale_actions=True)
    expected = np.concatenate([obs["achieved_goal"], obs["observation"]], axis=1)  # sorted key order
    assert torch.allclose(ds.observations, torch.as_tensor(expected[:-1], dtype=torch.float32))
    assert torch.allclose(ds.actions, torch.as_tensor(episode["actions"] / 2, dtype=torch.float32))
    picked = load_minari("test/dict-v0", obs_keys=["observation"], rescale_actions=True)
    assert picked.obs_dim == 3 and picked.masks.tolist() == [1, 1, 0]


def test_minari_unknown_id_lists_the_local_store(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'mujoco/hopper/medium-v0' is not in the local store .*stored: none"):
        load_minari("mujoco/hopper/medium-v0")


# ---------------------------------------------------------------- OGBench

_EPISODES, _LENGTH = 2, 50


@pytest.fixture(scope="module")
def cube_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("ogbench")
    path = generate_ogbench_dataset("cube-single-v0", _EPISODES, _LENGTH, num_val_episodes=1, out_dir=out,
                                    progress=False)  # fmt: skip
    return path


def test_generated_files_have_ogbench_layout(cube_files):
    assert cube_files.name == "cube-single-play-v0.npz"
    train, val = np.load(cube_files), np.load(cube_files.with_name("cube-single-play-v0-val.npz"))
    assert set(train.files) == {"observations", "actions", "terminals", "qpos", "qvel"}
    assert train["observations"].shape == (_EPISODES * _LENGTH, 28) and val["actions"].shape == (_LENGTH, 5)
    assert train["terminals"].dtype == bool and np.flatnonzero(train["terminals"]).tolist() == [49, 99]
    assert train["qpos"].dtype == np.float32 and np.abs(train["actions"]).max() <= 1
    sidecar = json.loads(cube_files.with_suffix(".json").read_text())
    assert sidecar["num_episodes"] == _EPISODES and 0 <= sidecar["oracle_task_success_rate"] <= 1


def test_load_ogbench_relabels_rewards_and_masks_from_qpos(cube_files, tmp_path):
    # Place the cube on the default task's goal (task2: (0.50, 0.00, 0.02)) at raw step 5 of episode 0.
    goal = np.array([0.50, 0.0, 0.02], dtype=np.float32)
    shutil.copy(cube_files.with_name("cube-single-play-v0-val.npz"), tmp_path)
    raw = dict(np.load(cube_files))
    raw["qpos"][5, 14:17] = goal
    np.savez(tmp_path / "cube-single-play-v0.npz", **raw)

    train, val, env = load_ogbench(tmp_path / "cube-single-play-v0.npz", return_env=True)
    assert np.allclose(env.unwrapped.cur_task_info["goal_xyzs"][0], goal)
    assert env.unwrapped._success_timing == "post"  # ogbench 1.1 timing, as in the published numbers
    env.close()
    assert (len(train), len(val)) == (_EPISODES * (_LENGTH - 1), _LENGTH - 1)
    keep = ~raw["terminals"]  # the last step of each episode has no next observation
    success = np.linalg.norm(raw["qpos"][keep, 14:17] - goal, axis=1) <= 0.04
    assert success[5]
    assert train.masks.numpy().tolist() == (1.0 - success).tolist()
    assert train.rewards.numpy().tolist() == (success - 1.0).tolist()
    assert torch.equal(train.next_observations[:48], train.observations[1:49])
    assert np.flatnonzero(train.terminals.numpy()).tolist() == [48, 97]
    assert train.metadata["env_name"] == "cube-single-play-singletask-v0"


def test_ogbench_names_and_missing_files(tmp_path):
    assert ogbench_names("cube-single-play-v0") == ("cube-single-play-v0", "cube-single-play-singletask-v0")
    assert ogbench_names("/d/puzzle-3x3-play-v0.npz", 4) == ("puzzle-3x3-play-v0", "puzzle-3x3-play-singletask-task4-v0")
    assert ogbench_names("scene-play-singletask-task2-v0") == ("scene-play-v0", "scene-play-singletask-task2-v0")
    with pytest.raises(ValueError, match="names task2 but task_id=3"):
        ogbench_names("scene-play-singletask-task2-v0", 3)
    with pytest.raises(FileNotFoundError, match=r"OGBench dataset file not found: .*cube-double-play-v0.npz"):
        load_ogbench("cube-double-play-v0", dataset_dir=tmp_path)


def test_ensure_ogbench_dataset_caches(tmp_path, monkeypatch):
    calls = []

    def fake_collect(env_name, num_episodes, episode_length, seed, progress, num_workers):
        calls.append(seed)
        steps = num_episodes * episode_length
        arrays = {"observations": np.zeros((steps, 28), np.float32), "terminals": np.zeros(steps, bool)}
        return arrays, {"oracle_tasks": 0}

    monkeypatch.setattr(ogbench_generate, "_collect", fake_collect)
    monkeypatch.setenv("VGF_PROB_CACHE", str(tmp_path))
    first = ensure_ogbench_dataset("cube-single-v0", 3, 10)
    again = ensure_ogbench_dataset("cube-single-v0", 3, 10)
    other = ensure_ogbench_dataset("cube-single-v0", 3, 10, seed=1)
    assert first == again != other and calls == [0, 1]
    assert first.parent.parent == tmp_path / "ogbench" and first.name == "cube-single-play-v0.npz"
    assert np.load(first)["observations"].shape == (30, 28)
    assert np.load(first.with_name("cube-single-play-v0-val.npz"))["observations"].shape == (10, 28)
    assert not list(first.parent.glob(".*tmp"))  # temporary files were renamed away
    with pytest.raises(ValueError, match="not an OGBench state-based manipulation environment"):
        ensure_ogbench_dataset("antmaze-large-v0", 1, 10)


@pytest.mark.slow  # two spawned workers start up in ~10-20 s
def test_generation_is_seeded_per_episode_whatever_the_worker_count(tmp_path):
    state = np.random.get_state()
    paths = [
        generate_ogbench_dataset("puzzle-3x3-v0", 1, 20, num_val_episodes=1, seed=7, out_dir=tmp_path / str(w),
                                 progress=False, num_workers=w)  # fmt: skip
        for w in (1, 2)
    ]
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG is left as it was
    one, two = (np.load(p) for p in paths)
    assert set(one.files) == {"observations", "actions", "terminals", "qpos", "qvel", "button_states"}
    assert one["button_states"].dtype == np.int64
    assert all(np.array_equal(one[k], two[k]) for k in one.files)
