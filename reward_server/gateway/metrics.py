"""The gateway's own Prometheus metrics, served on its `GET /metrics`.

Per protocol and endpoint: requests by HTTP status (errors included), items (conversations)
scored, and request latency; per input kind (messages, text, ids): the sizes of the merged batches
the gateway sends to the server (`reward_server.gateway.batching`; one SDK call each, split into
gRPC requests of at most `--batch-size`). Work dropped because nobody waits for it any more:
requests whose client disconnected or whose deadline passed, their items removed before they were
sent, and merged calls cancelled because every request they carried had gone. Each app has its own
registry, so two gateways in one process (tests) do not share counts.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class GatewayMetrics:
    """The gateway's counters and histograms (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("protocol", "endpoint")
        self.requests = Counter("reward_gateway_requests", "HTTP scoring requests by protocol, endpoint and status",
                                (*labels, "status"), registry=self.registry)
        self.items = Counter("reward_gateway_items", "Conversations (items) in scoring requests", labels,
                             registry=self.registry)
        self.latency = Histogram("reward_gateway_request_seconds", "Time from a request's arrival to its answer",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batches = Histogram("reward_gateway_batch_items", "Items per merged batch sent to the server",
                                 ("kind",), buckets=BATCH_BUCKETS, registry=self.registry)
        self.cancelled_requests = Counter("reward_gateway_cancelled_requests",
                                          "Scoring requests given up before their answer: the client disconnected "
                                          "(reason=disconnected) or the request's deadline passed (reason=deadline)",
                                          (*labels, "reason"), registry=self.registry)
        self.withdrawn_items = Counter("reward_gateway_withdrawn_items",
                                       "Items of gone requests removed before they were sent to the server",
                                       ("kind",), registry=self.registry)
        self.cancelled_calls = Counter("reward_gateway_cancelled_calls",
                                       "Merged calls to the server cancelled because every request they carried "
                                       "had gone", ("kind",), registry=self.registry)

    def request(self, protocol: str, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(protocol, endpoint, str(status)).inc()
        self.latency.labels(protocol, endpoint).observe(seconds)

    def cancelled(self, protocol: str, endpoint: str, reason: str) -> None:
        """Count one request given up: reason "disconnected" or "deadline"."""
        self.cancelled_requests.labels(protocol, endpoint, reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
