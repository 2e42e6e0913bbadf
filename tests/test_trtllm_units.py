"""Pure logic of the TensorRT-LLM path, without a server: fan-out requests and replies, the
engine config reader, and the per-rank command lines under mpirun."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from reward_server.pipeline.stages import EngineError, EngineUnavailable
from reward_server.pipeline.trtllm.fanout import (EngineReplyError, EngineUnavailableError, FanOut, KvCacheStats,
                                                  score_requests)
from reward_server.pipeline.trtllm.layout import read_engine_info
from reward_server.supervisor.mpi import WORKER_FLAGS, mpirun_command, ranks
from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.server import TritonServer

PAD = 7


def test_request_cuts_after_the_pooled_token():
    seq_cls = FanOut((0,), "last_non_pad", PAD)
    request = seq_cls.request([1, 5, 9, PAD, PAD])  # pooled at index 2: the last token that is not pad
    assert request["input_ids"].tolist() == [[1, 5, 9]] and request["input_lengths"].tolist() == [[3]]
    assert request["request_output_len"].tolist() == [[1]] and request["return_generation_logits"].tolist() == [[True]]
    assert request["input_ids"].dtype == np.int32
    causal = FanOut((0,), "last", PAD)
    assert causal.request([1, 5, 9, PAD])["input_ids"].tolist() == [[1, 5, 9, PAD]]
    with pytest.raises(ValueError, match="unknown pooling"):
        FanOut.from_spec(type("Spec", (), {"pooling": "mean", "reward_indices": [0], "pad_token_id": 0})())


def test_rewards_read_at_the_first_generation_step():
    fanout = FanOut((0, 3), "last", None)
    logits = np.arange(2 * 8, dtype=np.float32).reshape(1, 1, 2, 8)  # two steps: only the first counts
    assert fanout.rewards({"generation_logits": logits}).tolist() == [0.0, 3.0]
    with pytest.raises(EngineReplyError, match="no generation_logits"):
        fanout.rewards({"output_ids": np.zeros((1, 1, 1))})
    with pytest.raises(EngineReplyError, match=r"shape \[1, 8\]"):
        fanout.rewards({"generation_logits": np.zeros((1, 8))})
    with pytest.raises(EngineReplyError, match="reward index 3 is outside the engine's 2 logits"):
        fanout.rewards({"generation_logits": np.zeros((1, 1, 1, 2))})


def test_score_requests_fans_out_and_reassembles_in_order():
    fanout = FanOut((0,), "last", None)
    sent = []

    async def infer(inputs, request_id=None):  # reward = sum of the ids, as logit 0
        sent.append(inputs["input_ids"].tolist())
        if 99 in inputs["input_ids"]:
            raise RuntimeError("engine exploded")
        if 98 in inputs["input_ids"]:
            raise EngineUnavailableError("Server not ready")
        logits = np.zeros((1, 1, 1, 4), dtype=np.float32)
        logits[0, 0, 0, 0] = inputs["input_ids"].sum()
        return {"generation_logits": logits}

    ids_a = np.array([[1, 2, 0], [3, 4, 5]], dtype=np.int32)
    ids_b = np.array([[6, 99]], dtype=np.int32)
    ids_c = np.array([[10]], dtype=np.int32)
    ids_d = np.array([[1], [98]], dtype=np.int32)
    results = asyncio.run(score_requests(fanout, infer, [(ids_a, np.array([[2], [3]])), (ids_b, np.array([[2]])),
                                                         (ids_c, np.array([[1]])), (ids_d, np.array([[1], [1]]))]))
    assert results[0]["rewards"].tolist() == [[3.0], [12.0]]
    assert isinstance(results[1], EngineError) and "conversation 0: engine exploded" in results[1]
    assert results[2]["rewards"].tolist() == [[10.0]]
    assert isinstance(results[3], EngineUnavailable) and results[3] == "conversation 1: Server not ready"
    assert sorted(sent) == sorted([[[1, 2]], [[3, 4, 5]], [[6, 99]], [[10]], [[1]], [[98]]])  # padding never sent


def _engine_config(tmp_path: Path, **build) -> Path:
    config = {"pretrained_config": {"vocab_size": 100, "mapping": {"world_size": 4, "tp_size": 2, "pp_size": 2}},
              "build_config": {"max_input_len": 1000, "max_seq_len": 1001, "max_batch_size": 8,
                               "max_num_tokens": 512, "gather_generation_logits": True,
                               "plugin_config": {"use_paged_context_fmha": True}, **build}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_engine_info_from_trtllm_build_config(tmp_path):
    info = read_engine_info(_engine_config(tmp_path))
    assert (info.tp_size, info.pp_size, info.world_size) == (2, 2, 4)
    assert (info.max_input_len, info.max_num_tokens, info.paged_context_fmha) == (1000, 512, True)
    with pytest.raises(ValueError, match="not a TensorRT-LLM engine config"):
        read_engine_info(_engine_config(tmp_path, max_input_len="many"))
    with pytest.raises(FileNotFoundError, match="build the engine first"):
        read_engine_info(tmp_path / "absent")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_mpirun_command_lines(world_size):
    server = TritonServer(ServeOptions(grpc_port=8001, http_port=8000, metrics_port=8002, host="0.0.0.0"))
    command = mpirun_command(lambda rank: server.command(Path("/opt/tritonserver/bin/tritonserver"),
                                                         Path("/models"), None, rank), world_size)
    if world_size == 1:
        assert command[0] == "/opt/tritonserver/bin/tritonserver" and "mpirun" not in " ".join(command)
        ranks = [command]
    else:
        assert command[:2] == ["mpirun", "--allow-run-as-root"]  # by name: see mpi.mpirun_command
        ranks, current = [], None
        for word in command[2:]:
            if word == ":":
                continue
            if word == "-n":
                current = []
                ranks.append(current)
                continue
            current.append(word)
        assert all(rank[0] == "1" for rank in ranks)  # "-n 1" per rank
        ranks = [rank[1:] for rank in ranks]
    assert len(ranks) == world_size
    prefixes = set()
    for rank, args in enumerate(ranks):
        assert args[0] == "/opt/tritonserver/bin/tritonserver" and "--model-repository=/models" in args
        prefixes.add(next(a for a in args if a.startswith("--backend-config=python,shm-region-prefix-name=")))
        if rank == 0:  # the server: ports, loopback-or-host, restricted APIs, no model control
            assert "--grpc-port=8001" in args and "--http-address=0.0.0.0" in args
            assert "--model-control-mode=none" in args and any(a.startswith("--grpc-restricted-protocol=") for a in args)
            assert not set(WORKER_FLAGS) & set(args)
        else:  # workers: only the engine, no endpoint
            assert set(WORKER_FLAGS) <= set(args) and "--load-model=tensorrt_llm" in args
            assert not any(a.startswith(("--grpc-port", "--http-port", "--metrics-port")) for a in args)
    assert len(prefixes) == world_size  # each rank its own shared-memory prefix


def test_shared_prompts_go_leader_first():
    """A group's members wait for its leader (whose KV blocks are then cached); groups and unshared
    sequences start at once; a failed leader does not block its followers."""
    prompt = list(range(100, 140))  # 40 shared tokens: at least one KV block
    group = [prompt + [1, 2], prompt + [3], prompt + [4, 5, 6]]
    other = [prompt[:10] + [7] * 40]  # shares too little to wait for anyone
    failing_group = [[99] + prompt + [8], [99] + prompt + [9]]
    events = []

    async def infer(inputs, request_id=None):
        ids = inputs["input_ids"][0].tolist()
        events.append(("start", tuple(ids)))
        await asyncio.sleep(0.01)
        events.append(("end", tuple(ids)))
        if ids[0] == 99 and ids[-1] == 8:
            raise RuntimeError("leader failed")
        logits = np.zeros((1, 1, 1, 2), dtype=np.float32)
        logits[0, 0, 0, 0] = len(ids)
        return {"generation_logits": logits}

    sequences = group + other + failing_group
    ids = np.zeros((len(sequences), 50), dtype=np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
    lengths = np.array([[len(s)] for s in sequences])
    [result] = asyncio.run(score_requests(FanOut((0,), "last", None, prompt_first=32), infer, [(ids, lengths)]))
    assert "conversation 4: leader failed" in result  # only that request's error, after every sequence ran
    started = [tuple(ids_) for kind, ids_ in events if kind == "start"]
    assert len(started) == 6
    position = {tuple(seq): started.index(tuple(seq)) for seq in sequences}
    leader = min(group, key=lambda s: position[tuple(s)])
    ended_leader = events.index(("end", tuple(leader)))
    for member in group:
        if member is not leader:  # followers start only after the leader ended
            assert events.index(("start", tuple(member))) > ended_leader
    assert events.index(("start", tuple(other[0]))) < ended_leader  # no waiting outside a group
    followers = [s for s in failing_group if s[-1] == 9]
    assert followers and ("start", tuple(followers[0])) in events
    # all at once when turned off
    events.clear()
    ok = [(ids[:4], lengths[:4])]
    asyncio.run(score_requests(FanOut((0,), "last", None, prompt_first=0), infer, ok))
    assert [kind for kind, _ in events[:4]] == ["start"] * 4


def test_kv_cache_counters_are_asked_for_and_added_up():
    fanout = FanOut((0,), "last", None, perf_metrics=True)
    assert fanout.request([1, 2, 3])["return_perf_metrics"].tolist() == [[True]]
    assert "kv_cache_reused_blocks" in fanout.requested_outputs
    assert "return_perf_metrics" not in FanOut((0,), "last", None).request([1, 2, 3])

    async def infer(inputs, request_id=None):
        n = inputs["input_ids"].shape[1]
        reply = {"generation_logits": np.zeros((1, 1, 1, 2), dtype=np.float32)}
        if n != 2:  # a reply without counters (e.g. an older backend) is not counted
            reply.update(kv_cache_reused_blocks=np.array([[n // 4]], dtype=np.int32),
                         kv_cache_alloc_total_blocks=np.array([[n]], dtype=np.int32))
        return reply

    ids = np.array([[1] * 8 + [0] * 4, [2] * 12, [3, 3] + [0] * 10], dtype=np.int32)
    stats = KvCacheStats()
    asyncio.run(score_requests(fanout, infer, [(ids, np.array([[8], [12], [2]]))], stats))
    assert (stats.requests, stats.reused_blocks, stats.total_blocks) == (2, 2 + 3, 8 + 12)


def test_rank_zero_is_found_among_mpiruns_children():
    """The launcher signals rank 0 alone; here a parent process with two children stands for mpirun
    and its ranks (a parent of its own: the test process has other children)."""
    import json as json_module
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, json\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                         env={**os.environ, 'OMPI_COMM_WORLD_RANK': r}) for r in ('1', '0')]\n"
        "print(json.dumps([k.pid for k in kids]), flush=True)\n"
        "sys.stdin.read()\n"
        "[k.kill() for k in kids]\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        worker, leader = json_module.loads(parent.stdout.readline())
        assert ranks(parent.pid) == (leader, [worker])
    finally:
        parent.communicate("", timeout=30)


def test_process_steps_go_one_after_another():
    """A process model's sequence becomes one request per step tag, cut right after it, sent in
    order (each finds the blocks of the one before cached); the logits read, plus the head's bias,
    come back as one step row per conversation; a sequence without a tag fails its request alone."""
    tag = 7
    first = [1, 2, tag, 3, tag, 4, 4, tag]
    second = [5, tag, 6]  # its last tokens after the last tag are never sent
    events = []

    async def infer(inputs, request_id=None):
        ids = inputs["input_ids"][0].tolist()
        events.append(("start", len(ids), ids[0]))
        await asyncio.sleep(0.01)
        events.append(("end", len(ids), ids[0]))
        logits = np.zeros((1, 1, 1, 4), dtype=np.float32)
        logits[0, 0, 0, :2] = [-len(ids), len(ids)]
        return {"generation_logits": logits}

    fanout = FanOut((0, 1), "last", None, prompt_first=0, bias=(0.5, -0.5), step_tag_id=tag)
    assert fanout.cuts(first) == [3, 5, 8] and fanout.cuts(second) == [2]
    ids = np.zeros((2, 8), dtype=np.int32)
    ids[0], ids[1, :3] = first, second
    good, bad = asyncio.run(score_requests(fanout, infer, [(ids, np.array([[8], [3]])),
                                                          (np.array([[1, 2, 3]]), np.array([[3]]))]))
    assert "conversation 0: no step tag (token id 7)" in bad
    rows = good["rewards"]
    assert rows.shape == (2, 7) and rows[:, 0].tolist() == [3, 1]
    np.testing.assert_array_equal(rows[0, 1:], [-2.5, 2.5, -4.5, 4.5, -7.5, 7.5])
    np.testing.assert_array_equal(rows[1, 1:3], [-1.5, 1.5])
    assert np.isnan(rows[1, 3:]).all()
    chain = [(kind, n) for kind, n, start in events if start == 1]
    assert chain == [("start", 3), ("end", 3), ("start", 5), ("end", 5), ("start", 8), ("end", 8)]
    assert events.index(("start", 2, 5)) < events.index(("end", 3, 1))  # conversations run side by side


def test_reserved_tokens_are_refused_per_conversation():
    """An engine whose score rows are the embedding rows of reserved tokens (Gemma-2) must never see
    one of them in an input: that conversation's request fails naming the token, the others are read."""
    from reward_server.pipeline.trtllm.layout import RewardHeadSpec

    spec = RewardHeadSpec("s", "h", "Gemma2ForSequenceClassification", "Gemma2ForCausalLM", "sequence_classification",
                          [7, 8], ["a", "b"], "last_non_pad", 0, 64, rows_in_embedding=True)
    fanout = FanOut.from_spec(spec, prompt_first=0)
    assert fanout.reserved == {7, 8} and FanOut.from_spec(replace(spec, rows_in_embedding=False)).reserved == set()

    async def infer(inputs, request_id=None):
        logits = np.zeros((1, 1, 1, 64), dtype=np.float32)
        logits[0, 0, 0, [7, 8]] = [len(inputs["input_ids"][0]), 1.0]
        return {"generation_logits": logits}

    def request(*rows):
        ids = np.zeros((len(rows), 5), dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        return ids, np.array([[len(row)] for row in rows])

    good, bad = asyncio.run(score_requests(fanout, infer, [request([3, 4, 5]), request([3, 4], [3, 8, 5])]))
    assert good["rewards"].tolist() == [[3.0, 1.0]]
    assert isinstance(bad, EngineError) and "conversation 1: holds token id 8, which this engine reserves" in bad


def test_a_request_whose_client_went_sends_nothing_more_and_its_engine_requests_are_stopped():
    """Request 0 goes while its first engine requests are in flight: they are stopped by request id
    (the backend's `stop` input), its other conversations are never sent, and request 1 is scored."""
    from reward_server.pipeline.stages import RequestDropped
    from reward_server.pipeline.trtllm.fanout import stop_request

    sent, stopped = [], []
    gone_now = {"flag": False}
    release = None

    async def infer(inputs, request_id=None):
        sent.append((request_id, int(inputs["input_ids"][0, 0])))
        await release.wait()
        logits = np.zeros((1, 1, 1, 8), dtype=np.float32)
        logits[0, 0, 0, 0] = float(inputs["input_ids"].sum())
        return {"generation_logits": logits}

    async def stop(request_id):
        stopped.append(request_id)

    def gone(r):
        return RequestDropped("cancelled") if r == 0 and gone_now["flag"] else None

    async def run():
        nonlocal release
        release = asyncio.Event()
        fanout = FanOut((0,), "last", None, prompt_first=32)
        # request 0: a group of three sharing a 40-token prompt (leader first), request 1: one sequence
        prompt = list(range(1, 41))
        group = np.array([prompt + [50 + i] for i in range(3)], dtype=np.int32)
        task = asyncio.ensure_future(score_requests(fanout, infer, [(group, np.array([[41]] * 3)),
                                                                    (np.array([[7, 8, 9]], dtype=np.int32),
                                                                     np.array([[3]]))], None, gone, stop))
        await asyncio.sleep(0.05)
        assert len(sent) == 2  # the group's leader and request 1; the followers wait for the leader
        gone_now["flag"] = True
        await asyncio.sleep(0.2)  # the watcher stops the leader by its request id
        release.set()
        return await task

    dropped, scored = asyncio.run(run())
    assert isinstance(dropped, RequestDropped)
    assert scored["rewards"][0, 0] == 24.0
    assert len(sent) == 2  # the two followers were never sent
    leader_id = next(request_id for request_id, first in sent if first == 1)
    assert stopped == [leader_id]
    assert set(stop_request()) == {"input_ids", "input_lengths", "request_output_len", "stop"}
