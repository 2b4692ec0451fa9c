"""From VGF-refined answers to a DPO step: sample, refine, export preference pairs, train with TRL (CPU, seconds).

    python examples/llm_dpo.py --out /tmp/dpo      # tiny random models built from configs, one DPOTrainer step

1. A base model answers each prompt N times (``BaseLanguageModel.sample``).
2. ``VGFRefiner`` moves the answers along a reward model's gradient and picks the best decoded one.
3. ``preference_pairs`` writes (prompt, chosen = refined, rejected = sampled) rows in TRL's DPO format.
4. ``trl.DPOTrainer`` takes one optimiser step on them (``--steps`` for more).

With real models, replace the three ``tiny_*`` builders by ``from_pretrained`` calls; nothing else changes.
Needs the ``trl`` extra: pip install -c constraints.txt -e ".[trl]".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from vgf_prob import DisplacementBudget, Euler, StepBudget, ValueGradient, ValueGradientFlow
from vgf_prob.llm import BaseLanguageModel, RewardModel, VGFRefiner
from vgf_prob.llm.export import preference_pairs

WORDS = ("the a day was is and but it dog cat park rain sun very good great bad sad awful fine nice cold warm calm "
         "dull happy quiet loud . !").split()  # fmt: skip
PROMPTS = ["the day was", "my dog is", "the park is", "it was"]


def tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_base(tokenizer, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_reward_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed + 1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         num_labels=1, initializer_range=0.5)  # fmt: skip
    return LlamaForSequenceClassification(config)


def run(out: Path, steps: int = 1, seed: int = 0) -> dict:
    """Sample, refine, export and train; returns the pairs and the trainer's log."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = tiny_tokenizer()
    policy = tiny_base(tokenizer, seed)
    base = BaseLanguageModel(policy, tokenizer, chat=False)
    reward = RewardModel(tiny_reward_model(tokenizer, seed), tokenizer, template="{prompt} {response}")
    responses = base.sample(PROMPTS, num_samples=4, max_new_tokens=6, seed=seed)
    flow = ValueGradientFlow(ValueGradient(), Euler(2.0), budget=DisplacementBudget(8.0) & StepBudget(10))
    refinement = VGFRefiner(reward, flow)(PROMPTS, responses)
    pairs = preference_pairs(refinement)
    if not pairs:
        raise RuntimeError("the flow improved no answer: no preference pairs to train on")
    reference = copy.deepcopy(policy).eval()  # pi_ref = the model the answers were sampled from
    policy.train()
    config = DPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=32, seed=seed)  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    moved = max(float((a - b).abs().max()) for a, b in zip(policy.parameters(), reference.parameters()))
    result = {"pairs": pairs, "log": trainer.state.log_history, "cost": refinement.cost.per_prompt(len(PROMPTS)),
              "parameter_change": moved}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("dpo_tiny"), help="trainer output and pairs.jsonl")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args.out, args.steps, args.seed)
    print(f"{len(result['pairs'])} preference pairs, e.g. {result['pairs'][0]}")
    print(f"trainer log: {result['log']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
