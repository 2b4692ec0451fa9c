"""VGF-refined answers exported as TRL DPO pairs, and one DPOTrainer step on them (tiny models from configs)."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from vgf_prob.llm import PromptReport, Refinement
from vgf_prob.llm.export import preference_pairs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llm_dpo.py"


def report(prompt: str, sampled: str, refined: str, before: float, after: float) -> PromptReport:
    return PromptReport(prompt=prompt, response=refined, reference=sampled, index=0, reward_before=before,
                        reward_after=after, candidates=[refined], candidate_rewards=[after])  # fmt: skip


def test_pairs_are_refined_over_sampled_in_trl_formats():
    refinement = Refinement([report("p1", "meh", "good", 0.1, 0.9), report("p2", "same", "same", 0.5, 0.5),
                             report("p3", "ok", "worse", 0.5, 0.2), report("p4", "fine", "great", 0.4, 0.45)])  # fmt: skip
    assert preference_pairs(refinement) == [{"prompt": "p1", "chosen": "good", "rejected": "meh"},
                                            {"prompt": "p4", "chosen": "great", "rejected": "fine"}]  # fmt: skip
    assert [p["prompt"] for p in preference_pairs(refinement, min_margin=0.1)] == ["p1"]
    (pair,) = preference_pairs(refinement, min_margin=0.1, conversational=True)
    assert pair == {"prompt": [{"role": "user", "content": "p1"}], "chosen": [{"role": "assistant", "content": "good"}],
                    "rejected": [{"role": "assistant", "content": "meh"}]}  # fmt: skip
    with pytest.raises(ValueError, match="min_margin"):
        preference_pairs(refinement, min_margin=-1.0)


def test_example_runs_one_dpo_step_on_refined_pairs(tmp_path):
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("llm_dpo", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.run(tmp_path, steps=1)
    assert result["pairs"] and all(p["chosen"] != p["rejected"] for p in result["pairs"])
    assert (tmp_path / "pairs.jsonl").read_text().count("\n") == len(result["pairs"])
    first = result["log"][0]
    # the policy starts as the reference, so the first DPO loss is exactly -log sigmoid(0) = log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result["parameter_change"] > 0, "the DPO step did not update the policy"
    assert result["cost"]["rm_backward"] > 0 and result["cost"]["lm_samples"] == 4
