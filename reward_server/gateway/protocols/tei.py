"""Hugging Face text-embeddings-inference's classifier route: `POST /predict`.

`inputs` is one text, one pair `["prompt", "response"]`, or a batch of those (`[["a"], ["a",
"b"]]`). A text goes to the server's `text` entry as given (one BOS, never two); a pair becomes
the conversation user: prompt, assistant: response, templated by the server. The answer for
each input is its labels `[{"score", "label"}]`, best first: activated scores (sigmoid for one
output, softmax for several) unless `raw_scores` is true. `truncate` is accepted; the server's
own length policy decides. Errors are `{"error", "error_type"}`, 422 for invalid input.
"""

from __future__ import annotations

from typing import Any

from reward_server.gateway.core import GatewayError, Item, MESSAGES, TEXT, activate, head_outputs
from reward_server.gateway.protocols import Context, body_object

_STATUS = {"invalid_input": 422, "too_large": 413, "unavailable": 503, "timeout": 504, "server_error": 500}
_TYPES = {"invalid_input": "Validation", "too_large": "Validation", "unavailable": "Unhealthy",
          "timeout": "Backend", "server_error": "Backend"}


def _sequence(value: Any, where: str) -> Item:
    if isinstance(value, str):
        return Item(TEXT, value)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return Item(TEXT, value[0])
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return Item(MESSAGES, [{"role": "user", "content": value[0]}, {"role": "assistant", "content": value[1]}])
    raise GatewayError(f"{where} must be a text or a [prompt, response] pair of texts", param="inputs")


def parse_inputs(body: dict) -> tuple[list[Item], bool]:
    """The items of a request, and whether it was a batch.

    Raises:
        GatewayError: `inputs` missing or of another shape.
    """
    inputs = body.get("inputs")
    if inputs is None:
        raise GatewayError("inputs is missing", param="inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(v, list) for v in inputs):
        return [_sequence(v, f"inputs[{i}]") for i, v in enumerate(inputs)], True
    if isinstance(inputs, list) and not inputs:
        return [], True
    return [_sequence(inputs, "inputs")], False


async def predict(body: Any, ctx: Context) -> list:
    """Labels and scores per input, best first."""
    body = body_object(body)
    raw = body.get("raw_scores", False)
    if not isinstance(raw, bool):
        raise GatewayError(f"raw_scores must be true or false, got {raw!r}", param="raw_scores")
    items, batch = parse_inputs(body)
    results = await ctx.score(items, "inputs")
    answers = []
    for result in results:
        values = head_outputs(result)
        values = values if raw else activate(values)
        labels = [{"score": v, "label": name} for name, v in zip(result.attributes, values)]
        answers.append(sorted(labels, key=lambda label: -label["score"]))
    return answers if batch else answers[0]


def error_body(err: GatewayError) -> dict:
    """TEI's error shape."""
    return {"error": err.message, "error_type": _TYPES[err.kind]}


def status(err: GatewayError) -> int:
    """TEI's status codes: 422 for validation rather than 400."""
    return _STATUS[err.kind]


ROUTES = {"/predict": predict}
