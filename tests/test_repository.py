"""The checked-in model repository and the launcher's runtime rendering of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from reward_server.pipeline.trtllm.fanout import FanOut, REQUESTED_OUTPUTS
from reward_server.supervisor import engines
from reward_server.supervisor.options import MODEL_REPOSITORY, ServeOptions
from reward_server.supervisor.repository import render_repository

ENTRY_POINTS = ("reward", "reward_ids", "reward_text")
MODELS = {"preprocessing", "reward_engine", "postprocessing", *ENTRY_POINTS,
          *(f"{name}_pipeline" for name in ENTRY_POINTS), "reward_engine_trtllm", "tensorrt_llm"}
_NUMPY_TYPES = {"int32": model_config_pb2.TYPE_INT32, "bool": model_config_pb2.TYPE_BOOL}


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_checked_in_configs_parse_and_match_the_wire_contract():
    configs = {p.parent.name: _parse(p) for p in MODEL_REPOSITORY.glob("*/config.pbtxt")}
    assert set(configs) == MODELS
    for name, config in configs.items():
        assert config.name == name and config.max_batch_size > 0
        assert "${" not in (MODEL_REPOSITORY / name / "config.pbtxt").read_text()
    reward = configs["reward"]
    assert [(i.name, i.data_type, list(i.dims)) for i in reward.input] == [("messages", model_config_pb2.TYPE_STRING, [1])]
    outputs = {o.name: (o.data_type, list(o.dims)) for o in reward.output}
    assert outputs == {"score": (model_config_pb2.TYPE_FP32, [1]), "attributes": (model_config_pb2.TYPE_FP32, [-1]),
                       "num_steps": (model_config_pb2.TYPE_INT32, [1]),
                       "num_tokens": (model_config_pb2.TYPE_INT32, [1]), "truncated": (model_config_pb2.TYPE_BOOL, [1])}
    assert {o.name: (o.data_type, list(o.dims)) for o in configs["reward_ids"].output} == outputs
    assert {o.name: (o.data_type, list(o.dims)) for o in configs["reward_text"].output} == outputs
    assert [(i.name, i.data_type, list(i.dims)) for i in configs["reward_text"].input] == \
        [("text", model_config_pb2.TYPE_STRING, [1])]
    assert configs["reward_engine"].input[0].allow_ragged_batch
    # each entry point is a Python model in front of its ensemble, with the ensemble's inputs and outputs
    for name in ENTRY_POINTS:
        entry, ensemble = configs[name], configs[f"{name}_pipeline"]
        assert entry.backend == "python" and ensemble.platform == "ensemble"
        assert entry.parameters["pipeline_model"].string_value == ensemble.name
        assert _tensors(entry, "input") == _tensors(ensemble, "input")
        assert _tensors(entry, "output") == _tensors(ensemble, "output")
        assert entry.max_batch_size == ensemble.max_batch_size
        assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["preprocessing", "reward_engine",
                                                                            "postprocessing"]
    trtllm = configs["tensorrt_llm"]
    assert trtllm.backend == "tensorrtllm" and not trtllm.model_transaction_policy.decoupled
    assert trtllm.parameters["gpt_model_type"].string_value == "inflight_fused_batching"
    assert trtllm.parameters["enable_kv_cache_reuse"].string_value == "true"


def _tensors(config, kind):
    return {t.name: (t.data_type, list(t.dims)) for t in getattr(config, kind)}


@pytest.mark.parametrize("engine", sorted(engines.ENGINES))
def test_ensemble_wiring_is_consistent_for_each_engine(engine):
    """Every tensor an ensemble step maps exists on both sides, with the same type and dims."""
    configs = {p.parent.name: _parse(p) for p in MODEL_REPOSITORY.glob("*/config.pbtxt")}
    for name in ENTRY_POINTS:
        ensemble = configs[f"{name}_pipeline"]
        engines.wire_ensemble(ensemble, engine)
        produced = _tensors(ensemble, "input")  # ensemble tensor -> (type, dims)
        steps = [s.model_name for s in ensemble.ensemble_scheduling.step]
        assert steps[1] == engines.ENGINES[engine].step_model and set(steps) <= set(engines.served_models(engine))
        for step in ensemble.ensemble_scheduling.step:
            model = configs[step.model_name]
            inputs, outputs = _tensors(model, "input"), _tensors(model, "output")
            for model_input, tensor in step.input_map.items():
                assert model_input in inputs, f"{name}: {step.model_name} has no input {model_input}"
                assert produced[tensor] == inputs[model_input], f"{name}: {tensor} -> {step.model_name}.{model_input}"
            required = {t.name for t in model.input if not t.optional}
            assert required <= set(step.input_map), f"{name}: {step.model_name} misses {required - set(step.input_map)}"
            for model_output, tensor in step.output_map.items():
                assert model_output in outputs, f"{name}: {step.model_name} has no output {model_output}"
                produced[tensor] = outputs[model_output]
        for output, spec in _tensors(ensemble, "output").items():
            assert produced[output] == spec, f"{name}: public output {output}"


def test_fanout_requests_match_the_tensorrt_llm_model_interface():
    """What reward_engine_trtllm sends and asks for is what the tensorrt_llm config declares."""
    trtllm = _parse(MODEL_REPOSITORY / "tensorrt_llm" / "config.pbtxt")
    inputs, outputs = _tensors(trtllm, "input"), _tensors(trtllm, "output")
    request = FanOut((0,), "last_non_pad", 7).request([1, 5, 9, 7])
    for name, array in request.items():
        assert name in inputs and _NUMPY_TYPES[array.dtype.name] == inputs[name][0], name
        assert array.shape[0] == 1  # batch size 1: the backend refuses more when not decoupled
    assert {t.name for t in trtllm.input if not t.optional} <= set(request)
    from reward_server.pipeline.trtllm.fanout import stop_request

    for name, array in stop_request().items():  # a client went: the in-flight request is stopped by id
        assert name in inputs and _NUMPY_TYPES[array.dtype.name] == inputs[name][0] and array.shape[0] == 1, name
    assert set(REQUESTED_OUTPUTS) <= set(outputs)
    assert outputs["generation_logits"] == (model_config_pb2.TYPE_FP32, [-1, -1, -1])
    with_metrics = FanOut((0,), "last", 7, perf_metrics=True)
    assert set(with_metrics.request([1, 2])) - set(request) == {"return_perf_metrics"}
    assert inputs["return_perf_metrics"][0] == model_config_pb2.TYPE_BOOL
    for name in set(with_metrics.requested_outputs) - set(REQUESTED_OUTPUTS):
        assert outputs[name] == (model_config_pb2.TYPE_INT32, [1]), name


def test_tensorrt_llm_config_has_every_parameter_the_backend_cannot_do_without():
    """The backend reads these with no default; without one the model fails to load (on every rank)."""
    from reward_server.supervisor.trtllm_engine import UNGUARDED_PARAMETERS, missing_parameters

    config = _parse(MODEL_REPOSITORY / "tensorrt_llm" / "config.pbtxt")
    assert missing_parameters(config.parameters) == []
    for name in UNGUARDED_PARAMETERS[1:]:  # the guided-decoding ones: empty turns the feature off
        assert config.parameters[name].string_value == ""
    assert config.parameters["gpt_model_type"].string_value == "inflight_fused_batching"
    del config.parameters["tokenizer_dir"]
    assert missing_parameters(config.parameters) == ["tokenizer_dir"]
    trtllm_step = _parse(MODEL_REPOSITORY / "reward_engine_trtllm" / "config.pbtxt")
    assert trtllm_step.parameters["perf_metrics"].string_value == "true"


def test_render_applies_overrides_to_parsed_configs(tmp_path, qwen_checkpoint):
    options = ServeOptions(checkpoint=qwen_checkpoint, reward_indices="1,2", attribute_weights="1,-1",
                           max_length=99, truncation="truncate_left", instances=2, max_queue_size=7,
                           queue_timeout_us=2_500_000, max_queue_seconds=1.5)
    out = render_repository(options, Path(qwen_checkpoint), tmp_path / "models")
    engine = _parse(out / "reward_engine" / "config.pbtxt")
    assert engine.parameters["reward_indices"].string_value == "1,2"
    assert engine.parameters["head_type"].string_value == "lm_logits"
    assert engine.instance_group[0].count == 2
    # the torch engine's own queue (pipeline/scheduler.py) takes the queue options; Triton's is left alone
    assert engine.parameters["max_queue_size"].string_value == "7"
    assert engine.parameters["queue_timeout_ms"].string_value == "2500"
    assert engine.parameters["max_queue_seconds"].string_value == "1.5"
    assert engine.dynamic_batching.default_queue_policy.max_queue_size == 0
    assert engine.parameters["drain_dir"].string_value == str(out.parent / "drain")
    for name in ENTRY_POINTS:
        assert _parse(out / name / "config.pbtxt").parameters["drain_dir"].string_value == str(out.parent / "drain")
    assert list(engine.output[0].dims) == [2]
    pre = _parse(out / "preprocessing" / "config.pbtxt")
    assert pre.parameters["max_length"].string_value == "99"
    assert pre.parameters["truncation"].string_value == "truncate_left"
    assert pre.parameters["checkpoint_dir"].string_value == str(qwen_checkpoint)
    post = _parse(out / "postprocessing" / "config.pbtxt")
    assert post.parameters["attribute_names"].string_value == "reward_0,reward_1"
    assert [list(o.dims) for o in _parse(out / "reward" / "config.pbtxt").output if o.name == "attributes"] == [[2]]
    assert [list(o.dims) for o in _parse(out / "reward_pipeline" / "config.pbtxt").output
            if o.name == "attributes"] == [[2]]
    assert (out / "reward_engine" / "1" / "model.py").exists()
    assert "sys.path" in (out / "reward_engine" / "reward_server_paths.py").read_text()


@pytest.mark.parametrize("kwargs, message", [
    (dict(attribute_weights="1,2"), "2 attribute weights given for a model with 1 outputs"),
    (dict(attribute_names="a,b"), "2 attribute names given for a model with 1 outputs"),
    (dict(head_type="nonsense"), "head_type must be one of"),
])
def test_render_rejects_inconsistent_options(tmp_path, demo_checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_repository(ServeOptions(checkpoint=demo_checkpoint, **kwargs), Path(demo_checkpoint), tmp_path)
