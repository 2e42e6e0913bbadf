"""OpenRLHF's remote reward model: `POST /get_reward`.

Request `{"query": [str, ...], "prompts": [...], "labels": [...]}`: only `query` is read; each
query is the policy-templated prompt plus the generated response, decoded with its special
tokens, so it goes to the server's `text` entry (tokenised as given, one BOS). Answer
`{"rewards": [...], "scores": [...], "extra_logs": {...}}`, one value per query in order; an
empty `query` (OpenRLHF sends one to each extra endpoint) gets empty lists.
"""

from __future__ import annotations

from typing import Any

from reward_server.gateway.core import GatewayError, Item, TEXT
from reward_server.gateway.protocols import Context, body_object


async def get_reward(body: Any, ctx: Context) -> dict:
    """Score every query as templated text."""
    queries = body_object(body).get("query")
    if queries is None:
        raise GatewayError("query is missing: send {\"query\": [templated conversation, ...]}", param="query")
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise GatewayError("query must be a list of strings", param="query")
    results = await ctx.score([Item(TEXT, q) for q in queries], "query")
    rewards = [r.score for r in results]
    return {"rewards": rewards, "scores": rewards,
            "extra_logs": {"num_tokens": [float(r.num_tokens) for r in results],
                           "truncated": [float(r.truncated) for r in results]}}


def error_body(err: GatewayError) -> dict:
    """OpenRLHF defines no error shape; FastAPI's `detail` is what its own server would send."""
    return {"detail": err.message}


ROUTES = {"/get_reward": get_reward}
