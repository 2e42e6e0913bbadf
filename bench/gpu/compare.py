"""Score comparisons of the GPU check: differences, the tolerance they must meet, and where the
TensorRT-LLM engine's generation logits come from.

Tolerance: rewards are compared with each other (responses to the same prompt), so an error only
matters relative to how far apart the scores are. The check therefore asserts

    max |observed - reference| <= fraction * std(reference scores)

with fraction 0.05 for bf16 and 0.001 for fp32. bf16 keeps 8 significant bits (a relative step
of 2^-8, about 0.4%), and two correct bf16 implementations that order their sums differently
(packed vs one-at-a-time attention, TensorRT kernels vs PyTorch's) drift apart by a few such
steps over 32 layers; 5% of the spread is well above that drift and well below an error of
substance (a wrong pooled token or position moves a score by about the whole spread). Two
responses whose scores differ by more than 10% of the spread keep their order. fp32 paths agree
to about 1e-6 relative, so 0.1% there still catches any real mistake.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

TOLERANCE_FRACTION = {"bfloat16": 0.05, "float16": 0.05, "float32": 1e-3}
# Positions the engine's generation logits can belong to, for a request cut after its pooled token.
LAST_PROMPT = "last_prompt_position"   # what the serving path assumes (TRTLLM.md, unconfirmed)
NEXT = "next_position"                 # the first generated position omitted (old behaviour)
NEITHER = "neither"


def spread(reference: np.ndarray) -> float:
    """Standard deviation of the reference scores (all outputs pooled); 1.0 when it is zero or
    undefined (a single score), so that the tolerance stays meaningful."""
    values = np.asarray(reference, dtype=np.float64).reshape(-1)
    std = float(values.std()) if values.size > 1 else 0.0
    return std if std > 0 else 1.0


def tolerance(reference: np.ndarray, dtype: str) -> float:
    """Largest allowed absolute difference for `dtype` (see the module docstring)."""
    return TOLERANCE_FRACTION[dtype] * spread(reference)


def compare(observed: np.ndarray, reference: np.ndarray, dtype: str,
            groups: Sequence[int] | None = None) -> dict:
    """Differences between observed and reference scores [N, K] and whether they are within tolerance.

    Args:
        observed: scores from the system under test.
        reference: transformers' scores for the same conversations.
        dtype: the compute dtype of the system under test (selects the tolerance).
        groups: prompt group of each row; when given, also the share of same-prompt pairs whose
            order agrees.

    Returns:
        A JSON-ready dict: max_abs, max_rel (elementwise, against |reference|), max_abs_over_spread,
        spread, tolerance, within_tolerance, pearson, and order_agreement when `groups` is given.

    Raises:
        ValueError: the shapes differ.
    """
    obs = np.asarray(observed, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if obs.shape != ref.shape:
        raise ValueError(f"observed scores have shape {obs.shape}, reference {ref.shape}")
    diff = np.abs(obs - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(ref), 1e-12)).max()) if diff.size else 0.0
    tol = tolerance(ref, dtype)
    result = {"n": int(obs.shape[0]) if obs.ndim else 1, "max_abs": max_abs, "max_rel": max_rel,
              "max_abs_over_spread": max_abs / spread(ref), "spread": spread(ref), "tolerance": tol,
              "tolerance_fraction_of_spread": TOLERANCE_FRACTION[dtype], "within_tolerance": max_abs <= tol,
              "pearson": _pearson(obs.reshape(-1), ref.reshape(-1))}
    if groups is not None:
        result["order_agreement"] = order_agreement(obs[:, 0] if obs.ndim > 1 else obs,
                                                    ref[:, 0] if ref.ndim > 1 else ref, groups)
    return result


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def order_agreement(observed: Sequence[float], reference: Sequence[float], groups: Sequence[int]) -> float:
    """Share of same-group pairs ranked the same way by both score lists (NaN without pairs)."""
    agree = total = 0
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            if groups[i] != groups[j] or reference[i] == reference[j]:
                continue
            total += 1
            agree += (observed[i] - observed[j]) * (reference[i] - reference[j]) > 0
    return agree / total if total else math.nan


def classify_position(observed: np.ndarray, at_last_prompt: np.ndarray, at_next: np.ndarray, tol: float) -> str:
    """Which position a generation_logits reading matches.

    Args:
        observed: logits[0:K] the engine returned for a request cut after its pooled token.
        at_last_prompt: reference rewards at the last prompt position (the pooled token).
        at_next: reference rewards one position later (after the token the engine generated).
        tol: absolute tolerance.

    Returns:
        LAST_PROMPT, NEXT or NEITHER; the nearer reference wins when both are within `tol`.
    """
    d_last = float(np.max(np.abs(np.asarray(observed, np.float64) - np.asarray(at_last_prompt, np.float64))))
    d_next = float(np.max(np.abs(np.asarray(observed, np.float64) - np.asarray(at_next, np.float64))))
    if d_last <= tol and d_last <= d_next:
        return LAST_PROMPT
    if d_next <= tol:
        return NEXT
    return NEITHER
