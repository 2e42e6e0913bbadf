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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from reward_client import AsyncRewardClient, RewardClientError, RewardInvalidInputError, ScoreResult

from reward_server.gateway.core import GatewayError, IDS, Item, KINDS, MESSAGES, TEXT, from_client_error

_LOGGER = logging.getLogger(__name__)

Outcome = ScoreResult | GatewayError


class Coalescer:
    """Scores items of concurrent callers together.

    Args:
        client: the SDK client of the reward server.
        max_delay_s: how long the first item of a batch waits for others.
        max_calls: SDK calls (each up to the client's max_in_flight gRPC requests) running at once.
        metrics: the gateway's `GatewayMetrics` (merged-batch sizes), or None.
    """

    def __init__(self, client: AsyncRewardClient, max_delay_s: float = 0.002, max_calls: int = 4,
                 metrics: Any = None):
        self.client = client
        self.metrics = metrics
        self.max_delay_s = max_delay_s
        self._pending: dict[str, list[tuple[Any, asyncio.Future]]] = {kind: [] for kind in KINDS}
        self._gathering: dict[str, bool] = {kind: False for kind in KINDS}
        self._calls = asyncio.Semaphore(max_calls)
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0  # SDK calls made, for tests and logs

    async def score(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per item, in order: its result, or the error about it alone.

        Raises:
            GatewayError: never for one item's fault; the results carry those.
        """
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future = loop.create_future()
            self._pending[item.kind].append((item.value, future))
            futures.append(future)
        for kind in {item.kind for item in items}:
            if not self._gathering[kind]:  # the first item of a batch starts its timer
                self._gathering[kind] = True
                task = loop.create_task(self._flush_later(kind))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return list(await asyncio.gather(*futures))

    async def _flush_later(self, kind: str) -> None:
        await asyncio.sleep(self.max_delay_s)
        async with self._calls:  # while every call slot is busy, the batch keeps growing
            self._gathering[kind] = False
            batch, self._pending[kind] = self._pending[kind], []
            if batch:
                await self._run(kind, batch)

    async def _run(self, kind: str, batch: list[tuple[Any, asyncio.Future]]) -> None:
        live = [(value, future) for value, future in batch if not future.done()]
        try:
            while live:
                self.batches += 1
                try:
                    results = await self._call(kind, [value for value, _ in live])
                except RewardInvalidInputError as exc:
                    if exc.index is None or not 0 <= exc.index < len(live):
                        if len(live) == 1:
                            _settle(live[0][1], from_client_error(exc))
                            return
                        # The server did not say which: score each alone to find out.
                        await asyncio.gather(*(self._run(kind, [entry]) for entry in live))
                        return
                    _settle(live.pop(exc.index)[1], from_client_error(exc))
                    continue
                for (_, future), result in zip(live, results):
                    _settle(future, result)
                return
        except RewardClientError as exc:
            error = from_client_error(exc)
            for _, future in live:
                _settle(future, error)
        except Exception as exc:  # noqa: BLE001 - never leave a caller waiting forever
            _LOGGER.exception("scoring a batch of %d %s items failed", len(live), kind)
            for _, future in live:
                _settle(future, GatewayError(f"the gateway failed: {exc}", "server_error"))

    async def _call(self, kind: str, values: list) -> list[ScoreResult]:
        if self.metrics is not None:
            self.metrics.batches.labels(kind).observe(len(values))
        if kind == MESSAGES:
            return await self.client.score(values)
        if kind == TEXT:
            return await self.client.score_texts(values)
        if kind == IDS:
            return await self.client.score_ids(values)
        raise ValueError(f"unknown item kind {kind!r}")


def _settle(future: asyncio.Future, outcome: Outcome) -> None:
    if not future.done():  # the caller may have gone (client disconnect)
        future.set_result(outcome)
