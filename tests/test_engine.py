"""The PyTorch engine and the preprocessing stage in-process, against the transformers reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reward_server.pipeline import stages
from reward_server.pipeline.chat import ChatEncoder
from reward_server.pipeline.torch_engine.engine import RewardEngine
from reward_server.supervisor.demo_checkpoint import build_checkpoint
from tests.conversations import make_conversations
from tests.reference import reference_ids, reference_rewards

CONVERSATIONS = make_conversations(20, seed=3)


@pytest.fixture(scope="module", params=[("llama", "lm_logits"), ("qwen2", "sequence_classification")])
def other_checkpoint(request, tmp_path_factory):
    arch, head = request.param
    return build_checkpoint(tmp_path_factory.mktemp(arch) / "ckpt", "tiny", arch=arch, head=head, num_labels=2,
                            seed=7)


def _check_engine(checkpoint, indices=None, ref_indices=(0,)):
    encoder = ChatEncoder.from_checkpoint(checkpoint)
    ids = [e.token_ids for e in encoder.encode_batch(CONVERSATIONS)]
    assert ids == [reference_ids(checkpoint, c) for c in CONVERSATIONS]
    expected = reference_rewards(checkpoint, CONVERSATIONS, ref_indices)
    # alone, small micro-batches, everything in one; the native attention kernel, then torch's
    for budget, attention in ((1, "native"), (200, "native"), (100_000, "native"), (200, "sdpa")):
        engine = RewardEngine.from_checkpoint(checkpoint, reward_indices=indices, token_budget=budget,
                                              attention=attention)
        got = engine.score(ids)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    return engine


def test_llama_classifier_matches_reference_with_pad_equal_eot(demo_checkpoint):
    engine = _check_engine(demo_checkpoint)
    # pad == <|eot_id|> ends the template, so the head reads one token before the end
    computed = engine.stats.tokens + engine.stats.shared_tokens
    assert computed == sum(len(reference_ids(demo_checkpoint, c)) - 1 for c in CONVERSATIONS)


def test_qwen_lm_logits_matches_reference(qwen_checkpoint):
    _check_engine(qwen_checkpoint, indices="0,3,5", ref_indices=(0, 3, 5))


def test_other_architecture_and_head_pairs(other_checkpoint):
    config = json.loads((other_checkpoint / "config.json").read_text())
    causal = config["architectures"][0].endswith("ForCausalLM")
    _check_engine(other_checkpoint, indices="2,9" if causal else None, ref_indices=(2, 9) if causal else (0, 1))


def test_engine_rejects_bad_index(qwen_checkpoint):
    with pytest.raises(ValueError, match="outside the LM head's vocabulary"):
        RewardEngine.from_checkpoint(qwen_checkpoint, reward_indices="10000000")


def test_text_entry_tokenises_as_given_with_one_bos(demo_checkpoint):
    """Templated text (OpenRLHF keeps the BOS, verl strips it, a careless caller doubles it) gives
    exactly the ids of the chat template path; bad texts fail alone, naming the problem."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_checkpoint))
    encoder = ChatEncoder.from_checkpoint(demo_checkpoint, max_length=256)
    bos = tokenizer.bos_token
    templated = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS[:3]]
    assert all(t.startswith(bos) for t in templated)
    texts = [templated[0], templated[1][len(bos):], bos + templated[2]]
    rows = np.array([[t.encode()] for t in texts], dtype=object)
    bad = np.array([[templated[0].encode()], ["two\0three".encode()]], dtype=object)
    results = stages.preprocess(encoder, [stages.PreprocessInput(text=rows), stages.PreprocessInput(text=bad),
                                          stages.PreprocessInput(text=np.array([[b""]], dtype=object)),
                                          stages.PreprocessInput()])
    lengths = results[0]["input_lengths"].ravel().tolist()
    for row, conversation in enumerate(CONVERSATIONS[:3]):
        assert results[0]["input_ids"][row, :lengths[row]].tolist() == reference_ids(demo_checkpoint, conversation)
    assert results[1] == "conversation 1: text contains a NUL character (\\u0000)"
    assert results[2] == "conversation 0: text is empty"
    assert results[3] == "the request must carry exactly one of messages, text or input_ids"
    long = tokenizer.apply_chat_template([{"role": "user", "content": "word " * 400},
                                          {"role": "assistant", "content": "ok"}], tokenize=False)
    [too_long] = encoder.encode_texts([long])
    assert "over the maximum length of 256" in str(too_long)


def test_preprocess_batches_requests_and_isolates_errors(demo_checkpoint):
    encoder = ChatEncoder.from_checkpoint(demo_checkpoint, max_length=256)
    good = np.array([[json.dumps(c).encode()] for c in CONVERSATIONS[:3]], dtype=object)
    bad = np.array([[json.dumps(CONVERSATIONS[3]).encode()], [b'[{"role": "user", "content": "x"}]']], dtype=object)
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], dtype=np.int32)
    results = stages.preprocess(encoder, [
        stages.PreprocessInput(messages=good), stages.PreprocessInput(messages=bad),
        stages.PreprocessInput(token_ids=ids, token_lengths=np.array([[3], [2]], dtype=np.int32)),
        stages.PreprocessInput(token_ids=np.array([[1, 99999]], dtype=np.int32)),
    ])
    assert isinstance(results[1], stages.RequestError)
    assert results[1].startswith("conversation 1: the last message (message 0) must be the assistant")
    assert results[3] == "conversation 0: input_ids holds 99999, outside the vocabulary [0, 2048)"
    first = results[0]
    lengths = first["input_lengths"].ravel().tolist()
    assert lengths == [len(reference_ids(demo_checkpoint, c)) for c in CONVERSATIONS[:3]]
    assert first["input_ids"][0, : lengths[0]].tolist() == reference_ids(demo_checkpoint, CONVERSATIONS[0])
    assert results[2]["input_lengths"].ravel().tolist() == [3, 2]
    assert results[2]["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]


def _grpo_like_conversations():
    """Groups sharing a prompt; a partial overlap (same system, other user); responses sharing a
    long opening so the common prefix ends mid-message; and unshared conversations."""
    system = {"role": "system", "content": "You are a careful assistant. Answer in full sentences. " * 3}
    out = []
    for p, prompt in enumerate(["Why is the sky blue?", "Explain Bayes' rule.", "Grüße! Was ist 2+2?"]):
        for r in range(6):
            opening = "Let me think about this step by step, carefully. " * 2 if r % 2 else ""
            out.append([system, {"role": "user", "content": prompt},
                        {"role": "assistant", "content": opening + f"Answer {r}: " + "blah " * (r * 7 % 11)}])
    out.append([system, {"role": "user", "content": "Unrelated question?"}, {"role": "assistant", "content": "Yes."}])
    return out + make_conversations(4, seed=9)


@pytest.mark.parametrize("budget", [64, 8192])
def test_shared_prefixes_are_computed_once_and_scores_stay_exact(demo_checkpoint, qwen_checkpoint, budget):
    conversations = _grpo_like_conversations()
    for checkpoint, indices in ((demo_checkpoint, None), (qwen_checkpoint, (0, 3, 5))):
        encoder = ChatEncoder.from_checkpoint(checkpoint)
        ids = [e.token_ids for e in encoder.encode_batch(conversations)]
        expected = reference_rewards(checkpoint, conversations, indices or (0,))
        shared = RewardEngine.from_checkpoint(checkpoint, reward_indices=indices, token_budget=budget, min_shared=8)
        alone = RewardEngine.from_checkpoint(checkpoint, reward_indices=indices, token_budget=budget, min_shared=0)
        got_shared, got_alone = shared.score(ids), alone.score(ids)
        np.testing.assert_allclose(got_shared, expected, rtol=1e-4, atol=1e-6)
        # the native kernel reads a shared prompt's keys in the order it reads a lone conversation's
        assert shared.kernel is not None and got_shared.tobytes() == got_alone.tobytes()
        assert alone.stats.shared_tokens == 0
        # at least the three prompts' prefixes were computed once per group, not six times
        assert shared.stats.shared_tokens > 3 * 5 * 20
        assert shared.stats.tokens + shared.stats.shared_tokens == alone.stats.tokens
        if budget == 8192:  # everything fits one row: the prompts are segments of it, no pass of their own
            assert shared.stats.microbatches == alone.stats.microbatches == 1


def test_dtype_resolution(monkeypatch):
    from reward_server.pipeline.torch_engine import engine as engine_module
    from reward_server.pipeline.torch_engine.engine import resolve_dtype

    monkeypatch.setattr(engine_module, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", "cuda", "float32") == "bfloat16"
    assert resolve_dtype("auto", "cpu", "bfloat16") == "float32"  # emulated bf16 would be far slower
    with pytest.raises(ValueError, match="emulated"):
        resolve_dtype("bfloat16", "cpu", "bfloat16")
    monkeypatch.setattr(engine_module, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu", "bfloat16") == "bfloat16"
    assert resolve_dtype("auto", "cpu", "float32") == "float32"
    assert resolve_dtype("float32", "cpu", "bfloat16") == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "cpu", None)


def test_compiled_engine_matches_reference_without_recompiling(demo_checkpoint):
    """torch.compile of the decoder layers (dynamic shapes, attention eager): same scores, and
    new row lengths and shared prefixes after the warm-up compile nothing new."""
    import torch._dynamo.utils as dynamo_utils

    engine = RewardEngine.from_checkpoint(demo_checkpoint, token_budget=300, compile=True)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    encoder = ChatEncoder.from_checkpoint(demo_checkpoint)
    prompt = [{"role": "user", "content": "Name three prime numbers, and explain why each one is prime, briefly."}]
    group = [prompt + [{"role": "assistant", "content": f"{a}, {a + 2} and {a + 4}."}] for a in (3, 5, 11)]
    conversations = CONVERSATIONS + group
    ids = [e.token_ids for e in encoder.encode_batch(conversations)]
    np.testing.assert_allclose(engine.score(ids), reference_rewards(demo_checkpoint, conversations), rtol=1e-4,
                               atol=1e-6)
    assert engine.stats.shared_tokens > 0
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs


def test_bf16_engine_matches_the_bf16_reference(demo_checkpoint, monkeypatch):
    """bf16 (as on CUDA and bf16-capable CPUs; emulated here, fine for the tiny model): the engine
    is as close to the fp32 truth as transformers run in bf16 one conversation at a time, and
    within two bf16 steps of it. Not closer than that: the attention kernels differ (the engine's
    keeps the probabilities' sum in fp32 and reduces in another order), and a bf16 score is
    itself rounded to 8 bits (about 0.008 near 1), so the two need not share the last bit."""
    import torch
    import transformers

    from reward_server.pipeline.torch_engine import engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_has_fast_bf16", lambda: True)
    ids = [e.token_ids for e in ChatEncoder.from_checkpoint(demo_checkpoint).encode_batch(CONVERSATIONS)]
    engine = RewardEngine.from_checkpoint(demo_checkpoint, dtype="bfloat16", token_budget=200)
    got = engine.score(ids)[:, 0]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(demo_checkpoint,
                                                                            dtype=torch.bfloat16).eval()
    with torch.no_grad():
        reference = np.array([model(torch.tensor([i])).logits[0, 0].float().item() for i in ids])
    fp32 = reference_rewards(demo_checkpoint, CONVERSATIONS)[:, 0]
    step = 2.0 ** (np.floor(np.log2(np.abs(reference).max())) - 7)  # bf16 spacing at the largest score
    assert np.abs(got - reference).max() <= 2 * step
    bf16_error = np.abs(reference - fp32).mean()
    assert np.abs(got - fp32).mean() <= 1.25 * bf16_error
    assert np.abs(got - fp32).mean() > 0.25 * bf16_error  # it did run in bf16 (fp32 would be ~1e-7 off)


def test_suffixes_after_a_shared_prompt_attend_in_bounded_chunks(demo_checkpoint, monkeypatch):
    """SDPA path (CUDA, or a CPU without the native kernel): each call of a suffix continuing a
    shared prompt covers at most QUERY_CHUNK queries (its mask stays queries x keys small for long
    conversations), with the same scores. (The native kernel never builds a mask.)"""
    import torch.nn.functional as F

    from reward_server.pipeline.torch_engine import attention as attention_module

    monkeypatch.setattr(attention_module, "QUERY_CHUNK", 8)
    shapes = []
    real_sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        if attn_mask is not None:
            shapes.append((q.shape[2], tuple(attn_mask.shape)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    prompt = [{"role": "user", "content": "Name three prime numbers, and explain why each one is prime, briefly."}]
    group = [prompt + [{"role": "assistant", "content": f"{a}, {a + 2} and {a + 4} are prime: no divisor but "
                                                        f"one and themselves."}] for a in (3, 5, 11)]
    ids = [e.token_ids for e in ChatEncoder.from_checkpoint(demo_checkpoint).encode_batch(group)]
    engine = RewardEngine.from_checkpoint(demo_checkpoint, min_shared=16, attention="sdpa")
    np.testing.assert_allclose(engine.score(ids), reference_rewards(demo_checkpoint, group), rtol=1e-4, atol=1e-6)
    assert engine.stats.shared_tokens > 0 and shapes
    assert max(queries for queries, _ in shapes) == 8 and len({mask for _, mask in shapes}) > 1
    assert all(mask[0] == queries for queries, mask in shapes)


def test_long_conversations_match_the_reference_alone_and_through_a_shared_prompt(tmp_path):
    """Longer than the token budget (each scored in one piece in a row of its own), a 4,500-token
    shared prompt: within 1e-4 of transformers, and the members' bits equal to them scored alone."""
    from tests.reference import reference_rewards_from_ids

    checkpoint = build_checkpoint(tmp_path / "long", "tiny", max_positions=8192, seed=4)
    rng = np.random.default_rng(4)
    prompt = rng.integers(300, 2000, 4500).tolist()
    group = [prompt + rng.integers(300, 2000, n).tolist() for n in (700, 90)]
    lone = rng.integers(300, 2000, 6000).tolist()
    engine = RewardEngine.from_checkpoint(checkpoint, min_shared=32)  # the default budget: 4,096
    got = engine.score(group + [lone])
    expected = np.stack([reference_rewards_from_ids(checkpoint, ids) for ids in group + [lone]])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert engine.stats.shared_tokens == len(prompt)
    alone = np.concatenate([engine.score([ids]) for ids in group])
    assert got[:2].tobytes() == alone.tobytes()


@pytest.mark.parametrize("arch,head", [("mistral", "sequence_classification"), ("gemma2", "sequence_classification"),
                                       ("gemma2", "lm_logits"), ("gemma3", "sequence_classification")])
def test_sliding_windows_and_softcapping_are_computed_past_the_window(tmp_path, arch, head):
    """Mistral's window over every layer; Gemma-2's sliding and global layers, attention logit and
    final-logit softcapping and its query scaling; Gemma-3's window pattern: conversations several
    windows long (the demo's window: 32 tokens), alone, packed and continuing a shared prompt, within
    1e-4 of transformers' eager forward, with both attention paths. The members of a group get the
    bits they get alone (native kernel)."""
    import torch
    import transformers

    from tests.reference import reference_rewards_from_ids

    out = build_checkpoint(tmp_path / arch, "tiny", arch=arch, head=head, seed=6)
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 32
    rng = np.random.default_rng(6)
    prompt = rng.integers(300, 1500, 70).tolist()
    rows = [rng.integers(300, 1500, n).tolist() for n in (20, 33, 130)] + [prompt + rng.integers(300, 1500, n).tolist()
                                                                          for n in (5, 40, 90)]
    indices = "0,7" if head == "lm_logits" else None
    if head == "lm_logits":
        model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        with torch.no_grad():
            expected = np.stack([model(torch.tensor([r])).logits[0, -1, [0, 7]].numpy() for r in rows])
        assert np.abs(expected).max() < 30  # read after final-logit softcapping (cap 30), as the model returns them
    else:
        expected = np.stack([reference_rewards_from_ids(out, r) for r in rows])
    for attention, budget in (("native", 100_000), ("native", 1), ("sdpa", 100_000)):
        engine = RewardEngine.from_checkpoint(out, attention=attention, token_budget=budget, min_shared=16,
                                              reward_indices=indices)
        got = engine.score(rows)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=f"{attention}, budget {budget}")
        assert engine.stats.shared_tokens == 2 * len(prompt)
        if attention == "native":
            alone = np.concatenate([engine.score([r]) for r in rows[3:]])
            assert got[3:].tobytes() == alone.tobytes()


def test_attention_options_the_engine_does_not_compute_are_refused_at_load(tmp_path):
    """gpt-oss passes its attention sinks to the attention function: the engine refuses the checkpoint
    at load, naming them, rather than scoring without them."""
    import torch
    import transformers

    demo = build_checkpoint(tmp_path / "demo", "tiny", seed=7)
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo)
    config = transformers.GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=32,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, architectures=["GptOssForSequenceClassification"])
    torch.manual_seed(7)
    out = tmp_path / "gpt-oss"
    transformers.GptOssForSequenceClassification(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    with pytest.raises(ValueError, match=r"GptOssAttention asks for attention sinks \(s_aux=a tensor of shape \[4\]\)"):
        RewardEngine.from_checkpoint(out, attention="sdpa")


def test_every_attention_keyword_is_computed_harmless_or_refused():
    """Each keyword a transformers attention module passes: computed (windows, softcapping), carrying
    nothing the packed row needs, off (None, False; `is_causal` True), or refused by name."""
    from types import SimpleNamespace

    from reward_server.pipeline.torch_engine.attention import _check_keywords

    module = SimpleNamespace()
    _check_keywords(module, {"sliding_window": 4, "softcap": 50.0, "position_ids": [0], "is_causal": True,
                             "use_cache": False, "some_new_flag": False, "other": None})
    for keywords, what in (({"is_causal": False}, "non-causal attention"), ({"sinks": 1.0}, "attention sinks"),
                           ({"some_new_option": 3}, r"an attention option \(some_new_option=3\)")):
        with pytest.raises(ValueError, match=what):
            _check_keywords(module, keywords)


def test_a_multimodal_gemma3_classifier_is_scored_on_its_text(tmp_path):
    """Gemma3ForSequenceClassification wraps the text model with a vision tower (its decoder layers
    under `language_model`): conversations, text only, score as transformers scores them."""
    import torch
    import transformers

    text = build_checkpoint(tmp_path / "text", "tiny", arch="gemma3", num_labels=2, seed=3)
    text_config = transformers.AutoConfig.from_pretrained(text)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    vocab = text_config.vocab_size
    config = transformers.Gemma3Config(text_config=text_config.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, num_labels=2, boi_token_index=vocab - 3,
                                       eoi_token_index=vocab - 2, image_token_index=vocab - 1)
    torch.manual_seed(0)
    model = transformers.Gemma3ForSequenceClassification(config).eval()
    model.config.pad_token_id = text_config.pad_token_id
    out = tmp_path / "multimodal"
    model.save_pretrained(out)
    rng = np.random.default_rng(0)
    rows = [rng.integers(300, 1500, n).tolist() for n in (20, 70, 130)]
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = np.stack([reference(input_ids=torch.tensor([r])).logits[0].numpy() for r in rows])
    engine = RewardEngine.from_checkpoint(out)
    np.testing.assert_allclose(engine.score(rows), expected, rtol=1e-4, atol=1e-5)
