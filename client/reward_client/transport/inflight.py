"""What the blocking client has in flight, so that work nobody waits for is cancelled at the server.

tritonclient's blocking ``infer`` cannot be cancelled from another thread, so a scoring call that
is abandoned (the caller stopped iterating, one request's error ended the call, the client was
closed) would leave its other requests computing on the server. Each attempt is therefore issued
with ``async_infer``, whose ``CallContext.cancel()`` cancels the gRPC call (the server is told),
and the worker thread waits for its callback. A :class:`CallScope` holds the calls of one scoring
call and cancels them together; :class:`CallScopes` holds a client's scopes for ``close()``.

(The asyncio client needs none of this: cancelling the task that awaits a ``grpc.aio`` call
cancels the call, and :func:`~reward_client.transport.pipeline.aordered_map` cancels its tasks.)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from reward_client.errors import RewardClientError
from reward_client.transport import wire

# tritonclient 2.51's async_infer stores the call it creates on the client object and reads it
# back to attach the callback, so two threads issuing at once on one client can swap calls.
# Issuing only builds the request and starts the call (the GIL serialises most of it anyway).
_ISSUE_LOCK = threading.Lock()


class CallScope:
    """The gRPC calls of one scoring call, cancelled together. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Dict[int, Tuple[Any, threading.Event]] = {}
        self._ended = threading.Event()
        self._reason = ""

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._ended.is_set()

    def cancel(self, reason: str = "the scoring call was abandoned") -> int:
        """Cancel every call in flight, wake waiting workers, and refuse new calls.

        Returns:
            How many calls were in flight.
        """
        with self._lock:
            if not self._ended.is_set():
                self._reason = reason
                self._ended.set()
            calls: List[Tuple[Any, threading.Event]] = list(self._calls.values())
            self._calls.clear()
        for context, done in calls:
            context.cancel()
            done.set()  # the worker stops waiting even if the callback were late
        return len(calls)

    def infer(self, client: Any, model: str, inputs: list, limit_s: Optional[float]) -> Any:
        """Send one attempt through tritonclient's ``async_infer`` and wait for its answer.

        Args:
            client: a ``tritonclient.grpc.InferenceServerClient``.
            model: the model to call.
            inputs: its input tensors.
            limit_s: the attempt's time limit, sent as gRPC deadline and Triton ``timeout``
                (:func:`~reward_client.transport.wire.attempt_deadline`); None: none.

        Returns:
            The ``InferResult``.

        Raises:
            InferenceServerException: the call failed.
            RewardClientError: the scope was cancelled before or while the call ran (the call,
                if sent, is cancelled; its answer is not used).
        """
        self._check()
        done = threading.Event()
        outcome: Dict[str, Any] = {"result": None, "error": None}

        def on_done(result: Any = None, error: Any = None) -> None:
            outcome["result"], outcome["error"] = result, error
            done.set()

        with _ISSUE_LOCK:
            context = client.async_infer(model, inputs, on_done, **wire.attempt_deadline(limit_s))
        key = id(done)
        with self._lock:
            registered = not self._ended.is_set()
            if registered:
                self._calls[key] = (context, done)
        if not registered:  # cancelled while it was being issued
            context.cancel()
            self._check()
        try:
            done.wait()
        finally:
            with self._lock:
                self._calls.pop(key, None)
        self._check()
        if outcome["error"] is not None:
            raise outcome["error"]
        return outcome["result"]

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (a backoff), waking at once when the scope is cancelled.

        Raises:
            RewardClientError: the scope was cancelled.
        """
        self._ended.wait(seconds)
        self._check()

    def _check(self) -> None:
        if self._ended.is_set():
            raise RewardClientError(f"cancelled: {self._reason}")


class CallScopes:
    """The scopes of a client's scoring calls in progress. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scopes: Set[CallScope] = set()

    @contextlib.contextmanager
    def open(self) -> Iterator[CallScope]:
        """A scope for one scoring call; whatever it still has in flight on exit is cancelled."""
        scope = CallScope()
        with self._lock:
            self._scopes.add(scope)
        try:
            yield scope
        finally:
            scope.cancel()
            with self._lock:
                self._scopes.discard(scope)

    def cancel_all(self, reason: str) -> int:
        """Cancel every open scope; return how many calls were in flight."""
        with self._lock:
            scopes = list(self._scopes)
        return sum(scope.cancel(reason) for scope in scopes)
