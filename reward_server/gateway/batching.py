"""Concurrent HTTP requests merged into few large gRPC requests.

Trainers now send one sample per HTTP request (OpenRLHF since 2026-01, verl's reward loop), so
scoring each request on its own would give the server batches of one. The `Coalescer` gathers
the items of every request that arrives within a short window (`max_delay_s`, default 2 ms)
into one client SDK call per kind, which the SDK cuts into requests of its batch size. At most
`max_calls` such calls run at once; while they do, new items keep gathering, so batches grow
with the load instead of the number of requests in flight. A GRPO group sent as one HTTP request
stays together, so its shared prompt is computed once.

One bad item must not fail the others it was batched with: the server rejects a whole gRPC
request and names the first bad conversation, so that item gets the error and the rest is sent
again.

Work nobody waits for is not done: a caller that goes (its HTTP client disconnected, so the app
cancelled it) or whose deadline passes is withdrawn. Its items still gathering are removed before
they are sent; a call already running goes on while it carries items of another caller still
waiting, and is cancelled (with its gRPC requests, which the server then drops) once none is.
Where the SDK takes a deadline per call (`SDK_DEADLINE_KEYWORD`), a call is sent with the latest
deadline of the callers it carries.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from reward_client import AsyncRewardClient, RewardClientError, RewardInvalidInputError, ScoreResult

from reward_server.gateway.core import GatewayError, IDS, Item, KINDS, MESSAGES, TEXT, from_client_error

_LOGGER = logging.getLogger(__name__)

Outcome = ScoreResult | GatewayError

# Issue 30: the one line to switch. The keyword of AsyncRewardClient.score/score_texts/score_ids
# that takes a per-attempt deadline in seconds (sent to the server, which drops work it cannot
# finish in time). An SDK without it is called without one: each attempt's gRPC deadline is then
# the client's own `timeout_s` (the gateway's --timeout), and a shorter request timeout is kept by
# the caller's timer below, which cancels the call.
SDK_DEADLINE_KEYWORD = "deadline_s"
# A caller's own timer fires this long after its deadline, so that a call carrying only its items
# ends the SDK's way (its deadline error, the server's "expired" drop, the unavailability that
# used up its retries), which says more than our cancel; the SDK's clock starts a little later.
DEADLINE_GRACE_S = 0.25


@dataclass(eq=False)
class _Caller:
    """One `Coalescer.score` call: its deadline (event-loop time, or None) and whether it has gone."""

    deadline: float | None
    gone: bool = False


@dataclass(eq=False)
class _Entry:
    """One item on its way to the server, the future its caller awaits, and that caller."""

    value: Any
    future: asyncio.Future
    caller: _Caller


@dataclass(eq=False)
class _Flight:
    """A merged batch sent to the server, and the task that sends it (cancelled when nobody waits)."""

    entries: list[_Entry]
    task: asyncio.Task
    cancelled: bool = False  # by `_withdraw`: every caller it carried has gone


class Coalescer:
    """Scores items of concurrent callers together.

    Args:
        client: the SDK client of the reward server.
        max_delay_s: how long the first item of a batch waits for others.
        max_calls: SDK calls (each up to the client's max_in_flight gRPC requests) running at once.
        metrics: the gateway's `GatewayMetrics` (merged-batch sizes, withdrawn items, cancelled
            calls), or None.
    """

    def __init__(self, client: AsyncRewardClient, max_delay_s: float = 0.002, max_calls: int = 4,
                 metrics: Any = None):
        self.client = client
        self.metrics = metrics
        self.max_delay_s = max_delay_s
        self._pending: dict[str, list[_Entry]] = {kind: [] for kind in KINDS}
        self._gathering: dict[str, bool] = {kind: False for kind in KINDS}
        self._calls = asyncio.Semaphore(max_calls)
        self._tasks: set[asyncio.Task] = set()
        self._flights: set[_Flight] = set()
        self.batches = 0  # SDK calls made, for tests and logs

    async def score(self, items: Sequence[Item], deadline: float | None = None) -> list[Outcome]:
        """One outcome per item, in order: its result, or the error about it alone.

        Args:
            items: the caller's items; they stay together in one merged batch.
            deadline: when the caller stops waiting, in event-loop time (`loop.time()`), or None.

        Cancelling this coroutine (the HTTP client went) withdraws the caller: see the module
        docstring.

        Raises:
            GatewayError: the deadline passed first ("timeout"); never for one item's fault, the
                results carry those.
        """
        loop = asyncio.get_running_loop()
        caller = _Caller(deadline)
        entries = [_Entry(item.value, loop.create_future(), caller) for item in items]
        for item, entry in zip(items, entries):
            self._pending[item.kind].append(entry)
        for kind in {item.kind for item in items}:
            if not self._gathering[kind]:  # the first item of a batch starts its timer
                self._gathering[kind] = True
                task = loop.create_task(self._flush_later(kind))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        answered = False
        try:
            async with asyncio.timeout_at(None if deadline is None else deadline + DEADLINE_GRACE_S):
                outcomes = await asyncio.gather(*(entry.future for entry in entries))
            answered = True
            return list(outcomes)
        except TimeoutError:
            raise GatewayError("the reward server did not answer within the request's timeout", "timeout") from None
        finally:
            if not answered:
                self._withdraw(caller)

    def _withdraw(self, gone: _Caller) -> None:
        """Forget a caller that no longer waits: drop its unsent items, cancel calls nobody needs."""
        gone.gone = True
        for kind, pending in self._pending.items():
            kept = [entry for entry in pending if entry.caller is not gone]
            if len(kept) < len(pending):
                self._pending[kind] = kept
                if self.metrics is not None:
                    self.metrics.withdrawn_items.labels(kind).inc(len(pending) - len(kept))
        for flight in list(self._flights):
            carried = any(entry.caller is gone for entry in flight.entries)
            # A future still open is a caller still waiting (a gone caller's futures are cancelled).
            if carried and not flight.cancelled and all(entry.future.done() for entry in flight.entries):
                flight.cancelled = True
                flight.task.cancel()

    async def _flush_later(self, kind: str) -> None:
        await asyncio.sleep(self.max_delay_s)
        async with self._calls:  # while every call slot is busy, the batch keeps growing
            self._gathering[kind] = False
            batch, self._pending[kind] = self._pending[kind], []
            if not batch:
                return
            # This task is the flight: cancelling it cancels the SDK call, and the slot is given back.
            flight = _Flight(batch, asyncio.current_task())
            self._flights.add(flight)
            try:
                await self._run(kind, batch)
            except asyncio.CancelledError:
                if flight.cancelled and self.metrics is not None:
                    self.metrics.cancelled_calls.labels(kind).inc()
                raise
            finally:
                self._flights.discard(flight)

    async def _run(self, kind: str, batch: list[_Entry]) -> None:
        live = _waiting(batch)
        try:
            while live:
                self.batches += 1
                try:
                    results = await self._call(kind, [entry.value for entry in live], _latest(live))
                except RewardInvalidInputError as exc:
                    if exc.index is None or not 0 <= exc.index < len(live):
                        if len(live) == 1:
                            _settle(live[0].future, from_client_error(exc))
                            return
                        # The server did not say which: score each alone to find out.
                        await asyncio.gather(*(self._run(kind, [entry]) for entry in live))
                        return
                    _settle(live.pop(exc.index).future, from_client_error(exc))
                    live = _waiting(live)  # items of callers gone meanwhile are not sent again
                    continue
                for entry, result in zip(live, results):
                    _settle(entry.future, result)
                return
        except RewardClientError as exc:
            error = from_client_error(exc)
            for entry in live:
                _settle(entry.future, error)
        except Exception as exc:  # noqa: BLE001 - never leave a caller waiting forever
            _LOGGER.exception("scoring a batch of %d %s items failed", len(live), kind)
            for entry in live:
                _settle(entry.future, GatewayError(f"the gateway failed: {exc}", "server_error"))

    async def _call(self, kind: str, values: list, deadline: float | None) -> list[ScoreResult]:
        if self.metrics is not None:
            self.metrics.batches.labels(kind).observe(len(values))
        if kind == MESSAGES:
            method = self.client.score
        elif kind == TEXT:
            method = self.client.score_texts
        elif kind == IDS:
            method = self.client.score_ids
        else:
            raise ValueError(f"unknown item kind {kind!r}")
        if deadline is None or not _takes(method, SDK_DEADLINE_KEYWORD):
            return await method(values)
        # At least a millisecond: a deadline already passed still gets its answer from the server.
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
        return await method(values, **{SDK_DEADLINE_KEYWORD: remaining})


def _waiting(entries: list[_Entry]) -> list[_Entry]:
    return [entry for entry in entries if not entry.future.done()]


def _latest(entries: list[_Entry]) -> float | None:
    """The deadline of a call carrying `entries`: the latest of their callers', None if one has none."""
    deadlines = [entry.caller.deadline for entry in entries]
    return None if any(d is None for d in deadlines) else max(deadlines)


def _takes(method: Any, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _settle(future: asyncio.Future, outcome: Outcome) -> None:
    if not future.done():  # the caller may have gone (client disconnect, deadline)
        future.set_result(outcome)
