"""The checked-in model repository and the launcher's runtime rendering of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from reward_server.launcher import MODEL_REPOSITORY, ServeOptions, render_repository

MODELS = {"preprocessing", "reward_engine", "postprocessing", "reward", "reward_ids"}


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
                       "num_tokens": (model_config_pb2.TYPE_INT32, [1]), "truncated": (model_config_pb2.TYPE_BOOL, [1])}
    assert {o.name: (o.data_type, list(o.dims)) for o in configs["reward_ids"].output} == outputs
    assert configs["reward_engine"].input[0].allow_ragged_batch
    # each ensemble step names a model that exists
    for ensemble in (reward, configs["reward_ids"]):
        assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["preprocessing", "reward_engine",
                                                                            "postprocessing"]


def test_render_applies_overrides_to_parsed_configs(tmp_path, qwen_checkpoint):
    options = ServeOptions(checkpoint=qwen_checkpoint, reward_indices="1,2", attribute_weights="1,-1",
                           max_length=99, truncation="truncate_left", instances=2, max_queue_size=7)
    out = render_repository(options, Path(qwen_checkpoint), tmp_path / "models")
    engine = _parse(out / "reward_engine" / "config.pbtxt")
    assert engine.parameters["reward_indices"].string_value == "1,2"
    assert engine.parameters["head_type"].string_value == "lm_logits"
    assert engine.instance_group[0].count == 2
    assert engine.dynamic_batching.default_queue_policy.max_queue_size == 7
    assert list(engine.output[0].dims) == [2]
    pre = _parse(out / "preprocessing" / "config.pbtxt")
    assert pre.parameters["max_length"].string_value == "99"
    assert pre.parameters["truncation"].string_value == "truncate_left"
    assert pre.parameters["checkpoint_dir"].string_value == str(qwen_checkpoint)
    post = _parse(out / "postprocessing" / "config.pbtxt")
    assert post.parameters["attribute_names"].string_value == "reward_0,reward_1"
    assert [list(o.dims) for o in _parse(out / "reward" / "config.pbtxt").output if o.name == "attributes"] == [[2]]
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
