"""Work nobody waits for is dropped, at every stage, on a real tritonserver (issue 30).

The server runs the `small` demo model (25M parameters, a few thousand tokens a second here) in rows
of 256 tokens, so a request of 160 long conversations is half a minute of work in hundreds of
packed rows: when its client goes, the engine must leave the rest undone. Each step is also called
directly with a ticket whose client is gone, to see that it alone drops the request.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from reward_server.pipeline import deadlines
from reward_server.pipeline.deadlines import CancelBoard, Ticket
from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.repository import drain_dir
from reward_server.supervisor.server import TritonServer
from tests.conversations import make_conversations
from tests.test_observability import scrape, value

LONG_WORDS = 120  # ~ 600 tokens a conversation with the demo tokenizer
LONG_TOKENS = 400  # a lower bound of that


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from reward_server.supervisor.demo_checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", "small")


@pytest.fixture(scope="module")
def small_rows_server(small_checkpoint):
    with TritonServer(ServeOptions(checkpoint=small_checkpoint, max_length=2048, token_budget=256)) as srv:
        yield srv


def _long(n: int, seed: int) -> list[list[dict]]:
    words = "reward policy gradient sample score answer question careful".split()
    return [[{"role": "user", "content": f"question {seed}-{i}: " + " ".join(words[(i + j) % 8] for j in range(LONG_WORDS))},
             {"role": "assistant", "content": f"answer {i}"}] for i in range(n)]


def _messages(conversations):
    data = np.array([[json.dumps(c).encode()] for c in conversations], dtype=object)
    tensor = grpcclient.InferInput("messages", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return [tensor]


def _board(server) -> CancelBoard:
    return CancelBoard(drain_dir(server.workdir / "models") / "cancelled")


def test_a_client_deadline_drops_the_work_and_the_next_request_is_answered(small_rows_server):
    server = small_rows_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    conversations = _long(160, seed=1)
    before = scrape(server)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as raised:
        client.infer("reward", _messages(conversations), client_timeout=1.5)
    assert "Deadline" in str(raised.value) or "DEADLINE" in str(raised.value)
    small = make_conversations(2, seed=5)
    result = client.infer("reward", _messages(small), client_timeout=120)
    answered_after = time.monotonic() - started
    assert np.isfinite(result.as_numpy("score")).all()
    after = scrape(server)
    sent_tokens = 160 * LONG_TOKENS
    computed = value(after, "reward_engine_tokens_total", model="reward_engine") - \
        value(before, "reward_engine_tokens_total", model="reward_engine")
    # the entry saw the cancellation; the engine dropped the request mid-way and computed a fraction of it
    assert value(after, "reward_dropped_requests_total", model="reward", reason="cancelled") == \
        value(before, "reward_dropped_requests_total", model="reward", reason="cancelled") + 1
    assert value(after, "reward_dropped_requests_total", model="reward_engine", reason="cancelled") == \
        value(before, "reward_dropped_requests_total", model="reward_engine", reason="cancelled") + 1
    assert computed < sent_tokens / 2, (computed, answered_after)
    # the engine's own queue and compute time (what autoscaling reads now that Triton's queue is empty)
    for what in ("queue", "compute"):
        name = f"reward_engine_{what}_duration_us_total"
        assert value(after, name, model="reward_engine") > value(before, name, model="reward_engine"), name
    assert not any(_board(server).directory.iterdir())  # the entry cleared its mark once the pipeline answered


def test_a_timeout_parameter_is_a_server_side_deadline(small_rows_server):
    """Triton's `timeout` parameter (what the SDK sends) ends the request at the server even when the
    gRPC call has no deadline: CANCELLED, "deadline passed", never retried by clients."""
    client = grpcclient.InferenceServerClient(small_rows_server.grpc_url)
    before = scrape(small_rows_server)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as raised:
        client.infer("reward", _messages(_long(160, seed=2)), timeout=1_000_000)  # 1 s, in microseconds
    took = time.monotonic() - started
    assert raised.value.status() == "StatusCode.CANCELLED" and deadlines.DEADLINE_PASSED in raised.value.message()
    assert took < 30
    after = scrape(small_rows_server)
    dropped = sum(value(after, "reward_dropped_requests_total", model=m, reason="expired") -
                  value(before, "reward_dropped_requests_total", model=m, reason="expired")
                  for m in ("reward", "reward_engine"))
    assert dropped >= 1


def test_batch_mates_of_a_dropped_request_keep_their_scores_bit_for_bit(small_rows_server):
    """Requests queued with one that is dropped mid-way are scored exactly as alone (the row-level
    case, a request dropped inside the same wave, is tests/test_deadlines.py's on the real engine)."""
    client = grpcclient.InferenceServerClient(small_rows_server.grpc_url)
    mates = make_conversations(6, seed=11)
    alone = client.infer("reward", _messages(mates)).as_numpy("score")
    outcome = {}

    def abandoned():
        try:
            client.infer("reward", _messages(_long(12, seed=3)), client_timeout=0.6)  # ~2 s of work
        except InferenceServerException as exc:
            outcome["abandoned"] = exc.status()

    thread = threading.Thread(target=abandoned)
    thread.start()
    time.sleep(0.2)
    together = grpcclient.InferenceServerClient(small_rows_server.grpc_url).infer("reward", _messages(mates))
    thread.join()
    assert outcome["abandoned"] == "StatusCode.DEADLINE_EXCEEDED"
    assert together.as_numpy("score").tobytes() == alone.tobytes()



def test_each_step_drops_a_request_whose_client_went(small_rows_server):
    """Called directly with a ticket already on the board (or past its deadline), preprocessing, the
    engine and postprocessing each answer CANCELLED without doing the work, and count it."""
    server = small_rows_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    board = _board(server)
    gone = Ticket("test-gone-1", time.time())
    board.cancel(gone.key)
    late = Ticket("test-late-1", time.time() - 5, time.time() - 1)
    try:
        before = scrape(server)
        for ticket in (gone, late):
            with pytest.raises(InferenceServerException) as raised:
                client.infer("preprocessing", _messages(make_conversations(1, seed=1)), parameters=ticket.parameters())
            assert raised.value.status() == "StatusCode.CANCELLED"
        ids = grpcclient.InferInput("input_ids", [1, 4], "INT32")
        ids.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.int32))
        lengths = grpcclient.InferInput("input_lengths", [1, 1], "INT32")
        lengths.set_data_from_numpy(np.array([[4]], dtype=np.int32))
        with pytest.raises(InferenceServerException) as raised:
            client.infer("reward_engine", [ids, lengths], parameters=gone.parameters())
        assert raised.value.status() == "StatusCode.CANCELLED" and raised.value.message() == deadlines.CANCELLED_MESSAGE
        rewards = grpcclient.InferInput("rewards", [1, 1], "FP32")
        rewards.set_data_from_numpy(np.zeros((1, 1), dtype=np.float32))
        truncated = grpcclient.InferInput("truncated", [1, 1], "BOOL")
        truncated.set_data_from_numpy(np.zeros((1, 1), dtype=bool))
        with pytest.raises(InferenceServerException) as raised:
            client.infer("postprocessing", [rewards, lengths, truncated], parameters=late.parameters())
        assert raised.value.status() == "StatusCode.CANCELLED" and deadlines.DEADLINE_PASSED in raised.value.message()
        after = scrape(server)

        def moved(model, reason):
            return value(after, "reward_dropped_requests_total", model=model, reason=reason) - \
                value(before, "reward_dropped_requests_total", model=model, reason=reason)

        assert moved("preprocessing", "cancelled") == 1 and moved("preprocessing", "expired") == 1
        assert moved("reward_engine", "cancelled") == 1 and moved("postprocessing", "expired") == 1
        assert value(after, "reward_engine_tokens_total", model="reward_engine") == \
            value(before, "reward_engine_tokens_total", model="reward_engine")  # nothing computed
        # a live ticket goes through the same steps untouched
        live = Ticket("test-live-1", time.time(), time.time() + 60)
        result = client.infer("reward_engine", [ids, lengths], parameters=live.parameters())
        assert np.isfinite(result.as_numpy("rewards")).all()
    finally:
        board.clear(gone.key)


def test_past_capacity_requests_are_refused_at_once_and_nothing_accepted_is_lost(small_checkpoint):
    """A queue of half a second: of 12 concurrent requests of ~2 s of work each, the server admits what
    it computes in that time (and one waiting) and refuses the rest with UNAVAILABLE (which clients
    retry) after a second look; every admitted request is scored, the same as alone."""
    with TritonServer(ServeOptions(checkpoint=small_checkpoint, max_length=2048, token_budget=256,
                                   max_queue_seconds=0.5)) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.infer("reward", _messages(_long(4, seed=0)))  # the engine measures its rate
        requests = [_long(12, seed=20 + r) for r in range(12)]
        outcomes: dict[int, object] = {}

        def send(r):
            try:
                outcomes[r] = grpcclient.InferenceServerClient(server.grpc_url).infer(
                    "reward", _messages(requests[r]), client_timeout=300).as_numpy("score")
            except InferenceServerException as exc:
                outcomes[r] = exc

        threads = [threading.Thread(target=send, args=(r,)) for r in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [r for r, o in outcomes.items() if isinstance(o, InferenceServerException)]
        scored = [r for r in outcomes if r not in refused]
        assert len(outcomes) == 12 and refused and scored
        for r in refused:
            assert outcomes[r].status() == "StatusCode.UNAVAILABLE"
            assert outcomes[r].message().startswith(deadlines.OVERLOADED_PREFIX)
        for r in scored[:3]:
            assert outcomes[r].tobytes() == client.infer("reward", _messages(requests[r])).as_numpy("score").tobytes()
        after = scrape(server)
        # refused at the entry point (before tokenising) or at the engine's queue, each counted once
        assert sum(value(after, "reward_dropped_requests_total", model=m, reason="overloaded")
                   for m in ("reward", "reward_engine")) == len(refused)
