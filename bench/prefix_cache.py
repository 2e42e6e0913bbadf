"""Benchmark of a prompt cache across requests (issue 28): the server against vLLM's pooling runner
with prefix caching, on three workloads whose requests repeat earlier requests' prefixes.

    python -m bench.prefix_cache --checkpoint DIR [--prm-checkpoint DIR] --dtype float32 \\
        --workloads multi-turn,async-grpo,prm-steps --systems server,vllm --repeats 3 --out DIR

- `multi-turn`: chats scored after every turn; wave t sends every chat up to turn t's assistant
  message (one chat per request, 4 senders), waves one after another. vLLM: one classify() per
  wave on one engine whose prefix cache is kept across waves (reset once per repeat).
- `async-grpo`: bench's `grpo` workload one conversation per request, shuffled, 8 senders (group
  members arrive apart, in different requests), and for comparison grouped as bench.run sends it
  (8 conversations per request, 4 senders). vLLM: one classify() over the shuffled order.
- `prm-steps`: a process reward model scores a solution as it grows: call k is the problem and
  the first k steps, sequential per problem, 4 problems in flight. vLLM: token_classify per k
  over all problems when its pooling runner has the checkpoint's architecture.

The server's token ids go through `reward_ids` (no tokenisation on the server's side), the same
ids vLLM gets, from `bench.workload.tokenize` with the checkpoint's encoder. Each server pass
runs on a freshly started server, so its prompt cache is cold. Writes results.json and results.md
(medians over repeats) to --out; see bench/README.md, "Prompt cache across requests".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bench import grpc_load, metrics, vllm_bridge, workload
from bench.engine_profile import cpu_flags

_LOGGER = logging.getLogger("bench.prefix_cache")

WORKLOADS = ("multi-turn", "async-grpo", "prm-steps")
SYSTEMS = ("server", "vllm")
IDS_MODEL = "reward_ids"
STEP_TAG = "<extra_0>"  # reward_server.pipeline.heads.DEFAULT_STEP_TAG, Qwen2.5-Math-PRM's
MIN_SHARED = 32
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
COMPUTED_OVER_NEW_GOAL = 1.2
# The engine counters a pass reads: tokens computed, tokens saved by prefixes shared within a
# batch, and tokens taken from the prompt cache (a counter that older servers lack: 0 then).
REUSE_COUNTERS = ("shared_tokens", "prefix_cache_reused_tokens")
# Process reward architectures vLLM's pooling runner has (vllm/model_executor/models/registry.py).
VLLM_PRM_ARCHITECTURES = ("Qwen2ForProcessRewardModel",)
# --small: sizes for a smoke run (a couple of minutes with vLLM on 2 cores).
SMALL = {"conversations": 2, "turns": 2, "prompts": 2, "responses": 4, "problems": 2, "steps": 3}
FULL = {"conversations": 8, "turns": 8, "prompts": 16, "responses": 8, "problems": 8, "steps": 12}


# --- pure workload logic -------------------------------------------------------------------------


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def new_tokens(chains: Sequence[Sequence[Sequence[int]]]) -> int:
    """Tokens a perfect prompt cache computes: per chain (one conversation's successive requests),
    each request's tokens not a prefix of the one before, sum over steps of
    len(ids_t) - common_prefix_len(ids_t, ids_{t-1}), the first counted whole."""
    total = 0
    for chain in chains:
        previous: Sequence[int] = ()
        for ids in chain:
            total += len(ids) - common_prefix_len(ids, previous)
            previous = ids
    return total


def chains_of_waves(waves: Sequence[Sequence[Sequence[int]]]) -> list[list[Sequence[int]]]:
    """Waves (wave t: one id list per conversation) -> chains (per conversation: its waves in order)."""
    return [list(chain) for chain in zip(*waves)]


def shareable_tokens(ids: Sequence[Sequence[int]], min_shared: int = MIN_SHARED) -> int:
    """Prompt tokens a shared-prefix engine can skip in the whole workload: sum over the groups of
    `group_shared_prefixes` of (members - 1) x the group's prefix length."""
    from reward_server.pipeline.batching import group_shared_prefixes

    groups, _ = group_shared_prefixes(ids, min_shared=min_shared)
    return sum((len(g.members) - 1) * g.prefix_length for g in groups)


def shuffled(count: int, seed: int) -> list[int]:
    """A fixed permutation of range(count) for the seed."""
    return [int(i) for i in np.random.default_rng(seed).permutation(count)]


def warm_up_rows(first_tokens: set[int], vocab_size: int, tag_id: int | None = None, rows: int = 8,
                 length: int = 256) -> list[list[int]]:
    """Rows sharing no first token (hence no prefix) with the workload nor with each other, to warm
    a fresh server (its first batch of a realistic size is slow) without putting anything the
    workload could reuse into its prompt cache; each ends with the step tag for a process reward
    model."""
    span = max(1, min(vocab_size, 2000) - 100)
    starts = [i for i in range(100, vocab_size) if i not in first_tokens and i != tag_id][:rows]
    out = []
    for start in starts:
        ids = [start] + [i for i in (100 + (start + 7 * j) % span for j in range(1, length)) if i != tag_id]
        out.append(ids + ([tag_id] if tag_id is not None else []))
    return out


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.median(values)) if values else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


# --- the server: closed-loop senders of token-id requests -----------------------------------------


@dataclass
class PhaseRun:
    """One phase (a wave, or a whole pass): wall seconds, round trips, and rows whose server token
    count differs from the ids sent."""

    seconds: float
    latencies: list[float]
    mismatched: int = 0


@dataclass
class Senders:
    """`concurrency` gRPC clients taking jobs (a job: requests sent one after another, each a list
    of token-id rows) from a shared queue until none is left: a closed loop per sender."""

    url: str
    concurrency: int
    model: str = IDS_MODEL
    timeout_s: float = 600.0
    clients: list = field(default_factory=list)

    def __enter__(self):
        import tritonclient.grpc as grpcclient

        self.clients = [grpcclient.InferenceServerClient(url=self.url) for _ in range(max(1, self.concurrency))]
        return self

    def __exit__(self, *exc):
        for client in self.clients:
            client.close()

    def _send(self, client, rows: Sequence[Sequence[int]]) -> tuple[float, int]:
        import tritonclient.grpc as grpcclient

        lengths = np.array([len(r) for r in rows], dtype=np.int32).reshape(-1, 1)
        ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        inputs = [grpcclient.InferInput("input_ids", list(ids.shape), "INT32"),
                  grpcclient.InferInput("input_lengths", list(lengths.shape), "INT32")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(lengths)
        t0 = time.perf_counter()
        result = client.infer(self.model, inputs, client_timeout=self.timeout_s)  # every output
        seconds = time.perf_counter() - t0
        counted = result.as_numpy("num_tokens")
        if counted is None or counted.size != len(rows):
            got = None if counted is None else counted.shape
            raise grpc_load.LoadError(f"expected {len(rows)} num_tokens, got {got}")
        return seconds, int((counted.reshape(-1) != lengths.reshape(-1)).sum())

    def run(self, jobs: Sequence[Sequence[Sequence[Sequence[int]]]]) -> PhaseRun:
        """Send every job; returns when all are answered. Raises the first failure."""
        lock = threading.Lock()
        latencies: list[float] = []
        mismatched = [0]

        def work(client, index: int) -> None:
            for request in jobs[index]:
                try:
                    seconds, bad = self._send(client, request)
                except Exception as err:  # noqa: BLE001 - any failure ends the pass
                    raise grpc_load.LoadError(f"job {index} failed: {err}") from err
                with lock:
                    latencies.append(seconds)
                    mismatched[0] += bad

        seconds = grpc_load.closed_loop(self.clients, len(jobs), work)
        return PhaseRun(seconds, latencies, mismatched[0])


def engine_work(metrics_url: str | None) -> dict[str, float] | None:
    """The engine's counters (`grpc_load.engine_counters`: tokens, shared_tokens, ...) with the
    prompt cache's `prefix_cache_reused_tokens` (0 when the server does not export it)."""
    counters = grpc_load.engine_counters(metrics_url)
    if counters is None:
        return None
    counters.setdefault("prefix_cache_reused_tokens", 0.0)
    return counters


def settled_work(metrics_url: str | None, timeout_s: float = 5.0) -> dict[str, float] | None:
    """`engine_work` once two reads 0.25 s apart agree (counters are updated after the answer)."""
    last = engine_work(metrics_url)
    deadline = time.monotonic() + timeout_s
    while last is not None and time.monotonic() < deadline:
        time.sleep(0.25)
        now = engine_work(metrics_url)
        if now == last:
            break
        last = now
    return last


def work_delta(before: dict | None, after: dict | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {name: after[name] - before.get(name, 0.0) for name in after}


# --- the benchmark --------------------------------------------------------------------------------


@dataclass
class Case:
    """One workload as it is sent: server phases (each a list of jobs, run with `concurrency`
    senders), vLLM calls (one after another on one engine), and the counts reported."""

    name: str
    phases: list[list]
    concurrency: int
    vllm_calls: list[list[list[int]]]
    tokens: int
    checkpoint: Path
    new_tokens: int | None = None
    shareable_tokens: int | None = None
    tag_id: int | None = None
    vllm_task: str = "classify"
    description: str = ""
    extra: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="outcome reward checkpoint (multi-turn, async-grpo)")
    parser.add_argument("--prm-checkpoint", type=Path, default=None,
                        help="process reward checkpoint (prm-steps); default: build a small Qwen2 demo PRM "
                             "(demo-checkpoint --head process --arch qwen2) under --out")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix-cache"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help="smoke sizes: " + ", ".join(f"{k} {v}" for k, v in SMALL.items()))
    for name, value in FULL.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {value} ({SMALL[name]} with --small)")
    parser.add_argument("--step-tag", default=STEP_TAG, help="the PRM's step tag (a token of its vocabulary)")
    parser.add_argument("--threads", type=int, default=2, help="vLLM's CPU threads")
    parser.add_argument("--max-queue-seconds", type=float, default=300.0, help="the server's --max-queue-seconds")
    parser.add_argument("--vllm-python", type=Path, default=vllm_bridge.DEFAULT_PYTHON)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    for name, value in FULL.items():
        if getattr(args, name) is None:
            setattr(args, name, SMALL[name] if args.small else value)
    return args


def build_cases(args: argparse.Namespace, prm_checkpoint: Path | None) -> dict[str, Case]:
    """Generate and tokenise every workload named in --workloads."""
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    cases: dict[str, Case] = {}
    encode = workload.load_encoder(args.checkpoint) if {"multi-turn", "async-grpo"} & set(names) else None
    if "multi-turn" in names:
        spec = workload.MultiTurnSpec(conversations=args.conversations, turns=args.turns, seed=args.seed)
        chats = workload.generate_multi_turn(spec)
        waves = [workload.tokenize(wave, encode) for wave in workload.multi_turn_waves(chats)]
        cases["multi-turn"] = Case(
            "multi-turn", phases=[[[[ids]] for ids in wave] for wave in waves], concurrency=4, vllm_calls=waves,
            tokens=sum(len(s) for wave in waves for s in wave), checkpoint=args.checkpoint,
            new_tokens=new_tokens(chains_of_waves(waves)),
            description=f"{spec.conversations} chats x {spec.turns} turns; wave t = every chat up to turn t "
                        "(1 chat/request, 4 senders); vLLM: 1 classify() per wave, cache kept across waves",
            extra={"wave_tokens": [sum(len(s) for s in wave) for wave in waves],
                   "max_tokens": max(len(s) for s in waves[-1]), "spec": vars(spec)})
    if "async-grpo" in names:
        spec = workload.spec_for("grpo", prompts=args.prompts, responses=args.responses, seed=args.seed)
        ids = workload.tokenize(workload.generate(spec).conversations, encode)
        order = shuffled(len(ids), args.seed)
        tokens = sum(len(s) for s in ids)
        common = dict(tokens=tokens, checkpoint=args.checkpoint, shareable_tokens=shareable_tokens(ids),
                      extra={"conversations": len(ids), "order_seed": args.seed, "spec": vars(spec)})
        cases["async-grpo"] = Case(
            "async-grpo", phases=[[[[ids[i]]] for i in order]], concurrency=8, vllm_calls=[[ids[i] for i in order]],
            description=f"grpo {spec.prompts} x {spec.responses_per_prompt}, shuffled, 1 conversation/request, "
                        "8 senders; vLLM: 1 classify() in the same order", **common)
        request = 8
        cases["async-grpo grouped"] = Case(
            "async-grpo grouped", phases=[[[ids[i:i + request]] for i in range(0, len(ids), request)]],
            concurrency=4, vllm_calls=[], description="the same, in order, 8 conversations/request, 4 senders",
            **common)
    if "prm-steps" in names:
        from reward_server.pipeline.chat import ChatEncoder

        encoder = ChatEncoder.from_checkpoint(str(prm_checkpoint), step_tag=args.step_tag)
        spec = workload.PrmSpec(problems=args.problems, steps=args.steps, seed=args.seed)
        chains = [workload.tokenize(workload.prm_calls(prompt, steps, encoder.step_tag), encoder.encode)
                  for prompt, steps in workload.generate_prm(spec)]
        for chain in chains:
            for k, ids in enumerate(chain, 1):
                if ids.count(encoder.step_tag_id) != k:
                    raise ValueError(f"call {k} holds {ids.count(encoder.step_tag_id)} step tags, not {k}")
        calls = [list(call) for call in zip(*chains)]  # vLLM: call k of every problem together
        cases["prm-steps"] = Case(
            "prm-steps", phases=[[[[ids] for ids in chain] for chain in chains]], concurrency=4, vllm_calls=calls,
            tokens=sum(len(s) for chain in chains for s in chain), checkpoint=prm_checkpoint,
            new_tokens=new_tokens(chains), tag_id=encoder.step_tag_id, vllm_task="token_classify",
            description=f"{spec.problems} problems x {spec.steps} steps; call k = problem + first k steps, "
                        "sequential per problem, 4 problems in flight; vLLM: token_classify per k over all problems",
            extra={"max_tokens": max(len(c[-1]) for c in chains), "spec": vars(spec)})
    return cases


def server_pass(case: Case, args: argparse.Namespace) -> dict:
    """One timed pass of `case` on a freshly started server (a cold prompt cache)."""
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.server import TritonServer

    firsts = {row[0] for phase in case.phases for job in phase for request in job for row in request}
    vocab = json.loads((Path(case.checkpoint) / "config.json").read_text()).get("vocab_size", 32000)
    warm = warm_up_rows(firsts, vocab, case.tag_id)
    options = ServeOptions(checkpoint=str(case.checkpoint), dtype=args.dtype, max_queue_seconds=args.max_queue_seconds)
    t0 = time.perf_counter()
    with TritonServer(options) as server:
        startup = time.perf_counter() - t0
        try:
            with Senders(server.grpc_url, case.concurrency) as senders:
                senders.run([[warm]])
                before = settled_work(server.metrics_url)
                runs = [senders.run(phase) for phase in case.phases]
                after = settled_work(server.metrics_url)
        except grpc_load.LoadError as err:  # the server's own account goes with it: its log is removed on exit
            tail = [line for line in server.log_tail(200).splitlines() if "Error" in line or "error" in line]
            raise grpc_load.LoadError(f"{err}; server log: {' | '.join(tail[-3:])[-1500:]}") from err
    latencies = [x for run in runs for x in run.latencies]
    return {"seconds": sum(r.seconds for r in runs), "phase_seconds": [r.seconds for r in runs],
            "requests": len(latencies), "latency_p50_s": float(np.percentile(latencies, 50)),
            "latency_p99_s": float(np.percentile(latencies, 99)), "mismatched_rows": sum(r.mismatched for r in runs),
            "startup_s": startup, "work": work_delta(before, after)}


def summarize_server(case: Case, runs: list[dict]) -> dict:
    seconds = median([r["seconds"] for r in runs])
    works = [r["work"] for r in runs if r.get("work")]
    work = {name: median([w.get(name, 0.0) for w in works]) for name in (works[0] if works else {})}
    out = {"seconds": [r["seconds"] for r in runs], "median_s": seconds, "tok_s": ratio(case.tokens, seconds),
           "phase_seconds": [r["phase_seconds"] for r in runs], "work": work, "runs": runs,
           "mismatched_rows": max(r["mismatched_rows"] for r in runs)}
    if work:
        out["computed_tokens"] = work.get("tokens", math.nan)
        out["reused_tokens"] = sum(work.get(name, 0.0) for name in REUSE_COUNTERS)
        if case.shareable_tokens:
            out["reused_share"] = ratio(out["reused_tokens"], case.shareable_tokens)
        if case.new_tokens:
            out["computed_over_new"] = ratio(out["computed_tokens"], case.new_tokens)
    return out


def summarize_vllm(case: Case, result: dict) -> dict:
    if result.get("error"):
        return {"error": result["error"]}
    seconds = median(result["seconds"])
    return {"seconds": result["seconds"], "median_s": seconds, "tok_s": ratio(case.tokens, seconds),
            "call_seconds": result["call_seconds"], "cached_tokens": median(result.get("cached_tokens") or [None])}


class Run:
    """State of one invocation: the cases, what was measured, notes; writes the outputs."""

    def __init__(self, args: argparse.Namespace, command: str):
        self.args = args
        self.command = command
        self.started = time.time()
        self.load_before = os.getloadavg()
        self.systems = {s.strip() for s in args.systems.split(",") if s.strip()}
        self.notes: list[str] = []
        self.prm_checkpoint = args.prm_checkpoint
        if "prm-steps" in args.workloads and self.prm_checkpoint is None:
            self.prm_checkpoint = self._build_prm()
        self.cases = build_cases(args, self.prm_checkpoint)
        self.results: dict[str, dict] = {name: {} for name in self.cases}

    def _build_prm(self) -> Path:
        from reward_server.supervisor.demo_checkpoint import build_checkpoint

        path = self.args.out / "prm-checkpoint"
        if not (path / "config.json").exists():
            _LOGGER.info("building the small Qwen2 demo PRM in %s", path)
            build_checkpoint(path, size="small", arch="qwen2", head="process")
        return path

    def run_server(self) -> None:
        for name, case in self.cases.items():
            runs = []
            for index in range(self.args.repeats):
                try:
                    runs.append(server_pass(case, self.args))
                except Exception as err:  # noqa: BLE001 - keep the other workloads
                    _LOGGER.exception("server on %s failed", name)
                    self.notes.append(f"server on {name} failed: {type(err).__name__}: {str(err)[:300]}")
                    break
                _LOGGER.info("server %s repeat %d/%d: %.2fs (start-up %.1fs), work %s", name, index + 1,
                             self.args.repeats, runs[-1]["seconds"], runs[-1]["startup_s"], runs[-1]["work"])
            if runs:
                self.results[name]["server"] = summarize_server(case, runs)
                if runs[-1]["mismatched_rows"]:
                    self.notes.append(f"server on {name}: num_tokens differ from the ids sent in "
                                      f"{runs[-1]['mismatched_rows']} rows")
            self.write()

    def run_vllm(self) -> None:
        python = Path(self.args.vllm_python).absolute() if self.args.vllm_python else None
        if not python or not python.exists():
            self.notes.append(f"vLLM skipped: no venv python at {python} (see bench/README.md)")
            return
        by_checkpoint: dict[Path, dict[str, Case]] = {}
        for name, case in self.cases.items():
            if not case.vllm_calls:
                continue
            if case.vllm_task != "classify":
                config = json.loads((Path(case.checkpoint) / "config.json").read_text())
                arch = (config.get("architectures") or ["?"])[0]
                if arch not in VLLM_PRM_ARCHITECTURES:
                    self.notes.append(f"vLLM skipped on {name}: its pooling runner has no process reward model "
                                      f"for {arch} (it has {', '.join(VLLM_PRM_ARCHITECTURES)})")
                    continue
            by_checkpoint.setdefault(Path(case.checkpoint), {})[name] = case
        for index, (checkpoint, cases) in enumerate(by_checkpoint.items()):
            passes = {name: {"calls": case.vllm_calls, "task": case.vllm_task} for name, case in cases.items()}
            try:
                out = vllm_bridge.run_passes(python, checkpoint, passes, self.args.repeats, self.args.out,
                                             threads=self.args.threads, dtype=self.args.dtype,
                                             stem=f"vllm_passes_{index}")
            except (subprocess.SubprocessError, OSError, ValueError) as err:
                detail = (getattr(err, "stderr", None) or "").strip().splitlines()[-1:]
                self.notes.append(f"vLLM on {', '.join(cases)} failed: {str(err)[:200]} {' '.join(detail)[:300]}")
                _LOGGER.warning("vLLM failed: %s", err)
                continue
            self.vllm_version = out.get("version")
            for name, result in out.get("passes", {}).items():
                self.results[name]["vllm"] = summarize_vllm(cases[name], result)
                if result.get("error"):
                    self.notes.append(f"vLLM on {name} failed: {result['error'][:300]}")
            self.write()

    def document(self) -> dict:
        results = {}
        for name, case in self.cases.items():
            entry = {"description": case.description, "tokens": case.tokens, "new_tokens": case.new_tokens,
                     "shareable_tokens": case.shareable_tokens, "checkpoint": str(case.checkpoint), **case.extra,
                     **self.results[name]}
            server, vllm = entry.get("server", {}), self.results.get(name, {}).get("vllm") or {}
            if name == "async-grpo grouped":
                vllm = self.results.get("async-grpo", {}).get("vllm") or {}
            entry["server_over_vllm"] = ratio(server.get("tok_s", math.nan), vllm.get("tok_s", math.nan))
            results[name] = entry
        return {
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "duration_s": time.time() - self.started,
            "machine": machine(),
            "load_average": {"before": list(self.load_before), "after": list(os.getloadavg())},
            "checkpoint": str(self.args.checkpoint), "prm_checkpoint": str(self.prm_checkpoint or ""),
            "dtype": self.args.dtype, "repeats": self.args.repeats, "seed": self.args.seed,
            "vllm_version": getattr(self, "vllm_version", None),
            "server_restarted_per_pass": True,
            "results": results, "notes": self.notes,
        }

    def write(self) -> dict:
        doc = self.document()
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "results.json").write_text(json.dumps(metrics.without_nan(doc), indent=2, default=str))
        (self.args.out / "results.md").write_text(markdown(doc))
        return doc


def machine() -> dict:
    """CPU model, logical CPUs and the vector-ISA flags that matter here."""
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    models = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    flags = set(cpu_flags())
    info["cpu"] = models[0] if models else None
    info["logical_cpus"] = len(models)
    info["flags"] = {flag: flag in flags for flag in CPU_FLAGS}
    return info


def _fmt(value, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and digits == 0:
        return f"{value:,.0f}{suffix}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value:,}{suffix}"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m.get("flags", {}).items())
    load = doc["load_average"]
    lines = [
        "# Prompt cache across requests (issue 28): server vs vLLM", "",
        f"`{doc['command']}`", "",
        f"- started {doc['started']}, {doc['duration_s']:.0f} s; dtype {doc['dtype']}; {doc['repeats']} repeats "
        f"(medians); a freshly started server per pass (cold prompt cache); vLLM {doc.get('vllm_version') or '-'}, "
        "prefix cache reset once per repeat",
        f"- machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs; {flags}",
        f"- load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load['before'])}, "
        f"after {'/'.join(f'{x:.2f}' for x in load['after'])}",
        f"- checkpoints: {doc['checkpoint']}" + (f"; PRM {doc['prm_checkpoint']}" if doc.get("prm_checkpoint") else ""),
        "",
        "| workload | tokens sent | new tokens | server s | server tok/s | vLLM s | vLLM tok/s | server / vLLM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in doc["results"].items():
        s, v = r.get("server") or {}, r.get("vllm") or {}
        vllm_s = _fmt(v.get("median_s"), 2) if "median_s" in v else ("failed" if v.get("error") else "-")
        lines.append(f"| {name} | {_fmt(r['tokens'])} | {_fmt(r.get('new_tokens'))} | {_fmt(s.get('median_s'), 2)} | "
                     f"{_fmt(s.get('tok_s'))} | {vllm_s} | {_fmt(v.get('tok_s'))} | "
                     f"{_fmt(r.get('server_over_vllm'), 2)} |")
    lines += ["", "Server engine work per pass (median counter deltas, `reward_engine_*_total`), "
              "vLLM's prefix-cache hits:", "",
              "| workload | computed tokens | shared in batch | prompt-cache reused | reused / shareable | "
              "computed / new | vLLM cached tokens |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in doc["results"].items():
        s, v = r.get("server") or {}, r.get("vllm") or {}
        work = s.get("work") or {}
        share = s.get("reused_share")
        share_text = (f"{_fmt(s.get('reused_tokens'))} / {_fmt(r['shareable_tokens'])} = {share:.0%}"
                      if share is not None and not math.isnan(share) else "-")
        con = s.get("computed_over_new")
        con_text = "-"
        if con is not None and not math.isnan(con):
            con_text = f"{con:.2f}"
            if name == "prm-steps":
                verdict = "met" if con <= COMPUTED_OVER_NEW_GOAL else "not met"
                con_text += f" (goal <= {COMPUTED_OVER_NEW_GOAL}: {verdict})"
        lines.append(f"| {name} | {_fmt(work.get('tokens'))} | {_fmt(work.get('shared_tokens'))} | "
                     f"{_fmt(work.get('prefix_cache_reused_tokens'))} | {share_text} | {con_text} | "
                     f"{_fmt(v.get('cached_tokens'))} |")
    lines += ["", "Workloads:", ""]
    lines += [f"- `{name}`: {r['description']}" for name, r in doc["results"].items()]
    lines += ["", "*new tokens*: per conversation, each request's tokens not a prefix of its previous request "
              "(what a perfect prompt cache computes). *shareable*: sum over `group_shared_prefixes` groups "
              f"(min_shared {MIN_SHARED}) of (members - 1) x prefix length. *reused*: `shared_tokens` + "
              "`prefix_cache_reused_tokens` (0 where the server lacks it). `async-grpo grouped`'s server / vLLM "
              "uses vLLM's `async-grpo` pass (the same ids). vLLM's `prm-steps` runs each k as one call over every "
              "problem (offline engine: no concurrent senders), with its STEP pooler, for which vLLM says prefix "
              "caching is not supported (forced on here; see its cached tokens)."]
    if doc["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in doc["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser_args = parse_args(argv)
    logging.basicConfig(level=parser_args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if parser_args.repeats < 3:
        _LOGGER.warning("--repeats %d < 3: fine for a smoke run, not for reported numbers", parser_args.repeats)
    parser_args.out.mkdir(parents=True, exist_ok=True)
    run = Run(parser_args, " ".join([Path(sys.executable).name, "-m", "bench.prefix_cache"] + argv))
    for system in ("server", "vllm"):
        if system in run.systems:
            try:
                getattr(run, f"run_{system}")()
            except Exception as err:  # noqa: BLE001 - keep what the other system measured
                _LOGGER.exception("%s failed", system)
                run.notes.append(f"{system} failed: {type(err).__name__}: {str(err)[:300]}")
    doc = run.write()
    _LOGGER.info("wrote %s/results.json, results.md", parser_args.out)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
