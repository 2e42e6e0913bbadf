"""The PyTorch reward engine: token ids in, raw reward outputs out.

It runs the checkpoint's backbone over length-sorted micro-batches under a token budget and
applies the reward head only at each sequence's pooled position (never full-vocabulary
logits at every position). Sequences are cut just after their pooled position: in a causal
model later tokens cannot change it, so they need not be computed. Sequences that share a
long prefix (one prompt, many responses) compute it once: its key/value cache is reused for
every member's own suffix.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reward_server.batching import (DEFAULT_MIN_SHARED, DEFAULT_TOKEN_BUDGET, SharedGroup,
                                    group_shared_prefixes, plan_microbatches)
from reward_server.heads import RewardHead, detect_head_type, parse_indices, split_model

_LOGGER = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Running totals of what the engine computed, for benchmarks and metrics."""

    sequences: int = 0
    tokens: int = 0          # real tokens run through the backbone (a shared prefix counts once)
    shared_tokens: int = 0   # tokens not computed thanks to shared prefixes
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
    min_shared: int = DEFAULT_MIN_SHARED  # 0 turns prefix sharing off
    stats: EngineStats = field(default_factory=EngineStats)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, head_type: str = "auto",
                        reward_indices: str | Sequence[int] | None = None, device: str = "auto",
                        threads: int | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
                        min_shared: int = DEFAULT_MIN_SHARED) -> "RewardEngine":
        """Load a local Hugging Face reward checkpoint.

        Args:
            checkpoint: directory with config.json and weights.
            head_type: "auto" (from the config's architectures), "sequence_classification"
                or "lm_logits".
            reward_indices: for lm_logits, the vocabulary indices read as rewards ("0,1").
            device: "auto" (CUDA when present), "cpu" or "cuda[:N]". fp32 on CPU, bf16 on CUDA.
            threads: torch intra-op threads (CPU); None leaves torch's default.
            token_budget: padded tokens per micro-batch.
            min_shared: shortest token prefix worth computing once for a group; 0 disables.

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
        if any("sliding" in t for t in getattr(model.config, "layer_types", None) or []):
            min_shared = 0  # the cache reuse below assumes full-attention layers
        _LOGGER.info("loaded %s (%s, %d outputs) on %s %s in %.1fs", checkpoint, head_type, outputs,
                     device, dtype, time.perf_counter() - start)
        return cls(backbone, head, device, outputs, token_budget, min_shared)

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
        groups = group_shared_prefixes(rows, self.min_shared)[0] if self.min_shared > 0 else []
        out = np.empty((len(rows), self.num_outputs), dtype=np.float32)
        with torch.inference_mode():
            # Each sequence runs as (cached prefix or None, own suffix); suffixes of all groups
            # and the unshared sequences are then batched together by length.
            prefixes: list[Prefix | None] = [None] * len(rows)
            for group, prefix in zip(groups, self._prefix_caches(groups, rows)):
                for i in group.members:
                    prefixes[i] = prefix
                self.stats.shared_tokens += (len(group.members) - 1) * group.prefix_length
            suffixes = [row[p.length:] if p else row for row, p in zip(rows, prefixes)]
            for batch in plan_microbatches([len(s) for s in suffixes], self.token_budget):
                out[batch] = self._forward([suffixes[i] for i in batch], [prefixes[i] for i in batch])
        self.stats.sequences += len(rows)
        return out

    def _prefix_caches(self, groups: list[SharedGroup], rows: list[list[int]]) -> list["Prefix"]:
        """Key/value caches of every group's shared prefix, computed in length-sorted micro-batches."""
        prefix_ids = [rows[g.members[0]][: g.prefix_length] for g in groups]
        caches: list[Prefix | None] = [None] * len(groups)
        for batch in plan_microbatches([len(p) for p in prefix_ids], self.token_budget):
            ids, mask, kwargs = self._pack([prefix_ids[g] for g in batch])
            cache = self._run(ids, mask, kwargs, use_cache=True)[1]
            for row, g in enumerate(batch):
                length = len(prefix_ids[g])
                caches[g] = Prefix(length, [(layer.keys[row, :, :length], layer.values[row, :, :length])
                                            for layer in cache.layers])
        return caches

    def _pack(self, rows: list[list[int]]):
        import torch

        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        self.stats.tokens += sum(len(r) for r in rows)
        self.stats.padded_tokens += len(rows) * width
        self.stats.microbatches += 1
        ragged = any(len(r) != width for r in rows)
        return ids, mask, {"attention_mask": mask} if ragged else {}

    def _run(self, ids, mask, kwargs: dict, use_cache: bool = False):
        """One backbone pass; returns (last hidden states, cache)."""
        start = time.perf_counter()
        kwargs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in kwargs.items()}
        output = self.backbone(input_ids=ids.to(self.device), use_cache=use_cache, **kwargs)
        self.stats.forward_seconds += time.perf_counter() - start
        return output.last_hidden_state, output.cache if use_cache else None

    def _forward(self, rows: list[list[int]], prefixes: list["Prefix | None"]) -> np.ndarray:
        """Rewards of `rows`, right-padded into one batch, each continuing its cached prefix if any.

        Prefixes of different lengths share one cache tensor: row r's keys fill positions
        [0, length_r) and the rest is masked out; its own tokens get positions from length_r.
        """
        import torch
        from transformers import DynamicCache

        ids, mask, kwargs = self._pack(rows)
        n, width = ids.shape
        longest = max((p.length for p in prefixes if p), default=0)
        if longest:
            starts = torch.tensor([p.length if p else 0 for p in prefixes])
            prefix_mask = (torch.arange(longest)[None, :] < starts[:, None]).long()
            layers = []
            for layer in range(len(next(p for p in prefixes if p).layers)):
                keys, values = (self._stack([p.layers[layer][kv] if p else None for p in prefixes], longest)
                                for kv in (0, 1))
                layers.append((keys, values))
            kwargs = {"attention_mask": torch.cat([prefix_mask, mask], dim=1), "cache": DynamicCache(layers),
                      "position_ids": starts[:, None] + torch.arange(width)[None, :]}
        hidden = self._run(ids, mask, kwargs, use_cache=bool(longest))[0]
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)
        pooled = hidden[torch.arange(n, device=self.device), last]
        return self.head.module(pooled).float().cpu().numpy()

    @staticmethod
    def _stack(parts: list, longest: int):
        """[n, heads, longest, dim] from per-row [heads, length, dim] tensors (None: all masked)."""
        import torch

        template = next(p for p in parts if p is not None)
        out = template.new_zeros((len(parts), template.shape[0], longest, template.shape[2]))
        for row, part in enumerate(parts):
            if part is not None:
                out[row, :, : part.shape[1]] = part
        return out


@dataclass
class Prefix:
    """A computed shared prefix: its length and per-layer (keys, values), each [heads, length, dim]."""

    length: int
    layers: list[tuple[Any, Any]]
