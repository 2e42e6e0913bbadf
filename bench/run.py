"""One command that benchmarks everything on this machine and writes the results.

    python -m bench.run --checkpoint DIR --out bench/results

In one run, on each workload (GRPO groups, no sharing, large GRPO), it measures: the matmul
peak; the naive baseline; the project's engine in-process; the full server through gRPC at
several client concurrencies; and, when its virtual environment exists, vLLM's CPU pooling
runner. Every measurement is repeated (`--repeats`, at least 3 for reported numbers) and the
median taken. It writes `results.json`, `results.md` and `results.png` to `--out`.
Parts whose code is missing (engine, launcher, vLLM) are reported as unavailable.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bench import baselines, grpc_load, metrics, report, vllm_bridge, workload
from bench.engine_profile import cpu_flags

_LOGGER = logging.getLogger("bench.run")

SYSTEMS = ("matmul", "naive", "engine", "server", "vllm")
OPTIONAL_SYSTEMS = ("perf_analyzer",)  # only when named in --systems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="reward checkpoint; default: build the small demo checkpoint under --out")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--prompts", type=int, default=16, help="K prompts")
    parser.add_argument("--responses", type=int, default=8, help="n responses per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in-process")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client concurrencies")
    parser.add_argument("--request-size", type=int, default=8, help="conversations per gRPC request")
    parser.add_argument("--workloads", default="grpo,no-sharing",
                        help="comma-separated: grpo, no-sharing, grpo-large (16 x 16, prompts ~500 and responses "
                             "~800 tokens), long (2 x 4, responses of 2k-8k tokens; the small-long demo checkpoint); "
                             "--prompts/--responses apply to grpo and no-sharing only")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of every system (engine, server, vLLM, naive) and of the matmul peak")
    parser.add_argument("--compile", action="store_true",
                        help="engine and server with torch.compile of the decoder layers (--compile of serve)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS + OPTIONAL_SYSTEMS)}; "
                        "perf_analyzer (CSV per workload, same server) runs only when named")
    parser.add_argument("--max-queue-seconds", type=float, default=300.0,
                        help="the server's --max-queue-seconds: closed-loop clients measure throughput, not the "
                             "overload policy (bench.overload does); with a slow model (a 0.6B model on 2 cores: "
                             "~3.5 s per 8-conversation request) the default 2 s refuses concurrent requests")
    parser.add_argument("--prefix-cache-mb", type=float, default=0.0,
                        help="the server's --prefix-cache-mb (default 0: off): every repeat sends the same "
                             "conversations, which a warm cache would serve from the first pass (vLLM's prefix "
                             "cache is reset before each repeat); bench.prefix_cache measures the cache")
    parser.add_argument("--vllm-python", type=Path, default=vllm_bridge.DEFAULT_PYTHON,
                        help="python of the separate vLLM venv (skipped when absent)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def machine_description() -> dict:
    """CPU model, core count, memory and library versions, for the report header."""
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        flags = cpu_flags()
        info["cpu"] = models[0] if models else platform.processor()
        info["logical_cpus"] = len(models)
        info["avx512"] = "avx512f" in flags
        info["avx2"] = "avx2" in flags
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    for module in ("torch", "transformers", "tritonclient", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            info[module] = None
    return info


def repeat(count: int, once: Callable[[], dict], label: str) -> list[dict]:
    """Call `once` `count` times, logging each wall time."""
    runs = []
    for index in range(count):
        run = once()
        _LOGGER.info("%s repeat %d/%d: %.2fs", label, index + 1, count, run["seconds"])
        runs.append(run)
    return runs


def agreement(scores: np.ndarray, reference: np.ndarray | None) -> dict:
    """Largest absolute and relative difference of the first output against a reference."""
    if reference is None or scores is None:
        return {}
    a = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)[:, 0]
    b = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)[:, 0]
    diff = np.abs(a - b)
    return {"max_abs_diff_vs_naive": float(diff.max()),
            "max_rel_diff_vs_naive": float((diff / np.maximum(np.abs(b), 1e-6)).max())}


class Bench:
    """State of one benchmark run: the workloads, their token ids and the results so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.systems = {s.strip() for s in args.systems.split(",") if s.strip()}
        self.results: list[metrics.Measurement] = []
        self.notes: list[str] = []
        self.naive_scores: dict[str, np.ndarray] = {}
        self.checkpoint = args.checkpoint or self._build_demo_checkpoint()
        self.params = metrics.non_embedding_parameters(self.checkpoint)
        self.workloads: dict[str, workload.Workload] = {}
        self.token_ids: dict[str, list[list[int]]] = {}
        encode = workload.load_encoder(self.checkpoint)
        for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            spec = workload.spec_for(name, prompts=args.prompts, responses=args.responses, seed=args.seed)
            self.workloads[name] = workload.generate(spec)
            self.token_ids[name] = workload.tokenize(self.workloads[name].conversations, encode)

    def _build_demo_checkpoint(self) -> Path:
        from reward_server.supervisor.demo_checkpoint import build_checkpoint

        # the `long` workload's conversations (up to 8k tokens) need the 32k-position variant (same weights)
        size = "small-long" if "long" in self.args.workloads.split(",") else "small"
        path = self.args.out / f"checkpoint-{size}"
        if not (path / "config.json").exists():
            _LOGGER.info("building the %s demo checkpoint in %s", size, path)
            build_checkpoint(path, size=size)
        return path

    def _record(self, system: str, name: str, runs: list[dict], **kwargs) -> metrics.Measurement:
        ids = self.token_ids[name]
        measurement = metrics.summarize_repeats(
            system, name, len(ids), sum(len(s) for s in ids), metrics.unique_tokens(ids), runs, **kwargs)
        self.results.append(measurement)
        _LOGGER.info("%s on %s: %.0f tok/s, %.2f conv/s, p99 %.2fs", system, name,
                     measurement.tokens_per_s, measurement.conversations_per_s, measurement.latency_p99_s)
        return measurement

    def run_matmul(self) -> dict:
        return baselines.matmul_peak(threads=self.args.threads, dtype=self.args.dtype)

    def run_naive(self) -> None:
        model = baselines.NaiveBaseline(self.checkpoint, threads=self.args.threads, dtype=self.args.dtype)
        for name, ids in self.token_ids.items():
            model.warm_up(ids)
            last = {}

            def once():
                run = model.run(ids)
                last["scores"] = run.scores
                return {"seconds": run.seconds, "latencies": run.latencies, "padding_ratio": run.padding_ratio}

            runs = repeat(self.args.repeats, once, f"naive/{name}")
            self.naive_scores[name] = last["scores"]
            tokens = float(sum(len(s) for s in ids))
            work = {"sequences": float(len(ids)), "tokens": tokens, "shared_tokens": 0.0,
                    "padded_tokens": tokens / (1.0 - runs[-1]["padding_ratio"])}
            self._record("naive", name, runs, extra={"latency_unit": "batch of 16", "engine_work": work})
        del model
        gc.collect()

    def run_engine(self) -> None:
        try:
            from reward_server.pipeline.torch_engine.engine import RewardEngine
        except ImportError as err:
            self.notes.append(f"engine not available: {err}")
            _LOGGER.warning("engine not available: %s", err)
            return
        engine = RewardEngine.from_checkpoint(self.checkpoint, device="cpu", threads=self.args.threads,
                                              dtype=self.args.dtype, compile=self.args.compile,
                                              prefix_cache_mb=self.args.prefix_cache_mb)
        for name, ids in self.token_ids.items():
            engine.score([s[:64] for s in ids[:2]])
            last = {}

            def once():
                stats = getattr(engine, "stats", None)
                before = _stats_snapshot(stats)
                t0 = time.perf_counter()
                last["scores"] = engine.score(ids)
                seconds = time.perf_counter() - t0
                last["work"] = _counter_delta(before, _stats_snapshot(stats))
                return {"seconds": seconds, "latencies": [seconds], "padding_ratio": _padding(last["work"])}

            runs = repeat(self.args.repeats, once, f"engine/{name}")
            extra = {"latency_unit": "whole workload in one score() call",
                     "token_budget": getattr(engine, "token_budget", None), "engine_work": last.get("work")}
            extra.update(agreement(last["scores"], self.naive_scores.get(name)))
            self._record("engine", name, runs, extra=extra)
        del engine
        gc.collect()

    def run_server(self) -> None:
        try:
            from reward_server.supervisor.options import ServeOptions
            from reward_server.supervisor.server import TritonServer
        except ImportError as err:
            self.notes.append(f"server not available: {err}")
            _LOGGER.warning("server not available: %s", err)
            return
        levels = [int(c) for c in self.args.concurrency.split(",") if c.strip()]
        options = ServeOptions(checkpoint=str(self.checkpoint), dtype=self.args.dtype, compile=self.args.compile,
                               max_queue_seconds=self.args.max_queue_seconds,
                               prefix_cache_mb=self.args.prefix_cache_mb)
        with TritonServer(options) as server:
            url = server.grpc_url
            metrics_url = getattr(server, "metrics_url", None)
            _LOGGER.info("server ready at %s", url)
            for name, conversations in ((n, w.conversations) for n, w in self.workloads.items()):
                expected = np.array([len(s) for s in self.token_ids[name]])
                grpc_load.run_load(url, conversations[: self.args.request_size], 1, self.args.request_size)
                for concurrency in levels:
                    last = {}

                    def once():
                        before = grpc_load.engine_counters(metrics_url)
                        run = grpc_load.run_load(url, conversations, concurrency, self.args.request_size)
                        after = grpc_load.engine_counters(metrics_url)
                        last["run"], last["work"] = run, _counter_delta(before, after)
                        return {"seconds": run.seconds, "latencies": run.latencies,
                                "padding_ratio": _padding(last["work"])}

                    runs = repeat(self.args.repeats, once, f"server c={concurrency}/{name}")
                    run = last["run"]
                    extra = {"latency_unit": f"request of {self.args.request_size} conversations",
                             "num_tokens_match": bool(np.array_equal(run.num_tokens, expected)),
                             "truncated": int(run.truncated.sum()), "engine_work": last["work"]}
                    extra.update(agreement(run.scores, self.naive_scores.get(name)))
                    if not extra["num_tokens_match"]:
                        _LOGGER.warning("server token counts differ from the harness tokenisation on %s", name)
                    self._record("server", name, runs, concurrency=concurrency, extra=extra)
                if "perf_analyzer" in self.systems:
                    self._perf_analyzer(url, name, levels)

    def _perf_analyzer(self, url: str, name: str, levels: list[int]) -> None:
        """perf_analyzer on the same server and workload, one pass of the workload per level."""
        from bench.perf_analyzer import make_input, run as perf

        data = make_input.write_input(self.args.out / f"perf_analyzer_{name}.json", self.workloads[name].spec)
        requests = len(grpc_load.split_requests(len(self.workloads[name]), self.args.request_size))
        try:
            result = perf.run(url, data, levels, self.args.request_size, request_count=requests)
        except perf.PerfAnalyzerError as err:
            self.notes.append(f"perf_analyzer on {name}: {err}")
            _LOGGER.warning("perf_analyzer on %s: %s", name, err)
            return
        path = result.write_csv(self.args.out / f"perf_analyzer_{name}.csv")
        data.unlink()
        self.notes.append(f"perf_analyzer on {name}: {path.name}")

    def run_vllm(self) -> None:
        # Absolute: the runner starts in another working directory, where a relative path fails.
        python = Path(self.args.vllm_python).absolute() if self.args.vllm_python else None
        if not python or not python.exists():
            self.notes.append(f"vLLM skipped: no venv python at {python} (see bench/README.md)")
            _LOGGER.info("vLLM skipped: %s not found", python)
            return
        try:
            out = vllm_bridge.run(python, self.checkpoint, self.token_ids, self.args.repeats, self.args.out,
                                  threads=self.args.threads, dtype=self.args.dtype)
        except (subprocess.SubprocessError, OSError, ValueError) as err:
            detail = (getattr(err, "stderr", None) or "").strip().splitlines()[-1:]
            self.notes.append(f"vLLM failed: {str(err)[:200]} {' '.join(detail)[:300]}")
            _LOGGER.warning("vLLM failed: %s", err)
            return
        for name, result in out["workloads"].items():
            runs = [{"seconds": s, "latencies": [s]} for s in result["seconds"]]
            extra = {"latency_unit": "whole workload in one classify() call", "version": out.get("version")}
            extra.update(agreement(np.array(result["scores"]), self.naive_scores.get(name)))
            self._record("vllm", name, runs, extra=extra)


_WORK_COUNTERS = ("sequences", "tokens", "shared_tokens", "padded_tokens")


def _stats_snapshot(stats) -> dict[str, float] | None:
    """The engine's work counters (`EngineStats` fields that exist), or None without stats."""
    if stats is None:
        return None
    snapshot = {name: float(getattr(stats, name)) for name in _WORK_COUNTERS if hasattr(stats, name)}
    return snapshot or None


def _counter_delta(before: dict | None, after: dict | None) -> dict[str, float] | None:
    """What the engine did between two counter snapshots (in-process stats or server metrics)."""
    if before is None or after is None:
        return None
    return {name: after[name] - before.get(name, 0.0) for name in after}


def _padding(work: dict | None) -> float:
    """Padding / computed positions from a counter delta; NaN when not reported."""
    if not work or not work.get("padded_tokens"):
        return math.nan
    return 1.0 - work.get("tokens", 0.0) / work["padded_tokens"]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results document that was written.

    Results are rewritten after every system, so a failure or an interrupt late in the run
    keeps what was measured; a system that raises is recorded in the notes and skipped.
    """
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.repeats < 3:
        _LOGGER.warning("--repeats %d < 3: fine for a smoke run, not for reported numbers", args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, "-m", "bench.run"] + (argv if argv is not None else sys.argv[1:]))
    context = {"started": time.time(), "load_before": os.getloadavg()[0], "command": command,
               "peak": {"gflops": math.nan}}
    bench = Bench(args)
    if "matmul" in bench.systems:
        context["peak"] = bench.run_matmul()
    for system in ("naive", "engine", "server", "vllm"):
        if system not in bench.systems:
            continue
        try:
            getattr(bench, f"run_{system}")()
        except Exception as err:  # noqa: BLE001 - keep the other systems' results
            _LOGGER.exception("%s failed", system)
            bench.notes.append(f"{system} failed: {type(err).__name__}: {str(err)[:300]}")
        write_outputs(bench, context, plot=False)
    return write_outputs(bench, context, plot=True)


def write_outputs(bench: Bench, context: dict, plot: bool) -> dict:
    """Build the results document from what `bench` measured so far and write it to --out."""
    args = bench.args
    peak = context["peak"]
    naive = {m.workload: m for m in bench.results if m.system == "naive"}
    document = {
        "command": context["command"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(context["started"])),
        "duration_s": time.time() - context["started"],
        "machine": machine_description(),
        # Other processes on the machine skew everything; the 1-minute load says how busy it was.
        "load_average_1min": {"start": context["load_before"], "end": os.getloadavg()[0]},
        "checkpoint": str(bench.checkpoint),
        "non_embedding_params": bench.params,
        "dtype": args.dtype,
        "compile": args.compile,
        "matmul_peak": peak,
        "workloads": {name: {"conversations": len(ids), "tokens": sum(len(s) for s in ids),
                             "unique_tokens": metrics.unique_tokens(ids),
                             "max_tokens": max(len(s) for s in ids),
                             "spec": vars(bench.workloads[name].spec)}
                      for name, ids in bench.token_ids.items()},
        "repeats": args.repeats,
        "request_size": args.request_size,
        "results": [m.to_dict(bench.params, peak["gflops"] * 1e9, naive.get(m.workload)) for m in bench.results],
        "notes": bench.notes,
    }
    document["summary"] = report.summarize(document)
    (args.out / "results.json").write_text(json.dumps(metrics.without_nan(document), indent=2, default=_json_default))
    (args.out / "results.md").write_text(report.markdown(document))
    plotted = plot and report.plot(document, args.out / "results.png")
    _LOGGER.info("wrote %s/results.json, results.md%s", args.out, ", results.png" if plotted else "")
    return document


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()
