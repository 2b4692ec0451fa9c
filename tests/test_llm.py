"""LLM refinement in a reward model's token-embedding space, on tiny transformers models built from configs."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from vgf_prob import (
    DisplacementBudget,
    Euler,
    ODESolver,
    ParticleAdam,
    SteinField,
    StepBudget,
    ValueGradient,
    ValueGradientFlow,
)
from vgf_prob.llm import (
    BaseLanguageModel,
    BestOfN,
    NearestTokenDecoder,
    PlainSampling,
    ResponseProjection,
    RewardModel,
    VGFRefiner,
    demo,
    edit_distance,
    rewrite_response,
)

WORDS = ["the", "a", "day", "was", "is", "and", "but", "it", "i", "we", "my", "our", "dog", "cat", "park", "rain", "sun", "work", "job", "food", "tea", "train", "bus", "room", "very", "quite", "good", "great", "bad", "sad", "awful", "fine", "nice", "cold", "warm", "long", "short", "slow", "fast", "happy", "calm", "dull", "grey", "loud", "quiet", "wet", "dry", "late", "early", ".", ",", "!"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def word_tokenizer(words: list[str], specials: list[str], bert_style: bool) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def rm_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(list(WORDS), SPECIALS, bert_style=True)


@pytest.fixture(scope="module")
def reward_model(rm_tokenizer) -> RewardModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(rm_tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=1)  # fmt: skip
    return RewardModel(BertForSequenceClassification(config), rm_tokenizer)


@pytest.fixture(scope="module")
def base_model() -> BaseLanguageModel:
    """A tiny GPT-2 whose tokenizer differs from the reward model's (other ids, fewer words)."""
    torch.manual_seed(1)
    tokenizer = word_tokenizer(list(reversed(WORDS[:-6])), ["[PAD]", "[UNK]", "[EOS]"], bert_style=False)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return BaseLanguageModel(GPT2LMHeadModel(config), tokenizer, chat=False)


PROMPTS = ["the day was", "my dog is"]
RESPONSES = [
    ["cold and wet .", "a very long day", "fine", "the train was late and i was sad"],
    ["a good dog", "dull", "quiet but happy !", "my cat is grey and calm"],
]


class TokenPreference(nn.Module):
    """r = -(1 / |response|) sum_l ||e_l - E[target]||^2 over unmasked positions: prefers one token everywhere."""

    def __init__(self, embedding: nn.Embedding, target: int) -> None:
        super().__init__()
        self.embedding, self.target = embedding, target

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        distance = (inputs_embeds - self.embedding.weight[self.target]).square().sum(-1)
        mask = attention_mask.to(distance.dtype)
        return -(distance * mask).sum(-1) / mask.sum(-1)


def flow(budget, field=None, step_size: float = 0.5) -> ValueGradientFlow:
    return ValueGradientFlow(field or SteinField(alpha=0.1), Euler(step_size), budget=budget)


def test_tokenised_responses_shapes_and_masks(reward_model, rm_tokenizer):
    batch = reward_model.tokenize(PROMPTS, RESPONSES)
    b, n, t = batch.shape
    assert (b, n, t) == (2, 4, max(len(r.split()) for g in RESPONSES for r in g))
    assert batch.input_ids.shape[:2] == (2, 4) and batch.attention_mask.shape == batch.input_ids.shape
    lengths = torch.tensor([[len(r.split()) for r in group] for group in RESPONSES])
    assert torch.equal(batch.response_mask.sum(-1), lengths)
    assert torch.equal(batch.is_response.sum(-1), lengths)
    for k, group in enumerate(RESPONSES):
        for i, response in enumerate(group):
            ids = batch.response_ids[k, i][batch.response_mask[k, i]]
            assert rm_tokenizer.convert_ids_to_tokens(ids.tolist()) == response.split()
            assert torch.equal(batch.input_ids[k, i][batch.is_response[k, i]], ids)
    # the prompt's words are context, never response tokens; [CLS] and [SEP] neither
    assert batch.is_response[0, 0, : 1 + len(PROMPTS[0].split())].sum() == 0
    x0 = reward_model.particles(batch)
    assert x0.shape == (2, 4, t * 16) and x0.dtype == torch.float32
    movable = reward_model.movable(batch)
    assert torch.all(x0[~movable] == 0) and movable.sum() == lengths.sum() * 16


def test_value_of_unmoved_particles_is_the_text_score(reward_model):
    batch = reward_model.tokenize(PROMPTS, RESPONSES)
    value = reward_model.value(batch)(None, reward_model.particles(batch))
    assert value.shape == (2, 4)
    assert torch.allclose(value, reward_model.score(PROMPTS, RESPONSES), atol=1e-5)


def test_budget_never_exceeded_per_prompt_and_per_response(reward_model):
    for radius in (0.3, 1.0):
        budget = DisplacementBudget(radius) & StepBudget(4)
        refinement = VGFRefiner(reward_model, flow(budget, step_size=2.0))(PROMPTS, RESPONSES)
        spent = [report.budget_spent["displacement"] for report in refinement.reports]
        assert max(spent) <= radius * (1 + 1e-5) and min(spent) >= radius * (1 - 1e-3)  # binding, never exceeded
    # the per-response bound, on every particle, and the padding never moves
    batch = reward_model.tokenize(PROMPTS, RESPONSES)
    x0, movable = reward_model.particles(batch), reward_model.movable(batch)
    projection = ResponseProjection(x0, movable, radius=0.4)
    moved = ValueGradientFlow(SteinField(alpha=0.1), Euler(2.0), budget=4, projection=projection)(
        x0, None, reward_model.value(batch, snap=None)
    ).particles
    assert torch.all((moved - x0).norm(dim=-1) <= 0.4 * (1 + 1e-5))
    assert torch.equal(moved[~movable], x0[~movable])
    assert (moved - x0).norm(dim=-1).max() > 0.39


@pytest.mark.parametrize("solver", [ODESolver("euler", step_size=0.5), ParticleAdam(lr=0.05)], ids=["ode", "adam"])
def test_any_solver_keeps_each_response_within_its_radius(reward_model, solver):
    refiner = VGFRefiner(reward_model, ValueGradientFlow(SteinField(alpha=0.1), solver, budget=3), response_radius=0.5)
    for report in refiner(PROMPTS, RESPONSES).reports:
        assert 0.45 < report.response_displacement <= 0.5 * (1 + 1e-5)


def test_decoding_an_unmoved_particle_returns_the_original_tokens(reward_model, rm_tokenizer):
    batch = reward_model.tokenize(PROMPTS, RESPONSES)
    b, n, t = batch.shape
    tokens = reward_model.particles(batch).view(b, n, t, -1)
    embeddings = reward_model.embedding_matrix.clone()
    great, good = rm_tokenizer.convert_tokens_to_ids(["great", "good"])
    embeddings[great] = embeddings[good]  # a duplicate row: nearest-neighbour alone could not tell them apart
    for metric in ("l2", "cosine"):
        decoder = NearestTokenDecoder(embeddings, metric=metric)
        assert torch.equal(decoder(tokens, batch.response_ids), batch.response_ids)
    decoder = NearestTokenDecoder(reward_model.embedding_matrix)
    nudged = tokens.clone()
    nudged[0, 0, 0] = reward_model.embedding_matrix[great] + 1e-3
    assert decoder(nudged, batch.response_ids)[0, 0, 0] == great
    # a token outside the allowed set stays while its particle is nearer to it than to any allowed token
    cold = batch.response_ids[0, 0, 0]
    restricted = NearestTokenDecoder(reward_model.embedding_matrix, allowed=[great, good])
    nudged[0, 0, 0] = reward_model.embedding_matrix[cold] + 1e-3
    assert restricted(nudged, batch.response_ids)[0, 0, 0] == cold
    nudged[0, 0, 0] = reward_model.embedding_matrix[good]
    assert restricted(nudged, batch.response_ids)[0, 0, 0] == good
    for k, group in enumerate(RESPONSES):
        for i, response in enumerate(group):
            ids = batch.response_ids[k, i][batch.response_mask[k, i]].tolist()
            assert rewrite_response(response, batch.spans[k][i], ids, ids, rm_tokenizer) == response


def test_rewrite_changes_only_the_changed_tokens(rm_tokenizer):
    ids = rm_tokenizer("cold and wet .", add_special_tokens=False)["input_ids"]
    spans = [(0, 4), (5, 8), (9, 12), (13, 14)]
    new = list(ids)
    new[2] = rm_tokenizer.convert_tokens_to_ids("warm")
    assert rewrite_response("cold and wet .", spans, ids, new, rm_tokenizer) == "cold and warm ."
    glued = rm_tokenizer("wet.", add_special_tokens=False)
    great = rm_tokenizer.convert_tokens_to_ids("great")
    assert rewrite_response("wet.", [(0, 3), (3, 4)], glued["input_ids"], [glued["input_ids"][0], great], rm_tokenizer) == "wet great"
    assert edit_distance(ids, new) == 1 and edit_distance(ids, ids[:2]) == 2 and edit_distance([], ids) == 4


def test_zero_budget_is_best_of_n(reward_model):
    best = BestOfN(reward_model)(PROMPTS, RESPONSES)
    for budget in (StepBudget(0), DisplacementBudget(0.0) & StepBudget(5)):
        refined = VGFRefiner(reward_model, flow(budget))(PROMPTS, RESPONSES)
        assert refined.responses == best.responses
        assert [r.reward_after for r in refined.reports] == pytest.approx([r.reward_after for r in best.reports])
        assert all(r.edit_distance == 0 for r in refined.reports)
    plain = PlainSampling(reward_model)(PROMPTS, RESPONSES)
    assert plain.responses == [group[0] for group in RESPONSES]
    assert all(b.reward_after >= p.reward_after for b, p in zip(best.reports, plain.reports))


def test_reward_model_parameters_get_no_gradient(reward_model):
    parameters = list(reward_model.model.parameters())
    flags = [p.requires_grad for p in parameters]
    VGFRefiner(reward_model, flow(DisplacementBudget(1.0) & StepBudget(5)))(PROMPTS, RESPONSES)
    assert all(p.grad is None for p in parameters)
    assert [p.requires_grad for p in parameters] == flags


def test_flow_increases_a_reward_that_prefers_a_known_token(rm_tokenizer):
    torch.manual_seed(2)
    target = rm_tokenizer.convert_tokens_to_ids("great")
    embedding = nn.Embedding(len(rm_tokenizer), 8)
    model = RewardModel(TokenPreference(embedding, target), rm_tokenizer)
    best = BestOfN(model)(PROMPTS, RESPONSES)
    for straight_through in (True, False):
        refiner = VGFRefiner(model, flow(DisplacementBudget(6.0) & StepBudget(40), ValueGradient(), 0.5),
                             straight_through=straight_through)  # fmt: skip
        refined = refiner(PROMPTS, RESPONSES)
        for before, after in zip(best.reports, refined.reports):
            assert after.reward_after > before.reward_after + 0.5
            assert after.response.split().count("great") > before.response.split().count("great")
            assert after.edit_distance >= 1 and after.reward_before <= before.reward_after


def test_base_model_samples_scores_and_reports(base_model, reward_model):
    samples = base_model.sample(PROMPTS, num_samples=3, max_new_tokens=6, seed=3)
    assert len(samples) == 2 and all(len(group) == 3 for group in samples)
    assert all(isinstance(text, str) for group in samples for text in group)
    assert base_model.sample(PROMPTS, num_samples=3, max_new_tokens=6, seed=3) == samples
    log_likelihood, counts = base_model.log_likelihood(["the day was", "my dog is"], ["cold and wet", "dull"])
    assert counts.tolist() == [3, 1] and torch.all(log_likelihood < 0) and torch.isfinite(log_likelihood).all()
    # the base model's text is re-tokenised into the reward model's tokens
    refined = VGFRefiner(reward_model, flow(DisplacementBudget(0.5) & StepBudget(3)), base=base_model)(PROMPTS, RESPONSES)
    for report in refined.reports:
        assert report.log_likelihood_before < 0 and report.tokens_after >= 1
        assert report.response in report.candidates


def test_bad_inputs_raise_clear_errors(reward_model, rm_tokenizer, base_model):
    refiner = VGFRefiner(reward_model, flow(StepBudget(1)))
    with pytest.raises(ValueError, match="no prompts"):
        refiner([], [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        refiner(["the day", "  "], [["good"], ["bad"]])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        base_model.sample([""], num_samples=1)
    with pytest.raises(ValueError, match="same number N >= 1"):
        refiner(PROMPTS, [["good", "bad"], ["fine"]])
    small = BertForSequenceClassification(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                                     intermediate_size=8, num_labels=1))  # fmt: skip
    with pytest.raises(ValueError, match="do not match"):
        RewardModel(small, rm_tokenizer)
    with pytest.raises(ValueError, match="do not match"):
        BaseLanguageModel(GPT2LMHeadModel(GPT2Config(vocab_size=5, n_embd=8, n_layer=1, n_head=1)), rm_tokenizer)

    class IdsOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(len(rm_tokenizer), 4)

        def get_input_embeddings(self) -> nn.Embedding:
            return self.embedding

        def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
            return self.embedding(input_ids).sum((1, 2))

    with pytest.raises(TypeError, match="does not accept inputs_embeds"):
        RewardModel(IdsOnly(), rm_tokenizer)
    two_labels = BertForSequenceClassification(BertConfig(vocab_size=len(rm_tokenizer), hidden_size=8, num_hidden_layers=1,
                                                          num_attention_heads=1, intermediate_size=8, num_labels=2))  # fmt: skip
    with pytest.raises(ValueError, match="one scalar per sequence"):
        RewardModel(two_labels, rm_tokenizer).score(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="exactly once"):
        RewardModel(reward_model.model, rm_tokenizer, template="{prompt}").score(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="projection=None"):
        VGFRefiner(reward_model, ValueGradientFlow(SteinField(), Euler(0.1), 1, projection=ResponseProjection(
            torch.zeros(1, 1, 1), torch.ones(1, 1, 1, dtype=torch.bool))))  # fmt: skip


def test_demo_options_cover_its_config():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--budgets", "1", "2", "--num-samples", "4"])
    assert {f.name for f in fields(demo.DemoConfig)} <= set(vars(args))
    assert args.budgets == [1.0, 2.0] and args.num_samples == 4 and args.threads == 1
