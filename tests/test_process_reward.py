"""Process reward models in the engine (issue 19, first part): label logits at every step tag,
for the three layouts of reward_server/heads.py, against a plain transformers forward pass.

The checkpoints are random-weight ones built here: a Qwen2 backbone with the two-layer head of
Qwen2.5-Math-PRM's remote code written under `score.0` / `score.2` (loaded without running that
code), a `*ForTokenClassification` with two labels, and a Llama causal LM read at two label tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from reward_server.demo_checkpoint import build_checkpoint
from reward_server.engine import RewardEngine
from reward_server.scoring import step_scores

RNG = np.random.default_rng(19)
TAG = 7  # the step tag's id in the token-classification and causal-LM checkpoints


def _steps(prompt, steps, tag):
    ids = list(prompt)
    for step in steps:
        ids += list(step) + [tag]
    return ids


def _sequences(tag):
    """A best-of-n group (one prompt, responses sharing their first step), and a lone one."""
    prompt = RNG.integers(300, 1500, 60).tolist()
    first = RNG.integers(300, 1500, 25).tolist()
    group = [_steps(prompt, [first] + [RNG.integers(300, 1500, int(n)).tolist() for n in lengths], tag)
             for lengths in ((12, 30), (5,), (40, 3, 9))]
    lone = _steps(RNG.integers(300, 1500, 33).tolist(), [RNG.integers(300, 1500, 20).tolist()] * 2, tag)
    return group + [lone]


@pytest.fixture(scope="module")
def qwen_prm(tmp_path_factory):
    """Qwen2ForProcessRewardModel as Qwen2.5-Math-PRM ships it: backbone under `model.`, head under
    `score.0` / `score.2`, the `<extra_0>` tag in the tokenizer, remote code named in the config."""
    out = build_checkpoint(tmp_path_factory.mktemp("qwen-prm") / "ckpt", "tiny", arch="qwen2", head="lm_logits",
                           seed=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    tokenizer.save_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    model.resize_token_embeddings(len(tokenizer))  # the tag gets an embedding row
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    weights = {k: v for k, v in load_file(out / "model.safetensors").items() if k.startswith("model.")}
    g = torch.Generator().manual_seed(5)
    hidden = config["hidden_size"]
    weights.update({"score.0.weight": torch.randn(hidden, hidden, generator=g) / hidden ** 0.5,
                    "score.0.bias": torch.randn(hidden, generator=g) * 0.1,
                    "score.2.weight": torch.randn(2, hidden, generator=g) / hidden ** 0.5,
                    "score.2.bias": torch.randn(2, generator=g) * 0.1})
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config.update(architectures=["Qwen2ForProcessRewardModel"],
                  auto_map={"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"})
    (out / "config.json").write_text(json.dumps(config))
    return out, tokenizer.convert_tokens_to_ids("<extra_0>")


def _qwen_prm_reference(checkpoint, ids, tag):
    model = transformers.AutoModel.from_pretrained(checkpoint).eval()
    w = load_file(checkpoint / "model.safetensors")
    with torch.no_grad():
        states = model(torch.tensor([ids])).last_hidden_state[0]
        at = states[[i for i, t in enumerate(ids) if t == tag]]
        hidden = torch.relu(at @ w["score.0.weight"].T + w["score.0.bias"])
        return (hidden @ w["score.2.weight"].T + w["score.2.bias"]).numpy()


def _check(engine, sequences, reference):
    got = engine.score_steps(sequences)
    assert [len(g) for g in got] == [len(r) for r in reference]
    for g, r in zip(got, reference):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    return got


def test_qwen2_process_reward_model_from_its_weights(qwen_prm):
    checkpoint, tag = qwen_prm
    sequences = _sequences(tag)
    reference = [_qwen_prm_reference(checkpoint, ids, tag) for ids in sequences]
    engine = RewardEngine.from_checkpoint(checkpoint, min_shared=16)  # head and tag found alone
    assert engine.process is not None and engine.process.tag_id == tag
    got = _check(engine, sequences, reference)
    # the group's prompt ran once, up to (never past) the members' first step tag
    assert engine.stats.shared_tokens == 2 * (60 + 25)
    alone = [engine.score_steps([ids])[0] for ids in sequences]
    assert all(a.tobytes() == g.tobytes() for a, g in zip(alone, got))
    scores = step_scores(got[0])
    expected = torch.softmax(torch.tensor(reference[0], dtype=torch.float64), -1)[:, 1].numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


@pytest.mark.parametrize("budget", [64, 4096])
def test_token_classification_process_reward_model(tmp_path, budget):
    out = build_checkpoint(tmp_path / "ckpt", "tiny", arch="llama", seed=8)
    config = transformers.AutoConfig.from_pretrained(out)
    config.num_labels = 2
    config.architectures = ["LlamaForTokenClassification"]
    torch.manual_seed(8)
    model = transformers.LlamaForTokenClassification(config).eval()
    model.save_pretrained(out)
    sequences = _sequences(TAG)
    with torch.no_grad():
        reference = [model(torch.tensor([ids])).logits[0, [i for i, t in enumerate(ids) if t == TAG]].numpy()
                     for ids in sequences]
    engine = RewardEngine.from_checkpoint(out, step_tag=TAG, token_budget=budget)
    got = _check(engine, sequences, reference)
    assert np.all((step_scores(got[1]) > 0) & (step_scores(got[1]) < 1))


def test_causal_lm_process_reward_model_reads_two_label_tokens(tmp_path):
    out = build_checkpoint(tmp_path / "ckpt", "tiny", arch="llama", head="lm_logits", seed=9)
    positive, negative = 41, 42  # "+" and "-" in Math-Shepherd; here two ids of the demo vocabulary
    sequences = _sequences(TAG)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # the engine orders every head's logits (negative, positive)
        reference = [model(torch.tensor([ids])).logits[0, [i for i, t in enumerate(ids) if t == TAG]]
                     [:, [negative, positive]].numpy() for ids in sequences]
    engine = RewardEngine.from_checkpoint(out, head_type="process", step_tag=str(TAG), step_labels="41,42")
    _check(engine, sequences, reference)
    np.testing.assert_allclose(step_scores([[0.0, 2.0], [2.0, 0.0]]), [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))],
                               rtol=1e-6)


def test_process_errors_name_what_is_wrong(qwen_prm, tmp_path):
    checkpoint, tag = qwen_prm
    engine = RewardEngine.from_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="sequence 1 has no step tag"):
        engine.score_steps([[300, 301, tag], [300, 301, 302]])
    with pytest.raises(ValueError, match="scores steps"):
        engine.score([[300, tag]])
    with pytest.raises(ValueError, match="not one token"):
        RewardEngine.from_checkpoint(checkpoint, step_tag="<no such tag>")
    causal = build_checkpoint(tmp_path / "causal", "tiny", head="lm_logits")
    with pytest.raises(ValueError, match="needs its step tag"):
        RewardEngine.from_checkpoint(causal, head_type="process")
    with pytest.raises(ValueError, match="two label token ids"):
        RewardEngine.from_checkpoint(causal, head_type="process", step_tag=TAG)
    with pytest.raises(ValueError, match="outside the LM head's vocabulary"):
        RewardEngine.from_checkpoint(causal, head_type="process", step_tag=TAG, step_labels="1,99999")


def test_serve_options_of_a_process_model_are_checked_before_loading(qwen_prm, tmp_path):
    from reward_server.launcher import ServeOptions, model_parameters

    checkpoint, _ = qwen_prm
    params, k = model_parameters(ServeOptions(checkpoint=checkpoint), checkpoint)
    assert k == -1  # one attribute per step
    assert params["preprocessing"]["step_tag"] == params["reward_engine"]["step_tag"] == "<extra_0>"
    assert params["postprocessing"]["step_aggregate"] == "min"
    for options, needle in [(dict(step_aggregate="median"), "step_aggregate must be one of"),
                            (dict(attribute_weights="1,2"), "do not apply")]:
        with pytest.raises(ValueError, match=needle):
            model_parameters(ServeOptions(checkpoint=checkpoint, **options), checkpoint)
    causal = build_checkpoint(tmp_path / "causal", "tiny", head="lm_logits")
    with pytest.raises(ValueError, match="needs its step tag"):
        model_parameters(ServeOptions(checkpoint=causal, head_type="process"), causal)
    with pytest.raises(ValueError, match="two label token ids"):
        model_parameters(ServeOptions(checkpoint=causal, head_type="process", step_tag="7"), causal)


def test_steps_are_joined_with_the_tag_or_found_in_the_content():
    from reward_server.chat import ConversationError, join_steps, parse_messages

    assert join_steps(["a = 2.", " So b = 4."], "<extra_0>") == "a = 2.<extra_0> So b = 4.<extra_0>"
    prompt = {"role": "user", "content": "b = 2a, a = 2. b?"}
    joined = parse_messages([prompt, {"role": "assistant", "steps": ["a = 2.", "b = 4."]}], step_tag="<extra_0>")
    assert joined[-1] == {"role": "assistant", "content": "a = 2.<extra_0>b = 4.<extra_0>"}
    given = parse_messages([prompt, {"role": "assistant", "content": "b = 4.<extra_0>"}], step_tag="<extra_0>")
    assert given[-1]["content"] == "b = 4.<extra_0>"
    for message, needle in [({"role": "assistant", "content": "b = 4."}, "has no step tag '<extra_0>'"),
                            ({"role": "assistant", "steps": []}, "message 1 steps must be a non-empty array"),
                            ({"role": "assistant", "steps": ["ok", 3]}, r"message 1 steps\[1\] must be a non-empty"),
                            ({"role": "assistant", "steps": ["a<extra_0>b"]}, "contains the step tag"),
                            ({"role": "assistant", "steps": ["a"], "content": "a"}, "both steps and content")]:
        with pytest.raises(ConversationError, match=needle):
            parse_messages([prompt, message], step_tag="<extra_0>")
    # outcome models never read "steps": the content is required as before
    with pytest.raises(ConversationError, match="content must be a string"):
        parse_messages([prompt, {"role": "assistant", "steps": ["a"]}])
    for response in ("y", "y<extra_0>"):  # a tag in the prompt is not a step, even beside tagged steps
        with pytest.raises(ConversationError, match="message 0 holds the step tag '<extra_0>': only the response"):
            parse_messages([{"role": "user", "content": "x<extra_0>"}, {"role": "assistant", "content": response}],
                           step_tag="<extra_0>")
