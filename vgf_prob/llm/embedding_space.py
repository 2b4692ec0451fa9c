"""The proxy space: responses as sequences of token embeddings in a reward model's input-embedding space.

A (prompt, response) pair is written by a template into one text and tokenised once by the reward model's
tokenizer (exactly as ``RewardModel.score`` sees it). Its tokens split into a fixed context (template,
prompt, special tokens) and the T_i response tokens, found by their character offsets. With E the reward
model's input-embedding matrix [V, D] and T = max_i T_i, response i is the particle

    x_i = (E[t_1], ..., E[t_{T_i}], 0, ..., 0)  in R^{T * D}   (zeros in the T - T_i padding slots),

so the Stein kernel and the transport budget act on whole responses. Particles are laid out [B, N, T * D]
(B prompts, N responses each), the core operator's layout. ``ResponseProjection`` keeps the padding slots
where they are (and, optionally, every response within a radius of where it started).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_TEMPLATE = "{prompt}\n{response}"

__all__ = [
    "DEFAULT_TEMPLATE",
    "ResponseProjection",
    "chat_template",
    "TokenizedResponses",
    "check_prompts",
    "check_tokenizer",
    "tokenize_responses",
]


def chat_template(tokenizer: Any, system_prompt: str | None = None) -> str:
    """The tokenizer's chat template rendered as a ``RewardModel`` template: user turn ``{prompt}``, assistant
    turn ``{response}``, every literal brace doubled.

    ``RewardModel`` tokenises with ``add_special_tokens=True``, so a BOS that the tokenizer adds by itself
    must not also be in the template: a leading BOS is dropped only when the tokenizer adds it (its ids start
    with ``bos_token_id`` with special tokens and not without) and the rendered text starts with exactly the
    BOS string. A ChatML template whose BOS string is its own turn marker (SmolLM2: ``<|im_start|>``, not
    added by the tokenizer) is kept whole.
    """
    marks = {"prompt": "\ue000prompt\ue000", "response": "\ue000response\ue000"}
    messages = [{"role": "user", "content": marks["prompt"]}, {"role": "assistant", "content": marks["response"]}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if any(text.count(mark) != 1 for mark in marks.values()):
        raise ValueError("the chat template does not write the user and assistant contents once each")
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    text = text.replace("{", "{{").replace("}", "}}")
    for name, mark in marks.items():
        text = text.replace(mark, "{" + name + "}")
    return text


def _adds_bos(tokenizer: Any) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos_id is not None and with_special[:1] == [bos_id] and without[:1] != [bos_id]


def check_prompts(prompts: Sequence[str], responses: Sequence[Sequence[str]] | None = None) -> None:
    """Raise ValueError for no prompts, an empty prompt, or responses not shaped [len(prompts)][N], N >= 1."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, got a single str; wrap it in a list")
    if len(prompts) == 0:
        raise ValueError("no prompts given; expected a non-empty list of prompt strings")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {index} is empty ({prompt!r}); every prompt needs some text")
    if responses is None:
        return
    if isinstance(responses, str) or any(isinstance(group, str) for group in responses):
        raise TypeError("responses must be a list per prompt of response strings ([B][N]), not strings")
    if len(responses) != len(prompts):
        raise ValueError(f"got {len(responses)} response lists for {len(prompts)} prompts; expected one list per prompt")
    counts = {len(group) for group in responses}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"every prompt needs the same number N >= 1 of responses; got counts {[len(g) for g in responses]}"
        )
    wrong = [type(r).__name__ for group in responses for r in group if not isinstance(r, str)]
    if wrong:
        raise TypeError(f"responses must be strings; got {wrong[0]}")


def check_tokenizer(tokenizer: Any, model: nn.Module, role: str) -> None:
    """Raise ValueError when the tokenizer can emit ids that the model's input embeddings do not have."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(
            f"the {role} must expose get_input_embeddings() returning an nn.Embedding (its token-embedding table); "
            f"got {type(embeddings).__name__}"
        )
    if len(tokenizer) > embeddings.num_embeddings:
        raise ValueError(
            f"the {role}'s tokenizer has {len(tokenizer)} tokens but the model embeds only {embeddings.num_embeddings}: "
            "tokenizer and model do not match (load both from the same checkpoint)"
        )


@dataclass
class TokenizedResponses:
    """B prompts x N responses tokenised for the reward model ([B, N, ...] tensors, L full length, T response length).

    input_ids/attention_mask: the full template text [B, N, L]; is_response: which of those positions are
    response tokens; slot: for a response position, its index 0..T-1 among the response's tokens;
    response_ids/response_mask: the response tokens alone [B, N, T]; spans: each response token's character
    span inside its response text (used to rewrite the text after decoding).
    """

    prompts: list[str]
    responses: list[list[str]]
    input_ids: Tensor
    attention_mask: Tensor
    is_response: Tensor
    slot: Tensor
    response_ids: Tensor
    response_mask: Tensor
    spans: list[list[list[tuple[int, int]]]]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, N, T)."""
        b, n, t = self.response_ids.shape
        return b, n, t

    def to(self, device: torch.device | str) -> TokenizedResponses:
        tensors = ("input_ids", "attention_mask", "is_response", "slot", "response_ids", "response_mask")
        moved = {name: getattr(self, name).to(device) for name in tensors}
        return TokenizedResponses(self.prompts, self.responses, spans=self.spans, **moved)


def tokenize_responses(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    template: str = DEFAULT_TEMPLATE,
    max_length: int | None = None,
) -> TokenizedResponses:
    """Tokenise ``template.format(prompt=..., response=...)`` for every pair and locate the response tokens.

    ``template`` must contain ``{response}`` exactly once (``{prompt}`` is optional; literal braces are doubled,
    as in ``str.format``). A token belongs to the response when it is not a special token and its character
    span overlaps the response's span in the text. Needs a fast tokenizer (character offsets).
    """
    check_prompts(prompts, responses)
    head, tail = _split_template(template)
    texts, bounds = [], []
    for prompt, group in zip(prompts, responses):
        prefix, suffix = head.format(prompt=prompt), tail.format(prompt=prompt)
        for response in group:
            texts.append(prefix + response + suffix)
            bounds.append((len(prefix), len(prefix) + len(response)))
    try:
        encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    except NotImplementedError as error:
        raise TypeError(f"the reward model's tokenizer must be a fast tokenizer with character offsets: {error}") from None
    limit = max_length or _model_max_length(tokenizer)
    rows = []
    for index, (ids, offsets, special) in enumerate(
        zip(encoded["input_ids"], encoded["offset_mapping"], encoded["special_tokens_mask"])
    ):
        if limit is not None and len(ids) > limit:
            raise ValueError(f"text {index} is {len(ids)} tokens long; the reward model takes at most {limit}")
        start, end = bounds[index]
        member = [not sp and s < end and e > start for (s, e), sp in zip(offsets, special)]
        positions = [k for k, m in enumerate(member) if m]
        if positions and positions[-1] - positions[0] + 1 != len(positions):
            raise ValueError(f"the response tokens of text {index} are not contiguous: {texts[index]!r}")
        spans = [(max(offsets[k][0], start) - start, min(offsets[k][1], end) - start) for k in positions]
        rows.append((ids, positions, spans))
    return _pack(list(prompts), [list(g) for g in responses], rows, _pad_id(tokenizer))


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{response}") != 1:
        raise ValueError(f"the template must contain '{{response}}' exactly once; got {template!r}")
    head, tail = template.split("{response}")
    try:
        head.format(prompt=""), tail.format(prompt="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"the template may use only {{prompt}} and {{response}} fields; got {template!r} ({error})") from None
    return head, tail


def _model_max_length(tokenizer: Any) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and limit < 1_000_000 else None


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _pack(prompts: list[str], responses: list[list[str]], rows: list, pad_id: int) -> TokenizedResponses:
    b, n = len(responses), len(responses[0])
    full_length = max(len(ids) for ids, _, _ in rows)
    response_length = max(1, max(len(pos) for _, pos, _ in rows))
    input_ids = torch.full((b * n, full_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b * n, full_length), dtype=torch.bool)
    is_response = torch.zeros((b * n, full_length), dtype=torch.bool)
    slot = torch.zeros((b * n, full_length), dtype=torch.long)
    response_ids = torch.full((b * n, response_length), pad_id, dtype=torch.long)
    response_mask = torch.zeros((b * n, response_length), dtype=torch.bool)
    spans: list[list[tuple[int, int]]] = []
    for row, (ids, positions, token_spans) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = True
        if positions:
            index = torch.tensor(positions, dtype=torch.long)
            is_response[row, index] = True
            slot[row, index] = torch.arange(len(positions))
            response_ids[row, : len(positions)] = input_ids[row, index]
            response_mask[row, : len(positions)] = True
        spans.append(token_spans)
    return TokenizedResponses(
        prompts=prompts,
        responses=responses,
        input_ids=input_ids.view(b, n, full_length),
        attention_mask=attention_mask.view(b, n, full_length),
        is_response=is_response.view(b, n, full_length),
        slot=slot.view(b, n, full_length),
        response_ids=response_ids.view(b, n, response_length),
        response_mask=response_mask.view(b, n, response_length),
        spans=[spans[i * n : (i + 1) * n] for i in range(b)],
    )


class ResponseProjection:
    """Project particles onto what a response may do: padding slots stay put, each response stays within r.

    With x0 the starting particles and m the mask of real response coordinates,

        P(x)_i = x0_i + m * (x_i - x0_i) * min(1, r / ||m * (x_i - x0_i)||)

    (r = ``radius``, no limit when None). This is a per-response transport bound, ||x_i - x0_i|| <= r, on
    top of whatever per-prompt budget the flow has. ``outward`` marks velocity components that would leave
    the set (padding, or a response on its sphere moving outward) so an ODE solver can zero them.
    """

    def __init__(self, origin: Tensor, movable: Tensor, radius: float | None = None) -> None:
        if origin.shape != movable.shape:
            raise ValueError(f"origin {tuple(origin.shape)} and movable mask {tuple(movable.shape)} must match")
        if radius is not None and not radius >= 0:
            raise ValueError(f"the per-response radius must be non-negative, got {radius}")
        self.origin, self.movable, self.radius = origin, movable, radius

    def __call__(self, x: Tensor) -> Tensor:
        step = torch.where(self.movable, x - self.origin, 0.0)
        if self.radius is not None:
            length = step.norm(dim=-1, keepdim=True)
            step = step * torch.where(length > self.radius, self.radius / length.clamp_min(1e-30), 1.0)
        return self.origin + step

    def outward(self, x: Tensor, velocity: Tensor) -> Tensor:
        blocked = ~self.movable
        if self.radius is None:
            return blocked
        step = x - self.origin
        on_sphere = step.norm(dim=-1, keepdim=True) >= self.radius * (1.0 - 1e-6)
        leaving = (step * velocity).sum(-1, keepdim=True) > 0
        return blocked | (on_sphere & leaving)
