"""Retries, deadlines and the retry budget: when a request is sent again, and for how long.

Scoring is idempotent, so a request rejected as overloaded (UNAVAILABLE, RESOURCE_EXHAUSTED,
a full or timed-out server queue), refused by a restarting or stopping server, or cancelled by
the server (CANCELLED that this client did not cause) can simply be sent again. Invalid input,
deadlines, the caller's own cancellations and other server errors are not retried
(``reward_client.transport.wire.map_error`` decides).

Past a server's capacity, retries are what turns overload into collapse: every rejected request
comes back, and work whose caller has given up is still computed. So a request's attempts are
bounded three ways, here and nowhere else:

- :class:`RetryPolicy`: attempts per request, and jittered exponential backoff between them;
- :class:`RetryBudget`: retries per client, a fraction of its first attempts (a token bucket);
- :class:`Attempts`: a request's overall deadline; every attempt is sent with what is left of it.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, TypeVar

from reward_client.errors import RewardClientError, RewardTimeoutError, RewardUnavailableError

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

# An attempt is not sent with less time than this: it could hardly be scored, yet would cost the
# server its decoding and queueing. Shorter when timeout_s or deadline_s are themselves short.
MIN_ATTEMPT_S = 0.05
# The budget holds at most budget_min_retries plus what this many first attempts deposit, so a
# long quiet stretch of successes cannot bank a burst of retries for the next outage.
BUDGET_WINDOW = 100
# Past the budget, a retry without a deadline waits at most this long for the budget to earn it.
MAX_BUDGET_WAIT_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a retryable failure.

    Attempt ``n`` (0-based) that fails waits ``cap_n * (1 - jitter * u)`` seconds before the
    next one, with ``cap_n = min(max_backoff_s, initial_backoff_s * multiplier ** n)`` and ``u``
    uniform in [0, 1): ``jitter=1`` is "full jitter", ``jitter=0`` a fixed exponential schedule.

    Retries are also limited per client by a retry budget (:class:`RetryBudget`): each request's
    first attempt earns ``budget_ratio`` retries, a retry spends one, the client starts with
    ``budget_min_retries`` and earns ``budget_min_per_s`` more every second. Past that, a
    retryable error is raised at once.

    Attributes:
        max_attempts: attempts in total per request, the first included (1 disables retries).
        initial_backoff_s: the cap of the first wait.
        max_backoff_s: the largest wait.
        multiplier: growth of the cap per attempt.
        jitter: fraction of the cap that is randomised away, in [0, 1].
        budget_ratio: retries allowed per first attempt, over the client's recent requests.
        budget_min_retries: retries a client may make whatever its traffic (its starting balance).
        budget_min_per_s: retries a second a client earns whatever its traffic (a slow trickle, so
            that a client sending few large requests can outlast a long overload with backoff).
    """

    # Ten attempts: waits capped at 0.05, 0.1, ... 3.2, 5, 5 s, up to ~16 s in all (~8 s on average with
    # full jitter): a bounded queue's bursts, and most of a server restart (10 to 17 s, docs/reliability.md).
    max_attempts: int = 10
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 1.0
    # At most 20% more requests than the caller's own (gRPC's retry throttling and Finagle's
    # RetryBudget use the same order), and ten retries for a client that has sent little yet.
    budget_ratio: float = 0.2
    budget_min_retries: int = 10
    budget_min_per_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0.0 <= self.budget_ratio < math.inf:
            raise ValueError("budget_ratio must be a finite number >= 0")
        if self.budget_min_retries < 0:
            raise ValueError("budget_min_retries must be >= 0")
        if not 0.0 <= self.budget_min_per_s < math.inf:
            raise ValueError("budget_min_per_s must be a finite number >= 0")

    def backoff_s(self, attempt: int, rng: Optional[random.Random] = None) -> float:
        """Return the wait after failed attempt ``attempt`` (0-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** attempt)
        draw = (rng or random).random()
        return cap * (1.0 - self.jitter * draw)


NO_RETRY = RetryPolicy(max_attempts=1)


class RetryBudget:
    """The retries a client may still make: a token bucket shared by all its requests.

    A request's first attempt deposits ``budget_ratio`` tokens, a retry withdraws one; the bucket
    starts with ``budget_min_retries`` and holds at most ``budget_min_retries + budget_ratio *
    BUDGET_WINDOW``. Under sustained failure a client therefore adds at most ``budget_ratio``
    times its own traffic in retries, instead of ``max_attempts`` times.

    Thread-safe, and never blocks for long, so asyncio code uses it as it is.
    """

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        """Create a full-reserve budget for ``policy``'s ``budget_ratio``, ``budget_min_retries`` and
        ``budget_min_per_s`` (earned on ``clock``)."""
        self.ratio = policy.budget_ratio
        self.min_retries = policy.budget_min_retries
        self.per_s = policy.budget_min_per_s
        self.capacity = policy.budget_min_retries + policy.budget_ratio * BUDGET_WINDOW
        self._tokens = float(policy.budget_min_retries)
        self._clock = clock
        self._refilled = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        # the lock is held: what the elapsed time earned, up to the capacity
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + self.per_s * max(0.0, now - self._refilled))
        self._refilled = now

    @property
    def tokens(self) -> float:
        """The retries the client may make now (fractional)."""
        with self._lock:
            self._refill()
            return self._tokens

    def deposit(self) -> None:
        """Record a request's first attempt."""
        with self._lock:
            self._tokens = min(self.capacity, self._tokens + self.ratio)

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; return False, taking nothing, when there is none."""
        with self._lock:
            self._refill()
            # The tolerance absorbs float sums: five deposits of 0.2 make one retry.
            if self._tokens < 1.0 - 1e-9:
                return False
            self._tokens = max(0.0, self._tokens - 1.0)
            return True

    def reserve(self, max_wait_s: float) -> Optional[float]:
        """Take one retry, now or on credit: return the seconds to wait before using it (0 when the
        budget holds one), or None, taking nothing, when it would not be earned within
        ``max_wait_s`` (or never: ``budget_min_per_s`` is 0). Retries taken on credit queue up: each
        waits until the time-earned share has paid for it, so retries never exceed the budget."""
        with self._lock:
            self._refill()
            if self._tokens >= 1.0 - 1e-9:
                self._tokens = max(0.0, self._tokens - 1.0) if self._tokens >= 1.0 else 0.0
                return 0.0
            if self.per_s <= 0:
                return None
            wait = (1.0 - self._tokens) / self.per_s
            if wait > max_wait_s:
                return None
            self._tokens -= 1.0
            return wait

    def describe(self) -> str:
        """One phrase for error messages: what the budget allows."""
        return (f"retries are limited to {self.ratio:g} per request plus {self.min_retries}, and {self.per_s:g} "
                "a second; see RetryPolicy.budget_ratio, budget_min_retries and budget_min_per_s")


class Attempts:
    """The attempts of one request: how long each may take, when to stop, how long to wait.

    Every retry loop of one request shares one ``Attempts`` (a routed request that moves to
    another replica keeps its deadline). Not thread-safe: a request's attempts are sequential.

    Attributes:
        made: attempts sent so far.
    """

    def __init__(self, policy: RetryPolicy, *, budget: Optional[RetryBudget] = None,
                 timeout_s: Optional[float] = None, deadline_s: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, rng: Optional[random.Random] = None) -> None:
        """Start the request's clock.

        Args:
            policy: attempts, backoff.
            budget: the client's retry budget (None: unlimited but for ``policy.max_attempts``).
            timeout_s: the most one attempt may take (None: no limit).
            deadline_s: the most the whole request may take, retries and waits included, from now
                (None: only ``timeout_s`` bounds it).
            clock: monotonic seconds (injected by tests).
            rng: source of jitter (injected by tests).
        """
        self.policy = policy
        self.budget = budget
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.made = 0
        self._clock = clock
        self._rng = rng
        self._end = None if deadline_s is None else clock() + deadline_s
        limits = [MIN_ATTEMPT_S] + [s for s in (timeout_s, None if deadline_s is None else deadline_s / 2)
                                    if s is not None]
        self.floor_s = min(limits)

    def remaining_s(self) -> Optional[float]:
        """Seconds left before the request's deadline (None: it has none)."""
        return None if self._end is None else self._end - self._clock()

    def start(self) -> Optional[float]:
        """Begin an attempt; return the seconds it may take (None: no limit).

        That is ``timeout_s`` or what is left of ``deadline_s``, whichever is less.

        Raises:
            RewardTimeoutError: if what is left of the deadline is below the floor
                (:data:`MIN_ATTEMPT_S`); nothing is sent.
        """
        left = self.remaining_s()
        if left is not None and left < self.floor_s:
            raise self._expired(left, self.floor_s)
        if self.made == 0 and self.budget is not None:
            self.budget.deposit()
        self.made += 1
        limits = [s for s in (self.timeout_s, left) if s is not None]
        return min(limits) if limits else None

    def wait_before_retry(self, error: RewardUnavailableError, failures: int) -> float:
        """Decide on a retry after a retryable failure; return the seconds to wait first.

        The wait is the policy's backoff, shortened so that twice the floor is left after it: the
        floor for the next attempt, and as much again for the sleep's own lateness.

        Args:
            error: the failure.
            failures: failed attempts of this retry loop, this one included.

        Raises:
            RewardUnavailableError: ``error`` itself, when ``policy.max_attempts`` are spent, or,
                with a note in its message, when the client's retry budget is.
            RewardTimeoutError: when the deadline leaves no time for another attempt.
        """
        if failures >= self.policy.max_attempts:
            raise error
        delay = self.policy.backoff_s(failures - 1, self._rng)
        left = self.remaining_s()
        if left is not None:
            room = left - 2 * self.floor_s
            if room <= 0:
                raise self._expired(left, 2 * self.floor_s) from error
            delay = min(delay, room)
        if self.budget is not None:
            # past the budget a retry waits for the share that time earns it, within the deadline
            wait = self.budget.reserve(MAX_BUDGET_WAIT_S if left is None else left - 2 * self.floor_s)
            if wait is None:
                raise _noted(error, f"not retried: the client's retry budget is spent ({self.budget.describe()})")
            delay = max(delay, wait)
        _LOGGER.debug("retryable failure (attempt %d/%d), waiting %.3fs: %s",
                      failures, self.policy.max_attempts, delay, error)
        return delay

    def timed_out(self, error: RewardTimeoutError) -> RewardTimeoutError:
        """Return ``error`` (an attempt passed its deadline) with the attempt count in its message."""
        return _noted(error, f"attempt {self.made}{self._deadline_phrase()}")

    def _expired(self, left: float, needed: float) -> RewardTimeoutError:
        return RewardTimeoutError(
            f"deadline passed: {max(left, 0.0):.3f}s left of the request's deadline_s={self.deadline_s:g}, "
            f"too little for another attempt (at least {needed:.3f}s); "
            f"{self.made} attempt{'' if self.made == 1 else 's'} made")

    def _deadline_phrase(self) -> str:
        return "" if self.deadline_s is None else f" of a request with deadline_s={self.deadline_s:g}"


def _noted(error: RewardClientError, note: str) -> RewardClientError:
    # The same exception (type, traceback, cause), its message extended: callers match on text.
    error.args = (f"{error} ({note})",) + tuple(error.args[1:])
    return error


def call_with_retries(call: Callable[[Optional[float]], T], attempts: Attempts,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``call``, retrying :class:`RewardUnavailableError` as ``attempts`` allows.

    Args:
        call: one attempt; takes the seconds it may take (None: no limit) and raises reward
            client errors (already mapped).
        attempts: the request's attempts (policy, budget, deadline).
        sleep: the function that waits (injected by tests; interruptible by the sync client).

    Raises:
        RewardUnavailableError: if the last allowed attempt was still unavailable, or the retry
            budget is spent.
        RewardTimeoutError: an attempt passed its deadline, or the request's deadline leaves no
            time for another.
        RewardClientError: any other error of ``call``, at once.
    """
    failures = 0
    while True:
        limit = attempts.start()
        try:
            return call(limit)
        except RewardUnavailableError as exc:
            failures += 1
            sleep(attempts.wait_before_retry(exc, failures))
        except RewardTimeoutError as exc:
            raise attempts.timed_out(exc)


async def acall_with_retries(call: Callable[[Optional[float]], Awaitable[T]], attempts: Attempts,
                             sleep: Optional[Callable[[float], Awaitable[None]]] = None) -> T:
    """Asyncio twin of :func:`call_with_retries`: ``call`` returns an awaitable.

    Raises:
        RewardUnavailableError: if the last allowed attempt was still unavailable, or the retry
            budget is spent.
        RewardTimeoutError: an attempt passed its deadline, or the request's deadline leaves no
            time for another.
        RewardClientError: any other error of ``call``, at once.
    """
    import asyncio  # local: the sync client never needs an event loop

    wait = sleep or asyncio.sleep
    failures = 0
    while True:
        limit = attempts.start()
        try:
            return await call(limit)
        except RewardUnavailableError as exc:
            failures += 1
            await wait(attempts.wait_before_retry(exc, failures))
        except RewardTimeoutError as exc:
            raise attempts.timed_out(exc)
