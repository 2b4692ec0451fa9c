"""Response selection and refinement with one API: plain sampling, best-of-N and value gradient flow.

Each method is called as ``method(prompts [B], responses [B][N]) -> Refinement`` on N responses sampled from
the base model per prompt, and picks one response per prompt:

- ``PlainSampling``: the first sample (responses are i.i.d., so this is a draw from mu).
- ``BestOfN``: argmax_i r(x, y_i) with the reward model r.
- ``VGFRefiner``: transports the N responses' token embeddings along the reward model's gradient under the
  flow's budget (``ValueGradientFlow``), decodes every particle back to tokens (``NearestTokenDecoder``),
  re-scores the decoded texts with r and picks the argmax, as VGF acts in control. With zero budget it is
  best-of-N exactly.

Every method reports per prompt the reward before (the response it started from) and after, what the flow
spent, the token edit distance to the starting response (in the reward model's tokens) and, given a base
model, the log-likelihood of both under it; and in ``Refinement.cost`` what choosing took: reward-model
forward and forward+backward passes and base-model calls, counted by the models themselves (``ComputeCost``;
passes that only fill the report are not counted), and the responses it consumed as ``lm_samples``.

Extension beyond the paper (off by default): ``base_weight=beta`` makes the value that picks the answer
r(x, y) + beta * log mu(y | x) / |y| (the base model's log-likelihood per token of the decoded text, so length
does not dominate). The base model reads text in its own tokenizer, so the term enters the choice among the
decoded particles (and best-of-N's choice), not the flow's gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from vgf_prob.llm.cost import ComputeCost
from vgf_prob.llm.decode import NearestTokenDecoder, edit_distance, rewrite_response
from vgf_prob.llm.embedding_space import (
    ResponseProjection,
    TokenizedResponses,
    check_prompts,
)
from vgf_prob.llm.reference import BaseLanguageModel
from vgf_prob.llm.reward import RewardModel
from vgf_prob.transport import ValueGradientFlow

__all__ = ["BestOfN", "PlainSampling", "PromptReport", "Refinement", "VGFRefiner"]


@dataclass
class PromptReport:
    """What a method did for one prompt.

    ``reward_before``/``reward_after``: r of the starting response and of the chosen (decoded, re-scored) one;
    ``particle_reward``: r at the chosen particle's embeddings before decoding (VGF only);
    ``budget_spent``: the flow's per-prompt measures (steps, displacement = sqrt(mean_i ||x_i - x_i^0||^2), and
    each budget's own); ``response_displacement``: ||x_i - x_i^0|| of the chosen particle; ``edit_distance``:
    Levenshtein distance between the chosen and starting responses in reward-model tokens;
    ``log_likelihood_before``/``_after`` and ``tokens_before``/``_after``: log mu(y | x) and the response
    length in base-model tokens (None without a base model).
    """

    prompt: str
    response: str
    reference: str
    index: int
    reward_before: float
    reward_after: float
    candidates: list[str]
    candidate_rewards: list[float]
    particle_reward: float | None = None
    budget_spent: dict[str, float] = field(default_factory=dict)
    response_displacement: float = 0.0
    edit_distance: int = 0
    log_likelihood_before: float | None = None
    log_likelihood_after: float | None = None
    tokens_before: int | None = None
    tokens_after: int | None = None


@dataclass
class Refinement:
    """One ``PromptReport`` per prompt, with the chosen responses in ``responses``; ``cost``: what the call spent."""

    reports: list[PromptReport]
    cost: ComputeCost = field(default_factory=ComputeCost)

    @property
    def responses(self) -> list[str]:
        return [r.response for r in self.reports]

    def mean(self, name: str) -> float:
        """Average of a numeric report field over prompts (e.g. ``mean("reward_after")``)."""
        values = [getattr(r, name) for r in self.reports]
        if any(v is None for v in values):
            raise ValueError(f"{name} is not available for every prompt (no base model?)")
        return float(sum(values) / len(values))


class _Method:
    def __init__(self, reward_model: RewardModel, base: BaseLanguageModel | None = None, base_weight: float = 0.0) -> None:
        if not (math.isfinite(base_weight) and base_weight >= 0):
            raise ValueError(f"base_weight must be a finite number >= 0, got {base_weight}")
        if base_weight > 0 and base is None:
            raise ValueError("base_weight > 0 adds beta * log mu(y | x) / |y| to the value: pass base=BaseLanguageModel")
        self.reward_model, self.base, self.base_weight = reward_model, base, base_weight

    def _spent(self) -> ComputeCost:
        """The counters of the models this method calls (subtract two readings for one call's cost)."""
        cost = self.reward_model.cost.copy()
        return cost if self.base is None else cost + self.base.cost

    def _choose(self, prompts: Sequence[str], texts: list[list[str]], rewards: Tensor) -> Tensor:
        """argmax_i r_i + beta * log mu(y_i | x) / |y_i| per prompt (no base-model pass when beta = 0)."""
        if self.base_weight == 0:
            return rewards.argmax(-1)
        flat = [(prompt, text) for prompt, group in zip(prompts, texts) for text in group]
        total, count = self.base.log_likelihood([p for p, _ in flat], [t for _, t in flat])
        per_token = torch.where(count > 0, total / count.clamp_min(1), -math.inf).view(rewards.shape)
        return (rewards + self.base_weight * per_token.to(rewards)).argmax(-1)

    def _report(
        self,
        start: TokenizedResponses,
        start_rewards: Tensor,
        final: TokenizedResponses,
        final_rewards: Tensor,
        chosen: Tensor,
        cost: ComputeCost,
        extras: list[dict] | None = None,
    ) -> Refinement:
        reports = []
        for b, prompt in enumerate(start.prompts):
            i = int(chosen[b])
            reports.append(
                PromptReport(
                    prompt=prompt,
                    response=final.responses[b][i],
                    reference=start.responses[b][i],
                    index=i,
                    reward_before=float(start_rewards[b, i]),
                    reward_after=float(final_rewards[b, i]),
                    candidates=list(final.responses[b]),
                    candidate_rewards=final_rewards[b].tolist(),
                    edit_distance=edit_distance(_tokens(start, b, i), _tokens(final, b, i)),
                    **(extras[b] if extras else {}),
                )
            )
        if self.base is not None:
            prompts = [r.prompt for r in reports]
            with self.base.uncounted():
                before, before_n = self.base.log_likelihood(prompts, [r.reference for r in reports])
                after, after_n = self.base.log_likelihood(prompts, [r.response for r in reports])
            for k, report in enumerate(reports):
                report.log_likelihood_before, report.tokens_before = float(before[k]), int(before_n[k])
                report.log_likelihood_after, report.tokens_after = float(after[k]), int(after_n[k])
        return Refinement(reports, cost)


class PlainSampling(_Method):
    """The first of the N sampled responses (a draw from the base model; its cost is that one sample)."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Refinement:
        check_prompts(prompts, responses)
        batch = self.reward_model.tokenize(prompts, responses)
        with self.reward_model.uncounted():
            rewards = self.reward_model.score_batch(batch)
        cost = ComputeCost(lm_samples=len(prompts))
        return self._report(batch, rewards, batch, rewards, torch.zeros(len(prompts), dtype=torch.long), cost)


class BestOfN(_Method):
    """argmax_i r(x, y_i) over the N sampled responses (the flow with zero budget); + beta log mu with base_weight."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Refinement:
        check_prompts(prompts, responses)
        before = self._spent()
        batch = self.reward_model.tokenize(prompts, responses)
        rewards = self.reward_model.score_batch(batch)
        chosen = self._choose(prompts, batch.responses, rewards)
        cost = self._spent() - before + ComputeCost(lm_samples=batch.input_ids.shape[0] * batch.input_ids.shape[1])
        return self._report(batch, rewards, batch, rewards, chosen, cost)


class VGFRefiner(_Method):
    """Value gradient flow on the responses' token embeddings, then decoding, re-scoring and argmax.

    ``flow`` is any ``ValueGradientFlow`` without a projection (the refiner supplies ``ResponseProjection``,
    which keeps padding fixed and, with ``response_radius``, bounds every response's own displacement).
    ``decoder`` defaults to ``NearestTokenDecoder`` over the whole vocabulary minus the special tokens;
    ``straight_through`` reads the reward and its gradient at the decoded tokens during the flow
    (``ResponseValue``), else at the moved embeddings themselves. ``base_weight``: the extension above.
    Cost per particle: one forward+backward pass per flow step (the first also scores the start) and one
    forward on the decoded text.
    """

    def __init__(
        self,
        reward_model: RewardModel,
        flow: ValueGradientFlow,
        decoder: NearestTokenDecoder | None = None,
        base: BaseLanguageModel | None = None,
        response_radius: float | None = None,
        straight_through: bool = True,
        base_weight: float = 0.0,
    ) -> None:
        super().__init__(reward_model, base, base_weight)
        if flow.projection is not None:
            raise ValueError(
                "the flow must have projection=None: VGFRefiner projects onto the response coordinates itself "
                "(padding stays fixed; use response_radius= to bound each response)"
            )
        self.flow = flow
        self.response_radius, self.straight_through = response_radius, straight_through
        self.decoder = decoder or NearestTokenDecoder(reward_model.embedding_matrix, _non_special(reward_model))

    def __call__(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Refinement:
        check_prompts(prompts, responses)
        rm = self.reward_model
        before = self._spent()
        start = rm.tokenize(prompts, responses)
        x0 = rm.particles(start)
        value = rm.value(start, snap=self.decoder if self.straight_through else None)
        flow = replace(self.flow, projection=ResponseProjection(x0, rm.movable(start), self.response_radius))
        policy = flow(x0, None, value)
        x = policy.particles
        b, n, t = start.shape
        new_ids = self.decoder(x.view(b, n, t, -1), start.response_ids)
        texts = [[_rewrite(start, k, i, new_ids[k, i], rm.tokenizer) for i in range(n)] for k in range(b)]
        final = rm.tokenize(prompts, texts)
        final_rewards = rm.score_batch(final)
        chosen = self._choose(prompts, texts, final_rewards)
        cost = self._spent() - before + ComputeCost(lm_samples=b * n)
        with rm.uncounted(), torch.no_grad():
            particle_rewards, start_rewards = value(None, x), rm.score_batch(start)
        own = (x - x0).norm(dim=-1)
        report = policy.report
        spent = {"steps": report.steps, "displacement": report.displacement, **report.budget_spent}
        extras = [
            {
                "particle_reward": float(particle_rewards[k, chosen[k]]),
                "budget_spent": {name: float(v[k]) for name, v in spent.items()},
                "response_displacement": float(own[k, chosen[k]]),
            }
            for k in range(b)
        ]
        return self._report(start, start_rewards, final, final_rewards, chosen, cost, extras)


def _non_special(reward_model: RewardModel) -> Tensor:
    vocab = reward_model.embedding_matrix.shape[0]
    allowed = torch.ones(vocab, dtype=torch.bool)
    special = [i for i in getattr(reward_model.tokenizer, "all_special_ids", []) if 0 <= i < vocab]
    allowed[special] = False
    return allowed


def _tokens(batch: TokenizedResponses, b: int, i: int) -> list[int]:
    return batch.response_ids[b, i][batch.response_mask[b, i]].tolist()


def _rewrite(batch: TokenizedResponses, b: int, i: int, new_ids: Tensor, tokenizer) -> str:
    count = int(batch.response_mask[b, i].sum())
    old = batch.response_ids[b, i, :count].tolist()
    return rewrite_response(batch.responses[b][i], batch.spans[b][i], old, new_ids[:count].tolist(), tokenizer)
