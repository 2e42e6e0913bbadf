"""The engine's own queue: admission by the measured rate, waves in arrival order, work nobody
waits for dropped at row boundaries.

Triton's dynamic batcher hands a Python model every queued request in one `execute`, and answers
them all when it returns: one call could hold minutes of work, a small request waited for the
largest of its batch, and the queue policy never saw a request again once it was handed over. So
the engine's `execute` only hands its requests to an `EngineScheduler` and returns; one worker
thread then

- admits a request while the work queued ahead of it fits `QueueLimits.max_queue_s` seconds at the
  measured rate (tokens per second, from the waves computed so far), and refuses it at once with
  UNAVAILABLE ("the server is overloaded ...", which clients retry with backoff) otherwise; a
  request with a deadline it cannot meet is refused too (CANCELLED, "deadline passed", never
  retried). The queue's memory is therefore bounded by what the engine computes in `max_queue_s`,
  plus one request;
- computes waves in arrival order: requests of about `WAVE_ROWS` packed rows together, each
  answered as soon as its wave ends;
- drops, before a wave and before every packed row in it, a request whose client went (the
  `CancelBoard`), whose deadline passed, or which waited longer than the queue timeout.

Plain Python and one thread: the tests drive it without Triton.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from reward_server.pipeline import deadlines
from reward_server.pipeline.deadlines import CancelBoard, Ticket
from reward_server.pipeline.stages import EngineError, EngineUnavailable, RequestDropped, RequestError

_LOGGER = logging.getLogger(__name__)

WAVE_ROWS = 2               # packed rows per wave: enough to fill rows, few enough to answer early
DEFAULT_MAX_QUEUE_S = 5.0   # seconds of queued work admitted (at the measured rate)
UNMEASURED_ROWS = 8         # before the first wave is measured, the queue holds this many rows of tokens
RATE_SMOOTHING = 0.3        # weight of the newest wave in the rate estimate


@dataclass(frozen=True)
class QueueLimits:
    """How much work the engine's queue admits.

    Attributes:
        max_queue_s: a request is admitted while the work queued ahead of it takes at most this many
            seconds at the measured rate (an idle engine always admits one request).
        queue_timeout_s: a request still waiting this long after it reached the server is refused
            (UNAVAILABLE) rather than started; None: no limit. The default is twice `max_queue_s`.
        max_queue_requests: at most this many requests wait; None: only the time bound.
    """

    max_queue_s: float = DEFAULT_MAX_QUEUE_S
    queue_timeout_s: float | None = 2 * DEFAULT_MAX_QUEUE_S
    max_queue_requests: int | None = None

    def __post_init__(self) -> None:
        if self.max_queue_s <= 0:
            raise ValueError(f"max_queue_s must be positive, got {self.max_queue_s}")
        if self.queue_timeout_s is not None and self.queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s must be positive, got {self.queue_timeout_s}")
        if self.max_queue_requests is not None and self.max_queue_requests < 1:
            raise ValueError(f"max_queue_requests must be at least 1, got {self.max_queue_requests}")


@dataclass
class Job:
    """One request in the engine's queue: its inputs (input_ids [B, W], input_lengths [B, 1]), its
    ticket (None for a request sent to the engine directly) and how to answer it."""

    inputs: tuple[np.ndarray, np.ndarray]
    ticket: Ticket | None
    respond: Callable[[dict | RequestError], None]
    received: float = field(default_factory=time.time)

    @property
    def tokens(self) -> int:
        return int(np.asarray(self.inputs[1]).sum())

    @property
    def arrival(self) -> float:
        """When the request reached the server (the entry point's clock), else when the engine got it."""
        return self.ticket.arrival if self.ticket is not None else self.received


class RateEstimate:
    """Tokens per second the engine computes, smoothed over waves; None before the first wave."""

    def __init__(self, smoothing: float = RATE_SMOOTHING):
        self.smoothing = smoothing
        self.tokens_per_s: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.tokens_per_s = rate if self.tokens_per_s is None else (
            self.smoothing * rate + (1 - self.smoothing) * self.tokens_per_s)

    def seconds(self, tokens: int) -> float | None:
        return None if self.tokens_per_s is None else tokens / self.tokens_per_s


class EngineScheduler:
    """Admits, orders and drops the engine's requests; see the module docstring.

    Args:
        compute: scores a wave: (inputs of each job, alive) -> one result per job, where `alive()`
            says before every packed row which jobs are still wanted (`stages.score_requests`).
        token_budget: tokens per packed row (sizes waves, and the queue before a rate is measured).
        limits: the queue's bounds.
        board: where entry points mark requests whose clients went (None: deadlines only).
        on_drop: told (reason, requests, tokens) for each request dropped or refused, reason one of
            `deadlines.DROP_REASONS`; `on_wave` told (jobs, seconds) after each wave; both for metrics
            and the drain's counters, and their failures are logged, never raised.
        clock: wall-clock seconds (tickets use the same clock).
    """

    def __init__(self, compute: Callable[[list[tuple[np.ndarray, np.ndarray]], Callable[[], Sequence[bool]]],
                                         list[dict | RequestError]],
                 token_budget: int, limits: QueueLimits = QueueLimits(), board: CancelBoard | None = None,
                 on_drop: Callable[[str, int, int], None] | None = None,
                 on_wave: Callable[[list[Job], float], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.compute = compute
        self.token_budget = token_budget
        self.limits = limits
        self.board = board
        self.on_drop = on_drop
        self.on_wave = on_wave
        self.clock = clock
        self.rate = RateEstimate()
        self._queue: deque[Job] = deque()
        self._queued_tokens = 0
        self._running_tokens = 0
        self._running: list[Job] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- admission (Triton's thread) ---

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs`, or answer at once those that are dropped or refused."""
        for job in jobs:
            refusal = self._admit(job)
            if refusal is not None:
                self._answer(job, refusal)

    def _admit(self, job: Job) -> RequestError | None:
        now = self.clock()
        reason = deadlines.drop_reason(job.ticket, self.board, now)
        if reason is not None:
            self._dropped(reason, job)
            return RequestDropped(deadlines.drop_message(reason, job.ticket, now))
        with self._lock:
            ahead = self._queued_tokens + self._running_tokens
            waiting = len(self._queue)
            wait_s = self.rate.seconds(ahead)
            over = self._over_limit(ahead, waiting, wait_s)
            if over is not None:  # work whose clients went is dropped before it runs: it does not count
                ahead, waiting = self._live_ahead(now)
                wait_s = self.rate.seconds(ahead)
                over = self._over_limit(ahead, waiting, wait_s)
            if over is None and job.ticket is not None and job.ticket.deadline is not None and wait_s is not None:
                needed = wait_s + (self.rate.seconds(job.tokens) or 0.0)
                if needed > job.ticket.remaining(now):
                    self._dropped(deadlines.EXPIRED, job)
                    return RequestDropped(f"{deadlines.DEADLINE_PASSED} before it could finish: about {needed:.1f} s "
                                          f"of work ahead of and in it, {job.ticket.remaining(now):.1f} s left; "
                                          "it was not scored")
            if over is not None:
                self._dropped(deadlines.OVERLOADED, job)
                return EngineUnavailable(f"{deadlines.OVERLOADED_PREFIX}: {over}; retry later (with backoff) "
                                         "or on another replica")
            self._queue.append(job)
            self._queued_tokens += job.tokens
            self._lock.notify()
        return None

    def _live_ahead(self, now: float) -> tuple[int, int]:
        """(tokens, requests) queued or running whose clients still wait (the lock is held)."""
        live = [job for job in [*self._queue, *self._running]
                if deadlines.drop_reason(job.ticket, self.board, now) is None]
        return sum(job.tokens for job in live), sum(1 for job in live if job not in self._running)

    def _over_limit(self, ahead: int, waiting: int, wait_s: float | None) -> str | None:
        """Why the queue is full now, or None."""
        if ahead == 0:
            return None  # an idle engine takes any one request
        limits = self.limits
        if limits.max_queue_requests is not None and waiting >= limits.max_queue_requests:
            return f"{waiting} requests are queued, the limit is {limits.max_queue_requests}"
        if wait_s is None:
            cap = UNMEASURED_ROWS * self.token_budget
            if ahead >= cap:
                return f"{ahead} tokens are queued, the limit before the rate is measured is {cap}"
            return None
        if wait_s > limits.max_queue_s:
            return (f"{ahead} tokens are queued ahead, about {wait_s:.1f} s of work at "
                    f"{self.rate.tokens_per_s:.0f} tokens/s, over the limit of {limits.max_queue_s:g} s")
        return None

    # --- the worker ---

    def start(self) -> "EngineScheduler":
        """Start the worker thread (a daemon: it ends with the stub)."""
        self._thread = threading.Thread(target=self._work, name="engine-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Let the worker finish its wave and end."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> int:
        """Compute one wave from the queue (the worker's loop; tests call it directly).

        Returns:
            the number of requests answered.
        """
        wave, answered = [], 0
        with self._lock:
            budget = WAVE_ROWS * self.token_budget
            tokens = 0
            while self._queue:
                job = self._queue[0]
                refusal = self._refusal_at_start(job)
                if refusal is None and wave and tokens + job.tokens > budget:
                    break
                self._queue.popleft()
                self._queued_tokens -= job.tokens
                if refusal is not None:
                    self._answer(job, refusal)
                    answered += 1
                    continue
                wave.append(job)
                tokens += job.tokens
            self._running_tokens, self._running = tokens, wave
        if wave:
            answered += self._compute(wave)
        return answered

    def _refusal_at_start(self, job: Job) -> RequestError | None:
        """Why a queued job must not start now (gone, late, or waited past the queue timeout), or None."""
        now = self.clock()
        reason = deadlines.drop_reason(job.ticket, self.board, now)
        if reason is not None:
            self._dropped(reason, job)
            return RequestDropped(deadlines.drop_message(reason, job.ticket, now))
        timeout = self.limits.queue_timeout_s
        waited = now - job.arrival
        if timeout is not None and waited > timeout:
            self._dropped(deadlines.OVERLOADED, job)
            return EngineUnavailable(f"{deadlines.OVERLOADED_PREFIX}: the request waited {waited:.1f} s, over the "
                                     f"queue timeout of {timeout:g} s; retry later (with backoff)")
        return None

    def _compute(self, wave: list[Job]) -> int:
        gone: dict[int, str] = {}

        def alive() -> list[bool]:
            now = self.clock()
            for i, job in enumerate(wave):
                if i not in gone:
                    reason = deadlines.drop_reason(job.ticket, self.board, now)
                    if reason is not None:
                        gone[i] = reason
            return [i not in gone for i in range(len(wave))]

        started = time.perf_counter()
        try:
            results = self.compute([job.inputs for job in wave], alive)
        except Exception:  # noqa: BLE001 - the engine must keep serving
            _LOGGER.exception("the engine failed on a wave of %d requests", len(wave))
            results = [EngineError("internal error in the engine; the server log has the details")] * len(wave)
        seconds = time.perf_counter() - started
        now = self.clock()
        computed = 0
        for i, (job, result) in enumerate(zip(wave, results)):
            if i in gone:
                self._dropped(gone[i], job)
                result = RequestDropped(deadlines.drop_message(gone[i], job.ticket, now))
            else:
                computed += job.tokens
            self._answer(job, result)
        with self._lock:
            self._running_tokens, self._running = 0, []
        # waves cut short by drops would overstate the rate: measure only whole ones
        if not gone:
            self.rate.observe(computed, seconds)
        self._notify(self.on_wave, wave, seconds)
        return len(wave)

    # --- answers and counts ---

    def _answer(self, job: Job, result: dict | RequestError) -> None:
        try:
            job.respond(result)
        except Exception:  # noqa: BLE001
            _LOGGER.exception("could not answer a request")

    def _dropped(self, reason: str, job: Job) -> None:
        self._notify(self.on_drop, reason, 1, job.tokens)

    @staticmethod
    def _notify(hook: Callable[..., Any] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - metrics never fail requests
            _LOGGER.exception("a scheduler hook failed")

    def queued(self) -> tuple[int, int]:
        """(requests, tokens) waiting now."""
        with self._lock:
            return len(self._queue), self._queued_tokens
