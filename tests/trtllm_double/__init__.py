"""A contract double of the `tensorrt_llm` Triton model, and the test fixtures that stand it up.

Tests only: it lets the TensorRT-LLM ensembles run in a real tritonserver on a machine without a
GPU. Everything else in those tests is real: tritonserver, the Python backend, the fan-out step,
gRPC and HTTP.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from google.protobuf import text_format

from reward_server.builder.adapt import adapt_checkpoint
from reward_server.pipeline.trtllm.layout import EngineLayout
from reward_server.supervisor.options import MODEL_REPOSITORY
from reward_server.supervisor.repository import model_config

DOUBLE = Path(__file__).parent / "model.py"


def repository_with_double(dest: Path) -> Path:
    """A copy of the project's model repository whose `tensorrt_llm` model is the double: the
    checked-in config with `backend: "python"`, everything else unchanged."""
    shutil.copytree(MODEL_REPOSITORY, dest, ignore=shutil.ignore_patterns("__pycache__"))
    path = dest / "tensorrt_llm" / "config.pbtxt"
    config = model_config(path.parent)
    config.backend = "python"
    path.write_text(text_format.MessageToString(config))
    shutil.copy(DOUBLE, dest / "tensorrt_llm" / "1" / "model.py")
    return dest


def engine_dir_for(checkpoint: Path, dest: Path, max_input_len: int = 512, tp: int = 1, pp: int = 1,
                   reward_indices: str | None = None, **adapt) -> Path:
    """An engine directory as build-engine leaves it, minus the engines themselves: the adapted
    checkpoint (real adaptation; `adapt`: adapt_checkpoint's step_tag, step_labels) and a stand-in
    engine/config.json in trtllm-build's layout."""
    layout = EngineLayout(dest)
    adapt_checkpoint(checkpoint, layout.hf, reward_indices=reward_indices, **adapt)
    layout.engine.mkdir(parents=True)
    config = {"version": "stand-in", "pretrained_config": {
        "architecture": "LlamaForCausalLM", "dtype": "float32",
        "vocab_size": json.loads((checkpoint / "config.json").read_text())["vocab_size"],
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}},
        "build_config": {"max_input_len": max_input_len, "max_seq_len": max_input_len + 1, "max_batch_size": 64,
                         "max_num_tokens": 8192, "gather_generation_logits": True,
                         "plugin_config": {"use_paged_context_fmha": True}}}
    (layout.engine / "config.json").write_text(json.dumps(config, indent=2))
    return dest
