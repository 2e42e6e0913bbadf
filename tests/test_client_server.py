"""Integration tests of the reward client and CLI against a real tritonserver.

Uses the session fixtures of tests/conftest.py (`server`, `qwen_server`, `demo_checkpoint`)
and starts one more server of its own with a one-slot queue to provoke overload rejections.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reward_client import (AsyncRewardClient, RetryPolicy, RewardClient, RewardInvalidInputError,
                           RewardTimeoutError, RewardUnavailableError)
from reward_client.cli.resumable import PARTIAL_SUFFIX

CLIENT_DIR = Path(__file__).resolve().parents[1] / "client"
CLI = [sys.executable, "-m", "reward_client"]
TOL = dict(rel=1e-4, abs=1e-4)  # batch composition changes fp32 sums in the last bits


def make_conversations(n: int, seed: int = 0) -> list:
    """Distinct short conversations (well under the fixture's 256-token limit)."""
    topics = ["the sea", "tax law", "sourdough", "Rust lifetimes", "jazz", "orbits", "moss"]
    out = []
    for i in range(n):
        prompt = f"Tell me about {topics[(i + seed) % len(topics)]} (case {i})."
        response = " ".join(["fine"] * (1 + (i * 7 + seed) % 23)) + f" #{i}"
        out.append((prompt, response))
    return out


def one_by_one(url: str, conversations: list) -> list:
    """Scores obtained with one conversation per request, nothing in flight concurrently."""
    with RewardClient(url, batch_size=1, max_in_flight=1) as client:
        return [r.score for r in client.score(conversations)]


@pytest.fixture(scope="module")
def reference(server):
    """700 conversations and their scores from one unloaded, sequential pass."""
    conversations = make_conversations(700)
    with RewardClient(server.grpc_url, batch_size=256, max_in_flight=1) as client:
        scores = [r.score for r in client.score(conversations)]
    assert len(set(round(s, 4) for s in scores)) > 300  # distinct enough to expose reordering
    return conversations, scores


def test_concurrent_scoring_is_ordered_and_complete(server, reference):
    conversations, expected = reference
    with RewardClient(server.grpc_url, batch_size=13, max_in_flight=6) as client:
        client.wait_until_ready(30)
        results = list(client.iter_scores(iter(conversations)))
    assert [r.index for r in results] == list(range(len(conversations)))
    assert [r.score for r in results] == pytest.approx(expected, **TOL)
    assert all(r.num_tokens > 10 and r.truncated is False for r in results)
    assert list(results[0].attributes) == ["reward_0"]
    assert results[0].attributes["reward_0"] == pytest.approx(results[0].score)
    # Spot-check against scores obtained one conversation at a time.
    picks = [0, 1, 350, 699]
    single = one_by_one(server.grpc_url, [conversations[i] for i in picks])
    assert [results[i].score for i in picks] == pytest.approx(single, **TOL)


def test_async_client_is_ordered_and_complete(server, reference):
    conversations, expected = reference

    async def run():
        async with AsyncRewardClient(server.grpc_url, batch_size=5, max_in_flight=8) as client:
            await client.wait_until_ready(30)

            async def source():
                for conversation in conversations[:300]:
                    yield conversation

            results = [r async for r in client.iter_scores(source())]
            names = await client.attribute_names()
            p = await client.preference(*conversations[3], conversations[4][1])
            health = await client.health()
            by_ids = await client.score_ids([[5, 6, 7, 8], [9, 10]])
            return results, names, p, health, by_ids

    results, names, p, health, by_ids = asyncio.run(run())
    assert health == {"live": True, "ready": True, "model_ready": True}
    with RewardClient(server.grpc_url, batch_size=1) as client:
        sync_ids = client.score_ids([[5, 6, 7, 8], [9, 10]])
    assert [r.score for r in by_ids] == pytest.approx([r.score for r in sync_ids], **TOL)
    assert [r.num_tokens for r in by_ids] == [4, 2]
    assert [r.index for r in results] == list(range(300))
    assert [r.score for r in results] == pytest.approx(expected[:300], **TOL)
    assert names == ("reward_0",)
    a, b = one_by_one(server.grpc_url, [conversations[3], (conversations[3][0],
                                                          conversations[4][1])])
    assert p == pytest.approx(1 / (1 + math.exp(-(a - b))), abs=1e-4)


def test_invalid_conversation_is_named_by_its_global_index(server):
    conversations = make_conversations(100)
    conversations[77] = [{"role": "bot", "content": "hello"}]
    with RewardClient(server.grpc_url, batch_size=8, max_in_flight=4) as client:
        with pytest.raises(RewardInvalidInputError) as info:
            client.score(conversations)
        assert info.value.index == 77
        assert "bot" in info.value.reason
        # Over the length limit (256 tokens, reject policy): the server's own check.
        long = make_conversations(20)
        long[13] = ("word " * 600, "too long")
        with pytest.raises(RewardInvalidInputError) as info:
            client.score(long)
        assert info.value.index == 13


def test_deadline_raises_timeout_without_retrying(server):
    with RewardClient(server.grpc_url, batch_size=64, timeout_s=0.0005) as client:
        started = time.monotonic()
        with pytest.raises(RewardTimeoutError):
            client.score(make_conversations(64))
        assert time.monotonic() - started < 5


def test_preference_rank_and_token_ids(server, demo_checkpoint):
    from transformers import AutoTokenizer

    prompt = "What is the capital of France?"
    responses = ["Paris.", "It is Paris, on the Seine.", "Lyon.", "I do not know."]
    single = one_by_one(server.grpc_url, [(prompt, r) for r in responses])
    with RewardClient(server.grpc_url) as client:
        ranked = client.rank(prompt, responses)
        p = client.preference(prompt, responses[0], responses[2])
        tokenizer = AutoTokenizer.from_pretrained(str(demo_checkpoint))
        messages = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": r}]
                    for r in responses]
        ids = [list(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
               for m in messages]
        by_ids = client.score_ids(ids)
    order = sorted(range(4), key=lambda i: -single[i])
    assert [r.index for r in ranked] == order
    assert [r.score for r in ranked] == pytest.approx([single[i] for i in order], **TOL)
    assert p == pytest.approx(1 / (1 + math.exp(single[2] - single[0])), abs=1e-4)
    assert [r.score for r in by_ids] == pytest.approx(single, **TOL)
    assert [r.num_tokens for r in by_ids] == [len(row) for row in ids]


def test_attribute_names_come_from_the_model_config(qwen_server):
    with RewardClient(qwen_server.grpc_url) as client:
        results = client.score(make_conversations(3))
        assert client.attribute_names() == ("helpfulness", "correctness", "verbosity")
    assert list(results[0].attributes) == ["helpfulness", "correctness", "verbosity"]
    # score = (weights . attributes - mean) / std, per the fixture's settings
    attrs = results[1].attributes
    combined = 0.5 * attrs["helpfulness"] + attrs["correctness"] - 0.25 * attrs["verbosity"]
    assert results[1].score == pytest.approx((combined - 0.1) / 2.0, rel=1e-4, abs=1e-5)


# --------------------------------------------------------------------------- overload and retry


@pytest.fixture(scope="module")
def busy_server(demo_checkpoint):
    """A server whose engine queue holds a single request: concurrent load gets rejected."""
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.server import TritonServer

    with TritonServer(ServeOptions(checkpoint=demo_checkpoint, max_length=256,
                                   max_queue_size=1)) as srv:
        yield srv


class CountingTriton:
    """Wraps tritonclient's client to count the overload rejections the server sends."""

    def __init__(self, inner):
        self.inner = inner
        self.rejections = 0
        self._lock = threading.Lock()

    def _count(self, exc) -> None:
        if exc is not None and "queue size" in str(exc):
            with self._lock:
                self.rejections += 1

    def infer(self, *args, **kwargs):
        try:
            return self.inner.infer(*args, **kwargs)
        except Exception as exc:
            self._count(exc)
            raise

    def async_infer(self, model, inputs, callback, *args, **kwargs):
        def counted(result, error):
            self._count(error)
            callback(result, error)

        return self.inner.async_infer(model, inputs, counted, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_overload_is_retried_and_every_result_arrives_once(busy_server, reference):
    conversations, expected = reference
    conversations, expected = conversations[:160], expected[:160]
    # Patient enough to outlast the contention even on a loaded 2-core machine.
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.01, max_backoff_s=0.3, budget_min_retries=10**6)
    with RewardClient(busy_server.grpc_url, batch_size=2, max_in_flight=8,
                      retry=policy) as client:
        counter = CountingTriton(client._client)
        client._client = counter
        results = client.score(conversations)
    assert counter.rejections > 0, "the one-slot queue never rejected: the test proved nothing"
    assert [r.index for r in results] == list(range(160))
    assert [r.score for r in results] == pytest.approx(expected, **TOL)


def test_overload_without_retries_surfaces_unavailable(busy_server):
    with RewardClient(busy_server.grpc_url, batch_size=1, max_in_flight=16,
                      retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(RewardUnavailableError, match="queue size"):
            client.score(make_conversations(200))


# --------------------------------------------------------------------------- CLI


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_score_survives_a_kill_and_resumes(server, reference, tmp_path):
    conversations, expected = reference
    n = 1000
    records = [{"id": i, "prompt": conversations[i % 700][0], "response": conversations[i % 700][1]}
               for i in range(n)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    partial = Path(str(out) + PARTIAL_SUFFIX)
    write_jsonl(src, records)
    args = CLI + ["score", str(src), "-o", str(out), "--url", server.grpc_url,
                  "--batch-size", "6", "--concurrency", "1"]

    # A slice first, then a run killed without warning part-way.
    first = subprocess.run(args + ["--max-lines", "30", "--no-progress"], capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert partial.read_text().count("\n") == 30 and not out.exists()
    victim = subprocess.Popen(args + ["--no-progress"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while partial.stat().st_size < 30_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    killed_at = partial.read_text().count("\n")
    assert 30 < killed_at < n, "the run was not interrupted part-way"
    assert not out.exists()

    final = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert final.returncode == 0, final.stderr
    assert "it/s" in final.stderr or "conv/s" in final.stderr  # the progress bar ran
    assert not partial.exists()
    lines = read_jsonl(out)
    assert [line["id"] for line in lines] == list(range(n))  # nothing lost, nothing doubled
    for line, record in zip(lines, records):
        assert line["prompt"] == record["prompt"] and line["response"] == record["response"]
    assert [line["reward"]["score"] for line in lines] == pytest.approx(
        [expected[i % 700] for i in range(n)], **TOL)


def test_cli_eval_matches_hand_computed_accuracy(server, tmp_path):
    conversations = make_conversations(40, seed=3)
    subsets = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm", "hep-go"]
    pairs = []
    for k in range(20):
        prompt, chosen = conversations[2 * k]
        pairs.append({"id": k, "prompt": prompt, "chosen": chosen,
                      "rejected": conversations[2 * k + 1][1], "subset": subsets[k % 5]})
    src = tmp_path / "pairs.jsonl"
    write_jsonl(src, pairs)
    chosen = one_by_one(server.grpc_url, [(p["prompt"], p["chosen"]) for p in pairs])
    rejected = one_by_one(server.grpc_url, [(p["prompt"], p["rejected"]) for p in pairs])
    assert min(abs(c - r) for c, r in zip(chosen, rejected)) > 1e-4  # no near-ties to flip
    correct = [c > r for c, r in zip(chosen, rejected)]
    assert 0 < sum(correct) < 20, "a degenerate pair set would not test the accuracy"
    per_subset = {s: sum(correct[k] for k in range(20) if k % 5 == i) / 4
                  for i, s in enumerate(subsets)}
    expected_sections = {
        "Chat": 100 * per_subset["alpacaeval-easy"],
        "Chat Hard": 100 * per_subset["mt-bench-hard"],
        "Safety": 100 * per_subset["donotanswer"],
        "Reasoning": 100 * (984 * per_subset["math-prm"] + 164 * per_subset["hep-go"]) / 1148,
    }

    run = subprocess.run(CLI + ["eval", str(src), "--url", server.grpc_url, "--json",
                                "--batch-size", "6"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["num_pairs"] == 20
    assert report["accuracy"] == pytest.approx(sum(correct) / 20)
    assert {s: row["accuracy"] for s, row in report["subsets"].items()} == pytest.approx(per_subset)
    assert report["sections"] == pytest.approx(expected_sections)
    assert report["overall"] == pytest.approx(sum(expected_sections.values()) / 4)


def test_cli_health_and_models(server):
    health = subprocess.run(CLI + ["health", "--url", server.grpc_url], capture_output=True,
                            text=True, timeout=60)
    assert health.returncode == 0, health.stderr
    assert health.stdout.startswith("OK ") and health.stdout.count("\n") == 1
    models = subprocess.run(CLI + ["models", "--url", server.grpc_url], capture_output=True,
                            text=True, timeout=60)
    assert models.returncode == 0, models.stderr
    lines = models.stdout.splitlines()
    reward = [line for line in lines if line.startswith("reward ")]
    assert len(reward) == 1 and "READY" in reward[0] and "messages:BYTES" in reward[0]
    assert any(line.startswith("reward_ids ") for line in lines)
    down = subprocess.run(CLI + ["health", "--url", "127.0.0.1:9", "--timeout", "2"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and down.stdout.startswith("NOT READY")


# --------------------------------------------------------------------------- packaging


@pytest.fixture(scope="session")
def client_only_venv(tmp_path_factory):
    """A clean virtual environment with only the client package installed from PyPI deps.

    Built once per session (it downloads tritonclient[grpc] and numpy); set
    REWARD_CLIENT_VENV to reuse an existing environment.
    """
    reuse = os.environ.get("REWARD_CLIENT_VENV")
    if reuse:
        return Path(reuse)
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    source = tmp_path_factory.mktemp("client-src") / "client"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


def test_client_alone_in_a_fresh_venv_scores(server, client_only_venv, reference):
    conversations, expected = reference
    python = str(client_only_venv / "bin" / "python")
    code = (
        "import json, sys\n"
        "from reward_client import RewardClient\n"
        "heavy = [m for m in ('torch', 'transformers', 'tritonserver', 'reward_server')\n"
        "         if m in sys.modules]\n"
        "convs = json.loads(sys.argv[2])\n"
        "with RewardClient(sys.argv[1]) as c:\n"
        "    print(json.dumps({'heavy': heavy, 'scores': [r.score for r in c.score(convs)]}))\n"
    )
    convs = [{"prompt": p, "response": r} for p, r in conversations[:5]]
    run = subprocess.run([python, "-c", code, server.grpc_url, json.dumps(convs)],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["heavy"] == []
    assert payload["scores"] == pytest.approx(expected[:5], **TOL)
    for module in ("torch", "transformers", "reward_server"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, cwd="/")
        assert probe.returncode != 0, f"{module} should not be installed with the client"
    cli = subprocess.run([str(client_only_venv / "bin" / "reward-client"), "health", "--url",
                          server.grpc_url], capture_output=True, text=True, timeout=60, cwd="/")
    assert cli.returncode == 0 and cli.stdout.startswith("OK "), cli.stderr
