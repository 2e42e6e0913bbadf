"""The drain's admission phase (reward_server/pipeline/drain.py) against a metrics endpoint served over HTTP.

The endpoint here is a small HTTP server publishing Triton's pending-request gauge as the test
sets it; the full stop under load, on a real tritonserver, is in test_reliability.py.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reward_server.pipeline.drain import DrainState
from reward_server.supervisor.ports import free_port


class Metrics:
    """Serves `nv_inference_pending_request_count` per model; `pending` may change at any time."""

    def __init__(self, pending: dict[str, int]):
        self.pending = dict(pending)
        self.reads = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.reads += 1
                body = "".join(f'nv_inference_pending_request_count{{model="{model}",version="1"}} {count}\n'
                               for model, count in outer.pending.items()).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/metrics"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def state(tmp_path):
    drain = DrainState(tmp_path)
    drain.reset()
    return drain


def test_admission_lasts_the_grace_then_until_preprocessing_has_taken_its_queue(state):
    metrics = Metrics({"preprocessing": 3, "reward_engine": 7})
    threading.Timer(0.6, lambda: metrics.pending.update(preprocessing=0)).start()
    started = time.monotonic()
    try:
        assert state.admit_arrived(metrics.url, grace_s=0.1, timeout_s=5.0)
    finally:
        metrics.close()
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 2.0  # the engine's queue (accepted requests) does not hold admission
    assert metrics.reads >= 2 and not state.draining()  # still admitting: only `drain` refuses


def test_admission_with_an_empty_queue_ends_after_the_grace(state):
    metrics = Metrics({"preprocessing": 0, "reward_engine": 4})
    started = time.monotonic()
    try:
        assert state.admit_arrived(metrics.url, grace_s=0.3)
    finally:
        metrics.close()
    assert 0.3 <= time.monotonic() - started < 1.0


def test_admission_ends_at_its_timeout_when_the_queue_never_empties(state):
    metrics = Metrics({"preprocessing": 2})
    started = time.monotonic()
    try:
        assert not state.admit_arrived(metrics.url, grace_s=0.1, timeout_s=0.6)
    finally:
        metrics.close()
    assert 0.6 <= time.monotonic() - started < 1.5


def test_admission_without_metrics_ends_after_the_grace(state):
    started = time.monotonic()
    assert not state.admit_arrived(f"http://127.0.0.1:{free_port()}/metrics", grace_s=0.2, timeout_s=10.0)
    assert 0.2 <= time.monotonic() - started < 1.5
