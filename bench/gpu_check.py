"""GPU verification of the reward server: the PyTorch engine on CUDA and the TensorRT-LLM path.

Run it through `bash bench/gpu_check.sh [OUT_DIR]` on a machine with one H100/H200 (no network
needed), or `python -m bench.gpu_check --smoke --out DIR` on a CPU to exercise the same stages on
a tiny model. It writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md after every stage.

Stages, in order (each has its own time limit inside the run's total budget):

1. environment: GPU, memory, driver, CUDA, versions of torch, transformers, tritonclient and
   tensorrt_llm (probed in a subprocess, so a broken install cannot take this process down).
2. matmul: the measured dense matmul rate (bf16 8192^3 on a GPU), the yardstick for throughput.
3. checkpoint: a random-weight Llama-3.1-8B-shaped LlamaForSequenceClassification (pad = eot),
   built in bf16 on the GPU and saved as sharded safetensors with the demo tokenizer.
4. torch_parity: `RewardEngine` on CUDA against transformers one conversation at a time (and an
   fp32 transformers run, to show the bf16 noise floor); asserts the bf16 tolerance of
   `bench.gpu.compare`.
5. torch_throughput: prefill tokens/s of the engine on 256 conversations of ~1,000 tokens, GRPO
   (16 prompts x 16 responses) and without shared prompts, as model TFLOP/s and % of matmul.
6. build_dry_run: `reward-server build-engine --dry-run` for tp 1 and 2 (no tensorrt_llm needed).
7. trtllm_build: `reward-server build-engine` for real (a shallower checkpoint of the same widths
   by default: a full 8B build needs ~65 GB of disk and more time than the budget holds).
8. trtllm_logits: `serve --engine tensorrt_llm`; generation_logits of the `tensorrt_llm` model for
   inputs cut after the pooled token, against transformers at the last prompt position (and one
   position later, to recognise the old off-by-one); the `reward` ensemble's scores.
9. trtllm_throughput: prefill tokens/s of the engine (all requests in flight) and of the served
   `reward` ensemble on the same two workloads.
10. trtllm_cancel: a request of 256 conversations abandoned after 1 s (gRPC deadline): the fan-out
   stops its engine requests by request id (the backend's `stop` input), and the next request is
   answered at once rather than after the abandoned work.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.gpu import compare, flops, reference
from bench.gpu.report import CheckFailed, Interrupted, Report, StageSkipped, raise_on_termination

_LOGGER = logging.getLogger("bench.gpu_check")

STAGES = ("environment", "matmul", "checkpoint", "torch_parity", "torch_throughput", "build_dry_run",
          "trtllm_build", "trtllm_logits", "trtllm_throughput", "trtllm_cancel", "trtllm_gemma2", "trtllm_pp")
# (own time limit, least remaining budget to start) in seconds, for a GPU run and a smoke run.
LIMITS = {
    "environment": ((90, 5), (60, 5)),
    "matmul": ((60, 10), (30, 5)),
    "checkpoint": ((180, 30), (60, 5)),
    "torch_parity": ((150, 30), (60, 5)),
    "torch_throughput": ((120, 20), (60, 5)),
    "build_dry_run": ((90, 10), (60, 5)),
    "trtllm_build": ((300, 90), (60, 5)),
    "trtllm_logits": ((240, 60), (60, 5)),
    "trtllm_throughput": ((120, 20), (60, 5)),
    "trtllm_cancel": ((90, 30), (60, 5)),
    "trtllm_gemma2": ((240, 90), (60, 5)),
    "trtllm_pp": ((360, 120), (60, 5)),
}
WORK_ENTRIES = ("checkpoint", "trtllm-checkpoint", "engine", "engine-pp2", "gemma2", "engine-gemma2", "server")
# Seconds the fp32 transformers run needs at least (load 30 GB, 16 conversations): skipped below that.
FP32_REFERENCE_S = 60
NOT_IMPORTABLE = "tensorrt_llm: not importable, TensorRT-LLM steps skipped"
_PROBE = ("import importlib.metadata as m, tensorrt_llm\n"
          "print('TRTLLM_VERSION=' + str(getattr(tensorrt_llm, '__version__', None) or m.version('tensorrt_llm')))")


@dataclass(frozen=True)
class RunShape:
    """Sizes that differ between a GPU run and the CPU smoke run."""

    device: str
    dtype: str
    model: flops.LlamaShape
    matmul_size: int
    token_budget: int
    shard_size: str
    check: dict          # WorkloadSpec fields of the parity set
    throughput: dict     # WorkloadSpec fields of the throughput workloads (shared_prompt set per workload)
    concurrency: int     # in-flight requests of the served-throughput run
    request_size: int    # conversations per `reward` request there


GPU_RUN = RunShape(
    device="cuda", dtype="bfloat16", model=flops.LLAMA31_8B, matmul_size=8192, token_budget=32768,
    shard_size="4GB",
    check=dict(prompts=4, responses_per_prompt=4, prompt_words_median=150, response_words_median=150,
               max_words=600, seed=1),
    # ~1,000 tokens per conversation with the demo tokenizer (about 2 tokens per word plus the template).
    throughput=dict(prompts=16, responses_per_prompt=16, prompt_words_median=275, response_words_median=245,
                    prompt_words_sigma=0.35, response_words_sigma=0.35, max_words=700, seed=0),
    concurrency=16, request_size=16)
SMOKE_RUN = RunShape(
    device="cpu", dtype="float32", model=flops.SMOKE, matmul_size=512, token_budget=1024, shard_size="300KB",
    check=dict(prompts=2, responses_per_prompt=3, prompt_words_median=12, response_words_median=12,
               max_words=40, seed=1),
    throughput=dict(prompts=2, responses_per_prompt=4, prompt_words_median=15, response_words_median=15,
                    max_words=40, seed=0),
    concurrency=2, request_size=4)


@dataclass
class Context:
    """What the stages share: options, paths, and objects that outlive one stage."""

    args: argparse.Namespace
    run: RunShape
    report: Report
    work: Path
    logs: Path
    shape: flops.LlamaShape
    trtllm_shape: flops.LlamaShape
    probe: subprocess.Popen | None = None
    trtllm_version: str | None = None
    matmul_flops_per_s: float = math.nan
    checkpoint: Path | None = None
    trtllm_checkpoint: Path | None = None
    engine_dir: Path | None = None
    engine: Any = None
    server: Any = None
    trtllm_reference: Any = None

    @property
    def cuda(self) -> bool:
        """True when the stages run on a GPU."""
        return self.run.device.startswith("cuda")

    def python_command(self, *arguments: str) -> list[str]:
        """`python -m reward_server.cli ...` with this interpreter."""
        return [sys.executable, "-m", "reward_server.cli", *arguments]


# Small shared helpers.

def _workload(spec_fields: dict, shared: bool):
    from bench.workload import WorkloadSpec, generate

    return generate(WorkloadSpec(shared_prompt=shared, **spec_fields))


def _encode(checkpoint: Path, conversations: Sequence[list[dict]]) -> list[list[int]]:
    """Token ids exactly as the server computes them (`ChatEncoder`); every conversation must fit."""
    from reward_server.pipeline.chat import ChatEncoder

    encoded = ChatEncoder.from_checkpoint(checkpoint).encode_batch(conversations)
    errors = [(i, e) for i, e in enumerate(encoded) if isinstance(e, Exception)]
    if errors:
        raise CheckFailed(f"conversation {errors[0][0]} cannot be encoded: {errors[0][1]}")
    return [list(e.token_ids) for e in encoded]


def _synchronize(ctx: Context) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_logged(command: Sequence[str], log: Path, timeout_s: float, env: dict | None = None) -> tuple[int, str]:
    """Run a command with output to `log`; on timeout or interruption kill its whole process group.

    Returns:
        (exit code, the log's last lines). 124 means the timeout passed.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as handle:
        handle.write(("$ " + " ".join(command) + "\n").encode())
        handle.flush()
        process = subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=None if env is None else {**os.environ, **env})
        try:
            code = process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            code = 124
        finally:
            if process.poll() is None:  # timed out, or a StageTimeout/Interrupted raised while waiting
                try:
                    os.killpg(process.pid, 9)
                except ProcessLookupError:
                    pass
                process.wait()
    return code, _tail(log.read_text(errors="replace"))


# Stages. Each fills `out` as it goes and raises StageSkipped / CheckFailed.

def machine_info(ctx: Context) -> dict:
    """GPU, driver, CUDA and package versions of this machine."""
    import importlib.metadata as metadata

    info: dict[str, Any] = {"python": f"{platform.python_version()} ({sys.executable})",
                            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        info["host_memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for package in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "tritonclient",
                    "nvidia-pytriton"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    import torch

    info["torch_cuda_build"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    compute_capability=f"{props.major}.{props.minor}")
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            driver = smi.stdout.strip().split(",")[-1].strip() if smi.returncode == 0 and smi.stdout else None
            info["driver"] = driver
        except (OSError, subprocess.TimeoutExpired) as err:
            info["nvidia_smi"] = f"failed: {err}"
    info["tritonserver"] = shutil.which("tritonserver") or (
        "/opt/tritonserver/bin/tritonserver" if Path("/opt/tritonserver/bin/tritonserver").exists() else None)
    info["tensorrtllm_backend"] = Path("/opt/tritonserver/backends/tensorrtllm").is_dir()
    info["mpirun"] = shutil.which("mpirun")
    # NGC containers announce themselves in the environment (e.g. NVIDIA_TRITON_SERVER_VERSION).
    info["container_env"] = {k: v for k, v in sorted(os.environ.items())
                             if k.startswith(("NVIDIA_TRITON", "TRITON_SERVER", "TRTLLM", "NVIDIA_PRODUCT",
                                              "NVIDIA_BUILD", "CUDA_VERSION"))}
    usage = shutil.disk_usage(ctx.work)
    info["work_dir"] = str(ctx.work)
    info["work_dir_free_gib"] = round(usage.free / 2 ** 30, 1)
    return info


def start_trtllm_probe() -> subprocess.Popen:
    """Import tensorrt_llm in a child process (slow, and it may abort); read with `finish_trtllm_probe`."""
    return subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish_trtllm_probe(probe: subprocess.Popen, timeout_s: float) -> tuple[str | None, str]:
    """(tensorrt_llm version or None, what the probe printed last)."""
    try:
        output, _ = probe.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(probe.pid, 9)
        probe.communicate()
        return None, f"import did not finish in {timeout_s:.0f}s"
    text = output.decode(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith("TRTLLM_VERSION="):
            return line.split("=", 1)[1].strip(), ""
    return None, _tail(text, 5)


def stage_environment(ctx: Context, out: dict) -> None:
    info = machine_info(ctx)
    version, detail = finish_trtllm_probe(ctx.probe, timeout_s=max(5.0, ctx.report.stage_left() - 5))
    ctx.trtllm_version = version
    info["tensorrt_llm"] = version or NOT_IMPORTABLE
    if detail:
        info["tensorrt_llm_import"] = detail
    ctx.report.data["machine"] = info
    out.update(device=ctx.run.device, dtype=ctx.run.dtype)
    out["summary"] = (f"{info.get('gpu', 'no GPU')}, torch {info['torch']}, "
                      f"tensorrt_llm {version or 'not importable'}")
    if ctx.cuda and not info["cuda_available"]:
        raise CheckFailed(f"no CUDA device visible to torch {info['torch']} (CUDA build {info['torch_cuda_build']}); "
                          "GPU stages will be skipped (use --smoke for the CPU run)")


def stage_matmul(ctx: Context, out: dict) -> None:
    import torch

    _require_device(ctx)
    n, dtype = ctx.run.matmul_size, getattr(torch, ctx.run.dtype)
    generator = torch.Generator(device=ctx.run.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.run.device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=ctx.run.device, dtype=dtype, generator=generator)
    per_sample = 10 if ctx.cuda else 2  # enough products per sample to dwarf launch and timer overhead
    for _ in range(3):
        torch.matmul(a, b)
    _synchronize(ctx)
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(per_sample):
            torch.matmul(a, b)
        _synchronize(ctx)
        samples.append(per_sample * flops.matmul_flops(n) / (time.perf_counter() - start))
    ctx.matmul_flops_per_s = float(np.median(samples))
    out.update(size=n, dtype=ctx.run.dtype, tflops_per_s=ctx.matmul_flops_per_s / 1e12,
               samples_tflops_per_s=[s / 1e12 for s in samples])
    out["summary"] = f"{ctx.run.dtype} matmul {n}^3: {ctx.matmul_flops_per_s / 1e12:.1f} TFLOP/s (median of 7)"


def _require_device(ctx: Context) -> None:
    import torch

    if ctx.cuda and not torch.cuda.is_available():
        raise StageSkipped("no CUDA device")


def stage_checkpoint(ctx: Context, out: dict) -> None:
    from bench.gpu.checkpoint import build_random_checkpoint

    _require_device(ctx)
    needed = flops.parameters(ctx.shape, head_rows=1) * (2 if ctx.run.dtype == "bfloat16" else 4) * 1.1
    free = shutil.disk_usage(ctx.work).free
    if free < needed:
        raise CheckFailed(f"{free / 2**30:.1f} GiB free in {ctx.work}, the checkpoint needs {needed / 2**30:.1f} GiB "
                          "(--work-dir elsewhere, or fewer --layers)")
    built = build_random_checkpoint(ctx.work / "checkpoint", ctx.shape, device=ctx.run.device, dtype=ctx.run.dtype,
                                    seed=ctx.args.seed, max_shard_size=ctx.run.shard_size)
    ctx.checkpoint = Path(built.path)
    out.update(built.to_dict())
    expected = flops.parameters(ctx.shape, head_rows=1)
    out["parameters_expected"] = expected
    out["summary"] = (f"{built.parameters / 1e9:.2f}B parameters, {built.bytes_on_disk / 2**30:.1f} GiB in "
                      f"{built.shards} shards; init {built.init_seconds:.1f}s, save {built.save_seconds:.1f}s")
    if built.parameters != expected:  # the FLOP and sizing formulas must describe this model
        raise CheckFailed(f"the model has {built.parameters} parameters, bench.gpu.flops counts {expected}")


def _need_checkpoint(ctx: Context) -> Path:
    if ctx.checkpoint is None or not (ctx.checkpoint / "config.json").exists():
        raise StageSkipped("no checkpoint (the checkpoint stage did not pass)")
    return ctx.checkpoint


def _load_engine(ctx: Context, out: dict) -> Any:
    from reward_server.pipeline.torch_engine.engine import RewardEngine

    if ctx.engine is None:
        start = time.perf_counter()
        ctx.engine = RewardEngine.from_checkpoint(_need_checkpoint(ctx), device=ctx.run.device,
                                                  token_budget=ctx.run.token_budget)
        out["engine_load_s"] = time.perf_counter() - start
    return ctx.engine


def stage_torch_parity(ctx: Context, out: dict) -> None:
    checkpoint = _need_checkpoint(ctx)
    workload = _workload(ctx.run.check, shared=True)
    ids = _encode(checkpoint, workload.conversations)
    out.update(conversations=len(ids), tokens=sum(map(len, ids)), longest=max(map(len, ids)),
               token_budget=ctx.run.token_budget)
    # ChatEncoder must give the ids the tokenizer's own chat template gives (the model card's way).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    template_ids = [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False))
                    for c in workload.conversations]
    out["ids_equal_chat_template"] = sum(a == b for a, b in zip(ids, template_ids))

    engine = _load_engine(ctx, out)
    engine.score(ids[:2])  # warm-up: kernels, allocator
    start = time.perf_counter()
    scores = engine.score(ids)
    out["engine_score_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model = reference.load(checkpoint, ctx.run.device, ctx.run.dtype)
    out["reference_load_s"] = time.perf_counter() - start
    expected = reference.scores(model, ids)
    del model
    reference.release()
    result = compare.compare(scores, expected, ctx.run.dtype, workload.group_ids)
    out["engine_vs_reference"] = result
    out["engine_scores"] = scores[:, 0].round(5).tolist()
    out["reference_scores"] = expected[:, 0].round(5).tolist()
    fraction = compare.TOLERANCE_FRACTION[ctx.run.dtype]
    out["summary"] = (f"{ctx.run.dtype}: max |engine - transformers| = {result['max_abs']:.3g} "
                      f"({100 * result['max_abs_over_spread']:.2f}% of the score spread {result['spread']:.3g}; "
                      f"tolerance {100 * fraction:g}%)")

    if ctx.cuda and ctx.args.fp32_reference:
        import torch

        free, _ = torch.cuda.mem_get_info()
        need = flops.parameters(ctx.shape, head_rows=1) * 4 * 1.15
        if ctx.report.stage_left() < FP32_REFERENCE_S:  # the bf16 verdict above matters more: keep it
            out["fp32_reference"] = f"skipped: {ctx.report.stage_left():.0f}s left in the stage"
        elif free < need:
            out["fp32_reference"] = f"skipped: {free / 2**30:.0f} GiB free, fp32 needs {need / 2**30:.0f} GiB"
        else:
            model = reference.load(checkpoint, ctx.run.device, "float32")
            exact = reference.scores(model, ids)
            del model
            reference.release()
            out["reference_bf16_vs_fp32"] = compare.compare(expected, exact, ctx.run.dtype)
            out["engine_vs_fp32"] = compare.compare(scores, exact, ctx.run.dtype)
            out["summary"] += (f"; against fp32: engine {out['engine_vs_fp32']['max_abs']:.3g}, "
                               f"transformers bf16 {out['reference_bf16_vs_fp32']['max_abs']:.3g}")
    if not result["within_tolerance"]:
        raise CheckFailed(f"engine scores differ from transformers by up to {result['max_abs']:.4g}, over the "
                          f"tolerance {result['tolerance']:.4g} ({100 * fraction:g}% of the spread)")


def _throughput_sets(checkpoint: Path, ctx: Context) -> dict[str, tuple[Any, list[list[int]]]]:
    sets = {}
    for name, shared in (("grpo", True), ("no-sharing", False)):
        workload = _workload(ctx.run.throughput, shared)
        sets[name] = (workload, _encode(checkpoint, workload.conversations))
    return sets


def stage_torch_throughput(ctx: Context, out: dict) -> None:
    from bench.metrics import unique_tokens

    checkpoint = _need_checkpoint(ctx)
    engine = _load_engine(ctx, out)
    if "engine_load_s" in out:
        engine.score([[1, 2, 3]])  # warm-up when the parity stage did not run
    summary = []
    for name, (workload, ids) in _throughput_sets(checkpoint, ctx).items():
        lengths = [len(s) for s in ids]
        before = (engine.stats.tokens, engine.stats.forward_seconds, engine.stats.microbatches)
        _synchronize(ctx)
        start = time.perf_counter()
        engine.score(ids)  # returns host arrays: the GPU work is finished when it returns
        seconds = time.perf_counter() - start
        result = flops.throughput(ctx.shape, lengths, seconds, ctx.matmul_flops_per_s).to_dict()
        result.update(prompts=workload.spec.prompts, responses_per_prompt=workload.spec.responses_per_prompt,
                      mean_tokens=float(np.mean(lengths)), longest=max(lengths), unique_tokens=unique_tokens(ids),
                      tokens_computed=engine.stats.tokens - before[0],
                      forward_seconds=engine.stats.forward_seconds - before[1],
                      packed_rows=engine.stats.microbatches - before[2])
        out[name] = result
        summary.append(f"{name} {result['tokens_per_s']:,.0f} tok/s ({result['pct_of_matmul']:.0f}% of matmul)")
    out["token_budget"] = ctx.run.token_budget
    out["summary"] = "; ".join(summary)


def stage_build_dry_run(ctx: Context, out: dict) -> None:
    checkpoint = _need_checkpoint(ctx)
    failures = []
    for tp in (1, 2):
        command = ctx.python_command("build-engine", "--checkpoint", str(checkpoint), "--output",
                                     str(ctx.work / f"dry-run-tp{tp}"), "--tp", str(tp), "--dry-run")
        code, tail = run_logged(command, ctx.logs / f"build_engine_dry_run_tp{tp}.log",
                                timeout_s=ctx.report.stage_left() / 2)
        log = (ctx.logs / f"build_engine_dry_run_tp{tp}.log").read_text(errors="replace")
        out[f"tp{tp}"] = {"exit_code": code, "output_tail": tail,
                          "gathers_generation_logits": "--gather_generation_logits" in log}
        if code != 0:
            failures.append(f"tp {tp} exited with {code}")
        elif "--gather_generation_logits" not in log:
            failures.append(f"tp {tp}: the printed trtllm-build command lacks --gather_generation_logits")
    out["summary"] = "; ".join(failures) or "tp 1 and tp 2 dry runs printed their plans"
    if failures:
        raise CheckFailed("; ".join(failures))


def _require_trtllm(ctx: Context) -> None:
    if ctx.trtllm_version is None:
        raise StageSkipped(NOT_IMPORTABLE)
    if not ctx.cuda:
        raise StageSkipped("the TensorRT-LLM stages need a GPU")


def stage_trtllm_build(ctx: Context, out: dict) -> None:
    from bench.gpu.checkpoint import build_random_checkpoint

    _require_trtllm(ctx)
    _release_engine(ctx)  # trtllm-build needs the GPU memory the PyTorch engine held
    if ctx.trtllm_shape == ctx.shape:
        ctx.trtllm_checkpoint = _need_checkpoint(ctx)
    else:
        needed = flops.parameters(ctx.trtllm_shape) * 2 * 4.5  # checkpoint, adapted, converted, engine
        if ctx.checkpoint is not None and not ctx.args.keep_work and shutil.disk_usage(ctx.work).free < needed:
            # Its disk is needed for the four copies of the next one; deferred PyTorch stages then skip.
            shutil.rmtree(ctx.checkpoint, ignore_errors=True)
            ctx.checkpoint = None
            out["removed_torch_checkpoint"] = True
        built = build_random_checkpoint(ctx.work / "trtllm-checkpoint", ctx.trtllm_shape, device=ctx.run.device,
                                        dtype=ctx.run.dtype, seed=ctx.args.seed, max_shard_size=ctx.run.shard_size)
        ctx.trtllm_checkpoint = Path(built.path)
        out["checkpoint"] = built.to_dict()
    # The adapted copy, TensorRT-LLM's checkpoint and the engine are each about the checkpoint's size.
    size = sum(p.stat().st_size for p in ctx.trtllm_checkpoint.glob("*.safetensors"))
    free = shutil.disk_usage(ctx.work).free
    out["disk_free_gib"] = round(free / 2**30, 1)
    if free < 3.3 * size:
        raise CheckFailed(f"{free / 2**30:.1f} GiB free in {ctx.work}; the build needs about {3.3 * size / 2**30:.1f} "
                          "GiB (--trtllm-layers fewer, or --work-dir elsewhere)")
    output = ctx.work / "engine"
    command = ctx.python_command(
        "build-engine", "--checkpoint", str(ctx.trtllm_checkpoint), "--output", str(output),
        "--tp", str(ctx.args.tp), "--dtype", ctx.run.dtype, "--max-input-len", str(ctx.args.max_input_len),
        "--max-batch-size", str(ctx.args.max_batch_size), "--max-num-tokens", str(ctx.args.max_num_tokens))
    out["command"] = " ".join(command)
    start = time.perf_counter()
    code, tail = run_logged(command, ctx.logs / "build_engine.log", timeout_s=ctx.report.stage_left() - 5)
    out.update(build_s=time.perf_counter() - start, exit_code=code, output_tail=tail)
    if code != 0:
        raise CheckFailed(f"build-engine exited with {code} (log: logs/build_engine.log)")
    from reward_server.pipeline.trtllm.layout import EngineLayout, read_engine_info

    layout = EngineLayout(output)
    info = read_engine_info(layout.engine)
    out["engine"] = {key: getattr(info, key) for key in info.__dataclass_fields__}
    out["engine_bytes"] = sum(p.stat().st_size for p in layout.engine.glob("*.engine"))
    ctx.engine_dir = output
    out["summary"] = (f"{ctx.trtllm_shape.layers}-layer engine built in {out['build_s']:.0f}s, "
                      f"{out['engine_bytes'] / 2**30:.1f} GiB")


def _check_set(ctx: Context) -> tuple[Any, list[list[int]]]:
    workload = _workload(ctx.run.check, shared=True)
    return workload, _encode(ctx.trtllm_checkpoint, workload.conversations)


def _token_ids(checkpoint: Path) -> tuple[int, int]:
    """(pad id, end id) from the checkpoint's config.json."""
    config = json.loads((checkpoint / "config.json").read_text())
    pad = config.get("pad_token_id")
    end = config.get("eos_token_id")
    end = end[0] if isinstance(end, list) else end
    return int(pad), int(end if end is not None else pad)


def start_server(ctx: Context, engine_dir: Path, startup_timeout_s: float) -> Any:
    """`reward-server serve --engine tensorrt_llm` in-process: a started `TritonServer`.

    It is kept in `ctx.server` before it starts, so that cleanup copies its log even when it
    never becomes ready.
    """
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.server import TritonServer

    (ctx.work / "server").mkdir(parents=True, exist_ok=True)
    options = ServeOptions(engine="tensorrt_llm", engine_dir=engine_dir, grpc_port=0, http_port=0, metrics_port=0,
                           workdir=ctx.work / "server", startup_timeout_s=startup_timeout_s)
    ctx.server = TritonServer(options)
    return ctx.server.start()


def check_engine_logits(client: Any, model: Any, ids: Sequence[Sequence[int]], pad_id: int, end_id: int,
                        dtype: str) -> dict:
    """Ask the `tensorrt_llm` model for each sequence cut after its pooled token; compare its
    generation_logits[0:K] with transformers at that position and one position later.

    Args:
        client: a tritonclient.grpc client of the server.
        model: the transformers reference (sequence classification) on the same checkpoint.
        ids: full token ids of each conversation.
        pad_id, end_id: the checkpoint's pad and end ids.
        dtype: the engine's compute dtype (selects the tolerance of `bench.gpu.compare`).

    Returns:
        JSON-ready results: positions (counts), observed, references, shapes and the largest
        non-reward logit (zero rows of the adapted head).
    """
    from bench.gpu import trtllm_client
    from reward_server.pipeline.heads import pool_position

    expected = reference.scores(model, ids)
    tol = compare.tolerance(expected, dtype)
    k = expected.shape[1]
    observed, at_next, positions, shapes, generated, rest = [], [], [], set(), [], 0.0
    for seq, ref in zip(ids, expected):
        cut = list(seq[: pool_position(seq, "sequence_classification", pad_id) + 1])
        reply = trtllm_client.infer(client, cut, end_id=end_id, pad_id=pad_id)
        shapes.add(tuple(reply.generation_logits.shape))
        logits = reply.first_logits()
        token = reply.generated_token()
        following = reference.scores_at_final_token(model, cut + [token])
        observed.append(logits[:k])
        at_next.append(following)
        generated.append(token)
        rest = max(rest, float(np.abs(logits[k:]).max()) if logits.shape[0] > k else 0.0)
        positions.append(compare.classify_position(logits[:k], ref, following, tol))
    observed_arr = np.stack(observed).astype(np.float32)
    return {"positions": dict(Counter(positions)), "generation_logits_shapes": [list(s) for s in sorted(shapes)],
            "generated_tokens": generated, "max_abs_non_reward_logits": rest,
            "observed": observed_arr[:, 0].round(5).tolist(), "at_last_prompt": expected[:, 0].round(5).tolist(),
            "at_next_position": np.stack(at_next)[:, 0].round(5).tolist(),
            "vs_last_prompt": compare.compare(observed_arr, expected, dtype),
            "vs_next_position": compare.compare(observed_arr, np.stack(at_next), dtype),
            "_expected": expected}


def check_step_chain(client: Any, model: Any, seq: Sequence[int], pad_id: int, end_id: int, dtype: str,
                     every: int = 48) -> dict:
    """A process reward model's requests on the real engine: one sequence cut after every `every`
    tokens (standing in for step tags), the prefixes sent one after another as the fan-out sends a
    conversation's steps, each finding the blocks of the one before cached. The logits of each
    prefix's last position must equal transformers at that position (what KV-cache reuse must not
    change beyond the dtype's tolerance).
    """
    from bench.gpu import trtllm_client

    cuts = list(range(every, len(seq) + 1, every)) or [len(seq)]
    expected = np.stack([reference.scores_at_final_token(model, seq[:cut]) for cut in cuts])
    k = expected.shape[1]
    observed = np.stack([trtllm_client.infer(client, list(seq[:cut]), end_id=end_id, pad_id=pad_id).first_logits()[:k]
                         for cut in cuts]).astype(np.float32)
    return {"cuts": cuts, **compare.compare(observed, expected, dtype)}


def stage_trtllm_logits(ctx: Context, out: dict) -> None:
    _require_trtllm(ctx)
    if ctx.engine_dir is None:
        raise StageSkipped("no engine (trtllm_build did not pass)")
    check_served_logits(ctx, out, ctx.engine_dir)


def check_served_logits(ctx: Context, out: dict, engine_dir: Path) -> None:
    """Serve `engine_dir`; compare the engine's generation_logits and the served scores with the
    transformers reference (the server is left running in ctx.server).

    Raises:
        CheckFailed: logits read at another position, or scores outside the tolerance.
    """
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as err:
        raise StageSkipped(f"tritonclient is not importable ({err}): pip install tritonclient[grpc]") from None
    _release_engine(ctx)
    workload, ids = _check_set(ctx)
    pad_id, end_id = _token_ids(ctx.trtllm_checkpoint)
    # The reference stays loaded while the server runs: it is needed for the next-position reading.
    if ctx.trtllm_reference is None:
        ctx.trtllm_reference = reference.load(ctx.trtllm_checkpoint, ctx.run.device, ctx.run.dtype)
    start = time.perf_counter()
    ctx.server = start_server(ctx, engine_dir, startup_timeout_s=max(30.0, ctx.report.stage_left() - 60))
    out["server_start_s"] = time.perf_counter() - start
    client = grpcclient.InferenceServerClient(ctx.server.grpc_url)
    direct = check_engine_logits(client, ctx.trtllm_reference, ids, pad_id, end_id, ctx.run.dtype)
    expected = direct.pop("_expected")
    out["engine_direct"] = direct
    out["step_chain"] = check_step_chain(client, ctx.trtllm_reference, max(ids, key=len), pad_id, end_id,
                                         ctx.run.dtype, every=48 if ctx.cuda else 8)
    served = score_served(client, workload.conversations)
    out["served_vs_reference"] = compare.compare(served["attributes"], expected, ctx.run.dtype, workload.group_ids)
    out["served_num_tokens_equal"] = int(np.sum(served["num_tokens"] == np.array([len(s) for s in ids])))
    out["served_score_equals_attribute"] = bool(np.allclose(served["score"], served["attributes"][:, 0]))
    client.close()

    n = len(ids)
    last = direct["positions"].get(compare.LAST_PROMPT, 0)
    out["summary"] = (f"generation_logits = reference at the last prompt position for {last}/{n} "
                      f"(positions {direct['positions']}); served max diff "
                      f"{out['served_vs_reference']['max_abs']:.3g} (tolerance {out['served_vs_reference']['tolerance']:.3g})")
    if engine_dir == ctx.engine_dir:
        ctx.report.data["summary"]["generation_logits_position"] = direct["positions"]
    failures = []
    if last != n:
        failures.append(f"generation_logits matched the last prompt position for only {last} of {n} requests "
                        f"({direct['positions']})")
    if not out["served_vs_reference"]["within_tolerance"]:
        failures.append(f"served scores differ from transformers by {out['served_vs_reference']['max_abs']:.4g}")
    if not out["step_chain"]["within_tolerance"]:
        failures.append(f"step-by-step requests (process reward models) differ from transformers by "
                        f"{out['step_chain']['max_abs']:.4g} at {len(out['step_chain']['cuts'])} cuts")
    if out["served_num_tokens_equal"] != n:
        failures.append(f"num_tokens differs from the token count for {n - out['served_num_tokens_equal']} of {n}")
    if failures:
        raise CheckFailed("; ".join(failures))


def score_served(client: Any, conversations: Sequence[list[dict]]) -> dict[str, np.ndarray]:
    """Score conversations in one request to the public `reward` ensemble."""
    import tritonclient.grpc as grpcclient

    from bench.grpc_load import OUTPUTS, encode_rows

    rows = encode_rows(conversations)
    messages = grpcclient.InferInput("messages", list(rows.shape), "BYTES")
    messages.set_data_from_numpy(rows)
    result = client.infer("reward", [messages], outputs=[grpcclient.InferRequestedOutput(o) for o in OUTPUTS],
                          client_timeout=120)
    return {"score": result.as_numpy("score").reshape(-1), "attributes": result.as_numpy("attributes"),
            "num_tokens": result.as_numpy("num_tokens").reshape(-1)}


def stage_trtllm_throughput(ctx: Context, out: dict) -> None:
    from bench.gpu import trtllm_client
    from bench.grpc_load import run_load
    from reward_server.pipeline.heads import pool_position

    _require_trtllm(ctx)
    if ctx.server is None:
        raise StageSkipped("no server (trtllm_logits did not start one)")
    import tritonclient.grpc as grpcclient

    pad_id, end_id = _token_ids(ctx.trtllm_checkpoint)
    client = grpcclient.InferenceServerClient(ctx.server.grpc_url)
    summary = []
    for name, (workload, ids) in _throughput_sets(ctx.trtllm_checkpoint, ctx).items():
        lengths = [len(s) for s in ids]
        cut = [s[: pool_position(s, "sequence_classification", pad_id) + 1] for s in ids]
        trtllm_client.infer_all(client, cut[:8], end_id, pad_id)  # warm-up
        seconds, _ = trtllm_client.infer_all(client, cut, end_id, pad_id, timeout_s=ctx.report.stage_left())
        direct = flops.throughput(ctx.trtllm_shape, lengths, seconds, ctx.matmul_flops_per_s).to_dict()
        before = kv_cache_counters(ctx.server.metrics_url)
        load = run_load(ctx.server.grpc_url, workload.conversations, ctx.run.concurrency, ctx.run.request_size,
                        timeout_s=ctx.report.stage_left())
        served = flops.throughput(ctx.trtllm_shape, lengths, load.seconds, ctx.matmul_flops_per_s).to_dict()
        served.update(concurrency=ctx.run.concurrency, request_size=ctx.run.request_size,
                      latency_p50_s=float(np.median(load.latencies)))
        kv = kv_cache_reuse(before, kv_cache_counters(ctx.server.metrics_url), cut, ctx.run.request_size)
        out[name] = {"engine_all_in_flight": direct, "served_reward": served, "mean_tokens": float(np.mean(lengths)),
                     "kv_cache": kv}
        summary.append(f"{name}: engine {direct['tokens_per_s']:,.0f} tok/s ({direct['pct_of_matmul']:.0f}% of "
                       f"matmul), served {served['tokens_per_s']:,.0f} tok/s, KV blocks reused {kv['reused_blocks']} "
                       f"of {kv['shareable_blocks']} shareable")
    client.close()
    out["layers"] = ctx.trtllm_shape.layers
    out["summary"] = "; ".join(summary)


def stage_trtllm_cancel(ctx: Context, out: dict) -> None:
    """Abandon a long request: the fan-out must stop its engine requests, and the next request must
    not wait for the abandoned work."""
    import re
    import urllib.request

    import tritonclient.grpc as grpcclient

    _require_trtllm(ctx)
    if ctx.server is None:
        raise StageSkipped("no server (trtllm_logits did not start one)")

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(ctx.server.metrics_url, timeout=10).read().decode()
        return {f"{name}{{{labels}}}": float(value) for name, labels, value in
                re.findall(r'^((?:reward_dropped|nv_trt_llm|nv_inference_request_success)\w*)\{([^}]*)\} (\S+)$',
                           text, re.M)}

    workload, _ = next(iter(_throughput_sets(ctx.trtllm_checkpoint, ctx).values()))
    conversations = workload.conversations[:256]
    client = grpcclient.InferenceServerClient(ctx.server.grpc_url)
    before = scrape()
    started = time.perf_counter()
    try:
        score_served_with_deadline(client, conversations, deadline_s=1.0)
        out["abandoned"] = "finished within 1 s (too fast to abandon: nothing measured)"
    except Exception as exc:  # noqa: BLE001 - the deadline is the point
        out["abandoned"] = str(exc)[:200]
    follow = time.perf_counter()
    score_served(client, conversations[:2])
    out["next_request_s"] = round(time.perf_counter() - follow, 3)
    out["since_abandoned_s"] = round(time.perf_counter() - started, 3)
    time.sleep(1.0)
    after = scrape()
    out["metrics_delta"] = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    dropped = sum(v for k, v in out["metrics_delta"].items()
                  if k.startswith("reward_dropped_requests_total") and 'model="reward_engine_trtllm"' in k)
    out["summary"] = (f"abandoned after 1 s; the next request took {out['next_request_s']:.2f} s; "
                      f"fan-out drops {dropped:.0f}")
    client.close()
    if "too fast" in out["abandoned"]:
        raise StageSkipped(out["abandoned"])
    failures = []
    if dropped < 1:
        failures.append("the fan-out never dropped the abandoned request")
    if out["next_request_s"] > 10:
        failures.append(f"the next request waited {out['next_request_s']:.1f} s behind the abandoned work")
    if failures:
        raise CheckFailed("; ".join(failures))


def score_served_with_deadline(client: Any, conversations: Sequence[list[dict]], deadline_s: float) -> None:
    """One `reward` request with a gRPC deadline (raises when it passes)."""
    import tritonclient.grpc as grpcclient

    from bench.grpc_load import encode_rows

    rows = encode_rows(conversations)
    messages = grpcclient.InferInput("messages", list(rows.shape), "BYTES")
    messages.set_data_from_numpy(rows)
    client.infer("reward", [messages], client_timeout=deadline_s)


def kv_cache_counters(metrics_url: str) -> dict[str, float]:
    """The fan-out's reward_engine_kv_cache_*_total counters (requests, reused_blocks, total_blocks)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {name: float(value) for name, value in
            re.findall(r'^reward_engine_kv_cache_(\w+)_total\{[^}]*\} (\S+)$', text, re.M)}


def shareable_blocks(sequences: Sequence[Sequence[int]], request_size: int, block: int = 32) -> int:
    """KV blocks that leader-first scheduling can let a request find cached: in each request of
    `request_size` sequences (the fan-out groups within a request), every sequence but the first
    of its group can reuse the whole blocks it shares with an earlier one, less the block holding
    its last token (always computed)."""
    from reward_server.pipeline.batching import common_prefix

    total = 0
    for start in range(0, len(sequences), request_size):
        chunk = sequences[start:start + request_size]
        for i, seq in enumerate(chunk[1:], 1):
            common = max(common_prefix(seq, other) for other in chunk[:i])
            total += min(common // block, (len(seq) - 1) // block)
    return total


def kv_cache_reuse(before: dict, after: dict, sequences: Sequence[Sequence[int]], request_size: int) -> dict:
    """What the engine reported reusing during a run, against what the workload could share."""
    delta = {name: int(after.get(name, 0) - before.get(name, 0)) for name in ("requests", "reused_blocks",
                                                                            "total_blocks")}
    shareable = shareable_blocks(sequences, request_size)
    return {**delta, "shareable_blocks": shareable,
            "reuse_of_shareable": round(delta["reused_blocks"] / shareable, 3) if shareable else None,
            "note": None if delta["requests"] else "no request returned KV-cache counters (perf_metrics off, or "
                                                   "the backend ignores return_perf_metrics)"}


def stage_trtllm_pp(ctx: Context, out: dict) -> None:
    """Pipeline parallelism (pp 2): do the rewards, computed on the last stage, reach rank 0's
    response? build-engine refuses --pp > 1 until this passes on a GPU host."""
    _require_trtllm(ctx)
    import torch

    if torch.cuda.device_count() < 2:
        raise StageSkipped(f"pipeline parallelism needs 2 GPUs; {torch.cuda.device_count()} visible")
    if ctx.trtllm_checkpoint is None:
        raise StageSkipped("no checkpoint (trtllm_build did not pass)")
    _stop_server(ctx)
    output = ctx.work / "engine-pp2"
    command = ctx.python_command(
        "build-engine", "--checkpoint", str(ctx.trtllm_checkpoint), "--output", str(output), "--pp", "2",
        "--dtype", ctx.run.dtype, "--max-input-len", str(ctx.args.max_input_len), "--force")
    from reward_server.builder.build import UNVERIFIED_PP_ENV

    out["command"] = f"{UNVERIFIED_PP_ENV}=1 " + " ".join(command)
    code, tail = run_logged(command, ctx.logs / "build_engine_pp2.log", timeout_s=ctx.report.stage_left() / 2,
                            env={UNVERIFIED_PP_ENV: "1"})
    out.update(exit_code=code, output_tail=tail)
    if code != 0:
        raise CheckFailed(f"build-engine --pp 2 exited with {code} (log: logs/build_engine_pp2.log)")
    check_served_logits(ctx, out, output)


def stage_trtllm_gemma2(ctx: Context, out: dict) -> None:
    """A Gemma-2 reward model through TensorRT-LLM: its converter ties the LM head to the embeddings,
    so the adaptation carries the score rows in reserved-token embedding rows (<unusedN>). Do the
    served scores equal transformers' classifier (bf16 tolerance)? Never run before on a GPU."""
    _require_trtllm(ctx)
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as err:
        raise StageSkipped(f"tritonclient is not importable ({err})") from None
    from reward_server.supervisor.demo_checkpoint import build_checkpoint
    from tests.conversations import make_conversations
    from tests.reference import eager_rewards

    _stop_server(ctx)
    _release_engine(ctx)
    checkpoint = build_checkpoint(ctx.work / "gemma2", "small", arch="gemma2", num_labels=2, seed=ctx.args.seed)
    output = ctx.work / "engine-gemma2"
    command = ctx.python_command("build-engine", "--checkpoint", str(checkpoint), "--output", str(output),
                                 "--dtype", "bfloat16", "--max-input-len", "1024", "--force")
    out["command"] = " ".join(command)
    code, tail = run_logged(command, ctx.logs / "build_engine_gemma2.log", timeout_s=ctx.report.stage_left() / 2)
    out.update(exit_code=code, output_tail=tail)
    if code != 0:
        raise CheckFailed(f"build-engine (Gemma-2) exited with {code} (log: logs/build_engine_gemma2.log)")
    conversations = make_conversations(16, seed=ctx.args.seed)
    expected = eager_rewards(checkpoint, conversations)  # fp32 on the CPU, before the server takes the GPU
    ctx.server = start_server(ctx, output, startup_timeout_s=max(30.0, ctx.report.stage_left() - 30))
    client = grpcclient.InferenceServerClient(ctx.server.grpc_url)
    served = score_served(client, conversations)
    client.close()
    _stop_server(ctx)
    out["served_vs_reference"] = compare.compare(served["attributes"], expected, "bfloat16")
    out["summary"] = (f"Gemma-2 served max diff {out['served_vs_reference']['max_abs']:.3g} "
                      f"(tolerance {out['served_vs_reference']['tolerance']:.3g})")
    if not out["served_vs_reference"]["within_tolerance"]:
        raise CheckFailed(f"Gemma-2 scores differ from transformers by {out['served_vs_reference']['max_abs']:.4g}: "
                          "the reserved-row adaptation does not reach the engine as it should")


def _release_engine(ctx: Context) -> None:
    ctx.engine = None
    reference.release()


STAGE_FUNCTIONS = {
    "environment": stage_environment, "matmul": stage_matmul, "checkpoint": stage_checkpoint,
    "torch_parity": stage_torch_parity, "torch_throughput": stage_torch_throughput,
    "build_dry_run": stage_build_dry_run, "trtllm_build": stage_trtllm_build,
    "trtllm_logits": stage_trtllm_logits, "trtllm_throughput": stage_trtllm_throughput,
    "trtllm_cancel": stage_trtllm_cancel,
    "trtllm_gemma2": stage_trtllm_gemma2, "trtllm_pp": stage_trtllm_pp,
}


def summarize(report: Report) -> None:
    """Headline numbers of the whole run in report.data["summary"]."""
    summary = report.data["summary"]
    matmul = report.results("matmul")
    if "tflops_per_s" in matmul:
        summary["matmul_tflops_per_s"] = round(matmul["tflops_per_s"], 2)
    parity = report.results("torch_parity").get("engine_vs_reference")
    if parity:
        summary["torch_max_abs_over_spread"] = parity["max_abs_over_spread"]
    for name in ("grpo", "no-sharing"):
        torch_run = report.results("torch_throughput").get(name)
        if torch_run:
            summary[f"torch_tokens_per_s_{name}"] = round(torch_run["tokens_per_s"])
        trt_run = report.results("trtllm_throughput").get(name)
        if trt_run:
            summary[f"trtllm_engine_tokens_per_s_{name}"] = round(trt_run["engine_all_in_flight"]["tokens_per_s"])
            summary[f"trtllm_served_tokens_per_s_{name}"] = round(trt_run["served_reward"]["tokens_per_s"])
    summary["stages"] = {name: stage["status"] for name, stage in report.data["stages"].items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="CPU run on a tiny model (fp32, no TensorRT-LLM)")
    parser.add_argument("--budget-s", type=float, help="total seconds for all stages (default 450, smoke 120)")
    parser.add_argument("--layers", type=int, help="decoder layers of the PyTorch-stage checkpoint (default: the "
                                                   "shape's, 32 for Llama-3.1-8B)")
    parser.add_argument("--trtllm-layers", type=int, default=8,
                        help="decoder layers of the TensorRT-LLM checkpoint (default 8: a full 8B build needs "
                             "~65 GB of disk for checkpoint, adapted copy, converted copy and engine)")
    parser.add_argument("--trtllm-reserve-s", type=float, default=240,
                        help="seconds of the budget kept for the TensorRT-LLM stages when tensorrt_llm is "
                             "importable (default 240)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallelism of the real build (default 1)")
    parser.add_argument("--max-input-len", type=int, default=4096)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-num-tokens", type=int, default=16384)
    parser.add_argument("--no-fp32-reference", dest="fp32_reference", action="store_false",
                        help="skip the fp32 transformers run that shows the bf16 noise floor")
    parser.add_argument("--skip", default="", help="comma-separated stages not to run")
    parser.add_argument("--work-dir", type=Path, help="where checkpoints and engines go (default: a new temporary "
                                                      "directory, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [s for s in args.skip.split(",") if s and s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) in --skip: {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stages; exit code 0 when none failed or timed out."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run = SMOKE_RUN if args.smoke else GPU_RUN
    shape = run.model.with_layers(args.layers) if args.layers else run.model
    budget = args.budget_s or (120.0 if args.smoke else 450.0)
    probe = start_trtllm_probe()  # in parallel with the imports below
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    settings.update(device=run.device, dtype=run.dtype, shape=shape.__dict__,
                    trtllm_shape=shape.with_layers(min(args.trtllm_layers, shape.layers)).__dict__)
    report = Report(args.out, "smoke" if args.smoke else "gpu", STAGES, budget, settings)
    ctx = Context(args=args, run=run, report=report, work=work, logs=Path(args.out) / "logs", shape=shape,
                  trtllm_shape=shape.with_layers(min(args.trtllm_layers, shape.layers)), probe=probe)
    restore_signals = raise_on_termination()
    skipped = {s for s in args.skip.split(",") if s}
    deferred: list[str] = []
    run_stage = lambda name, limit, least: report.run(  # noqa: E731
        name, lambda out: STAGE_FUNCTIONS[name](ctx, out), timeout_s=limit, min_s=least)
    try:
        for name in STAGES:
            if name in skipped:
                report.skip(name, "skipped by --skip")
                continue
            limit, least = LIMITS[name][1 if args.smoke else 0]
            reserve = _trtllm_reserve(ctx, skipped) if not name.startswith("trtllm_") else 0.0
            if reserve and report.remaining() - reserve < least:
                deferred.append(name)
                report.skip(name, f"deferred: {report.remaining():.0f}s left, {reserve:.0f}s of them kept for the "
                                  "TensorRT-LLM stages; runs after them if time is left")
                continue
            if reserve:
                limit = min(limit, report.remaining() - reserve)
            run_stage(name, limit, least)
        if deferred:
            _stop_server(ctx)  # the PyTorch stages need the GPU memory the server's KV cache holds
            for name in deferred:
                report.results(name)["deferred"] = True
                run_stage(name, *LIMITS[name][1 if args.smoke else 0])
    except Interrupted:
        _LOGGER.warning("interrupted: writing the partial report")
    finally:
        _cleanup(ctx)
        summarize(report)
        overall = report.finish()
        restore_signals()
    print(f"gpu check: {overall}; results in {report.json_path} and {report.markdown_path}")
    for name, stage in report.data["stages"].items():
        note = stage["reason"] or stage["results"].get("summary", "")
        print(f"  {name:18s} {stage['status']:8s} {note}")
    return 0 if overall == "passed" else 1


def _stop_server(ctx: Context) -> None:
    """Stop the TensorRT-LLM server if one was started, keep its log, free the reference model."""
    if ctx.server is not None:
        try:
            ctx.server.stop()
        finally:
            log = getattr(ctx.server, "log_path", None)
            if log and Path(log).exists():
                ctx.logs.mkdir(parents=True, exist_ok=True)
                shutil.copy2(log, ctx.logs / "tritonserver.log")
            ctx.server = None
    ctx.trtllm_reference = None
    reference.release()


def _trtllm_reserve(ctx: Context, skipped: set[str]) -> float:
    """Seconds of the budget the stages before TensorRT-LLM's must leave (0 when those will not run).

    The TensorRT-LLM stages settle the one unconfirmed fact, so the PyTorch stages may not eat
    their time; until the environment stage has probed tensorrt_llm nothing is reserved.
    """
    if ctx.trtllm_version is None or not ctx.cuda or {"trtllm_build", "trtllm_logits"} & skipped:
        return 0.0
    return float(ctx.args.trtllm_reserve_s)


def _cleanup(ctx: Context) -> None:
    """Stop the server (keeping its log), free the GPU, remove the work directory unless asked to keep it."""
    if ctx.probe is not None and ctx.probe.poll() is None:
        os.killpg(ctx.probe.pid, 9)
        ctx.probe.wait()
    _stop_server(ctx)
    ctx.engine = None
    reference.release()
    if ctx.args.keep_work:
        return
    if ctx.args.work_dir is None:
        shutil.rmtree(ctx.work, ignore_errors=True)
    else:  # a directory the caller chose: remove only what this run wrote there
        for child in WORK_ENTRIES:
            shutil.rmtree(ctx.work / child, ignore_errors=True)
        for child in ctx.work.glob("dry-run-tp*"):
            shutil.rmtree(child, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
