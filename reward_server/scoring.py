"""Reward maths: raw head outputs to the scalar `score`.

score = sum_k weight_k * attribute_k when attribute weights are set (Nemotron-4-340B-Reward
combines its HelpSteer2 attributes this way), else attribute 0; then (score - mean) / std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ScoreSpec:
    """How raw outputs become a score; see the module docstring."""

    weights: tuple[float, ...] | None = None
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.std <= 0:
            raise ValueError(f"score_std must be positive, got {self.std}")

    def check(self, num_outputs: int) -> None:
        """Raise ValueError if the weights do not match a model with `num_outputs` outputs."""
        if self.weights is not None and len(self.weights) != num_outputs:
            raise ValueError(f"{len(self.weights)} attribute weights given for a model with "
                             f"{num_outputs} outputs")

    def score(self, attributes: np.ndarray) -> np.ndarray:
        """Scores float32 [N] from raw outputs [N, K]."""
        attributes = np.asarray(attributes, dtype=np.float32)
        if self.weights is None:
            raw = attributes[:, 0]
        else:
            raw = attributes @ np.asarray(self.weights, dtype=np.float32)
        return ((raw - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)


def parse_floats(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """Parse "0,0,0.3,-0.33" (or a sequence) into floats; empty means None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, str):
        return tuple(float(part) for part in text.split(","))
    return tuple(float(x) for x in text)
