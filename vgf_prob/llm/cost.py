"""What a method spent, counted where the models are called: reward-model passes and base-model calls.

``RewardModel.forward_embeds`` adds the sequences of every forward pass to its ``cost.rm_forward`` and, when
a gradient later flows back through those rewards, the same count to ``cost.rm_backward`` (a hook on the
output tensor, so a forward that is never differentiated is never counted as a backward).
``BaseLanguageModel.sample`` adds the responses it draws to ``cost.lm_samples``; ``log_likelihood`` adds the
sequences it scores to ``cost.lm_scored``. Counts are in sequences (one (prompt, response) text = 1), so a
flow of L steps over N particles costs N * L forward+backward passes and best-of-N costs N forwards.
Passes made only to fill a report (``with model.uncounted():``) are not counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

__all__ = ["ComputeCost", "Counted"]


@dataclass
class ComputeCost:
    """Sequence counts: reward-model forward passes (all), of which ``rm_backward`` were also differentiated;
    base-model responses sampled (``lm_samples``) and sequences scored for log-likelihood (``lm_scored``)."""

    rm_forward: int = 0
    rm_backward: int = 0
    lm_samples: int = 0
    lm_scored: int = 0

    @property
    def rm_forward_only(self) -> int:
        """Reward-model forward passes with no backward pass."""
        return self.rm_forward - self.rm_backward

    def copy(self) -> ComputeCost:
        return ComputeCost(**asdict(self))

    def __add__(self, other: ComputeCost) -> ComputeCost:
        return ComputeCost(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: ComputeCost) -> ComputeCost:
        return ComputeCost(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def per_prompt(self, prompts: int) -> dict[str, float]:
        """Every count divided by the number of prompts, with ``rm_forward_only`` added."""
        if prompts < 1:
            raise ValueError(f"need at least one prompt, got {prompts}")
        counts = {**asdict(self), "rm_forward_only": self.rm_forward_only}
        return {name: value / prompts for name, value in counts.items()}


class Counted:
    """A model wrapper that counts its calls in ``self.cost`` unless inside ``uncounted()``."""

    def __init__(self) -> None:
        self.cost, self._counting = ComputeCost(), True

    def _count(self, name: str, sequences: int) -> None:
        if self._counting:
            setattr(self.cost, name, getattr(self.cost, name) + sequences)

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Calls inside are not counted (passes that only measure or report, not a method's work)."""
        counting, self._counting = self._counting, False
        try:
            yield
        finally:
            self._counting = counting
