"""Retry policy: exponential backoff with jitter for retryable failures.

Scoring is idempotent, so a request rejected as overloaded (UNAVAILABLE, RESOURCE_EXHAUSTED,
a full or timed-out server queue), refused by a restarting or stopping server, or cancelled by
the server (CANCELLED that this client did not cause) can simply be sent again. Invalid input,
deadlines, the caller's own cancellations and other server errors are not retried
(``reward_client.transport.wire.map_error`` decides).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, TypeVar

from reward_client.errors import RewardUnavailableError

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a retryable failure.

    Attempt ``n`` (0-based) that fails waits ``cap_n * (1 - jitter * u)`` seconds before the
    next one, with ``cap_n = min(max_backoff_s, initial_backoff_s * multiplier ** n)`` and ``u``
    uniform in [0, 1): ``jitter=1`` is "full jitter", ``jitter=0`` a fixed exponential schedule.

    Attributes:
        max_attempts: attempts in total, the first included (1 disables retries).
        initial_backoff_s: the cap of the first wait.
        max_backoff_s: the largest wait.
        multiplier: growth of the cap per attempt.
        jitter: fraction of the cap that is randomised away, in [0, 1].
    """

    # Ten attempts: waits capped at 0.05, 0.1, ... 3.2, 5, 5 s, up to ~16 s in all (~8 s on average with
    # full jitter): a bounded queue's bursts, and most of a server restart (10 to 17 s, docs/reliability.md).
    max_attempts: int = 10
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff_s(self, attempt: int, rng: Optional[random.Random] = None) -> float:
        """Return the wait after failed attempt ``attempt`` (0-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** attempt)
        draw = (rng or random).random()
        return cap * (1.0 - self.jitter * draw)


NO_RETRY = RetryPolicy(max_attempts=1)


def call_with_retries(call: Callable[[], T], policy: RetryPolicy,
                      sleep: Callable[[float], None] = time.sleep,
                      rng: Optional[random.Random] = None) -> T:
    """Run ``call``, retrying :class:`RewardUnavailableError` as ``policy`` allows.

    Args:
        call: the operation; it raises reward client errors (already mapped).
        policy: the retry policy.
        sleep: the function that waits (injected by tests).
        rng: source of jitter (injected by tests).

    Raises:
        RewardUnavailableError: if the last allowed attempt was still unavailable.
        RewardClientError: any non-retryable error of ``call``, at once.
    """
    attempt = 0
    while True:
        try:
            return call()
        except RewardUnavailableError as exc:
            attempt += 1
            if attempt >= policy.max_attempts:
                raise
            delay = policy.backoff_s(attempt - 1, rng)
            _LOGGER.debug("retryable failure (attempt %d/%d), waiting %.3fs: %s",
                          attempt, policy.max_attempts, delay, exc)
            sleep(delay)


async def acall_with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy,
                             sleep: Optional[Callable[[float], Awaitable[None]]] = None,
                             rng: Optional[random.Random] = None) -> T:
    """Asyncio twin of :func:`call_with_retries`: ``call`` returns an awaitable.

    Raises:
        RewardUnavailableError: if the last allowed attempt was still unavailable.
        RewardClientError: any non-retryable error of ``call``, at once.
    """
    import asyncio  # local: the sync client never needs an event loop

    wait = sleep or asyncio.sleep
    attempt = 0
    while True:
        try:
            return await call()
        except RewardUnavailableError as exc:
            attempt += 1
            if attempt >= policy.max_attempts:
                raise
            delay = policy.backoff_s(attempt - 1, rng)
            _LOGGER.debug("retryable failure (attempt %d/%d), waiting %.3fs: %s",
                          attempt, policy.max_attempts, delay, exc)
            await wait(delay)
