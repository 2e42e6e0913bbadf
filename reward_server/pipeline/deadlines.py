"""Deadlines and cancellations: how every stage learns that nobody waits for a request any more.

Triton 2.51 marks a request cancelled when its gRPC call is cancelled or its deadline passes, but
only the request a client sent directly: the composing requests of an ensemble are never marked
(measured, ../shared/DESIGN.md). So the public entry points are Python models
(`reward_server.pipeline.entry`) in front of the ensembles, and they pass what they learn on:

- each request forwarded into a pipeline carries a `Ticket` as request parameters (Triton hands an
  ensemble's parameters to every step, measured on 2.51): a key unique to this server, the time
  the entry received it and, when the client gave one (Triton's `timeout` parameter), its deadline,
  on this machine's wall clock;
- when the client goes (a cancelled call, an expired gRPC deadline) or the deadline passes, the
  entry writes the key on the `CancelBoard`, a directory of empty files shared by the stubs of
  this server (the same run directory as the drain's counters);
- preprocessing, the engine (before every packed row) and postprocessing check the ticket and the
  board, and drop the request: its tokens are never computed.

The functions here are plain Python, without Triton.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

KEY = "reward_key"
ARRIVAL_MS = "reward_arrival_ms"
DEADLINE_MS = "reward_deadline_ms"

CANCELLED, EXPIRED, OVERLOADED = "cancelled", "expired", "overloaded"
DROP_REASONS = (CANCELLED, EXPIRED, OVERLOADED)
# Clients map these words (reward_client.transport.wire): "deadline passed" is never retried,
# "the server is overloaded" (UNAVAILABLE) is retried with backoff.
DEADLINE_PASSED = "deadline passed"
OVERLOADED_PREFIX = "the server is overloaded"
CANCELLED_MESSAGE = "cancelled: the client cancelled the request or its gRPC deadline passed; it was not scored"


@dataclass(frozen=True)
class Ticket:
    """What a stage knows of a request's life: its key, when the entry received it (epoch seconds)
    and its deadline (epoch seconds, or None: the client gave none)."""

    key: str
    arrival: float
    deadline: float | None = None

    @classmethod
    def issue(cls, key: str, timeout_us: int, now: float | None = None) -> "Ticket":
        """The ticket of a request received now with Triton's `timeout` parameter (microseconds; 0: none)."""
        now = time.time() if now is None else now
        return cls(key, now, now + timeout_us / 1e6 if timeout_us > 0 else None)

    def parameters(self) -> dict[str, str | int]:
        """The request parameters that carry this ticket (Triton takes str, int and bool values)."""
        params: dict[str, str | int] = {KEY: self.key, ARRIVAL_MS: int(self.arrival * 1000)}
        if self.deadline is not None:
            params[DEADLINE_MS] = int(self.deadline * 1000)
        return params

    @classmethod
    def from_parameters(cls, parameters: str | dict | None) -> "Ticket | None":
        """The ticket in a request's parameters (the JSON string `request.parameters()` returns),
        or None for a request that did not come through an entry point (a stage called directly)."""
        if not parameters:
            return None
        params = json.loads(parameters) if isinstance(parameters, str) else parameters
        if KEY not in params:
            return None
        try:
            deadline = params.get(DEADLINE_MS)
            return cls(str(params[KEY]), int(params.get(ARRIVAL_MS, 0)) / 1000,
                       None if deadline is None else int(deadline) / 1000)
        except (TypeError, ValueError):
            return None

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (negative once it passed), or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)

    def waited(self, now: float | None = None) -> float:
        """Seconds since the entry received the request."""
        return (time.time() if now is None else now) - self.arrival


def expired_message(ticket: Ticket, now: float | None = None) -> str:
    """The error of a request dropped because its deadline passed."""
    late = -(ticket.remaining(now) or 0.0)
    return (f"{DEADLINE_PASSED}: the request's timeout ran out {late:.2f} s ago, after {ticket.waited(now):.2f} s "
            "at the server; it was not scored")


class CancelBoard:
    """Keys of requests whose clients are gone, as empty files in one directory.

    A file per key keeps writers (the entry stubs) and readers (the stages) apart without locks:
    creating and unlinking a file are atomic, and a lookup is one `stat`.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad request key {key!r}")
        return os.path.join(self.directory, key)

    def cancel(self, key: str) -> None:
        """Mark `key`: every stage drops its request from now on."""
        os.close(os.open(self._path(key), os.O_WRONLY | os.O_CREAT, 0o600))

    def cancelled(self, key: str) -> bool:
        """Whether `key` was marked."""
        return os.path.exists(self._path(key))

    def clear(self, key: str) -> None:
        """Forget `key` (its request has left the pipeline)."""
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass


def board_from_drain_dir(drain_dir: str | Path | None) -> CancelBoard | None:
    """The board of a server whose run directory (`drain_dir`) is given; None without one (a stock
    tritonserver on the checked-in configs: deadlines still hold, cancellations are not seen)."""
    return CancelBoard(Path(drain_dir) / "cancelled") if drain_dir else None


def drop_reason(ticket: Ticket | None, board: CancelBoard | None, now: float | None = None) -> str | None:
    """Why a request must be dropped now (CANCELLED, EXPIRED), or None to go on."""
    if ticket is None:
        return None
    if board is not None and board.cancelled(ticket.key):
        return CANCELLED
    remaining = ticket.remaining(now)
    if remaining is not None and remaining <= 0:
        return EXPIRED
    return None


def drop_message(reason: str, ticket: Ticket, now: float | None = None) -> str:
    """The error message of a request dropped for `reason` (CANCELLED or EXPIRED)."""
    return CANCELLED_MESSAGE if reason == CANCELLED else expired_message(ticket, now)


# Triton 2.51 hands a BLS caller a step's error with its message only (its code reads INTERNAL), so the
# entry points tell the code from the message: these markers (lower case) are the messages that the
# steps and Triton give for each code; anything else a step refused is the caller's fault.
_CODE_MARKERS = (
    ("UNAVAILABLE", (OVERLOADED_PREFIX, "the server is stopping", "server is stopping", "not ready",
                     "has no available versions", "exceeds maximum queue size", "request timeout expired")),
    ("CANCELLED", ("cancelled:", DEADLINE_PASSED)),
    ("INTERNAL", ("internal error in", "stub process", "is not healthy", "failed to process the request")),
)


def error_code_of(message: str) -> str:
    """The Triton error code (UNAVAILABLE, CANCELLED, INTERNAL or INVALID_ARG) of a pipeline step's
    error message, whose own code Triton 2.51 loses on the way back to a BLS caller."""
    lowered = message.lower()
    for code, markers in _CODE_MARKERS:
        if any(marker in lowered for marker in markers):
            return code
    return "INVALID_ARG"
