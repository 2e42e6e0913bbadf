"""One tritonserver per tensor-parallel rank, under mpirun, in the foreground.

TensorRT-LLM's `tensorrtllm` backend in leader mode needs every rank of the engine in its own
MPI process. Rank 0 is the real server: every model, the ports, the launcher's safe defaults.
Ranks above 0 load only `tensorrt_llm`, serve no endpoint, and use their own Python-backend
shared-memory prefix. Unlike upstream's launch_triton_server.py, which starts the chain in the
background and returns, the launcher keeps mpirun as its child: a container stays up exactly as
long as the servers.

To stop, the launcher signals rank 0 alone (`ranks`), not mpirun: Open MPI's mpirun, when
signalled, kills its ranks one second later (odls_base_sigkill_timeout), too soon for in-flight
requests, and a longer timeout blocks its output forwarding (measured, 4.1.4). Nor the workers: in
leader mode a worker never returns from `TRITONSERVER_ServerNew` (its `tensorrt_llm` instance
blocks there until the leader shuts down, then calls exit(0)), and tritonserver installs its
signal handler only after ServerNew, so SIGTERM would kill the worker and mpirun would abort the
job with a non-zero exit. Rank 0 unloading its engine releases them.
"""

from __future__ import annotations

import shutil
from typing import Callable

from reward_server.supervisor.engines import TENSORRT_LLM_MODEL

# Flags of ranks > 0 in place of rank 0's endpoints and model control.
WORKER_FLAGS = ("--model-control-mode=explicit", f"--load-model={TENSORRT_LLM_MODEL}",
                "--allow-http=false", "--allow-grpc=false", "--allow-metrics=false")


def mpirun_command(rank_command: Callable[[int], list[str]], world_size: int, mpirun: str = "mpirun") -> list[str]:
    """The whole command line: `rank_command(rank)` for each rank, one process each.

    With world size 1 no MPI is needed: the server command alone. `mpirun` is called by name:
    Open MPI's mpirun called by its absolute path acts as if given --prefix and puts its own lib
    directory first on the ranks' LD_LIBRARY_PATH (measured: /usr/lib for Debian's), where the
    Python backend stubs then find the wrong Python (`No module named '_socket'`).

    Raises:
        ValueError: a world size below 1.
    """
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    if world_size == 1:
        return rank_command(0)
    command = [mpirun, "--allow-run-as-root"]
    for rank in range(world_size):
        if rank:
            command.append(":")
        command += ["-n", "1", *rank_command(rank)]
    return command


def find_mpirun() -> str:
    """Path of mpirun (checked before starting; the command itself names it without a path).

    Raises:
        FileNotFoundError: mpirun is not on PATH.
    """
    found = shutil.which("mpirun")
    if not found:
        raise FileNotFoundError("mpirun is not on PATH: a world size above 1 needs MPI (the NGC TensorRT-LLM "
                                "container ships Open MPI); or serve an engine built with --tp 1 --pp 1")
    return found


def ranks(mpirun_pid: int) -> tuple[int | None, list[int]]:
    """(rank 0's pid, the other ranks' pids) among mpirun's children.

    A child's rank is read from Open MPI's OMPI_COMM_WORLD_RANK in its environment; where that
    cannot be read, a tritonserver started with the worker flags is a worker.
    """
    from pathlib import Path

    leader, workers = None, []
    for pid in child_pids(mpirun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"OMPI_COMM_WORLD_RANK=")), None)
            if rank is None:
                rank = int(WORKER_FLAGS[1].encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue  # ended meanwhile
        if rank == 0:
            leader = pid
        else:
            workers.append(pid)
    return leader, workers


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the ranks mpirun started), from /proc (Linux)."""
    from pathlib import Path

    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children
