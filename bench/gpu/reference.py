"""The transformers reference on the GPU check's checkpoints: one conversation at a time, the
library's own pooling rule (the last token that is not the pad id), nothing from reward_server."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.gpu.checkpoint import from_pretrained_dtype_kwarg


def load(checkpoint: str | Path, device: str, dtype: str) -> Any:
    """`AutoModelForSequenceClassification` in `dtype` on `device`, in eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(checkpoint), **{from_pretrained_dtype_kwarg(): getattr(torch, dtype)})
    return model.to(device).eval()


def scores(model: Any, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Raw rewards [N, K], each sequence run alone (batch of one: no padding involved)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([list(ids)], device=device)).logits
            out.append(logits[0].float().cpu().numpy())
    return np.stack(out).astype(np.float32)


def scores_at_final_token(model: Any, ids: Sequence[int]) -> np.ndarray:
    """Rewards [K] read at the sequence's final position, whatever its token (no pad rule).

    Used one position after the pooled token, to recognise logits taken a step too late.
    """
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        hidden = model.model(input_ids=torch.tensor([list(ids)], device=device)).last_hidden_state
        return model.score(hidden[:, -1])[0].float().cpu().numpy()


def release() -> None:
    """Return the memory of models the caller has deleted to the GPU now (before the next model
    loads, or before the TensorRT-LLM server sizes its KV cache from what is free)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
