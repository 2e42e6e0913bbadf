"""Reward maths: raw head outputs to the scalar `score`, and a process model's step scores.

Outcome models: score = sum_k weight_k * attribute_k when attribute weights are set
(Nemotron-4-340B-Reward combines its HelpSteer2 attributes this way), else attribute 0; then
(score - mean) / std.

Process models: the engine sends each conversation's label logits at its S step tags as one row
`[S, negative_1, positive_1, ..., negative_S, positive_S, NaN...]` (`step_rows`; NaN pads the
request's rows to one width). A step score is the softmax probability of the positive label; the
score is their aggregate (`AGGREGATES`), then (score - mean) / std as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# How step scores become one score: the weakest step (the usual PRM rule for best-of-n), the
# last step, their mean, or their product (the probability that every step is right).
AGGREGATES = ("min", "last", "mean", "product")
DEFAULT_AGGREGATE = "min"


def step_scores(logits: np.ndarray) -> np.ndarray:
    """Step scores in [0, 1], float32 [S], from label logits [S, 2] ordered (negative, positive)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, 2)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted[:, 1] / shifted.sum(axis=-1)).astype(np.float32)


def step_rows(logits: Sequence[np.ndarray]) -> np.ndarray:
    """One request's per-conversation label logits [S_i, 2] as rows float32 [B, 1 + 2 * max S_i]:
    the step count, then the logits, NaN after them (see the module docstring)."""
    width = 1 + 2 * max(len(x) for x in logits)
    rows = np.full((len(logits), width), np.nan, dtype=np.float32)
    for row, x in zip(rows, logits):
        row[0] = len(x)
        row[1:1 + 2 * len(x)] = np.asarray(x, dtype=np.float32).reshape(-1)
    return rows


def _aggregate(scores: np.ndarray, rule: str) -> float:
    if rule == "min":
        return scores.min()
    if rule == "last":
        return scores[-1]
    if rule == "mean":
        return scores.astype(np.float64).mean()
    return scores.astype(np.float64).prod()


@dataclass(frozen=True)
class ScoreSpec:
    """How raw outputs become a score; see the module docstring. `aggregate` is set for a process
    reward model (one of `AGGREGATES`) and None for an outcome one."""

    weights: tuple[float, ...] | None = None
    mean: float = 0.0
    std: float = 1.0
    aggregate: str | None = None

    def __post_init__(self):
        if self.std <= 0:
            raise ValueError(f"score_std must be positive, got {self.std}")
        if self.aggregate is not None and self.aggregate not in AGGREGATES:
            raise ValueError(f"step_aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.aggregate is not None and self.weights is not None:
            raise ValueError("attribute weights do not apply to a process reward model (its score is "
                             "the step_aggregate of its step scores)")

    def check(self, num_outputs: int) -> None:
        """Raise ValueError if the weights do not match a model with `num_outputs` outputs."""
        if self.weights is not None and len(self.weights) != num_outputs:
            raise ValueError(f"{len(self.weights)} attribute weights given for a model with "
                             f"{num_outputs} outputs")

    def _normalised(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, dtype=np.float32) - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)

    def score(self, attributes: np.ndarray) -> np.ndarray:
        """Scores float32 [N] from an outcome model's raw outputs [N, K]."""
        attributes = np.asarray(attributes, dtype=np.float32)
        if self.weights is None:
            raw = attributes[:, 0]
        else:
            raw = attributes @ np.asarray(self.weights, dtype=np.float32)
        return self._normalised(raw)

    def outputs(self, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score [N], attributes [N, K], num_steps [N]) from the engine's rows [N, W].

        Outcome model: the rows are the attributes; num_steps is 0. Process model: the rows are
        `step_rows`; attributes are the step scores, NaN after each conversation's last step.
        """
        rewards = np.asarray(rewards, dtype=np.float32)
        if self.aggregate is None:
            return self.score(rewards), rewards, np.zeros(len(rewards), dtype=np.int32)
        counts = rewards[:, 0].astype(np.int32)
        steps = np.full((len(rewards), max(int(counts.max()), 1)), np.nan, dtype=np.float32)
        raw = np.empty(len(rewards), dtype=np.float32)
        for i, (row, count) in enumerate(zip(rewards, counts)):
            steps[i, :count] = step_scores(row[1:1 + 2 * count])
            raw[i] = _aggregate(steps[i, :count], self.aggregate)
        return self._normalised(raw), steps, counts


def parse_floats(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """Parse "0,0,0.3,-0.33" (or a sequence) into floats; empty means None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, str):
        return tuple(float(part) for part in text.split(","))
    return tuple(float(x) for x in text)
