"""Bit-reproducible scores: a conversation's score has the same float bits whatever it is batched
with, wherever it sits in the batch, whatever the token budget, whether its prompt is shared with
its group or not, and across engine instances.

What makes it hold (not the machine): every product of the fused layers runs on oneDNN-prepacked
weights, which give a row the same bits whatever the number of rows around it, except bf16 on AMX,
where the native kernels compute the products in blocks of one fixed shape (oneDNN's bf16 blocking
there follows the row count); norms and the rotary
embedding work per row; the reward head is applied one row at a time; the native attention kernel
sums each query's keys in one fixed order, in key blocks aligned to its sequence's start, whether
the first keys were recorded in a shared-prompt pass or computed with the rest (its header comment
in reward_server/pipeline/torch_engine/kernels/attention.cpp; tests/test_attention_kernel.py checks it directly).
"""

from __future__ import annotations

import numpy as np
import pytest

from reward_server.pipeline.torch_engine.engine import RewardEngine
from tests.test_server import score_ids

RNG = np.random.default_rng(11)
TARGET = RNG.integers(300, 2000, 300).tolist()
NEIGHBOURS = [RNG.integers(300, 2000, int(n)).tolist() for n in RNG.integers(5, 500, 24)]  # the server allows 512
PROMPT = RNG.integers(300, 2000, 80).tolist()
GROUP = [PROMPT + RNG.integers(300, 2000, int(n)).tolist() for n in (40, 7, 120)]


def _bits(values) -> bytes:
    return np.asarray(values, dtype=np.float32).tobytes()


def test_engine_scores_are_bit_identical_whatever_the_batch(demo_checkpoint):
    engine = RewardEngine.from_checkpoint(demo_checkpoint, device="cpu")
    alone = _bits(engine.score([TARGET])[0])
    seen = {}
    for position in (0, 1, 5, 12, 24):
        for count in (1, 6, 24):
            batch = NEIGHBOURS[:position] + [TARGET] + NEIGHBOURS[position:position + count]
            seen[f"position {position}, {count} after"] = _bits(engine.score(batch)[position])
    for budget in (128, 512, 1000, 4096, 16384):  # 128: the conversation alone in an oversize row
        engine.token_budget = budget
        seen[f"budget {budget}"] = _bits(engine.score(NEIGHBOURS[:9] + [TARGET])[9])
    other = RewardEngine.from_checkpoint(demo_checkpoint, device="cpu", token_budget=2048)
    seen["another instance"] = _bits(other.score(NEIGHBOURS[3:8] + [TARGET])[5])
    assert {name: bits for name, bits in seen.items() if bits != alone} == {}


def test_group_members_are_bit_identical_whatever_else_is_in_the_batch(demo_checkpoint):
    """A GRPO group scored through its shared prompt: the same bits as each member scored alone,
    and with any neighbours."""
    engine = RewardEngine.from_checkpoint(demo_checkpoint, device="cpu", min_shared=32)
    alone = _bits(engine.score(GROUP))
    assert engine.stats.shared_tokens == 2 * len(PROMPT)
    assert alone == b"".join(_bits(engine.score([member])) for member in GROUP)
    for position in (0, 3, 10):
        for budget in (256, 4096):
            engine.token_budget = budget
            batch = NEIGHBOURS[:position] + GROUP + NEIGHBOURS[position:position + 8]
            assert _bits(engine.score(batch)[position:position + len(GROUP)]) == alone, (position, budget)


@pytest.mark.parametrize("cache_mb", [0, 64], ids=["shared-in-call", "prefix-cache"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_placement_gives_the_same_bits(demo_checkpoint, monkeypatch, dtype, cache_mb):
    """The placements a user meets, in fp32 and in bf16 (where the CPU computes bf16: there the attention
    kernel's products run in bf16 pairs and the layers' element-wise steps in bf16): alone, repeated
    (64 copies share their whole prompt), among 4 to 39 neighbours, second in a request of two, inside its
    GRPO group (shared prompt, 8 members) and in its group among 30 other conversations; with prefixes
    shared within each call only, and through the prefix cache (every call after the first continues
    keys computed by an earlier one)."""
    import torch

    from reward_server.pipeline.torch_engine import engine as engine_module
    from reward_server.pipeline.torch_engine.fused import prepack_available

    if dtype == "bfloat16":
        if not prepack_available(torch.device("cpu"), torch.bfloat16):
            pytest.skip("this CPU cannot prepack bf16 products for oneDNN (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): "
                        "bf16 scores are not claimed batch-invariant here")
        monkeypatch.setattr(engine_module, "cpu_has_fast_bf16", lambda: True)
    engine = RewardEngine.from_checkpoint(demo_checkpoint, device="cpu", dtype=dtype, min_shared=32,
                                          prefix_cache_mb=cache_mb)
    rng = np.random.default_rng(5)
    group = [PROMPT + rng.integers(300, 2000, int(n)).tolist() for n in rng.integers(5, 200, 8)]
    others = [rng.integers(300, 2000, int(n)).tolist() for n in rng.integers(5, 500, 39)]
    target, member = group[3], 3
    alone = _bits(engine.score([target])[0])
    seen = {"repeated x64": _bits(engine.score([target] * 64)[17]),
            "second of two": _bits(engine.score([others[0], target])[1]),
            "first of two": _bits(engine.score([target, others[0]])[0]),
            "in its group": _bits(engine.score(group)[member]),
            "in its group among 30": _bits(engine.score(others[:15] + group + others[15:30])[15 + member])}
    for count in (4, 11, 39):
        seen[f"among {count}"] = _bits(engine.score(others[:count // 2] + [target] + others[count // 2:count])[count // 2])
    if cache_mb:  # later calls continued cached keys
        assert engine.cache.stats.hits >= 8 and engine.cache.stats.reused_tokens > 0
    else:  # the group and the copies went through the shared-prompt path
        assert engine.stats.shared_tokens > 0
    assert {name: bits for name, bits in seen.items() if bits != alone} == {}
    members = b"".join(_bits(engine.score([m])) for m in group)
    assert _bits(engine.score(others[:3] + group)[3:]) == members


def test_served_scores_are_bit_identical_across_requests_and_dynamic_batches(server):
    """Through the real server: alone, in requests of other sizes and positions, and while other
    clients' requests share its dynamic batches. (Two copies of one conversation in one dynamic
    batch share their whole prefix, so the target is sent by one client at a time.)"""
    import threading

    alone = _bits(score_ids(server.grpc_url, [TARGET])[0])
    stop, filler_requests = threading.Event(), []

    def filler(seed: int) -> None:  # other clients, other conversations, all the while
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            score_ids(server.grpc_url, [rng.integers(300, 2000, int(n)).tolist() for n in rng.integers(5, 400, 6)])
            filler_requests.append(seed)

    threads = [threading.Thread(target=filler, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    try:
        got = {}
        for position, count in ((0, 3), (4, 0), (9, 12), (20, 4), (2, 20)):
            batch = NEIGHBOURS[:position] + [TARGET] + NEIGHBOURS[position:position + count]
            got[(position, count)] = _bits(score_ids(server.grpc_url, batch)[position])
        # a group through its shared prompt, and its members one request each
        group = score_ids(server.grpc_url, NEIGHBOURS[:2] + GROUP)[2:]
        members = [score_ids(server.grpc_url, [member])[0] for member in GROUP]
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert len(filler_requests) >= 2
    assert {key: bits for key, bits in got.items() if bits != alone} == {}
    assert _bits(group) == _bits(members)


@pytest.mark.parametrize("rows", [1, 7, 64, 333, 2048])
def test_prepacked_products_give_a_row_the_same_bits_among_any_rows(rows):
    """The property the engine relies on, checked on this machine's oneDNN."""
    import torch

    from reward_server.pipeline.torch_engine.fused import PackedLinear, prepack_available

    if not prepack_available(torch.device("cpu"), torch.float32):
        pytest.fail("torch here cannot prepack for oneDNN: scores would not be batch-invariant")
    generator = torch.Generator().manual_seed(0)
    for n, k in ((1536, 512), (512, 1408)):  # 512 x 1408 (a down projection): a lone row took another path
        weight = torch.randn(n, k, generator=generator)
        x = torch.randn(2048 + 5, k, generator=generator)
        linear = PackedLinear(weight, rows_hint=4096)
        among_many = linear(x[:1024])[5]
        for offset in (0, 5):
            if offset <= 5 < offset + rows:
                assert torch.equal(linear(x[offset:offset + rows])[5 - offset], among_many), (n, k, offset)


@pytest.mark.parametrize("rows", [1, 10, 20, 33, 64, 333, 2633, 3000])
def test_the_engines_bf16_products_give_a_row_the_same_bits_among_any_rows(rows):
    """bf16 at a real layer's shape (512 -> 2816), through the product the engine picks on this CPU
    (`fused.product`: AMX tiles where it has them, else oneDNN). oneDNN's own bf16 matmul on an AMX
    Xeon gave a row other bits among 10, 20, 33 or 2,633 rows than among 3,000."""
    import torch

    from reward_server.pipeline.torch_engine import kernels
    from reward_server.pipeline.torch_engine.engine import cpu_has_fast_bf16
    from reward_server.pipeline.torch_engine.fused import prepack_available, product

    if not (cpu_has_fast_bf16() and prepack_available(torch.device("cpu"), torch.bfloat16)):
        pytest.skip("bf16 is not computed in hardware here: bf16 scores are not claimed batch-invariant")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2816, 512, generator=generator).bfloat16()
    x = torch.randn(4096, 512, generator=generator).bfloat16()
    linear = product(weight, native=kernels.attention())
    among_all = linear(x)
    assert torch.equal(linear(x[:rows]), among_all[:rows])
    shuffled = torch.randperm(4096, generator=generator)[:rows]
    assert torch.equal(linear(x[shuffled]), among_all[shuffled])


def test_bf16_scores_at_a_real_layer_width_are_the_same_in_any_batch(tmp_path):
    """The `small` demo shape (hidden 512, MLP 1408, 8 layers), bf16: each of 24 conversations alone and
    all together give the same bits (before the products ran on AMX tiles, 19 of 24 differed on an AMX
    Xeon: the `tiny` shape of the tests above does not show it)."""
    import torch

    from reward_server.pipeline.torch_engine.engine import cpu_has_fast_bf16
    from reward_server.pipeline.torch_engine.fused import prepack_available
    from reward_server.supervisor.demo_checkpoint import build_checkpoint

    if not (cpu_has_fast_bf16() and prepack_available(torch.device("cpu"), torch.bfloat16)):
        pytest.skip("bf16 is not computed in hardware here: bf16 scores are not claimed batch-invariant")
    checkpoint = build_checkpoint(tmp_path / "small", "small")
    engine = RewardEngine.from_checkpoint(checkpoint, dtype="bfloat16", prefix_cache_mb=0, min_shared=0)
    rng = np.random.default_rng(0)
    conversations = [rng.integers(10, 30000, int(n)).tolist() for n in rng.integers(20, 900, 24)]
    together = engine.score(conversations)
    alone = np.concatenate([engine.score([c]) for c in conversations])
    assert [i for i in range(24) if _bits(together[i]) != _bits(alone[i])] == []
