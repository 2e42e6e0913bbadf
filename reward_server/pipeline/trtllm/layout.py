"""The engine directory that `reward-server build-engine` writes and `serve --engine tensorrt_llm` reads.

    DIR/
      hf/                  the Hugging Face CausalLM checkpoint to convert (the adapted one for a
                           sequence-classification model) and reward_head.json, what the logits mean
      trtllm_checkpoint/   TensorRT-LLM's converter output: config.json, rank{N}.safetensors
      engine/              trtllm-build's output: config.json, rank{N}.engine
      model_repository/    a rendered Triton model repository pointing at engine/ (for a stock
                           tritonserver; `reward-server serve` renders its own runtime copy)
      build.json           the build plan that was run, for the record

The builder writes this directory and the server reads it, so its contract lives here, below both:
what the logits mean (`RewardHeadSpec`, reward_head.json) and one reader of the engine's config.json
(tensor parallelism and the size limits).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

METADATA_FILE = "reward_head.json"


@dataclass
class RewardHeadSpec:
    """What the engine's logits mean: written next to the adapted checkpoint as reward_head.json."""

    source_checkpoint: str
    hf_checkpoint: str
    source_architecture: str
    architecture: str
    head_type: str
    reward_indices: list[int]
    attribute_names: list[str]
    pooling: str
    pad_token_id: int | None
    vocab_size: int
    bias: list[float] | None = None   # added to the logits read (a classifier head's bias)
    step_tag_id: int | None = None    # process reward models: logits are read at every such token
    # The score rows are the embedding rows of the reward indices (reserved tokens no input holds), for
    # families whose converter ties the LM head to the embeddings (Gemma): an input holding one is refused.
    rows_in_embedding: bool = False

    def write(self, directory: str | Path) -> Path:
        """Write `directory/reward_head.json` (replacing it in one step) and return its path."""
        path = Path(directory) / METADATA_FILE
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(partial, path)
        return path

    @classmethod
    def read(cls, directory: str | Path) -> RewardHeadSpec:
        """Read `directory/reward_head.json`.

        Raises:
            ValueError: the file is missing (the adaptation never finished) or is not a valid spec.
        """
        path = Path(directory) / METADATA_FILE
        try:
            spec = cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ValueError(f"{path} is missing: run adapt_checkpoint on {directory} (again)") from None
        except (ValueError, TypeError) as err:  # bad JSON, not an object, missing or unknown fields
            raise ValueError(f"{path} is not a valid reward head description: {err}") from err
        if len(spec.reward_indices) != len(spec.attribute_names):
            raise ValueError(f"{path}: {len(spec.reward_indices)} reward indices but "
                             f"{len(spec.attribute_names)} attribute names")
        return spec


@dataclass(frozen=True)
class EngineLayout:
    """Paths inside one engine directory."""

    root: Path

    @property
    def hf(self) -> Path:
        """The CausalLM checkpoint to convert, with reward_head.json."""
        return self.root / "hf"

    @property
    def trtllm_checkpoint(self) -> Path:
        """TensorRT-LLM checkpoint (per-rank safetensors)."""
        return self.root / "trtllm_checkpoint"

    @property
    def engine(self) -> Path:
        """Serialized engines, one per rank, and their config.json."""
        return self.root / "engine"

    @property
    def model_repository(self) -> Path:
        """Rendered Triton model repository."""
        return self.root / "model_repository"

    @property
    def build_record(self) -> Path:
        """JSON record of the build plan."""
        return self.root / "build.json"

    def head_spec(self) -> RewardHeadSpec:
        """The reward head metadata (which logits, which pooling rule).

        Raises:
            ValueError: reward_head.json is missing or invalid.
        """
        return RewardHeadSpec.read(self.hf)


@dataclass(frozen=True)
class EngineInfo:
    """What the serving side needs to know of a built engine (its config.json)."""

    tp_size: int
    pp_size: int
    max_input_len: int
    max_seq_len: int
    max_batch_size: int
    max_num_tokens: int
    gather_generation_logits: bool
    paged_context_fmha: bool
    vocab_size: int | None

    @property
    def world_size(self) -> int:
        """GPUs (MPI ranks) the engine needs: tp x pp."""
        return self.tp_size * self.pp_size


def read_engine_info(engine_dir: str | Path) -> EngineInfo:
    """Parse trtllm-build's `config.json` (pretrained_config + build_config).

    Raises:
        FileNotFoundError: no config.json in `engine_dir`.
        ValueError: the file is not an engine config, or the engine cannot serve rewards
            (built without --gather_generation_logits).
    """
    path = Path(engine_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: build the engine first (reward-server build-engine)")
    try:
        config = json.loads(path.read_text())
        pretrained, build = config["pretrained_config"], config["build_config"]
        mapping = pretrained.get("mapping", {})
        plugins = build.get("plugin_config", {})
        info = EngineInfo(
            tp_size=int(mapping.get("tp_size", 1)), pp_size=int(mapping.get("pp_size", 1)),
            max_input_len=int(build["max_input_len"]), max_seq_len=int(build["max_seq_len"]),
            max_batch_size=int(build["max_batch_size"]), max_num_tokens=int(build["max_num_tokens"]),
            gather_generation_logits=bool(build.get("gather_generation_logits", False)),
            paged_context_fmha=bool(plugins.get("use_paged_context_fmha", False)),
            vocab_size=pretrained.get("vocab_size"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a TensorRT-LLM engine config ({type(err).__name__}: {err})") from None
    if not info.gather_generation_logits:
        raise ValueError(f"the engine in {path.parent} was built without --gather_generation_logits: "
                         "it cannot return the logits a reward is read from; rebuild it with build-engine")
    return info
