"""Refined answers as preference data for training: TRL's DPO dataset format.

Each prompt gives one pair: the refined (chosen) answer against the sampled answer it started from
(rejected), kept when the reward model prefers the refined one by more than ``min_margin``:

    {"prompt": x, "chosen": y_refined, "rejected": y_sampled}    (TRL's standard preference format)

or, with ``conversational=True``, the same as message lists (``[{"role": "user", "content": x}]`` and
``[{"role": "assistant", "content": y}]``), which TRL renders with the model's chat template. The pairs go
straight into ``trl.DPOTrainer(train_dataset=datasets.Dataset.from_list(pairs))``.
"""

from __future__ import annotations

from vgf_prob.llm.refine import Refinement

__all__ = ["preference_pairs"]


def preference_pairs(refinement: Refinement, min_margin: float = 0.0, conversational: bool = False) -> list[dict]:
    """(prompt, refined, sampled) rows where the refined text differs and r(refined) - r(sampled) > min_margin."""
    if not min_margin >= 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    pairs = []
    for report in refinement.reports:
        if report.response == report.reference or not report.reward_after - report.reward_before > min_margin:
            continue
        if conversational:
            pairs.append({"prompt": [{"role": "user", "content": report.prompt}],
                          "chosen": [{"role": "assistant", "content": report.response}],
                          "rejected": [{"role": "assistant", "content": report.reference}]})  # fmt: skip
        else:
            pairs.append({"prompt": report.prompt, "chosen": report.response, "rejected": report.reference})
    return pairs
