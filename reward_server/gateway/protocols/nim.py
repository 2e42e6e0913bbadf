"""NVIDIA NIM's reward models: `POST /v1/chat/completions`.

Request `{"model", "messages": [..., {"role": "assistant", ...}]}`: the conversation, the last
message being the response scored (the server applies the chat template). The answer is a chat
completion whose content is `reward:<score>` for a one-output model, or `name:value,...` over
the attributes of a multi-attribute one (as nemotron-4-340b-reward answers), with the same
pairs as `logprobs.content` entries `{token: name, logprob: value}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from reward_server.gateway.core import GatewayError, Item, MESSAGES, check_messages
from reward_server.gateway.protocols import Context, body_object
from reward_server.gateway.protocols.vllm import error_body

__all__ = ["ROUTES", "chat_completions", "error_body"]


def _text(value: float) -> str:
    # The shortest text that reads back as the same float32 the server computed.
    return np.format_float_positional(np.float32(value), unique=True, trim="-")


async def chat_completions(body: Any, ctx: Context) -> dict:
    """Score one conversation; answer as a chat completion."""
    body = body_object(body)
    if body.get("messages") is None:
        raise GatewayError("messages is missing", param="messages")
    [result] = await ctx.score([Item(MESSAGES, check_messages(body["messages"], "messages"))], "messages")
    pairs = list(result.attributes.items()) if len(result.attributes) > 1 else [("reward", result.score)]
    content = ",".join(f"{name}:{_text(value)}" for name, value in pairs)
    logprobs = [{"token": name, "logprob": float(value), "bytes": list(name.encode()), "top_logprobs": []}
                for name, value in pairs]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or ctx.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": {"content": logprobs}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens + 1,
                      "completion_tokens": 1}}


ROUTES = {"/v1/chat/completions": chat_completions}
