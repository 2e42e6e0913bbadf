"""Run perf_analyzer over gRPC against the `reward` ensemble at several concurrencies.

    python -m bench.perf_analyzer.run --url 127.0.0.1:8001 --input-data pa.json \
        --concurrency 1,2,4,8 --batch-size 8 --csv bench/results/perf_analyzer.csv

perf_analyzer ships in the `tritonclient` wheel (`bin/perf_analyzer`) but needs two shared
libraries the wheel lacks: `libb64.so.0d` (Debian `libb64-0d`) and `libcudart.so.12` (PyPI
`nvidia-cuda-runtime-cu12`). This module finds the binary, puts the CUDA runtime's lib folder
on `LD_LIBRARY_PATH` itself, and reports a missing library by name (`missing_libraries`)
instead of a loader error. One perf_analyzer process runs per concurrency level; their CSV
rows are merged into one file with a leading `Batch Size` column.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

_LOGGER = logging.getLogger(__name__)

MODEL_NAME = "reward"
REQUIRED_LIBRARIES = ("libb64.so.0d", "libcudart.so.12")


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, cannot load, or exited with an error (message has its output tail)."""


def find_binary() -> Path:
    """The perf_analyzer executable: next to this interpreter, in the tritonclient wheel, or on PATH.

    Raises:
        PerfAnalyzerError: none found.
    """
    candidates = [Path(sys.executable).parent / "perf_analyzer"]
    spec = importlib.util.find_spec("tritonclient")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "bin" / "perf_analyzer")
    on_path = shutil.which("perf_analyzer")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise PerfAnalyzerError("perf_analyzer not found (it ships in tritonclient[all]==2.51.0 as bin/perf_analyzer)")


def cuda_runtime_lib_dir() -> Path | None:
    """The lib folder of the `nvidia-cuda-runtime-cu12` wheel, if installed."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec and spec.submodule_search_locations else []):
        lib = Path(root) / "cuda_runtime" / "lib"
        if (lib / "libcudart.so.12").exists():
            return lib
    return None


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the CUDA runtime wheel's lib folder on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    lib = cuda_runtime_lib_dir()
    if lib is not None:
        parts = [str(lib)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != str(lib)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    return env


def missing_libraries(binary: Path, env: dict[str, str] | None = None) -> list[str]:
    """Shared libraries the binary cannot load under `env`, by name (from `ldd`).

    Returns an empty list when everything resolves (or `ldd` itself is unavailable, in which
    case perf_analyzer's own error will say what is missing).
    """
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                             env=env or environment(), timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def setup_hint(missing: Sequence[str]) -> str:
    """How to install the libraries in `missing`."""
    hints = []
    if any(name.startswith("libb64") for name in missing):
        hints.append("apt-get install -y libb64-0d")
    if any(name.startswith("libcudart") for name in missing):
        hints.append("pip install -r bench/requirements.txt (nvidia-cuda-runtime-cu12==12.9.79)")
    return "; ".join(hints) or "see bench/README.md"


@dataclass
class PerfRun:
    """Merged results: one dict per CSV row (perf_analyzer's own columns plus `Batch Size`)."""

    rows: list[dict[str, str]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def write_csv(self, path: str | Path) -> Path:
        """Write the rows (union of columns, in first-seen order) to `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns: list[str] = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        return path


def run(url: str, input_data: str | Path, concurrency: Sequence[int], batch_size: int = 8,
        model: str = MODEL_NAME, request_count: int | None = None, measurement_interval_ms: int = 5000,
        stability_percentage: float = 20.0, max_trials: int = 5, timeout_s: float = 600.0,
        extra_args: Sequence[str] = ()) -> PerfRun:
    """Run perf_analyzer (gRPC) once per concurrency level.

    Args:
        url: gRPC address "host:port".
        input_data: JSON file from `bench.perf_analyzer.make_input`.
        concurrency: levels to measure, each by its own perf_analyzer process.
        batch_size: conversations per request (`-b`).
        model: model to load (the `reward` ensemble).
        request_count: when set, send exactly this many requests per level instead of
            time windows until stable (short, deterministic runs for tests).
        measurement_interval_ms / stability_percentage / max_trials: perf_analyzer's
            stabilisation settings for time-window runs.
        timeout_s: limit per perf_analyzer process.
        extra_args: appended to every command line.

    Returns:
        A `PerfRun` with one row per level.

    Raises:
        PerfAnalyzerError: binary or libraries missing, non-zero exit, or no CSV row.
    """
    binary = find_binary()
    env = environment()
    missing = missing_libraries(binary, env)
    if missing:
        raise PerfAnalyzerError(f"perf_analyzer cannot load {', '.join(missing)}: {setup_hint(missing)}")
    result = PerfRun()
    work = Path(input_data).resolve().parent
    for level in concurrency:
        csv_path = work / f".perf_analyzer_c{level}.csv"
        command = [str(binary), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(input_data),
                   "-b", str(batch_size), "--concurrency-range", f"{level}:{level}", "-f", str(csv_path)]
        if request_count:
            command += ["--request-count", str(request_count)]
        else:
            command += ["-p", str(measurement_interval_ms), "-s", str(stability_percentage),
                        "-r", str(max_trials)]
        command += list(extra_args)
        _LOGGER.info("running %s", " ".join(command))
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
        output = proc.stdout + proc.stderr
        result.logs.append(output)
        if proc.returncode != 0 or not csv_path.exists():
            raise PerfAnalyzerError(f"perf_analyzer exited {proc.returncode} at concurrency {level}: "
                                    f"{output[-2000:]}")
        rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
        csv_path.unlink()
        if not rows:
            raise PerfAnalyzerError(f"perf_analyzer wrote no result row at concurrency {level}: {output[-2000:]}")
        for row in rows:
            result.rows.append({"Batch Size": str(batch_size), **row})
    return result


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_analyzer.run", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--input-data", type=Path, required=True, help="from bench.perf_analyzer.make_input")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--request-count", type=int, default=None)
    parser.add_argument("--measurement-interval-ms", type=int, default=5000)
    parser.add_argument("--csv", type=Path, default=Path("bench/results/perf_analyzer.csv"))
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    perf = run(args.url, args.input_data, levels, args.batch_size, request_count=args.request_count,
               measurement_interval_ms=args.measurement_interval_ms)
    path = perf.write_csv(args.csv)
    _LOGGER.info("wrote %d rows to %s", len(perf.rows), path)
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
