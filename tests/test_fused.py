"""The fused decoder layers (reward_server/pipeline/torch_engine/fused.py) against transformers' own forward, per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from reward_server.pipeline.torch_engine.engine import RewardEngine
from reward_server.pipeline.torch_engine.fused import FusedDecoderLayer, fusable, fuse_layers, rms_norm

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForSequenceClassification, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification, {}),  # q/k/v biases
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForSequenceClassification, {"head_dim": 32}),  # q/k norms
    "mistral": (transformers.MistralConfig, transformers.MistralForSequenceClassification, {"sliding_window": None}),
    # windows shorter than most sequences here: the fused layers must pass each layer's on
    "mistral-window": (transformers.MistralConfig, transformers.MistralForSequenceClassification,
                       {"sliding_window": 24}),
    "qwen2-window": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification,
                     {"use_sliding_window": True, "sliding_window": 24,
                      "layer_types": ["sliding_attention", "full_attention"]}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    config_cls, model_cls, extra = FAMILIES[request.param]
    torch.manual_seed(3)
    model = model_cls(config_cls(**TINY, **extra, num_labels=2)).eval()
    with torch.no_grad():  # biases and norm weights away from their init, so a missed one shows
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    model.save_pretrained(path)
    return request.param, path, model


def test_fused_layers_score_as_transformers_does(family_checkpoint):
    family, path, model = family_checkpoint
    engine = RewardEngine.from_checkpoint(path, device="cpu", token_budget=256, min_shared=0)
    assert all(isinstance(layer, FusedDecoderLayer) for layer in engine.backbone.layers), family
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 300, n).tolist() for n in (5, 40, 130, 17)]
    with torch.no_grad():
        expected = np.stack([model(torch.tensor([seq])).logits[0].numpy() for seq in ids])
    np.testing.assert_allclose(engine.score(ids), expected, rtol=1e-4, atol=1e-5)
    # and with a shared prefix (the suffixes attend to recorded prefix keys and values)
    prefix = rng.integers(1, 300, 70).tolist()
    group = [prefix + rng.integers(1, 300, n).tolist() for n in (3, 25)]
    shared = RewardEngine.from_checkpoint(path, device="cpu", token_budget=256, min_shared=16)
    with torch.no_grad():
        expected = np.stack([model(torch.tensor([seq])).logits[0].numpy() for seq in group])
    np.testing.assert_allclose(shared.score(group), expected, rtol=1e-4, atol=1e-5)
    assert shared.stats.shared_tokens == 70


@pytest.mark.parametrize("prepack", [False, True])
def test_prepacked_and_plain_products_agree(family_checkpoint, prepack):
    from reward_server.pipeline.torch_engine.fused import prepack_available

    _, path, _ = family_checkpoint
    if prepack and not prepack_available(torch.device("cpu"), torch.float32):
        pytest.skip("torch without oneDNN prepacking")
    engine = RewardEngine.from_checkpoint(path, device="cpu", fused=False)
    ids = [[5, 9, 33, 120, 7, 250], [1, 2, 3]]
    plain = engine.score(ids)
    report = fuse_layers(engine.backbone, _attention(), engine.device,
                         torch.float32, prepack=prepack)
    assert report.fused == 2 and report.prepacked == prepack
    np.testing.assert_allclose(engine.score(ids), plain, rtol=1e-5, atol=1e-6)


def _attention():
    from reward_server.pipeline.torch_engine.attention import register_attention

    return register_attention()


def test_layers_it_cannot_reproduce_keep_their_own_forward():
    config = transformers.Gemma2Config(**{**TINY, "head_dim": 16})
    layer = transformers.Gemma2ForSequenceClassification(config).model.layers[0]
    assert "Gemma2DecoderLayer is not one of the fused families" in fusable(layer)
    llama = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**TINY, hidden_act="gelu"))
    assert "activation" in fusable(llama.model.layers[0])
    backbone = llama.model
    report = fuse_layers(backbone, _attention(), torch.device("cpu"), torch.float32, prepack=False)
    assert report.fused == 0 and "activation" in report.reason
    assert type(backbone.layers[0]).__name__ == "LlamaDecoderLayer"


def test_rms_norm_is_transformers_rms_norm():
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.add_(torch.randn(64))
    x = torch.randn(3, 7, 64)
    assert torch.equal(rms_norm(x, norm.weight.detach(), 1e-5), norm(x).detach())
    xb = x.bfloat16()
    assert torch.equal(rms_norm(xb, norm.weight.detach().bfloat16(), 1e-5), norm.bfloat16()(xb).detach())


@pytest.mark.parametrize("cache_mb", [0, 64], ids=["no-cache", "prefix-cache"])
def test_the_last_layer_computes_only_the_rows_that_are_read(family_checkpoint, monkeypatch, cache_mb):
    """The last layer's attention output, o projection and MLP are computed for the read rows only (one
    per conversation here), with every row's keys still recorded; the scores keep their bits (the same
    as with every row computed), sliding windows and shared prompts included."""
    from reward_server.pipeline.torch_engine import fused

    family, path, _ = family_checkpoint
    engine = RewardEngine.from_checkpoint(path, device="cpu", token_budget=512, min_shared=16, prefix_cache_mb=cache_mb)
    if engine.kernel is None:
        pytest.skip("no native kernel build runs here: every row goes through every layer")
    rows_seen = []
    for layer in (engine.backbone.layers[0], engine.backbone.layers[-1]):
        product = layer.down
        layer.down = lambda x, product=product: (rows_seen.append(x.shape[0]), product(x))[1]
    rng = np.random.default_rng(4)
    prefix = rng.integers(1, 300, 40).tolist()
    ids = [prefix + rng.integers(1, 300, n).tolist() for n in (3, 25)] + [rng.integers(1, 300, n).tolist()
                                                                          for n in (5, 60, 130)]
    scores = engine.score(ids)
    assert rows_seen == [40 + 3 + 25 + 5 + 60 + 130, len(ids)], family
    later = engine.score([seq + [7, 8, 9] for seq in ids])  # through the cache, when it is on
    monkeypatch.setattr(fused, "read_rows", lambda: None)
    every_row = RewardEngine.from_checkpoint(path, device="cpu", token_budget=512, min_shared=16,
                                             prefix_cache_mb=cache_mb)
    assert every_row.score(ids).tobytes() == scores.tobytes()
    assert every_row.score([seq + [7, 8, 9] for seq in ids]).tobytes() == later.tobytes()
