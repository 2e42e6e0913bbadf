"""The gateway's pure logic: request parsing per protocol, activations, the batcher's merging and
error isolation, and what happens to the work of callers that go or run out of time (against
stand-ins for the SDK client that record their calls)."""

from __future__ import annotations

import asyncio
import json

import pytest
from reward_client import RewardInvalidInputError, RewardTimeoutError, RewardUnavailableError, ScoreResult
from starlette.datastructures import Headers

from reward_server.gateway.batching import Coalescer
from reward_server.gateway.core import GatewayError, IDS, Item, MESSAGES, TEXT, activate, from_client_error
from reward_server.gateway.lifetime import ClientGone, request_timeout, unless_disconnected
from reward_server.gateway.metrics import GatewayMetrics
from reward_server.gateway.protocols import tei, vllm


class RecordingClient:
    """Scores a text as its length; rejects texts starting with "bad" the way the server does
    (the first bad one of a call, by its index in that call)."""

    def __init__(self):
        self.calls = []

    async def score_texts(self, texts):
        self.calls.append(list(texts))
        await asyncio.sleep(0.001)
        for index, text in enumerate(texts):
            if text.startswith("bad"):
                raise RewardInvalidInputError("text is bad", index)
        return [ScoreResult(i, float(len(t)), {"reward_0": float(len(t))}) for i, t in enumerate(texts)]


def test_coalescer_merges_concurrent_callers_and_isolates_a_bad_item():
    async def run():
        client = RecordingClient()
        coalescer = Coalescer(client, max_delay_s=0.01)
        callers = [coalescer.score([Item(TEXT, "x" * (i + 1))]) for i in range(6)]
        callers.insert(3, coalescer.score([Item(TEXT, "bad one")]))
        callers.append(coalescer.score([Item(TEXT, "yy"), Item(TEXT, "bad two"), Item(TEXT, "zzz")]))
        return client, await asyncio.gather(*callers)

    client, outcomes = asyncio.run(run())
    assert [o[0].score for i, o in enumerate(outcomes[:7]) if i != 3] == [1, 2, 3, 4, 5, 6]
    assert isinstance(outcomes[3][0], GatewayError) and outcomes[3][0].message == "text is bad"
    last = outcomes[7]
    assert last[0].score == 2 and isinstance(last[1], GatewayError) and last[2].score == 3
    # one merged call, then one more per bad item (each time without the items already failed)
    assert len(client.calls) == 3 and len(client.calls[0]) == 10
    assert client.calls[1] == [t for t in client.calls[0] if t != "bad one"]


def test_coalescer_batches_grow_while_the_server_is_busy():
    """With one call slot and a slow server, everything arriving during a call goes into the next."""
    class Slow(RecordingClient):
        async def score_texts(self, texts):
            self.calls.append(list(texts))
            await asyncio.sleep(0.2)
            return [ScoreResult(i, 1.0, {"reward_0": 1.0}) for i in range(len(texts))]

    async def run():
        client = Slow()
        coalescer = Coalescer(client, max_delay_s=0.001, max_calls=1)
        tasks = []
        for _ in range(5):
            tasks += [asyncio.ensure_future(coalescer.score([Item(TEXT, "x")])) for _ in range(4)]
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        return client

    calls = asyncio.run(run()).calls
    assert sum(map(len, calls)) == 20 and len(calls) <= 3 and max(map(len, calls)) >= 12, [len(c) for c in calls]


def test_coalescer_reports_an_unavailable_server_to_every_caller():
    class Down:
        async def score(self, values):
            raise RewardUnavailableError("connection refused")

    async def run():
        coalescer = Coalescer(Down())
        return await asyncio.gather(*(coalescer.score([Item(MESSAGES, [{}])]) for _ in range(3)))

    for [outcome] in asyncio.run(run()):
        assert outcome.kind == "unavailable" and outcome.status == 503


class Held:
    """Holds every call until `release` is set; records each call's texts, deadline and whether it
    was cancelled (the SDK's gRPC calls are cancelled the same way)."""

    def __init__(self):
        self.calls, self.deadlines, self.cancelled = [], [], []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def score_texts(self, texts, deadline_s=None):
        self.calls.append(list(texts))
        self.deadlines.append(deadline_s)
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(list(texts))
            raise
        return [ScoreResult(i, float(len(t)), {"reward_0": float(len(t))}) for i, t in enumerate(texts)]


def _within(coroutine, seconds: float = 20.0):
    """Run a test's event loop; a wait that never ends (a call never cancelled) fails, not hangs."""
    return asyncio.run(asyncio.wait_for(coroutine, seconds))


def _count(metrics: GatewayMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_gone_callers_items_are_removed_before_they_are_sent():
    """With the only call slot busy, callers A and B gather; A goes (its client disconnected): the
    next call carries B's items alone."""
    async def run():
        client, metrics = Held(), GatewayMetrics()
        coalescer = Coalescer(client, max_delay_s=0.001, max_calls=1, metrics=metrics)
        first = asyncio.ensure_future(coalescer.score([Item(TEXT, "x")]))
        await client.started.wait()
        a = asyncio.ensure_future(coalescer.score([Item(TEXT, "a1"), Item(TEXT, "a2")]))
        b = asyncio.ensure_future(coalescer.score([Item(TEXT, "bbb")]))
        await asyncio.sleep(0.02)  # both gathered, waiting for the slot
        a.cancel()
        await asyncio.sleep(0)
        client.release.set()
        return client, metrics, await first, await b, a

    client, metrics, first, b, a = _within(run())
    assert client.calls == [["x"], ["bbb"]] and client.cancelled == []
    assert first[0].score == 1 and b[0].score == 3 and a.cancelled()
    assert _count(metrics, "reward_gateway_withdrawn_items_total", kind="text") == 2
    assert _count(metrics, "reward_gateway_cancelled_calls_total", kind="text") == 0


@pytest.mark.parametrize("leaving", [["a"], ["a", "b"]])
def test_a_call_is_cancelled_only_when_every_caller_it_carries_has_gone(leaving):
    """A and B share one call. One leaving: the call goes on and the other gets its results. Both
    leaving: the call is cancelled, and its slot serves the next caller at once."""
    async def run():
        client, metrics = Held(), GatewayMetrics()
        coalescer = Coalescer(client, max_delay_s=0.005, max_calls=1, metrics=metrics)
        callers = {"a": asyncio.ensure_future(coalescer.score([Item(TEXT, "aa")])),
                   "b": asyncio.ensure_future(coalescer.score([Item(TEXT, "bbb"), Item(TEXT, "b")]))}
        await client.started.wait()
        for name in leaving:
            callers[name].cancel()
        await asyncio.sleep(0.01)
        cancelled_while_held = list(client.cancelled)
        if len(leaving) == 2:
            client.started.clear()
            later = asyncio.ensure_future(coalescer.score([Item(TEXT, "cccc")]))
            await client.started.wait()  # the slot was given back without the held call ending
            client.release.set()
            return client, metrics, cancelled_while_held, [(await later)[0].score]
        client.release.set()
        return client, metrics, cancelled_while_held, [r.score for r in await callers["b"]]

    client, metrics, cancelled_while_held, scores = _within(run())
    if leaving == ["a"]:
        assert cancelled_while_held == [] and client.calls == [["aa", "bbb", "b"]] and scores == [3, 1]
        assert _count(metrics, "reward_gateway_cancelled_calls_total", kind="text") == 0
    else:
        assert cancelled_while_held == [["aa", "bbb", "b"]] and client.calls[1:] == [["cccc"]] and scores == [4]
        assert _count(metrics, "reward_gateway_cancelled_calls_total", kind="text") == 1


def test_a_callers_deadline_ends_its_wait_and_the_call_carries_the_latest_deadline():
    """A (0.1 s) and B (30 s) share a call: its deadline is B's; A gets a timeout at its own deadline
    while the call goes on for B. C alone past its deadline: its call is cancelled."""
    async def run():
        client, metrics = Held(), GatewayMetrics()
        coalescer = Coalescer(client, max_delay_s=0.005, metrics=metrics)
        now = asyncio.get_running_loop().time()
        a = asyncio.ensure_future(coalescer.score([Item(TEXT, "a")], deadline=now + 0.1))
        b = asyncio.ensure_future(coalescer.score([Item(TEXT, "bb")], deadline=now + 30))
        await client.started.wait()
        a_outcome = await asyncio.gather(a, return_exceptions=True)
        waited_a = asyncio.get_running_loop().time() - now
        assert client.cancelled == [] and not b.done()
        c = asyncio.ensure_future(coalescer.score([Item(TEXT, "c")], deadline=asyncio.get_running_loop().time() + 0.1))
        c_outcome = await asyncio.gather(c, return_exceptions=True)
        await asyncio.sleep(0)
        client.release.set()
        return client, metrics, a_outcome[0], waited_a, await b, c_outcome[0]

    client, metrics, a, waited_a, b, c = _within(run())
    assert isinstance(a, GatewayError) and a.kind == "timeout" and a.status == 504
    assert 0.1 <= waited_a < 1.0 and b[0].score == 2
    assert client.deadlines[0] == pytest.approx(30, abs=0.5) and client.deadlines[1] == pytest.approx(0.1, abs=0.05)
    assert isinstance(c, GatewayError) and c.kind == "timeout" and client.cancelled == [["c"]]
    assert _count(metrics, "reward_gateway_cancelled_calls_total", kind="text") == 1


def test_a_call_to_an_sdk_without_a_deadline_keyword_gets_none():
    """RecordingClient.score_texts takes no deadline: the coalescer calls it plainly."""
    async def run():
        client = RecordingClient()
        deadline = asyncio.get_running_loop().time() + 5
        return client, await Coalescer(client, max_delay_s=0.001).score([Item(TEXT, "xy")], deadline=deadline)

    client, [result] = _within(run())
    assert client.calls == [["xy"]] and result.score == 2


def test_a_deadline_that_cut_the_retries_of_a_down_server_short_is_a_503():
    try:
        try:
            raise RewardUnavailableError("StatusCode.UNAVAILABLE: connection refused")
        except RewardUnavailableError as down:
            raise RewardTimeoutError("deadline passed: 0.010s left of the request's deadline_s=5") from down
    except RewardTimeoutError as exc:
        error = from_client_error(exc)
    assert error.status == 503 and error.message.startswith("the reward server is unavailable: StatusCode.UNAVAILABLE")
    slow = from_client_error(RewardTimeoutError("Deadline Exceeded"))
    assert slow.status == 504 and slow.message == "the reward server did not answer in time: Deadline Exceeded"


def test_request_timeout_header_is_bounded_by_the_gateways_timeout():
    assert request_timeout(Headers({"X-Request-Timeout": "2.5"}), 180.0) == 2.5
    assert request_timeout(Headers({"x-request-timeout": "500"}), 180.0) == 180.0
    assert request_timeout(Headers({}), 60.0) == 60.0
    assert request_timeout(Headers({"X-Stainless-Timeout": "30"}), 180.0) == 30.0  # the OpenAI SDK's
    assert request_timeout(Headers({"X-Request-Timeout": "3", "X-Stainless-Timeout": "30"}), 180.0) == 3.0
    for value in ("abc", "0", "-1", "inf", "nan", ""):
        with pytest.raises(GatewayError) as info:
            request_timeout(Headers({"X-Request-Timeout": value}), 180.0)
        assert info.value.status == 400 and info.value.param == "X-Request-Timeout"
        assert info.value.message.startswith("X-Request-Timeout must be a positive number of seconds")


def test_unless_disconnected_cancels_the_work_when_the_client_goes():
    async def run(disconnect_after_s):
        cancelled = []

        async def receive():
            await asyncio.sleep(disconnect_after_s)
            return {"type": "http.disconnect"}

        async def work():
            try:
                await asyncio.sleep(0.2)
                return "answer"
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        try:
            return await unless_disconnected(receive, work()), cancelled
        except ClientGone:
            return "gone", cancelled  # the work's cancellation has already run

    assert _within(run(0.02)) == ("gone", [True])
    assert _within(run(5.0)) == ("answer", [])


def test_the_app_withdraws_a_request_whose_client_disconnects():
    """The ASGI app end to end, with a held stand-in for the SDK: the client disconnects while its
    request is being scored; the call is cancelled, the request counted as cancelled (and as 499)."""
    from reward_server.gateway.app import create_app
    from reward_server.gateway.options import GatewayOptions

    app = create_app(GatewayOptions(url="127.0.0.1:9", batch_delay_ms=1))

    async def run():
        async with app.router.lifespan_context(app):
            client = Held()
            app.state.coalescer.client = client
            body = json.dumps({"query": ["templated text"]}).encode()
            incoming = [{"type": "http.request", "body": body, "more_body": False}]
            gone = asyncio.Event()

            async def receive():
                if incoming:
                    return incoming.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            sent = []

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/get_reward", "raw_path": b"/get_reward", "root_path": "",
                     "query_string": b"", "headers": [(b"content-type", b"application/json")],
                     "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000)}
            handling = asyncio.ensure_future(app(scope, receive, send))
            await client.started.wait()
            gone.set()
            await asyncio.wait_for(handling, 5)
            return client, app.state.metrics, sent

    client, metrics, sent = _within(run())
    assert client.cancelled == [["templated text"]]
    assert sent[0]["status"] == 499
    labels = dict(protocol="openrlhf", endpoint="/get_reward")
    assert _count(metrics, "reward_gateway_cancelled_requests_total", **labels, reason="disconnected") == 1
    assert _count(metrics, "reward_gateway_requests_total", **labels, status="499") == 1
    assert _count(metrics, "reward_gateway_cancelled_calls_total", kind="text") == 1


def test_activation_is_sigmoid_for_one_output_and_softmax_for_several():
    assert activate([0.0]) == [0.5] and activate([-800.0])[0] == pytest.approx(0.0)
    assert activate([2.0])[0] == pytest.approx(0.8807970779778823)
    probs = activate([1.0, 2.0, 3.0])
    assert sum(probs) == pytest.approx(1.0) and probs[2] == pytest.approx(0.6652409557748219)


@pytest.mark.parametrize("body, kinds", [
    ({"input": "text"}, [TEXT]),
    ({"input": ["a", "b"]}, [TEXT, TEXT]),
    ({"input": [1, 2, 3]}, [IDS]),
    ({"input": [[1, 2], [3]]}, [IDS, IDS]),
    ({"messages": [{"role": "user", "content": "x"}], "input": "ignored"}, [MESSAGES]),
    ({"input": []}, []),
])
def test_vllm_input_forms(body, kinds):
    assert [item.kind for item in vllm.parse_input(body)] == kinds


def test_vllm_rejects_mixed_input_and_bad_activation():
    for body in ({"input": ["a", 1]}, {"input": {"x": 1}}, {"input": [[1], []]}, {}):
        with pytest.raises(GatewayError) as info:
            vllm.parse_input(body)
        assert info.value.status == 400
    assert vllm.wants_activation({}) is True and vllm.wants_activation({"activation": False}) is False
    assert vllm.wants_activation({"use_activation": False, "activation": True}) is False
    with pytest.raises(GatewayError, match="use_activation must be true or false"):
        vllm.wants_activation({"use_activation": 0})


def test_tei_input_forms_and_status():
    items, batch = tei.parse_inputs({"inputs": "one"})
    assert [i.kind for i in items] == [TEXT] and not batch
    items, batch = tei.parse_inputs({"inputs": ["prompt", "response"]})
    assert items[0].kind == MESSAGES and items[0].value[1] == {"role": "assistant", "content": "response"}
    items, batch = tei.parse_inputs({"inputs": [["a"], ["p", "r"]]})
    assert [i.kind for i in items] == [TEXT, MESSAGES] and batch
    with pytest.raises(GatewayError) as info:
        tei.parse_inputs({"inputs": [["a", "b", "c"]]})
    assert tei.status(info.value) == 422 and tei.error_body(info.value)["error_type"] == "Validation"
