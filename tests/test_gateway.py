"""The HTTP gateway as a real process in front of a real tritonserver, each protocol called the way
its framework's own client calls it; every score must equal the gRPC path's."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from reward_client import RewardClient
from transformers import AutoTokenizer

from tests.conftest import QWEN_NAMES, GatewayProcess
from tests.conversations import make_conversations
from tests.reference import reference_ids

CONVERSATIONS = make_conversations(12, seed=21)


def post(url: str, body, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, object]:
    """POST JSON with the standard library; (status, parsed JSON answer), whatever the status."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def grpc_scores(server):
    """The gRPC path's scores of CONVERSATIONS (the SDK over the `reward` ensemble)."""
    with RewardClient(server.grpc_url) as client:
        return np.array([r.score for r in client.score(CONVERSATIONS)])


@pytest.fixture(scope="module")
def templated(demo_checkpoint):
    """CONVERSATIONS as the reward model's chat template renders them (starting with the BOS)."""
    tokenizer = AutoTokenizer.from_pretrained(str(demo_checkpoint))
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    assert all(t.startswith(tokenizer.bos_token) for t in texts)
    return texts, tokenizer.bos_token


def _inference_count(grpc_url: str, model: str) -> tuple[int, int]:
    stats = grpcclient.InferenceServerClient(grpc_url).get_inference_statistics(model, as_json=True)
    [model_stats] = stats["model_stats"]
    return int(model_stats.get("inference_count", 0)), int(model_stats.get("execution_count", 0))


def test_openrlhf_one_sample_requests_under_concurrency(gateway, server, demo_checkpoint, templated, grpc_scores):
    """OpenRLHF's agent sends one query per request (aiohttp, `json=`), with prompts and labels,
    and `{"query": []}` to extra endpoints; many at once. Each reward equals the gRPC path's, and
    the gateway merged the concurrent requests into fewer gRPC requests."""
    texts, _ = templated
    before = _inference_count(server.grpc_url, "reward_text")

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async def one(index):
                payload = {"query": [texts[index]], "prompts": [f"prompt {index}"], "labels": [f"label {index}"]}
                async with session.post(gateway.url + "/get_reward", json=payload) as response:
                    response.raise_for_status()
                    return await response.json()

            async def empty():
                async with session.post(gateway.url + "/get_reward", json={"query": []}) as response:
                    response.raise_for_status()
                    return await response.json()

            rounds = [one(k % len(texts)) for k in range(4 * len(texts))] + [empty() for _ in range(6)]
            return await asyncio.gather(*rounds)

    answers = asyncio.run(run())
    for k, answer in enumerate(answers[:4 * len(texts)]):
        i = k % len(texts)
        assert answer["rewards"] == answer["scores"] and len(answer["rewards"]) == 1
        assert answer["rewards"][0] == pytest.approx(grpc_scores[i], rel=1e-5, abs=1e-6)
        assert answer["extra_logs"]["num_tokens"] == [float(len(reference_ids(demo_checkpoint, CONVERSATIONS[i])))]
    for answer in answers[4 * len(texts):]:
        assert answer == {"rewards": [], "scores": [], "extra_logs": {"num_tokens": [], "truncated": []}}
    inferences, executions = (a - b for a, b in zip(_inference_count(server.grpc_url, "reward_text"), before))
    assert inferences == 4 * len(texts)
    assert executions < inferences / 2, (inferences, executions)


def test_openrlhf_legacy_batch_and_bad_query(gateway, templated, grpc_scores):
    texts, _ = templated
    status, answer = post(gateway.url + "/get_reward", {"query": texts})
    assert status == 200
    np.testing.assert_allclose(answer["rewards"], grpc_scores, rtol=1e-5, atol=1e-6)
    status, answer = post(gateway.url + "/get_reward", {"query": [texts[0], ""]})
    assert status == 400 and answer == {"detail": "query[1]: empty text"}
    status, answer = post(gateway.url + "/get_reward", {"prompts": ["p"]})
    assert status == 400 and "query is missing" in answer["detail"]


def test_one_bad_sample_fails_alone_among_concurrent_requests(gateway, templated, grpc_scores):
    """A query over the server's length limit, sent at the same moment as good ones (so they share
    a gRPC request), fails with the limit named; the others still get their rewards."""
    texts, _ = templated
    long_text = texts[0].replace("assistant", "assistant " + "word " * 900, 1)

    async def run():
        async with aiohttp.ClientSession() as session:
            async def one(text):
                async with session.post(gateway.url + "/get_reward", json={"query": [text]}) as response:
                    return response.status, await response.json()
            return await asyncio.gather(*[one(t) for t in texts[:5] + [long_text] + texts[5:]])

    answers = asyncio.run(run())
    status, bad = answers.pop(5)
    assert status == 400 and bad["detail"].startswith("query[0]: conversation is ")
    assert "over the maximum length of 512" in bad["detail"]
    assert [s for s, _ in answers] == [200] * len(texts)
    np.testing.assert_allclose([a["rewards"][0] for _, a in answers], grpc_scores, rtol=1e-5, atol=1e-6)


def test_vllm_classify_as_verl_sends_it(gateway, templated, grpc_scores):
    """verl: one request per sample, the reward template applied and the BOS string stripped,
    `use_activation: false`; the score is `data[-1].probs[-1]`."""
    texts, bos = templated
    for i, text in enumerate(texts[:4]):
        status, answer = post(gateway.url + "/classify",
                              {"model": "/models/rm", "input": text[len(bos):], "use_activation": False})
        assert status == 200, answer
        assert answer["object"] == "list" and answer["model"] == "/models/rm"
        assert answer["data"][-1]["probs"][-1] == pytest.approx(grpc_scores[i], rel=1e-5, abs=1e-6)
        assert answer["data"][0]["num_classes"] == 1 and answer["data"][0]["index"] == 0
        assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] == 0


def test_vllm_classify_input_forms_and_activation(gateway, demo_checkpoint, templated, grpc_scores):
    texts, _ = templated
    ids = [reference_ids(demo_checkpoint, c) for c in CONVERSATIONS[:3]]
    forms = {
        "strings": ({"input": texts[:3]}, 3),
        "one id list": ({"input": ids[0]}, 1),
        "id lists": ({"input": ids}, 3),
        "messages": ({"messages": CONVERSATIONS[0]}, 1),
    }
    sigmoid = [1 / (1 + math.exp(-s)) for s in grpc_scores]
    for name, (body, count) in forms.items():
        status, answer = post(gateway.url + "/classify", body)  # default: vLLM's activation (sigmoid)
        assert status == 200, (name, answer)
        assert [d["probs"][0] for d in answer["data"]] == pytest.approx(sigmoid[:count], rel=1e-5), name
        status, legacy = post(gateway.url + "/classify", {**body, "activation": False})  # old clients' spelling
        assert [d["probs"][0] for d in legacy["data"]] == pytest.approx(list(grpc_scores[:count]), rel=1e-5, abs=1e-6)
    status, answer = post(gateway.url + "/pooling", {"input": texts[:2], "use_activation": False})
    assert status == 200 and [d["object"] for d in answer["data"]] == ["pooling"] * 2
    assert [d["data"][0] for d in answer["data"]] == pytest.approx(list(grpc_scores[:2]), rel=1e-5, abs=1e-6)
    status, answer = post(gateway.url + "/v1/embeddings", {"model": "rm", "input": texts[1]})  # SGLang, raw
    assert status == 200 and answer["data"][-1]["embedding"][-1] == pytest.approx(grpc_scores[1], rel=1e-5, abs=1e-6)


def test_vllm_errors_have_vllm_shape(gateway):
    status, answer = post(gateway.url + "/classify", {"input": [1.5, 2]})
    assert status == 400 and answer["error"]["type"] == "BadRequestError" and answer["error"]["code"] == 400
    assert answer["error"]["param"] == "input" and "list of token ids" in answer["error"]["message"]
    status, answer = post(gateway.url + "/classify", {"input": [[1, 2], [10 ** 7]]})
    assert status == 400 and answer["error"]["message"].startswith("input[1]: input_ids holds 10000000, outside")
    status, answer = post(gateway.url + "/classify", {"input": "x", "use_activation": "no"})
    assert status == 400 and answer["error"]["param"] == "use_activation"
    status, answer = post(gateway.url + "/classify", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = post(gateway.url + "/classify", {"messages": [{"role": "user", "content": "no response"}]})
    assert status == 400 and "must be the assistant response" in answer["error"]["message"]


def test_nim_chat_completions(gateway, grpc_scores):
    status, answer = post(gateway.url + "/v1/chat/completions", {"model": "nvidia/reward", "messages": CONVERSATIONS[2]})
    assert status == 200, answer
    choice = answer["choices"][0]
    name, value = choice["message"]["content"].split(":")
    # grpc_scores scored CONVERSATIONS together, this request one alone: fp32 sums in another order
    # (3.4e-7 relative measured on an AVX2 machine; other CPUs' kernels differ), so the tolerance of
    # the other cross-request comparisons here, not bit-level agreement.
    assert name == "reward" and float(value) == pytest.approx(grpc_scores[2], rel=1e-5, abs=1e-6)
    assert np.float32(float(value)) == np.float32(choice["logprobs"]["content"][0]["logprob"])
    assert choice["logprobs"]["content"][0]["token"] == "reward" and answer["object"] == "chat.completion"


def test_nim_multi_attribute_and_tei_on_the_qwen_server(qwen_server, qwen_checkpoint):
    """A three-attribute model: NIM answers `name:value,...`; TEI's labels are the attribute names."""
    conversation = make_conversations(1, seed=3)[0]
    with RewardClient(qwen_server.grpc_url) as client:
        [expected] = client.score([conversation])
    with GatewayProcess(qwen_server.grpc_url) as gw:
        status, answer = post(gw.url + "/v1/chat/completions", {"model": "m", "messages": conversation})
        assert status == 200, answer
        pairs = [item.split(":") for item in answer["choices"][0]["message"]["content"].split(",")]
        assert [name for name, _ in pairs] == QWEN_NAMES.split(",")
        assert [float(v) for _, v in pairs] == pytest.approx(list(expected.attributes.values()), rel=1e-6, abs=1e-7)
        logprobs = answer["choices"][0]["logprobs"]["content"]
        assert {e["token"]: e["logprob"] for e in logprobs} == pytest.approx(expected.attributes, rel=1e-6)
        status, labels = post(gw.url + "/predict", {"inputs": [conversation[-2]["content"], conversation[-1]["content"]],
                                                    "raw_scores": True})
        assert status == 200 and {entry["label"] for entry in labels} == set(QWEN_NAMES.split(","))
        assert [entry["score"] for entry in labels] == sorted((entry["score"] for entry in labels), reverse=True)
        status, soft = post(gw.url + "/predict", {"inputs": "plain text, no template"})
        assert status == 200 and sum(entry["score"] for entry in soft) == pytest.approx(1.0)  # softmax of three


def test_tei_predict_forms(gateway, templated, grpc_scores):
    texts, _ = templated
    status, single = post(gateway.url + "/predict", {"inputs": texts[0], "raw_scores": True})
    assert status == 200 and single == [{"score": pytest.approx(grpc_scores[0], rel=1e-5, abs=1e-6), "label": "reward_0"}]
    status, batch = post(gateway.url + "/predict", {"inputs": [[texts[1]], [texts[2]]], "raw_scores": True})
    assert [b[0]["score"] for b in batch] == pytest.approx(list(grpc_scores[1:3]), rel=1e-5, abs=1e-6)
    # a [prompt, response] pair is the conversation user: prompt, assistant: response
    status, scored = post(gateway.url + "/predict", {"inputs": ["What is 2+2?", "4, of course."]})
    with RewardClient(gateway_grpc(gateway)) as client:
        [reference] = client.score([("What is 2+2?", "4, of course.")])
    assert status == 200 and scored[0]["score"] == pytest.approx(1 / (1 + math.exp(-reference.score)), rel=1e-5)
    status, error = post(gateway.url + "/predict", {"inputs": [["a", "b", "c"]]})
    assert status == 422 and error["error_type"] == "Validation" and "inputs[0]" in error["error"]


def gateway_grpc(gateway) -> str:
    return gateway.process.args[gateway.process.args.index("--url") + 1]


def test_native_score_health_and_models(gateway, grpc_scores):
    status, answer = post(gateway.url + "/v1/score", {"conversations": CONVERSATIONS[:2]})
    assert status == 200 and [r["score"] for r in answer["results"]] == pytest.approx(list(grpc_scores[:2]), rel=1e-5)
    assert set(answer["results"][0]) == {"score", "attributes", "num_tokens", "truncated"}
    assert get(gateway.url + "/health") == (200, {"status": "ready", "server": gateway_grpc(gateway)})
    assert get(gateway.url + "/v1/models")[1]["data"][0]["id"] == "reward"


def test_unreachable_server_answers_503(server):
    from reward_server.supervisor.ports import free_port

    with GatewayProcess(f"127.0.0.1:{free_port()}", "--timeout", "5") as gw:
        status, answer = get(gw.url + "/health")
        assert status == 503 and answer["status"] == "unavailable"
        status, answer = post(gw.url + "/v1/chat/completions", {"messages": CONVERSATIONS[0]})
        assert status == 503 and answer["error"]["type"] == "ServiceUnavailableError"
        assert answer["error"]["message"].startswith("the reward server is unavailable")


def test_api_key_and_size_limits(server):
    with GatewayProcess(server.grpc_url, "--max-body-bytes", "3000", "--max-inputs", "3",
                        env={"REWARD_GATEWAY_API_KEY": "s3cret"}) as gw:
        assert post(gw.url + "/get_reward", {"query": []})[0] == 401
        assert post(gw.url + "/get_reward", {"query": []}, {"Authorization": "Bearer s3cret"})[0] == 200
        key = {"X-API-Key": "s3cret"}
        assert post(gw.url + "/get_reward", {"query": []}, key)[0] == 200
        assert post(gw.url + "/get_reward", {"query": []}, {"X-API-Key": "wrong"})[0] == 401
        assert get(gw.url + "/health")[0] == 200  # health stays open
        status, answer = post(gw.url + "/get_reward", {"query": ["x" * 4000]}, key)
        assert status == 413 and answer["detail"].startswith("the request body is 4015 bytes, over the limit of 3000")
        status, answer = post(gw.url + "/classify", {"input": ["a", "b", "c", "d"]}, key)
        assert status == 413 and answer["error"]["message"] == "input holds 4 inputs, over the limit of 3 per request"


def test_trl_reward_function_in_both_dataset_formats(server, grpc_scores):
    """TRL calls `f(prompts, completions, **kw)`: conversational lists or plain strings."""
    from reward_client.trl import RewardServerFunction

    reward = RewardServerFunction(server.grpc_url)
    assert reward.__name__ == "reward_server"
    prompts = [c[:-1] for c in CONVERSATIONS[:4]]
    completions = [[c[-1]] for c in CONVERSATIONS[:4]]
    assert reward(prompts, completions, completion_ids=None, trainer_state=None) == \
        pytest.approx(list(grpc_scores[:4]), rel=1e-5, abs=1e-6)
    with RewardClient(server.grpc_url) as client:
        [plain] = client.score([("What is 2+2?", "4")])
    assert reward(["What is 2+2?"], ["4"]) == pytest.approx([plain.score], rel=1e-6)
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        reward(["a", "b"], ["c"])
    reward.close()


def test_gateway_metrics_per_protocol(gateway, templated):
    """`GET /metrics`: requests by protocol, endpoint and status, items, latency, merged-batch sizes."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples():
        with urllib.request.urlopen(gateway.url + "/metrics", timeout=30) as reply:
            text = reply.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def delta(after, before, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    texts, _ = templated
    before = samples()
    assert post(gateway.url + "/get_reward", {"query": texts[:3]})[0] == 200
    assert post(gateway.url + "/get_reward", {"query": [""]})[0] == 400
    assert post(gateway.url + "/pooling", {"input": texts[3]})[0] == 200
    after = samples()
    openrlhf = dict(protocol="openrlhf", endpoint="/get_reward")
    assert delta(after, before, "reward_gateway_requests_total", **openrlhf, status="200") == 1
    assert delta(after, before, "reward_gateway_requests_total", **openrlhf, status="400") == 1
    assert delta(after, before, "reward_gateway_requests_total", protocol="vllm", endpoint="/pooling",
                 status="200") == 1
    assert delta(after, before, "reward_gateway_items_total", **openrlhf) == 4
    assert delta(after, before, "reward_gateway_request_seconds_count", **openrlhf) == 2
    assert delta(after, before, "reward_gateway_batch_items_count", kind="text") == 3
    assert delta(after, before, "reward_gateway_batch_items_sum", kind="text") == 3 + 1 + 1  # "" is a batch too
