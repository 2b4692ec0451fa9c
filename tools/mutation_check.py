"""Mutation check: plant known bugs one at a time in a copy of the repository and see which tests catch them.

    python tools/mutation_check.py                 # every mutation, on the committed HEAD
    python tools/mutation_check.py --list          # the curated mutations
    python tools/mutation_check.py -k agent -k llm # only mutations whose name contains one of these
    python tools/mutation_check.py --source worktree --json report.json

The repository (``git archive`` of a revision, or the tracked files of the working tree) is copied to a
temporary directory; the shared working tree is never touched. The package's ``package-dir`` mapping
(``vgf_prob.flows`` -> ``flows`` ...) is reproduced there by symbolic links and the copy is put first on
PYTHONPATH, so the tests import the mutated copy, not the editable install (checked before any mutation).
The tests named by each mutation are first run unmutated (they must pass), then each mutation is applied
to its file (its ``old`` text must occur exactly once, else it is reported stale), the tests run with
``-x``, and the file is restored. A mutation is caught when a test fails (exit status 1) and survives when
all pass; the report names the first failing test and its message, and the time of each run.

It runs on demand, not in CI: a full run takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AGENT = ["tests/test_spec_agent.py"]
OPERATOR = ["tests/test_spec_operator.py"]
LLM = ["tests/test_spec_llm.py"]
TRAINING = ["tests/test_spec_training.py"]
D4RL = ["tests/test_rl_data.py", "-k", "d4rl"]
SURVIVORS = ["tests/test_mutation_survivors.py"]
ODE_BUDGET = ["tests/test_ode_budget.py", "-k", "constant"]


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (exactly one occurrence) by ``new`` in ``path``; ``tests`` are pytest arguments."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    bug: str


MUTATIONS = [
    # ---- the agent's TD target and acting (REFERENCE.md section 3)
    Mutation("agent-td-without-terminal-mask", "vgf_prob/rl/agent.py",
             'batch["rewards"] + self.config.discount * batch["masks"] * next_q',
             'batch["rewards"] + self.config.discount * next_q', tuple(AGENT),
             "TD target bootstraps through terminal transitions"),
    Mutation("agent-td-flow-driven-by-target-critic", "vgf_prob/rl/agent.py",
             "start, next_obs, critic_fn, target_fn, return_policy=True)",
             "start, next_obs, target_fn, target_fn, return_policy=True)", tuple(AGENT),
             "the TD target's flow follows the target critic instead of the online one"),
    Mutation("agent-flow-min-of-heads", "vgf_prob/rl/agent.py",
             "aggregation=self.config.flow_aggregation,", 'aggregation="min",', tuple(AGENT),
             "the agent's flow climbs min over heads instead of flow_aggregation (mean)"),
    Mutation("agent-td-target-aggregation-ignored", "vgf_prob/transport.py",
             "q = _score(target_value, next_obs, policy.particles, self.target_aggregation)",
             "q = _score(target_value, next_obs, policy.particles, self.aggregation)", tuple(AGENT),
             "TD-target values combine heads by the flow's aggregation"),
    Mutation("agent-td-max-over-particles", "vgf_prob/transport.py",
             'v = q.mean(-1) if reduction == "mean" else q.amax(-1)', "v = q.amax(-1)", tuple(AGENT),
             "TD target takes the best particle instead of the mean over particles"),
    Mutation("agent-act-chooses-by-flow-aggregation", "vgf_prob/transport.py",
             '_score(value, obs, policy.particles, self.target_aggregation)',
             '_score(value, obs, policy.particles, self.aggregation)', tuple(AGENT),
             "acting picks the particle by the flow's head aggregation"),
    # ---- the operator and its budgets (REFERENCE.md section 2)
    Mutation("operator-aggregation-ignored", "vgf_prob/transport.py",
             "aggregated = CountingValue(HeadAggregation(value, self.aggregation))",
             'aggregated = CountingValue(HeadAggregation(value, "mean"))',
             tuple(OPERATOR), "ValueGradientFlow(aggregation=...) has no effect"),
    Mutation("budget-displacement-summed-over-particles", "vgf_prob/budget.py",
             "return (x - x0).square().sum(-1).mean(-1).sqrt()", "return (x - x0).square().sum(-1).sum(-1).sqrt()",
             tuple(OPERATOR), "the W2 displacement bound sums over particles instead of averaging"),
    Mutation("budget-displacement-not-enforced", "vgf_prob/budget.py",
             "projected = x0 + (x_new - x0) * scale[:, None, None]", "projected = x_new", tuple(OPERATOR),
             "DisplacementBudget measures but never projects back onto its ball"),
    Mutation("budget-sinkhorn-no-cut-back", "vgf_prob/budget.py",
             "return x_new.index_copy(0, crossing, start + low[:, None, None] * step), over", "return x_new, over",
             tuple(OPERATOR), "a step that crosses the Sinkhorn radius is kept whole"),
    Mutation("budget-steps-off-by-one", "flows/solvers.py",
             "active = active & (step < allowance)", "active = active & (step <= allowance)", tuple(OPERATOR),
             "per-state step budgets allow one step too many"),
    Mutation("adam-without-bias-correction", "flows/solvers.py",
             'm_hat = state["m"] / (1.0 - beta1 ** (step + 1))', 'm_hat = state["m"]', tuple(OPERATOR),
             "ParticleAdam drops Adam's first-moment bias correction"),
    Mutation("box-projection-skipped", "vgf_prob/transport.py",
             "return x if self.projection is None else self.projection(x)", "return x", tuple(OPERATOR),
             "particles are never clipped to the action box"),
    Mutation("stein-bandwidth-log-n", "flows/fields.py",
             "log_term = 2.0 * math.log(n + 1)", "log_term = 2.0 * math.log(n)", tuple(OPERATOR),
             "median heuristic divides by 2 log N instead of 2 log(N + 1)"),
    Mutation("kernel-median-lower-middle", "flows/kernels.py",
             "positions, weight = [count // 2 - 1, count // 2], 0.5", "positions, weight = [count // 2 - 1], 1.0",
             tuple(OPERATOR),
             "for even N*N the median takes the lower middle entry (torch.median) instead of the mean of two"),
    Mutation("stein-repulsion-sign", "flows/fields.py",
             "    return kernel, -grad\n", "    return kernel, grad\n", tuple(OPERATOR),
             "the Stein repulsion pulls particles together instead of apart"),
    Mutation("stein-bandwidth-gradient-dropped", "flows/fields.py",
             "        if through_bandwidth:\n", "        if False:\n", ("tests/test_parity.py",),
             "the paper's Stein step loses the gradient through the median bandwidth"),
    # ---- LLM value (vgf_prob/llm/reward.py)
    Mutation("llm-straight-through-removed", "vgf_prob/llm/reward.py",
             "tokens = tokens + (snapped - tokens).detach()", "tokens = tokens", tuple(LLM),
             "the reward is read at the moved embeddings instead of the decoded tokens"),
    # ---- training loop, evaluation, resume
    Mutation("trainer-eval-ignores-success-timing", "vgf_prob/rl/run/trainer.py",
             "env_kwargs = default_env_kwargs(dataset)", "env_kwargs = {}", tuple(TRAINING),
             "train() evaluates OGBench with the environment's default success timing, not the dataset's"),
    Mutation("cli-eval-ignores-success-timing", "vgf_prob/rl/run/experiment.py",
             'env_kwargs = {} if timing is None else {"success_timing": timing}', "env_kwargs = {}", tuple(TRAINING),
             "`vgf-prob eval` ignores the success timing recorded with the run"),
    Mutation("resume-without-metrics-window", "vgf_prob/rl/run/trainer.py",
             'self.window.load_state_dict(payload["logs"]["window"], torch.device(self.spec.device))', "pass",
             tuple(TRAINING),
             "resume starts an empty metrics window (the README promises it is restored)"),
    Mutation("resume-keeps-eval-rows-after-checkpoint", "vgf_prob/rl/run/logs.py",
             "self.eval.truncate(positions[EVAL_LOG])", "pass", tuple(TRAINING),
             "resume keeps the evaluation rows a killed run wrote after its last checkpoint"),
    Mutation("resume-cuts-log-mid-row", "vgf_prob/rl/run/logs.py",
             'if position and content[position - 1 : position] != b"\\n":', "if False:",
             ("tests/test_faults.py", "-k", "row_end"),
             "resume cuts a log that no longer matches its checkpoint in the middle of a row"),
    Mutation("eval-success-at-any-step", "vgf_prob/rl/evaluate.py",
             'successes[k] = bool(info.get("success", False))',
             'successes[k] = successes[k] or bool(info.get("success", False))',
             ("tests/test_rl_evaluate.py", "-k", "final_steps"),
             "an episode counts as a success when it touched the goal at any step, not at its last one"),
    Mutation("eval-actions-unclipped", "vgf_prob/rl/evaluate.py",
             'np.clip(actions.detach().to("cpu", torch.float64).numpy(), space.low, space.high)',
             'actions.detach().to("cpu", torch.float64).numpy()', ("tests/test_rl_evaluate.py", "-k", "final_steps"),
             "actions outside the box reach env.step"),
    # ---- D4RL data processing (REFERENCE.md section 4)
    # (masks = 1 - (terminals | timeouts)[keep] would be an equivalent mutant: timeout steps are never kept)
    Mutation("d4rl-mask-zero-at-trajectory-ends", "vgf_prob/rl/d4rl.py",
             '"masks": 1.0 - terminals[keep],', '"masks": 1.0 - last_of_trajectory,', tuple(D4RL),
             "the step before a time-limit truncation is treated as a termination (mask 0)"),
    Mutation("d4rl-keeps-timeout-step", "vgf_prob/rl/d4rl.py",
             "keep = ~timeouts & (np.arange(n) < n - 1)", "keep = np.arange(n) < n - 1", tuple(D4RL),
             "the last step of an episode ended by timeout is kept (its next_obs is the next episode's start)"),
    Mutation("d4rl-antmaze-reward-unshifted", "vgf_prob/rl/d4rl.py",
             'if mode == "antmaze":\n        return 1.0, -1.0', 'if mode == "antmaze":\n        return 1.0, 0.0',
             tuple(D4RL), "antmaze rewards are not shifted by -1"),
    Mutation("d4rl-actions-unclipped", "vgf_prob/rl/d4rl.py",
             "D4RL_ACTION_BOUND = 1.0 - 1e-5", "D4RL_ACTION_BOUND = 1.0", tuple(D4RL),
             "dataset actions are clipped to +-1 instead of +-(1 - 1e-5)"),
    # ---- issue 24: the survivors of 39 planted mutations, now caught by tests/test_mutation_survivors.py
    Mutation("as-value-probe-first-two-states", "vgf_prob/values.py",
             "states = torch.tensor([0, other], device=actions.device)",
             "states = torch.tensor([0, 1], device=actions.device)", tuple(SURVIVORS),
             "as_value's layout probe takes states 0 and 1 instead of two states with different obs"),
    Mutation("as-value-result-not-cast-back", "vgf_prob/values.py",
             "return self._values(layout, obs_in, actions_in).to(actions.dtype)",
             "return self._values(layout, obs_in, actions_in)", tuple(SURVIVORS),
             "as_value returns the critic's dtype instead of the actions'"),
    Mutation("transport-uniform-steps-max", "vgf_prob/transport.py",
             "return int(min(counts)) if counts else None", "return int(max(counts)) if counts else None",
             tuple(SURVIVORS), "the host-side step count shared by all states is the largest limit, not the smallest"),
    Mutation("ode-time-allowance-ignored", "flows/solvers.py",
             "constraint, allowance >= stop, start, stop)", "constraint, allowance >= 0, start, stop)",
             tuple(ODE_BUDGET), "the ODE solver moves every state to the longest horizon"),
    Mutation("ode-outward-velocity-kept", "flows/solvers.py",
             "velocity = torch.where(constraint.outward_velocity(x, velocity), 0.0, velocity)",
             "velocity = velocity", tuple(SURVIVORS),
             "inside an ODE solve, velocity pushing out of the box is kept (and spends displacement budget)"),
    Mutation("smoothed-gradient-not-averaged", "flows/fields.py",
             "return kernel @ score / x.shape[-2]", "return kernel @ score", tuple(SURVIVORS),
             "the kernel-smoothed gradient sums over particles instead of averaging"),
    Mutation("kernel-bandwidth-log-n", "flows/kernels.py",
             "(2.0 * math.log(n + 1))", "(2.0 * math.log(n))", tuple(SURVIVORS),
             "median_bandwidth divides by 2 log N instead of 2 log(N + 1)"),
    Mutation("kernel-cross-distance-factor", "flows/kernels.py",
             "- 2.0 * x @ y.transpose(-1, -2)", "- x @ y.transpose(-1, -2)", tuple(SURVIVORS),
             "the two-cloud squared distance drops the 2 in -2 x y^T"),
    Mutation("tanh-target-times-half-width", "distributions/flow_matching.py",
             "torch.atanh(((actions - center) / half)", "torch.atanh(((actions - center) * half)", tuple(SURVIVORS),
             "the tanh bound's BC target multiplies by the half-width instead of dividing"),
    Mutation("softmax-times-temperature", "distributions/particle.py",
             "logits = scores / temperature", "logits = scores * temperature", tuple(SURVIVORS),
             "softmax selection multiplies Q by the temperature instead of dividing"),
    Mutation("minari-keys-unsorted", "vgf_prob/rl/minari_data.py",
             "keys = sorted(obs) if obs_keys is None", "keys = list(obs) if obs_keys is None", tuple(SURVIVORS),
             "dict observations are concatenated in insertion order, not sorted key order"),
    Mutation("llm-token-at-response-end", "vgf_prob/llm/embedding_space.py",
             "not sp and s < end and e > start", "not sp and s <= end and e > start", tuple(SURVIVORS),
             "a token starting exactly at the response's end counts as response"),
    Mutation("llm-padding-slots-not-zeroed", "vgf_prob/llm/reward.py",
             "self.embedding_matrix[batch.response_ids].float() * batch.response_mask[..., None]",
             "self.embedding_matrix[batch.response_ids].float()", tuple(SURVIVORS),
             "response particles hold E[pad] in their padding slots instead of zeros"),
    Mutation("llm-decode-tie-replaces", "vgf_prob/llm/decode.py",
             "original.float()) >= best_score)", "original.float()) > best_score)", tuple(SURVIVORS),
             "on a tie the decoder replaces the original token"),
]


@dataclass
class Outcome:
    name: str
    status: str  # caught / survived / stale / error / timeout
    seconds: float
    test: str = ""
    message: str = ""
    bug: str = ""


def copy_repository(source: str, revision: str, target: Path) -> None:
    """The repository at ``revision`` (``source='head'``) or its tracked working-tree files, into ``target``."""
    if source == "head":
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision], check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    else:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True, capture_output=True).stdout
        for name in filter(None, listed.decode().split("\0")):
            origin = REPO / name
            if origin.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / name)
    # derandomised Hypothesis still shrinks a failure, which can take minutes with slow examples: a mutant
    # only needs to fail, so the runs here load a profile without the shrink phase
    (target / "_mutation_hypothesis.py").write_text(
        "from hypothesis import Phase, settings\n"
        "settings.register_profile('mutation', phases=(Phase.explicit, Phase.reuse, Phase.generate))\n"
        "settings.load_profile('mutation')\n"
    )
    mapping = tomllib.loads((target / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
    for package, folder in mapping.items():
        link = target.joinpath(*package.split("."))
        if link != target / folder:
            if not link.exists():
                link.symlink_to(target / folder, target_is_directory=True)


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # COLUMNS: pytest's short summary keeps the failure message instead of cutting it at 80 characters
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", COLUMNS="400")
    return env


def check_imports_the_copy(copy: Path) -> None:
    code = ("import vgf_prob, vgf_prob.flows, vgf_prob.distributions, vgf_prob.rl.agent, vgf_prob.llm.reward;"
            "print('\\n'.join(m.__file__ for m in (vgf_prob, vgf_prob.flows, vgf_prob.distributions)))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=copy, env=environment(copy), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the copy in {copy} does not import:\n{done.stderr[-2000:]}")
    files = done.stdout.split()
    outside = [f for f in files if not Path(f).resolve().is_relative_to(copy.resolve())]
    if outside:
        raise SystemExit(f"the copy does not shadow the installed package: {outside} import from outside {copy}")


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "--no-header", "-p", "no:cacheprovider",
               "-p", "_mutation_hypothesis", *tests]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    return done.returncode, done.stdout + done.stderr


def first_failure(output: str) -> tuple[str, str]:
    """(test id, message) of the first FAILED/ERROR line of pytest's short summary; a message that is only
    an exception name (e.g. numpy's multi-line assertions) is completed by the first "E" lines of the trace."""
    for line in output.splitlines():
        match = re.match(r"(?:FAILED|ERROR) (\S+)(?: - (.*))?", line)
        if match:
            message = (match.group(2) or "").strip()
            if not message or message.endswith(":"):
                details = [e[1:].strip() for e in output.splitlines() if e.startswith("E ") and e[1:].strip()]
                message = " | ".join(details[:3])
            return match.group(1), message
    return "", ""


def check(mutation: Mutation, copy: Path, timeout: float) -> Outcome:
    path = copy / mutation.path
    original = path.read_text()
    count = original.count(mutation.old)
    if count != 1:
        return Outcome(mutation.name, "stale", 0.0, message=f"'old' text found {count} times in {mutation.path}",
                       bug=mutation.bug)  # fmt: skip
    path.write_text(original.replace(mutation.old, mutation.new))
    started = time.perf_counter()
    try:
        code, output = run_tests(copy, mutation.tests, timeout)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - started
    if code is None:
        return Outcome(mutation.name, "timeout", seconds, bug=mutation.bug)
    test, message = first_failure(output)
    status = {0: "survived", 1: "caught"}.get(code, "error")
    if status == "error" and not message:
        message = output.strip().splitlines()[-1] if output.strip() else f"pytest exit status {code}"
    return Outcome(mutation.name, status, seconds, test, message[:300], mutation.bug)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", action="append", default=[], help="run mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--source", choices=("head", "worktree"), default="head",
                        help="copy the committed revision (default) or the tracked files of the working tree")
    parser.add_argument("--rev", default="HEAD", help="revision to copy with --source head")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.select or any(s in m.name for s in args.select)]
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.path:28s} {m.bug}")
        return 0
    if not chosen:
        parser.error(f"no mutation matches {args.select}")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vgf-mutation-") as tmp:
        copy = Path(tmp)
        copy_repository(args.source, args.rev, copy)
        check_imports_the_copy(copy)
        broken = {}  # test sets that fail unmutated: their mutations cannot be judged
        for tests in dict.fromkeys(m.tests for m in chosen):
            code, output = run_tests(copy, tests, args.timeout)
            if code != 0:
                test, message = first_failure(output)
                broken[tests] = f"unmutated baseline fails: {test} {message}".strip()
                print(f"{broken[tests]}\n{output[-3000:]}", file=sys.stderr)
        baseline = time.perf_counter() - started
        outcomes = []
        for mutation in chosen:
            if mutation.tests in broken:
                outcome = Outcome(mutation.name, "error", 0.0, message=broken[mutation.tests], bug=mutation.bug)
            else:
                outcome = check(mutation, copy, args.timeout)
            outcomes.append(outcome)
            where = f"{outcome.test}: {outcome.message}" if outcome.test else outcome.message
            print(f"{outcome.status:9s} {outcome.seconds:6.1f} s  {mutation.name}  {where}", flush=True)
    total = time.perf_counter() - started
    counts = {s: sum(o.status == s for o in outcomes) for s in ("caught", "survived", "stale", "error", "timeout")}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.rev], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    print(f"\n{len(outcomes)} mutations: {summary}; {total:.0f} s in all ({baseline:.0f} s unmutated baseline), "
          f"source {args.source} {revision if args.source == 'head' else ''}".rstrip())  # fmt: skip
    for o in outcomes:
        if o.status != "caught":
            print(f"  {o.status}: {o.name} ({o.bug}) {o.message}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": total, "baseline_seconds": baseline, "source": args.source,
                                         "revision": revision, "counts": counts,
                                         "outcomes": [asdict(o) for o in outcomes]}, indent=2))  # fmt: skip
    return 0 if counts["caught"] == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
