"""Overload: does the server drop work nobody waits for, and keep its goodput past capacity? (issue 30)

Plain `tritonclient` over gRPC with a client deadline (`client_timeout`), the way trainers' reward
clients call with a timeout and retry; every request goes to 127.0.0.1 only, and every phase is
bounded in requests and time. One server (`reward-server serve` defaults, the `small` demo
checkpoint unless --checkpoint) serves all phases:

1. abandoned: `--abandoned-requests` requests of 16 long conversations (~2.5k tokens each) sent at
   once with a 15 s deadline (before issue 30 all ended DEADLINE_EXCEEDED; now most are refused at
   once). Then one request of two short conversations: how long after the deadlines is it
   answered? (Before issue 30: 215 s.) Then the same with one admitted request of 96 long
   conversations (over a minute of work) abandoned at its 15 s deadline: the engine must drop it.
2. capacity: 2 senders, requests of 8 conversations of ~1k tokens, for `--capacity-s`: the
   conversations per second the server sustains.
3. overload: `--senders` senders for `--overload-s`, each request with a `--deadline-s` deadline,
   sent again at once when it fails (a refusal, a deadline): goodput = conversations scored within
   their deadline per second, as a share of capacity (before: 7%). Errors are counted by kind.
4. recovery: after the load stops, how long until a normal request is answered, and until the
   engine's queue is empty.

Meanwhile the resident memory of tritonserver and its stubs is sampled every 0.5 s.

    .venv/bin/python -m bench.overload [--checkpoint DIR] [--json results/overload.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu reward model score policy").split()
# about 5.2 tokens a word with the demo checkpoints' tokenizer (measured): ~1k and ~2.5k-token conversations
WORDS_1000_TOKENS, WORDS_2500_TOKENS = 190, 480


def conversation(rng: random.Random, words: int) -> list[dict]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(words // 2))
    answer = " ".join(rng.choice(WORDS) for _ in range(words - words // 2))
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def encode(conversations: list[list[dict]]):
    import tritonclient.grpc as grpcclient

    data = np.array([[json.dumps(c).encode()] for c in conversations], dtype=object)
    tensor = grpcclient.InferInput("messages", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return [tensor]


def error_kind(exc: Exception) -> str:
    text = str(exc)
    for marker, kind in (("DEADLINE_EXCEEDED", "deadline_exceeded"), ("overloaded", "refused_overloaded"),
                         ("deadline passed", "refused_deadline"), ("CANCELLED", "cancelled"),
                         ("UNAVAILABLE", "unavailable")):
        if marker in text:
            return kind
    return "other: " + text[:120]


class RssSampler(threading.Thread):
    """Peak resident memory of a process tree (tritonserver and its stubs), sampled every 0.5 s."""

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root, self.peak, self.stop = root_pid, 0, threading.Event()

    def tree_rss(self) -> int:
        total, pids = 0, [self.root]
        while pids:
            pid = pids.pop()
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                pids += [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                         for c in (t / "children").read_text().split()]
            except (OSError, ValueError):
                continue
        return total

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.peak = max(self.peak, self.tree_rss())


def metric_sum(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def abandoned(url: str, rng: random.Random, requests: int, deadline_s: float) -> dict:
    import tritonclient.grpc as grpcclient

    payloads = [encode([conversation(rng, WORDS_2500_TOKENS) for _ in range(16)]) for _ in range(requests)]
    outcomes: list[str] = []

    def send(inputs):
        client = grpcclient.InferenceServerClient(url)
        try:
            client.infer("reward", inputs, client_timeout=deadline_s)
            outcomes.append("scored")
        except Exception as exc:  # noqa: BLE001 - counted by kind
            outcomes.append(error_kind(exc))

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadlines_at = started + deadline_s
    client = grpcclient.InferenceServerClient(url)
    client.infer("reward", encode([conversation(rng, 20), conversation(rng, 30)]), client_timeout=600)
    answered = time.monotonic()
    return {"requests": requests, "deadline_s": deadline_s, "outcomes": dict(Counter(outcomes)),
            "next_answered_after_deadlines_s": round(answered - deadlines_at, 2)}


def abandoned_admitted(url: str, rng: random.Random, conversations: int, deadline_s: float) -> dict:
    """One request the server admits (it is idle) and its client abandons at `deadline_s`: how long
    after that is the next small request answered?"""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    started = time.monotonic()
    try:
        client.infer("reward", encode([conversation(rng, WORDS_2500_TOKENS) for _ in range(conversations)]),
                     client_timeout=deadline_s)
        outcome = "scored"
    except Exception as exc:  # noqa: BLE001 - the deadline is the point
        outcome = error_kind(exc)
    client.infer("reward", encode([conversation(rng, 20), conversation(rng, 30)]), client_timeout=600)
    return {"conversations": conversations, "deadline_s": deadline_s, "outcome": outcome,
            "next_answered_after_deadline_s": round(time.monotonic() - started - deadline_s, 2)}


def closed_loop(url: str, rng: random.Random, senders: int, seconds: float, deadline_s: float | None,
                size: int = 8, words: int | None = None) -> dict:
    """`senders` threads sending requests of `size` conversations for `seconds`; a failed request is
    sent again at once (the same conversations). Returns counts of on-time conversations and errors."""
    import tritonclient.grpc as grpcclient

    words = words or WORDS_1000_TOKENS
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    stats = {"on_time_conversations": 0, "late_conversations": 0, "errors": Counter(), "requests": 0,
             "latencies": [], "tokens": 0}

    def sender(seed: int):
        local = random.Random(seed)
        client = grpcclient.InferenceServerClient(url)
        inputs = encode([conversation(local, words) for _ in range(size)])
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            try:
                result = client.infer("reward", inputs, client_timeout=deadline_s)
                took = time.monotonic() - sent
                with lock:
                    stats["requests"] += 1
                    stats["latencies"].append(took)
                    stats["tokens"] += int(result.as_numpy("num_tokens").sum())
                    key = "on_time_conversations" if deadline_s is None or took <= deadline_s else "late_conversations"
                    stats[key] += size
                inputs = encode([conversation(local, words) for _ in range(size)])
            except Exception as exc:  # noqa: BLE001 - counted, then sent again
                with lock:
                    stats["requests"] += 1
                    stats["errors"][error_kind(exc)] += 1
                time.sleep(0.01)  # not a backoff: just no busy loop when refused in a microsecond

    threads = [threading.Thread(target=sender, args=(rng.random(),)) for _ in range(senders)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    latencies = stats.pop("latencies")
    stats["errors"] = dict(stats["errors"])
    stats.update(seconds=round(elapsed, 1), conversations_per_s=round(stats["on_time_conversations"] / elapsed, 3),
                 latency_p50_s=round(statistics.median(latencies), 2) if latencies else None,
                 latency_max_s=round(max(latencies), 2) if latencies else None)
    return stats


def recovery(url: str, metrics_url: str, rng: random.Random) -> dict:
    import tritonclient.grpc as grpcclient

    stopped = time.monotonic()
    client = grpcclient.InferenceServerClient(url)
    client.infer("reward", encode([conversation(rng, WORDS_1000_TOKENS) for _ in range(8)]), client_timeout=600)
    answered = time.monotonic() - stopped
    idle = None
    while time.monotonic() - stopped < 120:
        pending = sum(metric_sum(metrics_url, "nv_inference_pending_request_count", model=m)
                      for m in ("reward", "preprocessing", "reward_engine", "postprocessing"))
        if pending <= 0:
            idle = time.monotonic() - stopped
            break
        time.sleep(0.25)
    return {"normal_request_answered_after_s": round(answered, 2),
            "idle_after_s": None if idle is None else round(idle, 2)}


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}; {os.cpu_count()} cores; " + " ".join(f for f in wanted if f in flags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="default: the `small` demo checkpoint, built once")
    parser.add_argument("--abandoned-requests", type=int, default=16)
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--senders", type=int, default=32)
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--deadline-s", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    from reward_server.supervisor.demo_checkpoint import build_checkpoint
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.ports import free_ports
    from reward_server.supervisor.server import TritonServer

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = Path("var/bench/small-checkpoint")
        if not (checkpoint / "config.json").exists():
            build_checkpoint(checkpoint, "small")
    grpc_port, http_port, metrics_port = free_ports(3, "127.0.0.1")
    rng = random.Random(30)
    options = ServeOptions(checkpoint=checkpoint, grpc_port=grpc_port, http_port=http_port,
                           metrics_port=metrics_port)
    results: dict = {"machine": cpu_flags(), "checkpoint": str(checkpoint), "date": time.strftime("%Y-%m-%d %H:%M")}
    with TritonServer(options) as server:
        url, metrics_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"
        sampler = RssSampler(server.process.pid)
        sampler.start()
        print("abandoned ...", file=sys.stderr)
        results["abandoned"] = abandoned(url, rng, args.abandoned_requests, 15.0)
        print(results["abandoned"], file=sys.stderr)
        results["abandoned_admitted"] = abandoned_admitted(url, rng, 96, 15.0)
        print(results["abandoned_admitted"], file=sys.stderr)
        time.sleep(2)
        print("capacity ...", file=sys.stderr)
        results["capacity"] = closed_loop(url, rng, 2, args.capacity_s, None)
        print(results["capacity"], file=sys.stderr)
        print("overload ...", file=sys.stderr)
        results["overload"] = closed_loop(url, rng, args.senders, args.overload_s, args.deadline_s)
        results["overload"]["goodput_share_of_capacity"] = round(
            results["overload"]["conversations_per_s"] / results["capacity"]["conversations_per_s"], 3)
        print(results["overload"], file=sys.stderr)
        results["recovery"] = recovery(url, metrics_url, rng)
        sampler.stop.set()
        results["peak_rss_gib"] = round(sampler.peak / 2**30, 2)
        results["dropped"] = {f"{model}/{reason}": metric_sum(metrics_url, "reward_dropped_requests_total",
                                                              model=model, reason=reason)
                              for model in ("reward", "preprocessing", "reward_engine", "postprocessing")
                              for reason in ("cancelled", "expired", "overloaded")}
        results["dropped"] = {k: v for k, v in results["dropped"].items() if v}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
