"""The prefix cache (reward_server/pipeline/torch_engine/prefix_cache.py): its bookkeeping alone, then
the engine through it: a score computed through cached keys has the same bits as computed cold."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from reward_server.pipeline.torch_engine.engine import EngineStats, RewardEngine
from reward_server.pipeline.torch_engine.prefix_cache import BLOCK, PrefixCache, block_hashes

LAYERS = 2


def _layers(length: int, fill: float = 1.0) -> dict:
    return {layer: (torch.full((length, 2, 4), fill), torch.full((length, 2, 4), -fill)) for layer in range(LAYERS)}


def _bytes(length: int) -> int:
    return LAYERS * 2 * length * 2 * 4 * 4


def test_block_hashes_chain_from_the_start():
    ids = list(range(3 * BLOCK + 5))
    hashes = block_hashes(ids)
    assert len(hashes) == 3
    assert block_hashes(ids[:2 * BLOCK]) == hashes[:2]
    changed = [999] + ids[1:]  # a change in block 0 changes every later block's hash
    assert all(a != b for a, b in zip(block_hashes(changed), hashes))


def test_lookup_finds_the_longest_prefix_past_the_last_common_block():
    cache = PrefixCache(1 << 30)
    a = list(range(100))
    b = list(range(70)) + [7] * 30
    cache.insert(a, _layers(100), {})
    cache.insert(b, _layers(100, 2.0), {})
    entry, length = cache.lookup(list(range(90)) + [5, 5])
    assert entry.ids.tolist() == a and length == 90
    entry, length = cache.lookup(list(range(70)) + [7] * 5 + [1])
    assert entry.ids.tolist() == b and length == 75
    assert cache.lookup(list(range(BLOCK - 1)) + [5000]) == (None, 0)  # no full common block: no match
    assert cache.lookup([5] + a[1:]) == (None, 0)


def test_an_entry_a_newer_one_extends_is_dropped_and_its_reads_kept():
    cache = PrefixCache(1 << 30)
    first = list(range(64))
    cache.insert(first, _layers(64), {63: torch.ones(3)})
    longer = first + list(range(100, 140))
    entry = cache.insert(longer, _layers(104), {103: torch.zeros(3)})
    assert len(cache) == 1 and set(entry.hidden) == {63, 103}
    assert cache.stats.bytes == _bytes(104) + 2 * 3 * 4 and cache.stats.evictions == 0
    # a sequence the cache holds whole adds only its reads
    assert cache.insert(first, _layers(64), {10: torch.ones(3)}) is entry and set(entry.hidden) == {10, 63, 103}


def test_least_recently_used_entries_go_first_and_the_bound_holds():
    cache = PrefixCache(3 * _bytes(64))
    seqs = [[k] * 64 for k in range(4)]
    for seq in seqs[:3]:
        cache.insert(seq, _layers(64), {})
    cache.lookup(seqs[0])  # 0 used last: 1 is now the least recent
    cache.insert(seqs[3], _layers(64), {})
    assert cache.stats.evictions == 1 and cache.stats.bytes == 3 * _bytes(64)
    assert cache.lookup(seqs[1]) == (None, 0)
    assert all(cache.lookup(seqs[k])[1] == 64 for k in (0, 2, 3))
    assert cache.insert([9] * 256, _layers(256), {}) is None  # larger than the bound: never kept
    assert len(cache) == 3
    with pytest.raises(ValueError, match=">= 0 bytes"):
        PrefixCache(-1)


def test_a_hash_collision_never_serves_another_sequence():
    cache = PrefixCache(1 << 30)
    entry = cache.insert(list(range(64)), _layers(64), {})
    other = list(range(1000, 1064))
    for h in block_hashes(other):  # pretend the other sequence's blocks hashed alike
        cache._index.setdefault(h, {})[id(entry)] = entry
    assert cache.lookup(other) == (None, 0)


# --- the engine through the cache ---

def _conversation(rng, length: int) -> list[int]:
    return [int(t) for t in rng.integers(5, 2000, size=length)]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engines(request, demo_checkpoint):
    from reward_server.pipeline.torch_engine.engine import cpu_has_fast_bf16

    if request.param == "bfloat16" and not cpu_has_fast_bf16():
        pytest.skip("bf16 needs AVX-512 BF16 or AMX")
    cached = RewardEngine.from_checkpoint(demo_checkpoint, device="cpu", dtype=request.param, attention="native",
                                          prefix_cache_mb=256)
    cold = RewardEngine.from_checkpoint(demo_checkpoint, device="cpu", dtype=request.param, attention="native",
                                        prefix_cache_mb=0)
    return cached, cold


def test_scores_through_cached_prefixes_have_the_bits_of_cold_ones(engines):
    cached, cold = engines
    cached.cache.clear()
    cached.cache.stats = type(cached.cache.stats)()
    rng = np.random.default_rng(3)
    turn1 = _conversation(rng, 150)
    turn2 = turn1 + _conversation(rng, 90)  # a later turn extends the first
    turn3 = turn2 + _conversation(rng, 60)
    group = [turn1[:120] + _conversation(rng, n) for n in (40, 55, 70)]  # members of one prompt, apart
    sequence = [[turn1], [turn2], [turn3], group[:1], group[1:]]
    assert all(cold.head.position(s) == len(s) - 1 for batch in sequence for s in batch)  # pooled at the end
    before = cached.stats.tokens
    got = [cached.score(batch) for batch in sequence]
    # cold: each batch alone, in a fresh order, and all together (any placement gives the same bits)
    want = [cold.score(batch) for batch in sequence]
    together = cold.score([s for batch in sequence for s in batch])
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()
    assert np.concatenate(got).tobytes() == together.tobytes()
    # computed: turn1 whole, then only what each later call added (the members: past the cached prompt)
    assert cached.stats.tokens - before == 150 + 90 + 60 + 40 + 55 + 70
    assert cached.cache.stats.hits >= 4 and cached.cache.stats.reused_tokens == 150 + 240 + 3 * 120


def test_after_eviction_scores_are_computed_again_with_the_same_bits(engines):
    cached, cold = engines
    rng = np.random.default_rng(4)
    sequences = [_conversation(rng, 200) for _ in range(6)]
    probe = dataclasses.replace(cached, cache=PrefixCache(1 << 30), stats=EngineStats())
    probe.score(sequences[:1])
    small = dataclasses.replace(cached, cache=PrefixCache(2 * probe.cache.stats.bytes + 4096), stats=EngineStats())
    first = small.score(sequences)
    assert small.cache.stats.evictions == 4 and len(small.cache) == 2
    assert small.cache.stats.bytes <= small.cache.max_bytes
    again = small.score(sequences)  # the last two kept are reused (all but their last token), the rest computed
    assert small.cache.stats.reused_tokens == 2 * 199 and small.cache.stats.hits == 2
    assert first.tobytes() == again.tobytes() == cold.score(sequences).tobytes()


def test_a_growing_conversation_appends_its_keys_in_place(engines):
    """Turn after turn, a conversation's new keys go after the cached ones in one buffer (no copy of the
    prefix), with room only where a sequence extends a whole cached one; the bits stay the cold ones."""
    cached, cold = engines
    cached.cache.clear()
    rng = np.random.default_rng(9)
    turns = [_conversation(rng, 200)]
    for n in (60, 40, 30):
        turns.append(turns[-1] + _conversation(rng, n))
    buffers = []
    for turn in turns:
        assert cached.score([turn]).tobytes() == cold.score([turn]).tobytes()
        entry, length = cached.cache.lookup(turn, touch=False)
        assert length == len(turn) and entry.buffer is not None
        buffers.append(entry.buffer)
    assert buffers[0].capacity == len(turns[0])  # a first sequence: exactly its length
    assert buffers[1] is not buffers[0] and buffers[1].capacity >= 1.5 * len(turns[1])  # extended: room to grow
    assert buffers[3] is buffers[2] is buffers[1]  # the next turns wrote in place
    # a sequence that only shares a prompt with a cached one gets no room
    other = turns[0][:100] + _conversation(rng, 50)
    cached.score([other])
    entry, _ = cached.cache.lookup(other, touch=False)
    assert entry.buffer.capacity == len(other)
