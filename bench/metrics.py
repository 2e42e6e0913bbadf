"""Benchmark arithmetic: token counts, padding, percentiles, rates and ratios.

Pure functions on plain numbers so that the unit tests can check them without a model.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from reward_server.pipeline.batching import common_prefix

_LOGGER = logging.getLogger(__name__)


def unique_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """Number of distinct (prefix, token) positions: the node count of a prefix trie.

    This is the work an ideal shared-prefix engine must do: a prefix shared by several
    sequences counts once. Computed by sorting the sequences and subtracting the longest
    common prefix of each neighbour pair, which equals the trie's node count.
    """
    ordered = sorted(tuple(s) for s in sequences)
    total = sum(len(s) for s in ordered)
    for previous, current in zip(ordered, ordered[1:]):
        total -= common_prefix(previous, current)
    return total


def padded_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split indices 0..N-1 into consecutive batches of `batch_size` (arrival order)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [list(range(start, min(start + batch_size, len(lengths))))
            for start in range(0, len(lengths), batch_size)]


def padding_ratio(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> float:
    """Fraction of computed token positions that are padding.

    Each batch is padded to its longest member, so it computes `len(batch) * max_length`
    positions of which `sum(lengths)` are real.

    Args:
        lengths: token count of each sequence.
        batches: index lists, one per padded batch.

    Returns:
        padding / computed positions, in [0, 1); 0.0 for no batches.
    """
    computed = real = 0
    for batch in batches:
        batch_lengths = [lengths[i] for i in batch]
        if not batch_lengths:
            continue
        computed += len(batch_lengths) * max(batch_lengths)
        real += sum(batch_lengths)
    return 0.0 if computed == 0 else (computed - real) / computed


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=float), q))


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values (NaNs inside `values` are ignored)."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    array = array[~np.isnan(array)]
    return math.nan if array.size == 0 else float(np.median(array))


def ratio(value: float, reference: float) -> float:
    """value / reference, NaN when either is missing or the reference is not positive."""
    if value is None or reference is None or not reference > 0 or math.isnan(value):
        return math.nan
    return value / reference


def flop_rate(params: int, tokens: int, seconds: float) -> float:
    """Forward-pass FLOP/s by the usual estimate of 2 FLOPs per parameter per token."""
    return math.nan if seconds <= 0 else 2.0 * params * tokens / seconds


def non_embedding_parameters(checkpoint: str | Path) -> int:
    """Parameters of a safetensors checkpoint outside its input embedding table.

    Reads only the safetensors headers (no torch needed). The input embedding lookup costs
    no FLOPs, so it is excluded; the reward head and everything else count.

    Raises:
        FileNotFoundError: when the directory holds no `*.safetensors` file.
    """
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {checkpoint}")
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        for name, info in header.items():
            if name == "__metadata__" or "embed_tokens" in name or "wte" in name:
                continue
            total += int(np.prod(info["shape"], dtype=np.int64))
    return total


@dataclass
class Measurement:
    """One benchmarked system on one workload, after taking medians over repeats.

    Attributes:
        system: e.g. "naive", "engine", "server c=4", "vllm".
        workload: "grpo" or "no-sharing".
        conversations: conversations scored per repeat.
        tokens: total tokens per repeat (shared prefixes counted in every conversation).
        unique_tokens: prefix-trie token count per repeat.
        seconds: median wall time of one pass over the workload.
        latency_p50_s / latency_p99_s: medians over repeats of the per-request percentiles.
        padding_ratio: padded / computed positions, NaN when the system does not report it.
        concurrency: client concurrency for server runs, else None.
        repeats: wall times of every repeat.
        extra: anything else worth keeping (score agreement, engine stats).
    """

    system: str
    workload: str
    conversations: int
    tokens: int
    unique_tokens: int
    seconds: float
    latency_p50_s: float
    latency_p99_s: float
    padding_ratio: float = math.nan
    concurrency: int | None = None
    repeats: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def conversations_per_s(self) -> float:
        return self.conversations / self.seconds if self.seconds > 0 else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self, params: int, peak_flops: float, reference: "Measurement | None") -> dict:
        """JSON-ready record with derived rates.

        Args:
            params: non-embedding parameters of the model.
            peak_flops: measured matmul peak in FLOP/s (NaN if not measured).
            reference: the naive baseline on the same workload, for the speed-up ratio.
        """
        effective = flop_rate(params, self.unique_tokens, self.seconds)
        model_rate = flop_rate(params, self.tokens, self.seconds)
        record = asdict(self)
        record.update(
            conversations_per_s=self.conversations_per_s,
            tokens_per_s=self.tokens_per_s,
            unique_tokens_per_s=self.unique_tokens / self.seconds if self.seconds > 0 else math.nan,
            effective_gflops=effective / 1e9,
            effective_pct_of_peak=100.0 * ratio(effective, peak_flops),
            model_gflops=model_rate / 1e9,
            model_pct_of_peak=100.0 * ratio(model_rate, peak_flops),
            speedup_vs_naive=ratio(self.tokens_per_s, reference.tokens_per_s) if reference else math.nan,
        )
        return record


def summarize_repeats(system: str, workload: str, conversations: int, tokens: int,
                      unique: int, runs: Sequence[dict], **kwargs) -> Measurement:
    """Combine repeated runs into one `Measurement` by medians.

    Args:
        runs: one dict per repeat with "seconds" and "latencies" (per-request seconds), and
            optionally "padding_ratio".
        kwargs: passed to `Measurement` (concurrency, extra).
    """
    seconds = [r["seconds"] for r in runs]
    return Measurement(
        system=system, workload=workload, conversations=conversations, tokens=tokens,
        unique_tokens=unique, seconds=median(seconds),
        latency_p50_s=median([percentile(r["latencies"], 50) for r in runs]),
        latency_p99_s=median([percentile(r["latencies"], 99) for r in runs]),
        padding_ratio=median([r.get("padding_ratio", math.nan) for r in runs]),
        repeats=list(seconds), **kwargs)


def without_nan(value):
    """NaN (not valid JSON) becomes null, recursively."""
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
