"""`reward-server build-engine`: input checks, the dry-run's steps and commands, and a run whose
TensorRT-LLM commands are replaced by a stand-in (no tensorrt_llm here) while the adaptation and
the rendering really run."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from reward_server.builder.build import BuildOptions, plan_build, run_build
from reward_server.pipeline.trtllm.layout import EngineLayout


def _config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def test_dry_run_prints_every_step_and_exact_command(demo_checkpoint, tmp_path):
    out = tmp_path / "engine"
    run = subprocess.run([sys.executable, "-m", "reward_server.cli", "build-engine", "--checkpoint",
                          str(demo_checkpoint), "--output", str(out), "--tp", "2", "--max-input-len", "1000",
                          "--max-num-tokens", "512", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("[")] == \
        ["[1] adapt", "[2] convert", "[3] build", "[4] render"]
    commands = [shlex.split(line.strip()[2:]) for line in text.splitlines() if line.strip().startswith("$ ")]
    convert, build = commands
    assert convert[1:4] == ["-m", "reward_server.builder.convert", "--hf"] and convert[4] == str(out / "hf")
    assert convert[convert.index("--tp") + 1] == "2" and convert[convert.index("--dtype") + 1] == "bfloat16"
    assert build[0] == "trtllm-build"
    flag = lambda name: build[build.index(name) + 1]  # noqa: E731
    assert flag("--checkpoint_dir") == str(out / "trtllm_checkpoint") and flag("--output_dir") == str(out / "engine")
    assert (flag("--max_input_len"), flag("--max_seq_len"), flag("--max_num_tokens")) == ("1000", "1001", "512")
    assert "--gather_generation_logits" in build and "--gather_context_logits" not in build
    assert flag("--use_paged_context_fmha") == "enable" and flag("--logits_dtype") == "float32"
    assert flag("--workers") == "2"
    assert "chunked context on" in text  # 1000-token prompts over a 512-token step
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize("change, options, message", [
    ({}, dict(tp=3), "--tp 3 does not divide the model's 4 attention heads"),
    ({"num_key_value_heads": 3, "num_attention_heads": 12}, dict(tp=4), "one must divide the other"),
    ({}, dict(pp=3), "--pp 3 does not divide the model's 2 layers"),
    ({}, dict(max_input_len=4096), "exceeds the model's 4096 positions"),
    ({"architectures": ["GPT2ForSequenceClassification"]}, {}, "GPT2ForSequenceClassification is not supported"),
    ({}, dict(dtype="fp8"), "--dtype fp8 calibrates on data"),
    ({}, dict(dtype="int4"), "--dtype must be one of"),
    ({}, dict(pp=2), "--pp 2: pipeline parallelism is refused until a GPU run"),
])
def test_inputs_are_checked_before_anything_runs(demo_checkpoint, tmp_path, change, options, message):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(_config(demo_checkpoint) | change))
    with pytest.raises(ValueError, match=message):
        plan_build(BuildOptions(checkpoint=checkpoint, output=tmp_path / "out", **options))


def test_causal_lm_checkpoint_is_converted_as_it_is(qwen_checkpoint, tmp_path):
    plan = plan_build(BuildOptions(checkpoint=qwen_checkpoint, output=tmp_path / "e", reward_indices="0,3,5"))
    assert plan.hf_checkpoint == Path(qwen_checkpoint).resolve()
    assert plan.steps[1].command[plan.steps[1].command.index("--hf") + 1] == str(Path(qwen_checkpoint).resolve())
    assert "QWenForCausalLM" in plan.render()


def test_build_runs_the_steps_in_order_and_renders_a_repository(demo_checkpoint, tmp_path):
    out = tmp_path / "engine"
    ran = []

    def stand_in(command):  # stands in for TensorRT-LLM's converter and trtllm-build
        ran.append(command)
        if command[0] == "trtllm-build":
            assert (out / "hf" / "reward_head.json").exists()  # adapted before conversion
            engine = Path(command[command.index("--output_dir") + 1])
            engine.mkdir(parents=True)
            (engine / "config.json").write_text(json.dumps({
                "pretrained_config": {"mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}},
                "build_config": {"max_input_len": int(command[command.index("--max_input_len") + 1]),
                                 "max_seq_len": 301, "max_batch_size": 8, "max_num_tokens": 8192,
                                 "gather_generation_logits": "--gather_generation_logits" in command,
                                 "plugin_config": {"use_paged_context_fmha": True}}}))

    plan = plan_build(BuildOptions(checkpoint=demo_checkpoint, output=out, max_input_len=300))
    assert run_build(plan, runner=stand_in) == out.resolve()
    assert [c[0] for c in ran] == [sys.executable, "trtllm-build"]
    layout = EngineLayout(out)
    assert layout.head_spec().pooling == "last_non_pad" and layout.head_spec().architecture == "LlamaForCausalLM"
    config = text_format.Parse((layout.model_repository / "tensorrt_llm" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.parameters["gpt_model_path"].string_value == str(layout.engine.resolve())
    assert sorted(p.name for p in layout.model_repository.iterdir()) == \
        ["postprocessing", "preprocessing", "reward", "reward_engine_trtllm", "reward_ids", "reward_ids_pipeline",
         "reward_pipeline", "reward_text", "reward_text_pipeline", "tensorrt_llm"]
    pre = text_format.Parse((layout.model_repository / "preprocessing" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert pre.parameters["max_length"].string_value == "300"
    record = json.loads(layout.build_record.read_text())
    assert [s["name"] for s in record["steps"]] == ["adapt", "convert", "build", "render"]
    with pytest.raises(ValueError, match="already holds an engine; use --force"):
        plan_build(BuildOptions(checkpoint=demo_checkpoint, output=out))
    assert plan_build(BuildOptions(checkpoint=demo_checkpoint, output=out, force=True))


def test_real_build_without_tensorrt_llm_fails_clearly(demo_checkpoint, tmp_path):
    run = subprocess.run([sys.executable, "-m", "reward_server.cli", "build-engine", "--checkpoint",
                          str(demo_checkpoint), "--output", str(tmp_path / "e")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    assert "tensorrt_llm and trtllm-build are needed" in run.stderr and "--dry-run" in run.stderr


def test_converter_needs_tensorrt_llm_and_a_supported_architecture():
    from reward_server.builder.convert import converter_class

    with pytest.raises(ValueError, match="no TensorRT-LLM converter for GPT2LMHeadModel"):
        converter_class("GPT2LMHeadModel")
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None:  # this machine: no TensorRT-LLM
        with pytest.raises(ImportError):
            converter_class("LlamaForCausalLM")
    else:  # a GPU host
        assert converter_class("LlamaForCausalLM").__name__ == "LLaMAForCausalLM"


def _dataset(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, message", [
    (None, "nothing is there"),
    ({}, "has no data files"),
    ({"test.jsonl": '{"text": "a"}\n', "validation.csv": "text\nb\n"}, "has no train split"),
    ({"train.jsonl": '{"prompt": "a"}\n'}, "train.jsonl has no `text` column"),
    ({"data/train-00000.csv": "prompt,label\na,1\n"}, "has no `text` column"),
])
def test_fp8_calibration_data_is_checked_before_the_model_loads(demo_checkpoint, tmp_path, files, message):
    """TensorRT-LLM reads load_dataset(dir, split="train")["text"], after loading the whole model."""
    data = tmp_path / "calib"
    if files is not None:
        _dataset(data, files)
    with pytest.raises(ValueError, match=message):
        plan_build(BuildOptions(checkpoint=demo_checkpoint, output=tmp_path / "out", dtype="fp8", calib_dataset=data))


@pytest.mark.parametrize("files", [
    {"train.jsonl": '{"text": "hello", "id": 1}\n'},
    {"part1.csv": "id,text\n1,hello\n", "notes.txt": "line\n"},   # no split names: all train
    {"corpus.txt": "one line\nanother\n", "test.jsonl": '{"other": 1}\n'},  # only train files are read
    {"train.json": '[{"text": "a"}, {"text": "b"}]'},
])
def test_fp8_calibration_data_that_tensorrt_llm_reads_is_accepted(demo_checkpoint, tmp_path, files):
    data = _dataset(tmp_path / "calib", files)
    plan = plan_build(BuildOptions(checkpoint=demo_checkpoint, output=tmp_path / "out", dtype="fp8",
                                   calib_dataset=data))
    convert = next(step for step in plan.steps if step.name == "convert").command
    assert convert[convert.index("--calib-dataset") + 1] == str(data.resolve())


def test_fp8_calibration_refuses_names_tensorrt_llm_routes_to_the_hub(demo_checkpoint, tmp_path):
    data = _dataset(tmp_path / "my_cnn_dailymail", {"train.jsonl": '{"text": "a"}\n'})
    with pytest.raises(ValueError, match="read by TensorRT-LLM as that hub dataset"):
        plan_build(BuildOptions(checkpoint=demo_checkpoint, output=tmp_path / "out", dtype="fp8", calib_dataset=data))


def test_pipeline_parallelism_only_for_the_gpu_check(demo_checkpoint, tmp_path, monkeypatch):
    run = subprocess.run([sys.executable, "-m", "reward_server.cli", "build-engine", "--checkpoint",
                          str(demo_checkpoint), "--output", str(tmp_path / "e"), "--pp", "2", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "use --tp instead" in run.stderr + run.stdout
    monkeypatch.setenv("REWARD_SERVER_UNVERIFIED_PP", "1")
    plan = plan_build(BuildOptions(checkpoint=demo_checkpoint, output=tmp_path / "e", pp=2))
    assert "tp 1 x pp 2 = 2 GPU(s)" in plan.render()


def test_gemma2_is_built_within_its_window_and_gemma3_is_refused(tmp_path):
    """Gemma-2 builds (its converter, inputs bounded by the sliding window this path does not set in
    the engine: a longer --max-input-len is refused); Gemma-3 is refused with the reason."""
    from reward_server.supervisor.demo_checkpoint import build_checkpoint

    gemma2 = build_checkpoint(tmp_path / "gemma2", "tiny", arch="gemma2", seed=1)
    plan = plan_build(BuildOptions(checkpoint=gemma2, output=tmp_path / "engine"))
    assert plan.max_input_len == 31  # the demo's window is 32 tokens
    with pytest.raises(ValueError, match="exceeds the model's sliding window of 32 tokens"):
        plan_build(BuildOptions(checkpoint=gemma2, output=tmp_path / "engine", max_input_len=100))
    gemma3 = build_checkpoint(tmp_path / "gemma3", "tiny", arch="gemma3", seed=1)
    with pytest.raises(ValueError, match="Gemma3TextForSequenceClassification: the TensorRT-LLM path builds Gemma-2 "
                                         "only"):
        plan_build(BuildOptions(checkpoint=gemma3, output=tmp_path / "engine"))


def test_a_failed_step_says_why_in_one_line(capsys):
    """A build command's output is streamed, and its failure carries the line that says why."""
    from reward_server.builder.build import StepFailed, error_line, run_step

    command = [sys.executable, "-c", "print('loading weights'); import sys; "
               "print('warning: an error count of 0 is fine'); raise ValueError('no converter for FooForCausalLM')"]
    with pytest.raises(StepFailed) as failed:
        run_step(command)
    assert failed.value.reason == "ValueError: no converter for FooForCausalLM"
    assert failed.value.returncode == 1 and failed.value.cmd == command
    assert "loading weights" in capsys.readouterr().out
    assert error_line(["[TRT] [E] 1: engine build error: out of memory", "done"]) == \
        "[TRT] [E] 1: engine build error: out of memory"
    assert error_line(["just this"]) == "just this" and error_line([]) is None
