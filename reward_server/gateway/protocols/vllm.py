"""vLLM's pooling endpoints (`POST /classify`, `POST /pooling`) and SGLang's `POST /v1/embeddings`.

verl's reward loop sends `{"model", "input": TEXT, "use_activation": false}` to `/classify` and
reads `data[-1].probs[-1]`; its SGLang variant reads `data[-1].embedding[-1]` from
`/v1/embeddings`. Inputs, as vLLM takes them:

- `input`: a string or a list of strings (already templated: the `text` entry, one BOS), token
  ids or a list of token id lists (the `reward_ids` entry);
- `messages`: one conversation (the server applies the chat template).

`use_activation` (or the legacy `activation`): absent or true gives vLLM's classifier activation
(sigmoid for one output, softmax for several), false gives the raw head outputs. SGLang's
embeddings are always raw. `model` is accepted and ignored.

A process reward model answers `/pooling` with `"task": "token_classify"` (or no task), as vLLM
answers for Qwen2.5-Math-PRM: `data[i].data` holds one `[p_negative, p_positive]` row per step tag
(the server returns the positive probability; the negative one is its complement).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from reward_client import ScoreResult

from reward_server.gateway.core import (IDS, MESSAGES, TEXT, GatewayError, Item, activate, check_ids, check_messages,
                                        head_outputs)
from reward_server.gateway.protocols import Context, body_object, usage

_TYPES = {"invalid_input": "BadRequestError", "too_large": "BadRequestError", "unavailable": "ServiceUnavailableError",
          "timeout": "TimeoutError", "server_error": "InternalServerError"}


def parse_input(body: dict, allow_messages: bool = True) -> list[Item]:
    """The items of a vLLM/SGLang request body, in order.

    Raises:
        GatewayError: neither `input` nor `messages`, or an input of another shape.
    """
    if allow_messages and body.get("messages") is not None:
        return [Item(MESSAGES, check_messages(body["messages"], "messages"))]
    value = body.get("input")
    if value is None:
        raise GatewayError("input is missing" + (" (or send messages)" if allow_messages else ""), param="input")
    if isinstance(value, str):
        return [Item(TEXT, value)]
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return [Item(TEXT, v) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [Item(IDS, value)]
        if all(isinstance(v, list) for v in value):
            return [Item(IDS, check_ids(v, f"input[{i}]")) for i, v in enumerate(value)]
    raise GatewayError("input must be a string, a list of strings, a list of token ids or a list of token id lists",
                       param="input")


def wants_activation(body: dict) -> bool:
    """vLLM's `use_activation`, falling back to the legacy `activation`; default true.

    Raises:
        GatewayError: a value that is not a boolean.
    """
    for key in ("use_activation", "activation"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise GatewayError(f"{key} must be true or false, got {value!r}", param=key)
            return value
    return True


POOLING_TASKS = ("classify", "token_classify", "embed", "score", "token_embed", "encode")


def _values(result: ScoreResult, activated: bool) -> list[float]:
    raw = head_outputs(result)
    return activate(raw) if activated else raw


def _step_rows(result: ScoreResult, activated: bool) -> list[list[float]]:
    if not activated:
        raise GatewayError("use_activation false: a process reward model is answered with step probabilities "
                           "only", param="use_activation")
    return [[1.0 - p, p] for p in result.steps]


def _envelope(prefix: str, body: dict, ctx: Context, data: list, results: list[ScoreResult]) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": body.get("model") or ctx.model_name, "data": data, "usage": usage(results)}


async def classify(body: Any, ctx: Context) -> dict:
    """vLLM `/classify`: `data[i] = {index, label, probs, num_classes}`."""
    body = body_object(body)
    activated = wants_activation(body)
    results = await ctx.score(parse_input(body), "input")
    data = []
    for index, result in enumerate(results):
        probs = _values(result, activated)
        names = list(result.attributes)
        data.append({"index": index, "label": names[probs.index(max(probs))], "probs": probs,
                     "num_classes": len(probs)})
    return _envelope("classify", body, ctx, data, results)


async def pooling(body: Any, ctx: Context) -> dict:
    """vLLM `/pooling`: `data[i] = {index, object: "pooling", data}`; a process reward model's
    `data` is its `[p_negative, p_positive]` step rows (`"task": "token_classify"`)."""
    body = body_object(body)
    activated = wants_activation(body)
    task = body.get("task")
    if task is not None and task not in POOLING_TASKS:
        raise GatewayError(f"task must be one of {', '.join(POOLING_TASKS)}, got {task!r}", param="task")
    results = await ctx.score(parse_input(body), "input")
    steps = any(r.steps for r in results)
    if steps and task not in (None, "token_classify"):
        raise GatewayError(f"task {task!r}: the served model is a process reward model; ask for task "
                           "token_classify", param="task")
    if not steps and task == "token_classify":
        raise GatewayError("task token_classify needs a process reward model; the served model scores whole "
                           "conversations", param="task")
    rows = _step_rows if steps else _values
    data = [{"index": i, "object": "pooling", "data": rows(r, activated)} for i, r in enumerate(results)]
    return _envelope("pool", body, ctx, data, results)


async def embeddings(body: Any, ctx: Context) -> dict:
    """SGLang's `/v1/embeddings` for reward models: the raw head outputs as the embedding."""
    body = body_object(body)
    results = await ctx.score(parse_input(body, allow_messages=False), "input")
    data = [{"index": i, "object": "embedding", "embedding": _values(r, False)} for i, r in enumerate(results)]
    answer = _envelope("embd", body, ctx, data, results)
    answer["usage"].pop("completion_tokens")
    return answer


def error_body(err: GatewayError) -> dict:
    """The OpenAI/vLLM error shape."""
    return {"error": {"message": err.message, "type": _TYPES[err.kind], "param": err.param, "code": err.status}}


ROUTES = {"/classify": classify, "/pooling": pooling, "/v1/embeddings": embeddings}
