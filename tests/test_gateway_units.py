"""The gateway's pure logic: request parsing per protocol, activations, and the batcher's
merging and error isolation (against a stand-in for the SDK client that records its calls)."""

from __future__ import annotations

import asyncio

import pytest
from reward_client import RewardInvalidInputError, RewardUnavailableError, ScoreResult

from reward_server.gateway.batching import Coalescer
from reward_server.gateway.core import GatewayError, IDS, Item, MESSAGES, TEXT, activate
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
