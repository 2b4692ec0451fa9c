"""From moved embeddings back to tokens and text.

Rule: a slot becomes the nearest token among the allowed ones and its own original token, and an unmoved
slot keeps its token:

    t'_k = argmin_{v in allowed + {t_k}} d(x_k, E[v])   (ties, and x_k == E[t_k], keep t_k),

with d the Euclidean distance (the metric in which the flow's budget is measured, so the decoded token is
the one the transport cost refers to) or the cosine distance (which ignores the norm differences between
frequent and rare tokens). Keeping the original token in the running makes decoding exact at zero budget
even when the table has duplicate rows (e.g. BERT's [unused] tokens), and a token outside the allowed set
(a symbol, a word piece) is replaced only when the particle moved closer to an allowed token than to it.
Text is rewritten in place: unchanged tokens keep their original characters (case, spacing,
contractions), a changed token's characters are replaced by the new token's text, so the text changes only
where tokens did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["NearestTokenDecoder", "edit_distance", "rewrite_response"]


class NearestTokenDecoder:
    """Decode [..., T, D] token embeddings to ids [..., T] by the rule above.

    ``allowed`` restricts the candidates (a bool mask [V] or a list of ids; default: every id of the table);
    ``metric`` is "l2" or "cosine"; ``chunk_size`` bounds the rows of the distance matrix held at once.
    """

    def __init__(
        self,
        embeddings: Tensor,
        allowed: Tensor | Sequence[int] | None = None,
        metric: Literal["l2", "cosine"] = "l2",
        chunk_size: int = 4096,
    ) -> None:
        if metric not in ("l2", "cosine"):
            raise ValueError(f"unknown metric {metric!r}; expected 'l2' or 'cosine'")
        vocab = embeddings.shape[0]
        if allowed is None:
            ids = torch.arange(vocab, device=embeddings.device)
        elif isinstance(allowed, Tensor) and allowed.dtype == torch.bool:
            if allowed.shape != (vocab,):
                raise ValueError(f"an allowed mask must have shape ({vocab},); got {tuple(allowed.shape)}")
            ids = allowed.nonzero().squeeze(-1).to(embeddings.device)
        else:
            ids = torch.as_tensor(allowed, dtype=torch.long, device=embeddings.device)
            if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(f"allowed token ids must lie in [0, {vocab}); got range [{ids.min()}, {ids.max()}]")
        if ids.numel() == 0:
            raise ValueError("no tokens are allowed; the decoder needs at least one candidate")
        self.embeddings = embeddings.detach()
        self.candidate_ids = ids
        candidates = self.embeddings[ids].float()
        self.candidates = candidates if metric == "l2" else torch.nn.functional.normalize(candidates, dim=-1)
        self.metric, self.chunk_size = metric, chunk_size

    def __call__(self, tokens: Tensor, reference_ids: Tensor) -> Tensor:
        """ids [..., T] for token embeddings [..., T, D] that started at ``reference_ids`` [..., T]."""
        if tokens.shape[:-1] != reference_ids.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and reference ids {tuple(reference_ids.shape)} do not match")
        original = self.embeddings[reference_ids].to(tokens.dtype)
        unmoved = (tokens == original).all(-1)
        flat = tokens.reshape(-1, tokens.shape[-1]).float()
        best = [self._nearest(flat[s : s + self.chunk_size]) for s in range(0, flat.shape[0], self.chunk_size)]
        nearest = torch.cat([ids for ids, _ in best]).view(reference_ids.shape)
        best_score = torch.cat([score for _, score in best]).view(reference_ids.shape)
        keep = unmoved | (self._score(tokens.float(), original.float()) >= best_score)
        return torch.where(keep, reference_ids, nearest)

    def _nearest(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        if self.metric == "cosine":
            scores = torch.nn.functional.normalize(rows, dim=-1) @ self.candidates.T
        else:
            scores = 2.0 * rows @ self.candidates.T - self.candidates.square().sum(-1)
        best, index = scores.max(-1)
        return self.candidate_ids[index], best

    def _score(self, rows: Tensor, embeddings: Tensor) -> Tensor:
        """The argmax criterion of one given token per row: -||x - e||^2 + ||x||^2, or cos(x, e)."""
        if self.metric == "cosine":
            return torch.nn.functional.cosine_similarity(rows, embeddings, dim=-1)
        return 2.0 * (rows * embeddings).sum(-1) - embeddings.square().sum(-1)


def rewrite_response(text: str, spans: Sequence[tuple[int, int]], old_ids: Sequence[int], new_ids: Sequence[int], tokenizer: Any) -> str:
    """The response text with the tokens that changed (old -> new id) rewritten in place.

    A changed token's span becomes the new token's text and keeps the whitespace before it, except that a
    continuation piece (the tokenizer's ``continuing_subword_prefix``, e.g. '##') is glued to the text
    before it, and a space separates two alphanumeric pieces that the original did not join into one word.
    When the spans are not increasing (several tokens share characters, e.g. byte pieces of one character)
    the changed response is decoded by the tokenizer as a whole.
    """
    if list(old_ids) == list(new_ids):
        return text
    ordered = all(s < e for s, e in spans) and all(spans[k][0] >= spans[k - 1][1] for k in range(1, len(spans)))
    if not ordered:
        return tokenizer.decode(list(new_ids), skip_special_tokens=True)
    prefix = _continuation_prefix(tokenizer)
    out, cursor = "", 0
    for k, ((start, end), old, new) in enumerate(zip(spans, old_ids, new_ids)):
        gap, piece = text[cursor:start], text[start:end]
        glued = text[start - 1 : start].isalnum()  # the original continued a word here
        cursor = end
        if old != new:
            piece = tokenizer.decode([new], skip_special_tokens=True)
            glued = bool(prefix) and piece.startswith(prefix)
            if glued:
                piece, gap = piece[len(prefix) :], gap if k == 0 else ""
            elif piece[:1].isspace():
                piece, gap = piece.lstrip(), gap or (" " if k > 0 else "")
        if not gap and not glued and out[-1:].isalnum() and piece[:1].isalnum():
            gap = " "
        out += gap + piece
    return out + text[cursor:]


def _continuation_prefix(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    return getattr(model, "continuing_subword_prefix", None) or ""


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]
