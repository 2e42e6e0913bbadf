"""The engine directory that `reward-server build-engine` writes and `serve --engine tensorrt_llm` reads.

    DIR/
      hf/                  the Hugging Face CausalLM checkpoint to convert (the adapted one for a
                           sequence-classification model) and reward_head.json, what the logits mean
      trtllm_checkpoint/   TensorRT-LLM's converter output: config.json, rank{N}.safetensors
      engine/              trtllm-build's output: config.json, rank{N}.engine
      model_repository/    a rendered Triton model repository pointing at engine/ (for a stock
                           tritonserver; `reward-server serve` renders its own runtime copy)
      build.json           the build plan that was run, for the record

One reader of the engine's config.json lives here too, so the launcher and the builder agree on
tensor parallelism and the size limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reward_server.trtllm.adapt import RewardHeadSpec


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
