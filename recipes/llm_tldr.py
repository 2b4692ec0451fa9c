"""The paper's LLM setting (TL;DR summarisation, Anthropic-HH): a budget sweep of VGF against best-of-N, judged.

    python recipes/llm_tldr.py --tiny --out out/llm_tiny          # CI: installed models, built-in prompts, CPU
    python recipes/llm_tldr.py --data tldr_test.jsonl --prompt-field prompt --reference-field summary \\
        --base <SFT model> --reward-model <reward model> --judge my_judges:gpt4_judge \\
        --num-samples 16 --budgets 0 4 8 16 --bon-sizes 16 64 --device cuda --out out/tldr

Full mode reads a dataset the user has (datasets cannot be downloaded here): a local JSONL file or a
``datasets.save_to_disk`` folder, one prompt per row (HH: the dialogue so far; TL;DR: the post and the
"TL;DR:" cue) and optionally a reference answer (TL;DR's human summary, HH's chosen reply). For each prompt
the base model answers ``--num-samples`` times; best-of-N (N in ``--bon-sizes``, on the first N of
max(sizes) answers) and VGF at each ``--budgets`` W2 radius (on the first ``--num-samples`` answers) choose
one answer; every generation is written to ``generations.jsonl`` with its reward and cost, then judged
against the reference (``--judge module:function``, the protocol of ``vgf_prob.llm.judge``: ``judge(prompts,
responses, references) -> wins in [0, 1]``; a GPT-4 judge is such a function). ``summary.json`` has the win
rate per method with its cost per prompt (reward-model forward and forward+backward passes, LM samples).

``--tiny`` runs the same pipeline on the models this project installs (SmolLM2-135M-Instruct, a MiniLM proxy
reward model fitted to VADER on the fly), four built-in prompts with written references, and the
fluency-gated VADER judge; it checks the plumbing, not the paper's numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from vgf_prob.budget import DisplacementBudget, StepBudget
from vgf_prob.flows import Euler, SteinField
from vgf_prob.llm import BaseLanguageModel, BestOfN, RewardModel, VGFRefiner, chat_template
from vgf_prob.llm.judge import FluencyGatedSentiment, ScoreJudge, vader_compound
from vgf_prob.transport import ValueGradientFlow

TINY = (
    ("Write one sentence about doing laundry.", "Folding warm, fresh laundry is quietly satisfying."),
    ("Describe a bus stop in one sentence.", "A sheltered bench where neighbours chat while they wait."),
    ("Write one sentence about a rainy weekend.", "A rainy weekend is perfect for books and hot tea."),
    ("Describe a library in one sentence.", "A calm, bright room full of stories waiting to be read."),
)


def load_rows(path: Path, prompt_field: str, reference_field: str | None, limit: int | None) -> list[tuple[str, str | None]]:
    """(prompt, reference) rows from a JSONL file or a ``save_to_disk`` dataset folder."""
    if path.is_dir():
        from datasets import load_from_disk

        records = list(load_from_disk(str(path)))
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if records and prompt_field not in records[0]:
        raise KeyError(f"{path}: rows have no field {prompt_field!r}; fields are {sorted(records[0])}")
    rows = [(r[prompt_field], r.get(reference_field) if reference_field else None) for r in records]
    return rows[:limit] if limit is not None else rows


def load_judge(spec: str):
    """'module:function' -> the judge callable."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--judge must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def full_models(args: argparse.Namespace) -> tuple[BaseLanguageModel, RewardModel]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    lm = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(args.device)
    base = BaseLanguageModel(lm, AutoTokenizer.from_pretrained(args.base))
    tokenizer = AutoTokenizer.from_pretrained(args.reward_model)
    rm = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, dtype=dtype).to(args.device)
    template = chat_template(tokenizer) if getattr(tokenizer, "chat_template", None) else "{prompt}\n{response}"
    return base, RewardModel(rm, tokenizer, template=template, batch_size=args.rm_batch_size)


def tiny_models(args: argparse.Namespace, prompts: Sequence[str]) -> tuple[BaseLanguageModel, RewardModel]:
    """SmolLM2 and the demo's MiniLM proxy, its head fitted to VADER on the base model's answers to the prompts."""
    from vgf_prob.llm.demo import minilm_reward_model, quiet_transformers
    from vgf_prob.llm.reference import load_smollm2
    from vgf_prob.llm.reward_head import fit_reward_head

    with quiet_transformers():
        base = load_smollm2()
        reward = minilm_reward_model(layers=2)
    base.model.to(args.device)
    reward.model.to(args.device)
    with base.uncounted():
        train = base.sample(prompts, 8, max_new_tokens=args.max_new_tokens, seed=args.seed + 1)
    fit_reward_head(reward, prompts, train, torch.stack([vader_compound(g) for g in train]))
    return base, reward


def methods(args: argparse.Namespace, reward: RewardModel) -> dict[str, tuple[int, object]]:
    """name -> (answers used, method): best-of-N per size, VGF per budget (budget 0 is best-of-num_samples)."""
    table = {f"best-of-{n}": (n, BestOfN(reward)) for n in args.bon_sizes}
    for radius in args.budgets:
        if radius == 0:
            table.setdefault(f"best-of-{args.num_samples}", (args.num_samples, BestOfN(reward)))
            continue
        flow = ValueGradientFlow(SteinField(alpha=args.alpha), Euler(args.step_size),
                                 budget=DisplacementBudget(radius) & StepBudget(args.max_steps))  # fmt: skip
        table[f"VGF-{args.num_samples} r={radius:g}"] = (args.num_samples, VGFRefiner(reward, flow))
    return table


def run(args: argparse.Namespace) -> dict:
    if args.tiny:
        rows = list(TINY)
        base, reward = tiny_models(args, [p for p, _ in rows])
        with_gate = FluencyGatedSentiment(lambda p, t: _per_token(base, p, t), tau=-4.0)
        judge = ScoreJudge(with_gate)
    else:
        rows = load_rows(args.data, args.prompt_field, args.reference_field, args.limit)
        base, reward = full_models(args)
        judge = load_judge(args.judge)
    prompts = [p for p, _ in rows]
    most = max([args.num_samples, *args.bon_sizes])
    # one answer more than the methods use: the reference (a plain sample of the base model) where rows have none
    samples = base.sample(prompts, most + 1, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)  # fmt: skip
    references = [ref if ref is not None else group[-1] for (_, ref), group in zip(rows, samples)]
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    with (args.out / "generations.jsonl").open("w") as handle:
        for name, (n, method) in methods(args, reward).items():
            refinement = method(prompts, [group[:n] for group in samples])
            wins = judge(prompts, refinement.responses, references)
            cost = refinement.cost.per_prompt(len(prompts))
            for report, win, reference in zip(refinement.reports, wins, references):
                handle.write(json.dumps({"method": name, "prompt": report.prompt, "response": report.response,
                                         "sampled": report.reference, "reference": reference, "reward": report.reward_after,
                                         "win": win, "edit_distance": report.edit_distance}) + "\n")  # fmt: skip
            summary[name] = {"win_rate": sum(wins) / len(wins), "reward": refinement.mean("reward_after"), "cost": cost}
            print(f"{name:<18} win rate {summary[name]['win_rate']:.3f}  reward {summary[name]['reward']:.3f}  "
                  f"RM forward/prompt {cost['rm_forward']:.0f} (+backward {cost['rm_backward']:.0f})  "
                  f"LM samples/prompt {cost['lm_samples']:.0f}", flush=True)  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps({"prompts": len(prompts), "methods": summary}, indent=1))
    return summary


def _per_token(base: BaseLanguageModel, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
    with base.uncounted():
        total, count = base.log_likelihood(prompts, texts)
    return torch.where(count > 0, total / count.clamp_min(1), -float("inf"))


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="installed models, built-in prompts, gated-VADER judge")
    parser.add_argument("--data", type=Path, help="JSONL file or datasets.save_to_disk folder (full mode)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--reference-field", help="reference answer field (default: a fresh base-model sample)")
    parser.add_argument("--limit", type=int, help="use the first K rows")
    parser.add_argument("--base", help="SFT / base causal LM (path or hub id)")
    parser.add_argument("--reward-model", help="sequence classifier with one label (path or hub id)")
    parser.add_argument("--judge", help="module:function, judge(prompts, responses, references) -> wins in [0, 1]")
    parser.add_argument("--num-samples", type=int, default=16, help="VGF's particles N per prompt")
    parser.add_argument("--bon-sizes", type=int, nargs="+", default=[16, 64], help="best-of-N sizes")
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 8.0, 16.0], help="VGF W2 radii (0 = best-of-N)")
    parser.add_argument("--max-steps", type=int, default=20, help="step cap of every flow")
    parser.add_argument("--step-size", type=float, default=4.0, help="Euler step")
    parser.add_argument("--alpha", type=float, default=1.0, help="Stein temperature")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--rm-batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("llm_tldr_out"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_samples, args.bon_sizes, args.budgets = 4, [2, 4], [0.0, 8.0]
        args.max_steps, args.max_new_tokens, args.temperature, args.top_p = 3, 16, 1.0, 0.95
    elif not (args.data and args.base and args.reward_model and args.judge):
        parser.error("full mode needs --data, --base, --reward-model and --judge (or use --tiny)")
    if args.num_samples < 1 or min(args.bon_sizes) < 1 or min(args.budgets) < 0:
        parser.error("--num-samples and --bon-sizes must be >= 1 and --budgets >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
