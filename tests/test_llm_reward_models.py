"""Reward models as users have them: decoder classifiers, OpenRLHF-style value heads, chat templates, costs.

Every score is checked against the model called on each text's own ``input_ids`` alone (no padding at all),
on batches whose texts differ in length. Tiny Llama and GPT-2 classifiers are built from configs.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from vgf_prob import DisplacementBudget, Euler, SteinField, StepBudget, ValueGradientFlow
from vgf_prob.llm import BestOfN, LastTokenScorer, RewardModel, VGFRefiner, chat_template

WORDS = ["the", "a", "day", "was", "is", "and", "but", "dog", "cat", "park", "rain", "very", "good", "bad", "sad",
         "fine", "nice", "cold", "warm", "calm", "dull", "loud", "quiet", ".", "!", "user", "assistant", "system"]  # fmt: skip
SPECIALS = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
PROMPTS = ["the day was", "a dog is"]
RESPONSES = [["very good .", "a dull cold rain and a sad dog", "fine"], ["loud !", "calm", "the park was quiet and nice"]]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
)
LLAMA3_LIKE = "{{ bos_token }}{% for m in messages %}{{ m['role'] + ' ' + m['content'] + ' ' }}{% endfor %}"


def make_tokenizer(adds_bos: bool = False, template: str | None = None, bos: str = "<s>") -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token=bos,
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])  # fmt: skip
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def llama(vocab: int) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=1,
                         initializer_range=0.5)  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


def gpt2(vocab: int) -> GPT2ForSequenceClassification:
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0, num_labels=1,
                        initializer_range=0.5)  # fmt: skip
    return GPT2ForSequenceClassification(config).eval()


def own_scores(model: nn.Module, tokenizer, texts: list[str]) -> Tensor:
    """The model on each text's own input_ids, one text per call (no padding anywhere)."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits.squeeze() for t in texts])


def texts_of(template: str = "{prompt}\n{response}") -> list[str]:
    return [template.format(prompt=p, response=r) for p, group in zip(PROMPTS, RESPONSES) for r in group]


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_decoder_classifier_scores_match_each_texts_own_input_ids(build, tokenizer):
    model = build(len(tokenizer))
    expected = own_scores(model, tokenizer, texts_of()).view(2, 3)
    reward = RewardModel(model, tokenizer)
    assert reward.padding_side == "left"
    batch = reward.tokenize(PROMPTS, RESPONSES)
    assert len(set(batch.attention_mask.sum(-1).flatten().tolist())) > 2, "texts must differ in length"
    torch.testing.assert_close(reward.score(PROMPTS, RESPONSES), expected, atol=1e-4, rtol=0)
    # the flow's value (same forward, from particles) and its gradient are finite and agree
    x = reward.particles(batch).requires_grad_(True)
    value = reward.value(batch, snap=None)(None, x)
    torch.testing.assert_close(value.detach(), expected, atol=1e-4, rtol=0)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the old behaviour (right padding, read at the last position) is wrong here: the check can fail
    wrong = RewardModel(model, tokenizer, padding_side="right").score(PROMPTS, RESPONSES)
    assert (wrong - expected).abs().max() > 1e-2


class OpenRLHFStyle(nn.Module):
    """A backbone and a value head whose forward takes input_ids only, read at the last attended token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.model = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, initializer_range=0.5))  # fmt: skip
        self.value_head = nn.Linear(16, 1)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        values = self.value_head(self.model(input_ids, attention_mask=mask).last_hidden_state).squeeze(-1)
        eos = mask.shape[1] - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
        return values.gather(1, eos).squeeze(1)


def test_custom_scorer_for_a_reward_model_without_inputs_embeds(tokenizer):
    model = OpenRLHFStyle(len(tokenizer)).eval()
    with pytest.raises(TypeError, match="does not accept inputs_embeds"):
        RewardModel(model, tokenizer)
    reward = RewardModel(model, tokenizer, scorer=LastTokenScorer(model.model, model.value_head))
    with torch.no_grad():
        expected = torch.stack([model(torch.tensor([tokenizer(t)["input_ids"]]))[0] for t in texts_of()]).view(2, 3)
    torch.testing.assert_close(reward.score(PROMPTS, RESPONSES), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="scorer always gets right-padded"):
        RewardModel(model, tokenizer, padding_side="left", scorer=LastTokenScorer(model.model, model.value_head))


def test_chatml_template_is_kept_whole_and_scores_the_rendered_chat():
    tokenizer = make_tokenizer(template=CHATML, bos="<|im_start|>")  # SmolLM2: BOS string = ChatML's turn marker
    template = chat_template(tokenizer)
    assert template == "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
    messages = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": RESPONSES[0][1]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert template.format(prompt=PROMPTS[0], response=RESPONSES[0][1]) == rendered
    model = llama(len(tokenizer))
    reward = RewardModel(model, tokenizer, template=template)
    torch.testing.assert_close(reward.score(PROMPTS, RESPONSES), own_scores(model, tokenizer, texts_of(template)).view(2, 3),
                               atol=1e-4, rtol=0)  # fmt: skip


def test_a_bos_the_tokenizer_adds_itself_is_dropped_from_the_template_once():
    tokenizer = make_tokenizer(adds_bos=True, template=LLAMA3_LIKE)
    template = chat_template(tokenizer, system_prompt="be {kind}")
    assert template == "system be {{kind}} user {prompt} assistant {response} "
    messages = [{"role": "system", "content": "be {kind}"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    chat_ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tokenizer(template.format(prompt="a", response="b"))["input_ids"] == chat_ids  # exactly one BOS


def test_costs_are_counted_where_the_reward_model_runs(tokenizer):
    reward = RewardModel(gpt2(len(tokenizer)), tokenizer)
    b, n = len(PROMPTS), len(RESPONSES[0])
    best = BestOfN(reward)(PROMPTS, RESPONSES)
    assert (best.cost.rm_forward, best.cost.rm_backward, best.cost.lm_samples) == (b * n, 0, b * n)
    steps = 3
    flow = ValueGradientFlow(SteinField(alpha=1.0), Euler(0.1), budget=DisplacementBudget(100.0) & StepBudget(steps))
    refined = VGFRefiner(reward, flow)(PROMPTS, RESPONSES)
    # per particle: L forward+backward passes (the first one scores the start) and one scoring of the decoded text;
    # the passes that only fill the report (the start's reward) are not the method's cost
    assert refined.cost.rm_backward == steps * b * n
    assert refined.cost.rm_forward_only == b * n
    assert refined.cost.per_prompt(b)["rm_forward"] == (steps + 1) * n
    assert reward.cost.rm_forward == best.cost.rm_forward + refined.cost.rm_forward
