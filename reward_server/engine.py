"""The PyTorch reward engine: token ids in, raw reward outputs out.

It runs the checkpoint's backbone over length-sorted micro-batches under a token budget and
applies the reward head only at each sequence's pooled position (never full-vocabulary
logits at every position). Sequences are cut just after their pooled position: in a causal
model later tokens cannot change it, so they need not be computed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reward_server.batching import DEFAULT_TOKEN_BUDGET, plan_microbatches
from reward_server.heads import RewardHead, detect_head_type, parse_indices, split_model

_LOGGER = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Running totals of what the engine computed, for benchmarks and metrics."""

    sequences: int = 0
    tokens: int = 0          # real tokens run through the backbone
    padded_tokens: int = 0   # rows x width summed over micro-batches
    forward_seconds: float = 0.0
    microbatches: int = 0

    @property
    def padding_ratio(self) -> float:
        """Fraction of computed tokens that were padding."""
        return 0.0 if not self.padded_tokens else 1.0 - self.tokens / self.padded_tokens


@dataclass
class RewardEngine:
    """Scores token-id sequences with a loaded reward model.

    Build one with `RewardEngine.from_checkpoint`; call `score`.
    """

    backbone: Any
    head: RewardHead
    device: Any
    num_outputs: int
    token_budget: int = DEFAULT_TOKEN_BUDGET
    stats: EngineStats = field(default_factory=EngineStats)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, head_type: str = "auto",
                        reward_indices: str | Sequence[int] | None = None, device: str = "auto",
                        threads: int | None = None,
                        token_budget: int = DEFAULT_TOKEN_BUDGET) -> "RewardEngine":
        """Load a local Hugging Face reward checkpoint.

        Args:
            checkpoint: directory with config.json and weights.
            head_type: "auto" (from the config's architectures), "sequence_classification"
                or "lm_logits".
            reward_indices: for lm_logits, the vocabulary indices read as rewards ("0,1").
            device: "auto" (CUDA when present), "cpu" or "cuda[:N]". fp32 on CPU, bf16 on CUDA.
            threads: torch intra-op threads (CPU); None leaves torch's default.
            token_budget: padded tokens per micro-batch.

        Raises:
            ValueError: the head cannot be determined or an index is out of range.
            OSError: the checkpoint cannot be read.
        """
        import torch
        import transformers

        config = json.loads((Path(checkpoint) / "config.json").read_text())
        head_type = detect_head_type(config.get("architectures"), head_type)
        indices = parse_indices(reward_indices)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if threads and device.type == "cpu":
            torch.set_num_threads(threads)
        auto = (transformers.AutoModelForSequenceClassification if head_type == "sequence_classification"
                else transformers.AutoModelForCausalLM)
        start = time.perf_counter()
        model = auto.from_pretrained(str(checkpoint), dtype=dtype, attn_implementation="sdpa")
        model.to(device).eval()
        backbone, head = split_model(model, head_type, indices)
        outputs = head.module.weight.shape[0]
        _LOGGER.info("loaded %s (%s, %d outputs) on %s %s in %.1fs", checkpoint, head_type, outputs,
                     device, dtype, time.perf_counter() - start)
        return cls(backbone, head, device, outputs, token_budget)

    def score(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Raw reward outputs, float32 [N, K], one row per sequence in input order.

        Raises:
            ValueError: an empty sequence.
        """
        import torch

        rows = []
        for i, ids in enumerate(sequences):
            if len(ids) == 0:
                raise ValueError(f"sequence {i} is empty")
            rows.append(list(ids[: self.head.position(ids) + 1]))
        out = np.empty((len(rows), self.num_outputs), dtype=np.float32)
        lengths = [len(r) for r in rows]
        with torch.inference_mode():
            for batch in plan_microbatches(lengths, self.token_budget):
                out[batch] = self._forward([rows[i] for i in batch])
        return out

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        import torch

        start = time.perf_counter()
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        ragged = any(len(r) != width for r in rows)
        hidden = self.backbone(input_ids=ids.to(self.device),
                               attention_mask=mask.to(self.device) if ragged else None,
                               use_cache=False).last_hidden_state
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)
        pooled = hidden[torch.arange(len(rows), device=self.device), last]
        rewards = self.head.module(pooled).float().cpu().numpy()
        self.stats.sequences += len(rows)
        self.stats.tokens += sum(len(r) for r in rows)
        self.stats.padded_tokens += len(rows) * width
        self.stats.microbatches += 1
        self.stats.forward_seconds += time.perf_counter() - start
        return rewards
