"""Render the runtime model repository: the checked-in configs, parsed as `ModelConfig` protobufs,
with the serve options applied as model parameters, checked against the checkpoint first.

The checked-in configs stay complete and valid; overrides are applied to the parsed protobufs and
written to a runtime directory, never by text templating.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reward_server.pipeline import settings
from reward_server.pipeline.heads import (detect_head_type, num_outputs, parse_indices, process_layout,
                                          step_tag_or_default)
from reward_server.pipeline.scoring import ScoreSpec, parse_floats
from reward_server.pipeline.torch_engine.checkpoint import check_checkpoint
from reward_server.supervisor import engines
from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.tritonserver import python_paths_module
from reward_server.supervisor.trtllm_engine import model_parameters as engine_parameters

ENGINE_MODEL = engines.ENGINES["torch"].step_model


def _check_outputs(k: int, score: ScoreSpec, names: list[str]) -> int:
    """K, after checking the attribute weights and names against it."""
    score.check(k)
    if names and len(names) != k:
        raise ValueError(f"{len(names)} attribute names given for a model with {k} outputs")
    return k


def _byte_limits(options: ServeOptions) -> dict[str, str]:
    return {settings.MAX_CONVERSATION_BYTES: str(options.max_conversation_bytes or ""),
            settings.MAX_REQUEST_BYTES: str(options.max_request_bytes or "")}


def model_parameters(options: ServeOptions, checkpoint: Path,
                     serving=None) -> tuple[dict[str, dict[str, str]], int]:
    """Per-model parameter overrides and K, checked against the checkpoint (or, for TensorRT-LLM,
    the opened engine directory `serving`).

    Raises:
        ValueError: inconsistent options (head, indices, weights, names, lengths).
    """
    names = [n.strip() for n in (options.attribute_names or "").split(",") if n.strip()]
    score = ScoreSpec(parse_floats(options.attribute_weights), options.score_mean, options.score_std)
    if serving is not None:
        process = serving.spec.head_type == "process"
        if process and (options.step_tag or options.step_labels):
            raise ValueError("the engine was built with its step tag and labels: they are set by build-engine "
                             "(--step-tag, --step-labels), not at serve time")
        steps = _step_options(options) if process else {}
        k = -1 if process else _check_outputs(serving.num_outputs, score, names)
        params = engine_parameters(serving, options.max_length, names, options.reward_indices)
        params["preprocessing"].update({settings.CHECKPOINT: str(checkpoint), settings.TRUNCATION: options.truncation,
                                        settings.CHAT_TEMPLATE: options.chat_template or "", **_byte_limits(options)})
        params["postprocessing"].update({settings.ATTRIBUTE_WEIGHTS: options.attribute_weights or "",
                                         settings.SCORE_MEAN: str(options.score_mean),
                                         settings.SCORE_STD: str(options.score_std), **steps})
        return params, k
    # what can be told without loading: one line now, not a model that fails in tritonserver later
    config = check_checkpoint(checkpoint, options.head_type)
    head = detect_head_type(config.get("architectures"), options.head_type)
    indices = parse_indices(options.reward_indices)
    steps = _step_parameters(options, config) if head == "process" else {}
    k = -1 if steps else _check_outputs(num_outputs(config, head, indices), score, names)  # -1: one per step
    cores = os.cpu_count() or 1
    threads = options.torch_threads or max(1, cores // max(1, options.instances))
    optional = lambda value: "" if value is None else str(value)  # noqa: E731
    params = {
        "preprocessing": {settings.CHECKPOINT: str(checkpoint), settings.MAX_LENGTH: optional(options.max_length),
                          settings.TRUNCATION: options.truncation, settings.STEP_TAG: steps.get(settings.STEP_TAG, ""),
                          settings.CHAT_TEMPLATE: options.chat_template or "", **_byte_limits(options)},
        ENGINE_MODEL: {settings.CHECKPOINT: str(checkpoint), settings.HEAD_TYPE: head,
                       settings.REWARD_INDICES: ",".join(map(str, indices)), settings.DEVICE: options.device,
                       settings.TORCH_THREADS: str(threads), settings.DTYPE: options.dtype,
                       settings.COMPILE: "true" if options.compile else "false",
                       settings.ATTENTION: options.attention, settings.STEP_TAG: steps.get(settings.STEP_TAG, ""),
                       settings.STEP_LABELS: steps.get(settings.STEP_LABELS, "")},
        "postprocessing": {settings.ATTRIBUTE_NAMES: ",".join(names or [f"reward_{i}" for i in range(k)]),
                           settings.STEP_AGGREGATE: steps.get(settings.STEP_AGGREGATE, ""),
                           settings.ATTRIBUTE_WEIGHTS: options.attribute_weights or "",
                           settings.SCORE_MEAN: str(options.score_mean),
                           settings.SCORE_STD: str(options.score_std)},
    }
    if options.token_budget:
        params[ENGINE_MODEL][settings.TOKEN_BUDGET] = str(options.token_budget)
    if options.min_shared_prefix is not None:
        params[ENGINE_MODEL][settings.MIN_SHARED_PREFIX] = str(options.min_shared_prefix)
    if options.prefix_cache_mb is not None:
        params[ENGINE_MODEL][settings.PREFIX_CACHE_MB] = f"{options.prefix_cache_mb:g}"
    # the engine's own queue (pipeline/scheduler.py); empty values keep its defaults
    params[ENGINE_MODEL].update({settings.MAX_QUEUE_SECONDS: optional(options.max_queue_seconds),
                                 settings.QUEUE_TIMEOUT_MS: optional(None if options.queue_timeout_us is None
                                                                     else options.queue_timeout_us // 1000),
                                 settings.MAX_QUEUE_SIZE: optional(options.max_queue_size)})
    return params, k


def _step_options(options: ServeOptions) -> dict[str, str]:
    """Postprocessing's parameters for a process reward model (either engine).

    Raises:
        ValueError: an unknown aggregate, or outcome-only options (attribute names or weights).
    """
    if options.attribute_names or options.attribute_weights:
        raise ValueError("a process reward model has one score per step: --attribute-names and "
                         "--attribute-weights do not apply (its score is --step-aggregate of the steps)")
    ScoreSpec(aggregate=options.step_aggregate)  # raises on an unknown rule
    return {settings.STEP_AGGREGATE: options.step_aggregate}


def _step_parameters(options: ServeOptions, config: dict) -> dict[str, str]:
    """A process reward model's step tag, labels and aggregate for the torch engine, checked before
    anything loads (the models check the tag and labels against the vocabulary when they load).

    Raises:
        ValueError: no tag where the model has no default one, a causal LM without its two labels,
            or what `_step_options` refuses.
    """
    architecture = (config.get("architectures") or [""])[0]
    steps = _step_options(options)
    tag = str(step_tag_or_default(architecture, options.step_tag))
    process_layout(architecture, options.step_labels)
    return {settings.STEP_TAG: tag, settings.STEP_LABELS: options.step_labels or "", **steps}


def render_repository(options: ServeOptions, checkpoint: Path, dest: Path, serving=None) -> Path:
    """Write the runtime model repository: the engine's models and the common ones, parsed configs
    with overrides, the ensembles' engine step pointing at the chosen engine, model files copied."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    params, k = model_parameters(options, checkpoint, serving)
    served = engines.served_models(options.engine)
    missing = [name for name in served if not (options.model_repository / name / "config.pbtxt").exists()]
    if missing:
        raise FileNotFoundError(f"model repository {options.model_repository} lacks {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for model_dir in (options.model_repository / name for name in served):
        config = model_config(model_dir)
        if config.platform == "ensemble":
            engines.wire_ensemble(config, options.engine)
        for key, value in params.get(config.name, {}).items():
            config.parameters[key].string_value = value
        if settings.DRAIN_DIR in config.parameters:
            config.parameters[settings.DRAIN_DIR].string_value = str(drain_dir(dest))
        for tensor in [*config.input, *config.output]:
            if tensor.name in ("rewards", "attributes"):
                tensor.dims[:] = [k]
        if config.name == engines.engine(options.engine).step_model:
            config.instance_group[0].count = options.instances
            if options.max_queue_delay_us is not None:
                config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
            if config.name != ENGINE_MODEL:  # the torch engine keeps its own queue (its parameters)
                _triton_queue_policy(config.dynamic_batching.default_queue_policy, options)
        shutil.copytree(model_dir, dest / model_dir.name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt"))
        (dest / model_dir.name / "config.pbtxt").write_text(text_format.MessageToString(config))
        if config.backend == "python":
            (dest / model_dir.name / "reward_server_paths.py").write_text(python_paths_module())
    return dest


def _triton_queue_policy(policy, options: ServeOptions) -> None:
    """Triton's queue policy (a `ModelQueuePolicy`, in place) from the queue options."""
    from tritonclient.grpc import model_config_pb2

    if options.max_queue_size is not None:
        policy.max_queue_size = options.max_queue_size
    if options.queue_timeout_us:
        policy.default_timeout_microseconds = options.queue_timeout_us
        policy.timeout_action = model_config_pb2.ModelQueuePolicy.REJECT
        policy.allow_timeout_override = True


def drain_dir(repository: Path) -> Path:
    """Where the launcher and the models of a runtime repository share the drain state."""
    return repository.parent / "drain"


def model_config(model_dir: Path):
    """A model directory's config.pbtxt, parsed (`ModelConfig`)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
