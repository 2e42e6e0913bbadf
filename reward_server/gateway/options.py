"""The gateway's settings, apart from the app so that building the `reward-server` command line
does not import Starlette and the gRPC client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reward_client import TlsConfig

DEFAULT_PORT = 8080


@dataclass
class GatewayOptions:
    """How the gateway reaches the server and what it accepts.

    Attributes:
        url: the reward server's gRPC ``host:port`` (several replicas: comma-separated).
        host, port: where the gateway listens (loopback by default).
        max_body_bytes: largest request body; larger ones get 413 before being read whole.
        max_items: most conversations in one HTTP request.
        batch_delay_ms: how long a request waits for concurrent ones to share a gRPC request.
        batch_size: conversations per gRPC request.
        max_in_flight: gRPC requests outstanding at once.
        timeout_s: the longest a scoring request is worked on, from its arrival (a caller's
            ``X-Request-Timeout`` can only shorten it), and each gRPC attempt's deadline
            (trainers wait up to 180 s).
        api_key: when set, scoring routes need ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
        model_name: the model name answers carry when a request names none.
        tls: gRPC over TLS to the server.
    """

    url: str = "localhost:8001"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body_bytes: int = 64 << 20
    max_items: int = 4096
    batch_delay_ms: float = 2.0
    batch_size: int = 64
    max_in_flight: int = 4
    timeout_s: float = 180.0
    api_key: str | None = None
    model_name: str = "reward"
    tls: TlsConfig | None = None
