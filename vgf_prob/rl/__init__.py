"""Offline and offline-to-online RL with VGF: data (``data``), agent (``agent``, ``config``, ``networks``),
the harness (``run``: spec, experiment, loop, logs, run directory, fine-tuning; ``checkpoint``), environments
(``envs``), evaluation (``evaluate``, ``plots``), recipes and sweeps (``recipes``, ``sweep``). Modules are imported by name so
that, e.g., reading a dataset does not load the simulators."""
