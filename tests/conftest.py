"""Shared fixtures: small checkpoints built here, and real tritonserver processes on them."""

from __future__ import annotations

import pytest

from reward_server.supervisor.demo_checkpoint import build_checkpoint
from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.server import TritonServer

QWEN_INDICES = "0,3,5"
QWEN_NAMES = "helpfulness,correctness,verbosity"
QWEN_WEIGHTS = "0.5,1.0,-0.25"
QWEN_MEAN, QWEN_STD = 0.1, 2.0
QWEN_MAX_LENGTH = 160


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """Tiny Llama sequence-classification checkpoint whose pad token is <|eot_id|> (as in many
    Llama-3 reward models), so the score is pooled one token before the end."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "tiny", pad_token="<|eot_id|>")


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory):
    """Tiny Qwen2 causal-LM checkpoint read through lm_logits (no BOS token, ChatML template)."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen", "tiny", arch="qwen2", head="lm_logits",
                            seed=1)


@pytest.fixture(scope="session")
def server(demo_checkpoint):
    """A real tritonserver on the Llama checkpoint (reject policy, max length 512)."""
    with TritonServer(ServeOptions(checkpoint=demo_checkpoint, max_length=512, token_budget=1024)) as srv:
        yield srv


@pytest.fixture(scope="session")
def qwen_server(qwen_checkpoint):
    """A real tritonserver on the Qwen2 checkpoint: three attributes, weights, normalisation,
    and the truncate_left policy."""
    options = ServeOptions(checkpoint=qwen_checkpoint, reward_indices=QWEN_INDICES, attribute_names=QWEN_NAMES,
                           attribute_weights=QWEN_WEIGHTS, score_mean=QWEN_MEAN, score_std=QWEN_STD,
                           max_length=QWEN_MAX_LENGTH, truncation="truncate_left")
    with TritonServer(options) as srv:
        yield srv


@pytest.fixture(scope="session")
def trtllm_server(demo_checkpoint, tmp_path_factory):
    """The same Llama checkpoint served through the TensorRT-LLM ensembles, with the contract double
    of the `tensorrt_llm` model (tests/trtllm_double) in a real tritonserver."""
    from tests.trtllm_double import engine_dir_for, repository_with_double

    root = tmp_path_factory.mktemp("trtllm-llama")
    options = ServeOptions(engine="tensorrt_llm", engine_dir=engine_dir_for(demo_checkpoint, root / "engine"),
                           model_repository=repository_with_double(root / "repository"), max_length=512)
    with TritonServer(options) as srv:
        yield srv


@pytest.fixture(scope="session")
def qwen_trtllm_server(qwen_checkpoint, tmp_path_factory):
    """The Qwen2 causal-LM checkpoint (logits 0,3,5 passed through) on the TensorRT-LLM ensembles,
    with the settings of `qwen_server`."""
    from tests.trtllm_double import engine_dir_for, repository_with_double

    root = tmp_path_factory.mktemp("trtllm-qwen")
    options = ServeOptions(engine="tensorrt_llm",
                           engine_dir=engine_dir_for(qwen_checkpoint, root / "engine", reward_indices=QWEN_INDICES),
                           model_repository=repository_with_double(root / "repository"), attribute_names=QWEN_NAMES,
                           attribute_weights=QWEN_WEIGHTS, score_mean=QWEN_MEAN, score_std=QWEN_STD,
                           max_length=QWEN_MAX_LENGTH, truncation="truncate_left")
    with TritonServer(options) as srv:
        yield srv


class GatewayProcess:
    """`reward-server gateway` as a real process on a free loopback port."""

    def __init__(self, grpc_url: str, *extra: str, env: dict | None = None):
        import os
        import subprocess
        import sys
        import tempfile
        import time
        import urllib.request

        from reward_server.supervisor.ports import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "reward_server.cli", "gateway", "--url", grpc_url,
                                         "--port", str(self.port), *extra],
                                        stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health/live", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the gateway did not start:\n{self.output()}")
                time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except Exception:  # noqa: BLE001
                self.process.kill()
        return self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self.log.close()


@pytest.fixture(scope="session")
def gateway(server):
    """The HTTP gateway in front of the Llama server."""
    with GatewayProcess(server.grpc_url) as gw:
        yield gw
