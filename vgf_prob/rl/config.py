"""Hyperparameters of the offline-RL VGF agent, with the paper's defaults and per-task presets.

Every field of `VGFConfig` is one knob of the agent (REFERENCE.md section 3). Fields marked "variant
default" are ``None`` until the config is built, then resolved from ``variant``: the Stein variant uses
N = 10 particles and no gradient clipping, the amortised variant N = 5 and a global grad-norm clip of 1.
`preset(name)` returns the settings of the authors' scripts for a D4RL or OGBench task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

HEAD_AGGREGATIONS = ("min", "mean")
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
    head_aggregation: str = "mean"
    """How heads combine in the TD target and in acting: "min" (D4RL) or "mean" (most OGBench tasks)."""

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
    """Encode each state once per network and reuse it for every particle and flow step (same numbers
    up to float rounding); False runs the plain concat(obs, action) networks, for checking."""
    flow_autocast_bf16: bool = False
    """Run the networks inside the flows (BC sampling, value gradients, target values) under bfloat16
    autocast. Changes numerics; measure before use."""
    compile: bool = False
    """torch.compile the critic's and the BC network's forward passes. Changes numerics slightly and
    costs compile time on the first updates."""

    def __post_init__(self) -> None:
        for name in _HIDDEN_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_choice("head_aggregation", self.head_aggregation, HEAD_AGGREGATIONS)
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
        """Build a config from ``to_dict`` output (or any subset of fields); unknown keys raise ValueError."""
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


# Settings of the authors' scripts (REFERENCE.md section 3). OGBench tasks use the amortised variant and
# are matched by the dataset prefix (e.g. "cube-double-play" matches "cube-double-play-singletask-task2-v0");
# D4RL tasks use the Stein variant with min-aggregated heads. Keys not given keep VGFConfig's defaults.
_D4RL = {"variant": "stein", "head_aggregation": "min", "discount": 0.99}


def _ogbench(train_budget: int, vgf_lr: float, discount: float, head_aggregation: str) -> dict[str, Any]:
    return {"variant": "amortized", "train_budget": train_budget, "vgf_lr": vgf_lr, "discount": discount,
            "head_aggregation": head_aggregation}


PRESETS: dict[str, dict[str, Any]] = {
    # D4RL locomotion (-v2) and antmaze (-v2)
    "hopper": _D4RL,
    "halfcheetah": _D4RL,
    "walker2d": _D4RL,
    "antmaze": _D4RL,
    # OGBench default tasks (offline-to-online scripts)
    "antmaze-large-navigate": _ogbench(5, 0.1, 0.995, "min"),
    "antmaze-giant-navigate": _ogbench(5, 0.1, 0.995, "min"),
    "humanoidmaze-medium-navigate": _ogbench(1, 0.05, 0.995, "mean"),
    "humanoidmaze-large-navigate": _ogbench(1, 0.05, 0.995, "mean"),
    "antsoccer-arena-navigate": _ogbench(2, 0.05, 0.995, "mean"),
    "cube-single-play": _ogbench(1, 0.05, 0.99, "mean"),
    "cube-double-play": _ogbench(1, 0.05, 0.99, "mean"),
    "scene-play": _ogbench(1, 0.1, 0.99, "mean"),
    "puzzle-3x3-play": _ogbench(5, 0.1, 0.99, "mean"),
    "puzzle-4x4-play": _ogbench(5, 0.1, 0.99, "mean"),
}


def preset(name: str, **overrides: Any) -> VGFConfig:
    """The config for task ``name``: the longest `PRESETS` key that ``name`` starts with, then ``overrides``.

    ``preset("cube-double-play-singletask-task2-v0")`` gives the cube-double settings; D4RL names such as
    ``"hopper-medium-v2"`` or ``"antmaze-large-diverse-v2"`` match their family. Unknown names raise.
    """
    matches = [key for key in PRESETS if name == key or name.startswith(key + "-")]
    if not matches:
        raise ValueError(f"no VGF preset for task {name!r}; known task families: {sorted(PRESETS)}")
    return VGFConfig.from_dict({**PRESETS[max(matches, key=len)], **overrides})


__all__ = ["HEAD_AGGREGATIONS", "PRESETS", "REFERENCES", "VARIANTS", "VGFConfig", "preset"]
