"""Attention over a packed row: causal within each sequence, a shared prefix's keys read in place.

Registered with transformers as an attention implementation ("reward_packed"), so every decoder
layer of any supported family calls `packed_attention` with its own query, key and value. On CPU
the native kernel (kernels/attention.cpp) computes the whole row in one call; elsewhere torch's
SDPA runs per sequence. Attention keywords the engine does not compute make it refuse the model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

_LOGGER = logging.getLogger(__name__)
ATTENTION = "reward_packed"
ATTENTIONS = ("auto", "native", "sdpa")
# Queries per attention call of a suffix continuing a shared prefix: bounds its explicit mask
# (queries x keys booleans) for long conversations; shorter suffixes take one call, as before.
QUERY_CHUNK = 1024


def attention_kernel(choice: str, device_type: str, dtype: str, head_dim: int) -> Any:
    """The native attention module for `choice` ("auto", "native" or "sdpa"), or None for torch's SDPA.

    "auto" takes the native kernel wherever it runs (CPU, fp32 or bf16, even head size) and falls
    back to SDPA with a warning when it cannot be built; "native" refuses to fall back.

    Raises:
        ValueError: an unknown choice, or "native" where the kernel cannot run (the reason says why).
    """
    if choice not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {choice!r}")
    if choice == "sdpa":
        return None
    from reward_server.pipeline.torch_engine import kernels

    if device_type != "cpu":
        reason = f"the native attention kernel runs on CPU only, not {device_type}"
    elif dtype not in ("float32", "bfloat16"):
        reason = f"the native attention kernel computes float32 or bfloat16, not {dtype}"
    elif head_dim % 2:
        reason = f"the native attention kernel needs an even head size, not {head_dim}"
    else:
        try:
            return kernels.attention()
        except kernels.KernelUnavailable as exc:
            reason = str(exc)
    if choice == "native":
        raise ValueError(f"attention 'native': {reason}")
    if device_type == "cpu":  # on CUDA SDPA is the expected path, not a degraded one
        _LOGGER.warning("attention: torch SDPA (%s); a conversation continuing a shared prompt may then differ "
                        "in the last bits from the same conversation scored alone", reason)
    return None


@dataclass
class Segment:
    """One sequence inside a packed row: its ids and, if any, the shared prefix it continues."""

    ids: list[int]
    prefix: int | None = None   # key of a recorded prefix this segment attends to first
    offset: int = 0             # its first position (the prefix length)
    record: int | None = None   # key under which to record this segment's keys and values
    reads: list[int] | None = None  # its tokens whose hidden states are wanted (None: the last)


@dataclass
class _Pack:
    """What `packed_attention` needs to know about the row being computed."""

    segments: list[Segment]
    bounds: list[tuple[int, int]]
    store: dict[int, dict[int, tuple[Any, Any]]]  # prefix key -> layer -> (keys, values) [length, heads, dim]
    kernel: Any = None  # the native attention module (reward_server.pipeline.torch_engine.kernels), or None: torch's SDPA
    masks: dict[tuple[int, int], Any] = field(default_factory=dict)  # (segment, first query) -> mask
    table: Any = None  # the native kernel's segment table, made at the first layer
    window: int | None = None  # the sliding window the engine's length guard enforces (RewardEngine.window)


_ACTIVE = threading.local()


@contextlib.contextmanager
def packed_row(segments: list[Segment], bounds: list[tuple[int, int]], store: dict, kernel: Any,
               window: int | None = None):
    """While a forward pass over one packed row runs: what `packed_attention` needs to know about
    it (the segments and where they lie, the prefix store, the kernel, the enforced window)."""
    _ACTIVE.pack = _Pack(segments, bounds, store, kernel, window=window)
    try:
        yield
    finally:
        _ACTIVE.pack = None
# Attention features a transformers module may ask for that the packed attention does not compute:
# a model asking for one is refused (at load, `RewardEngine` runs a token through it), never
# scored as if it had not asked.
UNSUPPORTED_ATTENTION = {"softcap": "attention logit softcapping", "s_aux": "attention sinks",
                         "sinks": "attention sinks"}


def _check_features(module, pack: _Pack, kwargs: dict) -> None:
    """Raise ValueError, naming it, for an attention feature the engine would silently skip."""
    for name, what in UNSUPPORTED_ATTENTION.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{type(module).__name__} asks for {what} ({name}={kwargs[name]}), which the packed "
                             "engine does not compute")
    window = kwargs.get("sliding_window")
    if window is not None and window != pack.window:
        raise ValueError(f"{type(module).__name__} layer {module.layer_idx} has a sliding window of {window} tokens "
                         "that the config does not declare for every layer; the packed engine does not apply it")


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over a packed row [1, heads, T, dim]: causal within each segment only.

    Registered with transformers as the "reward_packed" attention implementation. A segment
    continuing a shared prefix attends to all of the prefix's recorded keys and values first.
    Returns [1, T, heads, dim].
    """
    pack: _Pack = _ACTIVE.pack
    layer = module.layer_idx
    if kwargs:
        _check_features(module, pack, kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    # [T, heads, dim] views: the layout the native kernel reads and the prefix store keeps
    query, key, value = (t[0].transpose(0, 1) for t in (query, key, value))
    for (start, end), segment in zip(pack.bounds, pack.segments):
        if segment.record is not None:
            pack.store.setdefault(segment.record, {})[layer] = (key[start:end], value[start:end])
    if pack.kernel is not None:
        return _native_attention(pack, layer, query, key, value, scaling), None
    return _sdpa_attention(pack, layer, query, key, value, scaling), None


def _native_attention(pack: _Pack, layer: int, query, key, value, scaling):
    """The row in one call of the native kernel (reward_server/pipeline/torch_engine/kernels/attention.cpp)."""
    import torch

    if pack.table is None:
        rows, prefixes = [], []  # prefixes: store keys, in the order of the kernel's prefix lists
        for (start, end), segment in zip(pack.bounds, pack.segments):
            index = -1
            if segment.prefix is not None:
                if segment.prefix not in prefixes:
                    prefixes.append(segment.prefix)
                index = prefixes.index(segment.prefix)
            rows.append((start, end - start, segment.offset, index))
        pack.table = (torch.tensor(rows, dtype=torch.int64), prefixes)
    table, prefixes = pack.table
    out = torch.empty(1, *query.shape, dtype=query.dtype, device=query.device)
    with torch.profiler.record_function("reward_server::attention"):  # named in profiles (bench.engine_profile)
        pack.kernel.packed_attention(query, key, value, out[0], table,
                                     [pack.store[p][layer][0] for p in prefixes],
                                     [pack.store[p][layer][1] for p in prefixes], float(scaling))
    return out


def _sdpa_attention(pack: _Pack, layer: int, query, key, value, scaling):
    """Per segment with torch's scaled_dot_product_attention (CUDA, or where the kernel is absent)."""
    import torch
    import torch.nn.functional as F

    out = torch.empty(1, *query.shape, dtype=query.dtype, device=query.device)
    heads = lambda t: t.transpose(0, 1)[None]  # noqa: E731  [T, heads, dim] -> [1, heads, T, dim]
    for n, ((start, end), segment) in enumerate(zip(pack.bounds, pack.segments)):
        q, k, v = heads(query[start:end]), heads(key[start:end]), heads(value[start:end])
        if segment.prefix is None:
            out[0, start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                               enable_gqa=True)[0].transpose(0, 1)
            continue
        prefix_k, prefix_v = (heads(t) for t in pack.store[segment.prefix][layer])
        length = prefix_k.shape[2]
        # In chunks of queries, so that the mask (queries x keys) stays bounded for long suffixes;
        # each chunk sees the whole prefix and its own tokens up to its last query.
        for first in range(0, end - start, QUERY_CHUNK):
            last = min(end - start, first + QUERY_CHUNK)
            if (n, first) not in pack.masks:  # token i sees the whole prefix and its own first i + 1 tokens
                pack.masks[n, first] = (torch.arange(length + last, device=q.device)[None, :]
                                        <= torch.arange(first, last, device=q.device)[:, None] + length)
            out[0, start + first:start + last] = F.scaled_dot_product_attention(
                q[:, :, first:last], torch.cat([prefix_k, k[:, :, :last]], dim=2),
                torch.cat([prefix_v, v[:, :, :last]], dim=2), attn_mask=pack.masks[n, first], scale=scaling,
                enable_gqa=True)[0].transpose(0, 1)
    return out


def register_attention():
    """Register `packed_attention` with transformers; returns the registered (uncompiled) function."""
    import torch
    from transformers import AttentionInterface

    # Kept out of compiled graphs: its per-segment loop is data-dependent Python, and a
    # variable-length attention kernel for the whole row measured no faster on CPU (docs/tuning.md).
    attention = torch.compiler.disable(packed_attention)
    AttentionInterface.register(ATTENTION, attention)
    return attention
