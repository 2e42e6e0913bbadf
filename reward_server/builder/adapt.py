"""Turn a reward checkpoint into one TensorRT-LLM's engine path can build, and say what its logits mean.

TensorRT-LLM converts `*ForCausalLM` checkpoints only. A `*ForSequenceClassification` reward model
(a `score` head with K outputs) is rewritten as the equivalent causal LM whose `lm_head` rows
0..K-1 are the score rows and every other row zero: logits[0:K] at the pooled position are then
the K rewards (plus the head's bias, if it has one, which the engine step adds: a causal LM's
lm_head has none). Families whose TensorRT-LLM converter ties the LM head to the embedding table
(Gemma-2: `TIED_HEAD_FAMILIES`) carry the score rows in the embedding rows of K reserved tokens
instead, and are read at those ids; final-logit softcapping is turned off either way. transformers pools at the last token whose id is not the pad id
(`reward_server.pipeline.heads.pool_position`), so the engine path cuts each input right after that token.

Process reward models: a `*ForTokenClassification` (two labels) is rewritten the same way; a
causal LM (Math-Shepherd) is used as it is, its logits read at the (negative, positive) label
tokens. Their logits are read at every step tag (reward_server.pipeline.trtllm.fanout). Qwen2.5-Math-PRM's
two-layer head (Linear, ReLU, Linear) cannot be an lm_head: it is refused here (the torch engine
serves it).

The rewrite is streamed: shards are opened one after another and every tensor is written as soon
as it is read, so at most one tensor plus the new lm_head are in memory, even for a 70B model.
A causal-LM checkpoint is used as it is; only `reward_head.json` is written for it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

from safetensors import safe_open

from reward_server.pipeline.heads import detect_head_type, num_outputs, parse_indices, process_layout, resolve_step_tag
from reward_server.pipeline.trtllm.layout import METADATA_FILE, RewardHeadSpec

_LOGGER = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCORE, SCORE_BIAS, LM_HEAD = "score.weight", "score.bias", "lm_head.weight"
EMBEDDINGS = "model.embed_tokens.weight"
# Causal LMs whose TensorRT-LLM converter ties the LM head to the embedding table (Gemma's always
# does): the score rows go into the embedding rows of reserved tokens (Gemma's <unusedN>), which no
# input holds (the fan-out refuses one that does), so their logits are the rewards.
TIED_HEAD_FAMILIES = ("Gemma2ForCausalLM",)
RESERVED_TOKEN = re.compile(r"<unused\d+>")
_SEQ_CLS, _TOKEN_CLS, _CAUSAL_LM = "ForSequenceClassification", "ForTokenClassification", "ForCausalLM"
_LABEL_KEYS = ("num_labels", "id2label", "label2id", "problem_type")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".index.json")
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")
# Element sizes of safetensors dtypes: a file's header (with byte offsets) precedes its data.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def engine_head(architectures: list[str] | None, head_type: str) -> str:
    """The head type of a checkpoint the TensorRT-LLM path can build (`detect_head_type`).

    Raises:
        ValueError: an unknown head, or a `*ForProcessRewardModel` (served by the torch engine only).
    """
    head = detect_head_type(architectures, head_type)
    architecture = (architectures or [""])[0]
    if head == "process" and architecture.endswith("ForProcessRewardModel"):
        raise ValueError(f"{architecture}'s two-layer head (Linear, ReLU, Linear) cannot be built into a "
                         "TensorRT-LLM engine: serve it with the torch engine (reward-server serve --engine torch)")
    return head


def adapt_checkpoint(source: str | Path, output: str | Path, head_type: str = "auto",
                     reward_indices: str | Sequence[int] | None = None, step_tag: str | int | None = None,
                     step_labels: str | Sequence[int] | None = None) -> RewardHeadSpec:
    """Prepare a reward checkpoint for TensorRT-LLM's `*ForCausalLM` conversion.

    Args:
        source: Hugging Face checkpoint directory (safetensors weights for sequence classification).
        output: directory for the results; `reward_head.json` is written into it last, so a
            directory without it holds an interrupted run.
        head_type: "auto" (from `architectures`), "sequence_classification", "lm_logits" or "process".
        reward_indices: logits indices of the rewards for "lm_logits" (default "0"); ignored for
            sequence classification, whose rewards are always logits 0..K-1 of the adapted model.
        step_tag: process heads: the step tag, a token or its id (`heads.resolve_step_tag`).
        step_labels: process heads on a causal LM: the label token ids "POSITIVE,NEGATIVE".

    Returns:
        The spec also written to `output/reward_head.json`; its `hf_checkpoint` is the directory to
        convert (`output` for an adapted classifier, `source` for a causal LM).

    Raises:
        ValueError: an unsupported architecture or head layout, a reward index outside the
            vocabulary, no safetensors weights, or `output` equal to `source` for an adaptation.
    """
    source, output = Path(source).resolve(), Path(output).resolve()
    config = _read_json(source / "config.json")
    architecture = (config.get("architectures") or ["<none>"])[0]
    head = engine_head(config.get("architectures"), head_type)
    suffixes = {"sequence_classification": (_SEQ_CLS,), "lm_logits": (_CAUSAL_LM,),
                "process": (_TOKEN_CLS, _CAUSAL_LM)}[head]
    if not architecture.endswith(suffixes):
        raise ValueError(f"head_type {head} needs a *{' or *'.join(suffixes)} checkpoint; {source} is {architecture}")
    if "vocab_size" not in config:
        raise ValueError(f"{architecture} is not supported: {source}/config.json has no vocab_size")
    vocab_size = int(config["vocab_size"])
    tag_id = _step_tag_id(source, architecture, step_tag) if head == "process" else None
    causal_process = head == "process" and process_layout(architecture, step_labels) == "causal_lm"

    if head == "lm_logits" or causal_process:
        if causal_process:  # the logits of the (negative, positive) labels, as every process head gives them
            positive, negative = parse_indices(step_labels)
            reward_indices = (negative, positive)
        indices = list(parse_indices(reward_indices))
        bad = [i for i in indices if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"reward index {bad[0]} is outside the vocabulary of {vocab_size} tokens "
                             f"of {source}")
        names = ["negative", "positive"] if causal_process else _attribute_names(config, len(indices))
        spec = RewardHeadSpec(str(source), str(source), architecture, architecture, head, indices, names, "last",
                              config.get("pad_token_id"), vocab_size, step_tag_id=tag_id)
        _prepare_output(output)
    else:
        if output == source:
            raise ValueError(f"output must differ from the source checkpoint {source}")
        k = num_outputs(config, head, ())
        if reward_indices is not None and list(parse_indices(reward_indices)) != list(range(k)):
            _LOGGER.warning("reward_indices %s ignored: a %s's rewards are logits 0..%d", reward_indices,
                            architecture, k - 1)
        suffix = _TOKEN_CLS if head == "process" else _SEQ_CLS
        causal = architecture[: -len(suffix)] + _CAUSAL_LM
        tied = causal in TIED_HEAD_FAMILIES
        # a token classifier is read at its step tags, each request cut right after one
        spec = RewardHeadSpec(str(source), str(output), architecture, causal, head,
                              _reserved_ids(source, k) if tied else list(range(k)),
                              _attribute_names(config, k), "last" if head == "process" else "last_non_pad",
                              config.get("pad_token_id"), vocab_size, step_tag_id=tag_id, rows_in_embedding=tied)
        _adapt_classifier(source, output, config, spec)
    spec.write(output)
    _LOGGER.info("reward head of %s: %s, indices %s -> %s", source, spec.head_type, spec.reward_indices,
                 output / METADATA_FILE)
    return spec


def _reserved_ids(source: Path, k: int) -> list[int]:
    """The first `k` reserved tokens' ids (`RESERVED_TOKEN`) of the checkpoint's tokenizer.

    Raises:
        ValueError: fewer than `k` of them.
    """
    from transformers import AutoTokenizer

    vocabulary = AutoTokenizer.from_pretrained(str(source)).get_vocab()
    ids = sorted(i for token, i in vocabulary.items() if RESERVED_TOKEN.fullmatch(token))
    if len(ids) < k:
        raise ValueError(f"{k} score rows need {k} reserved tokens (<unusedN>) in the tokenizer of {source} to carry "
                         f"them in the tied embedding table; it has {len(ids)}")
    return ids[:k]


def _step_tag_id(source: Path, architecture: str, step_tag: str | int | None) -> int:
    from transformers import AutoTokenizer

    return resolve_step_tag(AutoTokenizer.from_pretrained(str(source)), architecture, step_tag)


def _adapt_classifier(source: Path, output: Path, config: dict, spec: RewardHeadSpec) -> None:
    """Write the equivalent causal-LM checkpoint of a `score`-head classifier into `output`; the
    head's bias, if any, goes into `spec.bias`. The score rows become LM-head rows 0..K-1, or, for
    a tied family (`spec.rows_in_embedding`), the embedding rows of the reserved tokens."""
    weight_map, sharded = _weight_map(source)
    unexpected = sorted(name for name in weight_map if not name.startswith("model.") and name not in (SCORE, SCORE_BIAS))
    if SCORE not in weight_map or unexpected:
        found = ", ".join(unexpected[:4]) if unexpected else f"no {SCORE}"
        raise ValueError(f"{spec.source_architecture} is not supported for TensorRT-LLM adaptation: it needs "
                         f"a `model.` backbone and a `score` head; found {found}")
    _prepare_output(output)
    if not sharded:  # an earlier sharded run's index would otherwise win over model.safetensors
        (output / INDEX_FILE).unlink(missing_ok=True)
    shards = sorted(set(weight_map.values()))
    new_map: dict[str, str] = {}
    total_size = 0
    for number, shard in enumerate(shards, 1):
        with safe_open(str(source / shard), framework="pt") as reader:
            entries = [(name, reader.get_slice(name).get_dtype(), reader.get_slice(name).get_shape(),
                        lambda name=name: reader.get_tensor(name))
                       for name in reader.keys() if name not in (SCORE, SCORE_BIAS)]
            if spec.rows_in_embedding and EMBEDDINGS in reader.keys():
                entries = [_embedding_entry(reader, source / weight_map[SCORE], spec) if entry[0] == EMBEDDINGS
                           else entry for entry in entries]
            elif SCORE in reader.keys():  # the new head goes where the old one was
                entries.append(_lm_head_entry(reader, spec))
            if SCORE_BIAS in reader.keys():
                spec.bias = reader.get_tensor(SCORE_BIAS).float().tolist()
            total_size += _write_safetensors(output / shard, entries, reader.metadata())
        new_map.update((entry[0], shard) for entry in entries)
        _LOGGER.info("adapted shard %d/%d %s (%d tensors)", number, len(shards), shard, len(entries))

    for path in sorted(source.iterdir()):  # tokenizer, chat template, generation config, ...
        if path.is_file() and path.name not in ("config.json", METADATA_FILE) \
                and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, output / path.name)
    causal_config = {key: value for key, value in config.items() if key not in _LABEL_KEYS}
    # A tied lm_head would be the embedding matrix, not the score rows (seq-cls Qwen2 configs say true),
    # unless the score rows were written into it.
    causal_config.update(architectures=[spec.architecture], tie_word_embeddings=spec.rows_in_embedding)
    # The score rows are the logits as they are: a causal LM's final-logit softcapping (Gemma-2's
    # tanh(x / 30) * 30) would squash the rewards, and the classifier never applied it.
    for config_of in (causal_config, causal_config.get("text_config") or {}):
        if config_of.get("final_logit_softcapping") is not None:
            config_of["final_logit_softcapping"] = None
    causal_config.update(_legacy_keys(causal_config))
    (output / "config.json").write_text(json.dumps(causal_config, indent=2, sort_keys=True) + "\n")
    if sharded:
        # Only total_size is rewritten: other totals of the source (parameter counts) no longer hold.
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(new_map.items()))}
        (output / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _embedding_entry(reader: Any, score_shard: Path, spec: RewardHeadSpec) -> tuple[str, str, list[int], Callable]:
    """The embedding table with the score rows in the reserved tokens' rows (`spec.reward_indices`)."""
    vocab, hidden = reader.get_slice(EMBEDDINGS).get_shape()
    with safe_open(str(score_shard), framework="pt") as scores:
        k, score_hidden = scores.get_slice(SCORE).get_shape()
    if (k, score_hidden) != (len(spec.reward_indices), hidden):
        raise ValueError(f"{SCORE} is {k} x {score_hidden}; the embeddings are {vocab} x {hidden} for "
                         f"{len(spec.reward_indices)} labels")

    def build() -> Any:
        table = reader.get_tensor(EMBEDDINGS).clone()
        with safe_open(str(score_shard), framework="pt") as scores:
            table[spec.reward_indices] = scores.get_tensor(SCORE).to(table.dtype)
        return table

    return EMBEDDINGS, reader.get_slice(EMBEDDINGS).get_dtype(), [vocab, hidden], build


def _lm_head_entry(reader: Any, spec: RewardHeadSpec) -> tuple[str, str, list[int], Callable[[], Any]]:
    """The lm_head tensor entry: score rows first, zeros for the rest of the vocabulary."""
    k, hidden = reader.get_slice(SCORE).get_shape()
    if k != len(spec.reward_indices):
        raise ValueError(f"{SCORE} has {k} rows but config.json describes {len(spec.reward_indices)} labels")

    def build() -> Any:
        import torch

        score = reader.get_tensor(SCORE)
        lm_head = torch.zeros(spec.vocab_size, hidden, dtype=score.dtype)
        lm_head[:k] = score
        return lm_head

    return LM_HEAD, reader.get_slice(SCORE).get_dtype(), [spec.vocab_size, hidden], build


def _write_safetensors(path: Path, entries: Sequence[tuple], metadata: dict | None) -> int:
    """Write (name, dtype, shape, load) entries as a safetensors file, loading one tensor at a time.

    safetensors' own `save_file` needs every tensor of the file in memory and copies each to bytes,
    which would hold a 5 GB shard twice. Returns the bytes of tensor data written.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in entries:
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"tensor {name} has dtype {dtype}, which this adaptation does not handle")
        size = _DTYPE_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, _, _, load in entries:
            # Raw little-endian bytes as safetensors stores them; a view, not a copy.
            data = load().contiguous().reshape(-1).view(torch.uint8).numpy()
            start, end = header[name]["data_offsets"]
            if data.nbytes != end - start:
                raise ValueError(f"tensor {name}: {data.nbytes} bytes read, {end - start} expected")
            out.write(data)
    os.replace(partial, path)
    return offset


def _weight_map(source: Path) -> tuple[dict[str, str], bool]:
    """Tensor name -> shard file of a safetensors checkpoint, and whether it is indexed."""
    if (source / INDEX_FILE).exists():
        return dict(_read_json(source / INDEX_FILE)["weight_map"]), True
    if (source / SINGLE_FILE).exists():
        with safe_open(str(source / SINGLE_FILE), framework="pt") as reader:
            return {name: SINGLE_FILE for name in reader.keys()}, False
    raise ValueError(f"{source} has neither {SINGLE_FILE} nor {INDEX_FILE}: only safetensors checkpoints "
                     "can be adapted")


def _prepare_output(output: Path) -> None:
    """Create `output` and remove a finished run's marker, so a new interrupted run is detectable."""
    output.mkdir(parents=True, exist_ok=True)
    (output / METADATA_FILE).unlink(missing_ok=True)


def _legacy_keys(config: dict) -> dict:
    """The transformers 4.x spellings of keys that transformers 5 writes differently.

    TensorRT-LLM 1.2's converter reads configs with transformers 4.x, which knows `rope_theta`,
    `rope_scaling` and `torch_dtype`, not 5.x's `rope_parameters` and `dtype`; without them it
    would silently fall back to the default rope base. Keys already present are kept.
    """
    extra = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and "rope_theta" not in config:
            extra["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            extra["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in config and "torch_dtype" not in config:
        extra["torch_dtype"] = config["dtype"]
    return extra


def _attribute_names(config: dict, k: int) -> list[str]:
    """K names from `id2label` when they were set by the model's authors, else reward_0, reward_1, ..."""
    labels = config.get("id2label") or {}
    names = [labels.get(str(i), labels.get(i)) for i in range(k)]
    if len(labels) == k and all(isinstance(n, str) and not _DEFAULT_LABEL.fullmatch(n) for n in names):
        return names
    return [f"reward_{i}" for i in range(k)]


def _read_json(path: Path) -> dict:
    """Parse a JSON file, with an error that names it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
