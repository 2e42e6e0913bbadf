"""The gateway stops work nobody waits for (issue 30): a real gateway process in front of a real
tritonserver, a real HTTP client that goes away or runs out of time.

The server runs the tiny demo checkpoint in rows of 256 tokens; the gateway cuts its calls into
gRPC requests of 32 conversations, 4 in flight. One HTTP request of 1600 conversations of about
500 tokens is then 50 gRPC requests and about ten seconds of work (measured on a 2-core machine),
so a client that disconnects after half a second leaves most of it undone: the gateway must cancel
its call (the server drops the gRPC requests in flight), send none of the rest, and answer the
next request at once.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from reward_client import RewardClient

from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.server import TritonServer
from tests.conftest import GatewayProcess
from tests.conversations import make_conversations

LONG = 1600
GRPC_BATCH = 32
SERVER_DROPPED = "reward_dropped_requests_total"


@pytest.fixture(scope="module")
def busy_server(demo_checkpoint):
    """The tiny checkpoint in rows of 256 tokens: a long conversation is a row of its own."""
    with TritonServer(ServeOptions(checkpoint=demo_checkpoint, max_length=1024, token_budget=256)) as srv:
        yield srv


@pytest.fixture(scope="module")
def cancel_gateway(busy_server):
    with GatewayProcess(busy_server.grpc_url, "--batch-size", str(GRPC_BATCH)) as gw:
        yield gw


def long_conversations(n: int, seed: int) -> list[list[dict]]:
    """`n` distinct conversations of about 500 tokens each (no two share a prompt)."""
    words = "careful reward model scores every answer of the policy sample".split()
    return [[{"role": "user", "content": f"{seed}.{i} " + " ".join(words[(i + j) % len(words)] for j in range(80))},
             {"role": "assistant", "content": " ".join(words[(i * 3 + j) % len(words)] for j in range(20))}]
            for i in range(n)]


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def samples(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of a Prometheus endpoint."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics_text(url)) for s in family.samples}


def count(all_samples: dict, name: str, **labels) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)


def scored_conversations(grpc_url: str) -> int:
    """Conversations the server's `reward` model answered so far."""
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        [stats] = client.get_inference_statistics("reward", as_json=True)["model_stats"]
    finally:
        client.close()
    return int(stats.get("inference_count", 0))


def settled_count(grpc_url: str, quiet_s: float = 2.0, timeout_s: float = 90.0) -> int:
    """`scored_conversations` once it has stopped moving for `quiet_s`: the server is idle."""
    last, since, deadline = scored_conversations(grpc_url), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        now = scored_conversations(grpc_url)
        if now != last:
            last, since = now, time.monotonic()
    return last


def post_score(gateway, conversations, headers: dict | None = None, timeout_s: float = 120) -> tuple[int, dict, float]:
    """POST /v1/score; (status, JSON answer, seconds taken)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=timeout_s)
    started = time.monotonic()
    try:
        connection.request("POST", "/v1/score", json.dumps({"conversations": conversations}),
                           {"Content-Type": "application/json", **(headers or {})})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read()), time.monotonic() - started
    finally:
        connection.close()


def check_next_request_is_served(gateway, busy_server) -> None:
    """A small request right after: answered promptly, with the scores the gRPC path gives."""
    small = make_conversations(2, seed=8)
    status, answer, seconds = post_score(gateway, small, timeout_s=60)
    assert status == 200, answer
    with RewardClient(busy_server.grpc_url) as client:
        expected = [r.score for r in client.score(small)]
    assert [r["score"] for r in answer["results"]] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert seconds < 20, seconds


def test_a_client_that_disconnects_has_its_work_cancelled(cancel_gateway, busy_server):
    gateway = cancel_gateway
    conversations = long_conversations(LONG, seed=1)
    gateway_metrics = gateway.url + "/metrics"
    native = dict(protocol="native", endpoint="/v1/score")
    before = samples(gateway_metrics)
    server_before = metrics_text(busy_server.metrics_url)
    scored_before = settled_count(busy_server.grpc_url)

    # A trainer whose HTTP timeout is half a second: it sends, waits, and closes the connection.
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=0.5)
    connection.request("POST", "/v1/score", json.dumps({"conversations": conversations}),
                       {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        connection.getresponse()
    connection.close()

    def cancelled():
        after = samples(gateway_metrics)
        return count(after, "reward_gateway_cancelled_requests_total", **native, reason="disconnected") == \
            count(before, "reward_gateway_cancelled_requests_total", **native, reason="disconnected") + 1

    wait_for(cancelled, 10, "the gateway counting the disconnect")
    after = samples(gateway_metrics)
    # The call had been sent (its gRPC requests were in flight) and was cancelled, not left to run.
    assert count(after, "reward_gateway_cancelled_calls_total", kind="messages") == \
        count(before, "reward_gateway_cancelled_calls_total", kind="messages") + 1
    assert count(after, "reward_gateway_requests_total", **native, status="499") == \
        count(before, "reward_gateway_requests_total", **native, status="499") + 1

    check_next_request_is_served(gateway, busy_server)

    # Most of the work was never done: the rest of the call was never sent (and what was in flight
    # may have been dropped by the server). Without the cancel all LONG would be scored.
    scored = settled_count(busy_server.grpc_url) - scored_before - 2  # the 2 of the next request
    assert scored < LONG / 2, scored

    # The server's own count of requests it dropped because their client went. Checked only where
    # the server has that metric; where it has, the cancel must have reached it.
    if SERVER_DROPPED in server_before or SERVER_DROPPED in metrics_text(busy_server.metrics_url):
        def dropped(text: str) -> float:
            return count({(s.name, tuple(sorted(s.labels.items()))): s.value
                          for family in text_string_to_metric_families(text) for s in family.samples},
                         SERVER_DROPPED, model="reward", reason="cancelled")

        first = dropped(server_before)
        wait_for(lambda: dropped(metrics_text(busy_server.metrics_url)) > first, 15,
                 "the server counting the cancelled request as dropped")


def test_a_request_timeout_bounds_the_work_and_is_answered_504(cancel_gateway, busy_server):
    gateway = cancel_gateway
    """`X-Request-Timeout: 1`: the caller gets its 504 after about a second (the gateway's own
    timeout is 180 s), its call is cancelled, and the gateway goes on serving."""
    conversations = long_conversations(LONG, seed=2)
    gateway_metrics = gateway.url + "/metrics"
    native = dict(protocol="native", endpoint="/v1/score")
    before = samples(gateway_metrics)
    scored_before = settled_count(busy_server.grpc_url)

    status, answer, seconds = post_score(gateway, conversations, {"X-Request-Timeout": "1"})
    assert status == 504, answer
    assert "did not answer" in answer["error"]["message"]
    assert 1.0 <= seconds < 5.0, seconds
    after = samples(gateway_metrics)
    assert count(after, "reward_gateway_cancelled_requests_total", **native, reason="deadline") == \
        count(before, "reward_gateway_cancelled_requests_total", **native, reason="deadline") + 1
    assert count(after, "reward_gateway_cancelled_calls_total", kind="messages") == \
        count(before, "reward_gateway_cancelled_calls_total", kind="messages") + 1

    check_next_request_is_served(gateway, busy_server)
    scored = settled_count(busy_server.grpc_url) - scored_before - 2
    assert scored < LONG / 2, scored

    status, answer, _ = post_score(gateway, conversations[:1], {"X-Request-Timeout": "soon"})
    assert status == 400 and answer["error"]["param"] == "X-Request-Timeout"
