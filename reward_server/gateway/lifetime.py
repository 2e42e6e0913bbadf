"""How long an HTTP request is worth working for: its deadline, and its client still being there.

A trainer whose HTTP call timed out, or that was stopped, does not read its answer: scoring it
anyway takes the server from requests still waited for. So every scoring request has a deadline
(the caller's own timeout when it sends one, never later than the gateway's `--timeout`), and
the client's disconnect is watched while its work is pending; either one withdraws the work (the
`Coalescer` drops what it has not sent and cancels the gRPC calls nobody needs any more).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable, Callable, Mapping, TypeVar

from reward_server.gateway.core import GatewayError

T = TypeVar("T")

# The caller's timeout in seconds: ours first, then the one the OpenAI SDK (NIM clients) sends with
# every request, its own HTTP timeout.
TIMEOUT_HEADERS = ("x-request-timeout", "x-stainless-timeout")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def request_timeout(headers: Mapping[str, str], limit_s: float) -> float:
    """Seconds the caller waits for its answer: its timeout header, at most `limit_s`.

    Args:
        headers: the request's headers (case-insensitive, as Starlette's are).
        limit_s: the gateway's own request timeout (`--timeout`), also the default.

    Raises:
        GatewayError: a timeout header that is not a positive, finite number of seconds.
    """
    for name in TIMEOUT_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise GatewayError(f"{_title(name)} must be a positive number of seconds, got {value[:40]!r}",
                               param=_title(name))
        return min(seconds, limit_s)
    return limit_s


async def unless_disconnected(receive: Callable[[], Awaitable[Mapping[str, Any]]], work: Awaitable[T]) -> T:
    """`work`'s result, unless the HTTP client disconnects first.

    Call it once the request body has been read: `receive` (the ASGI receive callable) then only
    says that the client went (`http.disconnect`). On a disconnect, `work` is cancelled and its
    cancellation has run (the coalescer has withdrawn its items) before `ClientGone` is raised.

    Raises:
        ClientGone: the client disconnected first.
        Exception: whatever `work` raises.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done and watcher.exception() is not None:
            # The disconnect cannot be watched (not an ASGI server we know): just wait for the work.
            await asyncio.wait({task})
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():  # the client went, or this request itself was cancelled (shutdown)
            task.cancel()
            await asyncio.wait({task})


async def _disconnect(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    while (await receive()).get("type") != "http.disconnect":
        pass


def _title(header: str) -> str:
    return "-".join(part.capitalize() for part in header.split("-"))
