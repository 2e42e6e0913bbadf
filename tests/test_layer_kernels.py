"""The native element-wise kernels of a decoder layer (reward_server/pipeline/torch_engine/kernels/layers.cpp),
called directly: RMSNorm (with the residual addition before it), q/k norms and rotary embedding in place,
SiLU x up.

They replace torch's operations in `fused.FusedDecoderLayer._forward_native`, so they must keep
transformers' arithmetic (`fused.rms_norm` and `FusedDecoderLayer.forward`'s torch path: every product
and sum rounded to the dtype as torch rounds it; only the norm's order of summing squares and SiLU's exp
may differ, by an ulp on a few elements), and the engine's batch invariance: a row's bits must not
depend on the rows computed with it, nor on where it sits in memory.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reward_server.pipeline.torch_engine import fused, kernels

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


@pytest.fixture(scope="module")
def kernel():
    return kernels.attention()  # built by `make setup`; a failure to build fails here, loudly


def _randn(*shape, dtype, seed=0):
    """Normal values, each row scaled by its own factor (1e-2 to 1e2): the norm's statistics vary."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * torch.logspace(-2, 2, shape[0])[:, None]).to(dtype)


def _weight(n, dtype, seed):
    return (1 + torch.randn(n, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _ulps(a, b):
    """Element-wise distance of two bf16 tensors in bf16 values (finite values; -0 and 0 the same)."""
    ordered = [torch.where(i < 0, -(i & 0x7FFF), i) for i in (a.view(torch.int16).long(), b.view(torch.int16).long())]
    return (ordered[0] - ordered[1]).abs()


def _assert_near(got, expected, rtol32, ulps=1, fraction=0.01):
    """fp32: within rtol32; bf16: equal but for at most `ulps` ulp on at most `fraction` of the elements."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=rtol32, atol=1e-30)
    else:
        distance = _ulps(got, expected)
        assert distance.max() <= ulps and (distance > 0).double().mean() <= fraction, (distance.max(), distance.sum())


def _rms_norm(kernel, x, weight, delta=None):
    out = torch.empty_like(x)
    kernel.rms_norm(x, delta, weight, EPS, out)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [1024, 1000, 37, 5])
def test_rms_norm_is_transformers_arithmetic(kernel, dtype, features):
    x, weight = _randn(64, features, dtype=dtype), _weight(features, dtype, seed=1)
    out = _rms_norm(kernel, x.clone(), weight)
    _assert_near(out, fused.rms_norm(x, weight, EPS), rtol32=1e-6)
    x64 = x.double()  # the same formula in float64, the normalised value rounded to the dtype before the weight
    exact = weight.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype).double()
    _assert_near(out, exact.to(dtype), rtol32=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_adds_the_residual_in_place_first(kernel, dtype):
    x, delta = _randn(40, 1000, dtype=dtype), _randn(40, 1000, dtype=dtype, seed=2).flip(0)  # big + small
    weight = _weight(1000, dtype, 3)
    x[0, :3], delta[0, :3] = torch.tensor([1e-39, -3e-40, 1.0]), torch.tensor([2e-39, 1e-40, -1.0])  # subnormals, 0
    summed, residual = x + delta, x.clone()
    out = _rms_norm(kernel, residual, weight, delta)
    assert torch.equal(residual, summed)  # torch's rounding of the sum, bit for bit
    assert not torch.equal(summed, x)
    assert torch.equal(out, _rms_norm(kernel, summed.clone(), weight))
    _assert_near(out, fused.rms_norm(summed, weight, EPS), rtol32=1e-6)


def test_a_nan_in_the_residual_stays_nan_and_stays_in_its_row(kernel):
    """bf16 NaNs are rounded as NaNs (not to infinity or zero), an overflow to infinity; the norm spreads a NaN
    or an infinity over its row only, as torch does."""
    x, delta = _randn(4, 300, dtype=torch.bfloat16), _randn(4, 300, dtype=torch.bfloat16, seed=1)
    big = torch.finfo(torch.bfloat16).max
    x[1, 7], x[2, 299], delta[2, 299], x[3, 0], delta[3, 0] = float("nan"), float("inf"), float("-inf"), big, big / 128
    weight, residual = _weight(300, torch.bfloat16, 4), x.clone()
    out = _rms_norm(kernel, residual, weight, delta)
    assert residual[1, 7].isnan() and residual[2, 299].isnan() and residual[3, 0] == float("inf")
    torch.testing.assert_close(residual, x + delta, rtol=0, atol=0, equal_nan=True)  # NaN payloads may differ
    assert out[1:3].isnan().all() and out[3, 0].isnan() and (out[3, 1:] == 0).all() and out[0].isfinite().all()
    torch.testing.assert_close(out, fused.rms_norm(x + delta, weight, EPS), rtol=0, atol=0, equal_nan=True)


def _cos_sin(positions, dim, dtype, base=1e6):
    """transformers' rotary table: fp32 angles, cos and sin cast to the dtype."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotary_torch(qkv, cos, sin, heads, kv_heads, dim, q_weight=None, k_weight=None):
    """`FusedDecoderLayer.forward`'s torch path on q and k of qkv [T, (heads + 2 kv_heads) dim]: their
    rotation, and the magnitude of its two terms (|x cos| + |rotate_half(x) sin|)."""
    qk = qkv[:, :(heads + kv_heads) * dim].view(len(qkv), heads + kv_heads, dim)
    if q_weight is not None:
        qk = torch.cat([fused.rms_norm(qk[:, :heads], q_weight, EPS), fused.rms_norm(qk[:, heads:], k_weight, EPS)], 1)
    half, cos, sin = dim // 2, cos[:, None], sin[:, None]
    rotated = torch.mul(qk, cos) + torch.cat([-qk[..., half:], qk[..., :half]], -1) * sin
    terms = qk.double().abs() * cos.double().abs() + qk.double().abs().roll(half, -1) * sin.double().abs()
    return rotated.view(len(qkv), -1), terms.view(len(qkv), -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [16, 64, 128, 10])
@pytest.mark.parametrize("norms", [False, True])
def test_rotary_is_transformers_arithmetic(kernel, dtype, dim, norms):
    heads, kv_heads, length = 4, 2, 50
    qkv = _randn(length, (heads + 2 * kv_heads) * dim, dtype=dtype)
    cos, sin = _cos_sin(torch.arange(length) * 97, dim, dtype)
    weights = [_weight(dim, dtype, seed) for seed in (4, 5)] if norms else [None, None]
    got = qkv.clone()
    kernel.rotary(got, cos, sin, heads, kv_heads, dim, *weights, EPS)
    qk, (expected, terms) = (heads + kv_heads) * dim, _rotary_torch(qkv, cos, sin, heads, kv_heads, dim, *weights)
    assert torch.equal(got[:, qk:], qkv[:, qk:])  # the values untouched
    assert not torch.equal(got[:, :qk], qkv[:, :qk])
    if not norms:
        assert torch.equal(got[:, :qk], expected)
    else:  # the head norm's squares summed in another order: an ulp off now and then, which a difference of
        # two products can make many ulp of a small result; bounded by the terms' magnitude instead
        error = (got[:, :qk].double() - expected.double()).abs()
        assert (error <= terms * (2 ** -7 if dtype == torch.bfloat16 else 1e-6)).all(), (error / terms).max()
        if dtype == torch.bfloat16:  # (in fp32 a head's inverse norm an ulp off moves all of its values)
            assert (error > 0).double().mean() <= 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [1024, 1000, 37, 5])
def test_silu_mul_is_torchs(kernel, dtype, intermediate):
    gate_up = _randn(30, 2 * intermediate, dtype=dtype) / 8  # gates within +-60; the next test: beyond
    out = torch.empty(30, intermediate, dtype=dtype)
    kernel.silu_mul(gate_up, out)
    _assert_near(out, F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:], rtol32=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_of_a_very_negative_gate_is_torchs(kernel, dtype):
    """exp(-x) overflows to inf past ln(FLT_MAX) as torch's does: SiLU is -0 there, tiny just before."""
    gate = torch.tensor([-88.5, -89.0, -100.0, -1e4, -1e30, -3e38, 100.0]).to(dtype)
    out = torch.empty(1, len(gate), dtype=dtype)
    kernel.silu_mul(torch.cat([gate, torch.ones_like(gate)])[None], out)
    expected = F.silu(gate)
    if dtype == torch.float32:  # -3.2e-37 at -88.5: a few ulp of exp's polynomial there
        torch.testing.assert_close(out[0, :1], expected[:1], rtol=1e-5, atol=0)
    assert torch.equal(out[0, 1:], expected[1:])


def _run(kernel, op, x):
    """`op` on the rows of x, a view of [inputs side by side]; its outputs (a copy)."""
    if op == "rms_norm":  # x = [residual | delta], 1000 features
        out = _rms_norm(kernel, x[:, :1000], _weight(1000, x.dtype, 7), x[:, 1000:])
        return torch.cat([x[:, :1000], out], 1)
    if op == "rotary":  # x = [qkv | cos | sin]: heads 4, kv_heads 2, dim 64, Qwen3's norms
        weights = [_weight(64, x.dtype, seed) for seed in (8, 9)]
        kernel.rotary(x[:, :512], x[:, 512:576], x[:, 576:], 4, 2, 64, *weights, EPS)
        return x[:, :512].clone()
    out = torch.empty(len(x), 1000, dtype=x.dtype)  # silu_mul: x = gate_up
    kernel.silu_mul(x, out)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,width", [("rms_norm", 2000), ("rotary", 640), ("silu_mul", 2000)])
def test_a_row_has_the_same_bits_whatever_rows_are_around_it(kernel, dtype, op, width):
    """Alone, or among 1, 7 or 333 others (split across threads), first, last or between; in a buffer
    whose rows are wider and start unaligned (NaN padding around them: read only if a kernel overreads)."""
    row, others = _randn(1, width, dtype=dtype, seed=10), _randn(333, width, dtype=dtype, seed=11)
    alone = _run(kernel, op, row.clone())
    for count, at, pad in [(1, 1, 0), (7, 3, 1), (333, 0, 5), (333, 333, 0), (333, 170, 3)]:
        batch = torch.cat([others[:at], row, others[at:count]])
        buffer = torch.full((len(batch), width + 2 * pad), float("nan"), dtype=dtype)
        buffer[:, pad:pad + width] = batch
        assert torch.equal(_run(kernel, op, buffer[:, pad:pad + width])[at], alone[0]), (count, at, pad)


def test_bad_arguments_are_refused_with_the_reason(kernel):
    x, w, h = torch.randn(4, 64), torch.ones(64), torch.float16

    def norm(x=x, delta=None, w=w, out=None):
        kernel.rms_norm(x, delta, w, EPS, torch.empty_like(x) if out is None else out)

    def rotary(qkv=x, cos=x[:, :16], sin=x[:, :16], heads=2, qw=None, kw=None):
        kernel.rotary(qkv, cos, sin, heads, 1, 16, qw, kw, EPS)

    cases = {
        "one dtype for x, weight and out": lambda: norm(w=w.bfloat16()),
        "out must match x": lambda: norm(out=torch.empty(4, 32)),
        "delta must match x": lambda: norm(delta=x[:2]),
        "x: expected .* contiguous features": lambda: norm(x=x.t(), w=w[:4]),
        "rms_norm: float32 or bfloat16 only": lambda: norm(x=x.to(h), w=w.to(h)),
        "gate_up must be .T, 2I. and out .T, I., one dtype": lambda: kernel.silu_mul(x, torch.empty(4, 64)),
        "out: expected .* contiguous features": lambda: kernel.silu_mul(x, torch.empty(32, 4).t()),
        "silu_mul: float32 or bfloat16 only": lambda: kernel.silu_mul(x.to(h), torch.empty(4, 32, dtype=h)),
        "rotary: qkv must be .T, features.": lambda: rotary(qkv=x.t()),
        "cos and sin must be .T, dim.": lambda: rotary(cos=x[:, :8]),
        "sin must be .T, dim.": lambda: rotary(sin=x[:3, :16]),
        "rotary: one dtype": lambda: rotary(cos=x[:, :16].bfloat16()),
        "bad head count or size": lambda: rotary(heads=4),
        "q and k norm weights together": lambda: rotary(qw=w[:16]),
        "norm weights must be .dim., same dtype": lambda: rotary(qw=w[:8], kw=w[:16]),
        "rotary: float32 or bfloat16 only": lambda: rotary(x.to(h), x[:, :16].to(h), x[:, :16].to(h)),
    }
    for message, call in cases.items():
        with pytest.raises(RuntimeError, match=message):
            call()
    with pytest.raises(RuntimeError, match="one dtype"):  # the shapes right, out's dtype not
        kernel.silu_mul(x, torch.empty(4, 32, dtype=torch.bfloat16))
