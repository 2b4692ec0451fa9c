"""Policy evaluation in the real environments of D4RL and OGBench, and the one comparison of policies.

`evaluate` runs full episodes with a torch ``act_fn``, many environments in lockstep so that one ``act_fn``
call serves a batch of them; episode ``k`` always resets with seed ``seed + k``, so results do not depend
on how many environments run at once. `compare_policies` is the one driver that scores the BC reference,
best-of-N and VGF at each budget (plus any extra `Policy` a caller adds) on the same seeded episodes, for
training evaluations, ``vgf-prob eval``, budget sweeps and recipe reports alike. Each result is one
`ScoreRow` (the one row schema: eval.csv, sweep JSON and reports), named by `policy_label` and rendered by
`format_table` / `format_scores`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from io import StringIO
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from vgf_prob.rl.envs import make_envs, resolve_env_name

ActFn = Callable[[Tensor], Tensor]
BUDGET_TYPES = ("steps", "displacement", "sinkhorn")


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


# ============================================================================================ one row schema
@dataclass(frozen=True)
class ScoreRow:
    """One policy's score over one set of seeded episodes: the row of eval.csv, sweeps, reports and the frontier.

    ``budget`` is the transport budget the policy acted with (``budget_type`` "steps": L_test, a whole
    number; "displacement" / "sinkhorn": a radius), None for a policy without a flow (the BC reference).
    ``score`` and ``score_std`` are the mean and population std over episodes of the per-episode score
    (``score_kind``: D4RL normalised score, success rate in %, or return); ``mean_return`` / ``return_std``
    the same for the undiscounted return.

    The optional columns (`OPTIONAL_COLUMNS`, None when not measured; eval.csv keeps `ROW_COLUMNS` only):
    ``score_low`` / ``score_high``, the episode interval of the score (mean ± 1.96 standard errors, None for
    one episode); ``num_particles``, the N acted with (None: the agent's); and the cost per action counted
    while the episodes ran (`COST_COLUMNS`, `vgf_prob.cost`): critic-pass equivalents (a BC Euler step = 1,
    a value evaluation = 1, a value-gradient evaluation = 2), wall and CPU milliseconds inside the act calls,
    and the rows of each kind.
    """

    policy: str
    budget: int | float | None
    budget_type: str | None
    score: float
    score_std: float
    mean_return: float
    return_std: float
    episodes: int
    score_kind: str
    score_low: float | None = None
    score_high: float | None = None
    num_particles: int | None = None
    passes_per_action: float | None = None
    ms_per_action: float | None = None
    cpu_ms_per_action: float | None = None
    reference_passes_per_action: float | None = None
    value_evaluations_per_action: float | None = None
    value_gradient_evaluations_per_action: float | None = None
    particles_per_action: float | None = None

    @property
    def label(self) -> str:
        return policy_label(self.policy, self.budget, self.budget_type)

    def to_dict(self) -> dict[str, Any]:
        """`ROW_COLUMNS`, then the optional columns that were measured (not None)."""
        values = asdict(self)
        return {k: v for k, v in values.items() if k in ROW_COLUMNS or v is not None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ScoreRow:
        """A row from `to_dict` or from a CSV row (text cells; an empty budget or optional cell is None)."""
        kind = values["budget_type"] or None
        budget = values["budget"]
        if budget in ("", None):
            budget = None
        elif isinstance(budget, str):
            budget = int(budget) if kind == "steps" else float(budget)
        optional = {k: (int if k == "num_particles" else float)(values[k]) for k in OPTIONAL_COLUMNS
                    if values.get(k) not in ("", None)}  # fmt: skip
        return cls(values["policy"], budget, kind, float(values["score"]), float(values["score_std"]),
                   float(values["mean_return"]), float(values["return_std"]), int(values["episodes"]),
                   values["score_kind"], **optional)  # fmt: skip


COST_COLUMNS = (
    "passes_per_action", "ms_per_action", "cpu_ms_per_action", "reference_passes_per_action",
    "value_evaluations_per_action", "value_gradient_evaluations_per_action", "particles_per_action",
)  # fmt: skip
OPTIONAL_COLUMNS = ("score_low", "score_high", "num_particles", *COST_COLUMNS)
ROW_COLUMNS = tuple(f.name for f in fields(ScoreRow) if f.name not in OPTIONAL_COLUMNS)
EPISODE_Z = 1.959963984540054  # the normal 97.5 % quantile: a 95 % interval of the episode mean


def score_row(policy: str, budget: int | float | None, budget_type: str | None, result: EvalResult,
              cost: Any = None, num_particles: int | None = None) -> ScoreRow:
    """The `ScoreRow` of an `evaluate` result: its episode interval, and with a `vgf_prob.cost.Cost` meter that
    served states, its cost per action (`COST_COLUMNS`)."""
    n = result.num_episodes
    half = EPISODE_Z * result.score_std / math.sqrt(n - 1) if n > 1 else None
    per_action = cost.per_state() if cost is not None and cost.states else {}
    costs = {f"{name}_per_action": value for name, value in per_action.items() if f"{name}_per_action" in COST_COLUMNS}
    return ScoreRow(policy, budget, budget_type, result.score, result.score_std, result.mean_return,
                    result.std_return, n, result.score_kind, None if half is None else result.score - half,
                    None if half is None else result.score + half, num_particles, **costs)  # fmt: skip


def policy_label(policy: str, budget: int | float | None = None, budget_type: str | None = "steps") -> str:
    """The one name of a policy at a budget: ``BC reference``, ``best-of-N L_test=0``, ``VGF L_test=3``,
    ``VGF displacement=0.1``."""
    if budget is None:
        return policy
    if budget_type == "steps":
        return f"{policy} L_test={int(budget)}"
    return f"{policy} {budget_type}={budget:g}"


# ============================================================================================ the comparison
@dataclass(frozen=True)
class Policy:
    """A policy to compare: ``make(agent, generator)`` returns its act function ``obs [n, O] -> actions [n, A]``.

    ``budget`` / ``budget_type`` / ``num_particles`` only name it in its `ScoreRow` (e.g. best-of-N at another
    N is ``Policy("best-of-N N=40", make, num_particles=40)``).
    """

    name: str
    make: Callable[[Any, torch.Generator], ActFn]
    budget: int | float | None = None
    budget_type: str | None = None
    num_particles: int | None = None


def make_budget(value: float, budget_type: str = "steps", max_flow_steps: int = 20) -> Any:
    """An ``agent.act`` budget: an int L_test, or a displacement / Sinkhorn radius capped at ``max_flow_steps``.

    Raises ValueError for a fractional or negative step count or an unknown ``budget_type``.
    """
    from vgf_prob.budget import DisplacementBudget, SinkhornBudget, StepBudget

    if budget_type not in BUDGET_TYPES:
        raise ValueError(f"budget type must be one of {BUDGET_TYPES}, got {budget_type!r}")
    if budget_type == "steps":
        if isinstance(value, bool) or value < 0 or not float(value).is_integer():
            raise ValueError(f"step budgets (L_test) must be whole numbers >= 0, got {value}")
        return int(value)
    kind = DisplacementBudget if budget_type == "displacement" else SinkhornBudget
    return kind(value) & StepBudget(max_flow_steps)


def standard_policies(budgets: Sequence[float], budget_type: str = "steps", max_flow_steps: int = 20) -> list[Policy]:
    """The BC reference, then per budget: best-of-N (0 flow steps) or VGF (`make_budget` of the budget)."""
    policies = [Policy("BC reference", lambda agent, g: lambda obs: agent.bc_action(obs, generator=g))]
    for value in budgets:
        budget = make_budget(value, budget_type, max_flow_steps)
        name = "best-of-N" if budget_type == "steps" and budget == 0 else "VGF"
        shown = int(value) if budget_type == "steps" else float(value)
        policies.append(Policy(name, _acting_at(budget), shown, budget_type))
    return policies


MATCHED_PREFIX = "best-of-M="  # the name of every compute-matched best-of-M policy begins so
_MATCHED_NAME = re.compile(re.escape(MATCHED_PREFIX) + r"\d+ \(matched to VGF L_test=(\d+)\)$")


def matched_budget(policy: str) -> int | None:
    """The VGF step budget L a `matched_policies` name was matched to, or None for any other policy."""
    found = _MATCHED_NAME.match(policy)
    return None if found is None else int(found.group(1))


def matched_policies(budgets: Sequence[float], num_particles: int, flow_steps: int) -> list[Policy]:
    """Per step budget L > 0: best-of-M at the M whose critic-pass equivalents equal those of VGF with N =
    ``num_particles`` particles, L steps and a ``flow_steps``-step BC sampler (`vgf_prob.rl.frontier.
    matched_particles`: M = N (K + 1 + 2L) / (K + 1)), named ``best-of-M=<M> (matched to VGF L_test=<L>)``."""
    from vgf_prob.rl.frontier import matched_particles

    policies = []
    for steps in sorted({int(b) for b in budgets if b > 0}):
        m = matched_particles(num_particles, steps, flow_steps)
        policies.append(Policy(f"{MATCHED_PREFIX}{m} (matched to VGF L_test={steps})", _acting_at(0, m),
                               num_particles=m))  # fmt: skip
    return policies


def _acting_at(budget: Any, num_particles: int | None = None) -> Callable[[Any, torch.Generator], ActFn]:
    return lambda agent, g: lambda obs: agent.act(obs, budget=budget, generator=g, num_particles=num_particles)


def compare_policies(
    agent: Any,
    env_name: str,
    budgets: Sequence[float],
    num_episodes: int,
    seed: int,
    step: int = 0,
    budget_type: str = "steps",
    max_flow_steps: int = 20,
    extra: Sequence[Policy] = (),
    env_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    matched: bool = True,
) -> list[ScoreRow]:
    """Score `standard_policies`, then (``matched``, step budgets) the compute-matched best-of-M of each VGF budget
    (`matched_policies` at the agent's N and K), then ``extra``, on the same ``num_episodes`` seeded episodes.

    Episode ``k`` of every policy resets with seed ``seed + k``; the agent's noise comes from one
    generator seeded by ``(seed, step)``, drawn from by the policies in turn, and every global RNG is
    restored afterwards (evaluating never changes training). One row per policy, in order, with its episode
    interval and its cost per action (up to 10 environments in lockstep share each act call).
    """
    from vgf_prob.cost import measure

    policies = standard_policies(budgets, budget_type, max_flow_steps)
    if matched and budget_type == "steps":
        policies += matched_policies(budgets, agent.config.num_particles, agent.config.flow_steps)
    policies += extra
    generator = torch.Generator(device=agent.device).manual_seed(mix_seed(seed, step))
    rows = []
    with preserved_rng():
        envs = make_envs(env_name, min(num_episodes, 10), **(env_kwargs or {}))
        try:
            for p in policies:
                label = policy_label(p.name, p.budget, p.budget_type)
                with measure() as cost:
                    result = evaluate(p.make(agent, generator), env_name, num_episodes, seed, device=agent.device,
                                      envs=envs, progress=progress, label=label)  # fmt: skip
                rows.append(score_row(p.name, p.budget, p.budget_type, result, cost, p.num_particles))
        finally:
            for env in envs:
                env.close()
    return rows


def mix_seed(seed: int, step: int) -> int:
    """One 32-bit seed from ``(seed, step)`` (numpy's SeedSequence): evaluation noise per evaluation step."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch's, numpy's and python's global RNG state on exit (evaluation must not move them)."""
    from vgf_prob.rl.checkpoint import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


# ============================================================================================ one renderer
SCORE_UNITS = {"success_rate": "success %", "d4rl_normalized": "D4RL score", "return": "return"}


def format_scores(rows: Sequence[ScoreRow], title: str, print_table: bool = False) -> str:
    """Score rows as the comparison table (policy, budget, score ± std, mean return ± std, episodes)."""
    kind = rows[0].score_kind if rows else "score"
    unit = SCORE_UNITS.get(kind, kind)
    types = {r.budget_type for r in rows if r.budget_type is not None}
    budget_column = "L_test" if types <= {"steps"} else "/".join(sorted(types))
    table = [
        {"policy": r.policy, budget_column: "-" if r.budget is None else r.budget,
         unit: f"{r.score:.1f} ± {r.score_std:.1f}", "mean return": f"{r.mean_return:.1f} ± {r.return_std:.1f}",
         "episodes": r.episodes}
        for r in rows
    ]  # fmt: skip
    if print_table:  # a line of its own: a rich table title wraps (mid-word) at the table's width
        print(title)
    return f"{title}\n" + format_table(table, print_table=print_table)


def format_table(rows: Sequence[Mapping[str, Any]], title: str | None = None, print_table: bool = True) -> str:
    """The one table renderer: ``rows`` (dicts; columns in order of appearance) as a rich table, printed when
    ``print_table``, and returned as plain text (floats with 2 decimals, None as ``-``)."""
    from rich.console import Console
    from rich.table import Table

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    for line in cells:
        table.add_row(*line)
    # wide enough for every cell on one line (a long policy name such as a matched best-of-M does not wrap)
    natural = 1 + sum(3 + max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns))
    width = min(max(80, 14 * len(columns), natural), 240)
    if print_table:  # never narrower than the plain-text copy: a wide table overflows rather than squeezes
        Console(width=max(Console().width, width)).print(table)
    buffer = StringIO()
    Console(file=buffer, width=width, no_color=True, color_system=None).print(table)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | np.floating):
        return f"{value:.2f}"
    return str(value)
