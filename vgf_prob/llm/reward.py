"""A reward model read through its input embeddings: the value that drives the flow in the proxy space.

``RewardModel`` wraps any model with a scalar head that accepts ``inputs_embeds`` (a transformers
``AutoModelForSequenceClassification`` with ``num_labels=1`` is the common case) together with its tokenizer
and a template that writes a (prompt, response) pair into one text. Decoder classifiers (Llama, Qwen, GPT-2,
what TRL's RewardTrainer writes) read their score at the last position when given ``inputs_embeds``, so they
are fed left-padded with position ids counted from each text's first token (``padding_side``); a reward model
that takes no ``inputs_embeds`` at all (OpenRLHF's backbone + value head) is read through a ``scorer``
(``LastTokenScorer``). ``value(batch)`` is the value function of ``ValueGradientFlow``:

    Q(prompt_b, x_{b,i}) = r(E[context_{b,i}] with the response slots replaced by x_{b,i}),

where x_{b,i} is response i's flattened token embeddings (``embedding_space``). The model is switched to
eval mode; gradients are taken with respect to the embeddings only, never the model's parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vgf_prob.llm.cost import Counted
from vgf_prob.llm.embedding_space import (
    DEFAULT_TEMPLATE,
    TokenizedResponses,
    check_tokenizer,
    tokenize_responses,
)

__all__ = ["LastTokenScorer", "ResponseValue", "RewardModel", "check_accepts_inputs_embeds", "default_padding_side"]

Scorer = Callable[[Tensor, Tensor], Tensor]


def check_accepts_inputs_embeds(model: nn.Module) -> None:
    """Raise TypeError when ``model.forward`` has neither an ``inputs_embeds`` argument nor ``**kwargs``."""
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.name == "inputs_embeds" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    raise TypeError(
        f"the reward model {type(model).__name__} does not accept inputs_embeds (its forward takes "
        f"{[p.name for p in parameters]}); the flow moves token embeddings, so the reward model must be callable "
        "as model(inputs_embeds=[M, L, D], attention_mask=[M, L])"
    )


def default_padding_side(model: nn.Module) -> Literal["left", "right"]:
    """"left" for a transformers decoder-only model (its ``model_type`` has a causal-LM class and no masked-LM
    class: Llama, Qwen, Mistral, GPT-2, GPT-NeoX, ...), else "right" (BERT-like encoders, custom modules)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return "right"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    decoder = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "left" if decoder else "right"


class LastTokenScorer:
    """r_m = head(backbone(inputs_embeds, attention_mask).last_hidden_state)[m, len_m - 1], len_m = sum_l mask_ml.

    The scorer protocol of ``RewardModel(..., scorer=...)``: ``scorer(inputs_embeds [M, L, D], attention_mask
    [M, L]) -> [M]``, rows right-padded (row m's real tokens at positions 0..len_m - 1), differentiable in
    ``inputs_embeds``. This one reads a causal decoder's value head at each text's last attended token, the
    layout of OpenRLHF's reward models (``model.model`` or ``getattr(model, model.base_model_prefix)`` as the
    backbone, ``model.value_head`` as the head), whose own ``forward`` takes only ``input_ids``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        check_accepts_inputs_embeds(backbone)
        self.backbone, self.head = backbone, head

    def __call__(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        values = self.head(hidden).squeeze(-1)
        last = attention_mask.long().sum(-1) - 1
        return values.gather(1, last[:, None]).squeeze(1)


class RewardModel(Counted):
    """r(prompt, response) = model(inputs_embeds=E[ids], attention_mask): one scalar per (prompt, response) text.

    ``template`` writes the pair into the text the model reads (``{prompt}`` and ``{response}`` fields; for a
    chat reward model, ``chat_template(tokenizer)`` renders its chat template around these two fields).
    ``batch_size`` bounds the texts per forward pass when scoring without gradients. ``padding_side``: how a
    batch of unequal texts reaches the model: "right" (encoders, which pool a fixed position or a masked
    mean), "left" with position ids 0..len_m - 1 on each text's tokens (decoder classifiers, which read the
    last position when given embeddings), or "auto" (``default_padding_side``). ``scorer`` replaces the
    model call for reward models without ``inputs_embeds`` (protocol: ``LastTokenScorer``); ``model`` then
    only supplies the embedding table. ``cost`` counts every pass (``ComputeCost``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 64,
        max_length: int | None = None,
        padding_side: Literal["auto", "left", "right"] = "auto",
        scorer: Scorer | None = None,
    ) -> None:
        if padding_side not in ("auto", "left", "right"):
            raise ValueError(f"padding_side must be 'auto', 'left' or 'right'; got {padding_side!r}")
        if scorer is not None and padding_side != "auto":
            raise ValueError("padding_side applies to the model's own forward; a scorer always gets right-padded rows")
        if scorer is None:
            check_accepts_inputs_embeds(model)
        check_tokenizer(tokenizer, model, "reward model")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        super().__init__()
        self.model = model.eval()
        self.tokenizer, self.template, self.batch_size, self.max_length = tokenizer, template, batch_size, max_length
        self.padding_side = "right" if scorer is not None else (
            default_padding_side(model) if padding_side == "auto" else padding_side)  # fmt: skip
        self.scorer = scorer

    @property
    def embedding_matrix(self) -> Tensor:
        """The input-embedding table E, [V, D] (detached)."""
        return self.model.get_input_embeddings().weight.detach()

    def tokenize(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> TokenizedResponses:
        """Tokenise B prompts x N responses with the template; tensors on the model's device."""
        batch = tokenize_responses(self.tokenizer, prompts, responses, self.template, self.max_length)
        return batch.to(self.embedding_matrix.device)

    def particles(self, batch: TokenizedResponses) -> Tensor:
        """x0 [B, N, T * D] (float32): each response's token embeddings, padding slots zero."""
        tokens = self.embedding_matrix[batch.response_ids].float() * batch.response_mask[..., None]
        return tokens.reshape(*batch.shape[:2], -1)

    def movable(self, batch: TokenizedResponses) -> Tensor:
        """Bool [B, N, T * D]: the coordinates of real response tokens (the rest is padding)."""
        d = self.embedding_matrix.shape[-1]
        return batch.response_mask[..., None].expand(*batch.shape, d).reshape(*batch.shape[:2], -1)

    def value(self, batch: TokenizedResponses, snap: Callable[[Tensor, Tensor], Tensor] | None = None) -> ResponseValue:
        """The flow's value function for these prompts: ``value(obs, x [B, N, T * D]) -> [B, N]``.

        With ``snap`` (a decoder, ``snap(tokens [B, N, T, D], reference_ids [B, N, T]) -> ids``) the reward is
        read at the decoded tokens with a straight-through gradient (see ``ResponseValue``).
        """
        return ResponseValue(self, batch, snap)

    def forward_embeds(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """r for M right-padded sequences of embeddings [M, L, D] with mask [M, L]: a tensor [M]."""
        mask = attention_mask.long()
        if mask.shape[1] > 1 and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("attention_mask rows must be right-padded (ones, then zeros)")
        if self.scorer is not None:
            logits = self.scorer(inputs_embeds, mask)
        elif self.padding_side == "left":
            embeds, mask, position_ids = _left_padded(inputs_embeds, mask)
            logits = _logits(self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids))
        else:
            logits = _logits(self.model(inputs_embeds=inputs_embeds, attention_mask=mask))
        if logits.dim() == 2 and logits.shape[-1] == 1:
            logits = logits.squeeze(-1)
        if logits.shape != inputs_embeds.shape[:1]:
            raise ValueError(
                f"the reward model must return one scalar per sequence ([M] or [M, 1], e.g. num_labels=1); got "
                f"shape {tuple(logits.shape)} for {inputs_embeds.shape[0]} sequences"
            )
        count = inputs_embeds.shape[0]
        self._count("rm_forward", count)
        if logits.requires_grad and self._counting:
            logits.register_hook(lambda grad: self._count("rm_backward", count))
        return logits

    def score_batch(self, batch: TokenizedResponses) -> Tensor:
        """r of every tokenised (prompt, response), [B, N] float32, without gradients."""
        b, n, length = batch.input_ids.shape
        ids = batch.input_ids.reshape(b * n, length)
        mask = batch.attention_mask.reshape(b * n, length)
        scores = []
        with torch.no_grad():
            for start in range(0, b * n, self.batch_size):
                rows = slice(start, start + self.batch_size)
                scores.append(self.forward_embeds(self.embedding_matrix[ids[rows]], mask[rows]).float())
        return torch.cat(scores).view(b, n)

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Tensor:
        """r of B prompts x N response texts, [B, N] float32."""
        return self.score_batch(self.tokenize(prompts, responses))


def _logits(output: Any) -> Tensor:
    return getattr(output, "logits", output[0] if isinstance(output, tuple) else output)


def _left_padded(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded rows [M, L, D] moved to the right end (left padding) with position ids 0..len_m - 1 on the
    tokens: left position p holds right position (p - s_m) mod L, s_m = L - len_m (differentiable gather)."""
    length = mask.shape[1]
    shift = length - mask.sum(-1, keepdim=True)
    positions = torch.arange(length, device=mask.device)[None] - shift
    source = positions % length
    moved = embeds.gather(1, source[..., None].expand_as(embeds))
    return moved, mask.gather(1, source), positions.clamp_min(0)


class ResponseValue:
    """Q(prompt_b, x) for particles x [B, N, T * D]: the response slots of each text get x, the context stays E[ids].

    With a ``snap`` decoder D the reward is read at the decoded tokens and its gradient passed straight
    through to the particles (as in PEZ, Wen et al. 2023):

        Q(x) = r(x + stopgrad(E[D(x)] - x)),   grad_x Q(x) = grad r at E[D(x)],

    so the flow optimises the reward of the text it will decode to, with first-order token-swap gradients
    evaluated on real tokens rather than off the embedding manifold. Particles are cast to the model's
    dtype inside (keep them float32 for a bf16 model: the cast is differentiable).
    """

    def __init__(
        self, reward_model: RewardModel, batch: TokenizedResponses, snap: Callable[[Tensor, Tensor], Tensor] | None = None
    ) -> None:
        self.reward_model, self.batch, self.snap = reward_model, batch, snap
        self.context = reward_model.embedding_matrix[batch.input_ids]

    def __call__(self, obs: Tensor | None, x: Tensor) -> Tensor:
        b, n, t = self.batch.shape
        length, d = self.context.shape[-2:]
        if x.shape != (b, n, t * d):
            raise ValueError(
                f"particles must have shape {(b, n, t * d)} (B prompts, N responses, T tokens x D dims) for this "
                f"batch; got {tuple(x.shape)}"
            )
        tokens = x.view(b, n, t, d)
        if self.snap is not None:
            with torch.no_grad():
                snapped = self.reward_model.embedding_matrix[self.snap(tokens, self.batch.response_ids)].to(x.dtype)
            tokens = tokens + (snapped - tokens).detach()
        tokens = tokens.to(self.context.dtype)
        placed = tokens.gather(2, self.batch.slot[..., None].expand(b, n, length, d))
        embeds = torch.where(self.batch.is_response[..., None], placed, self.context)
        mask = self.batch.attention_mask.reshape(b * n, length)
        reward = self.reward_model.forward_embeds(embeds.reshape(b * n, length, d), mask)
        return reward.view(b, n).to(x.dtype)
