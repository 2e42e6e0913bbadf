"""Deadlines, cancellations and the engine's own queue, without a server (issue 30).

The scheduler is driven step by step with a fake clock and a fake engine; one test runs the real
engine to check that dropping requests at row boundaries leaves the others' scores bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from reward_server.pipeline import deadlines, stages
from reward_server.pipeline.deadlines import CancelBoard, Ticket, drop_reason, error_code_of
from reward_server.pipeline.scheduler import WAVE_ROWS, EngineScheduler, Job, QueueLimits, RateEstimate
from reward_server.pipeline.stages import EngineError, EngineUnavailable, RequestDropped


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ticket_round_trips_through_request_parameters():
    ticket = Ticket.issue("k1", timeout_us=2_500_000, now=100.0)
    assert ticket.deadline == pytest.approx(102.5)
    params = ticket.parameters()
    assert all(isinstance(v, (str, int)) for v in params.values())  # what Triton's parameters accept
    back = Ticket.from_parameters(json.dumps(params))
    assert back.key == "k1" and back.arrival == pytest.approx(100.0) and back.deadline == pytest.approx(102.5)
    assert Ticket.issue("k2", 0, now=5.0).deadline is None
    assert Ticket.from_parameters(json.dumps({"other": 1})) is None and Ticket.from_parameters("") is None
    assert back.remaining(101.0) == pytest.approx(1.5) and back.waited(101.0) == pytest.approx(1.0)


def test_drop_reason_reads_the_board_and_the_deadline(tmp_path):
    board = CancelBoard(tmp_path / "cancelled")
    ticket = Ticket("a", 100.0, 110.0)
    assert drop_reason(ticket, board, now=105.0) is None
    assert drop_reason(ticket, board, now=110.5) == deadlines.EXPIRED
    board.cancel("a")
    assert drop_reason(ticket, board, now=105.0) == deadlines.CANCELLED
    board.clear("a")
    board.clear("a")  # twice is fine
    assert drop_reason(ticket, board, now=105.0) is None
    assert drop_reason(None, board) is None  # a stage called directly: never dropped
    assert drop_reason(Ticket("b", 100.0), None, now=1e12) is None  # no deadline, no board
    with pytest.raises(ValueError):
        board.cancel("../escape")


@pytest.mark.parametrize("message, code", [
    ("conversation 3: message 1 has unknown role 'robot'", "INVALID_ARG"),
    ("the server is overloaded: 9 requests are queued", "UNAVAILABLE"),
    ("the server is stopping and takes no new requests; retry (another replica)", "UNAVAILABLE"),
    ("Server is stopping, scheduler for model has stopped accepting new inference requests", "UNAVAILABLE"),
    ("Request timeout expired", "UNAVAILABLE"),
    (deadlines.CANCELLED_MESSAGE, "CANCELLED"),
    ("deadline passed: the request's timeout ran out", "CANCELLED"),
    ("internal error in score_requests; the server log has the details", "INTERNAL"),
    ("Stub process 'reward_engine_0_0' is not healthy.", "INTERNAL"),
])
def test_error_codes_are_told_from_messages(message, code):
    assert error_code_of(message) == code


def test_rate_estimate_smooths_waves():
    rate = RateEstimate(smoothing=0.5)
    assert rate.seconds(100) is None
    rate.observe(1000, 1.0)
    rate.observe(3000, 1.0)
    assert rate.tokens_per_s == pytest.approx(2000.0) and rate.seconds(4000) == pytest.approx(2.0)
    rate.observe(0, 1.0)  # nothing computed: no information
    assert rate.tokens_per_s == pytest.approx(2000.0)


def _job(tokens: int, answers: dict, name: str, ticket: Ticket | None = None) -> Job:
    ids = np.ones((1, tokens), dtype=np.int32)
    return Job((ids, np.array([[tokens]], dtype=np.int32)), ticket, lambda result: answers.__setitem__(name, result))


class FakeEngine:
    """Scores a wave as the sum of each request's ids; asks `alive` before each of `rows` rows and
    records which requests were still alive at each."""

    def __init__(self, clock: Clock, seconds_per_row: float = 1.0, rows: int = 2):
        self.clock, self.seconds_per_row, self.rows = clock, seconds_per_row, rows
        self.waves: list[list[int]] = []
        self.alive_seen: list[list[bool]] = []
        self.before_row = None

    def __call__(self, inputs, alive):
        self.waves.append([int(np.asarray(lengths).sum()) for _, lengths in inputs])
        for row in range(self.rows):
            if self.before_row is not None:
                self.before_row(row)
            self.alive_seen.append(list(alive()))
            self.clock.now += self.seconds_per_row
        return [{"rewards": np.asarray(ids).sum(axis=1, keepdims=True).astype(np.float32)} for ids, _ in inputs]


def _scheduler(clock, engine, board=None, budget=100, drops=None, grace=0.0, **limits):
    return EngineScheduler(engine, budget, QueueLimits(**limits), board,
                           on_drop=None if drops is None else (lambda r, n, t: drops.append((r, n, t))), clock=clock,
                           admit_grace_s=grace)


def test_wave_budget_and_order():
    clock, answers = Clock(), {}
    engine = FakeEngine(clock, seconds_per_row=0.5)
    sched = _scheduler(clock, engine, budget=100)
    sched.submit([_job(120, answers, "a"), _job(60, answers, "b"), _job(40, answers, "c"), _job(250, answers, "d")])
    assert WAVE_ROWS * 100 == 200
    assert sched.step() == 2 and set(answers) == {"a", "b"}  # 120 + 60 fit; + 40 would not
    assert sched.step() == 1 and set(answers) == {"a", "b", "c"}  # c alone: d (250) does not fit beside it
    assert sched.step() == 1 and answers["d"]["rewards"][0, 0] == 250  # larger than a wave: a wave of its own
    assert engine.waves == [[120, 60], [40], [250]]
    assert sched.step() == 0


def test_a_slow_model_s_waves_hold_at_most_the_queue_limit_of_work():
    clock, answers = Clock(), {}
    engine = FakeEngine(clock, seconds_per_row=1.0, rows=1)
    sched = _scheduler(clock, engine, budget=100, max_queue_s=1.5, queue_timeout_s=10.0)
    assert sched.wave_tokens() == WAVE_ROWS * 100  # nothing measured yet: two rows
    sched.submit([_job(50, answers, "warm")])
    sched.step()  # 50 tokens in 1 s: 75 tokens are 1.5 s of work
    assert sched.wave_tokens() == 75
    sched.submit([_job(40, answers, "q0"), _job(40, answers, "q1")])  # 0.8 s ahead of q1: admitted
    assert sched.step() == 1 and sched.step() == 1  # 40 + 40 would be 1.6 s: a request a wave
    sched.submit([_job(120, answers, "big")])
    assert sched.step() == 1  # larger than a wave: a wave of its own
    assert engine.waves == [[50], [40], [40], [120]]
    assert all(isinstance(answers[name], dict) for name in ("q0", "q1", "big"))


def test_admission_is_bounded_by_the_measured_rate():
    clock, answers = Clock(), {}
    engine = FakeEngine(clock, seconds_per_row=1.0, rows=1)
    drops = []
    sched = _scheduler(clock, engine, budget=100, drops=drops, max_queue_s=3.0)
    sched.submit([_job(100, answers, "warm")])
    sched.step()  # 100 tokens in 1 s: the rate is measured at 100 tokens/s
    assert sched.rate.tokens_per_s == pytest.approx(100.0)
    sched.submit([_job(100, answers, f"q{i}") for i in range(6)])
    # q0 enters an idle engine; then 1, 2, 3 s of work are ahead of q1, q2, q3: admitted; q4 would wait 4 s
    assert set(answers) == {"warm", "q4", "q5"}
    for name in ("q4", "q5"):
        assert isinstance(answers[name], EngineUnavailable) and "over the limit of 3 s" in answers[name]
        assert answers[name].startswith(deadlines.OVERLOADED_PREFIX)
    assert drops == [(deadlines.OVERLOADED, 1, 100)] * 2
    assert sched.queued() == (4, 400)


def test_the_queue_gauge_follows_admissions_waves_and_refusals():
    clock, answers, seen = Clock(), {}, []
    engine = FakeEngine(clock, seconds_per_row=1.0, rows=1)
    sched = EngineScheduler(engine, 100, QueueLimits(max_queue_requests=2), clock=clock, admit_grace_s=0,
                            on_queue=lambda requests, tokens: seen.append((requests, tokens)))
    sched.submit([_job(30, answers, "a"), _job(40, answers, "b"), _job(50, answers, "c")])
    assert seen[-1] == (2, 70) and "c" in answers  # c refused by the count: never in the gauge
    sched.step()  # a and b form one wave: the queue empties as it starts
    assert seen[-1] == (0, 0) and set(answers) == {"a", "b", "c"}
    assert max(requests for requests, _ in seen) == 2


def test_before_any_measurement_the_queue_holds_a_few_rows():
    clock, answers = Clock(), {}
    sched = _scheduler(clock, FakeEngine(clock), budget=10)
    sched.submit([_job(50, answers, f"q{i}") for i in range(3)])  # the cap is 8 rows of 10 tokens
    assert set(answers) == {"q2"} and "before the rate is measured" in answers["q2"]


def test_cancelled_requests_are_not_counted_against_the_queue(tmp_path):
    clock, answers = Clock(), {}
    board = CancelBoard(tmp_path / "board")
    sched = _scheduler(clock, FakeEngine(clock), board=board, budget=10, max_queue_s=3.0)
    sched.submit([_job(50, answers, "a", Ticket("a", clock.now)), _job(50, answers, "b", Ticket("b", clock.now))])
    sched.submit([_job(50, answers, "c", Ticket("c", clock.now))])
    assert "c" in answers  # 100 tokens ahead, over the 80-token cap
    board.cancel("a")
    board.cancel("b")
    sched.submit([_job(50, answers, "d", Ticket("d", clock.now))])
    assert "d" not in answers  # a and b are gone: nothing live is ahead of d


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once():
    clock, answers = Clock(), {}
    engine = FakeEngine(clock, seconds_per_row=1.0, rows=1)
    sched = _scheduler(clock, engine, budget=100, max_queue_s=30.0)
    sched.submit([_job(100, answers, "warm")])
    sched.step()  # 100 tokens/s
    sched.submit([_job(300, answers, "big")])  # 3 s of work queued
    sched.submit([_job(100, answers, "late", Ticket("late", clock.now, clock.now + 2.0)),
                  _job(100, answers, "fine", Ticket("fine", clock.now, clock.now + 10.0))])
    assert isinstance(answers["late"], RequestDropped) and deadlines.DEADLINE_PASSED in answers["late"]
    assert "fine" not in answers


def test_expired_cancelled_and_timed_out_requests_never_start(tmp_path):
    clock, answers, drops = Clock(), {}, []
    board = CancelBoard(tmp_path / "board")
    engine = FakeEngine(clock)
    sched = _scheduler(clock, engine, board=board, budget=1000, drops=drops, queue_timeout_s=5.0)
    sched.submit([_job(10, answers, "expires", Ticket("e", clock.now, clock.now + 1.0)),
                  _job(10, answers, "cancelled", Ticket("c", clock.now)),
                  _job(10, answers, "waits", Ticket("w", clock.now)),
                  _job(10, answers, "lives", Ticket("l", clock.now + 4.0))])
    board.cancel("c")
    clock.now += 6.0  # past e's deadline, and past the queue timeout of a request that arrived at the start
    assert sched.step() == 4
    assert engine.waves == [[10]]  # only "lives" (arrived 4 s later, waited 2 s) was computed
    assert isinstance(answers["expires"], RequestDropped) and deadlines.DEADLINE_PASSED in answers["expires"]
    assert isinstance(answers["cancelled"], RequestDropped) and answers["cancelled"] == deadlines.CANCELLED_MESSAGE
    assert isinstance(answers["waits"], EngineUnavailable) and "over the queue timeout of 5 s" in answers["waits"]
    assert answers["lives"]["rewards"][0, 0] == 10
    assert sorted(r for r, _, _ in drops) == [deadlines.CANCELLED, deadlines.EXPIRED, deadlines.OVERLOADED]


def test_a_request_gone_mid_wave_is_dropped_at_the_next_row(tmp_path):
    clock, answers, drops = Clock(), {}, []
    board = CancelBoard(tmp_path / "board")
    engine = FakeEngine(clock, rows=3)
    engine.before_row = lambda row: board.cancel("a") if row == 1 else None
    sched = _scheduler(clock, engine, board=board, budget=1000, drops=drops)
    sched.submit([_job(10, answers, "a", Ticket("a", clock.now)), _job(20, answers, "b", Ticket("b", clock.now))])
    sched.step()
    assert engine.alive_seen == [[True, True], [False, True], [False, True]]
    assert isinstance(answers["a"], RequestDropped)
    assert answers["b"]["rewards"][0, 0] == 20
    assert drops == [(deadlines.CANCELLED, 1, 10)]
    assert sched.rate.tokens_per_s is None  # a wave cut short is not a measurement


def test_an_engine_failure_answers_its_wave_and_the_next_wave_runs():
    clock, answers = Clock(), {}
    calls = []

    def flaky(inputs, alive):
        calls.append(len(inputs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [{"rewards": np.zeros((1, 1), np.float32)} for _ in inputs]

    sched = _scheduler(clock, flaky, budget=10)
    sched.submit([_job(15, answers, "a"), _job(15, answers, "b")])
    sched.step()
    assert isinstance(answers["a"], EngineError) and "b" not in answers
    sched.step()
    assert answers["b"]["rewards"].shape == (1, 1)


def test_the_worker_thread_answers_everything_it_admits():
    import threading

    answers, done = {}, threading.Event()

    def respond(name):
        def set_answer(result):
            answers[name] = result
            if len(answers) == 20:
                done.set()
        return set_answer

    def compute(inputs, alive):
        return [{"rewards": np.asarray(ids, dtype=np.float32)[:, :1]} for ids, _ in inputs]

    sched = EngineScheduler(compute, 16, QueueLimits(max_queue_s=60.0)).start()
    try:
        for i in range(20):
            sched.submit([Job((np.full((1, 3), i, np.int32), np.array([[3]], np.int32)), None, respond(i))])
        assert done.wait(10)
    finally:
        sched.stop()
    assert all(answers[i]["rewards"][0, 0] == i for i in range(20))


def test_dropping_at_row_boundaries_leaves_the_other_scores_bit_for_bit(demo_checkpoint):
    """The real engine, rows of 64 tokens: requests dropped while their wave runs; every request kept
    has exactly the bits it has when computed alone."""
    from reward_server.pipeline.chat import ChatEncoder
    from reward_server.pipeline.torch_engine.engine import RewardEngine
    from tests.conversations import make_conversations

    # the prefix cache off: each request computed alone first would otherwise serve the run being dropped
    engine = RewardEngine.from_checkpoint(demo_checkpoint, token_budget=64, min_shared=8, prefix_cache_mb=0)
    encoder = ChatEncoder.from_checkpoint(demo_checkpoint)
    encoded = [e.token_ids for e in encoder.encode_batch(make_conversations(12, seed=3))]
    requests = [(np.array([ids], dtype=np.int32), np.array([[len(ids)]], dtype=np.int32)) for ids in encoded]
    alone = [stages.score_requests(engine, [r])[0]["rewards"] for r in requests]
    rows = []

    def alive():
        rows.append(None)
        gone = {1, 4, 7} if len(rows) > 2 else set()  # three requests go after two rows
        return [i not in gone for i in range(len(requests))]

    results = stages.score_requests(engine, requests, alive)
    assert len(rows) > 3
    for i, result in enumerate(results):
        if i in (1, 4, 7) and np.isnan(result["rewards"]).all():
            continue  # dropped before its row (it may have been computed in the first two rows)
        assert result["rewards"].tobytes() == alone[i].tobytes(), i
    assert sum(np.isnan(r["rewards"]).all() for r in results) >= 1


def test_a_request_over_the_limit_gets_a_second_look_before_it_is_refused(tmp_path):
    """The client of the running request went a moment ago, but its entry point has not marked it yet:
    the request behind it waits for a second look instead of being refused."""
    clock, answers = Clock(), {}
    board = CancelBoard(tmp_path / "board")
    sched = _scheduler(clock, FakeEngine(clock), board=board, budget=10, grace=0.25)
    sched.submit([_job(100, answers, "gone", Ticket("gone", clock.now))])
    sched.submit([_job(5, answers, "next", Ticket("next", clock.now)),
                  _job(5, answers, "refused", Ticket("refused", clock.now))])
    assert answers == {} and sched.queued() == (3, 110)
    board.cancel("gone")  # the entry point marks it a poll later
    clock.now += 0.1
    with sched._lock:
        sched._review()
    assert answers == {} and sched.queued() == (3, 110)  # both admitted behind a gone request
    sched.step()  # "gone" is dropped at its start; "next" and "refused" run
    assert isinstance(answers["gone"], RequestDropped) and answers["next"]["rewards"][0, 0] == 5


def test_the_second_look_ends_in_a_refusal_when_nothing_changed():
    clock, answers = Clock(), {}
    sched = _scheduler(clock, FakeEngine(clock), budget=10, grace=0.25)
    sched.submit([_job(100, answers, "big"), _job(5, answers, "small")])
    assert answers == {}
    clock.now += 0.3
    with sched._lock:
        sched._review()
    assert isinstance(answers["small"], EngineUnavailable) and "before the rate is measured" in answers["small"]


def test_the_rate_is_measured_row_by_row_from_the_engine_progress():
    clock, answers = Clock(), {}
    done = {"tokens": 0}
    engine = FakeEngine(clock, seconds_per_row=2.0, rows=3)

    def row(i):
        done["tokens"] += 50 if i else 0

    engine.before_row = row
    sched = EngineScheduler(engine, 100, QueueLimits(), progress=lambda: done["tokens"], clock=clock, admit_grace_s=0)
    sched.submit([_job(150, answers, "a")])
    sched.step()
    assert sched.rate.tokens_per_s == pytest.approx(25.0)  # 50 tokens a row, a row every 2 s
