"""`reward-server build-engine`: from a Hugging Face reward checkpoint to a servable engine directory.

Four steps, each printed with its exact command by `--dry-run` (which needs no tensorrt_llm):
1. adapt   the reward head: a sequence classifier becomes the equivalent causal LM (streamed);
2. convert with TensorRT-LLM's own converter (its Python API), one checkpoint per tp x pp rank;
3. build   with `trtllm-build`: generation logits gathered (the reward is read from them), paged
           context FMHA (needed for KV-cache reuse and chunked context), the size limits;
4. render  a Triton model repository pointing at the engine.
The inputs are checked before anything runs: architecture, tp against the attention heads, pp
against the layers, lengths against the model's positions.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from reward_server.builder.calibration import HELP, check_calibration_dataset
from reward_server.pipeline.heads import process_layout, step_tag_or_default
from reward_server.pipeline.trtllm.layout import EngineLayout

_LOGGER = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "fp8")
# Hugging Face causal-LM architectures whose TensorRT-LLM 1.2 converter this path uses
# (tensorrt_llm.models class names); a classifier is first adapted to the causal LM of its family.
CONVERTERS = {"LlamaForCausalLM": "LLaMAForCausalLM", "MistralForCausalLM": "LLaMAForCausalLM",
              "Qwen2ForCausalLM": "QWenForCausalLM", "Gemma2ForCausalLM": "GemmaForCausalLM"}
# Families TensorRT-LLM converts whose reward models this path still cannot build, and why.
UNBUILDABLE = {
    family: "the TensorRT-LLM path builds Gemma-2 only: TensorRT-LLM 1.2's Gemma converter ties the LM head to "
            "the embedding table, so the score rows ride in reserved-token embedding rows, and for this family "
            "that is not verified; serve it with the torch engine (reward-server serve --checkpoint DIR), which "
            "computes it exactly"
    for family in ("GemmaForCausalLM", "Gemma3ForCausalLM", "Gemma3TextForCausalLM")
}
DEFAULT_MAX_INPUT_LEN = 4096
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_NUM_TOKENS = 8192
TOKENS_PER_BLOCK = 32  # KV-cache block: reuse of shared prompts happens in whole blocks
# Lets build-engine accept --pp > 1, for bench/gpu_check.sh's stage that verifies it on 2 GPUs.
UNVERIFIED_PP_ENV = "REWARD_SERVER_UNVERIFIED_PP"


@dataclass
class BuildOptions:
    """What `build-engine` builds. Lengths of None take the model's (capped) defaults."""

    checkpoint: Path
    output: Path
    tp: int = 1
    pp: int = 1
    dtype: str = "bfloat16"
    max_input_len: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS
    head_type: str = "auto"
    reward_indices: str | None = None
    step_tag: str | None = None       # process reward models (see reward_server.builder.adapt)
    step_labels: str | None = None
    calib_dataset: Path | None = None
    force: bool = False


@dataclass
class Step:
    """One build step: a command to run, or work done in this process (command None)."""

    name: str
    description: str
    command: list[str] | None = None

    def render(self, number: int) -> str:
        """The step as printed by --dry-run."""
        text = f"[{number}] {self.name}: {self.description}"
        return text + (f"\n    $ {shlex.join(self.command)}" if self.command else "")


@dataclass
class BuildPlan:
    """The checked inputs and every step, before anything runs."""

    options: BuildOptions
    architecture: str
    causal_architecture: str
    head_type: str
    hf_checkpoint: Path
    max_input_len: int
    chunked_context: bool
    steps: list[Step] = field(default_factory=list)

    @property
    def layout(self) -> EngineLayout:
        """The engine directory being written."""
        return EngineLayout(self.options.output)

    def render(self) -> str:
        """Human-readable plan: the checks that passed and each step with its command."""
        o = self.options
        lines = [f"build-engine plan for {o.checkpoint}",
                 f"  model     {self.architecture} -> {self.causal_architecture} ({self.head_type}), "
                 f"converter tensorrt_llm.models.{CONVERTERS[self.causal_architecture]}",
                 f"  parallel  tp {o.tp} x pp {o.pp} = {o.tp * o.pp} GPU(s); dtype {o.dtype}",
                 f"  limits    max_input_len {self.max_input_len}, max_batch_size {o.max_batch_size}, "
                 f"max_num_tokens {o.max_num_tokens}, chunked context {'on' if self.chunked_context else 'off'}",
                 f"  output    {o.output}"]
        lines += [step.render(n) for n, step in enumerate(self.steps, 1)]
        return "\n".join(lines)


def _read_config(checkpoint: Path) -> dict:
    path = checkpoint / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)")
    config = json.loads(path.read_text())
    return config.get("text_config", config) | {"architectures": config.get("architectures")}


def check_inputs(options: BuildOptions, config: dict) -> tuple[str, str, str, int]:
    """Check the checkpoint and options against each other, without tensorrt_llm.

    Returns:
        (architecture, causal-LM architecture to convert, head type, max_input_len).

    Raises:
        ValueError: unsupported architecture or dtype, tp/pp that do not divide the model,
            lengths beyond the model's positions, fp8 without calibration data that TensorRT-LLM
            can read, pp above 1 (unverified).
    """
    architecture = (config.get("architectures") or ["<none>"])[0]
    from reward_server.builder.adapt import engine_head  # safetensors, loaded when a build is checked

    head = engine_head(config.get("architectures"), options.head_type)
    if head == "process":  # the tag is looked up in the vocabulary when the checkpoint is adapted
        step_tag_or_default(architecture, options.step_tag)
        process_layout(architecture, options.step_labels)
    family = architecture.removesuffix("ForSequenceClassification").removesuffix("ForTokenClassification")
    causal = family.removesuffix("ForCausalLM") + "ForCausalLM"
    if causal in UNBUILDABLE:
        raise ValueError(f"{architecture}: {UNBUILDABLE[causal]}")
    if causal not in CONVERTERS:
        raise ValueError(f"{architecture} is not supported by the TensorRT-LLM path; supported: "
                         f"{', '.join(sorted(CONVERTERS))} and their *ForSequenceClassification and "
                         "*ForTokenClassification reward models")
    if options.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.tp < 1 or options.pp < 1:
        raise ValueError(f"--tp and --pp must be at least 1, got tp {options.tp}, pp {options.pp}")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    layers = int(config["num_hidden_layers"])
    if heads % options.tp:
        raise ValueError(f"--tp {options.tp} does not divide the model's {heads} attention heads")
    if kv_heads % options.tp and options.tp % kv_heads:
        raise ValueError(f"--tp {options.tp} and the model's {kv_heads} key/value heads: one must divide the other")
    if layers % options.pp:
        raise ValueError(f"--pp {options.pp} does not divide the model's {layers} layers")
    positions = int(config.get("max_position_embeddings") or 0)
    window = None if config.get("use_sliding_window") is False else config.get("sliding_window")
    limits = [DEFAULT_MAX_INPUT_LEN] + [n - 1 for n in (positions, window) if n]
    max_input_len = options.max_input_len or min(limits)
    if max_input_len < 1 or (positions and max_input_len + 1 > positions):
        raise ValueError(f"--max-input-len {max_input_len} plus the one output token exceeds the model's "
                         f"{positions} positions")
    if window and max_input_len + 1 > window:  # within the window, windowed and full attention agree
        raise ValueError(f"--max-input-len {max_input_len} plus the one output token exceeds the model's sliding "
                         f"window of {window} tokens, which this path does not set in the engine; build for at "
                         f"most {window - 1} tokens, or serve longer conversations with the torch engine")
    if options.max_batch_size < 1 or options.max_num_tokens < 1:
        raise ValueError("--max-batch-size and --max-num-tokens must be positive")
    if options.dtype == "fp8" and not options.calib_dataset:
        raise ValueError(f"--dtype fp8 calibrates on data: give --calib-dataset, {HELP} (no network is assumed)")
    if options.dtype == "fp8":
        options.calib_dataset = check_calibration_dataset(options.calib_dataset)
    if options.pp > 1 and not os.environ.get(UNVERIFIED_PP_ENV):
        raise ValueError(f"--pp {options.pp}: pipeline parallelism is refused until a GPU run shows that the rewards "
                         "(logits of the last pipeline stage) reach rank 0's response (bench/gpu_check.sh, stage "
                         f"trtllm_pp); use --tp instead. {UNVERIFIED_PP_ENV}=1 lifts this for that check")
    return architecture, causal, head, max_input_len


def plan_build(options: BuildOptions) -> BuildPlan:
    """Check the inputs and lay out every step with its exact command.

    Raises:
        FileNotFoundError: no checkpoint.
        ValueError: see `check_inputs`; an output directory holding an engine without --force.
    """
    options.checkpoint, options.output = Path(options.checkpoint).resolve(), Path(options.output).resolve()
    architecture, causal, head, max_input_len = check_inputs(options, _read_config(options.checkpoint))
    layout = EngineLayout(options.output)
    if (layout.engine / "config.json").exists() and not options.force:
        raise ValueError(f"{layout.engine} already holds an engine; use --force to rebuild it")
    hf = layout.hf if head == "sequence_classification" else options.checkpoint
    chunked = max_input_len > options.max_num_tokens
    plan = BuildPlan(options, architecture, causal, head, hf, max_input_len, chunked)
    adapt = ("rewrite the classifier as a causal LM whose lm_head rows 0..K-1 are the score rows "
             f"(streamed shard by shard) into {layout.hf}" if head == "sequence_classification" else
             f"causal-LM reward model: used as it is; reward_head.json written to {layout.hf}")
    convert = [sys.executable, "-m", "reward_server.builder.convert", "--hf", str(hf),
               "--output", str(layout.trtllm_checkpoint), "--tp", str(options.tp), "--pp", str(options.pp),
               "--dtype", options.dtype]
    if options.dtype == "fp8":
        convert += ["--calib-dataset", str(options.calib_dataset)]
    build = ["trtllm-build", "--checkpoint_dir", str(layout.trtllm_checkpoint), "--output_dir", str(layout.engine),
             "--max_input_len", str(max_input_len), "--max_seq_len", str(max_input_len + 1),
             "--max_batch_size", str(options.max_batch_size), "--max_num_tokens", str(options.max_num_tokens),
             "--max_beam_width", "1", "--gather_generation_logits", "--logits_dtype", "float32",
             "--kv_cache_type", "paged", "--remove_input_padding", "enable", "--context_fmha", "enable",
             "--use_paged_context_fmha", "enable", "--tokens_per_block", str(TOKENS_PER_BLOCK),
             "--gpt_attention_plugin", "auto", "--workers", str(options.tp * options.pp)]
    if options.dtype != "fp8":  # FP8 GEMMs come from the quantized checkpoint, not the plugin
        build += ["--gemm_plugin", "auto"]
    plan.steps = [
        Step("adapt", adapt),
        Step("convert", f"TensorRT-LLM's converter ({CONVERTERS[causal]}.from_hugging_face"
             f"{', FP8 calibration' if options.dtype == 'fp8' else ''}) for {options.tp * options.pp} rank(s)",
             convert),
        Step("build", "one engine per rank, generation logits gathered (rewards are read from them)", build),
        Step("render", f"Triton model repository pointing at {layout.engine} into {layout.model_repository}"),
    ]
    return plan


def check_toolchain() -> None:
    """Raise FileNotFoundError when tensorrt_llm or trtllm-build is missing (not for --dry-run)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None or not shutil.which("trtllm-build"):
        raise FileNotFoundError("tensorrt_llm and trtllm-build are needed to build an engine: run in the NGC "
                                "TensorRT-LLM container (see docs/gpu.md); --dry-run shows the plan without them")


class StepFailed(subprocess.CalledProcessError):
    """A build command failed; `reason` is the line of its output that says why (or None)."""

    def __init__(self, returncode: int, cmd: list[str], reason: str | None):
        super().__init__(returncode, cmd)
        self.reason = reason


_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception)\b.*:")


def error_line(lines: Sequence[str]) -> str | None:
    """The line of a failed command's output that says why: its last Python exception line
    ("ValueError: ..."), else its last line mentioning an error, else its last line."""
    lines = [line.strip() for line in lines if line.strip()]
    for pick in (lambda line: _EXCEPTION_LINE.match(line), lambda line: "error" in line.lower(), lambda line: True):
        found = next((line for line in reversed(lines) if pick(line)), None)
        if found is not None:
            return found
    return None


def run_step(command: list[str]) -> None:
    """Run one build command with its output streamed to this process's stdout.

    Raises:
        StepFailed: it exited non-zero; the reason is read from the end of its output.
    """
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
    if process.returncode:
        raise StepFailed(process.returncode, command, error_line(tail))


def run_build(plan: BuildPlan, runner: Callable[[list[str]], None] | None = None) -> Path:
    """Run every step of `plan`, logging progress; return the engine directory.

    `runner` runs a command (default: `run_step`, output streamed, failure raised with its reason).

    Raises:
        subprocess.CalledProcessError: a command failed (its output was streamed above).
    """
    from reward_server.builder.adapt import adapt_checkpoint

    runner = runner or run_step
    o, layout = plan.options, plan.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    record = {"plan": plan.render(), "options": {k: str(v) for k, v in asdict(o).items()}, "steps": []}
    for number, step in enumerate(plan.steps, 1):
        _LOGGER.info("step %d/%d %s: %s", number, len(plan.steps), step.name, step.description)
        started = time.monotonic()
        if step.name == "adapt":
            adapt_checkpoint(o.checkpoint, layout.hf, o.head_type, o.reward_indices, o.step_tag, o.step_labels)
        elif step.name == "render":
            render_engine_repository(layout)
        else:
            if step.name == "build" and layout.engine.exists():
                shutil.rmtree(layout.engine)  # --force: a stale engine must not survive a failed build
            runner(step.command)
        elapsed = time.monotonic() - started
        record["steps"].append({"name": step.name, "command": step.command, "seconds": round(elapsed, 1)})
        layout.build_record.write_text(json.dumps(record, indent=2) + "\n")
        _LOGGER.info("step %d/%d %s done in %.1fs", number, len(plan.steps), step.name, elapsed)
    return layout.root


def render_engine_repository(layout: EngineLayout) -> Path:
    """Write the model repository that serves this engine (for a stock tritonserver)."""
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.repository import render_repository
    from reward_server.supervisor.trtllm_engine import open_engine

    serving = open_engine(layout.root)
    if layout.model_repository.exists():
        shutil.rmtree(layout.model_repository)
    options = ServeOptions(engine="tensorrt_llm", engine_dir=layout.root)
    return render_repository(options, serving.tokenizer_checkpoint, layout.model_repository, serving)
