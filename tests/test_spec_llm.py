"""The LLM value read through the straight-through decoder, checked against the reward at the decoded tokens.

ResponseValue with a decoder D (vgf_prob/llm/reward.py) promises Q(x) = r(E[D(x)]) and grad_x Q = grad r
at E[D(x)] (PEZ-style straight-through). Here the decoded tokens are found by brute force (nearest allowed
token or the slot's own token, in Euclidean distance), the texts are rebuilt as token ids, and the reward
model itself is called on their embeddings; its gradient with respect to those embeddings is the expected
flow gradient. A tiny BERT built from a config stands in for a reward model (no download).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from vgf_prob import DisplacementBudget, Euler, StepBudget, ValueGradient, ValueGradientFlow
from vgf_prob.llm import NearestTokenDecoder, RewardModel, VGFRefiner

WORDS = ["the", "a", "day", "was", "is", "and", "but", "it", "dog", "cat", "park", "rain", "sun", "very", "good",
         "bad", "sad", "fine", "nice", "cold", "warm", "calm", "dull", "loud", "quiet", ".", "!"]  # fmt: skip
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
PROMPTS = ["the day was", "it is"]
RESPONSES = [["very good .", "a dull cold rain and a dog"], ["fine", "loud and sad !"]]


@pytest.fixture(scope="module")
def reward_model() -> RewardModel:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    torch.manual_seed(0)
    # initializer_range 0.5 (not BERT's 0.02): rewards that vary visibly with the tokens
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=1, initializer_range=0.5)
    return RewardModel(BertForSequenceClassification(config), tokenizer)


def allowed_ids(reward_model: RewardModel) -> torch.Tensor:
    return torch.arange(len(SPECIALS), reward_model.embedding_matrix.shape[0])


def decode_by_hand(reward_model: RewardModel, tokens: torch.Tensor, own_ids: torch.Tensor) -> torch.Tensor:
    """Per slot: argmin over the allowed tokens and the slot's own token of ||x_k - E[v]||^2 (ties keep own)."""
    table = reward_model.embedding_matrix.double()
    allowed = allowed_ids(reward_model)
    out = own_ids.clone()
    for index in torch.cartesian_prod(*(torch.arange(s) for s in own_ids.shape)).tolist():
        x, own = tokens[tuple(index)].double(), int(own_ids[tuple(index)])
        best, best_distance = own, float((x - table[own]).square().sum())
        for v in allowed.tolist():
            distance = float((x - table[v]).square().sum())
            if distance < best_distance:
                best, best_distance = v, distance
        out[tuple(index)] = best
    return out


def reward_at_ids(reward_model: RewardModel, batch, response_ids: torch.Tensor, with_grad: bool = False):
    """r of every text with its response tokens replaced by ``response_ids`` [B, N, T], called on the model
    directly; with ``with_grad`` also d r / d(response token embeddings) as [B, N, T * D] (zero in padding)."""
    b, n, length = batch.input_ids.shape
    ids = batch.input_ids.clone()
    for k in range(b):
        for i in range(n):
            positions = batch.is_response[k, i].nonzero().squeeze(-1)
            ids[k, i, positions] = response_ids[k, i, : len(positions)]
    embeds = reward_model.embedding_matrix[ids].reshape(b * n, length, -1).clone().requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        mask = batch.attention_mask.reshape(b * n, length).long()
        output = reward_model.model(inputs_embeds=embeds, attention_mask=mask)
        reward = output.logits.squeeze(-1).view(b, n)
    if not with_grad:
        return reward
    (grad,) = torch.autograd.grad(reward.sum(), embeds)
    grad = grad.view(b, n, length, -1)
    t, d = batch.response_ids.shape[-1], grad.shape[-1]
    per_slot = torch.zeros(b, n, t, d)
    for k in range(b):
        for i in range(n):
            positions = batch.is_response[k, i].nonzero().squeeze(-1)
            per_slot[k, i, : len(positions)] = grad[k, i, positions]
    return reward.detach(), per_slot.view(b, n, t * d)


def moved_particles(reward_model: RewardModel, batch) -> torch.Tensor:
    """Response embeddings pushed part-way toward other tokens (some slots cross over, some stay nearest to
    their own token), padding left at zero: particles off the embedding table."""
    table = reward_model.embedding_matrix
    generator = torch.Generator().manual_seed(3)
    own = batch.response_ids
    targets = torch.randint(len(SPECIALS), table.shape[0], own.shape, generator=generator)
    fractions = torch.rand(own.shape, generator=generator) * 0.9
    tokens = table[own] + fractions[..., None] * (table[targets] - table[own])
    tokens = tokens * batch.response_mask[..., None]
    return tokens.reshape(*own.shape[:2], -1)


def test_straight_through_value_is_the_reward_at_the_decoded_tokens(reward_model):
    batch = reward_model.tokenize(PROMPTS, RESPONSES)
    b, n, t = batch.shape
    x = moved_particles(reward_model, batch)
    decoded = decode_by_hand(reward_model, x.view(b, n, t, -1), batch.response_ids)
    changed = (decoded != batch.response_ids) & batch.response_mask
    assert changed.any() and (~changed & batch.response_mask).any(), "test particles must change some tokens, not all"

    decoder = NearestTokenDecoder(reward_model.embedding_matrix, allowed_ids(reward_model))
    value = reward_model.value(batch, snap=decoder)
    expected = reward_at_ids(reward_model, batch, decoded)
    raw = reward_model.value(batch)(None, x).detach()  # the reward read at the moved embeddings themselves
    assert (raw - expected).abs().max() > 1e-3, "test particles too close to the table to tell the two values apart"
    got = value(None, x).detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"straight-through value is not r at the decoded tokens:\n{m}")


def test_straight_through_gradient_is_the_reward_gradient_at_the_decoded_tokens(reward_model):
    batch = reward_model.tokenize(PROMPTS, RESPONSES)
    b, n, t = batch.shape
    x = moved_particles(reward_model, batch)
    decoded = decode_by_hand(reward_model, x.view(b, n, t, -1), batch.response_ids)
    _, expected = reward_at_ids(reward_model, batch, decoded, with_grad=True)
    raw_leaf = x.clone().requires_grad_(True)
    (at_raw,) = torch.autograd.grad(reward_model.value(batch)(None, raw_leaf).sum(), raw_leaf)
    assert (at_raw - expected).abs().max() > 1e-3, "test particles too close to the table to tell the gradients apart"

    decoder = NearestTokenDecoder(reward_model.embedding_matrix, allowed_ids(reward_model))
    leaf = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(reward_model.value(batch, snap=decoder)(None, leaf).sum(), leaf)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6,
                               msg=lambda m: f"straight-through gradient is not grad r at the decoded tokens:\n{m}")
    assert torch.all(got.view(b, n, t, -1)[~batch.response_mask] == 0), "padding slots received a gradient"


def test_refiner_particle_reward_is_the_reward_of_the_text_it_decodes_to(reward_model):
    """With the straight-through value the flow's value of the chosen particle is the re-scored decoded text's."""
    flow = ValueGradientFlow(ValueGradient(), Euler(2.0), budget=DisplacementBudget(4.0) & StepBudget(6))
    refinement = VGFRefiner(reward_model, flow)(PROMPTS, RESPONSES)
    assert any(r.edit_distance > 0 for r in refinement.reports), "the flow changed no token: weak test settings"
    for report in refinement.reports:
        assert report.particle_reward == pytest.approx(report.reward_after, abs=1e-5), (
            f"prompt {report.prompt!r}: the flow's value of the chosen particle ({report.particle_reward:.6f}) is not "
            f"the reward of the response it decodes to ({report.reward_after:.6f}); straight-through lost?"
        )
