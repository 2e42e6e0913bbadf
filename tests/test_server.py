"""A real tritonserver over real gRPC and HTTP: exactness, batching invariance, bad input.

The public-contract tests run against both engines: the PyTorch engine, and the TensorRT-LLM
ensembles with the contract double of the `tensorrt_llm` model (tests/trtllm_double). Clients must
not be able to tell them apart.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import QWEN_MAX_LENGTH, QWEN_MEAN, QWEN_NAMES, QWEN_STD, QWEN_WEIGHTS
from tests.conversations import make_conversations
from tests.reference import reference_ids, reference_rewards, reference_rewards_from_ids

CONVERSATIONS = make_conversations(24, seed=11)
OUTPUTS = ("score", "attributes", "num_tokens", "truncated")


def _messages_input(module, conversations):
    data = np.array([[json.dumps(c, ensure_ascii=False).encode()] for c in conversations], dtype=object)
    tensor = module.InferInput("messages", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def score_grpc(url, conversations):
    """{output name: array} for one request over gRPC."""
    client = grpcclient.InferenceServerClient(url)
    result = client.infer("reward", [_messages_input(grpcclient, conversations)])
    return {name: result.as_numpy(name) for name in OUTPUTS}


def score_ids(url, sequences):
    """Scores [N] of token-id sequences in one `reward_ids` request over gRPC (right-padded with 0,
    with input_lengths)."""
    width = max(map(len, sequences))
    ids = np.zeros((len(sequences), width), dtype=np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
    tokens = grpcclient.InferInput("input_ids", list(ids.shape), "INT32")
    tokens.set_data_from_numpy(ids)
    lengths = grpcclient.InferInput("input_lengths", [len(sequences), 1], "INT32")
    lengths.set_data_from_numpy(np.array([[len(s)] for s in sequences], dtype=np.int32))
    result = grpcclient.InferenceServerClient(url).infer("reward_ids", [tokens, lengths])
    return result.as_numpy("score").reshape(-1)


def score_http(url, conversations):
    client = httpclient.InferenceServerClient(url)
    result = client.infer("reward", [_messages_input(httpclient, conversations)])
    return {name: result.as_numpy(name) for name in OUTPUTS}


def invalid_arg(url, payload_rows):
    """Send raw rows; return the INVALID_ARG message (fails if the request succeeds)."""
    client = grpcclient.InferenceServerClient(url)
    data = np.array([[row] for row in payload_rows], dtype=object)
    tensor = grpcclient.InferInput("messages", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as info:
        client.infer("reward", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    return info.value.message()


@pytest.fixture(params=["torch", "tensorrt_llm"])
def any_server(request):
    """The Llama server of each engine (same checkpoint, same settings)."""
    return request.getfixturevalue("server" if request.param == "torch" else "trtllm_server")


@pytest.fixture(params=["torch", "tensorrt_llm"])
def any_qwen_server(request):
    """The Qwen2 lm_logits server of each engine (three attributes, weights, truncate_left)."""
    return request.getfixturevalue("qwen_server" if request.param == "torch" else "qwen_trtllm_server")


@pytest.fixture(scope="module")
def expected(demo_checkpoint):
    return reference_rewards(demo_checkpoint, CONVERSATIONS)


def test_grpc_and_http_scores_equal_transformers_reference(any_server, demo_checkpoint, expected):
    for out in (score_grpc(any_server.grpc_url, CONVERSATIONS), score_http(any_server.http_url, CONVERSATIONS)):
        assert out["score"].shape == (24, 1) and out["attributes"].shape == (24, 1)
        np.testing.assert_allclose(out["attributes"], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["score"], expected, rtol=1e-4, atol=1e-6)
        assert out["num_tokens"].ravel().tolist() == [len(reference_ids(demo_checkpoint, c)) for c in CONVERSATIONS]
        assert not out["truncated"].any()


def test_score_does_not_depend_on_batching_order_or_concurrency(any_server, expected):
    rng = random.Random(5)
    jobs = []  # (indices of one request)
    for _ in range(3):
        order = list(range(len(CONVERSATIONS)))
        rng.shuffle(order)
        cuts = sorted(rng.sample(range(1, len(order)), 5))
        jobs += [order[a:b] for a, b in zip([0] + cuts, cuts + [len(order)])]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda idx: score_grpc(any_server.grpc_url, [CONVERSATIONS[i] for i in idx]), jobs))
    seen = {i: [] for i in range(len(CONVERSATIONS))}
    for idx, out in zip(jobs, results):
        for row, i in enumerate(idx):
            seen[i].append(float(out["score"][row, 0]))
    for i, scores in seen.items():
        assert len(scores) == 3
        np.testing.assert_allclose(scores, expected[i, 0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(scores, scores[0], rtol=1e-5, atol=1e-6)


def test_reward_ids_entry_point_matches_messages(any_server, demo_checkpoint, expected):
    ids = [reference_ids(demo_checkpoint, c) for c in CONVERSATIONS[:5]]
    width = max(map(len, ids))
    padded = np.full((5, width), 7, dtype=np.int32)
    for row, seq in enumerate(ids):
        padded[row, : len(seq)] = seq
    client = grpcclient.InferenceServerClient(any_server.grpc_url)
    tokens = grpcclient.InferInput("input_ids", list(padded.shape), "INT32")
    tokens.set_data_from_numpy(padded)
    lengths = grpcclient.InferInput("input_lengths", [5, 1], "INT32")
    lengths.set_data_from_numpy(np.array([[len(s)] for s in ids], dtype=np.int32))
    result = client.infer("reward_ids", [tokens, lengths])
    np.testing.assert_allclose(result.as_numpy("score"), expected[:5], rtol=1e-4, atol=1e-6)
    assert result.as_numpy("num_tokens").ravel().tolist() == [len(s) for s in ids]
    # without input_lengths every row is taken whole
    one = np.array([ids[0]], dtype=np.int32)
    tokens = grpcclient.InferInput("input_ids", list(one.shape), "INT32")
    tokens.set_data_from_numpy(one)
    result = client.infer("reward_ids", [tokens])
    np.testing.assert_allclose(result.as_numpy("score")[0], expected[0], rtol=1e-4, atol=1e-6)


def test_reward_text_entry_point_matches_messages(any_server, demo_checkpoint, expected):
    """Templated strings, with the BOS (OpenRLHF) or without it (verl), score as their messages."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_checkpoint))
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS[:6]]
    texts[1::2] = [t[len(tokenizer.bos_token):] for t in texts[1::2]]
    data = np.array([[t.encode()] for t in texts], dtype=object)
    tensor = grpcclient.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    result = grpcclient.InferenceServerClient(any_server.grpc_url).infer("reward_text", [tensor])
    np.testing.assert_allclose(result.as_numpy("score"), expected[:6], rtol=1e-4, atol=1e-6)
    assert result.as_numpy("num_tokens").ravel().tolist() == [len(reference_ids(demo_checkpoint, c))
                                                              for c in CONVERSATIONS[:6]]


GOOD = json.dumps(CONVERSATIONS[0]).encode()


@pytest.mark.parametrize("row, needle", [
    (b'[{"role": "user", "content": "hi"', "conversation 1: messages is not valid JSON"),
    (b'{"role": "assistant", "content": "hi"}', "conversation 1: messages must be a JSON array of messages, got dict"),
    (b'[{"role": "wizard", "content": "hi"}]', "conversation 1: message 0 has unknown role 'wizard'"),
    (b'[{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]',
     "conversation 1: the last message (message 1) must be the assistant response"),
    (b"[]", "conversation 1: messages is empty"),
    (b'[{"role": "assistant", "content": 3}]', "conversation 1: message 0 content must be a string, got int"),
    (json.dumps([{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]).encode(),
     "over the maximum length of 512 (truncation policy: reject)"),
])
def test_bad_input_is_rejected_with_index_and_reason_and_server_keeps_serving(any_server, expected, row, needle):
    message = invalid_arg(any_server.grpc_url, [GOOD, row])
    assert needle in message
    np.testing.assert_allclose(score_grpc(any_server.grpc_url, CONVERSATIONS[:1])["score"], expected[:1], rtol=1e-4)


def test_overlong_rejection_names_token_count(any_server, demo_checkpoint):
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    count = len(reference_ids(demo_checkpoint, long))
    assert f"conversation 0: conversation is {count} tokens, over the maximum length of 512" in \
        invalid_arg(any_server.grpc_url, [json.dumps(long).encode()])


def test_one_bad_request_does_not_fail_others_in_its_dynamic_batch(any_server, expected):
    client = grpcclient.InferenceServerClient(any_server.grpc_url)
    outcomes = {}

    def callback(i, result, error):
        outcomes[i] = (result, error)

    for i in range(24):
        bad = i % 4 == 1
        rows = [b"not json"] if bad else [json.dumps(CONVERSATIONS[i]).encode()]
        data = np.array([rows], dtype=object)
        tensor = grpcclient.InferInput("messages", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        client.async_infer("reward", [tensor], callback=lambda result, error, i=i: callback(i, result, error))
    for _ in range(600):
        if len(outcomes) == 24:
            break
        import time
        time.sleep(0.05)
    assert len(outcomes) == 24
    for i, (result, error) in outcomes.items():
        if i % 4 == 1:
            assert error is not None and "conversation 0: messages is not valid JSON" in error.message()
        else:
            assert error is None, error
            np.testing.assert_allclose(result.as_numpy("score")[0], expected[i], rtol=1e-4, atol=1e-6)


def test_restricted_apis_need_the_admin_header(server):
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    headers = {"reward-server-admin": server.options.admin_token}
    assert {m["name"] for m in client.get_model_repository_index(headers=headers)} >= {"reward", "reward_ids"}


# --- lm_logits head, attributes, weights, normalisation, truncate_left (Qwen2) --------------------------


def test_qwen_attributes_weights_and_normalisation(any_qwen_server, qwen_checkpoint):
    conversations = [c for c in make_conversations(30, seed=2, max_turns=1)
                     if len(reference_ids(qwen_checkpoint, c)) <= QWEN_MAX_LENGTH][:12]
    expected = reference_rewards(qwen_checkpoint, conversations, (0, 3, 5))
    out = score_grpc(any_qwen_server.grpc_url, conversations)
    np.testing.assert_allclose(out["attributes"], expected, rtol=1e-4, atol=1e-6)
    weights = np.array([float(w) for w in QWEN_WEIGHTS.split(",")], dtype=np.float32)
    np.testing.assert_allclose(out["score"].ravel(), (expected @ weights - QWEN_MEAN) / QWEN_STD, rtol=1e-4, atol=1e-5)
    config = grpcclient.InferenceServerClient(any_qwen_server.grpc_url).get_model_config("postprocessing", as_json=True)
    assert config["config"]["parameters"]["attribute_names"]["string_value"] == QWEN_NAMES


def test_truncate_left_keeps_the_response(any_qwen_server, qwen_checkpoint):
    long = [{"role": "system", "content": "Be brief. " * 40}, {"role": "user", "content": "Explain rainbows."},
            {"role": "assistant", "content": "Light refracts in droplets."}]
    full = reference_ids(qwen_checkpoint, long)
    assert len(full) > QWEN_MAX_LENGTH
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    out = score_grpc(any_qwen_server.grpc_url, [long, short])
    assert out["truncated"].ravel().tolist() == [True, False]
    assert out["num_tokens"][0, 0] == QWEN_MAX_LENGTH
    kept = full[-QWEN_MAX_LENGTH:]  # no BOS in ChatML: the last max_length tokens
    np.testing.assert_allclose(out["attributes"][0], reference_rewards_from_ids(qwen_checkpoint, kept, (0, 3, 5)),
                               rtol=1e-4, atol=1e-6)
    too_long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Long answer. " * 80}]
    assert "conversation 0: the response alone is" in invalid_arg(any_qwen_server.grpc_url, [json.dumps(too_long).encode()])


def test_engine_counters_on_the_metrics_endpoint(server):
    import re
    import urllib.request

    def counters():
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        return {name: float(value) for name, value in
                re.findall(r'^(reward_engine_\w+_total)\{model="reward_engine"\} (\S+)$', text, re.M)}

    before = counters()
    prompt = [{"role": "user", "content": "Name three prime numbers, and explain why each one is prime."}]
    group = [prompt + [{"role": "assistant", "content": f"{a}, {a + 2} and {a + 4}."}] for a in (3, 5, 11, 17)]
    score_grpc(server.grpc_url, group)
    after = counters()
    assert after["reward_engine_sequences_total"] - before.get("reward_engine_sequences_total", 0) == 4
    assert after["reward_engine_shared_tokens_total"] - before.get("reward_engine_shared_tokens_total", 0) >= 3 * 32
    assert after["reward_engine_padded_tokens_total"] >= after["reward_engine_tokens_total"] > 0


@pytest.mark.parametrize("model", ["reward", "reward_ids"])
def test_any_subset_of_outputs_can_be_requested(any_server, demo_checkpoint, expected, model):
    import itertools

    client = grpcclient.InferenceServerClient(any_server.grpc_url)
    if model == "reward":
        inputs = [_messages_input(grpcclient, CONVERSATIONS[:2])]
    else:
        ids = np.array([reference_ids(demo_checkpoint, CONVERSATIONS[0])], dtype=np.int32)
        inputs = [grpcclient.InferInput("input_ids", list(ids.shape), "INT32")]
        inputs[0].set_data_from_numpy(ids)
    for size in (1, 2, 3):
        for names in itertools.combinations(OUTPUTS, size):
            result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in names])
            got = {n: result.as_numpy(n) for n in names}
            assert all(v is not None for v in got.values()), names
            if "score" in got:
                np.testing.assert_allclose(got["score"][:, 0], expected[: len(got["score"]), 0], rtol=1e-4, atol=1e-6)


def test_compiled_engine_serves_the_same_scores(demo_checkpoint, expected):
    """--compile inside the Python backend stub (own interpreter, C locale by default)."""
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.server import TritonServer

    with TritonServer(ServeOptions(checkpoint=demo_checkpoint, max_length=512, compile=True)) as srv:
        out = score_grpc(srv.grpc_url, CONVERSATIONS)
    np.testing.assert_allclose(out["score"], expected, rtol=1e-4, atol=1e-6)
