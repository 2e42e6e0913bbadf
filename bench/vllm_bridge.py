"""Run `bench/vllm_runner.py` in vLLM's own virtual environment and read its answer.

vLLM pins its own torch, so it cannot share the project's venv; this module only moves token
ids and timings across a subprocess boundary (JSON files in the output folder).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

_LOGGER = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PYTHON = BENCH_DIR / ".venv-vllm" / "bin" / "python"
RUNNER = BENCH_DIR / "vllm_runner.py"


def run(python: str | Path, checkpoint: str | Path, workloads: Mapping[str, Sequence[Sequence[int]]],
        repeats: int, work_dir: str | Path, threads: int = 2, timeout_s: float = 1800.0,
        dtype: str = "float32") -> dict:
    """Time vLLM's pooling runner on each workload's token ids, with one engine.

    Args:
        python: interpreter of the vLLM venv.
        checkpoint: model directory (the same one the other systems load).
        workloads: name -> sequences to classify, exactly the ids the other systems score.
        repeats: timed passes.
        work_dir: where the request/answer JSON files go.
        threads: CPU threads for vLLM.
        dtype: the model dtype vLLM runs ("float32" or "bfloat16"), as the other systems do.
        timeout_s: limit for the whole subprocess.

    Returns:
        {"version": str, "workloads": {name: {"seconds": [...], "scores": [[...], ...]}}}.

    Raises:
        subprocess.CalledProcessError: the runner failed without an answer (its log tail is logged).
        subprocess.TimeoutExpired: it ran past `timeout_s`.
    """
    work_dir = Path(work_dir).resolve()  # the runner starts in work_dir: relative paths would break
    work_dir.mkdir(parents=True, exist_ok=True)
    request, answer = work_dir / "vllm_request.json", work_dir / "vllm_answer.json"
    request.write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve()), "repeats": repeats,
                                   "threads": threads, "dtype": dtype, "workloads": {name: [list(map(int, s)) for s in sequences]
                                                 for name, sequences in workloads.items()}}))
    result = _call_runner(python, request, answer, work_dir / "vllm_runner.log", timeout_s)
    for path in (request, answer, work_dir / "vllm_runner.log"):
        path.unlink()
    return result


def _call_runner(python: str | Path, request: Path, answer: Path, log: Path, timeout_s: float) -> dict:
    """Run the runner on a written `request` and return its answer (raises as `run` says)."""
    answer.unlink(missing_ok=True)
    # Own session, output to a file: vLLM's engine processes can outlive the runner, and they
    # would otherwise hold our pipes open; the whole group is ended once the runner is done.
    with open(log, "w", encoding="utf-8") as log_handle:
        proc = subprocess.Popen([str(python), str(RUNNER), str(request), str(answer)], stdout=log_handle,
                                stderr=subprocess.STDOUT, cwd=str(request.parent), start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        finally:
            _end_group(proc.pid)
    if not answer.exists():
        output = log.read_text(errors="replace")
        _LOGGER.error("vLLM runner failed (rc %s): %s", proc.returncode, output[-3000:])
        raise subprocess.CalledProcessError(proc.returncode or 1, proc.args, None, output)
    if proc.returncode != 0:  # it measured everything and then crashed on the way out
        _LOGGER.warning("vLLM runner exited %d after writing its answer; using it", proc.returncode)
    return json.loads(answer.read_text())


def _end_group(pgid: int) -> None:
    """SIGTERM what is left of the runner's process group (vLLM's engine core and workers)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def run_passes(python: str | Path, checkpoint: str | Path, passes: Mapping[str, Mapping], repeats: int,
               work_dir: str | Path, threads: int = 2, timeout_s: float = 1800.0, dtype: str = "float32",
               stem: str = "vllm_passes") -> dict:
    """Time sequences of calls on one vLLM engine whose prefix cache is kept across the calls.

    Args:
        python: interpreter of the vLLM venv.
        checkpoint: model directory.
        passes: name -> {"calls": [[ids, ...] per call], "task": "classify" (default) or
            "token_classify" (a process reward model)}; a pass's calls run one after another, the
            prefix cache reset once before each repeat, never between calls.
        repeats: timed repeats of every pass.
        work_dir: where the request/answer JSON files and the log go.
        threads: CPU threads for vLLM.
        timeout_s: limit for the whole subprocess.
        dtype: the model dtype vLLM runs.
        stem: file name stem of the request, answer and log (several runs can share a folder).

    Returns:
        {"version": str, "workloads": {}, "passes": {name: {"seconds": [...], "call_seconds": [[...]],
        "cached_tokens": [...], "tokens": int, "error": str | None}}} (see bench/vllm_runner.py).

    Raises:
        subprocess.CalledProcessError: the runner failed without an answer (its log is the error's output).
        subprocess.TimeoutExpired: it ran past `timeout_s`.
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    request, answer, log = (work_dir / f"{stem}_request.json", work_dir / f"{stem}_answer.json",
                            work_dir / f"{stem}.log")
    request.write_text(json.dumps({
        "checkpoint": str(Path(checkpoint).resolve()), "repeats": repeats, "threads": threads, "dtype": dtype,
        "passes": {name: {"calls": [[list(map(int, s)) for s in call] for call in spec["calls"]],
                          "task": spec.get("task", "classify")} for name, spec in passes.items()}}))
    result = _call_runner(python, request, answer, log, timeout_s)
    request.unlink()
    answer.unlink()
    return result  # the log stays in work_dir: vLLM's own account of the run (cache hits, config)
