"""Closed-loop gRPC load against the `reward` ensemble with `tritonclient.grpc`.

`concurrency` client threads, each with its own connection, take the next request from the
workload (requests of `request_size` consecutive conversations, so a GRPO group travels
together), send it, wait for the answer, and take the next one, until the workload is done.
The pass's wall time gives throughput; each request's round trip gives latency.

This talks the wire contract directly (input `messages` BYTES [B, 1], one JSON message list
per row; outputs `score`, `attributes`, `num_tokens`, `truncated`) instead of using the project's client
SDK, so that the benchmark measures the server and not a client library.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.request
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_LOGGER = logging.getLogger(__name__)

MODEL_NAME = "reward"
MAX_ROWS_PER_REQUEST = 256
# All four outputs are requested: asking the ensemble for a subset without `attributes` (an
# intermediate tensor that is also an ensemble output) failed with "unexpected deadlock, at
# least one output is not set" on tritonserver 2.51 with this repository's ensemble.
OUTPUTS = ("score", "attributes", "num_tokens", "truncated")


class LoadError(RuntimeError):
    """A request failed or the server answered with the wrong shape."""


@dataclass
class LoadRun:
    """One pass over the workload.

    Attributes:
        seconds: wall time from the first send to the last answer.
        latencies: round-trip seconds per request, in request order.
        scores: float32 [N] `score` per conversation, in workload order.
        num_tokens: int [N] server-side token counts.
        truncated: bool [N].
    """

    seconds: float
    latencies: list[float]
    scores: np.ndarray
    num_tokens: np.ndarray
    truncated: np.ndarray


def encode_rows(conversations: Sequence[list[dict]]) -> np.ndarray:
    """The `messages` input tensor: object array [B, 1] of UTF-8 JSON message lists."""
    rows = [json.dumps(messages, ensure_ascii=False).encode("utf-8") for messages in conversations]
    return np.array(rows, dtype=np.object_).reshape(-1, 1)


def split_requests(count: int, request_size: int) -> list[range]:
    """Consecutive index ranges of at most `request_size` (and the wire limit of 256)."""
    if not 0 < request_size <= MAX_ROWS_PER_REQUEST:
        raise ValueError(f"request_size must be in 1..{MAX_ROWS_PER_REQUEST}, got {request_size}")
    return [range(start, min(start + request_size, count)) for start in range(0, count, request_size)]


def run_load(url: str, conversations: Sequence[list[dict]], concurrency: int, request_size: int = 8,
             model: str = MODEL_NAME, timeout_s: float = 600.0) -> LoadRun:
    """Score every conversation through the server with `concurrency` closed-loop clients.

    Args:
        url: gRPC address "host:port".
        conversations: message lists in arrival order.
        concurrency: client threads, each with one request in flight.
        request_size: conversations per request.
        model: ensemble name.
        timeout_s: per-request client timeout.

    Returns:
        A `LoadRun`.

    Raises:
        LoadError: any request failed (the first error is re-raised with its request index).
    """
    import tritonclient.grpc as grpcclient

    requests = split_requests(len(conversations), request_size)
    payloads = [encode_rows([conversations[i] for i in r]) for r in requests]
    latencies = [float("nan")] * len(requests)
    scores = np.full(len(conversations), np.nan, dtype=np.float32)
    num_tokens = np.zeros(len(conversations), dtype=np.int64)
    truncated = np.zeros(len(conversations), dtype=bool)
    clients = [grpcclient.InferenceServerClient(url=url) for _ in range(max(1, concurrency))]

    def send(client, index: int) -> None:
        rows = requests[index]
        tensor = grpcclient.InferInput("messages", [len(rows), 1], "BYTES")
        tensor.set_data_from_numpy(payloads[index])
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
        t0 = time.perf_counter()
        try:
            result = client.infer(model, [tensor], outputs=outputs, client_timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - any client error ends the pass
            raise LoadError(f"request {index} failed: {err}") from err
        latencies[index] = time.perf_counter() - t0
        score = result.as_numpy("score")
        if score is None or score.shape[0] != len(rows):
            raise LoadError(f"request {index}: expected {len(rows)} scores, got "
                            f"{None if score is None else score.shape}")
        scores[rows.start:rows.stop] = score.reshape(len(rows), -1)[:, 0]
        num_tokens[rows.start:rows.stop] = result.as_numpy("num_tokens").reshape(-1)
        truncated[rows.start:rows.stop] = result.as_numpy("truncated").reshape(-1)

    try:
        seconds = closed_loop(clients, len(requests), send)
    finally:
        for client in clients:
            client.close()
    _LOGGER.debug("c=%d: %d requests in %.2fs", concurrency, len(requests), seconds)
    return LoadRun(seconds=seconds, latencies=latencies, scores=scores, num_tokens=num_tokens,
                   truncated=truncated)


def closed_loop(clients: Sequence, jobs: int, work) -> float:
    """Run jobs 0 .. jobs - 1 from closed-loop senders, one thread per client, each taking the next job
    when its last one is done (`work(client, index)`); returns the wall seconds from a common start.

    Raises:
        the first exception a job raised (the others stop taking jobs).
    """
    queue = iter(range(jobs))
    lock = threading.Lock()
    errors: list[BaseException] = []
    gate = threading.Barrier(len(clients) + 1)

    def worker(client) -> None:
        gate.wait()
        while not errors:
            with lock:
                index = next(queue, None)
            if index is None:
                return
            try:
                work(client, index)
            except BaseException as err:  # noqa: BLE001 - the first failure ends the pass
                errors.append(err)
                return

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    gate.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


_COUNTER = re.compile(r'^reward_engine_(\w+)_total\{[^}]*\} (\S+)$', re.M)


def engine_counters(metrics_url: str | None, timeout_s: float = 10.0) -> dict[str, float] | None:
    """The engine's work counters from the server's Prometheus endpoint, summed over instances.

    Returns {"sequences", "tokens", "shared_tokens", "padded_tokens"} (whichever the server
    exports), or None when there is no URL or the endpoint cannot be read.
    """
    if not metrics_url:
        return None
    try:
        text = urllib.request.urlopen(metrics_url, timeout=timeout_s).read().decode()
    except OSError as err:
        _LOGGER.warning("cannot read %s: %s", metrics_url, err)
        return None
    return parse_engine_counters(text)


def parse_engine_counters(text: str) -> dict[str, float] | None:
    """`reward_engine_<name>_total` counters in Prometheus text, summed over label sets."""
    counters: dict[str, float] = {}
    for name, value in _COUNTER.findall(text):
        counters[name] = counters.get(name, 0.0) + float(value)
    return counters or None
