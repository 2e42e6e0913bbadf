"""This project's own protocol over HTTP: `POST /v1/score`, used by the page at `/`.

Request `{"conversations": [[{role, content}, ...], ...]}` (each a message list whose last
message is the response scored). Answer `{"results": [{"score", "attributes", "num_tokens",
"truncated"}, ...]}` in order: the same fields as the gRPC `reward` ensemble and the client SDK,
with the score after the server's attribute weighting and normalisation.
"""

from __future__ import annotations

from typing import Any

from reward_server.gateway.core import GatewayError, Item, MESSAGES, check_messages
from reward_server.gateway.protocols import Context, body_object


async def score(body: Any, ctx: Context) -> dict:
    """Score every conversation."""
    conversations = body_object(body).get("conversations")
    if not isinstance(conversations, list):
        raise GatewayError("conversations must be a list of message lists", param="conversations")
    items = [Item(MESSAGES, check_messages(c, f"conversations[{i}]")) for i, c in enumerate(conversations)]
    results = await ctx.score(items, "conversations")
    return {"results": [r.to_dict() for r in results]}


def error_body(err: GatewayError) -> dict:
    """`{"error": {"message", "param"}}`."""
    return {"error": {"message": err.message, "param": err.param}}


ROUTES = {"/v1/score": score}
