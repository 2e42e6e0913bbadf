"""Batching plans: which sequences share a prefix, and which run together in one forward pass.

Pure functions, no torch, on token-id lists and lengths: shared-prefix groups let the engine
compute a common prompt once for all its responses; packing fills rows of a token budget
without padding, which bounds each forward pass's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

DEFAULT_TOKEN_BUDGET = 4096
DEFAULT_MIN_SHARED = 32


def pack_sequences(lengths: Sequence[int], token_budget: int = DEFAULT_TOKEN_BUDGET) -> list[list[int]]:
    """Pack sequence indices into rows of at most `token_budget` tokens, without padding.

    First-fit decreasing: the longest sequences are placed first, each into the first row
    with room. A sequence longer than the budget gets a row of its own.

    Raises:
        ValueError: a non-positive budget.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[index] <= free:
                rows[r].append(index)
                room[r] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(token_budget - lengths[index])
    return rows


@dataclass(frozen=True)
class SharedGroup:
    """Sequences (indices) whose first `prefix_length` tokens are identical: computed once."""

    prefix_length: int
    members: tuple[int, ...]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
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
    lcp = [common_prefix(sequences[order[k]], sequences[order[k + 1]]) for k in range(n - 1)]
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
