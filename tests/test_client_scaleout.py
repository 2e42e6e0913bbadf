"""Scale-out in the client SDK: several replicas, group-affine routing, failover.

Pure routing logic and the routed client against in-process fakes first; then 3 real
tritonserver processes on loopback: the same scores as one server, the engines' shared-token
counters proving each GRPO group was computed on one replica, a replica killed mid-run
losing and doubling nothing, and a replica whose engine stub died being caught by the liveness
probe and avoided by the client. The last two tests break replicas: they stay last in the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from bench.grpc_load import engine_counters
from reward_client import (AsyncRewardClient, RetryPolicy, RewardClient, RewardInvalidInputError,
                           RewardUnavailableError)
from reward_client.cli import main as cli_main
from reward_client.conversations import encode, to_messages
from reward_client.transport import routing
from reward_client.transport.endpoints import EndpointSet, ReplicaHealth, parse_targets, resolve_all
from reward_client.transport.replicas import ReplicaPool
from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.server import TritonServer
from tests.test_client_unit import FakeAioTriton, FakeTriton, expected_scores

# --------------------------------------------------------------------------- endpoints and health


def test_targets_from_a_list_a_comma_string_or_a_dns_name():
    assert parse_targets("a:1") == ["a:1"]
    assert parse_targets(" a:1, b:2 ,a:1") == ["a:1", "b:2"]
    assert parse_targets(["10.0.0.1:8001", "dns:///svc.ns.svc:8001"]) == ["10.0.0.1:8001", "dns:///svc.ns.svc:8001"]
    for bad in ("", "a", "a:port", ["b:1", "dns:///noport"]):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_dns_names_resolve_to_every_address_and_refresh():
    now = [0.0]
    answers = {"svc": ["10.0.0.1:8001", "10.0.0.2:8001"]}
    calls = []

    def resolver(host, port):
        calls.append(host)
        if isinstance(answers[host], Exception):
            raise answers[host]
        return answers[host]

    endpoints = EndpointSet(["dns:///svc:8001", "10.9.9.9:8001"], refresh_s=30, resolver=resolver,
                            clock=lambda: now[0])
    assert endpoints.addresses() == ["10.0.0.1:8001", "10.0.0.2:8001", "10.9.9.9:8001"]
    answers["svc"] = ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]  # the autoscaler added a pod
    now[0] = 29.0
    assert len(endpoints.addresses()) == 3 and calls == ["svc"]  # still cached
    now[0] = 30.0
    assert endpoints.addresses()[:3] == ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]
    answers["svc"] = OSError("temporary DNS failure")
    now[0] = 60.0
    assert len(endpoints.addresses()) == 4  # a failed refresh keeps the last answer


def test_real_resolution_of_localhost():
    assert "127.0.0.1:8001" in resolve_all("localhost", 8001)


def test_a_down_replica_is_avoided_for_a_doubling_cooldown():
    now = [0.0]
    health = ReplicaHealth(initial_cooldown_s=1.0, max_cooldown_s=4.0, clock=lambda: now[0])
    health.mark_down("a:1")
    assert health.healthy(["a:1", "b:1"]) == ["b:1"]
    now[0] = 1.0
    assert health.is_healthy("a:1")
    health.mark_down("a:1")  # second failure in a row: 2 s
    now[0] = 2.9
    assert not health.is_healthy("a:1")
    health.mark_down("a:1")
    health.mark_down("a:1")  # at 2.9, fourth failure: 8 s capped at 4 s
    now[0] = 6.8
    assert not health.is_healthy("a:1")
    now[0] = 6.9
    assert health.is_healthy("a:1")
    health.mark_down("a:1")
    health.mark_up("a:1")  # a success clears the record
    assert health.is_healthy("a:1")


# --------------------------------------------------------------------------- routing


ADDRESSES = ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]


def keyed(groups: int, size: int, offset: int = 0) -> list:
    return [routing.Keyed(offset + g * size + i, routing.prompt_key(f"prompt {g}".encode()), (g, i))
            for g in range(groups) for i in range(size)]


def test_rendezvous_ranking_is_stable_balanced_and_moves_only_a_removed_replicas_keys():
    keys = [routing.prompt_key(f"prompt {k}".encode()) for k in range(3000)]
    owners = [routing.ranking(key, ADDRESSES)[0] for key in keys]
    assert owners == [routing.ranking(key, list(reversed(ADDRESSES)))[0] for key in keys]
    shares = Counter(owners)
    assert all(800 < shares[address] < 1200 for address in ADDRESSES), shares
    survivors = ADDRESSES[:2]
    for key, before in zip(keys, owners):
        after = routing.ranking(key, survivors)[0]
        if before in survivors:
            assert after == before
        else:  # the removed replica's keys fall to their second choice
            assert after == routing.ranking(key, ADDRESSES)[1]


def test_plan_keeps_each_group_on_one_replica_and_in_one_request():
    items = keyed(groups=10, size=6)
    chunks = routing.plan(items, ADDRESSES, lambda a: True, batch_size=16)
    assert sorted(i for c in chunks for i in c.indices) == list(range(60))
    replicas_of_group = defaultdict(set)
    requests_of_group = defaultdict(set)
    for number, chunk in enumerate(chunks):
        assert len(chunk.items) <= 16 and chunk.indices == sorted(chunk.indices)
        for item in chunk.items:
            replicas_of_group[item.payload[0]].add(chunk.address)
            requests_of_group[item.payload[0]].add(number)
    assert all(len(r) == 1 for r in replicas_of_group.values())
    assert all(len(r) == 1 for r in requests_of_group.values())
    assert len({a for r in replicas_of_group.values() for a in r}) == 3


def test_plan_splits_only_groups_larger_than_a_request_and_skips_down_replicas():
    items = keyed(groups=1, size=20)
    chunks = routing.plan(items, ADDRESSES, lambda a: True, batch_size=8)
    assert [len(c.items) for c in chunks] == [8, 8, 4] and len({c.address for c in chunks}) == 1
    owner = chunks[0].address
    rerouted = routing.plan(items, ADDRESSES, lambda a: a != owner, batch_size=8)
    assert {c.address for c in rerouted} == {routing.ranking(items[0].key, ADDRESSES)[1]}


def test_windows_do_not_split_a_group_unless_it_passes_the_limit():
    sizes = [len(w) for w in routing.windows(keyed(groups=5, size=4), size=6, limit=10)]
    assert sizes == [8, 8, 4]
    assert [len(w) for w in routing.windows(keyed(groups=1, size=25), size=6, limit=10)] == [10, 10, 5]


def test_reorder_yields_in_input_order_and_refuses_losses_and_doubles():
    assert list(routing.reorder([[(2, "c"), (0, "a")], [(1, "b")]])) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="twice"):
        list(routing.reorder([[(0, "a")], [(0, "a")]]))
    with pytest.raises(RuntimeError, match="missing"):
        list(routing.reorder([[(0, "a"), (2, "c")]]))


# --------------------------------------------------------------------------- routed client, fakes


class FakeReplica(FakeTriton):
    """A fake replica that records the prompts it scored and can die (UNAVAILABLE from then on)."""

    def __init__(self, die_after_calls=None, **kwargs):
        super().__init__(**kwargs)
        self.die_after_calls = die_after_calls
        self.prompts = Counter()

    def infer(self, model, inputs, outputs=None, client_timeout=None, **_):
        with self._lock:
            dead = self.die_after_calls is not None and self.calls >= self.die_after_calls
        if dead:
            raise InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
        response = super().infer(model, inputs, outputs, client_timeout)
        for row in deserialize_bytes_tensor(inputs[0]._raw_content):
            self.prompts[json.dumps(json.loads(row)[:-1])] += 1
        return response

    def is_server_live(self):
        if self.die_after_calls is not None and self.calls >= self.die_after_calls:
            raise InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")
        return True

    is_server_ready = is_server_live

    def is_model_ready(self, name):
        return self.is_server_live()


def routed_fake_client(replicas: dict, **kwargs) -> RewardClient:
    client = RewardClient(list(replicas), **kwargs)
    client._pool = ReplicaPool(EndpointSet(list(replicas)), replicas.__getitem__)
    client._sleep = lambda s: None
    return client


def grpo(groups: int, size: int) -> list:
    return [(f"prompt {g}: " + "context " * (g % 5), f"response {g}.{i} " + "x" * (i * 3)) for g in range(groups)
            for i in range(size)]


def prompt_of(conversation) -> str:
    return json.dumps(to_messages(conversation, 0)[:-1])


def test_routed_client_scores_in_order_with_each_prompt_on_one_replica():
    replicas = {address: FakeReplica() for address in ADDRESSES}
    convs = grpo(groups=30, size=8)
    with routed_fake_client(replicas, batch_size=16, max_in_flight=2) as client:
        results = client.score(convs)
        assert client.health() == {"live": True, "ready": True, "model_ready": True}
    assert [r.index for r in results] == list(range(len(convs)))
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    seen = defaultdict(list)
    for address, replica in replicas.items():
        for prompt, count in replica.prompts.items():
            seen[prompt].append((address, count))
    assert all(len(places) == 1 and places[0][1] == 8 for places in seen.values()), seen
    assert all(replica.calls > 0 for replica in replicas.values())
    # The owner is the prompt's rendezvous choice, so any client (any trainer process) agrees.
    for conversation in convs[::8]:
        key = routing.prompt_key(encode(to_messages(conversation, 0)[:-1]))
        assert seen[prompt_of(conversation)][0][0] == routing.ranking(key, ADDRESSES)[0]


def test_routed_client_fails_over_without_losing_or_doubling_a_result():
    replicas = {ADDRESSES[0]: FakeReplica(), ADDRESSES[1]: FakeReplica(die_after_calls=2),
                ADDRESSES[2]: FakeReplica()}
    convs = grpo(groups=40, size=6)
    with routed_fake_client(replicas, batch_size=12, max_in_flight=2) as client:
        results = client.score(convs)
        assert client.replica_health()[ADDRESSES[1]]["live"] is False
    assert [r.index for r in results] == list(range(len(convs)))
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    scored = sum(sum(replica.prompts.values()) for replica in replicas.values())
    assert scored == len(convs)  # the dead replica's failed requests were not counted twice
    assert replicas[ADDRESSES[1]].calls == 2 and sum(replicas[ADDRESSES[1]].prompts.values()) > 0


def test_routed_client_gives_up_when_every_replica_is_down():
    replicas = {address: FakeReplica(die_after_calls=0) for address in ADDRESSES}
    with routed_fake_client(replicas, retry=RetryPolicy(max_attempts=2)) as client:
        with pytest.raises(RewardUnavailableError, match="failed to connect"):
            client.score(grpo(groups=3, size=2))
        assert client.is_ready() is False


def test_routed_client_names_an_invalid_conversation_by_its_input_index():
    replicas = {address: FakeReplica() for address in ADDRESSES}
    convs = grpo(groups=12, size=4)
    convs[29] = (convs[29][0], "BAD")
    with routed_fake_client(replicas, batch_size=8) as client:
        with pytest.raises(RewardInvalidInputError) as caught:
            client.score(convs)
    assert caught.value.index == 29


class FakeAioReplica(FakeAioTriton):
    """The asyncio flavour of :class:`FakeReplica` (prompts recorded, dies after some calls)."""

    def __init__(self, die_after_calls=None, **kwargs):
        super().__init__(**kwargs)
        self.die_after_calls = die_after_calls
        self.prompts = Counter()

    async def infer(self, model, inputs, outputs=None, client_timeout=None, **_):
        if self.die_after_calls is not None and self.calls >= self.die_after_calls:
            raise InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE")
        response = await super().infer(model, inputs, outputs, client_timeout)
        for row in deserialize_bytes_tensor(inputs[0]._raw_content):
            self.prompts[json.dumps(json.loads(row)[:-1])] += 1
        return response


def test_async_routed_client_keeps_affinity_and_fails_over():
    replicas = {ADDRESSES[0]: FakeAioReplica(), ADDRESSES[1]: FakeAioReplica(),
                ADDRESSES[2]: FakeAioReplica(die_after_calls=3)}
    convs = grpo(groups=36, size=5)

    async def produce():  # an async iterable input, as a trainer's rollout stream would be
        for conversation in convs:
            yield conversation

    async def main():
        async with AsyncRewardClient(ADDRESSES, batch_size=10, max_in_flight=2) as client:
            await client.close()
            client._pool = ReplicaPool(EndpointSet(ADDRESSES), replicas.__getitem__)
            client._sleep = lambda s: asyncio.sleep(0)
            return [r async for r in client.iter_scores(produce())]

    results = asyncio.run(main())
    assert [r.index for r in results] == list(range(len(convs)))
    assert [r.score for r in results] == pytest.approx(expected_scores(convs))
    assert sum(sum(r.prompts.values()) for r in replicas.values()) == len(convs)
    survivors = defaultdict(set)
    for address in ADDRESSES[:2]:
        for prompt in replicas[address].prompts:
            survivors[prompt].add(address)
    assert all(len(places) == 1 for places in survivors.values())  # no group split among survivors
    assert replicas[ADDRESSES[2]].calls == 3


# --------------------------------------------------------------------------- 3 real replicas


GROUPS, GROUP_SIZE = 24, 6
LONG_CONTEXT = ("You are grading answers for a careful reviewer who reads every line and expects the "
                "reasoning to be explicit, the arithmetic to be shown, and the final answer to be stated last. ")


def grpo_workload(groups: int = GROUPS, size: int = GROUP_SIZE) -> list:
    """GRPO-shaped: each prompt (distinct from its first word, well over 32 tokens) with `size` responses."""
    words = ["apples", "rivers", "engines", "violins", "glaciers", "tensors", "lanterns", "orbits"]
    convs = []
    for g in range(groups):
        question = f"Question {g}: how many {words[(g + 3) % 8]} fit in {g + 2} boxes?"
        prompt = f"{words[g % 8]} {g}: " + LONG_CONTEXT + question
        for i in range(size):
            convs.append([{"role": "user", "content": prompt},
                          {"role": "assistant", "content": f"{chr(65 + i)}{i}. " + "Because " * (i + 1) + str(g * i)}])
    return convs


@pytest.fixture(scope="module")
def replicas(demo_checkpoint):
    """Three real tritonservers on the tiny checkpoint, started together (same settings as `server`)."""
    servers = [TritonServer(ServeOptions(checkpoint=demo_checkpoint, max_length=512, token_budget=1024))
               for _ in range(3)]
    # The launcher ties each server's life to the thread that started it (PR_SET_PDEATHSIG), so
    # the starting threads must outlive the servers: the pool is shut down only after them.
    pool = ThreadPoolExecutor(3, thread_name_prefix="replica-start")
    try:
        yield list(pool.map(lambda s: s.start(), servers))
    finally:
        with ThreadPoolExecutor(3) as stopping:
            list(stopping.map(TritonServer.stop, servers))
        for server in servers:
            if server.workdir is not None:  # the killed replica's log is kept by stop(); not needed
                shutil.rmtree(server.workdir, ignore_errors=True)
        pool.shutdown()


def counters(server) -> dict:
    values = engine_counters(server.metrics_url) or {}
    return {name: values.get(name, 0.0) for name in ("sequences", "shared_tokens", "tokens",
                                                     "prefix_cache_reused_tokens")}


def delta(after: dict, before: dict) -> dict:
    return {name: after[name] - before[name] for name in after}


@pytest.fixture(scope="module")
def reference_run(server):
    """The workload on one server: scores, and the shared tokens its engine counted."""
    convs = grpo_workload()
    before = counters(server)
    # Requests of 12 = two whole groups each, one at a time: each group in one engine batch.
    with RewardClient(server.grpc_url, batch_size=12, max_in_flight=1) as client:
        scores = [r.score for r in client.score(convs)]
    return convs, scores, delta(counters(server), before)


def test_three_replicas_score_like_one_server_and_compute_each_prompt_once(replicas, reference_run):
    convs, expected, single = reference_run
    addresses = [s.grpc_url for s in replicas]
    before = [counters(s) for s in replicas]
    with RewardClient(",".join(addresses), batch_size=12, max_in_flight=1) as client:
        results = client.score(convs)
    after = [delta(counters(s), b) for s, b in zip(replicas, before)]
    assert [r.index for r in results] == list(range(len(convs)))
    assert [r.score for r in results] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # Where the client says each group goes is where its conversations were computed...
    planned = Counter()
    for start in range(0, len(convs), GROUP_SIZE):
        key = routing.prompt_key(encode(convs[start][:-1]))
        planned[routing.ranking(key, addresses)[0]] += GROUP_SIZE
    assert [a["sequences"] for a in after] == [planned[address] for address in addresses]
    assert all(a["sequences"] > 0 for a in after)
    # ...and no group was split: the replicas together skipped exactly the prompt tokens one
    # server skips (a group split over two replicas would compute its prompt twice). A group whose
    # members reach one engine in two waves shares its prompt through the prefix cache instead of
    # within the batch (and may reuse a little more: two members' common prefix can outrun their
    # group's), so the replicas compute at most what one server computes, never a prompt twice.
    skipped = lambda counts: counts["shared_tokens"] + counts["prefix_cache_reused_tokens"]  # noqa: E731
    assert skipped(single) > GROUPS * (GROUP_SIZE - 1) * 32
    assert sum(map(skipped, after)) >= skipped(single)
    assert sum(a["tokens"] for a in after) <= single["tokens"]
    assert sum(a["tokens"] + skipped(a) for a in after) == single["tokens"] + skipped(single)  # every token


def trajectories(conversations: int = 6, turns: int = 3) -> list:
    """An agent's trajectories scored turn by turn: wave t holds each conversation up to turn t's answer."""
    words = ["apples", "rivers", "engines", "violins", "glaciers", "tensors", "lanterns", "orbits"]
    full = []
    for c in range(conversations):
        messages = [{"role": "system", "content": f"Agent {c} of {words[c % 8]}. " + LONG_CONTEXT}]
        for t in range(turns):
            messages += [{"role": "user", "content": f"Step {t} of task {c}: inspect the {words[(c + t) % 8]} log."},
                         {"role": "assistant", "content": f"Observation {c}.{t}: " + "checked " * (t + 3)}]
        full.append(messages)
    return [[messages[:3 + 2 * t] for messages in full] for t in range(turns)]


def test_later_turns_go_to_the_replica_that_holds_their_prefix(replicas, server):
    """Prompt-affine routing keys a conversation by its opening, so turn t + 1 reaches the replica whose
    prefix cache holds turn t: over three replicas, the cache reuses exactly what one server's does."""
    waves = trajectories()

    def run(servers):
        before = [counters(s) for s in servers]
        with RewardClient([s.grpc_url for s in servers], batch_size=4, max_in_flight=1) as client:
            scores = [[r.score for r in client.score(wave)] for wave in waves]
        return scores, [delta(counters(s), b) for s, b in zip(servers, before)]

    one_scores, one = run([server])
    spread_scores, spread = run(replicas)
    assert spread_scores == one_scores  # the same bits, wherever and through whatever cache
    reused = one[0]["prefix_cache_reused_tokens"]
    assert reused >= len(waves[0]) * (len(waves) - 1) * 64  # every later turn continued its earlier one
    assert sum(s["prefix_cache_reused_tokens"] for s in spread) == reused
    assert sum(s["tokens"] for s in spread) == one[0]["tokens"]
    assert sum(s["sequences"] > 0 for s in spread) >= 2  # the trajectories were spread, not all on one


def test_async_client_over_real_replicas_scores_like_one_server(replicas, reference_run):
    convs, expected, _ = reference_run

    async def main():
        async with AsyncRewardClient([s.grpc_url for s in replicas], batch_size=12) as client:
            assert await client.is_ready()
            return [r async for r in client.iter_scores(convs)], await client.replica_health()

    results, health = asyncio.run(main())
    assert [r.index for r in results] == list(range(len(convs)))
    assert [r.score for r in results] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert set(health) == {s.grpc_url for s in replicas} and all(h["model_ready"] for h in health.values())


def test_cli_scores_a_file_over_the_replicas(replicas, reference_run, tmp_path):
    convs, expected, _ = reference_run
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "messages": c}) + "\n" for i, c in enumerate(convs)))
    url = ",".join(s.grpc_url for s in replicas)
    assert cli_main(["score", str(source), "-o", str(out), "--url", url, "--batch-size", "12", "--no-progress"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(len(convs)))
    assert [line["reward"]["score"] for line in lines] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_killing_a_replica_mid_run_loses_and_doubles_nothing(replicas, reference_run, caplog):
    caplog.set_level(logging.INFO, logger="reward_client.transport.replicas")
    convs, expected, _ = reference_run
    convs, expected = convs * 2, expected * 2  # a longer run, so that the kill lands in the middle
    addresses = [s.grpc_url for s in replicas]
    victim = replicas[1]
    results, killed_at = [], None
    with RewardClient(addresses, batch_size=6, max_in_flight=2) as client:
        for result in client.iter_scores(convs):
            results.append(result)
            if killed_at is None and len(results) == len(convs) // 4:
                killed_at = len(results)
                os.killpg(victim.process.pid, signal.SIGKILL)  # the server and its stubs, at once
                victim.process.wait()
        health = client.replica_health()
    assert killed_at == len(convs) // 4
    assert [r.index for r in results] == list(range(len(convs)))
    assert [r.score for r in results] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert health[victim.grpc_url]["live"] is False
    # Work planned for the victim really moved to the survivors (this is not a run that merely
    # finished before the kill).
    moved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("moved ")]
    assert moved and all(f" from {victim.grpc_url} to " in m for m in moved), moved
    assert all(health[s.grpc_url]["model_ready"] for s in replicas if s is not victim)


def engine_stub_pids(server) -> list:
    """PIDs of the reward_engine Python-backend stubs that `server`'s tritonserver started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == server.process.pid and any(arg.endswith(b"/reward_engine/1/model.py") for arg in args):
            pids.append(int(entry))
    return pids


def test_a_replica_whose_engine_died_fails_the_probe_and_the_client_moves_its_work(replicas, reference_run, caplog):
    """Issue 10's hole: Triton keeps answering ready while every inference fails. The liveness
    probe must see it, and the client must move the work away from that replica."""
    from reward_server.probe import probe

    caplog.set_level(logging.INFO, logger="reward_client.transport.replicas")
    convs, expected, _ = reference_run
    broken, healthy = replicas[0], replicas[2]  # replicas[1] was killed by the previous test
    stubs = engine_stub_pids(broken)
    assert len(stubs) == 1
    try:
        os.kill(stubs[0], signal.SIGKILL)
        result = probe(broken.grpc_url, timeout_s=10)
        assert not result.alive and "is not healthy" in result.reason, result.reason
        assert probe(healthy.grpc_url, timeout_s=10).alive
        with RewardClient([broken.grpc_url, healthy.grpc_url], batch_size=12) as client:
            results = client.score(convs)
        assert [r.index for r in results] == list(range(len(convs)))
        assert [r.score for r in results] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert any(r.getMessage().startswith("moved ") and f" from {broken.grpc_url} to " in r.getMessage()
                   for r in caplog.records)
    finally:
        # A server with a dead stub takes its whole exit timeout to stop: end it at once.
        os.killpg(broken.process.pid, signal.SIGKILL)
        broken.process.wait()
