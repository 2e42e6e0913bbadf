"""The `reward-server` command as a user runs it: demo checkpoint, serve (with its gateway), graceful stop."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from reward_server.supervisor.ports import free_ports
from tests.conversations import make_conversations

CLI = [sys.executable, "-m", "reward_server.cli"]


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_demo_checkpoint_is_deterministic(tmp_path):
    for name in ("a", "b"):
        subprocess.run([*CLI, "demo-checkpoint", str(tmp_path / name), "--size", "tiny"], check=True,
                       capture_output=True, timeout=120)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(_digest(tmp_path / "a"))
    subprocess.run([*CLI, "demo-checkpoint", str(tmp_path / "c"), "--size", "tiny", "--seed", "1"], check=True,
                   capture_output=True, timeout=120)
    assert _digest(tmp_path / "c")["model.safetensors"] != _digest(tmp_path / "a")["model.safetensors"]


def _gateway_reward(port: int, deadline: float) -> int:
    """Status of an OpenRLHF request to the gateway, retried until it listens or `deadline` passes."""
    body = json.dumps({"query": ["<|begin_of_text|>Hi<|eot_id|>"]}).encode()
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/get_reward", data=body),
                                        timeout=30) as reply:
                return reply.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_serve_prints_endpoints_scores_and_stops_gracefully(demo_checkpoint, tmp_path):
    ports = free_ports(4)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([*CLI, "serve", "--checkpoint", str(demo_checkpoint), "--grpc-port", str(ports[0]),
                             "--http-port", str(ports[1]), "--metrics-port", str(ports[2]),
                             "--gateway-port", str(ports[3])],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops the server" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server not ready in time"
            time.sleep(0.5)
        banner = (tmp_path / "serve.log").read_text()
        assert f"gRPC     127.0.0.1:{ports[0]}" in banner and f"http://127.0.0.1:{ports[1]}" in banner
        # A GPU build of tritonserver on a machine without a GPU: none of its CUDA start-up errors on
        # the console, one line of ours instead (the server's log keeps them).
        from reward_server.supervisor.trtllm_engine import gpu_count

        if gpu_count() == 0:
            for noise in ("CudaDriverHelper", "unable to create stream", "pinned system memory", "CUDA driver", "NVML", "DCGM"):
                assert noise not in banner, noise
            assert banner.count("reward-server: no GPU here, so tritonserver's CUDA start-up errors") == 1
        assert "curl -s" in banner and "/v2/models/reward/infer" in banner
        assert f"gateway  http://127.0.0.1:{ports[3]}" in banner
        assert _gateway_reward(ports[3], deadline) == 200  # the gateway started beside it answers

        # A large request in flight when SIGTERM arrives still gets its answer.
        conversations = make_conversations(200, seed=4)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[1]}", network_timeout=120)
        data = np.array([[json.dumps(c).encode()] for c in conversations], dtype=object)
        tensor = httpclient.InferInput("messages", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        box = {}
        worker = threading.Thread(target=lambda: box.setdefault("r", client.infer("reward", [tensor])))
        worker.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        worker.join(120)
        client.close()  # tritonserver waits (up to its exit timeout) for open HTTP connections
        assert box["r"].as_numpy("score").shape == (200, 1)
        assert proc.wait(90) == 0
        assert "stopping: waiting for in-flight requests" in (tmp_path / "serve.log").read_text()
        with pytest.raises(OSError):  # the gateway stopped with the server
            _gateway_reward(ports[3], time.monotonic())
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_serve_reports_a_bad_checkpoint(tmp_path):
    result = subprocess.run([*CLI, "serve", "--checkpoint", str(tmp_path), "--grpc-port", "0", "--http-port", "0",
                             "--metrics-port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "is not a Hugging Face checkpoint (no config.json)" in result.stderr


def test_serve_says_why_a_checkpoint_cannot_load_in_one_line_before_starting(demo_checkpoint, tmp_path):
    """What can be told without loading (no weights, a missing shard, no tokenizer, a model type
    transformers lacks) is said at once, in one line, with no tritonserver log."""
    import shutil

    cases = {"no weights in": lambda c: (c / "model.safetensors").unlink(),
             "lists model-00002-of-00002.safetensors, which is missing": lambda c: (
                 (c / "model.safetensors").rename(c / "model-00001-of-00002.safetensors"),
                 (c / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                     "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))),
             "no tokenizer in": lambda c: [(c / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
             "model_type 'acme' of AcmeForSequenceClassification is not one transformers": lambda c: (
                 c / "config.json").write_text(json.dumps(json.loads((c / "config.json").read_text())
                                                          | {"model_type": "acme",
                                                             "architectures": ["AcmeForSequenceClassification"]}))}
    for i, (reason, damage) in enumerate(cases.items()):
        checkpoint = tmp_path / f"ckpt{i}"
        shutil.copytree(demo_checkpoint, checkpoint)
        damage(checkpoint)
        result = subprocess.run([*CLI, "serve", "--checkpoint", str(checkpoint), "--grpc-port", "0",
                                 "--http-port", "0", "--metrics-port", "0"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "cannot serve:" in lines[0] and reason in lines[0], result.stderr


def test_serve_refuses_a_forced_kernel_build_in_one_line(tmp_path):
    result = subprocess.run([*CLI, "serve", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, REWARD_SERVER_KERNELS="sse"))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "cannot serve: REWARD_SERVER_KERNELS=sse: no such kernel build; use one of auto, amx, avx512_bf16, avx512, avx2" \
        in lines[-1], result.stderr


def test_serve_ends_with_the_reason_a_model_failed_to_load(demo_checkpoint, tmp_path):
    """A checkpoint that fails only when loaded inside Triton (its weights file cut short): the log
    tail first, the reason as the last line."""
    import shutil

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint, checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    result = subprocess.run([*CLI, "serve", "--checkpoint", str(checkpoint), "--grpc-port", "0", "--http-port", "0",
                             "--metrics-port", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert "cannot serve: tritonserver exited with code 1; model 'reward_engine' failed to load:" in last, last
    assert "safetensors" in last.lower() or "deserializ" in last.lower(), last
