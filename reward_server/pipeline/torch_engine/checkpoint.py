"""What can be told about serving a checkpoint without loading it: its config.json, a model class
transformers implements for its head, its weight files and its tokenizer. The supervisor asks before
tritonserver starts, so that these reasons come in one line at once; the engine asks again when it
loads (in-process users)."""

from __future__ import annotations

import json
from pathlib import Path

from reward_server.pipeline.heads import detect_head_type, process_layout_of

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# The transformers auto-model table each head layout loads through (name lists, no import of a model)
_AUTO_TABLES = {"sequence_classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "a sequence classifier"),
                "lm_logits": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal LM"),
                "causal_lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal LM"),
                "token_classification": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "a token classifier"),
                "remote": ("MODEL_MAPPING_NAMES", "a base model")}


def check_checkpoint(checkpoint: str | Path, head_type: str = "auto", tokenizer: bool = True) -> dict:
    """What can be told about loading `checkpoint` without loading it: its config.json, a model class
    transformers implements for it, its weight files (every shard an index lists) and, when
    `tokenizer` (a server tokenises; the engine alone takes token ids), its tokenizer.
    Returns the parsed config.json. The supervisor calls it before starting tritonserver, so that
    these reasons come in one line at once rather than from a model that failed to load.

    Raises:
        FileNotFoundError: no config.json, no weights, a missing shard, no tokenizer.
        ValueError: an unreadable config.json, a head that cannot be determined, or a model type
            transformers does not implement for that head (remote code is never run).
    """
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)")
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except ValueError as err:
        raise ValueError(f"{checkpoint / 'config.json'} is not valid JSON: {err}") from None
    architecture = (config.get("architectures") or [""])[0]
    head = detect_head_type(config.get("architectures"), head_type)
    layout = process_layout_of(architecture) if head == "process" else head  # labels: checked with the tag
    model_type = config.get("model_type")
    table, what = _AUTO_TABLES[layout]
    if model_type not in configuration_auto.CONFIG_MAPPING_NAMES:
        raise ValueError(f"model_type {model_type!r} of {architecture or 'this checkpoint'} is not one transformers "
                         f"{transformers.__version__} implements (remote code is never run)")
    if model_type not in getattr(modeling_auto, table):
        raise ValueError(f"transformers {transformers.__version__} has no {what} for model_type {model_type!r} "
                         f"({architecture}), which the {layout} head needs")
    weights = [name for name in WEIGHT_FILES if (checkpoint / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"no weights in {checkpoint} ({', '.join(WEIGHT_FILES)})")
    if weights[0].endswith(".index.json"):
        shards = sorted(set(json.loads((checkpoint / weights[0]).read_text()).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (checkpoint / shard).is_file()]
        if missing:
            raise FileNotFoundError(f"{checkpoint / weights[0]} lists {missing[0]}, which is missing"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if tokenizer and not any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {checkpoint} ({', '.join(TOKENIZER_FILES)})")
    return config
