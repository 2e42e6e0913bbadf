"""Model-level settings: the `parameters` of each Triton model's config.pbtxt, in one place.

The checked-in configs carry defaults; `reward-server serve` overrides them by editing the
parsed protobuf (see `reward_server.supervisor.repository`). Inside Triton, each model.py turns its
parameters into a ready object with one call here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Parameter names, per model. Values are always strings in config.pbtxt.
CHECKPOINT = "checkpoint_dir"
MAX_LENGTH = "max_length"
TRUNCATION = "truncation"
CHAT_TEMPLATE = "chat_template"
MAX_CONVERSATION_BYTES = "max_conversation_bytes"
MAX_REQUEST_BYTES = "max_request_bytes"
DRAIN_DIR = "drain_dir"
HEAD_TYPE = "head_type"
REWARD_INDICES = "reward_indices"
DEVICE = "device"
TORCH_THREADS = "torch_threads"
TOKEN_BUDGET = "token_budget"
MIN_SHARED_PREFIX = "min_shared_prefix"
PREFIX_CACHE_MB = "prefix_cache_mb"
DTYPE = "dtype"
COMPILE = "compile"
ATTENTION = "attention"
STEP_TAG = "step_tag"
STEP_LABELS = "step_labels"
STEP_AGGREGATE = "step_aggregate"
ATTRIBUTE_NAMES = "attribute_names"
ATTRIBUTE_WEIGHTS = "attribute_weights"
SCORE_MEAN = "score_mean"
SCORE_STD = "score_std"
ENGINE_DIR = "engine_dir"
TENSORRT_LLM_MODEL = "tensorrt_llm_model"
PROMPT_FIRST = "prompt_first"
PERF_METRICS = "perf_metrics"
MAX_QUEUE_SECONDS = "max_queue_seconds"
QUEUE_TIMEOUT_MS = "queue_timeout_ms"
MAX_QUEUE_SIZE = "max_queue_size"
PIPELINE_MODEL = "pipeline_model"


def parameters_of(args: dict[str, Any]) -> dict[str, str]:
    """The string parameters of a model, from the `args` Triton passes to `initialize`."""
    config = json.loads(args["model_config"])
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def _checkpoint(params: dict[str, str]) -> str:
    path = params.get(CHECKPOINT, "")
    if not path:
        raise ValueError(f"parameter {CHECKPOINT} is empty: start the server with `reward-server serve "
                         f"--checkpoint DIR`, or set it in config.pbtxt")
    return path


def _number(params: dict[str, str], key: str, kind=int) -> int | float | None:
    """A numeric parameter (`kind` int or float), or None when empty."""
    value = params.get(key, "").strip()
    try:
        return kind(value) if value else None
    except ValueError:
        raise ValueError(f"parameter {key} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}") from None


def _flag(params: dict[str, str], key: str) -> bool:
    """A yes/no parameter: 1, true or yes (any case) is yes; absent or anything else is no."""
    return params.get(key, "").strip().lower() in ("1", "true", "yes")


def encoder_from_parameters(params: dict[str, str]):
    """The preprocessing model's `ChatEncoder`."""
    from reward_server.pipeline.chat import ChatEncoder

    return ChatEncoder.from_checkpoint(_checkpoint(params), max_length=_number(params, MAX_LENGTH),
                                       truncation=params.get(TRUNCATION) or "reject",
                                       chat_template=params.get(CHAT_TEMPLATE) or None,
                                       step_tag=params.get(STEP_TAG) or None)


def limits_from_parameters(params: dict[str, str]):
    """The preprocessing model's `InputLimits` (byte limits checked before parsing)."""
    from reward_server.pipeline.conversations import (DEFAULT_MAX_CONVERSATION_BYTES, DEFAULT_MAX_REQUEST_BYTES,
                                                      InputLimits)

    return InputLimits(_number(params, MAX_CONVERSATION_BYTES) or DEFAULT_MAX_CONVERSATION_BYTES,
                       _number(params, MAX_REQUEST_BYTES) or DEFAULT_MAX_REQUEST_BYTES)


def run_dir(params: dict[str, str]) -> str | None:
    """The run directory `reward-server serve` shares with the stubs (`drain_dir`: the drain's
    counters, the cancel board, the engine's load report), or None on the checked-in configs."""
    return params.get(DRAIN_DIR, "").strip() or None


def drain_from_parameters(params: dict[str, str]):
    """The `DrainState` shared with the launcher, or None when `drain_dir` is empty."""
    from reward_server.pipeline.drain import DrainState

    directory = run_dir(params)
    return DrainState(directory) if directory else None


def board_from_parameters(params: dict[str, str]):
    """The `CancelBoard` entry points mark gone clients on, or None when `drain_dir` is empty."""
    from reward_server.pipeline.deadlines import board_from_drain_dir

    return board_from_drain_dir(run_dir(params))


def load_publisher_from_parameters(params: dict[str, str], limits):
    """The engine's `admission.LoadPublisher` (rate and queue limit for the entry points), or None
    when `drain_dir` is empty."""
    from reward_server.pipeline.admission import LoadPublisher

    directory = run_dir(params)
    return LoadPublisher(directory, limits.max_queue_s) if directory else None


def queue_limits_from_parameters(params: dict[str, str]):
    """The engine queue's `QueueLimits`: `max_queue_seconds` (default 2), `queue_timeout_ms` (default
    five times that; 0 turns it off) and `max_queue_size` (requests; default none)."""
    from reward_server.pipeline.scheduler import DEFAULT_MAX_QUEUE_S, QUEUE_TIMEOUT_FACTOR, QueueLimits

    seconds = _number(params, MAX_QUEUE_SECONDS, float) or DEFAULT_MAX_QUEUE_S
    timeout_ms = _number(params, QUEUE_TIMEOUT_MS)
    timeout_s = (QUEUE_TIMEOUT_FACTOR * seconds if timeout_ms is None else
                 timeout_ms / 1000 if timeout_ms > 0 else None)
    return QueueLimits(max_queue_s=seconds, queue_timeout_s=timeout_s,
                       max_queue_requests=_number(params, MAX_QUEUE_SIZE))


def engine_from_parameters(params: dict[str, str]):
    """The engine model's `RewardEngine`."""
    from reward_server.pipeline.batching import DEFAULT_MIN_SHARED, DEFAULT_TOKEN_BUDGET
    from reward_server.pipeline.torch_engine.engine import RewardEngine

    min_shared = _number(params, MIN_SHARED_PREFIX)

    return RewardEngine.from_checkpoint(_checkpoint(params), head_type=params.get(HEAD_TYPE) or "auto",
                                        reward_indices=params.get(REWARD_INDICES) or None,
                                        device=params.get(DEVICE) or "auto",
                                        threads=_number(params, TORCH_THREADS),
                                        token_budget=_number(params, TOKEN_BUDGET) or DEFAULT_TOKEN_BUDGET,
                                        min_shared=DEFAULT_MIN_SHARED if min_shared is None else min_shared,
                                        dtype=params.get(DTYPE) or "auto",
                                        compile=_flag(params, COMPILE),
                                        attention=params.get(ATTENTION) or "auto",
                                        step_tag=params.get(STEP_TAG) or None,
                                        step_labels=params.get(STEP_LABELS) or None,
                                        prefix_cache_mb=_number(params, PREFIX_CACHE_MB, float))


def score_spec_from_parameters(params: dict[str, str]):
    """The postprocessing model's `ScoreSpec`."""
    from reward_server.pipeline.scoring import ScoreSpec, parse_floats

    return ScoreSpec(weights=parse_floats(params.get(ATTRIBUTE_WEIGHTS)),
                     mean=float(params.get(SCORE_MEAN) or 0.0), std=float(params.get(SCORE_STD) or 1.0),
                     aggregate=params.get(STEP_AGGREGATE) or None)


def fanout_from_parameters(params: dict[str, str]):
    """The TensorRT-LLM engine step's `FanOut`, from the engine directory's reward_head.json."""
    from reward_server.pipeline.trtllm.fanout import DEFAULT_PROMPT_FIRST, FanOut
    from reward_server.pipeline.trtllm.layout import EngineLayout

    engine_dir = params.get(ENGINE_DIR, "")
    if not engine_dir:
        raise ValueError(f"parameter {ENGINE_DIR} is empty: start the server with `reward-server serve --engine "
                         "tensorrt_llm --engine-dir DIR`, or set it in config.pbtxt")
    prompt_first = _number(params, PROMPT_FIRST)
    return FanOut.from_spec(EngineLayout(Path(engine_dir)).head_spec(),
                            DEFAULT_PROMPT_FIRST if prompt_first is None else prompt_first,
                            perf_metrics=_flag(params, PERF_METRICS))
