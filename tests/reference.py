"""The Hugging Face transformers reference: how a model card reads a reward, one conversation
at a time, with no code from reward_server."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=8)
def _load(checkpoint: str):
    import transformers

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    causal = config["architectures"][0].endswith("ForCausalLM")
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(checkpoint, dtype="float32").eval()
    return transformers.AutoTokenizer.from_pretrained(checkpoint), model, causal


def reference_ids(checkpoint, messages) -> list[int]:
    """Token ids from the tokenizer's own apply_chat_template."""
    tokenizer, _, _ = _load(str(checkpoint))
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def reference_rewards_from_ids(checkpoint, ids, indices=(0,)) -> np.ndarray:
    """Raw rewards [K] for one sequence: classifier logits, or LM logits at the final token."""
    import torch

    _, model, causal = _load(str(checkpoint))
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits
    return (logits[0, -1, list(indices)] if causal else logits[0]).numpy().astype(np.float32)


def reference_rewards(checkpoint, conversations, indices=(0,)) -> np.ndarray:
    """Raw rewards [N, K] for conversations, each scored alone."""
    return np.stack([reference_rewards_from_ids(checkpoint, reference_ids(checkpoint, c), indices)
                     for c in conversations])


def eager_rewards(checkpoint, conversations) -> np.ndarray:
    """Classifier outputs [N, K] with transformers' eager attention (the implementation that applies
    every family's windows and softcapping), one conversation at a time, ids from the tokenizer's own
    chat template."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    rows = []
    with torch.no_grad():
        for messages in conversations:
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            rows.append(model(torch.tensor([ids])).logits[0].numpy())
    return np.stack(rows)
