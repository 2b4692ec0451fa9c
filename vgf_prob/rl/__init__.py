"""Offline and offline-to-online RL with VGF: data (``data``), agent (``agent``, ``config``, ``networks``),
training (``trainer``, ``checkpoint``), evaluation (``evaluate``, ``plots``). Modules are imported by name so
that, e.g., reading a dataset does not load the simulators."""
