"""Hyperparameters of the offline-RL VGF agent, with the paper's defaults and per-task presets.

Every field of `VGFConfig` is one knob of the agent (REFERENCE.md section 3). Fields marked "variant
default" are ``None`` until the config is built, then resolved from ``variant``: the Stein variant uses
N = 10 particles and no gradient clipping, the amortised variant N = 5 and a global grad-norm clip of 1.
`preset(name)` returns the settings of the authors' scripts for a D4RL or OGBench task.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

HEAD_AGGREGATIONS = ("min", "mean")
LEGACY_HEAD_AGGREGATION = "head_aggregation"
REFERENCES = ("flow_matching", "gaussian")
VARIANTS = ("stein", "amortized")
_HIDDEN_FIELDS = ("critic_hidden_dims", "bc_hidden_dims", "amortized_hidden_dims")
_VARIANT_DEFAULTS = {
    "stein": {"num_particles": 10, "max_grad_norm": 0.0},
    "amortized": {"num_particles": 5, "max_grad_norm": 1.0},
}


@dataclass(frozen=True)
class VGFConfig:
    """Configuration of `vgf_prob.rl.agent.VGFAgent`; defaults are the paper's (REFERENCE.md section 3)."""

    # --- optimisation ---------------------------------------------------------------------------------
    batch_size: int = 256
    """Transitions per update."""
    lr: float = 3e-4
    """Adam learning rate of every network (critic, BC reference, amortised gradient network)."""
    discount: float = 0.99
    """Discount gamma of the TD target y = r + gamma * mask * mean_i Qbar(s', x_i)."""
    tau: float = 0.005
    """Polyak rate of the target critic: theta_bar <- (1 - tau) theta_bar + tau theta."""
    max_grad_norm: float | None = None
    """Clip each optimiser's global gradient norm to this value; 0 disables. Variant default (0 / 1.0)."""

    # --- critic ---------------------------------------------------------------------------------------
    critic_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """Hidden widths of every critic head (Linear -> LayerNorm -> ReLU per layer)."""
    num_critic_heads: int = 2
    """Critic ensemble size H (2: the twin critic)."""
    critic_layer_norm_eps: float = 1e-6
    """LayerNorm epsilon of the critic (and of the amortised gradient network)."""
    flow_aggregation: str = "mean"
    """How heads combine into the value whose action-gradient drives every flow (the authors' ``vgf_q_agg``:
    "mean" in all their scripts)."""
    target_aggregation: str = "mean"
    """How heads combine in the TD target's values and in choosing the acted particle (the authors'
    ``train_q_agg``): "min" on D4RL, per environment on OGBench."""

    # --- reference policy mu (behaviour cloning) ------------------------------------------------------
    reference: str = "flow_matching"
    """BC reference: "flow_matching" (the paper's) or "gaussian" (a diagonal Gaussian alternative)."""
    bc_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """Hidden widths of the BC network (flow-matching velocity field or Gaussian mean/log-std net)."""
    flow_steps: int = 10
    """K: Euler steps that carry N(0, I) noise to a flow-matching BC sample."""

    # --- value gradient flow --------------------------------------------------------------------------
    variant: str = "stein"
    """"stein": SVGD field on the critic's action-gradient; "amortized": a network f(s, a) ~ grad_a Q."""
    num_particles: int | None = None
    """N: particles drawn from mu per state. Variant default (10 Stein, 5 amortised)."""
    train_budget: int = 3
    """L_train: flow steps that transport the next-state particles of the TD target (0 = best-of-N)."""
    test_budget: int | None = None
    """L_test: flow steps when acting; None means the same as ``train_budget``."""
    vgf_lr: float = 0.05
    """Learning rate of the per-flow Adam on particles (each step moves about this much per coordinate)."""
    alpha: float = 1.0
    """Temperature of the Boltzmann target exp(Q / alpha): weight of value attraction against repulsion."""
    differentiate_bandwidth: bool = True
    """Form the Stein repulsion through the median bandwidth as the authors' code does (paper-faithful)."""
    amortized_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """Hidden widths of the amortised gradient network f(s, a) (with LayerNorm); used by that variant."""

    # --- speed ----------------------------------------------------------------------------------------
    fast_path: bool = True
    """Run the agent's networks through `vgf_prob.fast` (each state encoded once per network and reused for
    every particle and flow step, fused critic passes, the packed BC sampling loop; same numbers up to float
    rounding). False turns every fast pass off inside the agent, BC sampling included, and runs the plain
    concat(obs, action) modules by autograd, for checking (as `vgf_prob.fast.enabled(False)` does)."""
    flow_autocast_bf16: bool = False
    """Run the networks inside the flows (BC sampling, value gradients, target values) under bfloat16
    autocast. Changes numerics; measure before use."""
    compile: bool = False
    """torch.compile the critic's and the BC network's forward passes. Changes numerics slightly and
    costs compile time on the first updates."""

    def __post_init__(self) -> None:
        for name in _HIDDEN_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_choice("flow_aggregation", self.flow_aggregation, HEAD_AGGREGATIONS)
        _check_choice("target_aggregation", self.target_aggregation, HEAD_AGGREGATIONS)
        _check_choice("reference", self.reference, REFERENCES)
        _check_choice("variant", self.variant, VARIANTS)
        for name, value in _VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        positive_ints = ("batch_size", "num_critic_heads", "flow_steps", "num_particles")
        for name in positive_ints:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("train_budget", self.train_budget, minimum=0)
        if self.test_budget is not None:
            _check_int("test_budget", self.test_budget, minimum=0)
        for name in _HIDDEN_FIELDS:
            dims = getattr(self, name)
            if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
                raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {dims!r}")
        for name in ("lr", "vgf_lr", "alpha", "critic_layer_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"discount must lie in [0, 1], got {self.discount!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must lie in (0, 1], got {self.tau!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")

    @property
    def acting_budget(self) -> int:
        """L_test as used when acting: ``test_budget``, or ``train_budget`` when that is None."""
        return self.train_budget if self.test_budget is None else self.test_budget

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (hidden dims as lists), suitable for JSON and `from_dict`."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VGFConfig:
        """Build a config from ``to_dict`` output (or any subset of fields); unknown keys raise ValueError.

        A config saved before the two aggregations existed has one ``head_aggregation``. Its meaning then:
        the TD target and the choice of the acted particle used it, and the flow always took the mean of
        the heads. So it loads as ``target_aggregation`` with ``flow_aggregation = "mean"``: the same run.
        """
        data = dict(data)
        if LEGACY_HEAD_AGGREGATION in data:
            if "target_aggregation" in data:
                raise ValueError("give target_aggregation or the old head_aggregation, not both")
            warnings.warn(
                "config field head_aggregation (saved before vgf-prob 0.2) is read as target_aggregation (TD "
                "target and particle selection); the flow's heads were and stay combined by the mean",
                UserWarning,
                stacklevel=2,
            )
            data["target_aggregation"] = data.pop(LEGACY_HEAD_AGGREGATION)
            data.setdefault("flow_aggregation", "mean")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown VGFConfig field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> VGFConfig:
        """A copy with ``changes`` applied; unknown field names raise ValueError (as in `from_dict`).

        When ``variant`` changes, the variant-default fields not named in ``changes`` are resolved afresh
        for the new variant.
        """
        fields = self.to_dict()
        if changes.get("variant", self.variant) != self.variant:
            fields.update(dict.fromkeys(_VARIANT_DEFAULTS[self.variant]))
        return VGFConfig.from_dict({**fields, **changes})


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# Settings of the authors' scripts (ryanxhr/vgf; REFERENCE.md section 3). Keys not given keep VGFConfig's
# defaults, which are the authors' get_config defaults (N 10, K 10 as every script sets, vgf_lr 0.1 is
# overridden below where a script gives it). Matching is by prefix: "hopper" matches "hopper-medium-v2",
# "cube-double-play" matches "cube-double-play-singletask-task2-v0".

# D4RL, offline script: one shared setting for every task (Stein variant, L_train 5, vgf_lr 0.1,
# vgf_alpha swept over {0.05, 0.1}: 0.1 here, 0.05 the listed alternative), train_q_agg min, vgf_q_agg mean.
D4RL_ALPHA_ALTERNATIVES = (0.1, 0.05)
_D4RL = {
    "variant": "stein", "num_particles": 10, "flow_steps": 10, "train_budget": 5, "vgf_lr": 0.1,
    "alpha": D4RL_ALPHA_ALTERNATIVES[0], "flow_aggregation": "mean", "target_aggregation": "min",
    "discount": 0.99,
}


def _ogbench_offline(discount: float, target_aggregation: str, **script: Any) -> dict[str, Any]:
    """OGBench offline script (Stein variant): its per-environment blocks give discount and aggregation
    only; L_train / vgf_lr / alpha are get_config's (1 / 0.1 / 1.0) unless the script sets them."""
    return {"variant": "stein", "num_particles": 10, "flow_steps": 10, "train_budget": 1, "vgf_lr": 0.1,
            "alpha": 1.0, "discount": discount, "flow_aggregation": "mean",
            "target_aggregation": target_aggregation, **script}


def _ogbench_offline_to_online(train_budget: int, vgf_lr: float, discount: float, target_aggregation: str) -> dict[str, Any]:
    """OGBench offline-to-online script (amortised variant, N 5, K 10) per environment."""
    return {"variant": "amortized", "num_particles": 5, "flow_steps": 10, "train_budget": train_budget,
            "vgf_lr": vgf_lr, "discount": discount, "flow_aggregation": "mean",
            "target_aggregation": target_aggregation}


# The offline script sets puzzle-4x4 (task4) alone: L_train 3, vgf_lr swept over {0.01, 0.05} and alpha over
# {0.2, 0.5}; the first value of each sweep is the preset, the others are listed alternatives.
PUZZLE_4X4_SWEEP = {"vgf_lr": (0.01, 0.05), "alpha": (0.2, 0.5)}

PRESETS: dict[str, dict[str, Any]] = {
    # D4RL locomotion (-v2) and antmaze (-v2)
    "hopper": _D4RL,
    "halfcheetah": _D4RL,
    "walker2d": _D4RL,
    "antmaze": _D4RL,
    # OGBench, offline script: discount 0.995 for navigation, 0.99 for manipulation; min for antmaze
    "antmaze-large-navigate": _ogbench_offline(0.995, "min"),
    "antmaze-giant-navigate": _ogbench_offline(0.995, "min"),
    "humanoidmaze-medium-navigate": _ogbench_offline(0.995, "mean"),
    "humanoidmaze-large-navigate": _ogbench_offline(0.995, "mean"),
    "antsoccer-arena-navigate": _ogbench_offline(0.995, "mean"),
    "cube-single-play": _ogbench_offline(0.99, "mean"),
    "cube-double-play": _ogbench_offline(0.99, "mean"),
    "scene-play": _ogbench_offline(0.99, "mean"),
    "puzzle-3x3-play": _ogbench_offline(0.99, "mean"),
    "puzzle-4x4-play": _ogbench_offline(
        0.99, "mean", train_budget=3, vgf_lr=PUZZLE_4X4_SWEEP["vgf_lr"][0], alpha=PUZZLE_4X4_SWEEP["alpha"][0]
    ),
}

# The per-environment amortised table: the authors' offline-to-online script, not the offline one.
OFFLINE_TO_ONLINE_PRESETS: dict[str, dict[str, Any]] = {
    "antmaze-large": {**_D4RL, "alpha": 0.1},  # D4RL antmaze-large, 500k offline + 1M online
    "antmaze-large-navigate": _ogbench_offline_to_online(5, 0.1, 0.995, "min"),
    "antmaze-giant-navigate": _ogbench_offline_to_online(5, 0.1, 0.995, "min"),
    "humanoidmaze-medium-navigate": _ogbench_offline_to_online(1, 0.05, 0.995, "mean"),
    "humanoidmaze-large-navigate": _ogbench_offline_to_online(1, 0.05, 0.995, "mean"),
    "antsoccer-arena-navigate": _ogbench_offline_to_online(2, 0.05, 0.995, "mean"),
    "cube-single-play": _ogbench_offline_to_online(1, 0.05, 0.99, "mean"),
    "cube-double-play": _ogbench_offline_to_online(1, 0.05, 0.99, "mean"),
    "scene-play": _ogbench_offline_to_online(1, 0.1, 0.99, "mean"),
    "puzzle-3x3-play": _ogbench_offline_to_online(5, 0.1, 0.99, "mean"),
    "puzzle-4x4-play": _ogbench_offline_to_online(5, 0.1, 0.99, "mean"),
}
PRESET_SOURCES = {"offline": PRESETS, "offline-to-online": OFFLINE_TO_ONLINE_PRESETS}


def preset(name: str, source: str = "offline", **overrides: Any) -> VGFConfig:
    """The config for task ``name``: the longest key of the ``source`` table that ``name`` starts with, then
    ``overrides``. ``source`` is "offline" (`PRESETS`, the authors' offline scripts) or "offline-to-online"
    (`OFFLINE_TO_ONLINE_PRESETS`, their offline-to-online scripts, the amortised variant on OGBench).

    ``preset("cube-double-play-singletask-task2-v0")`` gives the cube-double settings; D4RL names such as
    ``"hopper-medium-v2"`` or ``"antmaze-large-diverse-v2"`` match their family. Unknown names raise.
    """
    if source not in PRESET_SOURCES:
        raise ValueError(f"preset source must be one of {tuple(PRESET_SOURCES)}, got {source!r}")
    table = PRESET_SOURCES[source]
    matches = [key for key in table if name == key or name.startswith(key + "-")]
    if not matches:
        raise ValueError(f"no VGF preset ({source}) for task {name!r}; known task families: {sorted(table)}")
    return VGFConfig.from_dict({**table[max(matches, key=len)], **overrides})


__all__ = ["HEAD_AGGREGATIONS", "OFFLINE_TO_ONLINE_PRESETS", "PRESETS", "PRESET_SOURCES", "REFERENCES", "VARIANTS", "VGFConfig", "preset"]
