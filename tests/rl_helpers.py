"""Helpers shared by the RL tests: synthetic batches, a simulated crash, a one-thread fixture."""

from __future__ import annotations

import pytest
import torch


def synthetic_batch(seed: int, batch_size: int, obs_dim: int, action_dim: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random transitions with actions in [-1, 1] and about 10 % terminal masks, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(batch_size, obs_dim, generator=g, dtype=dtype),
        "actions": torch.rand(batch_size, action_dim, generator=g, dtype=dtype) * 2 - 1,
        "rewards": torch.randn(batch_size, generator=g, dtype=dtype),
        "next_observations": torch.randn(batch_size, obs_dim, generator=g, dtype=dtype),
        "masks": (torch.rand(batch_size, generator=g) > 0.1).to(dtype),
    }


class Crash(Exception):
    """Stands in for the process being killed."""


def crash_after(monkeypatch, dataset, calls: int) -> None:
    """Make ``dataset.sample`` raise `Crash` on call ``calls + 1`` (the run dies inside that step)."""
    original = dataset.sample
    count = {"n": 0}

    def sample(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(dataset, "sample", sample)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for the test, restored after (imported by name into the modules that want it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec(out, steps: int, **settings):
    """A `TrainSpec` for the loop's tests: run directory ``out``, ``steps`` steps, no progress bars;
    ``eval_budgets`` is accepted as the spec's ``budgets``."""
    from vgf_prob.rl.run.spec import TrainSpec

    settings.setdefault("progress", False)
    if "eval_budgets" in settings:
        settings["budgets"] = settings.pop("eval_budgets")
    return TrainSpec(out=str(out), steps=steps, **settings)
