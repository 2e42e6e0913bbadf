"""The supported-models table (docs/models.md), row by row: a small random checkpoint of each family
served by a real tritonserver, its scores over gRPC within 1e-4 of transformers' eager forward of
each conversation alone. Llama and Qwen2 are served throughout tests/test_server.py; here are the
families whose attention differs: Qwen3 (per-head q/k norms), Mistral (a sliding window over every
layer), Gemma-2 (sliding and global layers, attention logit softcapping, its query scaling) and
Gemma-3 (window pattern, q/k norms). The demo's window is 32 tokens, so most conversations here
are several windows long, and a group sharing a prompt longer than a window is sent with them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from reward_server.supervisor.demo_checkpoint import build_checkpoint
from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.server import TritonServer
from tests.conversations import make_conversations
from tests.reference import eager_rewards
from tests.test_server import score_grpc

PROMPT = [{"role": "system", "content": "Grade the answer. " * 12},
          {"role": "user", "content": "Could you explain how rainbows form? Please be concise."}]
CONVERSATIONS = make_conversations(10, seed=21) + [
    PROMPT + [{"role": "assistant", "content": answer}]
    for answer in ("Sunlight refracts in droplets.", "No.", "The derivative of x^2 is 2x. " * 5)]


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "gemma2", "gemma3"])
def test_each_family_is_served_exactly(tmp_path_factory, arch):
    checkpoint = build_checkpoint(tmp_path_factory.mktemp(arch) / "ckpt", "tiny", arch=arch, num_labels=2, seed=8)
    config = json.loads((checkpoint / "config.json").read_text())
    with TritonServer(ServeOptions(checkpoint=checkpoint, max_length=1024)) as server:
        got = score_grpc(server.grpc_url, CONVERSATIONS)
    lengths = got["num_tokens"].reshape(-1)
    if config.get("sliding_window"):
        assert (lengths > 2 * config["sliding_window"]).sum() >= 5  # the window really bounds attention here
    np.testing.assert_allclose(got["attributes"], eager_rewards(checkpoint, CONVERSATIONS), rtol=1e-4, atol=1e-5)
