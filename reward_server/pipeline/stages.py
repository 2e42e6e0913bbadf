"""What each Triton model does to a dynamic batch of requests, as plain numpy functions.

The model.py adapters convert Triton tensors to the arguments here and results back; the
logic (validation, batching across requests, splitting results back) lives here and is
unit-tested without a server. A stage returns, per request, either a dict of output arrays
or a `RequestError` message for that request alone, so one bad request never fails the
others of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from reward_server.pipeline.chat import ChatEncoder, Encoded
from reward_server.pipeline.conversations import ConversationError, InputLimits, parse_messages
from reward_server.pipeline.scoring import step_rows


class RequestError(str):
    """The error message for one request (becomes an INVALID_ARG response)."""


class EngineError(RequestError):
    """The engine failed on one request, not through the caller's fault (becomes INTERNAL)."""


class EngineUnavailable(RequestError):
    """The engine cannot take the request now, e.g. the server is shutting down (becomes
    UNAVAILABLE, which clients retry)."""


class RequestDropped(RequestError):
    """Nobody waits for the request any more: its client cancelled it, its deadline passed, or it
    cannot finish before its deadline (becomes CANCELLED; reward_server.pipeline.deadlines)."""


@dataclass
class PreprocessInput:
    """One request's inputs: `messages` [B,1] object array, `text` [B,1] object array (already
    templated), or `token_ids` [B,L] (+ lengths)."""

    messages: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    token_lengths: np.ndarray | None = None
    text: np.ndarray | None = None


def _pack(encoded: Sequence[Encoded]) -> dict[str, np.ndarray]:
    width = max(len(e.token_ids) for e in encoded)
    ids = np.zeros((len(encoded), width), dtype=np.int32)
    for row, e in enumerate(encoded):
        ids[row, : len(e.token_ids)] = e.token_ids
    return {"input_ids": ids,
            "input_lengths": np.array([[len(e.token_ids)] for e in encoded], dtype=np.int32),
            "truncated": np.array([[e.truncated] for e in encoded], dtype=bool)}


def _token_rows(request: PreprocessInput) -> list[np.ndarray]:
    ids = np.asarray(request.token_ids)
    if ids.ndim != 2:
        raise ConversationError(f"input_ids must be [batch, length], got shape {list(ids.shape)}")
    if request.token_lengths is None:
        return list(ids)
    lengths = np.asarray(request.token_lengths).reshape(-1)
    if len(lengths) != len(ids):
        raise ConversationError(f"input_lengths has {len(lengths)} rows for {len(ids)} rows of input_ids")
    rows = []
    for row, length in zip(ids, lengths):
        if not 0 < length <= ids.shape[1]:
            raise ConversationError(f"input_lengths {int(length)} is outside [1, {ids.shape[1]}]")
        rows.append(row[:length])
    return rows


def preprocess(encoder: ChatEncoder, requests: Sequence[PreprocessInput],
               limits: InputLimits = InputLimits()) -> list[dict | RequestError]:
    """Validate and tokenise every conversation of every request: one tokenizer call for all
    `messages` conversations and one for all `text` inputs of the batch.

    Byte limits are checked first, before any JSON parsing or tokenisation.
    """
    results: list[dict | RequestError | None] = [None] * len(requests)
    chats: list[tuple[int, list]] = []
    texts: list[tuple[int, list]] = []
    for r, request in enumerate(requests):
        given = [name for name in ("messages", "text", "token_ids") if getattr(request, name) is not None]
        if len(given) != 1:
            results[r] = RequestError("the request must carry exactly one of messages, text or input_ids"
                                      + (f"; it has {', '.join(given)}" if given else ""))
        elif request.token_ids is not None:
            results[r] = _check_ids(encoder, request)
        else:
            what = given[0]
            parsed = _parse_rows(getattr(request, what), what, limits, encoder.step_tag)
            if isinstance(parsed, RequestError):
                results[r] = parsed
            else:
                (chats if what == "messages" else texts).append((r, parsed))
    for pending, encode in ((chats, "encode_batch"), (texts, "encode_texts")):
        if not pending:
            continue
        encoded = iter(getattr(encoder, encode)([item for _, items in pending for item in items]))
        for r, items in pending:
            mine = [next(encoded) for _ in items]
            bad = next(((c, e) for c, e in enumerate(mine) if isinstance(e, ConversationError)), None)
            results[r] = RequestError(f"conversation {bad[0]}: {bad[1]}") if bad else _pack(mine)
    return results


def _parse_rows(array: np.ndarray, what: str, limits: InputLimits, step_tag: str | None) -> list | RequestError:
    """One request's `messages` (parsed; a process model's steps joined with `step_tag`) or `text`
    rows, after the byte limits."""
    rows = np.asarray(array, dtype=object).reshape(-1)
    size = sum(len(raw) if isinstance(raw, (bytes, str)) else 0 for raw in rows)
    if size > limits.max_request_bytes:
        return RequestError(f"the request's {len(rows)} conversations are {size} bytes together, over "
                            f"the limit of {limits.max_request_bytes} bytes per request")
    items = []
    for c, raw in enumerate(rows):
        try:
            limits.check_conversation(raw, what)
            items.append(parse_messages(raw, step_tag) if what == "messages" else raw)
        except ConversationError as err:
            return RequestError(f"conversation {c}: {err}")
    return items


def _check_ids(encoder: ChatEncoder, request: PreprocessInput) -> dict | RequestError:
    try:
        rows = _token_rows(request)
    except ConversationError as err:
        return RequestError(str(err))
    encoded = []
    for c, row in enumerate(rows):
        try:
            encoded.append(encoder.check_ids(row))
        except ConversationError as err:
            return RequestError(f"conversation {c}: {err}")
    return _pack(encoded)


def engine_sequences(requests: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[list[list[int]], list[int]]:
    """Every request's (input_ids [B, W], input_lengths [B, 1]) as unpadded token lists, in order,
    and the number of sequences each request holds."""
    sequences, counts = [], []
    for ids, lengths in requests:
        lengths = np.asarray(lengths).reshape(-1)
        sequences.extend(row[:n].tolist() for row, n in zip(np.asarray(ids), lengths))
        counts.append(len(lengths))
    return sequences, counts


def score_requests(engine, requests: Sequence[tuple[np.ndarray, np.ndarray]],
                   alive: Callable[[], Sequence[bool]] | None = None) -> list[dict]:
    """Run the engine once over all sequences of all requests and split rewards back.

    Each request is (input_ids [B, W], input_lengths [B, 1]). A process reward model's rewards
    are `reward_server.pipeline.scoring.step_rows`. `alive`, when given, is asked before every
    packed row which requests are still wanted (one bool per request); the sequences of the others
    are not computed further, and their rewards are NaN.
    """
    sequences, counts = engine_sequences(requests)
    offsets = np.cumsum([0] + counts)
    keep = None
    if alive is not None:
        owner = np.repeat(np.arange(len(requests)), counts)
        keep = lambda: np.asarray(alive(), dtype=bool)[owner]  # noqa: E731 - per sequence, from per request
    if engine.process is not None:
        steps = engine.score_steps(sequences, keep=keep)
        return [{"rewards": step_rows(steps[offsets[i]:offsets[i + 1]])} for i in range(len(requests))]
    rewards = engine.score(sequences, keep=keep)
    return [{"rewards": rewards[offsets[i]:offsets[i + 1]]} for i in range(len(requests))]


def postprocess(spec, requests: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[dict]:
    """The ensemble's public outputs for each request's (rewards [B, K], lengths [B, 1], truncated [B, 1]):
    score, attributes (a process model's step scores), num_steps (0 for an outcome model), num_tokens, truncated.

    Every public output comes from this last step: Triton 2.51's ensemble scheduler stalls when
    a client requests only some outputs and an earlier step's outputs are partly unrequested.
    """
    results = []
    for rewards, lengths, truncated in requests:
        score, attributes, steps = spec.outputs(rewards)
        results.append({"score": score.reshape(-1, 1), "attributes": attributes, "num_steps": steps.reshape(-1, 1),
                        "num_tokens": np.asarray(lengths, dtype=np.int32),
                        "truncated": np.asarray(truncated, dtype=bool)})
    return results
