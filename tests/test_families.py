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
from tests.test_server import score_grpc

PROMPT = [{"role": "system", "content": "Grade the answer. " * 12},
          {"role": "user", "content": "Could you explain how rainbows form? Please be concise."}]
CONVERSATIONS = make_conversations(10, seed=21) + [
    PROMPT + [{"role": "assistant", "content": answer}]
    for answer in ("Sunlight refracts in droplets.", "No.", "The derivative of x^2 is 2x. " * 5)]


def _reference(checkpoint, conversations) -> np.ndarray:
    """transformers' eager forward, one conversation at a time, ids from the tokenizer's own template."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    rows = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            rows.append(model(torch.tensor([ids])).logits[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "gemma2", "gemma3"])
def test_each_family_is_served_exactly(tmp_path_factory, arch):
    checkpoint = build_checkpoint(tmp_path_factory.mktemp(arch) / "ckpt", "tiny", arch=arch, num_labels=2, seed=8)
    config = json.loads((checkpoint / "config.json").read_text())
    with TritonServer(ServeOptions(checkpoint=checkpoint, max_length=1024)) as server:
        got = score_grpc(server.grpc_url, CONVERSATIONS)
    lengths = got["num_tokens"].reshape(-1)
    if config.get("sliding_window"):
        assert (lengths > 2 * config["sliding_window"]).sum() >= 5  # the window really bounds attention here
    np.testing.assert_allclose(got["attributes"], _reference(checkpoint, CONVERSATIONS), rtol=1e-4, atol=1e-5)
