"""Ground truths and judges for LLM refinement, separate from the reward model the flow climbs.

``FluencyGatedSentiment`` is the gold scorer of the CPU benchmarks: VADER's compound sentiment of the
response, or -1 (the worst sentiment) when the base model finds the response less fluent than a threshold,

    g(x, y) = vader(y)   if log mu(y | x) / |y| >= tau,   else -1,

with tau a low quantile of the base model's per-token log-likelihood on its own samples (``calibrate``).
VADER is a lexicon, so strings of positive words fool it; the gate is what word salad cannot pass.

A *judge* compares a response with a reference answer, the protocol of the paper's win rates:
``judge(prompts [K], responses [K], references [K]) -> [K]`` floats in [0, 1] (1 = the response wins, 0.5 a
tie). ``ScoreJudge`` builds one from any pointwise scorer; a GPT-4 or other LLM judge is the same callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["FluencyGatedSentiment", "Judge", "ScoreJudge", "vader_compound"]

Judge = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]
Fluency = Callable[[Sequence[str], Sequence[str]], Tensor]


def vader_compound(texts: Sequence[str]) -> Tensor:
    """VADER's compound score of each text, in [-1, 1] (the nltk-vader-sentiment package)."""
    from vader import polarity_scores

    return torch.tensor([polarity_scores(text)["compound"] for text in texts], dtype=torch.float32)


class FluencyGatedSentiment:
    """g(x, y) = vader(y) if fluency(x, y) >= tau else -1; ``fluency(prompts, texts) -> [K]`` is the base model's
    log-likelihood per token (e.g. ``BaseLanguageModel.log_likelihood`` total / count)."""

    def __init__(self, fluency: Fluency, tau: float) -> None:
        self.fluency, self.tau = fluency, float(tau)

    @staticmethod
    def calibrate(fluency: Fluency, prompts: Sequence[str], samples: Sequence[Sequence[str]], quantile: float = 0.1) -> float:
        """tau = the ``quantile`` of the per-token log-likelihood of the base model's own samples [B][N]."""
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
        flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
        values = fluency([p for p, _ in flat], [s for _, s in flat])
        return float(torch.quantile(values.double(), quantile))

    def details(self, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, Tensor]:
        """Per text: the gold score, VADER, the per-token log-likelihood and whether the gate passed."""
        if len(prompts) != len(texts):
            raise ValueError(f"need one text per prompt; got {len(prompts)} prompts and {len(texts)} texts")
        sentiment, fluency = vader_compound(texts), self.fluency(prompts, texts).float()
        passed = fluency >= self.tau
        return {"gold": torch.where(passed, sentiment, -1.0), "vader": sentiment, "fluency": fluency, "passed": passed}

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> Tensor:
        return self.details(prompts, texts)["gold"]


class ScoreJudge:
    """A judge from a pointwise scorer s(prompts, texts) -> [K]: 1 if s(response) > s(reference), 0.5 if equal."""

    def __init__(self, scorer: Callable[[Sequence[str], Sequence[str]], Tensor]) -> None:
        self.scorer = scorer

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str]) -> list[float]:
        if not len(prompts) == len(responses) == len(references):
            raise ValueError(f"need K prompts, responses and references; got {len(prompts)}, {len(responses)}, {len(references)}")
        ours, theirs = self.scorer(prompts, responses), self.scorer(prompts, references)
        return ((ours > theirs).float() + 0.5 * (ours == theirs).float()).tolist()
