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
from typing import Any, Hashable

_LOGGER = logging.getLogger(__name__)
ATTENTION = "reward_packed"
ATTENTIONS = ("auto", "native", "sdpa")
# Queries per attention call of a suffix continuing a shared prefix: bounds its explicit mask
# (queries x keys booleans) for long conversations; shorter suffixes take one call, as before.
QUERY_CHUNK = 1024


def attention_kernel(choice: str, device_type: str, dtype: str, head_dim: int) -> Any:
    """The native attention module for `choice` ("auto", "native" or "sdpa"), or None for torch's SDPA.

    "auto" takes the native kernel wherever it runs (CPU, fp32 or bf16, even head size) and falls
    back to SDPA with a warning where no build runs (see kernels.attention); "native" refuses to fall back.

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


class KVBuffer:
    """Every layer's keys and values of one sequence, in tensors with room after them: a later
    sequence continuing it from its end writes its own keys there in place, where a copy of the
    whole prefix would otherwise be made for every new turn of a conversation (multi-turn scoring
    spent 10% of its time in those copies). Positions are handed out once (`claim`), so nothing
    another record or cache entry reads is ever written over. `room`: hold GROWTH times the length
    (a sequence expected to grow), else exactly the length."""

    GROWTH = 1.5  # room for this share of the sequence again, so a conversation grows in few copies
    ALIGN = 32

    def __init__(self, length: int, room: bool = True):
        self.capacity = -(-int(length * self.GROWTH) // self.ALIGN) * self.ALIGN if room else length
        self.used = length
        self.layers: dict[int, tuple[Any, Any]] = {}  # layer -> (keys, values) [capacity, kv heads, dim]

    def claim(self, start: int, count: int) -> bool:
        """Reserve positions [start, start + count) for a sequence continuing the first `start`: only
        where nothing was handed out past `start` and there is room."""
        if start != self.used or start + count > self.capacity:
            return False
        self.used = start + count
        return True

    def write(self, layer: int, start: int, key, value, prefix: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
        """Put a segment's keys and values at `start` (after `prefix`'s, copied first when given);
        returns views of positions [0, start + its length)."""
        if layer not in self.layers:
            shape = (self.capacity, *key.shape[1:])
            self.layers[layer] = (key.new_empty(shape), value.new_empty(shape))
        keys, values = self.layers[layer]
        if prefix is not None:
            keys[:start].copy_(prefix[0])
            values[:start].copy_(prefix[1])
        end = start + key.shape[0]
        keys[start:end].copy_(key)
        values[start:end].copy_(value)
        return keys[:end], values[:end]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers.values() for t in pair)


@dataclass
class Segment:
    """One sequence inside a packed row: its ids and, if any, the shared prefix it continues."""

    ids: list[int]
    prefix: Hashable | None = None  # key of a recorded prefix this segment attends to first
    offset: int = 0                 # its first position (the prefix length)
    record: Hashable | None = None  # key under which to record its keys and values (its prefix's first)
    reads: list[int] | None = None  # its tokens whose hidden states are wanted (None: the last)
    buffer: KVBuffer | None = None  # where the record is written (None: a tensor of its own)
    copy_prefix: bool = True        # with a buffer: the prefix is copied into it first (not already there)


@dataclass
class _Pack:
    """What `packed_attention` needs to know about the row being computed."""

    segments: list[Segment]
    bounds: list[tuple[int, int]]
    store: dict[Hashable, dict[int, tuple[Any, Any]]]  # prefix key -> layer -> (keys, values) [length, heads, dim]
    kernel: Any = None  # the native attention module (torch_engine.kernels), or None: torch's SDPA
    reads: list[list[int]] | None = None  # per segment, the rows whose final hidden states are read
    masks: dict[tuple, Any] = field(default_factory=dict)  # (segment, first query, window) -> mask
    table: Any = None  # the native kernel's segment table, made at the first layer


_ACTIVE = threading.local()


@contextlib.contextmanager
def packed_row(segments: list[Segment], bounds: list[tuple[int, int]], store: dict, kernel: Any,
               reads: list[list[int]] | None = None):
    """While a forward pass over one packed row runs: what `packed_attention` needs to know about
    it (the segments and where they lie, the prefix store, the kernel, and which of each segment's
    rows are read: the last layer may compute only those, `read_rows`)."""
    _ACTIVE.pack = _Pack(segments, bounds, store, kernel, reads)
    try:
        yield
    finally:
        _ACTIVE.pack = None


# Keywords transformers' attention modules pass that the packed attention computes (`sliding_window`,
# `softcap`: per layer, as the eager attention applies them) or that carry nothing it needs (the
# packed row's positions and bounds are its own). Any other keyword with a value refuses the model
# (at load, `RewardEngine` runs a token through every layer), never scored as if it had not asked.
# A keyword set to None or False asks for nothing, except `is_causal=False` (attention both ways).
HANDLED_KEYWORDS = frozenset({"sliding_window", "softcap", "position_ids", "cache_position", "output_attentions",
                              "use_cache"})
KNOWN_UNSUPPORTED = {"s_aux": "attention sinks", "sinks": "attention sinks", "is_causal": "non-causal attention"}


def _check_keywords(module, kwargs: dict) -> None:
    """Raise ValueError, naming it, for an attention keyword the engine would silently skip."""
    for name, value in kwargs.items():
        if name in HANDLED_KEYWORDS or value is None or (value is True if name == "is_causal" else value is False):
            continue
        what = KNOWN_UNSUPPORTED.get(name, "an attention option")
        raise ValueError(f"{type(module).__name__} asks for {what} ({name}={_brief(value)}), which the packed "
                         "engine does not compute")


def _brief(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"a tensor of shape {list(shape)}" if shape is not None else repr(value)[:40]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over a packed row [1, heads, T, dim]: causal within each segment only, within the
    layer's sliding window if it has one, its scores softcapped if it asks.

    Registered with transformers as the "reward_packed" attention implementation. A segment
    continuing a shared prefix attends to the prefix's recorded keys and values first (positions
    continue from the prefix, so a window reaches into it as it would alone).
    Returns [1, T, heads, dim].
    """
    pack: _Pack = _ACTIVE.pack
    layer = module.layer_idx
    if kwargs:
        _check_keywords(module, kwargs)
    window, softcap = kwargs.get("sliding_window") or None, kwargs.get("softcap") or None
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    # [T, heads, dim] views: the layout the native kernel reads and the prefix store keeps
    query, key, value = (t[0].transpose(0, 1) for t in (query, key, value))
    _record(pack, layer, key, value)
    if pack.kernel is not None:
        return _native_attention(pack, layer, query, key, value, scaling, window, softcap), None
    return _sdpa_attention(pack, layer, query, key, value, scaling, window, softcap), None


def read_rows() -> list[list[int]] | None:
    """Per segment of the row being computed, the rows (segment-relative, ascending) whose final
    hidden states are read, where the last layer may compute only those (`attention_at_reads`: the
    native kernel); else None."""
    pack = getattr(_ACTIVE, "pack", None)
    return None if pack is None or pack.kernel is None else pack.reads


def attention_at_reads(module, query, key, value, scaling: float, window: int | None = None):
    """`packed_attention` for the read rows' queries only (`read_rows`), for the last layer: no later
    layer needs the other rows. Every row's keys and values are recorded as there. Returns the
    attention output [1, R, heads, dim] and the rows' indices in the packed row [R].

    Each query gets the bits it gets in `packed_attention`: it is computed alone in a segment of one
    query at its own position, its earlier keys read from its sequence's keys from position 0, and the
    native kernel sums a query's keys in blocks aligned to position 0 whatever their source and
    whatever the queries around it.
    """
    import torch

    pack: _Pack = _ACTIVE.pack
    layer = module.layer_idx
    query, key, value = (t[0].transpose(0, 1) for t in (query, key, value))
    _record(pack, layer, key, value)
    keys, values, table, picked = [], [], [], []
    for n, ((start, end), segment) in enumerate(zip(pack.bounds, pack.segments)):
        if segment.record is not None:
            whole = pack.store[segment.record][layer]
        elif segment.prefix is not None:
            whole = _recorded(pack, segment, layer, key[start:end], value[start:end])
        else:
            whole = key[start:end], value[start:end]
        keys.append(whole[0])
        values.append(whole[1])
        for r in pack.reads[n]:  # one query at its position: keys before it from `whole`, its own from the row
            table.append((len(picked), 1, segment.offset + r, n))
            picked.append(start + r)
    index = torch.tensor(picked, dtype=torch.int64, device=query.device)
    out = torch.empty(1, len(picked), *query.shape[1:], dtype=query.dtype, device=query.device)
    with torch.profiler.record_function("reward_server::attention"):
        pack.kernel.packed_attention(query[index], key[index], value[index], out[0],
                                     torch.tensor(table, dtype=torch.int64), keys, values, float(scaling),
                                     int(window or 0), 0.0)
    return out, index


def _record(pack: _Pack, layer: int, key, value) -> None:
    """Put each recording segment's keys and values of this layer ([T, heads, dim] views of the row) in
    the prefix store, under its record key."""
    for (start, end), segment in zip(pack.bounds, pack.segments):
        if segment.record is not None:
            pack.store.setdefault(segment.record, {})[layer] = _recorded(pack, segment, layer, key[start:end],
                                                                         value[start:end])


def _recorded(pack: _Pack, segment: Segment, layer: int, key, value) -> tuple[Any, Any]:
    """What a segment records: its keys and values, after its prefix's when it continues one (so a
    record always starts at position 0). Copies: a view would keep the whole row's projections alive."""
    if segment.buffer is not None:
        copy = segment.prefix is not None and segment.copy_prefix
        return segment.buffer.write(layer, segment.offset, key, value, pack.store[segment.prefix][layer] if copy else None)
    if segment.prefix is None:
        return key.contiguous(), value.contiguous()
    import torch

    prefix_key, prefix_value = pack.store[segment.prefix][layer]
    return torch.cat([prefix_key, key]), torch.cat([prefix_value, value])


def _native_attention(pack: _Pack, layer: int, query, key, value, scaling, window, softcap):
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
                                     [pack.store[p][layer][1] for p in prefixes], float(scaling),
                                     int(window or 0), float(softcap or 0.0))
    return out


def _sdpa_attention(pack: _Pack, layer: int, query, key, value, scaling, window, softcap):
    """Per segment with torch's scaled_dot_product_attention (CUDA, or where the kernel is absent);
    with softcapping, which SDPA cannot apply, the eager product-softmax-product of transformers."""
    import torch
    import torch.nn.functional as F

    out = torch.empty(1, *query.shape, dtype=query.dtype, device=query.device)
    heads = lambda t: t.transpose(0, 1)[None]  # noqa: E731  [T, heads, dim] -> [1, heads, T, dim]
    for n, ((start, end), segment) in enumerate(zip(pack.bounds, pack.segments)):
        q, k, v = heads(query[start:end]), heads(key[start:end]), heads(value[start:end])
        if segment.prefix is None and window is None and softcap is None:
            out[0, start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                               enable_gqa=True)[0].transpose(0, 1)
            continue
        if segment.prefix is None:
            prefix_k = prefix_v = k[:, :, :0]
        else:
            prefix_k, prefix_v = (heads(t) for t in pack.store[segment.prefix][layer])
        length = prefix_k.shape[2]
        # In chunks of queries, so that the mask (queries x keys) stays bounded for long suffixes;
        # each chunk sees the whole prefix and its own tokens up to its last query.
        for first in range(0, end - start, QUERY_CHUNK):
            last = min(end - start, first + QUERY_CHUNK)
            if (n, first, window) not in pack.masks:  # query i (at length + i) sees keys j <= length + i ...
                keys = torch.arange(length + last, device=q.device)[None, :]
                queries = torch.arange(first, last, device=q.device)[:, None] + length
                mask = keys <= queries
                if window is not None:  # ... and j > length + i - window
                    mask &= keys > queries - window
                pack.masks[n, first, window] = mask
            mask = pack.masks[n, first, window]
            keys, values = torch.cat([prefix_k, k[:, :, :last]], dim=2), torch.cat([prefix_v, v[:, :, :last]], dim=2)
            if softcap is None:
                chunk = F.scaled_dot_product_attention(q[:, :, first:last], keys, values, attn_mask=mask,
                                                       scale=scaling, enable_gqa=True)
            else:
                chunk = _softcapped(q[:, :, first:last], keys, values, mask, scaling, softcap)
            out[0, start + first:start + last] = chunk[0].transpose(0, 1)
    return out


def _softcapped(query, key, value, mask, scaling, softcap):
    """Eager attention with softcapped scores ([1, heads, Q, dim] queries; keys and values may have
    fewer heads): softmax(C * tanh(q k^T * scaling / C), masked) v, the softmax in float32."""
    import torch

    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.tanh(torch.matmul(query, key.transpose(2, 3)) * scaling / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), value)


def register_attention():
    """Register `packed_attention` with transformers; returns the registered (uncompiled) function."""
    import torch
    from transformers import AttentionInterface

    # Kept out of compiled graphs: its per-segment loop is data-dependent Python, and a
    # variable-length attention kernel for the whole row measured no faster on CPU (docs/tuning.md).
    attention = torch.compiler.disable(packed_attention)
    AttentionInterface.register(ATTENTION, attention)
    return attention
