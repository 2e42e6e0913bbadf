"""The reward server's wire contract: request tensors, response parsing, error mapping.

Ensemble ``reward`` takes ``messages`` (BYTES [B, 1], one JSON conversation each); ensemble
``reward_ids`` takes ``input_ids`` (INT32 [B, L], right-padded) and ``input_lengths``
(INT32 [B, 1]); ensemble ``reward_text`` takes ``text`` (BYTES [B, 1], one already-templated
string each). All return ``score`` FP32 [B, 1], ``attributes`` FP32 [B, K],
``num_tokens`` INT32 [B, 1] and ``truncated`` BOOL [B, 1]; servers since process reward models
also return ``num_steps`` INT32 [B, 1]: 0 for an outcome model; for a process model the number of
steps, whose scores are the first ``num_steps`` values of the row's ``attributes`` (NaN after them).
Requests ask for every output (no output list), so a client works with servers of either kind.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from reward_client.errors import (RewardClientError, RewardInvalidInputError, RewardServerError,
                                  RewardTimeoutError, RewardUnavailableError)
from reward_client.results import ScoreResult

MESSAGES_MODEL = "reward"
IDS_MODEL = "reward_ids"
TEXT_MODEL = "reward_text"
POSTPROCESSING_MODEL = "postprocessing"
ATTRIBUTE_NAMES_PARAMETER = "attribute_names"
OUTPUT_NAMES = ("score", "attributes", "num_tokens", "truncated")
# The models of the reward repository, listed when the repository index API is restricted.
KNOWN_MODELS = (MESSAGES_MODEL, IDS_MODEL, TEXT_MODEL, "preprocessing", "reward_engine", POSTPROCESSING_MODEL)

_CONVERSATION_INDEX = re.compile(r"conversation (\d+):")
_RETRYABLE_STATUSES = {"StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}
# Server-side queue rejections, whatever status a Triton version attaches to them: Triton's own,
# and the reward server's admission control ("the server is overloaded ...", UNAVAILABLE).
_RETRYABLE_MESSAGES = ("exceeds maximum queue size", "request timeout expired", "the server is overloaded")
# The reward server dropped or refused a request because its deadline (Triton's `timeout`
# parameter, which this client sends) passed or cannot be met: whatever the status, sending it
# again could only be later still.
_DEADLINE_MESSAGES = ("deadline passed",)
# Failures of the replica itself rather than of the request: unreachable, or its engine gone
# (a dead Python-backend stub answers INTERNAL "Stub process ... is not healthy").
_REPLICA_FAILURE_MESSAGES = ("stub process", "failed to connect", "connection refused", "socket closed",
                             "is not ready", "has no available versions")
# A server that is restarting a dead stub (its watchdog) or stopping answers these for a moment,
# whatever the status: worth retrying, like UNAVAILABLE.
_RESTARTING_MESSAGES = ("stub process", "has no available versions", "server is stopping")
# gRPC's details when this process cancelled the call itself: the caller closed the channel or
# cancelled the call (an asyncio task cancelled raises CancelledError and never gets here).
_LOCAL_CANCELLATIONS = ("channel closed!", "locally cancelled by application!", "cancelled upon garbage collection!")


def _bytes_input(name: str, items: Sequence[bytes]) -> List[InferInput]:
    array = np.empty((len(items), 1), dtype=np.object_)
    array[:, 0] = list(items)
    tensor = InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return [tensor]


def messages_inputs(encoded: Sequence[bytes]) -> List[InferInput]:
    """Return the ``messages`` input tensor for a batch of encoded conversations."""
    return _bytes_input("messages", encoded)


def text_inputs(texts: Sequence[bytes]) -> List[InferInput]:
    """Return the ``text`` input tensor for a batch of UTF-8 encoded templated texts."""
    return _bytes_input("text", texts)


def ids_arrays(rows: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(input_ids [B, L], input_lengths [B, 1])`` for token id lists, right-padded with 0.

    Raises:
        ValueError: if a row is empty.
    """
    lengths = np.array([len(row) for row in rows], dtype=np.int32).reshape(-1, 1)
    if len(rows) and int(lengths.min()) == 0:
        raise ValueError("empty token id list")
    ids = np.zeros((len(rows), int(lengths.max()) if len(rows) else 0), dtype=np.int32)
    for row_index, row in enumerate(rows):
        ids[row_index, :len(row)] = np.asarray(row, dtype=np.int32)
    return ids, lengths


def ids_inputs(rows: Sequence[Sequence[int]]) -> List[InferInput]:
    """Return the ``input_ids`` and ``input_lengths`` tensors for token id lists.

    Raises:
        ValueError: if a row is empty.
    """
    ids, lengths = ids_arrays(rows)
    ids_tensor = InferInput("input_ids", list(ids.shape), "INT32")
    ids_tensor.set_data_from_numpy(ids)
    lengths_tensor = InferInput("input_lengths", list(lengths.shape), "INT32")
    lengths_tensor.set_data_from_numpy(lengths)
    return [ids_tensor, lengths_tensor]


def parse_attribute_names(parameter: str, count: int) -> Tuple[str, ...]:
    """Return ``count`` attribute names from the comma-separated ``attribute_names`` parameter.

    An empty parameter, or one whose length does not match ``count``, gives the default names
    ``reward_0 .. reward_{count-1}``.
    """
    names = tuple(name.strip() for name in parameter.split(",") if name.strip())
    if len(names) != count:
        return tuple(f"reward_{i}" for i in range(count))
    return names


def parse_results(as_numpy: Callable[[str], Optional[np.ndarray]], offset: int,
                  attribute_names: Callable[[int], Tuple[str, ...]]) -> List[ScoreResult]:
    """Turn one response's output tensors into results numbered from ``offset``.

    Args:
        as_numpy: the response's ``as_numpy``.
        offset: global index of the request's first conversation.
        attribute_names: returns the names for K attributes.

    Raises:
        RewardServerError: if an output is missing or the batch sizes disagree.
    """
    arrays = {name: as_numpy(name) for name in OUTPUT_NAMES}
    missing = [name for name, array in arrays.items() if array is None]
    if missing:
        raise RewardServerError(f"response lacks outputs {missing}")
    scores = arrays["score"].reshape(-1)
    steps = as_numpy("num_steps")
    steps = np.zeros(len(scores), dtype=np.int64) if steps is None else steps.reshape(-1)
    attributes = arrays["attributes"].reshape(len(scores), -1)
    num_tokens = arrays["num_tokens"].reshape(-1)
    truncated = arrays["truncated"].reshape(-1)
    if not len(scores) == len(attributes) == len(num_tokens) == len(truncated) == len(steps):
        raise RewardServerError("outputs disagree on the batch size")
    process = bool(steps.any())  # a process reward model: the attributes are its step scores
    names = () if process else attribute_names(attributes.shape[1])
    return [
        ScoreResult(index=offset + row, score=float(scores[row]),
                    attributes=dict(zip(names, (float(v) for v in attributes[row]))),
                    steps=tuple(float(v) for v in attributes[row, :int(steps[row])]),
                    num_tokens=int(num_tokens[row]), truncated=bool(truncated[row]))
        for row in range(len(scores))
    ]


def attempt_deadline(limit_s: Optional[float]) -> Dict[str, Optional[Union[float, int]]]:
    """Return the deadline keywords of tritonclient's ``infer`` for an attempt of ``limit_s`` seconds.

    The same limit travels twice: as the gRPC deadline (``client_timeout``, seconds), which ends
    the call at the client and cancels it at the server, and as Triton's ``timeout`` request
    parameter (whole microseconds), which the server reads to drop the request once it is due,
    wherever it is queued. None sends neither.
    """
    if limit_s is None:
        return {"client_timeout": None, "timeout": None}
    # Rounded down, and at least 1: Triton reads a timeout of 0 as "none".
    return {"client_timeout": limit_s, "timeout": max(1, int(limit_s * 1_000_000))}


def deadline_passed(exc: InferenceServerException) -> bool:
    """Return whether the server dropped or refused the request because its deadline passed."""
    message = str(exc.message() or exc).lower()
    return any(marker in message for marker in _DEADLINE_MESSAGES)


def cancelled_by_server(exc: InferenceServerException) -> bool:
    """Return whether ``exc`` is a CANCELLED that this client did not cause.

    Triton 2.51's gRPC front end, shutting down, cancels the calls it had received but not yet
    picked up (status CANCELLED, details "CANCELLED"; docs/reliability.md): those requests were
    never accepted, and scoring is idempotent, so they are retried. A call this process cancelled
    (channel closed, call cancelled) is not.
    """
    message = str(exc.message() or exc).lower()
    return str(exc.status() or "") == "StatusCode.CANCELLED" and not any(m in message for m in _LOCAL_CANCELLATIONS) \
        and not deadline_passed(exc)


def map_error(exc: InferenceServerException, offset: int = 0) -> RewardClientError:
    """Map a tritonclient error of the request starting at ``offset`` to a reward client error.

    INVALID_ARGUMENT becomes :class:`RewardInvalidInputError` whose index is ``offset`` plus
    the request-local index the server names (``conversation N:``). UNAVAILABLE,
    RESOURCE_EXHAUSTED, queue rejections ("the server is overloaded" included), a restarting or
    stopping server and a CANCELLED the server caused (:func:`cancelled_by_server`) become
    :class:`RewardUnavailableError`, which the client retries. DEADLINE_EXCEEDED, and a request
    the server dropped because its deadline passed (:func:`deadline_passed`, whatever the status),
    become :class:`RewardTimeoutError`, which it never retries.
    """
    status = str(exc.status() or "")
    message = str(exc.message() or exc)
    if deadline_passed(exc) and status != "StatusCode.INVALID_ARGUMENT":
        return RewardTimeoutError(f"{status}: {message}" if status else message)
    if status == "StatusCode.INVALID_ARGUMENT":
        match = _CONVERSATION_INDEX.search(message)
        if match is None:
            return RewardInvalidInputError(message)
        # The server numbers conversations within the request; drop that local number.
        reason = (message[:match.start()] + message[match.end():].lstrip()).strip()
        return RewardInvalidInputError(reason, offset + int(match.group(1)))
    if status in _RETRYABLE_STATUSES or any(m in message.lower() for m in _RETRYABLE_MESSAGES + _RESTARTING_MESSAGES) \
            or cancelled_by_server(exc):
        return RewardUnavailableError(f"{status}: {message}")
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return RewardTimeoutError(message)
    return RewardServerError(f"{status or 'error'}: {message}")


def is_replica_failure(exc: InferenceServerException) -> bool:
    """Return whether ``exc`` says the replica cannot serve (so another should), not that it is busy.

    A queue rejection means the replica is alive and loaded: it is retried on the same replica,
    keeping the group where its prompt is computed; a request dropped because its deadline passed
    says nothing about the replica. Anything UNAVAILABLE otherwise, the engine-gone messages, and a
    CANCELLED from the server (a stopping replica) mean the replica is down.
    """
    status = str(exc.status() or "")
    message = str(exc.message() or exc).lower()
    if any(marker in message for marker in _RETRYABLE_MESSAGES) or deadline_passed(exc):
        return False
    return status == "StatusCode.UNAVAILABLE" or cancelled_by_server(exc) \
        or any(marker in message for marker in _REPLICA_FAILURE_MESSAGES)


def attribute_count(metadata: object) -> int:
    """Return K, the width of the ``attributes`` output, from a ``ModelMetadataResponse``; 0 for a
    process reward model (its attributes are its step scores, as many as steps, unnamed).

    Raises:
        RewardServerError: if the model has no ``attributes`` output.
    """
    for output in getattr(metadata, "outputs", []):
        if output.name == "attributes" and len(output.shape) >= 1:
            return max(int(output.shape[-1]), 0)
    raise RewardServerError("model metadata has no 'attributes' output")
