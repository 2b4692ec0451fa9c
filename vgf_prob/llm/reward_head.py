"""A small differentiable reward model: a frozen encoder, masked mean pooling and a ridge-fitted linear head.

    r(e_1..e_L) = w . (sum_l m_l h_l / sum_l m_l) + c,   h = encoder(inputs_embeds=e, attention_mask=m),

with (w, c) = argmin sum_k (r_k - y_k)^2 + lambda ||w||^2 on labelled texts (closed form). It accepts
``inputs_embeds`` like a transformers sequence classifier, so ``RewardModel`` wraps it unchanged; the demo
fits it to VADER scores of base-model samples, a stand-in for a learned RLHF reward model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vgf_prob.llm.reward import RewardModel

__all__ = ["MeanPoolRewardModel", "fit_reward_head"]


class MeanPoolRewardModel(nn.Module):
    """r = w . meanpool(encoder(e)) + c over a frozen encoder (any module returning ``.last_hidden_state``)."""

    def __init__(self, encoder: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def pooled(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        """Masked mean of the encoder's last hidden states, [M, H]."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        """Rewards [M, 1]."""
        return self.head(self.pooled(input_ids, attention_mask, inputs_embeds))

    @torch.no_grad()
    def fit(self, features: Tensor, targets: Tensor, ridge: float = 1.0) -> None:
        """Set (w, c) by ridge regression of targets [M] on pooled features [M, H] (c unpenalised)."""
        if features.shape[0] != targets.shape[0] or targets.dim() != 1:
            raise ValueError(f"need features [M, H] and targets [M]; got {tuple(features.shape)} and {tuple(targets.shape)}")
        if not ridge > 0:
            raise ValueError(f"ridge must be positive, got {ridge}")
        features, targets = features.double(), targets.double()
        mean_x, mean_y = features.mean(0), targets.mean()
        centred = features - mean_x
        gram = centred.T @ centred + ridge * torch.eye(features.shape[1], dtype=torch.float64, device=features.device)
        weight = torch.linalg.solve(gram, centred.T @ (targets - mean_y))
        self.head.weight.copy_(weight[None].to(self.head.weight.dtype))
        self.head.bias.fill_(float(mean_y - mean_x @ weight))


def fit_reward_head(
    reward_model: RewardModel, prompts: Sequence[str], responses: Sequence[Sequence[str]], targets: Tensor, ridge: float = 1.0
) -> Tensor:
    """Fit the head of a ``RewardModel`` wrapping a ``MeanPoolRewardModel`` to targets [B, N]; return the fit's rewards."""
    model = reward_model.model
    if not isinstance(model, MeanPoolRewardModel):
        raise TypeError(f"fit_reward_head needs a RewardModel around a MeanPoolRewardModel, got {type(model).__name__}")
    batch = reward_model.tokenize(prompts, responses)
    b, n, length = batch.input_ids.shape
    if targets.shape != (b, n):
        raise ValueError(f"targets must have shape {(b, n)} (one per response); got {tuple(targets.shape)}")
    ids, mask = batch.input_ids.reshape(b * n, length), batch.attention_mask.reshape(b * n, length).long()
    with torch.no_grad():
        features = torch.cat(
            [model.pooled(ids[s : s + reward_model.batch_size], mask[s : s + reward_model.batch_size])
             for s in range(0, b * n, reward_model.batch_size)]
        )  # fmt: skip
    model.fit(features, targets.reshape(-1).to(features.device), ridge)
    return reward_model.score_batch(batch)
