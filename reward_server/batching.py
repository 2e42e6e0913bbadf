"""Batching plans: which sequences run together in one forward pass, and which share a prefix.

Pure functions, no torch: a plan is a list of micro-batches, each a list of indices into the
caller's sequences. Sorting by length before cutting keeps padding small; the token budget
bounds the padded size (batch rows x longest row) of every micro-batch, and so its memory.
Shared-prefix groups let the engine compute a common prompt once for all its responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

DEFAULT_TOKEN_BUDGET = 8192
DEFAULT_MIN_SHARED = 32
DEFAULT_MAX_PADDING = 0.1


def plan_microbatches(lengths: Sequence[int], token_budget: int = DEFAULT_TOKEN_BUDGET,
                      max_padding: float = DEFAULT_MAX_PADDING) -> list[list[int]]:
    """Group sequence indices into micro-batches whose padded size stays within `token_budget`.

    Sequences are taken longest first, so each micro-batch's first row sets its padded width;
    a row joins the current micro-batch only while the padded size fits the budget and the
    batch's padding stays within `max_padding` of its padded size (linear layers see rows x
    width tokens, so narrower batches lose nothing but padding). A sequence longer than the
    budget runs alone.

    Raises:
        ValueError: a non-positive budget.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    current: list[int] = []
    width = waste = 0
    for index in order:
        if current:
            size = (len(current) + 1) * width
            if size > token_budget or waste + width - lengths[index] > max_padding * size:
                plan.append(current)
                current = []
        if not current:
            width, waste = lengths[index], 0
        current.append(index)
        waste += width - lengths[index]
    if current:
        plan.append(current)
    return plan


def padding_ratio(lengths: Sequence[int], plan: Sequence[Sequence[int]]) -> float:
    """Fraction of the computed (padded) tokens that are padding under `plan`."""
    computed = sum(len(batch) * max(lengths[i] for i in batch) for batch in plan if batch)
    real = sum(lengths[i] for batch in plan for i in batch)
    return 0.0 if computed == 0 else 1.0 - real / computed


@dataclass(frozen=True)
class SharedGroup:
    """Sequences (indices) whose first `prefix_length` tokens are identical: computed once."""

    prefix_length: int
    members: tuple[int, ...]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_shared_prefixes(sequences: Sequence[Sequence[int]],
                          min_shared: int = DEFAULT_MIN_SHARED) -> tuple[list[SharedGroup], list[int]]:
    """Find groups of sequences that share a token prefix (a GRPO group: one prompt, many responses).

    Sequences are sorted lexicographically, so sharers are adjacent; a dynamic programme then
    cuts the sorted order into groups maximising the tokens saved, sum of (members - 1) x
    prefix length. A group's prefix always leaves each member at least one token of its own,
    and is at least `min_shared` tokens (shorter prefixes save too little to pay for a
    separate forward pass). Prefixes may end anywhere, mid-message included.

    Returns:
        (groups, singles): groups of two or more members, and the indices in no group.
    """
    n = len(sequences)
    order = sorted(range(n), key=lambda i: list(sequences[i]))
    lcp = [_common_prefix(sequences[order[k]], sequences[order[k + 1]]) for k in range(n - 1)]
    best = [0] * (n + 1)
    start = list(range(-1, n))  # start[j]: first sorted position of the group ending at j - 1
    prefix = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], start[j], prefix[j] = best[j - 1], j - 1, 0
        shared = shortest = len(sequences[order[j - 1]])
        for i in range(j - 2, -1, -1):  # candidate group: sorted positions i .. j-1
            shared = min(shared, lcp[i])
            shortest = min(shortest, len(sequences[order[i]]))
            length = min(shared, shortest - 1)
            if length < min_shared:
                break  # only shrinks as the group grows
            gain = best[i] + (j - i - 1) * length
            if gain > best[j]:
                best[j], start[j], prefix[j] = gain, i, length
    groups, singles = [], []
    j = n
    while j > 0:
        i = start[j]
        members = [order[k] for k in range(i, j)]
        if len(members) > 1:
            groups.append(SharedGroup(prefix[j], tuple(sorted(members))))
        else:
            singles.extend(members)
        j = i
    return groups[::-1], sorted(singles)
