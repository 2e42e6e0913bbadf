"""FLOP, memory and throughput arithmetic for Llama-shaped reward models.

Pure functions on plain numbers: the GPU check uses them to turn a measured time into model
TFLOP/s and a share of the measured matmul rate, and docs/gpu.md's sizing tables come from the
same formulas (the unit tests pin them to known model sizes).

Conventions:
- A forward pass costs 2 FLOPs per weight of every matrix a token goes through (the decoder
  layers' projections). The input embedding is a lookup (no FLOPs); the reward head runs at one
  pooled token per sequence, so it is left out of the per-token cost.
- Causal attention over a sequence of L tokens: position i attends to i + 1 keys, so per layer
  the score product Q K^T and the weighted sum A V each cost 2 * d_attn FLOPs per (query, key)
  pair, with d_attn = heads * head_dim and L (L + 1) / 2 pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class LlamaShape:
    """Dimensions of a Llama-architecture decoder.

    Attributes:
        hidden: model width.
        layers: decoder layers.
        heads: attention (query) heads.
        kv_heads: key/value heads (grouped-query attention).
        intermediate: MLP width (gate, up and down projections).
        vocab: vocabulary size (embedding rows; LM-head rows of a causal LM).
        max_positions: max_position_embeddings.
        rope_theta: rotary base.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 8192
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def with_layers(self, layers: int) -> "LlamaShape":
        """The same shape with another number of decoder layers."""
        return LlamaShape(self.hidden, layers, self.heads, self.kv_heads, self.intermediate, self.vocab,
                          self.max_positions, self.rope_theta)


# Published dimensions of Meta's Llama-3.1 models (config.json of the HF releases).
LLAMA31_8B = LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
LLAMA31_70B = LlamaShape(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256)
# The CPU smoke run's shape: the `tiny` demo checkpoint's dimensions.
SMOKE = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048, max_positions=4096)


def layer_matmul_params(shape: LlamaShape) -> int:
    """Weights of one decoder layer's matrices: q, k, v, o and the three MLP projections."""
    d = shape.head_dim
    attention = shape.hidden * shape.heads * d * 2 + shape.hidden * shape.kv_heads * d * 2
    mlp = 3 * shape.hidden * shape.intermediate
    return attention + mlp


def parameters(shape: LlamaShape, head_rows: int | None = None) -> int:
    """All parameters of the model (norms included, no biases).

    Args:
        shape: the decoder.
        head_rows: rows of the output head: the vocabulary for a causal LM (default), K for a
            sequence-classification `score` head.
    """
    head = shape.vocab if head_rows is None else head_rows
    norms = shape.layers * 2 * shape.hidden + shape.hidden
    return shape.vocab * shape.hidden + shape.layers * layer_matmul_params(shape) + norms + head * shape.hidden


def flops_per_token(shape: LlamaShape) -> float:
    """Linear-layer FLOPs of one token through every decoder layer (2 per weight)."""
    return 2.0 * shape.layers * layer_matmul_params(shape)


def attention_flops(shape: LlamaShape, length: int) -> float:
    """Causal attention FLOPs (QK^T and AV, all layers) of one sequence of `length` tokens."""
    pairs = length * (length + 1) / 2
    return shape.layers * 2 * 2.0 * shape.heads * shape.head_dim * pairs


def sequence_flops(shape: LlamaShape, length: int) -> float:
    """Forward FLOPs of one sequence scored alone: linear layers plus causal attention."""
    return length * flops_per_token(shape) + attention_flops(shape, length)


def workload_flops(shape: LlamaShape, lengths: Iterable[int]) -> float:
    """FLOPs of scoring every sequence alone, without credit for shared prompts."""
    return sum(sequence_flops(shape, n) for n in lengths)


def matmul_flops(n: int) -> float:
    """FLOPs of one n x n by n x n matrix product."""
    return 2.0 * n ** 3


@dataclass(frozen=True)
class Throughput:
    """A timed pass over a workload, in the units the GPU check reports."""

    conversations: int
    tokens: int
    seconds: float
    model_flops: float
    matmul_flops_per_s: float

    @property
    def tokens_per_s(self) -> float:
        """Prefill tokens per second (every conversation's tokens, shared prompts included)."""
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    @property
    def model_tflops_per_s(self) -> float:
        """Model FLOPs (each sequence scored alone) per second, in TFLOP/s."""
        return self.model_flops / self.seconds / 1e12 if self.seconds > 0 else math.nan

    @property
    def pct_of_matmul(self) -> float:
        """Model FLOP rate as a percentage of the measured matmul rate (above 100 is possible when
        shared prompts are computed once)."""
        if not self.seconds > 0 or not self.matmul_flops_per_s > 0:
            return math.nan
        return 100.0 * self.model_flops / self.seconds / self.matmul_flops_per_s

    def to_dict(self) -> dict:
        """JSON-ready numbers."""
        return {"conversations": self.conversations, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "model_tflop": self.model_flops / 1e12,
                "model_tflops_per_s": self.model_tflops_per_s, "pct_of_matmul": self.pct_of_matmul}


def throughput(shape: LlamaShape, lengths: Sequence[int], seconds: float, matmul_flops_per_s: float) -> Throughput:
    """Throughput of one timed pass over sequences of `lengths` tokens."""
    return Throughput(len(lengths), int(sum(lengths)), seconds, workload_flops(shape, lengths), matmul_flops_per_s)


# Sizing (docs/gpu.md): memory per GPU and the KV cache that fits beside the weights.

def weight_bytes(shape: LlamaShape, bytes_per_weight: float, head_rows: int | None = None) -> float:
    """Bytes of all weights at `bytes_per_weight` (2 for bf16, 1 for fp8 weights)."""
    return parameters(shape, head_rows) * bytes_per_weight


def kv_bytes_per_token(shape: LlamaShape, bytes_per_value: float) -> float:
    """KV-cache bytes of one token: keys and values of every layer's kv heads."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * bytes_per_value


def kv_tokens(shape: LlamaShape, gpu_bytes: float, tp: int, weight_bytes_per_gpu: float, bytes_per_value: float,
              free_fraction: float = 0.9, reserved_bytes: float = 0.0) -> int:
    """Tokens of KV cache that fit on the `tp` GPUs of one engine.

    The backend gives the KV cache `free_fraction` of the memory left after the weights (and
    `reserved_bytes` of activations and runtime); each GPU holds 1/tp of every token's KV
    (tp <= kv_heads: heads are split, not replicated).

    Returns 0 when the weights do not fit.
    """
    free = gpu_bytes - weight_bytes_per_gpu - reserved_bytes
    if free <= 0:
        return 0
    per_gpu_token = kv_bytes_per_token(shape, bytes_per_value) / tp
    return int(free * free_fraction // per_gpu_token)
