"""One module per wire protocol. Each exposes `ROUTES` (path -> handler) and `error_body`.

A handler takes the parsed JSON body and the gateway `Context` and returns the JSON answer; it
raises `GatewayError` for anything wrong, which the app turns into that protocol's error shape
with `error_body`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from reward_client import ScoreResult

from reward_server.gateway.batching import Coalescer
from reward_server.gateway.core import GatewayError, Item


@dataclass
class Context:
    """What a handler needs: the batcher, the model name answers carry, where the request came in
    (for the gateway's metrics) and its deadline (event-loop time, `loop.time()`; None: none)."""

    coalescer: Coalescer
    model_name: str = "reward"
    max_items: int = 4096
    metrics: Optional[Any] = None  # GatewayMetrics
    protocol: str = ""
    endpoint: str = ""
    deadline: Optional[float] = None

    async def score(self, items: Sequence[Item], where: str) -> list[ScoreResult]:
        """Score a request's items; the first bad one fails the request, named `where[i]`.

        Raises:
            GatewayError: too many items, an item's error (prefixed with its place), or the
                deadline passed (504).
        """
        if len(items) > self.max_items:
            raise GatewayError(f"{where} holds {len(items)} inputs, over the limit of {self.max_items} per request",
                               "too_large", where)
        if self.metrics is not None:
            self.metrics.items.labels(self.protocol, self.endpoint).inc(len(items))
        outcomes = await self.coalescer.score(items, self.deadline)
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, GatewayError):
                raise outcome.at(f"{where}[{index}]") if outcome.kind == "invalid_input" else outcome
        return outcomes


def body_object(body: Any) -> dict:
    """The request body as a JSON object. Raises GatewayError otherwise."""
    if not isinstance(body, dict):
        raise GatewayError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def usage(results: Sequence[ScoreResult]) -> dict:
    """OpenAI-style token usage: every scored token is a prompt token."""
    tokens = sum(r.num_tokens for r in results)
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
