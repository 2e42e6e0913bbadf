"""Reference points for the benchmark: the naive reward server and the machine's matmul peak.

The naive baseline is how simple reward servers score: Hugging Face
`AutoModelForSequenceClassification`, fixed batches of 16 conversations in arrival order,
right-padded with the tokenizer's `pad_token_id` plus an attention mask, the full model
forward (the library pools the head at the last non-pad token). Nothing is sorted, shared or
trimmed, so it pays for every padded position and every repeated prompt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bench import metrics

_LOGGER = logging.getLogger(__name__)

NAIVE_BATCH_SIZE = 16


@dataclass
class NaiveRun:
    """One pass of the naive baseline over a workload.

    Attributes:
        scores: float32 [N, K] head outputs in input order.
        seconds: wall time of the pass (excluding model load and warm-up).
        latencies: seconds per batch, in order.
        padding_ratio: padded / computed token positions.
    """

    scores: np.ndarray
    seconds: float
    latencies: list[float]
    padding_ratio: float


class NaiveBaseline:
    """Transformers sequence-classification forward in fixed, padded, arrival-order batches."""

    def __init__(self, checkpoint: str | Path, threads: int = 2, batch_size: int = NAIVE_BATCH_SIZE,
                 dtype: str = "float32"):
        """Load the checkpoint on CPU in `dtype` (fp32 by default).

        Args:
            checkpoint: Hugging Face directory with a `*ForSequenceClassification` model.
            threads: torch intra-op threads.
            batch_size: conversations per forward pass.
            dtype: "float32" or "bfloat16".

        Raises:
            ValueError: when the tokenizer has no pad token (the baseline must pad with it).
        """
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self._torch = torch
        self.batch_size = batch_size
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{checkpoint}: tokenizer has no pad token; the naive baseline pads with it")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(checkpoint), dtype=getattr(torch, dtype)).eval()
        # Pooling looks for the last token != config.pad_token_id; it must be the id we pad with.
        if self.model.config.pad_token_id != self.pad_token_id:
            _LOGGER.warning("config.pad_token_id %s != tokenizer pad %s: scores would read padding",
                            self.model.config.pad_token_id, self.pad_token_id)

    def _forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        torch = self._torch
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.float().numpy()

    def warm_up(self, sequences: Sequence[Sequence[int]]) -> None:
        """Run one small batch so that lazy initialisation stays out of the timings."""
        self._forward([list(s)[:64] for s in sequences[:2]])

    def run(self, sequences: Sequence[Sequence[int]]) -> NaiveRun:
        """Score every sequence in fixed batches in arrival order and time it."""
        lengths = [len(s) for s in sequences]
        batches = metrics.padded_batches(lengths, self.batch_size)
        outputs, latencies = [], []
        start = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            outputs.append(self._forward([sequences[i] for i in batch]))
            latencies.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - start
        return NaiveRun(scores=np.concatenate(outputs).astype(np.float32), seconds=seconds,
                        latencies=latencies, padding_ratio=metrics.padding_ratio(lengths, batches))


def matmul_peak(size: int = 2048, repeats: int = 9, threads: int = 2, dtype: str = "float32") -> dict:
    """The machine's matrix-product rate in `dtype`: the fastest of the kernels torch offers here.

    `torch.mm` (MKL's sgemm for fp32) takes a slow path on some CPUs, so a peak measured with it
    alone understates the hardware; oneDNN with a prepacked weight (what the engine's fused layers
    and inductor's freezing use) is measured too, where torch has it.

    Args:
        size: matrix side (the FLOP count per product is 2 * size**3).
        repeats: timed products after one warm-up; the median is reported.
        threads: torch intra-op threads.
        dtype: "float32" or "bfloat16".

    Returns:
        {"gflops": the best kernel's median GFLOP/s, "kernel": its name, "kernels": {name: median},
        "samples_gflops": the best kernel's samples, "size", "threads", "dtype"}.
    """
    import torch

    from reward_server.pipeline.torch_engine.fused import PackedLinear, PlainLinear, prepack_available

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(getattr(torch, dtype))
    b = torch.randn(size, size, generator=generator).to(getattr(torch, dtype))
    kernels = {"torch.mm": lambda: torch.mm(a, b), "F.linear": lambda linear=PlainLinear(b): linear(a)}
    if prepack_available(torch.device("cpu"), a.dtype):
        kernels["oneDNN prepacked"] = lambda linear=PackedLinear(b, rows_hint=size): linear(a)
    measured = {}
    for name, product in kernels.items():
        product()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            product()
            samples.append(2.0 * size ** 3 / (time.perf_counter() - t0) / 1e9)
        measured[name] = samples
    best = max(measured, key=lambda name: metrics.median(measured[name]))
    result = {"gflops": metrics.median(measured[best]), "kernel": best, "samples_gflops": measured[best],
              "kernels": {name: metrics.median(samples) for name, samples in measured.items()},
              "size": size, "threads": threads, "dtype": dtype}
    _LOGGER.info("%s matmul %d^3 on %d threads: %.1f GFLOP/s (%s; %s)", dtype, size, threads, result["gflops"], best,
                 ", ".join(f"{k} {v:.0f}" for k, v in result["kernels"].items()))
    return result
