"""Reward metrics on Triton's metrics port, parsed with prometheus_client, and client-set request
ids in the server log (issue 10)."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from reward_server.pipeline.metrics import SCORE_BUCKETS, bucket_counts, rejection_reason
from tests.conversations import make_conversations


def scrape(server) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of every sample on the metrics endpoint (a server, or its URL)."""
    with urllib.request.urlopen(getattr(server, "metrics_url", server), timeout=10) as reply:
        text = reply.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def kernel_info(server) -> list[dict[str, str]]:
    """The labels of each `reward_engine_kernel_info` sample: what attention the engine runs."""
    return [dict(labels) for (name, labels), value in scrape(server).items()
            if name == "reward_engine_kernel_info" and value == 1]


def value(samples, name, **labels) -> float:
    # prometheus_client's parser names a counter's samples NAME_total even where Triton wrote NAME
    key = tuple(sorted(labels.items()))
    return samples.get((name, key), samples.get((name + "_total", key), 0.0))


def infer(url, conversations, request_id=""):
    client = grpcclient.InferenceServerClient(url)
    data = np.array([[json.dumps(c).encode()] for c in conversations], dtype=object)
    tensor = grpcclient.InferInput("messages", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    try:
        return client.infer("reward", [tensor], request_id=request_id)
    finally:
        client.close()


def _log_has(server, text, timeout_s=10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in server.log_path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def test_reward_metrics_move_as_expected_and_request_ids_reach_the_log(server):
    prompt = "Shared prompt: " + "please rate the following answer carefully. " * 8
    group = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Answer {i}"}] for i in range(4)]
    conversations = make_conversations(6, seed=31) + group
    before = scrape(server)
    result = infer(server.grpc_url, conversations, request_id="obs-42")
    with pytest.raises(InferenceServerException):
        infer(server.grpc_url, [conversations[0], "not json"], request_id="obs-bad")
    with pytest.raises(InferenceServerException):
        infer(server.grpc_url, [[{"role": "user", "content": "x " * 3000}, {"role": "assistant", "content": "y"}]])
    after = scrape(server)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731

    scores, tokens = result.as_numpy("score").ravel(), result.as_numpy("num_tokens").ravel()
    post = {"model": "postprocessing"}
    assert delta("reward_conversations_scored_total", **post) == len(conversations)
    assert delta("reward_tokens_scored_total", **post) == int(tokens.sum())
    assert delta("reward_truncated_conversations_total", **post) == 0
    assert delta("reward_score_count", **post) == len(conversations)
    assert delta("reward_score_sum", **post) == pytest.approx(float(scores.sum()), abs=1e-3)
    expected = np.cumsum(bucket_counts(scores))
    bounds = [f"{b:g}" for b in SCORE_BUCKETS] + ["+Inf"]
    assert [delta("reward_score_bucket", le=le, **post) for le in bounds] == expected.tolist()
    pre = {"model": "preprocessing"}
    assert delta("reward_requests_rejected_total", reason="invalid_messages", **pre) == 1
    assert delta("reward_requests_rejected_total", reason="too_long", **pre) == 1
    assert delta("reward_engine_shared_tokens_total", model="reward_engine") >= 3 * 32  # the group's prompt
    # Triton's own metrics are still there, on the same port. The entry point answers through its response
    # sender, which Triton counts as a success whatever the answer; the ensemble behind it counts truly.
    assert delta("nv_inference_request_success", model="reward_pipeline", version="1") == 1
    assert delta("nv_inference_request_failure", model="reward_pipeline", reason="OTHER", version="1") >= 2

    assert _log_has(server, f"request obs-42: scored {len(conversations)} conversations, {int(tokens.sum())} tokens")
    assert _log_has(server, "request obs-bad: rejected (invalid_messages): conversation 1: messages must be a JSON array")


def test_prefix_cache_metrics_count_a_later_turn_reusing_the_first(server):
    turn1 = [{"role": "system", "content": "Metrics test. " + "Read every step with care. " * 12},
             {"role": "user", "content": "Count the rivers."}, {"role": "assistant", "content": "There are three."}]
    turn2 = turn1 + [{"role": "user", "content": "And the lakes?"}, {"role": "assistant", "content": "Two."}]
    before = scrape(server)
    first = infer(server.grpc_url, [turn1]).as_numpy("num_tokens").ravel()[0]
    middle = scrape(server)
    infer(server.grpc_url, [turn2])
    after = scrape(server)
    delta = lambda a, b, name: value(a, name, model="reward_engine") - value(b, name, model="reward_engine")  # noqa: E731
    assert delta(middle, before, "reward_engine_prefix_cache_misses_total") == 1
    assert delta(after, middle, "reward_engine_prefix_cache_hits_total") == 1
    # the second turn continued all of the first but its end (the template's last tokens may differ)
    assert first - 8 <= delta(after, middle, "reward_engine_prefix_cache_reused_tokens_total") <= first
    assert value(after, "reward_engine_prefix_cache_bytes", model="reward_engine") > \
        value(middle, "reward_engine_prefix_cache_bytes", model="reward_engine") > 0


def test_the_kernel_the_engine_runs_is_on_metrics_and_in_the_log(server):
    """Whoever debugs speed sees which build of the native kernels the engine chose for this CPU."""
    from reward_server.pipeline.torch_engine import kernels

    expected = kernels.choose(kernels.cpu_flags()).name
    assert kernel_info(server) == [{"attention": "native", "isa": expected, "model": "reward_engine", "origin": "prebuilt"}]
    assert _log_has(server, f"reward_engine: attention: {expected} build (prebuilt, chosen from this CPU's flags)")


def test_truncations_are_counted(qwen_server):
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "short answer"}]
    before = scrape(qwen_server)
    result = infer(qwen_server.grpc_url, [long, long])
    assert result.as_numpy("truncated").all()
    after = scrape(qwen_server)
    name, labels = "reward_truncated_conversations_total", {"model": "postprocessing"}
    assert value(after, name, **labels) - value(before, name, **labels) == 2


def test_rejection_reasons_and_buckets_units():
    assert rejection_reason("conversation 3: messages is 9 bytes, over the limit of 8 bytes per conversation") == \
        "too_large"
    assert rejection_reason("conversation 0: messages is nested too deeply: ...") == "invalid_json"
    assert rejection_reason("conversation 1: message 0 has unknown role 'robot'") == "invalid_messages"
    assert rejection_reason("the server is stopping and takes no new requests") == "stopping"
    assert bucket_counts(np.array([-100.0, -8.0, -7.9, 0.0, 8.0, 8.1, np.inf, np.nan])) == \
        [2, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3]
