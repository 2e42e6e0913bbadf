"""Keys and values of sequences scored before, reused by later requests that continue them.

Trainers score conversations that extend ones scored before: an agent's trajectory turn by turn, a
process reward model guiding a search step by step, the members of a GRPO group arriving seconds
apart. The engine keeps, for each sequence it computed, every layer's keys and values (and its final
hidden states at the positions it read); a later sequence that starts with the same tokens attends to
them in place of computing its prefix again.

An entry holds one whole sequence. It is found by content: the chained hashes of its full
`BLOCK`-token blocks index it (as vLLM's prefix cache does), and a match is then extended token by
token past the last common block and checked against the entry's own ids (a hash collision can
never serve wrong keys). Entries are kept least-recently-used within `max_bytes`; an entry that a
newer one extends is dropped, its reads moved to the newer one.

The reused keys and values are the same bits the sequence would compute cold: every step of the
packed engine is batch invariant and the native attention kernel sums each query's keys in an order
fixed by their positions, wherever they come from (tests/test_prefix_cache.py asserts the bits).
Used from the engine's one worker thread; not thread-safe.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

BLOCK = 32  # tokens per hashed block: a match shorter than one block is not worth a lookup
# The default bound when none is given: this share of the memory available at start, at most DEFAULT_MAX_MB.
DEFAULT_SHARE = 0.10
DEFAULT_MAX_MB = 2048


@dataclass
class PrefixCacheStats:
    """Running totals of the cache, for metrics (reward_engine_prefix_cache_<field>_total)."""

    hits: int = 0           # sequences that reused a cached prefix
    misses: int = 0         # sequences that found none
    reused_tokens: int = 0  # tokens not computed thanks to the cache
    evictions: int = 0      # entries dropped to stay within the bound (not those a newer entry extends)
    bytes: int = 0          # held now (a gauge)


@dataclass(eq=False)
class Entry:
    """One cached sequence: its ids, each layer's (keys, values) [length, kv heads, dim], and its final
    hidden states [H] at the positions read when it was scored."""

    ids: np.ndarray
    layers: dict[int, tuple[Any, Any]]
    hidden: dict[int, Any]
    hashes: list[int] = field(default_factory=list)
    nbytes: int = 0
    buffer: Any = None  # the attention.KVBuffer its keys and values are views of, if any (later turns grow it)


def block_hashes(ids: Sequence[int] | np.ndarray) -> list[int]:
    """Chained hashes of the full `BLOCK`-token blocks of `ids`: block k's hash covers blocks 0..k."""
    ids = np.asarray(ids, dtype=np.int64)
    hashes, previous = [], 0
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        previous = hash((previous, ids[start:start + BLOCK].tobytes()))
        hashes.append(previous)
    return hashes


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def default_max_bytes() -> int:
    """The bound when none is set: `DEFAULT_SHARE` of the memory available now, at most `DEFAULT_MAX_MB`."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = 0
    return int(min(DEFAULT_MAX_MB << 20, DEFAULT_SHARE * available))


class PrefixCache:
    """Least-recently-used cache of computed sequences, bounded in bytes; see the module docstring.

    Args:
        max_bytes: the most bytes of keys, values and hidden states held (0: nothing is kept).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache's bound must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, least recent first
        self._index: dict[int, dict[int, Entry]] = {}  # block hash -> entries holding that block chain

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int], touch: bool = True) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `ids`, and that prefix's length (None, 0 when no
        entry shares a full block). `touch` marks the entry used (least-recently-used order)."""
        ids = np.asarray(ids, dtype=np.int64)
        return self._match(ids, block_hashes(ids), touch)

    def _match(self, ids: np.ndarray, hashes: list[int], touch: bool) -> tuple[Entry | None, int]:
        """`lookup` with the ids' block hashes already computed."""
        candidates: dict[int, Entry] = {}
        blocks = 0
        for h in hashes:
            found = self._index.get(h)
            if not found:
                break
            candidates, blocks = found, blocks + 1
        best, best_length = None, 0
        common = blocks * BLOCK
        for entry in candidates.values():
            if not np.array_equal(entry.ids[:common], ids[:common]):
                continue  # a hash collision: never serve another sequence's keys
            n = min(len(entry.ids), len(ids))
            differ = np.flatnonzero(entry.ids[common:n] != ids[common:n])
            length = common + (int(differ[0]) if len(differ) else n - common)
            if length > best_length:
                best, best_length = entry, length
        if best is not None and touch:
            self._entries.move_to_end(id(best))
        return best, best_length

    def insert(self, ids: Sequence[int], layers: dict[int, tuple[Any, Any]], hidden: dict[int, Any],
               buffer: Any = None) -> Entry | None:
        """Keep a computed sequence (keys and values of every position, hidden states at `hidden`'s
        positions); returns its entry, or None when it alone exceeds the bound. Entries it extends
        are dropped and their reads kept in it; the least recently used go until it fits. `buffer`:
        the attention.KVBuffer `layers` are views of; its whole size, room included, is what counts."""
        ids = np.asarray(ids, dtype=np.int64)
        kv_bytes = buffer.nbytes if buffer is not None else sum(_nbytes(k) + _nbytes(v) for k, v in layers.values())
        if kv_bytes > self.max_bytes:
            return None
        hashes = block_hashes(ids)
        covering, length = self._match(ids, hashes, touch=True)
        if covering is not None and length == len(ids):  # held already: keep the new reads only
            for position, state in hidden.items():
                if position not in covering.hidden:
                    covering.hidden[position] = state
                    covering.nbytes += _nbytes(state)
                    self.stats.bytes += _nbytes(state)
            return covering
        hidden = dict(hidden)
        while True:  # entries this one extends are dropped: it holds all they hold
            older, length = self._match(ids, hashes, touch=False)
            if older is None or length < len(older.ids):
                break
            for position, state in older.hidden.items():
                hidden.setdefault(position, state)
            self._remove(older)
        nbytes = kv_bytes + sum(map(_nbytes, hidden.values()))
        while self._entries and self.stats.bytes + nbytes > self.max_bytes:
            self._remove(next(iter(self._entries.values())))
            self.stats.evictions += 1
        if self.stats.bytes + nbytes > self.max_bytes:
            return None
        entry = Entry(ids, layers, hidden, hashes, nbytes, buffer)
        self._entries[id(entry)] = entry
        for h in entry.hashes:
            self._index.setdefault(h, {})[id(entry)] = entry
        self.stats.bytes += nbytes
        return entry

    def clear(self) -> None:
        """Drop every entry."""
        for entry in list(self._entries.values()):
            self._remove(entry)

    def _remove(self, entry: Entry) -> None:
        del self._entries[id(entry)]
        for h in entry.hashes:
            holders = self._index.get(h)
            if holders is not None:
                holders.pop(id(entry), None)
                if not holders:
                    del self._index[h]
        self.stats.bytes -= entry.nbytes
