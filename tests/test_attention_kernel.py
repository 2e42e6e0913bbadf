"""The native attention kernel (reward_server/pipeline/torch_engine/kernels/attention.cpp), called directly.

Against torch's SDPA in float64 (the exact answer to compare with), and for the property the
engine builds on: a query's result has the same float bits whatever else is in the row, where its
sequence sits, how its queries are tiled, and whether its first keys come from a shared prefix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reward_server.pipeline.torch_engine import kernels


@pytest.fixture(scope="module")
def kernel():
    return kernels.attention()  # built by `make setup`; a failure to build fails here, loudly


def _reference(q, k, v, scale, offset=0, prefix=None, window=0, softcap=0.0):
    """Attention in float64 for one sequence, as transformers' eager attention computes it: q [L, H, D];
    keys = prefix keys then its own; query i (at offset + i) sees keys j <= offset + i, and with a
    window only j > offset + i - window; scores softcapped (C tanh(s / C)) when softcap is given."""
    if prefix is not None:
        k, v = torch.cat([prefix[0], k]), torch.cat([prefix[1], v])
    keys, queries = torch.arange(k.shape[0])[None, :], torch.arange(q.shape[0])[:, None] + offset
    mask = (keys <= queries) & ((keys > queries - window) if window else True)
    heads = lambda t: t.transpose(0, 1).double()  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
    scores = q @ k.transpose(1, 2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    return (torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v).transpose(0, 1)


def _call(kernel, q, k, v, segments, prefixes=(), scale=None, window=0, softcap=0.0):
    out = torch.empty_like(q)
    kernel.packed_attention(q, k, v, out, torch.tensor(segments, dtype=torch.int64),
                            [p[0] for p in prefixes], [p[1] for p in prefixes], scale or q.shape[-1] ** -0.5,
                            window, softcap)
    return out


def _row(lengths, heads, kv_heads, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return tuple(torch.randn(total, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (8, 8, 64), (4, 1, 128), (6, 3, 10)])
def test_matches_reference_on_a_packed_row_with_shared_prefixes(kernel, heads, kv_heads, dim):
    lengths = [1, 5, 31, 32, 33, 100, 257]  # around the key-block and tile sizes
    q, k, v = _row(lengths, heads, kv_heads, dim)
    g = torch.Generator().manual_seed(1)
    prefixes = [tuple(torch.randn(n, kv_heads, dim, generator=g) for _ in range(2)) for n in (77, 64)]
    segments, at = [], 0
    for i, length in enumerate(lengths):  # every other sequence continues a prefix (not block-aligned: 77)
        p = i % 3 - 1
        segments.append([at, length, prefixes[p][0].shape[0] if p >= 0 else 0, p])
        at += length
    out = _call(kernel, q, k, v, segments, prefixes)
    for start, length, offset, p in segments:
        expected = _reference(q[start:start + length], k[start:start + length], v[start:start + length],
                              dim ** -0.5, offset, prefixes[p] if p >= 0 else None)
        torch.testing.assert_close(out[start:start + length].double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("length", [4096, 5000])
def test_long_sequences_match_the_reference(kernel, length):
    q, k, v = _row([length], 2, 1, 64, seed=length)
    out = _call(kernel, q, k, v, [[0, length, 0, -1]])
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.125), rtol=0, atol=2e-6)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    expected = _reference(qb, kb, vb, 0.125)
    assert (_call(kernel, qb, kb, vb, [[0, length, 0, -1]]).double() - expected).abs().max() <= 2 ** -7 * expected.abs().max()


@pytest.mark.parametrize("dim,window,softcap", [(64, 0, 0.0), (128, 0, 0.0), (16, 40, 0.0), (32, 0, 2.0), (10, 7, 0.0)])
def test_bfloat16_is_within_bf16_rounding_of_the_exact_answer(kernel, dim, window, softcap):
    """bf16 (on AVX-512 BF16 CPUs both products in bf16 pairs: `kernel.bf16_pairs`), with shared
    prefixes, windows and softcapping, against the float64 answer."""
    lengths = [300, 45, 33]
    q, k, v = _row(lengths, 4, 2, dim, dtype=torch.bfloat16)
    prefix = tuple(torch.randn(77, 2, dim, generator=torch.Generator().manual_seed(3)).bfloat16() for _ in range(2))
    segments = [[0, 300, 0, -1], [300, 45, 77, 0], [345, 33, 0, -1]]
    out = _call(kernel, q, k, v, segments, [prefix], window=window, softcap=softcap)
    assert out.dtype == torch.bfloat16
    for start, length, offset, p in segments:
        s = slice(start, start + length)
        expected = _reference(q[s], k[s], v[s], dim ** -0.5, offset, prefix if p == 0 else None, window, softcap)
        error = (out[s].double() - expected).abs().max().item()
        assert error <= 2 ** -7 * expected.abs().max().item()  # about one bf16 step at the largest output


def test_bf16_pairs_wherever_the_cpu_has_avx512_bf16_and_tiles_where_it_has_amx(kernel):
    """The loader picks the build with bf16-pair products exactly where the CPU has them, and the one
    with AMX tiles where it has those too (and the OS grants them)."""
    flags = kernels.cpu_flags()
    assert bool(kernel.bf16_pairs) == ("avx512_bf16" in flags) == (kernel.variant in ("amx", "avx512_bf16"))
    assert bool(kernel.amx) == ({"amx_bf16", "amx_tile"} <= flags) == (kernel.variant == "amx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_gets_the_same_bits_whatever_the_row(kernel, dtype):
    """Alone; among neighbours of other lengths at other positions; its prompt's keys recorded
    by another pass and read as a shared prefix; split at any prefix length."""
    heads, kv_heads, dim, length = 8, 4, 64, 700
    q, k, v = _row([length], heads, kv_heads, dim, dtype=dtype, seed=5)
    alone = _call(kernel, q, k, v, [[0, length, 0, -1]])
    nq, nk, nv = _row([13, 290, 64], heads, kv_heads, dim, dtype=dtype, seed=6)
    for before in (0, 13, 303, 367):
        row = [torch.cat([n[:before], x, n[before:]]) for n, x in ((nq, q), (nk, k), (nv, v))]
        segments = [[0, before, 0, -1]] if before else []
        segments += [[before, length, 0, -1]] + ([[before + length, 367 - before, 0, -1]] if before < 367 else [])
        out = _call(kernel, *row, segments)
        assert torch.equal(out[before:before + length], alone), before
    for split in (1, 31, 32, 100, 689):  # the first `split` keys as a recorded prefix
        suffix = [x[split:].clone() for x in (q, k, v)]
        out = _call(kernel, *suffix, [[0, length - split, split, 0]], [(k[:split], v[:split])])
        assert torch.equal(out, alone[split:]), split


@pytest.mark.parametrize("window,softcap", [(1, 0.0), (7, 0.0), (32, 0.0), (100, 0.0), (0, 2.0), (45, 2.0)])
def test_sliding_windows_and_softcapping_match_the_reference(kernel, window, softcap):
    """Gemma-2's and Mistral's attention: each query sees its last `window` positions, a shared prefix's
    keys included (a window reaching back into it, or past it); scores softcapped. The scores are
    scaled up so that softcapping (at 2.0) really bends them."""
    heads, kv_heads, dim = 4, 2, 16
    lengths = [1, 5, 31, 33, 70, 257]
    q, k, v = _row(lengths, heads, kv_heads, dim, seed=window)
    q = q * 3
    g = torch.Generator().manual_seed(2)
    prefixes = [tuple(torch.randn(n, kv_heads, dim, generator=g) for _ in range(2)) for n in (77, 20)]
    segments, at = [], 0
    for i, length in enumerate(lengths):
        p = i % 3 - 1
        segments.append([at, length, prefixes[p][0].shape[0] if p >= 0 else 0, p])
        at += length
    out = _call(kernel, q, k, v, segments, prefixes, window=window, softcap=softcap)
    for start, length, offset, p in segments:
        s = slice(start, start + length)
        expected = _reference(q[s], k[s], v[s], dim ** -0.5, offset, prefixes[p] if p >= 0 else None, window, softcap)
        torch.testing.assert_close(out[s].double(), expected, rtol=0, atol=5e-6)
    if window:  # the window changes the answer (so the comparison above could fail)
        unbounded = _call(kernel, q, k, v, segments, prefixes, softcap=softcap)
        assert (unbounded[-100:] - out[-100:]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [16, 40])
def test_a_query_gets_the_same_bits_whatever_the_row_under_a_window(kernel, window, dtype):
    """Blocks before a tile's window are skipped, blocks partly in it masked per lane: neither may
    make a query's bits depend on its tile mates, its place in the row, or a shared prefix."""
    heads, kv_heads, dim, length = 4, 2, 32, 300
    q, k, v = _row([length], heads, kv_heads, dim, dtype=dtype, seed=9)
    alone = _call(kernel, q, k, v, [[0, length, 0, -1]], window=window, softcap=30.0)
    nq, nk, nv = _row([13, 50], heads, kv_heads, dim, dtype=dtype, seed=10)
    row = [torch.cat([n[:13], x, n[13:]]) for n, x in ((nq, q), (nk, k), (nv, v))]
    out = _call(kernel, *row, [[0, 13, 0, -1], [13, length, 0, -1], [13 + length, 50, 0, -1]], window=window,
                softcap=30.0)
    assert torch.equal(out[13:13 + length], alone)
    for split in (1, 33, 150):
        suffix = [x[split:].clone() for x in (q, k, v)]
        out = _call(kernel, *suffix, [[0, length - split, split, 0]], [(k[:split], v[:split])], window=window,
                    softcap=30.0)
        assert torch.equal(out, alone[split:]), split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_are_read_in_place(kernel, dtype):
    """The engine passes q, k and v as views of one fused projection [T, heads + 2 kv, dim]."""
    heads, kv_heads, dim = 4, 2, 32
    fused = torch.randn(90, heads + 2 * kv_heads, dim).to(dtype)
    q, k, v = fused[:, :heads], fused[:, heads:heads + kv_heads], fused[:, heads + kv_heads:]
    out = _call(kernel, q, k, v, [[0, 90, 0, -1]])
    assert torch.equal(out, _call(kernel, q.contiguous(), k.contiguous(), v.contiguous(), [[0, 90, 0, -1]]))


def test_bad_arguments_are_refused_with_the_reason(kernel):
    q, k, v = _row([10], 4, 2, 16)
    with pytest.raises(RuntimeError, match="segment 0 outside the row"):
        _call(kernel, q, k, v, [[5, 10, 0, -1]])
    with pytest.raises(RuntimeError, match="segment 0: bad prefix"):
        _call(kernel, q, k, v, [[0, 10, 4, -1]])
    with pytest.raises(RuntimeError, match="multiple of key heads"):
        _call(kernel, q[:, :3], k, v, [[0, 10, 0, -1]])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        _call(kernel, q.double(), k.double(), v.double(), [[0, 10, 0, -1]])
    with pytest.raises(RuntimeError, match="window and softcap must be >= 0"):
        _call(kernel, q, k, v, [[0, 10, 0, -1]], window=-1)


def _runnable():
    return [v.name for v in kernels.VARIANTS if set(v.requires) <= kernels.cpu_flags()]


def test_every_build_this_cpu_runs_computes_the_same_bits_in_float32(monkeypatch):
    """The builds differ in vector width (8 or 16 queries across lanes) and instructions, never in
    any query's arithmetic: in float32 each gives the same bits (and the right answer), so a
    server's scores do not depend on which build its machine picked. bf16 differs only where
    AVX-512 BF16 pairs its products, or AMX tiles do (each a different, documented rounding)."""
    runnable = _runnable()
    assert "avx2" in runnable  # every machine the project supports
    lengths = [1, 31, 33, 100, 257]
    q, k, v = _row(lengths, 4, 2, 64, seed=5)
    segments, at = [], 0
    for length in lengths:
        segments.append([at, length, 0, -1])
        at += length
    outputs, lanes = {}, {}
    for name in runnable:
        monkeypatch.setenv(kernels.ENV, name)
        module = kernels.attention()
        assert (module.variant, module.origin) == (name, "prebuilt")  # `make setup` built every variant
        outputs[name], lanes[name] = _call(module, q, k, v, segments), module.lanes
        qb, kb, vb = (x.bfloat16() for x in (q, k, v))
        outputs[name + "/bf16"] = _call(module, qb, kb, vb, segments)
    assert lanes["avx2"] == 8 and all(lanes[n] == 16 for n in runnable if n != "avx2")
    for name in runnable:
        assert torch.equal(outputs[name], outputs["avx2"]), name
    loaded = kernels.attention.__globals__["_LOADED"]
    for name in runnable:
        if not getattr(loaded[name], "bf16_pairs", False):
            assert torch.equal(outputs[name + "/bf16"], outputs["avx2/bf16"]), name
    if "amx" in runnable:  # tiles: the same products as the pairs, rounded in the instruction's own order
        assert loaded["amx"].amx and not loaded["avx512_bf16"].amx
        assert not torch.equal(outputs["amx/bf16"], outputs["avx512_bf16/bf16"])
        torch.testing.assert_close(outputs["amx/bf16"].float(), outputs["avx512_bf16/bf16"].float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(outputs["avx2"][:1].double(), _reference(q[:1], k[:1], v[:1], 0.125), rtol=0, atol=2e-6)


def test_the_best_build_the_cpu_runs_is_chosen_and_a_forced_one_it_lacks_is_refused():
    avx2, avx512, bf16 = {"avx2", "fma", "f16c"}, {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, {"avx512_bf16"}
    assert kernels.choose(avx2).name == "avx2"
    assert kernels.choose(avx2 | avx512).name == "avx512"
    assert kernels.choose(avx2 | avx512 | bf16).name == "avx512_bf16"
    assert kernels.choose(avx2 | avx512 | bf16 | {"amx_bf16", "amx_tile"}).name == "amx"
    assert kernels.choose(avx2 | avx512 | bf16 | {"amx_bf16", "amx_tile"}, "avx512_bf16").name == "avx512_bf16"
    assert kernels.choose({"avx2", "fma"}) is None  # no f16c: no build runs (the engine uses SDPA)
    assert kernels.choose({"avx", "sse4_2"}) is None
    assert kernels.choose(avx2 | avx512 | bf16, "avx2").name == "avx2"
    with pytest.raises(kernels.KernelRefused, match=r"REWARD_SERVER_KERNELS=avx512_bf16: this CPU lacks avx512_bf16; "
                                                    r"it runs avx512, avx2 \(or unset REWARD_SERVER_KERNELS\)"):
        kernels.choose(avx2 | avx512, "avx512_bf16")
    with pytest.raises(kernels.KernelRefused, match=r"REWARD_SERVER_KERNELS=amx: this CPU lacks amx_bf16 amx_tile; "
                                                    r"it runs avx512_bf16, avx512, avx2"):
        kernels.choose(avx2 | avx512 | bf16, "amx")
    with pytest.raises(kernels.KernelRefused, match="no such kernel build; use one of auto, amx, avx512_bf16, avx512, avx2"):
        kernels.choose(avx2, "sse")


def test_a_cpu_without_avx2_gets_sdpa_with_the_reason(monkeypatch, caplog):
    from reward_server.pipeline.torch_engine import attention

    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse4_2", "avx"})
    monkeypatch.setattr(kernels, "_LOADED", {})
    with caplog.at_level("WARNING"):
        assert attention.attention_kernel("auto", "cpu", "float32", 64) is None
    assert "this CPU lacks avx2, fma or f16c, which every native kernel build needs" in caplog.text
    with pytest.raises(ValueError, match="attention 'native': this CPU lacks avx2"):
        attention.attention_kernel("native", "cpu", "float32", 64)


def test_kernels_built_against_another_torch_are_refused_in_one_line(monkeypatch):
    """An ABI mismatch would crash the process (or worse, compute garbage): the loader compares the
    torch the kernels were compiled against with the one running, and says what to install."""
    import json

    manifest = json.loads((kernels.LIBRARY / "manifest.json").read_text())
    monkeypatch.setattr(kernels, "_LOADED", {})
    monkeypatch.setattr(kernels, "torch_build", lambda: {"torch": "2.99.0", "cxx11_abi": True})
    with pytest.raises(kernels.KernelRefused) as refused:
        kernels.attention()
    message = str(refused.value)
    assert "\n" not in message
    assert message.endswith(f"compiled against torch {manifest['build']['torch']}, this environment has torch "
                            f"2.99.0: install torch=={manifest['build']['torch']} (the version reward-server pins)")


def test_a_checkout_with_edited_sources_compiles_a_development_build(monkeypatch, tmp_path):
    """lib/ built from other sources is not used; the chosen variant is compiled just in time (here
    the compiler fails, and the reason is the compiler's own error line, not ninja's "build stopped")."""
    from torch.utils import cpp_extension

    calls = []

    def failing(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'x': [1/2] c++ ...\n"
                           "attention.cpp:12:3: error: 'vf' was not declared in this scope\n"
                           "ninja: build stopped: subcommand failed.")

    monkeypatch.setattr(kernels, "CACHE", tmp_path)
    monkeypatch.setattr(kernels, "_LOADED", {})
    monkeypatch.setattr(kernels, "digest", lambda: "edited")
    monkeypatch.setattr(cpp_extension, "load", failing)
    monkeypatch.setenv(kernels.ENV, "avx2")
    with pytest.raises(kernels.KernelUnavailable, match="attention.cpp:12:3: error: 'vf' was not declared"):
        kernels.attention()
    assert "-mavx2" in calls[0]["extra_cflags"] and "reward_kernels_avx2_edited" in calls[0]["name"]
    with pytest.raises(kernels.KernelUnavailable, match="not built"):
        kernels.attention(build=False)


def test_kernels_run_without_the_gil(kernel):
    """The engine's worker computes while the Python backend's main thread takes requests: a kernel
    call must let other Python threads run (one that held the GIL stalled the stub, and Triton's
    queue grew behind it)."""
    import threading
    import time

    q, k, v = _row([8192], 8, 8, 64, dtype=torch.bfloat16)
    stamps, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        start = time.perf_counter()
        _call(kernel, q, k, v, [[0, 8192, 0, -1]])
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    assert end - start > 0.05  # long enough for the check to mean something
    assert any(start + 0.01 < t < end - 0.01 for t in stamps), "no other thread ran during the call"
