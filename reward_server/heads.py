"""Reward heads: which checkpoint layout gives the reward, and at which token it is read.

Two layouts are served:
- `sequence_classification` (`*ForSequenceClassification`): a `score` head with K labels.
  transformers pools it at the last token whose id is not `pad_token_id`; when pad equals
  the end-of-turn token that ends the template, that is *before* the final token, and exact
  scores must follow the same rule.
- `lm_logits` (`*ForCausalLM`): the reward is the logits at chosen vocabulary indices at the
  final position (Llama-3.1-Nemotron-70B-Reward-HF reads index 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

HEAD_TYPES = ("auto", "sequence_classification", "lm_logits")


def detect_head_type(architectures: Sequence[str] | None, head_type: str = "auto") -> str:
    """Resolve "auto" from a checkpoint's `architectures` list.

    Raises:
        ValueError: an unknown head type, or "auto" with an architecture of neither layout.
    """
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    if head_type != "auto":
        return head_type
    arch = (architectures or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if arch.endswith("ForCausalLM"):
        return "lm_logits"
    raise ValueError(f"cannot detect the reward head of architecture {arch!r}; "
                     "set head_type to sequence_classification or lm_logits")


def parse_indices(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """Parse reward indices such as "0" or "0,1,2" (default: index 0)."""
    if text is None or text == "":
        return (0,)
    if isinstance(text, str):
        return tuple(int(part) for part in text.split(",") if part.strip())
    return tuple(int(i) for i in text)


def num_outputs(config: dict, head_type: str, reward_indices: Sequence[int]) -> int:
    """K, the number of raw reward outputs, from a checkpoint's config.json contents."""
    if head_type == "lm_logits":
        return len(reward_indices)
    if "id2label" in config:
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def pool_position(token_ids: Sequence[int], head_type: str, pad_token_id: int | None) -> int:
    """Index of the token whose hidden state the head reads, following transformers' rules."""
    last = len(token_ids) - 1
    if head_type == "lm_logits" or pad_token_id is None:
        return last
    for position in range(last, -1, -1):
        if token_ids[position] != pad_token_id:
            return position
    return 0  # all padding: transformers' argmax over an all-zero mask gives 0


@dataclass
class RewardHead:
    """The part of a model after the backbone, applied to pooled hidden states only.

    `module` maps hidden states [N, H] to rewards [N, K]: the classification head itself, or
    a linear layer holding just the chosen rows of the LM head, so that full-vocabulary
    logits are never computed.
    """

    head_type: str
    module: Any
    pad_token_id: int | None

    def position(self, token_ids: Sequence[int]) -> int:
        """Index of the token to read (see `pool_position`)."""
        return pool_position(token_ids, self.head_type, self.pad_token_id)


def split_model(model: Any, head_type: str, reward_indices: Sequence[int]) -> tuple[Any, RewardHead]:
    """Split a loaded transformers model into its backbone and a `RewardHead`.

    Raises:
        ValueError: no head module found, or a reward index outside the LM vocabulary.
    """
    import torch

    backbone = model.base_model
    pad = getattr(model.config.get_text_config(), "pad_token_id", None)
    if head_type == "sequence_classification":
        module = getattr(model, "score", None) or getattr(model, "classifier", None)
        if module is None:
            raise ValueError(f"{type(model).__name__} has neither a `score` nor a `classifier` head")
        return backbone, RewardHead(head_type, module, pad)
    lm_head = model.get_output_embeddings()
    vocab = lm_head.weight.shape[0]
    bad = [i for i in reward_indices if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"reward index {bad[0]} is outside the LM head's vocabulary of {vocab}")
    rows = torch.tensor(list(reward_indices), dtype=torch.long)
    picked = torch.nn.Linear(lm_head.weight.shape[1], len(rows), bias=lm_head.bias is not None)
    with torch.no_grad():
        picked.weight.copy_(lm_head.weight[rows])
        if lm_head.bias is not None:
            picked.bias.copy_(lm_head.bias[rows])
    picked.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
    return backbone, RewardHead(head_type, picked, pad)
