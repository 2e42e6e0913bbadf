"""Unit tests of the reward client: pure logic, and the clients against an in-process fake.

No tritonserver is started here; see test_client_server.py for the integration layer.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, np_to_triton_dtype

from reward_client import (AsyncRewardClient, RetryPolicy, RewardClient, RewardInvalidInputError,
                           RewardServerError, RewardTimeoutError, RewardUnavailableError,
                           bradley_terry)
from reward_client.cli import main as cli_main
from reward_client.cli import common as cli_common
from reward_client.cli.resumable import ResumableJsonlWriter, count_valid_lines
from reward_client.conversations import to_messages
from reward_client.evaluation import evaluate_pairs, read_pairs, section_scores
from reward_client.evaluation.rewardbench import EXAMPLE_COUNTS, SECTIONS, overall_score
from reward_client.retry import Attempts, acall_with_retries, call_with_retries
from reward_client.transport import wire
from reward_client.transport.pipeline import aordered_map, chunked, ordered_map


# --------------------------------------------------------------------------- fakes


def fake_score(messages: list) -> float:
    """The fake server's reward: a deterministic function of the conversation."""
    text = "".join(m["content"] for m in messages)
    return float(len(text) % 97) - 0.5 * len(messages)


class _Response:
    def __init__(self, arrays):
        self._arrays = arrays

    def as_numpy(self, name):
        return self._arrays.get(name)


class FakeTriton:
    """Enough of tritonclient's gRPC client to exercise RewardClient without a server.

    Conversations whose last content is "BAD" are rejected the way the server does it; the
    first ``fail_first`` infer calls are rejected as a full queue; each call sleeps a random
    time so that requests complete out of order.
    """

    def __init__(self, fail_first=0, max_delay_s=0.01, attribute_names="helpfulness,verbosity"):
        self.fail_first = fail_first
        self.max_delay_s = max_delay_s
        self.attribute_names = attribute_names
        self.calls = 0
        self.batches = []
        self.in_flight = 0
        self.max_seen_in_flight = 0
        self._lock = threading.Lock()
        self._rng = random.Random(7)

    def _enter(self):
        with self._lock:
            self.calls += 1
            call = self.calls
            self.in_flight += 1
            self.max_seen_in_flight = max(self.max_seen_in_flight, self.in_flight)
            delay = self._rng.random() * self.max_delay_s
        return call, delay

    def _compute(self, model, inputs, call):
        try:
            if call <= self.fail_first:
                raise InferenceServerException(
                    "Exceeds maximum queue size", status="StatusCode.UNAVAILABLE")
            if model == "reward":
                rows = deserialize_bytes_tensor(inputs[0]._raw_content)
                conversations = [json.loads(row) for row in rows]
            else:
                shape = inputs[0].shape()
                ids = np.frombuffer(inputs[0]._raw_content, dtype=np.int32).reshape(shape)
                lengths = np.frombuffer(inputs[1]._raw_content, dtype=np.int32).reshape(-1)
                conversations = [[{"role": "ids", "content": ",".join(map(str, row[:n]))}]
                                 for row, n in zip(ids, lengths)]
            for local, conversation in enumerate(conversations):
                if conversation[-1]["content"] == "BAD":
                    raise InferenceServerException(
                        f"in ensemble 'reward': conversation {local}: last message is bad",
                        status="StatusCode.INVALID_ARGUMENT")
            with self._lock:
                self.batches.append(len(conversations))
            scores = np.array([[fake_score(c)] for c in conversations], dtype=np.float32)
            return _Response({
                "score": scores,
                "attributes": np.concatenate([scores, 2 * scores], axis=1),
                "num_tokens": np.array([[len(c)] for c in conversations], dtype=np.int32),
                "truncated": np.array([[len(c) > 2] for c in conversations], dtype=bool),
            })
        finally:
            with self._lock:
                self.in_flight -= 1

    def infer(self, model, inputs, outputs=None, client_timeout=None, **_):
        call, delay = self._enter()
        time.sleep(delay)
        return self._compute(model, inputs, call)

    def async_infer(self, model, inputs, callback, outputs=None, client_timeout=None, timeout=None, **_):
        """tritonclient's async_infer: `infer` on another thread, its outcome to `callback`."""
        def run():
            try:
                result = self.infer(model, inputs, outputs, client_timeout, timeout=timeout)
            except InferenceServerException as exc:
                callback(result=None, error=exc)
            else:
                callback(result=result, error=None)

        threading.Thread(target=run, daemon=True).start()
        return SimpleNamespace(cancel=lambda: None)

    def get_model_config(self, name, as_json=False):
        assert name == "postprocessing"
        parameter = SimpleNamespace(string_value=self.attribute_names)
        return SimpleNamespace(config=SimpleNamespace(parameters={"attribute_names": parameter}))

    def close(self):
        pass


class FakeAioTriton(FakeTriton):
    """The asyncio flavour of :class:`FakeTriton`."""

    async def infer(self, model, inputs, outputs=None, client_timeout=None, **_):
        call, delay = self._enter()
        await asyncio.sleep(delay)
        return self._compute(model, inputs, call)

    async def get_model_config(self, name, as_json=False):
        return FakeTriton.get_model_config(self, name)

    async def close(self):
        pass


def fake_client(fake, **kwargs):
    client = RewardClient("127.0.0.1:1", **kwargs)
    client._client.close()
    client._client = fake
    client._sleep = lambda s: None
    return client


def conversations(n):
    return [(f"prompt {i // 4}", "x" * (i % 50) + f"answer {i}") for i in range(n)]


def expected_scores(convs):
    return [fake_score(to_messages(c, i)) for i, c in enumerate(convs)]


# --------------------------------------------------------------------------- chunking, ordering


def test_chunked_offsets_and_laziness():
    chunks = list(chunked(range(10), 4))
    assert chunks == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8, 9])]

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    first = next(chunked(endless(), 3))
    assert first == (0, [0, 1, 2])
    with pytest.raises(ValueError):
        next(chunked([1], 0))


def test_ordered_map_keeps_order_bounds_concurrency_and_reads_lazily():
    rng = random.Random(1)
    delays = [rng.random() * 0.01 for _ in range(60)]
    state = {"running": 0, "peak": 0, "read": 0}
    lock = threading.Lock()

    def items():
        for i in range(60):
            state["read"] += 1
            yield i

    def work(i):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        time.sleep(delays[i])
        with lock:
            state["running"] -= 1
        return i * i

    out = []
    with ThreadPoolExecutor(8) as pool:
        for value in ordered_map(work, items(), 3, pool):
            # backpressure: never more than max_in_flight items read ahead of the consumer
            assert state["read"] <= len(out) + 3
            out.append(value)
    assert out == [i * i for i in range(60)]
    assert 2 <= state["peak"] <= 3


def test_ordered_map_raises_first_error_in_input_order():
    def work(i):
        time.sleep(0.02 if i == 2 else 0)
        if i in (2, 4):
            raise KeyError(i)
        return i

    got = []
    with ThreadPoolExecutor(4) as pool, pytest.raises(KeyError) as info:
        for value in ordered_map(work, range(10), 4, pool):
            got.append(value)
    assert got == [0, 1]
    assert info.value.args == (2,)


def test_aordered_map_keeps_order_and_bounds_concurrency():
    state = {"running": 0, "peak": 0}

    async def work(i):
        state["running"] += 1
        state["peak"] = max(state["peak"], state["running"])
        await asyncio.sleep((i * 7 % 5) * 0.002)
        state["running"] -= 1
        return -i

    async def run():
        return [v async for v in aordered_map(work, range(40), 5)]

    assert asyncio.run(run()) == [-i for i in range(40)]
    assert state["peak"] == 5


# --------------------------------------------------------------------------- retry policy


def test_backoff_schedule_without_and_with_jitter():
    policy = RetryPolicy(max_attempts=6, initial_backoff_s=0.1, max_backoff_s=0.5,
                         multiplier=2.0, jitter=0.0)
    assert [policy.backoff_s(a) for a in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=100, jitter=0.5)
    rng = random.Random(3)
    draws = [random.Random(3).random()]
    assert jittered.backoff_s(2, rng) == pytest.approx(4.0 * (1 - 0.5 * draws[0]))
    values = [jittered.backoff_s(2, rng) for _ in range(200)]
    assert min(values) >= 2.0 and max(values) <= 4.0 and max(values) - min(values) > 1.0
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


def test_call_with_retries_sleeps_then_succeeds():
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, multiplier=3.0, jitter=0.0)
    sleeps, attempts = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise RewardUnavailableError("queue full")
        return "ok"

    assert call_with_retries(lambda _: flaky(), Attempts(policy), sleep=sleeps.append) == "ok"
    assert len(attempts) == 3
    assert sleeps == pytest.approx([0.1, 0.3])


def test_call_with_retries_gives_up_after_max_attempts():
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, jitter=0.0)
    sleeps, attempts = [], []

    def down():
        attempts.append(1)
        raise RewardUnavailableError("down")

    with pytest.raises(RewardUnavailableError):
        call_with_retries(lambda _: down(), Attempts(policy), sleep=sleeps.append)
    assert len(attempts) == 4 and len(sleeps) == 3


@pytest.mark.parametrize("error", [RewardInvalidInputError("bad", 3), RewardTimeoutError("late"),
                                   RewardServerError("boom")])
def test_non_retryable_errors_are_not_retried(error):
    sleeps, attempts = [], []

    def fail():
        attempts.append(1)
        raise error

    with pytest.raises(type(error)):
        call_with_retries(lambda _: fail(), Attempts(RetryPolicy()), sleep=sleeps.append)
    assert attempts == [1] and sleeps == []


def test_async_retries_use_injected_sleep():
    sleeps, tries = [], []

    async def fake_sleep(seconds):
        sleeps.append(seconds)

    async def flaky(_limit):
        tries.append(1)
        if len(tries) < 4:
            raise RewardUnavailableError("busy")
        return 42

    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.5, max_backoff_s=1.0, jitter=0.0)
    assert asyncio.run(acall_with_retries(flaky, Attempts(policy), sleep=fake_sleep)) == 42
    assert sleeps == pytest.approx([0.5, 1.0, 1.0])


# --------------------------------------------------------------------------- wire and errors


def test_map_error_names_global_conversation_index():
    exc = InferenceServerException("in ensemble 'reward': conversation 3: unknown role 'bot'",
                                   status="StatusCode.INVALID_ARGUMENT")
    mapped = wire.map_error(exc, offset=128)
    assert isinstance(mapped, RewardInvalidInputError) and isinstance(mapped, ValueError)
    assert mapped.index == 131
    assert mapped.reason == "in ensemble 'reward': unknown role 'bot'"
    assert str(mapped) == "conversation 131: " + mapped.reason


@pytest.mark.parametrize("status,message,kind", [
    ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", RewardUnavailableError),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", RewardUnavailableError),
    ("StatusCode.RESOURCE_EXHAUSTED", "out of memory", RewardUnavailableError),
    ("StatusCode.INTERNAL", "Request timeout expired", RewardUnavailableError),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", RewardTimeoutError),
    ("StatusCode.INTERNAL", "engine crashed", RewardServerError),
    ("StatusCode.INVALID_ARGUMENT", "shape mismatch", RewardInvalidInputError),
])
def test_map_error_kinds(status, message, kind):
    mapped = wire.map_error(InferenceServerException(message, status=status), offset=5)
    assert type(mapped) is kind
    if kind is RewardInvalidInputError:
        assert mapped.index is None


@pytest.mark.parametrize("message, retried", [
    ("CANCELLED", True),                            # Triton 2.51's gRPC front end shutting down
    ("Channel closed!", False),                     # this process closed the channel
    ("Locally cancelled by application!", False),   # this process cancelled the call
    ("Cancelled upon garbage collection!", False),
])
def test_a_cancelled_call_is_retried_only_when_the_server_cancelled_it(message, retried):
    exc = InferenceServerException(message, status="StatusCode.CANCELLED")
    assert isinstance(wire.map_error(exc), RewardUnavailableError) is retried
    assert wire.cancelled_by_server(exc) is retried
    assert wire.is_replica_failure(exc) is retried  # a stopping replica: its chunks move to another one


def test_ids_arrays_pad_and_lengths():
    ids, lengths = wire.ids_arrays([[5, 6, 7], [8]])
    assert ids.dtype == np.int32 and ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [[3], [1]]
    with pytest.raises(ValueError):
        wire.ids_arrays([[1], []])


def test_attribute_names_defaults():
    assert wire.parse_attribute_names("helpfulness, correctness", 2) == ("helpfulness",
                                                                         "correctness")
    assert wire.parse_attribute_names("", 3) == ("reward_0", "reward_1", "reward_2")
    assert wire.parse_attribute_names("a,b", 3) == ("reward_0", "reward_1", "reward_2")


def test_conversation_shapes():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert to_messages(("hi", "yo"), 0) == messages
    assert to_messages({"prompt": "hi", "response": "yo", "id": 9}, 0) == messages
    assert to_messages({"messages": messages}, 0) == messages
    assert to_messages(messages, 0) == messages
    assert to_messages((messages[:1], "yo"), 0) == messages
    for bad in ([], {"text": "x"}, [{"role": "user"}], 17):
        with pytest.raises(RewardInvalidInputError) as info:
            to_messages(bad, 41)
        assert info.value.index == 41


def test_bradley_terry():
    assert bradley_terry(1.0, 1.0) == 0.5
    assert bradley_terry(-3.28125, -4.28125) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert bradley_terry(2.0, 0.5) + bradley_terry(0.5, 2.0) == pytest.approx(1.0)
    assert bradley_terry(1000.0, 0.0) == 1.0 and bradley_terry(0.0, 1000.0) == 0.0


# --------------------------------------------------------------------------- RewardBench maths


def test_rewardbench_constants_match_the_benchmark():
    assert sum(len(subsets) for subsets in SECTIONS.values()) == 23 == len(EXAMPLE_COUNTS)
    assert EXAMPLE_COUNTS["math-prm"] == 984 == 6 * EXAMPLE_COUNTS["hep-python"]
    assert EXAMPLE_COUNTS["xstest-should-refuse"] == 154
    assert EXAMPLE_COUNTS["xstest-should-respond"] == 250


def test_section_scores_are_weighted_by_reference_counts():
    accuracy = {
        "alpacaeval-easy": 1.0, "mt-bench-easy": 0.5,        # Chat: (100 + 14) / 128
        "mt-bench-hard": 0.0, "llmbar-natural": 1.0,         # Chat Hard: 100 / 137
        "xstest-should-refuse": 1.0, "xstest-should-respond": 0.5,  # Safety: 279 / 404
        "math-prm": 0.5, "hep-python": 1.0,                  # Reasoning: 656 / 1148
        "my-own-subset": 0.0,                                # ignored
    }
    sections = section_scores(accuracy)
    assert sections == pytest.approx({
        "Chat": 100 * 114 / 128, "Chat Hard": 100 * 100 / 137,
        "Safety": 100 * 279 / 404, "Reasoning": 100 * 656 / 1148})
    assert overall_score(sections) == pytest.approx(
        (100 * 114 / 128 + 100 * 100 / 137 + 100 * 279 / 404 + 100 * 656 / 1148) / 4)
    only_chat = section_scores({"alpacaeval-hard": 0.25})
    assert only_chat == {"Chat": 25.0}
    assert overall_score(only_chat) is None


def test_nemotron_leaderboard_overall_is_mean_of_sections():
    sections = {"Chat": 97.5, "Chat Hard": 85.7, "Safety": 95.1, "Reasoning": 98.1}
    assert overall_score(sections) == pytest.approx(94.1)


def test_evaluate_pairs_counts_ties_as_wrong():
    lines = [
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "subset": "hep-go"}),
        "",
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "subset": "hep-go"}),
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "subset": "math-prm"}),
        json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "a",
                    "rejected": "b", "subset": "custom", "id": 7}),
    ]
    pairs = list(read_pairs(lines))
    assert len(pairs) == 4 and pairs[3].id == 7
    report = evaluate_pairs(pairs, [1.0, 0.5, 2.0, 0.0], [0.0, 0.5, 1.0, 1.0])
    assert report.subsets["hep-go"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert report.subsets["math-prm"]["accuracy"] == 1.0
    assert report.subsets["custom"]["accuracy"] == 0.0
    assert report.accuracy == 0.5
    assert report.sections == pytest.approx({"Reasoning": 100 * (984 + 82) / (984 + 164)})
    assert report.overall is None
    assert report.mean_margin == pytest.approx((1.0 + 0.0 + 1.0 - 1.0) / 4)
    with pytest.raises(ValueError, match="line 2"):
        list(read_pairs(['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": 1}']))


# --------------------------------------------------------------------------- resumable output


def test_resume_truncates_a_cut_short_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text('{"i": 0}\n{"i": 1}\n{"i": 2}\n{"i": 3, "rew')
    writer = ResumableJsonlWriter(str(out))
    assert writer.open() == 3
    assert partial.read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    writer.append(['{"i": 3}', '{"i": 4}'])
    writer.finish()
    assert not partial.exists()
    assert [json.loads(line)["i"] for line in out.read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_resume_stops_at_first_invalid_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    assert count_valid_lines(str(path), repair=False) == 1
    assert path.read_text() == '{"i": 0}\nnot json\n{"i": 2}\n'
    assert count_valid_lines(str(path)) == 1
    assert path.read_text() == '{"i": 0}\n'
    path.write_text('{"i": 0}\n[1, 2]\n')  # a list line is not an output record
    assert count_valid_lines(str(path)) == 1


def test_finished_output_is_reopened_when_input_grew(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"i": 0}\n{"i": 1}\n')
    writer = ResumableJsonlWriter(str(out))
    assert writer.open() == 2
    assert not out.exists() and (tmp_path / "out.jsonl.partial").exists()
    writer.append(['{"i": 2}'])
    writer.finish()
    assert out.read_text().count("\n") == 3


# --------------------------------------------------------------------------- clients on a fake


def test_sync_client_orders_many_concurrent_requests():
    fake = FakeTriton()
    convs = conversations(1000)
    with fake_client(fake, batch_size=7, max_in_flight=6) as client:
        results = client.score(iter(convs))
    assert [r.index for r in results] == list(range(1000))
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    assert results[5].attributes == pytest.approx({"helpfulness": results[5].score,
                                                   "verbosity": 2 * results[5].score})
    assert results[0].num_tokens == 2 and results[0].truncated is False
    assert sum(fake.batches) == 1000 and max(fake.batches) == 7 and len(fake.batches) == 143
    assert 2 <= fake.max_seen_in_flight <= 6


def test_sync_client_retries_queue_full_and_delivers_each_result_once():
    fake = FakeTriton(fail_first=5)
    convs = conversations(40)
    with fake_client(fake, batch_size=4, max_in_flight=2,
                     retry=RetryPolicy(max_attempts=10, jitter=0.0)) as client:
        results = client.score(convs)
    assert [r.index for r in results] == list(range(40))
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    assert fake.calls == 10 + 5 and sum(fake.batches) == 40


def test_sync_client_surfaces_exhausted_retries():
    fake = FakeTriton(fail_first=100)
    with fake_client(fake, retry=RetryPolicy(max_attempts=3)) as client:
        with pytest.raises(RewardUnavailableError, match="queue size"):
            client.score(conversations(3))
    assert fake.calls == 3


def test_sync_client_maps_rejection_to_global_index():
    convs = conversations(50)
    convs[37] = ("prompt", "BAD")
    fake = FakeTriton()
    with fake_client(fake, batch_size=8, max_in_flight=3) as client:
        with pytest.raises(RewardInvalidInputError) as info:
            client.score(convs)
    assert info.value.index == 37
    assert "last message is bad" in info.value.reason


def test_sync_client_preference_rank_and_ids():
    fake = FakeTriton(attribute_names="")
    with fake_client(fake) as client:
        ranked = client.rank("q", ["a" * 3, "a" * 40, "a" * 10])
        assert [r.index for r in ranked] == [1, 2, 0]
        assert ranked[0].response == "a" * 40
        p = client.preference("q", "a" * 3, "a" * 10)
        s3 = fake_score(to_messages(("q", "a" * 3), 0))
        s10 = fake_score(to_messages(("q", "a" * 10), 0))
        assert p == pytest.approx(1 / (1 + math.exp(-(s3 - s10))))
        ids = client.score_ids([[1, 2, 3], [40]])
        assert ids[0].score == fake_score([{"role": "ids", "content": "1,2,3"}])
        assert ids[1].score == fake_score([{"role": "ids", "content": "40"}])
        assert list(ids[0].attributes) == ["reward_0", "reward_1"]
        with pytest.raises(RewardInvalidInputError) as info:
            client.score_ids([[1], [2], []])
        assert info.value.index == 2


def test_async_client_orders_retries_and_maps_errors():
    async def run():
        fake = FakeAioTriton(fail_first=3)
        client = AsyncRewardClient("127.0.0.1:1", batch_size=5, max_in_flight=4,
                                   retry=RetryPolicy(max_attempts=6))
        await client._client.close()
        client._client = fake

        async def no_sleep(_):
            return None

        client._sleep = no_sleep
        convs = conversations(203)

        async def agen():
            for c in convs:
                yield c

        results = [r async for r in client.iter_scores(agen())]
        assert [r.index for r in results] == list(range(203))
        assert [r.score for r in results] == pytest.approx(expected_scores(convs))
        assert sum(fake.batches) == 203 and fake.max_seen_in_flight == 4
        bad = conversations(30)
        bad[22] = ("p", "BAD")
        with pytest.raises(RewardInvalidInputError) as info:
            await client.score(bad)
        assert info.value.index == 22
        ranked = await client.rank("q", ["aa", "a" * 20])
        assert [r.index for r in ranked] == [1, 0]
        await client.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- clients on a real gRPC server


class CancellingServer:
    """A real gRPC server speaking the KServe protocol (tritonclient's own service definition) that
    cancels the first `cancel_first` ModelInfer calls server-side, as Triton 2.51's front end does
    to calls it had not picked up when it shuts down (the client sees CANCELLED "CANCELLED"), then
    scores with `fake_score`. `hang=True` holds every call until the server stops or the client
    goes (counted in `client_gone`). Each call's Triton `timeout` parameter (None when absent) and
    gRPC time remaining are recorded in `timeouts` and `remaining`."""

    def __init__(self, cancel_first=0, hang=False):
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.calls = 0
        self.client_gone = 0
        self.timeouts, self.remaining = [], []
        self._lock = threading.Lock()
        self._release = threading.Event()
        outer = self

        class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
            def ModelInfer(self, request, context):
                with outer._lock:
                    outer.calls += 1
                    call = outer.calls
                    timeout = request.parameters["timeout"].int64_param if "timeout" in request.parameters else None
                    outer.timeouts.append(timeout)
                    outer.remaining.append(context.time_remaining())
                if hang:
                    deadline = time.monotonic() + 30
                    while not outer._release.wait(0.01) and time.monotonic() < deadline:
                        if not context.is_active():  # cancelled by the client, or its deadline passed
                            with outer._lock:
                                outer.client_gone += 1
                            return service_pb2.ModelInferResponse()
                if call <= cancel_first:
                    context.cancel()
                    return service_pb2.ModelInferResponse()
                rows = deserialize_bytes_tensor(request.raw_input_contents[0])
                scores = np.array([[fake_score(json.loads(row))] for row in rows], dtype=np.float32)
                response = service_pb2.ModelInferResponse(model_name=request.model_name)
                for name, array in (("score", scores), ("attributes", scores),
                                    ("num_tokens", np.full((len(rows), 1), 2, dtype=np.int32)),
                                    ("truncated", np.zeros((len(rows), 1), dtype=bool))):
                    output = response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype))
                    output.shape.extend(array.shape)
                    response.raw_output_contents.append(array.tobytes())
                return response

        self._server = grpc.server(ThreadPoolExecutor(8))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), self._server)
        self.url = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._release.set()
        self._server.stop(0)


FAST_RETRIES = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.02, jitter=0.0)


def test_sync_client_retries_what_the_server_cancelled():
    convs = conversations(24)
    with CancellingServer(cancel_first=3) as server, \
            RewardClient(server.url, batch_size=8, max_in_flight=1, retry=FAST_RETRIES) as client:
        results = client.score(convs)
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    assert server.calls == 3 + 3  # three cancelled attempts, then the three requests of 8


def test_async_client_retries_what_the_server_cancelled():
    async def run(url):
        async with AsyncRewardClient(url, batch_size=8, max_in_flight=1, retry=FAST_RETRIES) as client:
            return await client.score(convs)

    convs = conversations(16)
    with CancellingServer(cancel_first=2) as server:
        results = asyncio.run(run(server.url))
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    assert server.calls == 2 + 2


def test_a_cancelled_call_counts_against_the_retry_budget():
    with CancellingServer(cancel_first=100) as server, \
            RewardClient(server.url, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.0)) as client:
        with pytest.raises(RewardUnavailableError, match="CANCELLED"):
            client.score(conversations(2))
    assert server.calls == 3


def test_what_the_caller_cancels_or_lets_time_out_is_not_retried():
    retry = RetryPolicy(max_attempts=10, initial_backoff_s=0.0)
    # The caller closes the channel under a call in flight (gRPC: CANCELLED "Channel closed!").
    with CancellingServer(hang=True) as server:
        client = RewardClient(server.url, retry=retry)
        threading.Timer(0.3, client._client.close).start()
        with pytest.raises(RewardServerError, match="Channel closed"):
            client.score(conversations(2))
        client.close()
    assert server.calls == 1
    # The caller's deadline passes.
    with CancellingServer(hang=True) as server, RewardClient(server.url, retry=retry, timeout_s=0.3) as client:
        with pytest.raises(RewardTimeoutError):
            client.score(conversations(2))
    assert server.calls == 1

    # The caller cancels an asyncio task.
    async def cancel_after(url, seconds):
        async with AsyncRewardClient(url, retry=retry) as client:
            task = asyncio.ensure_future(client.score(conversations(2)))
            await asyncio.sleep(seconds)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with CancellingServer(hang=True) as server:
        asyncio.run(cancel_after(server.url, 0.3))
    assert server.calls == 1


# --------------------------------------------------------------------------- CLI on a fake


@pytest.fixture
def cli_on_fake(monkeypatch):
    fakes = []

    def make(url, **kwargs):
        fake = FakeTriton(max_delay_s=0.0)
        fakes.append(fake)
        return fake_client(fake, **kwargs)

    monkeypatch.setattr(cli_common, "RewardClient", make)
    return fakes


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_cli_score_resumes_without_loss_or_duplicates(tmp_path, cli_on_fake):
    records = [{"id": i, "prompt": f"p{i}", "response": "r" * i} for i in range(25)]
    records[3] = {"messages": [{"role": "user", "content": "u"},
                               {"role": "assistant", "content": "v"}], "id": 3}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, records)
    args = ["score", str(src), "-o", str(out), "--batch-size", "4", "--no-progress"]
    assert cli_main(args + ["--max-lines", "10"]) == 0
    assert not out.exists()
    partial = tmp_path / "out.jsonl.partial"
    assert partial.read_text().count("\n") == 10
    with partial.open("a") as handle:           # simulate a crash mid-line
        handle.write('{"id": 10, "prompt": "p10", "resp')
    assert cli_main(args) == 0
    assert not partial.exists()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(25))
    for record, line in zip(records, lines):
        assert {k: line[k] for k in record} == record
        assert line["reward"]["score"] == pytest.approx(fake_score(to_messages(record, 0)))
    assert sum(sum(f.batches) for f in cli_on_fake) == 25  # nothing scored twice
    assert cli_main(args) == 0                    # finished: a re-run scores nothing
    assert sum(sum(f.batches) for f in cli_on_fake) == 25
    assert out.read_text().count("\n") == 25


def test_cli_score_names_the_bad_line(tmp_path, cli_on_fake, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    records = [{"prompt": "p", "response": "ok"}] * 6 + [{"prompt": "p", "response": "BAD"}]
    write_jsonl(src, records)
    assert cli_main(["score", str(src), "-o", str(out), "--batch-size", "4",
                     "--no-progress"]) == 1
    assert f"{src}:7:" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl.partial").read_text().count("\n") == 4


def test_cli_eval_reports_sections(tmp_path, cli_on_fake, capsys):
    pairs = [
        {"prompt": "q", "chosen": "a" * 30, "rejected": "a", "subset": "alpacaeval-easy"},
        {"prompt": "q", "chosen": "a", "rejected": "a" * 30, "subset": "alpacaeval-easy"},
        {"prompt": "q", "chosen": "a" * 30, "rejected": "a", "subset": "hep-rust"},
    ]
    src = tmp_path / "pairs.jsonl"
    write_jsonl(src, pairs)
    assert cli_main(["eval", str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["subsets"]["alpacaeval-easy"]["accuracy"] == 0.5
    assert report["sections"] == {"Chat": 50.0, "Reasoning": 100.0}
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert cli_main(["eval", str(src), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "alpacaeval-easy" in table and "Reasoning" in table and "100.00" in table


# --------------------------------------------------------------------------- packaging


def test_client_imports_without_heavy_dependencies():
    code = ("import sys, reward_client, reward_client.cli, reward_client.evaluation;"
            "heavy = [m for m in ('torch', 'transformers', 'tritonserver', 'reward_server')"
            " if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.strip() == "[]"


def test_cli_score_refuses_to_resume_on_another_input(tmp_path, cli_on_fake, capsys):
    src, other, out = tmp_path / "in.jsonl", tmp_path / "other.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "p", "response": f"r{i}"} for i in range(8)])
    write_jsonl(other, [{"prompt": "p", "response": f"x{i}"} for i in range(8)])
    base = ["-o", str(out), "--batch-size", "2", "--no-progress"]
    assert cli_main(["score", str(src), "--max-lines", "3"] + base) == 0
    assert cli_main(["score", str(other)] + base) == 2
    assert "does not match" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl.partial").read_text().count("\n") == 3
    write_jsonl(other, [{"prompt": "p", "response": "r0"}])
    assert cli_main(["score", str(other)] + base) == 2      # output longer than the input
    assert cli_main(["score", str(src)] + base) == 0
    assert [json.loads(l)["response"] for l in out.read_text().splitlines()] == [
        f"r{i}" for i in range(8)]
