"""Silence the environment-construction warnings that no user can act on (importable without torch)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_env_warnings() -> Iterator[None]:
    """Silence two warnings that environment construction emits and no user can act on.

    dm_control (imported by OGBench) probes the GLFW renderer at import and warns "The DISPLAY
    environment variable is missing" on a headless machine (nothing here renders); gymnasium's ``Box``
    warns "precision lowered by casting to float32" for OGBench's float64 action bounds of +-1, which
    float32 holds exactly. Every other warning passes through.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*DISPLAY environment variable is missing")
        warnings.filterwarnings("ignore", message=r".*precision lowered by casting to float32")
        yield
