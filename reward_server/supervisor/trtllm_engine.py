"""What `reward-server serve --engine tensorrt_llm --engine-dir DIR` adds to the launcher.

It reads the engine directory (reward head metadata, the engine's size limits and parallelism),
turns them into the models' parameters, and checks the host before anything starts, so that a
missing backend, too few GPUs or a missing mpirun fail in one clear sentence rather than in a
tritonserver log.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from reward_server.pipeline import settings
from reward_server.pipeline.trtllm.layout import EngineInfo, EngineLayout, RewardHeadSpec, read_engine_info
from reward_server.supervisor.engines import TENSORRT_LLM_MODEL
from reward_server.supervisor.mpi import find_mpirun

BACKEND = "tensorrtllm"
# Parameters the backend reads with no default (model_instance_state.cc: gpt_model_type, and the
# guided-decoding three): a config without one fails to load, "Cannot find parameter with name: ...".
UNGUARDED_PARAMETERS = ("gpt_model_type", "tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend")
# Where tritonserver looks for backends unless told otherwise (NGC containers).
DEFAULT_BACKEND_DIR = Path("/opt/tritonserver/backends")


@dataclass(frozen=True)
class EngineServing:
    """A built engine directory, read and checked for serving."""

    layout: EngineLayout
    spec: RewardHeadSpec
    info: EngineInfo
    world_size: int

    @property
    def tokenizer_checkpoint(self) -> Path:
        """The Hugging Face directory whose tokenizer and chat template preprocessing uses."""
        return Path(self.spec.hf_checkpoint)

    @property
    def num_outputs(self) -> int:
        """K, the raw reward outputs (for a process reward model: its two label logits per step)."""
        return len(self.spec.reward_indices)


def open_engine(engine_dir: str | Path | None, world_size: int | None = None) -> EngineServing:
    """Read an engine directory made by `reward-server build-engine`.

    Raises:
        ValueError: no engine directory given, invalid metadata, or a world size other than the
            engine's tp x pp.
        FileNotFoundError: the directory or its engine is missing.
    """
    if not engine_dir:
        raise ValueError("--engine tensorrt_llm needs --engine-dir DIR, a directory made by "
                         "`reward-server build-engine`")
    layout = EngineLayout(Path(engine_dir).resolve())
    if not layout.root.is_dir():
        raise FileNotFoundError(f"engine directory {layout.root} does not exist")
    spec = layout.head_spec()
    info = read_engine_info(layout.engine)
    if world_size is not None and world_size != info.world_size:
        raise ValueError(f"--world-size {world_size} does not match the engine, built for tp {info.tp_size} x "
                         f"pp {info.pp_size} = {info.world_size} GPUs")
    return EngineServing(layout, spec, info, info.world_size)


def model_parameters(serving: EngineServing, max_length: int | None, attribute_names: list[str],
                     reward_indices: str | None) -> dict[str, dict[str, str]]:
    """Parameters of the engine models, and the length limit and names the others need.

    Raises:
        ValueError: a max length above the engine's, or reward indices other than the built ones.
    """
    info, spec = serving.info, serving.spec
    if max_length is not None and max_length > info.max_input_len:
        raise ValueError(f"--max-length {max_length} exceeds the engine's max_input_len {info.max_input_len}; "
                         "rebuild the engine with a larger --max-input-len")
    if reward_indices and [int(i) for i in reward_indices.split(",") if i.strip()] != spec.reward_indices:
        raise ValueError(f"the engine was built to read logits {spec.reward_indices}; --reward-indices cannot "
                         "change that at serve time (rebuild with build-engine --reward-indices)")
    process = spec.head_type == "process"
    names = [] if process else attribute_names or spec.attribute_names
    return {
        "preprocessing": {settings.CHECKPOINT: str(serving.tokenizer_checkpoint),
                          settings.MAX_LENGTH: str(max_length or info.max_input_len),
                          settings.STEP_TAG: str(spec.step_tag_id) if process else ""},
        "reward_engine_trtllm": {settings.ENGINE_DIR: str(serving.layout.root),
                                 settings.TENSORRT_LLM_MODEL: TENSORRT_LLM_MODEL},
        TENSORRT_LLM_MODEL: {"gpt_model_path": str(serving.layout.engine),
                             # chunked context needs paged context FMHA in the engine
                             "enable_chunked_context": "true" if info.paged_context_fmha else "false"},
        "postprocessing": {settings.ATTRIBUTE_NAMES: ",".join(names)},
    }


def gpu_count() -> int:
    """GPUs that `nvidia-smi -L` lists (0 without a driver)."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def missing_parameters(parameters) -> list[str]:
    """The `UNGUARDED_PARAMETERS` absent from a `tensorrt_llm` config's parameters (a mapping)."""
    return [name for name in UNGUARDED_PARAMETERS if name not in parameters]


def check_host(serving: EngineServing, backend: str, bundled_server: bool, backend_dir: Path | None = None,
               parameters=None) -> None:
    """Fail before starting when this host cannot run the engine, or the rendered `tensorrt_llm`
    config (its `parameters`, when given) would not load.

    `backend` is the rendered `tensorrt_llm` model's backend: the checks apply to the real
    `tensorrtllm` backend only (tests stand a contract double with the same interface in its place,
    which refuses a config lacking a parameter on its own, as the backend does at load).

    Raises:
        ValueError: a parameter the backend cannot do without is missing.
        FileNotFoundError: no tensorrtllm backend, or no mpirun for a world size above 1.
        RuntimeError: fewer GPUs than the engine's world size.
    """
    if backend != BACKEND:
        return
    missing = missing_parameters(parameters) if parameters is not None else []
    if missing:
        raise ValueError(f"the tensorrt_llm model's config.pbtxt lacks the parameter(s) {', '.join(missing)}, which "
                         "the tensorrtllm backend reads without a default: it would fail to load. Add them (an empty "
                         "string_value turns the feature off), as model_repository/tensorrt_llm/config.pbtxt does")
    if bundled_server:
        raise FileNotFoundError("the tritonserver found is the one bundled with nvidia-pytriton, which has no "
                                "tensorrtllm backend: run in the NGC TensorRT-LLM container (see docs/gpu.md)")
    backends = backend_dir or DEFAULT_BACKEND_DIR
    if not (backends / BACKEND).is_dir():
        raise FileNotFoundError(f"no tensorrtllm backend in {backends}: run in the NGC TensorRT-LLM container "
                                "(see docs/gpu.md)")
    gpus = gpu_count()
    if gpus < serving.world_size:
        raise RuntimeError(f"the engine needs {serving.world_size} GPU(s) (tp {serving.info.tp_size} x pp "
                           f"{serving.info.pp_size}); nvidia-smi lists {gpus}")
    if serving.world_size > 1:
        find_mpirun()
