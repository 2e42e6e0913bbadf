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
    answer.unlink(missing_ok=True)
    log = work_dir / "vllm_runner.log"
    # Own session, output to a file: vLLM's engine processes can outlive the runner, and they
    # would otherwise hold our pipes open; the whole group is ended once the runner is done.
    with open(log, "w", encoding="utf-8") as log_handle:
        proc = subprocess.Popen([str(python), str(RUNNER), str(request), str(answer)], stdout=log_handle,
                                stderr=subprocess.STDOUT, cwd=str(work_dir), start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        finally:
            _end_group(proc.pid)
    output = log.read_text(errors="replace")
    if proc.returncode != 0:
        if answer.exists():  # it measured everything and then crashed on the way out
            _LOGGER.warning("vLLM runner exited %d after writing its answer; using it", proc.returncode)
        else:
            _LOGGER.error("vLLM runner failed (rc %d): %s", proc.returncode, output[-3000:])
            raise subprocess.CalledProcessError(proc.returncode, proc.args, None, output)
    result = json.loads(answer.read_text())
    for path in (request, answer, log):
        path.unlink()
    return result


def _end_group(pgid: int) -> None:
    """SIGTERM what is left of the runner's process group (vLLM's engine core and workers)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
