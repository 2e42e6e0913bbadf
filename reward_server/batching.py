"""Batching plans: which sequences run together in one forward pass.

Pure functions, no torch: a plan is a list of micro-batches, each a list of indices into the
caller's sequences. Sorting by length before cutting keeps padding small; the token budget
bounds the padded size (batch rows x longest row) of every micro-batch, and so its memory.
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_TOKEN_BUDGET = 8192


def plan_microbatches(lengths: Sequence[int], token_budget: int = DEFAULT_TOKEN_BUDGET) -> list[list[int]]:
    """Group sequence indices into micro-batches whose padded size stays within `token_budget`.

    Sequences are taken longest first, so each micro-batch's first row sets its padded width;
    a sequence longer than the budget runs alone.

    Raises:
        ValueError: a non-positive budget.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        if current and (len(current) + 1) * width > token_budget:
            plan.append(current)
            current = []
        if not current:
            width = lengths[index]
        current.append(index)
    if current:
        plan.append(current)
    return plan


def padding_ratio(lengths: Sequence[int], plan: Sequence[Sequence[int]]) -> float:
    """Fraction of the computed (padded) tokens that are padding under `plan`."""
    computed = sum(len(batch) * max(lengths[i] for i in batch) for batch in plan if batch)
    real = sum(lengths[i] for batch in plan for i in batch)
    return 0.0 if computed == 0 else 1.0 - real / computed
