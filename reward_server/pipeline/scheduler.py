"""The engine's own queue: admission by the measured rate, waves in arrival order, work nobody
waits for dropped at row boundaries.

Triton's dynamic batcher hands a Python model every queued request in one `execute`, and answers
them all when it returns: one call could hold minutes of work, a small request waited for the
largest of its batch, and the queue policy never saw a request again once it was handed over. So
the engine's `execute` only hands its requests to an `EngineScheduler` and returns; one worker
thread then

- admits a request while the live work queued ahead of it (requests whose clients still wait)
  fits `QueueLimits.max_queue_s` seconds at the measured rate (tokens per second, measured row by
  row), and otherwise refuses it with UNAVAILABLE ("the server is overloaded ...", which clients
  retry with backoff) after a second look a quarter of a second later (a cancellation takes a poll
  to reach the board); a request with a deadline it cannot meet is refused too (CANCELLED,
  "deadline passed", never retried). One request may always wait behind the running wave, so that
  the engine never idles between two requests, however large. The queue's memory is therefore
  bounded by what the engine computes in `max_queue_s`, plus one request, plus what arrives during
  the second looks;
- computes waves in arrival order: requests of about `WAVE_ROWS` packed rows together (fewer where
  those rows would take longer than `max_queue_s`), each answered as soon as its wave ends;
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
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np

from reward_server.pipeline import deadlines
from reward_server.pipeline.deadlines import CancelBoard, Ticket
from reward_server.pipeline.stages import EngineError, EngineUnavailable, RequestDropped, RequestError

_LOGGER = logging.getLogger(__name__)

WAVE_ROWS = 2               # packed rows per wave: enough to fill rows, few enough to answer early
# Seconds of queued work admitted (at the measured rate). Short: past capacity a request's wait is
# what makes it late for a client's deadline (10 s is common), and one request may always wait behind
# the running wave, so the engine never idles for want of a queue.
DEFAULT_MAX_QUEUE_S = 2.0
QUEUE_TIMEOUT_FACTOR = 5    # the default queue timeout: a safety net for wrong estimates
UNMEASURED_ROWS = 8         # before the first wave is measured, the queue holds this many rows of tokens
RATE_SMOOTHING = 0.3        # weight of the newest measurement (a row, or a wave) in the rate estimate
ADMIT_GRACE_S = 0.25        # a request over the limit gets a second look this long (EngineScheduler)
REVIEW_TICK_S = 0.05        # how often an idle worker takes those second looks


@dataclass(frozen=True)
class QueueLimits:
    """How much work the engine's queue admits.

    Attributes:
        max_queue_s: a request is admitted while the work queued ahead of it takes at most this many
            seconds at the measured rate (an idle engine always admits one request).
        queue_timeout_s: a request still waiting this long after it reached the server is refused
            (UNAVAILABLE) rather than started; None: no limit. The default is QUEUE_TIMEOUT_FACTOR times
            `max_queue_s`.
        max_queue_requests: at most this many requests wait; None: only the time bound.
    """

    max_queue_s: float = DEFAULT_MAX_QUEUE_S
    queue_timeout_s: float | None = QUEUE_TIMEOUT_FACTOR * DEFAULT_MAX_QUEUE_S
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

    @cached_property
    def tokens(self) -> int:
        # read for every queued job at every admission and second look: summed once
        return int(np.asarray(self.inputs[1]).sum())

    @property
    def arrival(self) -> float:
        """When the request reached the server (the entry point's clock), else when the engine got it."""
        return self.ticket.arrival if self.ticket is not None else self.received


class _CountRefusal(EngineUnavailable):
    """A refusal by the queue's request count (`QueueLimits.max_queue_requests`): given at once."""


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
        token_budget: tokens per packed row (sizes waves, and the queue before a rate is measured);
            None until the engine is loaded (`start`'s setup), then set before any request.
        limits: the queue's bounds.
        board: where entry points mark requests whose clients went (None: deadlines only).
        progress: the engine's running count of tokens computed (prefix-shared ones included), read
            at every row boundary to measure the rate; None: measured from whole waves only.
        on_drop: told (reason, requests, tokens) for each request dropped or refused, reason one of
            `deadlines.DROP_REASONS`; `on_wave` told (jobs, start, seconds) after each wave; `on_rate` the
            measured tokens/s after each row (`admission.LoadPublisher`); `on_queue` (requests, tokens)
            admitted and waiting, whenever that may have changed; their failures are logged, never raised.
        clock: wall-clock seconds (tickets use the same clock).
        admit_grace_s: how long a request over the limit waits for a second look before it is
            refused: a client's cancellation reaches the board a poll later (the entry points poll
            every `entry.POLL_S`), and the request behind the gone one should not pay for that.
    """

    def __init__(self, compute: Callable[[list[tuple[np.ndarray, np.ndarray]], Callable[[], Sequence[bool]]],
                                         list[dict | RequestError]],
                 token_budget: int | None, limits: QueueLimits = QueueLimits(), board: CancelBoard | None = None,
                 progress: Callable[[], int] | None = None,
                 on_drop: Callable[[str, int, int], None] | None = None,
                 on_wave: Callable[[list[Job], float, float], None] | None = None,
                 on_rate: Callable[[float | None], None] | None = None,
                 on_queue: Callable[[int, int], None] | None = None,
                 clock: Callable[[], float] = time.time, admit_grace_s: float = ADMIT_GRACE_S):
        self.compute = compute
        self.token_budget = token_budget
        self.limits = limits
        self.board = board
        self.progress = progress
        self.on_drop = on_drop
        self.on_wave = on_wave
        self.on_rate = on_rate
        self.on_queue = on_queue
        self.clock = clock
        self.admit_grace_s = admit_grace_s
        self.rate = RateEstimate()
        self._queue: deque[Job] = deque()
        self._probation: list[tuple[Job, float]] = []  # (job, second look until)
        self._running: list[Job] = []
        self._running_left = 0  # tokens of the running wave not computed yet
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- admission ---

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs`, or answer at once those that are dropped; a request over the limit gets a
        second look within `admit_grace_s` before it is refused."""
        for job in jobs:
            now = self.clock()
            gone = self._gone(job, now)
            if gone is not None:
                self._answer(job, gone)
                continue
            with self._lock:
                refusal = self._refusal(job, now)
                if refusal is None:
                    self._queue.append(job)
                elif self.admit_grace_s > 0 and not isinstance(refusal, _CountRefusal):
                    self._probation.append((job, now + self.admit_grace_s))
                else:
                    self._refuse(job, refusal)
                self._lock.notify()
        self._publish_queue()

    def _refusal(self, job: Job, now: float) -> RequestError | None:
        """Why `job` cannot be admitted now (the queue's limit, or its deadline), or None (the lock is held)."""
        live = [j for j in self._queue if deadlines.drop_reason(j.ticket, self.board, now) is None]
        running = any(deadlines.drop_reason(j.ticket, self.board, now) is None for j in self._running)
        ahead = sum(j.tokens for j in live) + (self._running_left if running else 0)
        wait_s = self.rate.seconds(ahead)
        limit = self.limits.max_queue_requests
        if limit is not None and len(live) >= limit:  # a set count: no second look
            return _CountRefusal(f"{deadlines.OVERLOADED_PREFIX}: {len(live)} requests are queued, the maximum queue "
                                 f"size is {limit}; retry later (with backoff) or on another replica")
        over = self._over_limit(ahead, len(live), wait_s)
        if over is not None:
            return EngineUnavailable(f"{deadlines.OVERLOADED_PREFIX}: {over}; retry later (with backoff) "
                                     "or on another replica")
        remaining = None if job.ticket is None else job.ticket.remaining(now)
        if remaining is not None and wait_s is not None:
            needed = wait_s + (self.rate.seconds(job.tokens) or 0.0)
            if needed > remaining:
                return RequestDropped(f"{deadlines.DEADLINE_PASSED} before it could finish: about {needed:.1f} s "
                                      f"of work ahead of and in it, {remaining:.1f} s left; it was not scored")
        return None

    def _over_limit(self, ahead: int, waiting: int, wait_s: float | None) -> str | None:
        """Why the queue is full now, or None."""
        if ahead == 0 or waiting == 0:
            return None  # one request may always wait behind the running wave: the engine never idles between two
        limits = self.limits
        if wait_s is None:
            cap = UNMEASURED_ROWS * self.token_budget
            if ahead >= cap:
                return f"{ahead} tokens are queued, the limit before the rate is measured is {cap}"
            return None
        if wait_s > limits.max_queue_s:
            return (f"{ahead} tokens are queued ahead, about {wait_s:.1f} s of work at "
                    f"{self.rate.tokens_per_s:.0f} tokens/s, over the limit of {limits.max_queue_s:g} s")
        return None

    def _review(self) -> None:
        """Second looks: admit what fits now, refuse what is out of grace (the lock is held)."""
        if not self._probation:
            return
        now, waiting = self.clock(), []
        for job, until in self._probation:
            gone = self._gone(job, now)
            if gone is not None:
                self._answer(job, gone)
                continue
            refusal = self._refusal(job, now)
            if refusal is None:
                self._queue.append(job)
            elif now >= until:
                self._refuse(job, refusal)
            else:
                waiting.append((job, until))
        self._probation = waiting

    def _refuse(self, job: Job, refusal: RequestError) -> None:
        self._dropped(deadlines.EXPIRED if isinstance(refusal, RequestDropped) else deadlines.OVERLOADED, job)
        self._answer(job, refusal)

    # --- the worker ---

    def start(self, setup: Callable[[], Any] | None = None) -> Any:
        """Start the worker thread (a daemon: it ends with the stub); return what `setup` returned.

        `setup`, when given, runs first on the worker thread, and this call waits for it and raises
        what it raised. Load the engine there: torch's OpenMP pool belongs to the thread that first
        runs parallel work, and a model loaded on another thread computed small waves ~2x slower on
        the worker (measured: 36 vs 15 ms; loaded on the worker, 8.4 ms as on the main thread).
        """
        ready: dict[str, Any] = {}
        loaded = threading.Event()

        def run() -> None:
            try:
                ready["value"] = setup() if setup is not None else self
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                ready["error"] = exc
                return
            finally:
                loaded.set()
            self._work()

        self._thread = threading.Thread(target=run, name="engine-scheduler", daemon=True)
        self._thread.start()
        loaded.wait()
        if "error" in ready:
            raise ready["error"]
        return ready["value"]

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
                    self._lock.wait(REVIEW_TICK_S if self._probation else None)
                    self._review()
                    self._publish_queue()
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
            self._review()
            budget = self.wave_tokens()
            tokens = 0
            while self._queue:
                job = self._queue[0]
                refusal = self._refusal_at_start(job)
                if refusal is None and wave and tokens + job.tokens > budget:
                    break
                self._queue.popleft()
                if refusal is not None:
                    self._answer(job, refusal)
                    answered += 1
                    continue
                wave.append(job)
                tokens += job.tokens
            self._running, self._running_left = wave, tokens
        self._publish_queue()
        if wave:
            answered += self._compute(wave, tokens)
        return answered

    def wave_tokens(self) -> int:
        """How many tokens a wave gathers (its first request always joins, however large):
        `WAVE_ROWS` packed rows, but no more than `QueueLimits.max_queue_s` of work at the measured
        rate. A slow model's two rows can take longer than the queue timeout allows the request
        admitted behind them to wait (a 0.6B model on 2 cores: ~9 s against 10 s); with waves of at
        most the admitted queue's length, an admitted request starts within twice that."""
        rows = WAVE_ROWS * self.token_budget
        per_s = self.rate.tokens_per_s
        return rows if per_s is None else max(1, min(rows, int(per_s * self.limits.max_queue_s)))

    def _refusal_at_start(self, job: Job) -> RequestError | None:
        """Why a queued job must not start now (gone, late, or waited past the queue timeout), or None."""
        now = self.clock()
        gone = self._gone(job, now)
        if gone is not None:
            return gone
        timeout = self.limits.queue_timeout_s
        waited = now - job.arrival
        if timeout is not None and waited > timeout:
            self._dropped(deadlines.OVERLOADED, job)
            return EngineUnavailable(f"{deadlines.OVERLOADED_PREFIX}: the request waited {waited:.1f} s, over the "
                                     f"queue timeout of {timeout:g} s; retry later (with backoff)")
        return None

    def _compute(self, wave: list[Job], tokens: int) -> int:
        gone: dict[int, RequestDropped] = {}  # the answers of jobs found gone at a row boundary
        started = self.clock()
        base = mark = self.progress() if self.progress is not None else 0
        last = started

        def alive() -> list[bool]:
            nonlocal mark, last
            now = self.clock()
            if self.progress is not None:  # a row ended: measure it, and what is left of the wave
                done = self.progress()
                self.rate.observe(done - mark, now - last)
                mark, last = done, now
                self._notify(self.on_rate, self.rate.tokens_per_s)
            for i, job in enumerate(wave):
                if i not in gone:
                    answer = self._gone(job, now)
                    if answer is not None:
                        gone[i] = answer
            with self._lock:
                self._running_left = max(0, tokens - (mark - base))
                self._review()
            self._publish_queue()
            return [i not in gone for i in range(len(wave))]

        try:
            results = self.compute([job.inputs for job in wave], alive)
        except Exception:  # noqa: BLE001 - the engine must keep serving
            _LOGGER.exception("the engine failed on a wave of %d requests", len(wave))
            results = [EngineError("internal error in the engine; the server log has the details")] * len(wave)
        now = self.clock()
        if self.progress is not None:
            self.rate.observe(self.progress() - mark, now - last)
        elif not gone:  # without row counts, only a whole wave is a measurement
            self.rate.observe(tokens, now - started)
        self._notify(self.on_rate, self.rate.tokens_per_s)
        for i, (job, result) in enumerate(zip(wave, results)):
            self._answer(job, gone.get(i, result))
        with self._lock:
            self._running, self._running_left = [], 0
        self._notify(self.on_wave, wave, started, now - started)
        return len(wave)

    # --- answers and counts ---

    def _answer(self, job: Job, result: dict | RequestError) -> None:
        try:
            job.respond(result)
        except Exception:  # noqa: BLE001
            _LOGGER.exception("could not answer a request")

    def _dropped(self, reason: str, job: Job) -> None:
        self._notify(self.on_drop, reason, 1, job.tokens)

    def _gone(self, job: Job, now: float) -> RequestDropped | None:
        """The answer of a job nobody waits for any more (counted), or None."""
        reason = deadlines.drop_reason(job.ticket, self.board, now)
        if reason is None:
            return None
        self._dropped(reason, job)
        return RequestDropped(deadlines.drop_message(reason, job.ticket, now))

    @staticmethod
    def _notify(hook: Callable[..., Any] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - metrics never fail requests
            _LOGGER.exception("a scheduler hook failed")

    def _publish_queue(self) -> None:
        """Tell `on_queue` what is admitted and waiting now. Under the lock (re-entrant: callers may
        hold it already), so that two threads' counts reach it in the order they were taken."""
        if self.on_queue is None:
            return
        with self._lock:
            self._notify(self.on_queue, len(self._queue), sum(job.tokens for job in self._queue))

    def queued(self) -> tuple[int, int]:
        """(requests, tokens) waiting now (admitted or on a second look)."""
        with self._lock:
            jobs = [*self._queue, *(job for job, _ in self._probation)]
            return len(jobs), sum(job.tokens for job in jobs)
