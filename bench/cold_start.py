"""How long `reward-server serve` takes to be ready, from empty caches and from warm ones.

Each start is the real command (demo checkpoint, default flags, free ports), timed from launch to
the banner's last line ("Ctrl-C stops ..."), then stopped with SIGINT. A cold start gets a new,
empty `REWARD_SERVER_CACHE` (the demo checkpoint is built, nothing compiled is reused); a warm start
reuses the cache of the cold one before it. For comparison, the same run times what a start cost
before the kernels shipped compiled: a just-in-time build of the build this CPU loads.

    python -m bench.cold_start --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.engine_profile import cpu_flags

READY = "Ctrl-C stops"


def start_seconds(cache: Path, timeout_s: float = 300) -> float:
    """Seconds from launching `reward-server serve` with `cache` until its banner is complete."""
    command = [str(Path(sys.executable).with_name("reward-server")), "serve", "--grpc-port", "0", "--http-port", "0",
               "--metrics-port", "0"]
    env = dict(os.environ, REWARD_SERVER_CACHE=str(cache))
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:
            if READY in line:
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout_s:
                break
        raise RuntimeError(f"not ready within {timeout_s:.0f} s (exit code {process.poll()})")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def jit_build_seconds() -> float:
    """Seconds to compile the build this CPU loads, as a start paid before the kernels shipped compiled."""
    from reward_server.pipeline.torch_engine.kernels import choose, cpu_flags as flags
    from reward_server.pipeline.torch_engine.kernels.build import compile_variant

    with tempfile.TemporaryDirectory(prefix="reward-jit-") as temp:
        started = time.perf_counter()
        compile_variant(choose(flags()), Path(temp) / "lib", Path(temp) / "objects")
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-jit", action="store_true", help="skip timing the just-in-time build")
    args = parser.parse_args(argv)
    print(f"CPU flags: {' '.join(cpu_flags())}; {os.cpu_count()} cores", flush=True)
    cold, warm = [], []
    for _ in range(args.repeats):
        cache = Path(tempfile.mkdtemp(prefix="reward-cold-"))
        try:
            cold.append(start_seconds(cache))
            warm.append(start_seconds(cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"cold {cold[-1]:.1f} s  warm {warm[-1]:.1f} s", flush=True)
    result = {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm)}
    if not args.no_jit:
        result["jit_build_s"] = jit_build_seconds()
    print("medians: " + "  ".join(f"{name} {value:.1f}" for name, value in result.items()))
    return result


if __name__ == "__main__":
    main()
