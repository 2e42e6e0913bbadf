"""What every protocol of the gateway shares: the items it scores, its errors, activations."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from reward_client import (RewardClientError, RewardInvalidInputError, RewardTimeoutError,
                           RewardUnavailableError, ScoreResult)

# How a conversation reaches the server: a message list (the server applies the chat template),
# an already-templated string (`reward_text`), or token ids (`reward_ids`).
MESSAGES, TEXT, IDS = "messages", "text", "ids"
KINDS = (MESSAGES, TEXT, IDS)
# Triton names the ensemble in front of a step's error: an HTTP caller never asked for one.
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


@dataclass(frozen=True)
class Item:
    """One conversation of an HTTP request, as the server will receive it."""

    kind: str
    value: Any


class GatewayError(Exception):
    """A failure to report to the HTTP caller, in its protocol's error shape.

    Attributes:
        message: what was wrong and where (which input, which field, the limit).
        status: HTTP status (400 bad input, 413 too large, 503 unavailable, 504 timeout, 500).
        kind: invalid_input | too_large | unavailable | timeout | server_error.
        param: the request field at fault, when known.
    """

    STATUS = {"invalid_input": 400, "too_large": 413, "unavailable": 503, "timeout": 504, "server_error": 500}

    def __init__(self, message: str, kind: str = "invalid_input", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = self.STATUS[kind]
        self.param = param

    def at(self, where: str) -> "GatewayError":
        """The same error, its message prefixed by where it happened (e.g. ``input[3]``)."""
        return GatewayError(f"{where}: {self.message}", self.kind, self.param or where.split("[")[0])


def from_client_error(exc: RewardClientError) -> GatewayError:
    """The gateway error for a client SDK error about one item (its index already stripped)."""
    if isinstance(exc, RewardInvalidInputError):
        return GatewayError(_ENSEMBLE_PREFIX.sub("", exc.reason))
    if isinstance(exc, RewardUnavailableError):
        return GatewayError(f"the reward server is unavailable: {exc}", "unavailable")
    if isinstance(exc, RewardTimeoutError):
        if isinstance(exc.__cause__, RewardUnavailableError):
            # The deadline only cut short the retries of a server that was down or overloaded:
            # that is the news (503, which callers retry later), not slowness.
            return GatewayError(f"the reward server is unavailable: {exc.__cause__} (retried until the request's "
                                "deadline)", "unavailable")
        return GatewayError(f"the reward server did not answer in time: {exc}", "timeout")
    return GatewayError(f"the reward server failed: {exc}", "server_error")


def activate(values: Sequence[float]) -> list[float]:
    """The classifier activation of vLLM and TEI: sigmoid for one output, softmax for several."""
    if len(values) == 1:
        v = float(values[0])
        return [1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))]
    top = max(values)
    exps = [math.exp(float(v) - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def head_outputs(result: ScoreResult) -> list[float]:
    """An outcome reward model's raw head outputs, in the model's order.

    Raises:
        GatewayError: the result is a process reward model's (step scores have no classes).
    """
    if result.steps:
        raise GatewayError("the served model is a process reward model: its step scores are answered by "
                           "/pooling with \"task\": \"token_classify\", its aggregate score by /v1/score, "
                           "/get_reward and /v1/chat/completions")
    return list(result.attributes.values())


def check_messages(value: Any, where: str) -> list:
    """A chat message list as the protocols send it (roles and contents are checked by the server).

    Raises:
        GatewayError: not a non-empty list of objects.
    """
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise GatewayError(f"{where} must be a non-empty list of {{role, content}} messages", param=where)
    return value


def check_ids(value: Any, where: str) -> list[int]:
    """A token id list. Raises GatewayError when it is empty or holds a non-integer."""
    if not value or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise GatewayError(f"{where} must be a non-empty list of integer token ids", param=where)
    return value
