"""Deadlines, the retry budget and cancellation in the reward client: pure SDK logic, no server.

Clocks and sleeps are injected; the fakes stand in for tritonclient at its boundary (``infer``,
``async_infer`` and the ``CallContext`` it returns), which is all the SDK sees of it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from tritonclient.utils import InferenceServerException

from reward_client import (AsyncRewardClient, RetryPolicy, RewardClient, RewardClientError,
                           RewardInvalidInputError, RewardTimeoutError, RewardUnavailableError)
from reward_client.retry import (BUDGET_WINDOW, MIN_ATTEMPT_S, Attempts, RetryBudget, acall_with_retries,
                                 call_with_retries)
from reward_client.transport import wire
from reward_client.transport.endpoints import EndpointSet
from reward_client.transport.replicas import ReplicaPool
from tests.test_client_unit import (CancellingServer, FakeAioTriton, FakeTriton, conversations, expected_scores,
                                    fake_client)

OVERLOADED = ("the server is overloaded: 3.2 s of work queued, more than max_queue_s=2", "StatusCode.UNAVAILABLE")


class FakeClock:
    """Monotonic seconds that move only when told: by a fake call's duration or a fake sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


FROZEN = lambda: 0.0  # noqa: E731 - a budget that earns nothing with time


def failing(duration_s: float, message=OVERLOADED):
    return ("fail", duration_s, message)


def answering(duration_s: float):
    return ("ok", duration_s, None)


class ScriptedTriton(FakeTriton):
    """Answers per a script of (outcome, seconds) steps on a fake clock, recording what each attempt
    was sent with. A step longer than the attempt's gRPC deadline ends at the deadline, as gRPC does."""

    def __init__(self, clock: FakeClock, script):
        super().__init__(max_delay_s=0.0)
        self.clock = clock
        self.script = list(script)
        self.sent = []  # (clock, client_timeout, timeout) per attempt

    def _step(self, client_timeout, timeout):
        self.sent.append((self.clock.now, client_timeout, timeout))
        outcome, seconds, message = self.script.pop(0) if self.script else answering(0.0)
        if client_timeout is not None and seconds > client_timeout:
            self.clock.advance(client_timeout)
            raise InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")
        self.clock.advance(seconds)
        if outcome == "fail":
            raise InferenceServerException(message[0], status=message[1])

    def infer(self, model, inputs, outputs=None, client_timeout=None, timeout=None, **_):
        self._step(client_timeout, timeout)
        return super().infer(model, inputs, outputs, client_timeout)


class ScriptedAioTriton(FakeAioTriton):
    """The asyncio flavour of :class:`ScriptedTriton`."""

    def __init__(self, clock: FakeClock, script):
        super().__init__(max_delay_s=0.0)
        self.clock = clock
        self.script = list(script)
        self.sent = []

    _step = ScriptedTriton._step

    async def infer(self, model, inputs, outputs=None, client_timeout=None, timeout=None, **_):
        self._step(client_timeout, timeout)
        return await super().infer(model, inputs, outputs, client_timeout)


def scripted_client(fake, clock, **kwargs) -> RewardClient:
    client = fake_client(fake, batch_size=8, max_in_flight=1, **kwargs)
    client._sleep, client._clock = clock.sleep, clock
    return client


def assert_sent_with_what_was_left(sent, start, deadline_s, timeout_s=None):
    """Each attempt's gRPC deadline is min(timeout_s, what was left), and Triton's timeout the same in us."""
    for at, client_timeout, timeout in sent:
        left = start + deadline_s - at
        assert client_timeout == pytest.approx(min(left, timeout_s or left))
        assert timeout == max(1, int(client_timeout * 1_000_000))


# --------------------------------------------------------------------------- what each attempt is sent with


def test_attempt_deadline_keywords():
    assert wire.attempt_deadline(None) == {"client_timeout": None, "timeout": None}
    assert wire.attempt_deadline(1.5) == {"client_timeout": 1.5, "timeout": 1_500_000}
    assert wire.attempt_deadline(2.5e-7)["timeout"] == 1  # never 0: Triton reads 0 as "no timeout"


def test_each_attempt_gets_min_of_timeout_and_what_is_left():
    clock = FakeClock()
    attempts = Attempts(RetryPolicy(), timeout_s=1.0, deadline_s=2.5, clock=clock)
    assert attempts.start() == 1.0          # 2.5 s left: timeout_s is the smaller
    clock.advance(1.7)
    assert attempts.start() == pytest.approx(0.8)  # 0.8 s left
    clock.advance(0.78)
    with pytest.raises(RewardTimeoutError, match="2 attempts made"):
        attempts.start()                    # 20 ms left: below the floor, nothing is sent
    assert attempts.made == 2
    assert Attempts(RetryPolicy(), timeout_s=3.0).start() == 3.0
    assert Attempts(RetryPolicy()).start() is None


def test_sync_client_sends_the_remaining_time_as_grpc_deadline_and_triton_timeout():
    clock = FakeClock()
    fake = ScriptedTriton(clock, [failing(0.4), failing(0.4), failing(0.4), answering(0.05)])
    policy = RetryPolicy(initial_backoff_s=0.1, jitter=0.0)
    convs = conversations(8)
    with scripted_client(fake, clock, retry=policy, timeout_s=1.6, deadline_s=2.0) as client:
        start = clock.now
        results = client.score(convs)
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    # t=0: 2.0 left, capped at 1.6; t=0.5: 1.5; t=1.1: 0.9; t=1.9: 0.1.
    assert [at - start for at, _, _ in fake.sent] == pytest.approx([0.0, 0.5, 1.1, 1.9])
    assert [sent[2] for sent in fake.sent] == [1_600_000, 1_500_000, pytest.approx(900_000, abs=1),
                                               pytest.approx(100_000, abs=1)]
    assert_sent_with_what_was_left(fake.sent, start, 2.0, timeout_s=1.6)


def test_async_client_sends_the_remaining_time_as_grpc_deadline_and_triton_timeout():
    clock = FakeClock()
    fake = ScriptedAioTriton(clock, [failing(0.3), failing(0.3), answering(0.1)])
    policy = RetryPolicy(initial_backoff_s=0.2, multiplier=1.0, jitter=0.0)

    async def run():
        client = AsyncRewardClient("127.0.0.1:1", batch_size=8, max_in_flight=1, retry=policy, deadline_s=1.5)
        await client._client.close()
        client._client, client._sleep, client._clock = fake, clock.asleep, clock
        results = await client.score(conversations(8))
        await client.close()
        return results

    start = clock.now
    results = asyncio.run(run())
    assert len(results) == 8
    assert [at - start for at, _, _ in fake.sent] == pytest.approx([0.0, 0.5, 1.0])
    assert_sent_with_what_was_left(fake.sent, start, 1.5, timeout_s=60.0)


def test_without_a_deadline_each_attempt_gets_timeout_s():
    clock = FakeClock()
    fake = ScriptedTriton(clock, [failing(5.0), answering(0.0)])
    with scripted_client(fake, clock, retry=RetryPolicy(jitter=0.0), timeout_s=7.0) as client:
        client.score(conversations(3))
    assert [sent[1:] for sent in fake.sent] == [(7.0, 7_000_000), (7.0, 7_000_000)]


# --------------------------------------------------------------------------- no attempt after the deadline


def test_no_attempt_is_sent_once_the_deadline_leaves_too_little():
    clock = FakeClock()
    fake = ScriptedTriton(clock, [failing(0.05)] * 100)
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.4, multiplier=1.0, jitter=0.0)
    with scripted_client(fake, clock, retry=policy, deadline_s=1.0) as client:
        start = clock.now
        with pytest.raises(RewardTimeoutError, match="3 attempts made") as caught:
            client.score(conversations(4))
    # Failures at 0.05, 0.5, 0.95: the third leaves 0.05 s, less than a backoff and an attempt need.
    assert len(fake.sent) == 3 and clock.sleeps == pytest.approx([0.4, 0.4])
    assert clock.now - start <= 1.0
    assert "deadline_s=1" in str(caught.value)
    assert isinstance(caught.value.__cause__, RewardUnavailableError)  # what the last attempt got


def test_backoff_is_clipped_to_the_deadline():
    clock = FakeClock()
    fake = ScriptedTriton(clock, [failing(0.1), answering(0.0)])
    policy = RetryPolicy(initial_backoff_s=5.0, jitter=0.0)
    with scripted_client(fake, clock, retry=policy, deadline_s=1.0) as client:
        client.score(conversations(2))
    # 0.9 s left after the failure: the 5 s backoff is cut to leave twice the floor for the attempt.
    assert clock.sleeps == pytest.approx([0.9 - 2 * MIN_ATTEMPT_S])
    assert fake.sent[1][1] == pytest.approx(2 * MIN_ATTEMPT_S)


def test_an_attempt_that_passes_the_deadline_is_not_retried_and_says_which_it_was():
    clock = FakeClock()
    fake = ScriptedTriton(clock, [failing(0.2), answering(10.0)])
    with scripted_client(fake, clock, retry=RetryPolicy(initial_backoff_s=0.1, jitter=0.0),
                         deadline_s=1.0) as client:
        with pytest.raises(RewardTimeoutError, match=r"attempt 2 of a request with deadline_s=1"):
            client.score(conversations(2))
    assert len(fake.sent) == 2
    assert clock.now - 1000.0 == pytest.approx(1.0)  # the second attempt ended with the deadline


@pytest.mark.parametrize("status", ["StatusCode.CANCELLED", "StatusCode.DEADLINE_EXCEEDED",
                                    "StatusCode.UNAVAILABLE"])
def test_a_request_the_server_dropped_for_its_deadline_is_never_retried(status):
    message = "deadline passed: the request's timeout ran out 0.20 s ago, after 1.20 s at the server"
    exc = InferenceServerException(message, status=status)
    assert type(wire.map_error(exc)) is RewardTimeoutError
    assert not wire.cancelled_by_server(exc) and not wire.is_replica_failure(exc)
    clock = FakeClock()
    fake = ScriptedTriton(clock, [failing(0.0, (message, status))])
    with scripted_client(fake, clock, retry=RetryPolicy(max_attempts=10)) as client:
        with pytest.raises(RewardTimeoutError, match="deadline passed"):
            client.score(conversations(2))
    assert len(fake.sent) == 1


def test_the_servers_overload_refusal_is_retried_on_the_same_replica():
    exc = InferenceServerException(*OVERLOADED)
    assert type(wire.map_error(exc)) is RewardUnavailableError
    assert not wire.is_replica_failure(exc)  # a busy replica keeps its prompts


# --------------------------------------------------------------------------- the retry budget


def test_budget_allows_min_retries_then_earns_ratio_per_first_attempt_up_to_a_cap():
    budget = RetryBudget(RetryPolicy(budget_ratio=0.2, budget_min_retries=10), clock=FROZEN)
    assert [budget.try_withdraw() for _ in range(11)] == [True] * 10 + [False]
    for _ in range(4):
        budget.deposit()
    assert budget.try_withdraw() is False  # 0.8 of a retry
    budget.deposit()
    assert budget.try_withdraw() is True and budget.try_withdraw() is False
    for _ in range(10 * BUDGET_WINDOW):
        budget.deposit()
    assert budget.tokens == pytest.approx(10 + 0.2 * BUDGET_WINDOW)


def test_budget_stops_retries_when_nothing_succeeds_and_refills_with_requests():
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.0, budget_ratio=0.2, budget_min_retries=10,
                         budget_min_per_s=0.0)
    budget = RetryBudget(policy, clock=FROZEN)
    calls = []

    def down(_limit):
        calls.append(1)
        raise RewardUnavailableError("UNAVAILABLE: the server is overloaded")

    with pytest.raises(RewardUnavailableError, match="retry budget is spent") as caught:
        call_with_retries(down, Attempts(policy, budget=budget), sleep=lambda s: None)
    assert len(calls) == 1 + 10  # the first attempt's 0.2 is not a whole retry
    assert str(caught.value).startswith("UNAVAILABLE: the server is overloaded")
    calls.clear()
    with pytest.raises(RewardUnavailableError, match="retry budget is spent"):
        call_with_retries(down, Attempts(policy, budget=budget), sleep=lambda s: None)
    assert len(calls) == 1  # 0.4 tokens: no retry
    for _ in range(3):  # three requests that succeed at once: 0.6 more
        assert call_with_retries(lambda _limit: "ok", Attempts(policy, budget=budget), sleep=lambda s: None) == "ok"
    calls.clear()
    with pytest.raises(RewardUnavailableError):
        call_with_retries(down, Attempts(policy, budget=budget), sleep=lambda s: None)
    assert len(calls) == 2  # 1.2 tokens: one retry


def test_async_retries_spend_the_same_budget():
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.0, budget_min_retries=2, budget_min_per_s=0.0)
    budget = RetryBudget(policy, clock=FROZEN)
    calls = []

    async def down(_limit):
        calls.append(1)
        raise RewardUnavailableError("busy")

    async def no_sleep(_):
        return None

    with pytest.raises(RewardUnavailableError, match="retry budget"):
        asyncio.run(acall_with_retries(down, Attempts(policy, budget=budget), sleep=no_sleep))
    assert len(calls) == 3 and budget.tokens == pytest.approx(0.2)


def test_a_client_spends_one_budget_across_its_requests():
    fake = FakeTriton(fail_first=1000, max_delay_s=0.0)
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.0, budget_min_retries=3, budget_min_per_s=0.0)
    with fake_client(fake, batch_size=4, max_in_flight=1, retry=policy) as client:
        with pytest.raises(RewardUnavailableError, match="retry budget is spent"):
            client.score(conversations(4))
        assert fake.calls == 1 + 3  # the reserve's three retries
        with pytest.raises(RewardUnavailableError, match="retry budget is spent"):
            client.score(conversations(4))
        assert fake.calls == 1 + 3 + 1  # 0.4 earned since: no retry
    other = FakeTriton(fail_first=1000, max_delay_s=0.0)
    with fake_client(other, batch_size=4, retry=policy) as client:  # another client, its own budget
        with pytest.raises(RewardUnavailableError):
            client.score(conversations(4))
    assert other.calls == 4


def test_budget_withdrawals_are_thread_safe():
    budget = RetryBudget(RetryPolicy(budget_ratio=0.0, budget_min_retries=1000), clock=FROZEN)
    granted = []
    barrier = threading.Barrier(16)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to expose a race

    def withdraw():
        barrier.wait()
        granted.append(sum(budget.try_withdraw() for _ in range(200)))

    _race([withdraw] * 16, interval)
    assert sum(granted) == 1000 and budget.tokens == 0.0


def test_budget_deposits_and_withdrawals_interleaved_across_threads_add_up():
    budget = RetryBudget(RetryPolicy(budget_ratio=0.5, budget_min_retries=0), clock=FROZEN)
    budget.capacity = 1e9  # no cap, so that the expected balance is exact
    granted = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def deposit():
        for _ in range(2000):
            budget.deposit()

    def withdraw():
        granted.append(sum(budget.try_withdraw() for _ in range(2000)))

    _race([deposit, withdraw] * 4, interval)
    assert budget.tokens == pytest.approx(4 * 2000 * 0.5 - sum(granted))
    assert budget.tokens >= 0


@pytest.mark.parametrize("fields", [{"budget_ratio": -0.1}, {"budget_ratio": float("nan")},
                                    {"budget_ratio": float("inf")}, {"budget_min_retries": -1}])
def test_budget_fields_are_validated(fields):
    with pytest.raises(ValueError):
        RetryPolicy(**fields)


def test_deadline_is_validated():
    with pytest.raises(ValueError, match="deadline_s"):
        RewardClient("127.0.0.1:1", deadline_s=0)
    with pytest.raises(ValueError, match="deadline_s"):
        AsyncRewardClient("127.0.0.1:1", deadline_s=-1.0)


# --------------------------------------------------------------------------- abandoned calls are cancelled


HOLD_S = 5.0  # a held call not cancelled by then times out, so that a failing test fails, not hangs


class HoldingTriton(FakeTriton):
    """A tritonclient whose `async_infer` answers requests holding `answer` conversations at once
    and holds every other call until it is cancelled (then answers CANCELLED, as gRPC does) or
    HOLD_S pass (then DEADLINE_EXCEEDED)."""

    def __init__(self, answer=frozenset(), reject=frozenset(), reject_after=0):
        super().__init__(max_delay_s=0.0)
        self.answer, self.reject = answer, reject
        self.held = []       # CallContexts of calls still waiting
        self.cancelled = []  # CallContexts cancelled by the client
        self.issued = threading.Semaphore(0)
        self._issued_count = 0
        self._reject_after = reject_after
        self._all_issued = threading.Event()

    def async_infer(self, model, inputs, callback, outputs=None, client_timeout=None, timeout=None, **_):
        text = inputs[0]._raw_content
        lock = self._lock
        outer = self

        class Context:
            def cancel(self):
                with lock:
                    if self in outer.held:
                        outer.held.remove(self)
                        outer.cancelled.append(self)
                callback(result=None, error=InferenceServerException(
                    "Locally cancelled by application!", status="StatusCode.CANCELLED"))

        context = Context()
        if any(marker.encode() in text for marker in self.reject):
            def reject():
                self._all_issued.wait(5)  # the others are in flight when the error arrives
                callback(result=None, error=InferenceServerException("conversation 0: bad",
                                                                     status="StatusCode.INVALID_ARGUMENT"))

            threading.Thread(target=reject).start()
        elif any(marker.encode() in text for marker in self.answer):
            threading.Thread(target=lambda: callback(result=self.infer(model, inputs), error=None)).start()
        else:
            with self._lock:
                self.held.append(context)

            def expire():
                with lock:
                    if context not in outer.held:
                        return
                    outer.held.remove(context)
                callback(result=None, error=InferenceServerException("Deadline Exceeded",
                                                                     status="StatusCode.DEADLINE_EXCEEDED"))

            timer = threading.Timer(HOLD_S, expire)
            timer.daemon = True
            timer.start()
        with self._lock:
            self._issued_count += 1
            if self._issued_count >= self._reject_after:
                self._all_issued.set()
        self.issued.release()
        return context

    def wait_issued(self, count, timeout_s=5.0):
        for _ in range(count):
            assert self.issued.acquire(timeout=timeout_s), "the client did not send the calls expected"


def eventually(predicate, timeout_s=HOLD_S / 2):
    """Whether `predicate` holds within `timeout_s`: a worker thread that was issuing a call when its
    scope was cancelled cancels the call itself, a moment after the scope did."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def four_chunks():
    """Eight conversations; with batch_size=2, chunk k holds conversations 2k and 2k+1."""
    return [("q", f"answer {i}") for i in range(8)]


def test_closing_an_iterator_early_cancels_the_calls_in_flight():
    fake = HoldingTriton(answer={"answer 0"})
    with fake_client(fake, batch_size=2, max_in_flight=4) as client:
        results = client.iter_scores(four_chunks())
        assert next(results).index == 0
        fake.wait_issued(4)
        assert len(fake.held) == 3
        results.close()
        assert eventually(lambda: len(fake.cancelled) == 3 and fake.held == [])


def test_an_error_in_one_request_cancels_the_others():
    fake = HoldingTriton(reject={"answer 0"}, reject_after=4)
    with fake_client(fake, batch_size=2, max_in_flight=4) as client:
        with pytest.raises(RewardInvalidInputError) as caught:
            client.score(four_chunks())
        assert caught.value.index == 0
        assert eventually(lambda: len(fake.cancelled) == 3 and fake.held == [])


def test_closing_the_client_cancels_calls_and_wakes_backoffs():
    fake = HoldingTriton()
    client = fake_client(fake, batch_size=2, max_in_flight=4)
    client._sleep = None  # real, interruptible backoffs
    outcome = {}

    def score():
        try:
            client.score(four_chunks())
        except RewardClientError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=score)
    worker.start()
    fake.wait_issued(4)
    started = time.monotonic()
    client.close()
    worker.join(10)
    assert not worker.is_alive()
    assert "the client was closed" in str(outcome["error"])
    assert len(fake.cancelled) == 4 and time.monotonic() - started < HOLD_S


def test_a_backoff_is_interrupted_when_the_call_is_abandoned():
    fake = FakeTriton(fail_first=1000, max_delay_s=0.0)
    policy = RetryPolicy(initial_backoff_s=30.0, max_backoff_s=30.0, jitter=0.0)
    client = fake_client(fake, batch_size=2, retry=policy)
    client._sleep = None
    outcome = {}

    def score():
        try:
            client.score(conversations(2))
        except RewardClientError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=score)
    worker.start()
    deadline = time.monotonic() + 5
    while fake.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    client.close()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - started < 2 and fake.calls == 1
    assert "the client was closed" in str(outcome["error"])


def test_abandoning_a_routed_iterator_cancels_every_replicas_calls():
    first_window = {f"answer {i:02d}" for i in range(4)}  # 2 replicas x batch_size 2: the first window
    replicas = {"10.0.0.1:8001": HoldingTriton(answer=first_window),
                "10.0.0.2:8001": HoldingTriton(answer=first_window)}
    convs = [(f"prompt {i}", f"answer {i:02d}") for i in range(16)]  # a prompt each, over both replicas
    client = RewardClient(list(replicas), batch_size=2, max_in_flight=2)
    client._pool = ReplicaPool(EndpointSet(list(replicas)), replicas.__getitem__)
    client._sleep = lambda s: None
    results = client.iter_scores(convs)
    first = next(results)
    assert first.index == 0
    # The second window's requests, in flight.
    assert eventually(lambda: sum(len(r.held) for r in replicas.values()) >= 1)
    results.close()
    assert eventually(lambda: all(r.held == [] for r in replicas.values()))
    assert sum(len(r.cancelled) for r in replicas.values()) >= 1  # cancelled, not expired
    client.close()


class HoldingAioTriton(FakeAioTriton):
    """The asyncio flavour: `infer` answers `answer` requests and awaits forever otherwise,
    recording the cancellation asyncio delivers (which cancels a real grpc.aio call)."""

    def __init__(self, answer=frozenset()):
        super().__init__(max_delay_s=0.0)
        self.answer = answer
        self.waiting = 0
        self.cancelled = 0

    async def infer(self, model, inputs, outputs=None, client_timeout=None, timeout=None, **_):
        if any(marker.encode() in inputs[0]._raw_content for marker in self.answer):
            return await super().infer(model, inputs, outputs, client_timeout)
        self.waiting += 1
        try:
            await asyncio.sleep(HOLD_S)
            raise InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.waiting -= 1


async def holding_async_client(fake):
    client = AsyncRewardClient("127.0.0.1:1", batch_size=2, max_in_flight=4)
    await client._client.close()
    client._client = fake
    return client


async def until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.001)


def test_closing_an_async_iterator_early_cancels_and_awaits_the_calls_in_flight():
    async def run():
        fake = HoldingAioTriton(answer={"answer 0"})
        client = await holding_async_client(fake)
        results = client.iter_scores(four_chunks())
        assert (await results.__anext__()).index == 0
        await until(lambda: fake.waiting == 3)
        await results.aclose()
        # Cancelled and awaited before aclose() returned, not left to the garbage collector.
        assert fake.cancelled == 3 and fake.waiting == 0

    asyncio.run(run())


def test_cancelling_the_task_cancels_the_calls_in_flight():
    async def run():
        fake = HoldingAioTriton()
        client = await holding_async_client(fake)
        task = asyncio.ensure_future(client.score(four_chunks()))
        await until(lambda: fake.waiting == 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.cancelled == 4 and fake.waiting == 0

    asyncio.run(run())


def test_the_call_scope_refuses_new_calls_once_cancelled():
    from reward_client.transport.inflight import CallScope

    scope = CallScope()
    assert scope.cancel("done") == 0
    sent = []
    client = SimpleNamespace(async_infer=lambda *args, **kwargs: sent.append(1))
    with pytest.raises(RewardClientError, match="cancelled: done"):
        scope.infer(client, "reward", [], 1.0)
    with pytest.raises(RewardClientError, match="cancelled: done"):
        scope.pause(30.0)
    assert sent == []


# --------------------------------------------------------------------------- over real gRPC


def test_the_server_receives_the_deadline_as_grpc_deadline_and_triton_timeout():
    convs = conversations(4)
    with CancellingServer() as server, RewardClient(server.url, timeout_s=5.0, deadline_s=3.0) as client:
        results = client.score(convs)
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    assert server.timeouts[0] == pytest.approx(3_000_000, abs=200_000)
    assert server.remaining[0] == pytest.approx(3.0, abs=0.2)


def test_the_server_sees_an_abandoned_call_cancelled():
    with CancellingServer(hang=True) as server:
        client = RewardClient(server.url, batch_size=2, max_in_flight=3)
        worker = threading.Thread(target=lambda: pytest.raises(RewardClientError, client.score, four_chunks()))
        worker.start()
        assert eventually(lambda: server.calls == 3)
        client.close()
        worker.join(HOLD_S)
        assert eventually(lambda: server.client_gone == 3)  # told at once, not when the server stops

    async def cancel_task(url):
        async with AsyncRewardClient(url, batch_size=2, max_in_flight=3) as aclient:
            task = asyncio.ensure_future(aclient.score(four_chunks()))
            while server.calls < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with CancellingServer(hang=True) as server:
        asyncio.run(cancel_task(server.url))
        assert eventually(lambda: server.client_gone == 3)


def test_the_budget_earns_retries_with_time_up_to_its_capacity():
    now = [0.0]
    budget = RetryBudget(RetryPolicy(budget_ratio=0.0, budget_min_retries=1, budget_min_per_s=2.0), clock=lambda: now[0])
    assert budget.try_withdraw() and not budget.try_withdraw()
    now[0] += 0.4  # 0.8 earned: not yet a retry
    assert not budget.try_withdraw()
    now[0] += 0.1
    assert budget.try_withdraw()
    now[0] += 3600  # a long quiet hour banks no more than the capacity
    assert budget.tokens == budget.capacity == 1.0
    with pytest.raises(ValueError):
        RetryPolicy(budget_min_per_s=-1)


def test_past_the_budget_a_retry_waits_for_the_share_time_earns_it():
    """Retries on credit queue up at budget_min_per_s; beyond what the deadline leaves, none is taken."""
    now = [0.0]
    budget = RetryBudget(RetryPolicy(budget_ratio=0.0, budget_min_retries=1, budget_min_per_s=4.0),
                         clock=lambda: now[0])
    assert budget.reserve(10.0) == 0.0  # the starting balance
    assert budget.reserve(10.0) == pytest.approx(0.25)  # one more, paid for in a quarter second
    assert budget.reserve(10.0) == pytest.approx(0.5)  # and the next after it
    assert budget.reserve(0.6) is None  # a third would come 0.75 s from now: past what is left
    now[0] += 1.0  # four earned: the two on credit paid, then the balance is capped at its capacity (1)
    assert budget.reserve(10.0) == 0.0 and budget.tokens == pytest.approx(0.0)
    assert RetryBudget(RetryPolicy(budget_min_retries=0, budget_min_per_s=0.0), clock=FROZEN).reserve(1e9) is None


def _race(targets, interval: float) -> None:
    """Run `targets` on threads at once, then restore the switch interval the caller shortened."""
    try:
        threads = [threading.Thread(target=target) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
