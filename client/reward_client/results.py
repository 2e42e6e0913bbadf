"""Typed results returned by the reward client."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple, Union


@dataclass(frozen=True)
class ScoreResult:
    """The reward of one conversation.

    Attributes:
        index: 0-based position of the conversation in the caller's input.
        score: the scalar reward (after the server's head selection, weighting, normalisation).
        attributes: raw head outputs by attribute name, in the model's order (empty for a process
            reward model).
        num_tokens: tokens the server scored for this conversation.
        truncated: whether the server truncated the conversation to fit its context.
        steps: a process reward model's step scores in [0, 1], one per step in order; ``score`` is
            then their aggregate (the server's ``--step-aggregate``). Empty for an outcome model.
    """

    index: int
    score: float
    attributes: Dict[str, float] = field(default_factory=dict)
    num_tokens: int = 0
    truncated: bool = False
    steps: Tuple[float, ...] = ()

    def to_dict(self) -> Dict[str, object]:
        """Return the result as a JSON-ready dict (without ``index``; ``steps`` only for a process
        reward model, in place of ``attributes``)."""
        scored: Dict[str, object] = {"steps": list(self.steps)} if self.steps else {"attributes": dict(self.attributes)}
        return {"score": self.score, **scored, "num_tokens": self.num_tokens, "truncated": self.truncated}


@dataclass(frozen=True)
class RankedResponse:
    """One response of a best-of-n ranking.

    Attributes:
        index: position of the response in the list given to ``rank``.
        response: the response text (or its steps, for a process reward model).
        result: its full score result.
    """

    index: int
    response: Union[str, Sequence[str]]
    result: ScoreResult

    @property
    def score(self) -> float:
        """The response's scalar reward."""
        return self.result.score


def bradley_terry(score_a: float, score_b: float) -> float:
    """Return P(a preferred over b) = sigmoid(score_a - score_b), computed without overflow."""
    margin = score_a - score_b
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    exp_margin = math.exp(margin)
    return exp_margin / (1.0 + exp_margin)
