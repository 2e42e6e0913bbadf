"""Split large inputs into requests and run them with bounded concurrency, in input order.

At most ``max_in_flight`` requests are outstanding; the input iterable is read only as fast as
results are consumed (backpressure), so memory stays bounded for inputs of any length.
Results come back in input order: the oldest request is always the next one yielded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from concurrent.futures import Executor, Future
from typing import (Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Deque, Iterable,
                    Iterator, List, Tuple, TypeVar, Union)

T = TypeVar("T")
R = TypeVar("R")

Chunk = Tuple[int, List[T]]


def chunked(items: Iterable[T], size: int) -> Iterator[Tuple[int, List[T]]]:
    """Yield ``(offset, items[offset:offset+size])`` lazily; the last chunk may be shorter.

    Raises:
        ValueError: if ``size`` < 1.
    """
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    chunk: List[T] = []
    offset = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield offset, chunk
            offset += size
            chunk = []
    if chunk:
        yield offset, chunk


def ordered_map(fn: Callable[[T], R], items: Iterable[T], max_in_flight: int,
                executor: Executor) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, with at most ``max_in_flight`` running.

    Raises:
        ValueError: if ``max_in_flight`` < 1.
        Exception: the first error of ``fn`` in input order; later work is cancelled.
    """
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")
    pending: Deque[Future] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


@contextlib.asynccontextmanager
async def aclosing(generator: Any) -> AsyncIterator[Any]:
    """``async with aclosing(agen)``: close ``agen`` on exit (``contextlib.aclosing`` is 3.10+).

    An async generator that iterates another does not close it when it is itself closed; the inner
    one would wait for the garbage collector, and its requests in flight with it.
    """
    try:
        yield generator
    finally:
        await generator.aclose()


async def _as_async(items: Union[Iterable[T], AsyncIterable[T]]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def achunked(items: Union[Iterable[T], AsyncIterable[T]],
                   size: int) -> AsyncIterator[Tuple[int, List[T]]]:
    """Asyncio twin of :func:`chunked`, accepting sync or async iterables.

    Raises:
        ValueError: if ``size`` < 1.
    """
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    chunk: List[T] = []
    offset = 0
    async for item in _as_async(items):
        chunk.append(item)
        if len(chunk) == size:
            yield offset, chunk
            offset += size
            chunk = []
    if chunk:
        yield offset, chunk


async def aordered_map(fn: Callable[[T], Awaitable[R]],
                       items: Union[Iterable[T], AsyncIterable[T]],
                       max_in_flight: int) -> AsyncIterator[R]:
    """Asyncio twin of :func:`ordered_map`: ``fn`` is a coroutine function.

    When the caller stops early (closes this generator, or its task is cancelled) or an error ends
    it, the tasks still running are cancelled and awaited: their gRPC calls are cancelled with them.

    Raises:
        ValueError: if ``max_in_flight`` < 1.
        Exception: the first error of ``fn`` in input order; later work is cancelled.
    """
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")
    pending: Deque["asyncio.Future[Any]"] = deque()
    try:
        async for item in _as_async(items):
            pending.append(asyncio.ensure_future(fn(item)))
            if len(pending) >= max_in_flight:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
