"""Reward heads: which checkpoint layout gives the reward, and at which token it is read.

Two layouts are served:
- `sequence_classification` (`*ForSequenceClassification`): a `score` head with K labels.
  transformers pools it at the last token whose id is not `pad_token_id`; when pad equals
  the end-of-turn token that ends the template, that is *before* the final token, and exact
  scores must follow the same rule.
- `lm_logits` (`*ForCausalLM`): the reward is the logits at chosen vocabulary indices at the
  final position (Llama-3.1-Nemotron-70B-Reward-HF reads index 0).
- `process` (process reward models): two label logits at every step tag of the response, read
  where the tag token sits. Three layouts: `*ForProcessRewardModel` (Qwen2.5-Math-PRM's remote
  code: Linear(h, h), ReLU, Linear(h, 2) under `score.0` / `score.2`, read from the weights, never
  executed), `*ForTokenClassification` (a `score` or `classifier` Linear(h, 2), as TRL's PRM trainer
  writes it), and a plain `*ForCausalLM` (Math-Shepherd) whose LM-head rows of two label tokens are
  the logits. Every layout gives its two logits in the order (negative, positive), as
  Qwen2.5-Math-PRM's head does; the step score is the positive label's softmax probability
  (`reward_server.pipeline.scoring.step_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

HEAD_TYPES = ("auto", "sequence_classification", "lm_logits", "process")
# Qwen2.5-Math-PRM's step tag: the default where the architecture is a process reward model and
# the tokenizer has this token.
DEFAULT_STEP_TAG = "<extra_0>"


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
    if arch.endswith("ForProcessRewardModel") or arch.endswith("ForTokenClassification"):
        return "process"
    if arch.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if arch.endswith("ForCausalLM"):
        return "lm_logits"
    raise ValueError(f"cannot detect the reward head of architecture {arch!r}; "
                     "set head_type to sequence_classification, lm_logits or process")


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
    if head_type == "process":
        return 2
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
    backbone = model.base_model
    pad = getattr(model.config.get_text_config(), "pad_token_id", None)
    if head_type == "sequence_classification":
        return backbone, RewardHead(head_type, classifier(model), pad)
    return backbone, RewardHead(head_type, picked_rows(model, reward_indices, "reward index"), pad)


def decoder_layers(backbone: Any) -> Any:
    """The decoder layers (a ModuleList) of a transformers base model: its own `layers`, or those of
    its `language_model` (multimodal wrappers such as Gemma3Model, scored on text alone)."""
    layers = getattr(backbone, "layers", None)
    return layers if layers is not None else backbone.language_model.layers


def classifier(model: Any) -> Any:
    """A classification model's head: its `score` (transformers' reward models) or `classifier`.

    Raises:
        ValueError: it has neither.
    """
    module = getattr(model, "score", None) or getattr(model, "classifier", None)
    if module is None:
        raise ValueError(f"{type(model).__name__} has neither a `score` nor a `classifier` head")
    return module


def picked_rows(model: Any, indices: Sequence[int], what: str) -> Any:
    """A Linear holding just the LM head's rows `indices` (full-vocabulary logits are never computed),
    followed by the model's final-logit softcapping where its forward applies one (Gemma-2), so the
    logits read are the ones the model's own forward returns.

    Raises:
        ValueError: an index outside the vocabulary, named as `what`.
    """
    import torch

    lm_head = model.get_output_embeddings()
    vocab = lm_head.weight.shape[0]
    bad = [i for i in indices if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{what} {bad[0]} is outside the LM head's vocabulary of {vocab}")
    rows = torch.tensor(list(indices), dtype=torch.long)
    picked = torch.nn.Linear(lm_head.weight.shape[1], len(rows), bias=lm_head.bias is not None)
    with torch.no_grad():
        picked.weight.copy_(lm_head.weight[rows])
        if lm_head.bias is not None:
            picked.bias.copy_(lm_head.bias[rows])
    picked = picked.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return _softcapped(picked, cap) if cap else picked


def _softcapped(linear: Any, cap: float) -> Any:
    """`linear`, its outputs x turned into cap * tanh(x / cap) as Gemma's causal LMs do; `weight` is
    the linear's (its rows count the outputs)."""
    import torch

    class FinalSoftcap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.cap = linear, float(cap)

        @property
        def weight(self):
            return self.linear.weight

        def forward(self, hidden):
            return torch.tanh(self.linear(hidden) / self.cap) * self.cap

    return FinalSoftcap()


def tag_positions(token_ids: Sequence[int], tag_id: int) -> list[int]:
    """Indices of every step tag in a sequence, in order."""
    return [i for i, token in enumerate(token_ids) if token == tag_id]


@dataclass
class ProcessHead:
    """A process reward head: `module` maps hidden states at step tags [S, H] to the two label
    logits [S, 2], ordered (negative, positive)."""

    module: Any
    tag_id: int


def step_tag_or_default(architecture: str, step_tag: str | int | None) -> str | int:
    """`step_tag`, or by default `DEFAULT_STEP_TAG` for a `*ForProcessRewardModel`.

    Raises:
        ValueError: no tag given where there is no default.
    """
    if step_tag not in (None, ""):
        return step_tag
    if architecture.endswith("ForProcessRewardModel"):
        return DEFAULT_STEP_TAG
    raise ValueError("a process reward head needs its step tag (--step-tag TOKEN or id): "
                     f"{architecture or 'this model'} has no default one")


def process_layout(architecture: str, labels: Sequence[int] | str | None) -> str:
    """Which of the three process layouts a checkpoint has: "remote" (`*ForProcessRewardModel`),
    "token_classification", or "causal_lm" (any other architecture, read at two label tokens).

    Raises:
        ValueError: a causal LM without its label token ids.
    """
    layout = process_layout_of(architecture)
    if layout == "causal_lm" and not labels:
        raise ValueError(f"a process head on {architecture or 'this model'} needs the two label token ids "
                         "(--step-labels POSITIVE,NEGATIVE)")
    return layout


def process_layout_of(architecture: str) -> str:
    """`process_layout` by the architecture's name alone (labels unchecked)."""
    if architecture.endswith("ForProcessRewardModel"):
        return "remote"
    return "token_classification" if architecture.endswith("ForTokenClassification") else "causal_lm"


def resolve_step_tag(tokenizer: Any, architecture: str, step_tag: str | int | None) -> int:
    """The step tag's token id: `step_tag` as an id or a token of the vocabulary (default: see
    `step_tag_or_default`).

    Raises:
        ValueError: no tag given where there is no default, or a tag that is not one token.
    """
    step_tag = step_tag_or_default(architecture, step_tag)
    if isinstance(step_tag, int) or str(step_tag).isdigit():
        tag_id = int(step_tag)
        if not 0 <= tag_id < len(tokenizer):
            raise ValueError(f"step tag id {tag_id} is outside the tokenizer's vocabulary of {len(tokenizer)}")
        return tag_id
    vocab = tokenizer.get_vocab()
    if step_tag not in vocab:
        raise ValueError(f"step tag {step_tag!r} is not one token of this tokenizer's vocabulary")
    return vocab[step_tag]


def process_head(model: Any, checkpoint: Any, tag_id: int, labels: Sequence[int] | None) -> ProcessHead:
    """The `ProcessHead` of a loaded model (see the module docstring for the three layouts).

    `model`: the base model for `*ForProcessRewardModel` (its head is read from the checkpoint's
    safetensors), a `*ForTokenClassification`, or a `*ForCausalLM` with `labels` = (positive,
    negative) token ids.

    Raises:
        ValueError: a head of the wrong shape, missing head weights, or label ids outside the vocabulary.
    """
    import torch

    architecture = (getattr(model.config, "architectures", None) or [""])[0]
    if labels:
        if len(labels) != 2:
            raise ValueError(f"a causal-LM process head needs two label token ids (positive, negative), got {labels}")
        positive, negative = labels
        return ProcessHead(picked_rows(model, (negative, positive), "step label id"), tag_id)
    if architecture.endswith("ForProcessRewardModel"):
        from pathlib import Path

        from safetensors import safe_open

        weights = {}
        for path in sorted(Path(checkpoint).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                weights.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("score.")})
        needed = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
        missing = [k for k in needed if k not in weights]
        if missing:
            raise ValueError(f"{architecture}: the checkpoint has no {missing[0]} (expected a Linear(h, h), ReLU, "
                             "Linear(h, 2) head under score.0 / score.2)")
        first = torch.nn.Linear(*weights["score.0.weight"].shape[::-1])
        last = torch.nn.Linear(*weights["score.2.weight"].shape[::-1])
        with torch.no_grad():
            first.weight.copy_(weights["score.0.weight"]), first.bias.copy_(weights["score.0.bias"])
            last.weight.copy_(weights["score.2.weight"]), last.bias.copy_(weights["score.2.bias"])
        module = torch.nn.Sequential(first, torch.nn.ReLU(), last)
    else:
        module = classifier(model)
    out = module[-1] if isinstance(module, torch.nn.Sequential) else module
    if out.weight.shape[0] != 2:
        raise ValueError(f"a process reward head has two labels; this one has {out.weight.shape[0]}")
    parameter = next(model.parameters())
    return ProcessHead(module.to(parameter.device, parameter.dtype), tag_id)
