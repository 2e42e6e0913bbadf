"""Process reward models in the engine (issue 19, first part): label logits at every step tag,
for the three layouts of reward_server/pipeline/heads.py, against a plain transformers forward pass.

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
from safetensors.torch import load_file

from reward_server.pipeline.scoring import step_scores
from reward_server.pipeline.torch_engine.engine import RewardEngine
from reward_server.supervisor.demo_checkpoint import build_checkpoint

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
    """Qwen2ForProcessRewardModel as Qwen2.5-Math-PRM ships it (`demo-checkpoint --head process`):
    backbone under `model.`, head under `score.0` / `score.2`, the `<extra_0>` tag in the tokenizer,
    remote code named in the config but never run."""
    out = build_checkpoint(tmp_path_factory.mktemp("qwen-prm") / "ckpt", "tiny", arch="qwen2", head="process", seed=3)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForProcessRewardModel"]
    return out, transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<extra_0>")


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
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.repository import model_parameters

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
    from reward_server.pipeline.conversations import ConversationError, join_steps, parse_messages

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


# -- served: a real tritonserver and the gateway on the Qwen2 PRM ------------------------------------

PROMPT = "Tom has 3 apples and buys 2 more, then eats one. How many are left?"
STEPS = [["Tom starts with 3 apples.", " He buys 2: 3 + 2 = 5.", " He eats one: 5 - 1 = 4."],
         ["3 + 2 = 6.", " 6 - 1 = 5."],
         ["Grüße! 3 + 2 - 1 = 4 🙂"],
         ["Start: 3.", " Buy two, so five.", " Eat one.", " Four are left, the answer is 4."]]
MAX_LENGTH = 200


@pytest.fixture(scope="module")
def prm_server(qwen_prm):
    """`serve --checkpoint PRM` with nothing else: head, tag and aggregate (min) found alone."""
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.server import TritonServer

    checkpoint, _ = qwen_prm
    with TritonServer(ServeOptions(checkpoint=checkpoint, max_length=MAX_LENGTH, min_shared_prefix=8)) as server:
        yield server


def _reference_steps(checkpoint, tag, messages):
    """transformers' template and a plain forward pass: the positive probability at every tag."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    logits = _qwen_prm_reference(checkpoint, ids, tag)
    return torch.softmax(torch.tensor(logits, dtype=torch.float64), -1)[:, 1].numpy()


def test_process_model_served_over_grpc_with_its_steps(prm_server, qwen_prm):
    from reward_client import RewardClient, RewardInvalidInputError

    checkpoint, tag = qwen_prm
    tagged = [{"role": "user", "content": "What is 2 + 2?"},
              {"role": "assistant", "content": "2 + 2 = 4.<extra_0> The answer is 4.<extra_0>"}]
    conversations = [(PROMPT, steps) for steps in STEPS] + [tagged]
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    with RewardClient(prm_server.grpc_url, batch_size=3) as client:
        results = client.score(conversations)
        ranked = client.rank(PROMPT, STEPS)
        with pytest.raises(RewardInvalidInputError, match="no step tag") as err:
            client.score([(PROMPT, STEPS[0]), (PROMPT, "an answer without steps")])
        assert err.value.index == 1
        ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT},
                                                   {"role": "assistant", "content": "".join(s + "<extra_0>" for s in steps)}],
                                                  tokenize=True, return_dict=True)["input_ids"]) for steps in STEPS]
        by_ids = client.score_ids(ids)  # the `reward_ids` entry: the same steps, bit for bit
        assert [r.steps for r in by_ids] == [r.steps for r in results[:len(STEPS)]]
        with pytest.raises(RewardInvalidInputError, match=f"no step tag '<extra_0>' \\(token id {tag}\\)") as err:
            client.score_ids([ids[0], [i for i in ids[1] if i != tag]])
        assert err.value.index == 1
    for result, conversation in zip(results, conversations):
        messages = ([{"role": "user", "content": conversation[0]},
                     {"role": "assistant", "content": "".join(s + "<extra_0>" for s in conversation[1])}]
                    if isinstance(conversation, tuple) else conversation)
        expected = _reference_steps(checkpoint, tag, messages)
        np.testing.assert_allclose(result.steps, expected, rtol=1e-4, atol=1e-6)
        assert result.score == pytest.approx(min(result.steps), abs=1e-7)  # the default aggregate
        assert result.attributes == {} and result.to_dict()["steps"] == list(result.steps)
    assert [len(r.steps) for r in results] == [3, 2, 1, 4, 2]
    assert [r.index for r in ranked] == sorted(range(len(STEPS)), key=lambda i: (-results[i].score, i))


def test_liveness_probe_scores_a_process_model(prm_server):
    from reward_server.probe import probe

    result = probe(prm_server.grpc_url, timeout_s=20)
    assert result.alive, result.reason


def test_process_model_through_the_cli(prm_server, tmp_path):
    """`reward-client score` on a JSONL of (prompt, steps) records writes each record's steps and
    aggregate; `attribute_names()` is empty (step scores are not named)."""
    import json as json_module
    import subprocess
    import sys

    from reward_client import RewardClient

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json_module.dumps({"id": i, "prompt": PROMPT, "response": steps}) + "\n"
                           for i, steps in enumerate(STEPS)))
    run = subprocess.run([sys.executable, "-m", "reward_client", "score", str(src), "-o", str(out), "--url",
                          prm_server.grpc_url, "--no-progress"], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    records = [json_module.loads(line) for line in out.read_text().splitlines()]
    with RewardClient(prm_server.grpc_url) as client:
        expected = client.score((PROMPT, steps) for steps in STEPS)
        assert client.attribute_names() == ()
    assert [r["id"] for r in records] == list(range(len(STEPS)))
    for record, result in zip(records, expected):
        assert record["reward"]["steps"] == pytest.approx(list(result.steps), rel=1e-6)
        assert record["reward"]["score"] == pytest.approx(result.score, rel=1e-6)
        assert "attributes" not in record["reward"]


def test_process_model_served_over_http_batched_with_bad_input(prm_server, qwen_prm):
    """Triton's own HTTP API: the step scores NaN-padded in `attributes`, `num_steps` per row; a
    conversation without a tag, with a tag in its prompt, or over the length limit fails its own
    request only, naming it, while concurrent good requests are answered in full."""
    import concurrent.futures
    import json as json_module

    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    def infer(conversations):
        client = httpclient.InferenceServerClient(prm_server.http_url.removeprefix("http://"), network_timeout=120)
        data = np.array([[json_module.dumps(c).encode()] for c in conversations], dtype=object)
        tensor = httpclient.InferInput("messages", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        try:
            reply = client.infer("reward", [tensor])
        except InferenceServerException as err:
            return str(err)
        return {name: reply.as_numpy(name) for name in ("score", "attributes", "num_steps", "num_tokens")}

    good = [[{"role": "user", "content": PROMPT}, {"role": "assistant", "steps": steps}] for steps in STEPS]
    long_steps = [" ".join(["one more careful step of the computation"] * 3)] * 20
    bad = {"no tag": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "4"}],
           "tag in prompt": [{"role": "user", "content": "2+2?<extra_0>"},
                             {"role": "assistant", "steps": ["4"]}],
           "too long": [{"role": "user", "content": PROMPT}, {"role": "assistant", "steps": long_steps}]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(infer, good) for _ in range(3)]
        bads = {what: pool.submit(infer, [good[0], conversation]) for what, conversation in bad.items()}
        goods, bads = [f.result() for f in goods], {what: f.result() for what, f in bads.items()}
    assert "conversation 1: the response (message 1) has no step tag '<extra_0>'" in bads["no tag"]
    assert "conversation 1: message 0 holds the step tag '<extra_0>'" in bads["tag in prompt"]
    assert f"conversation 1: conversation is" in bads["too long"] and f"maximum length of {MAX_LENGTH}" in bads["too long"]
    checkpoint, tag = qwen_prm
    for answer in goods:
        assert answer["num_steps"].reshape(-1).tolist() == [3, 2, 1, 4]
        assert answer["attributes"].shape == (4, 4)
        for row, steps, conversation in zip(answer["attributes"], answer["num_steps"].reshape(-1), good):
            messages = [conversation[0], {"role": "assistant", "content": "".join(s + "<extra_0>" for s in
                                                                                 conversation[1]["steps"])}]
            np.testing.assert_allclose(row[:steps], _reference_steps(checkpoint, tag, messages), rtol=1e-4, atol=1e-6)
            assert np.isnan(row[steps:]).all()
        assert (goods[0]["attributes"][~np.isnan(goods[0]["attributes"])].tobytes()
                == answer["attributes"][~np.isnan(answer["attributes"])].tobytes())


def test_process_model_through_the_gateway(prm_server, qwen_prm):
    """vLLM's `/pooling` with task token_classify on templated text, as vLLM answers for
    Qwen2.5-Math-PRM; OpenRLHF's `/get_reward` gets the aggregate; `/classify` says why not."""
    from reward_client import RewardClient

    from tests.conftest import GatewayProcess
    from tests.test_gateway import post

    checkpoint, _ = qwen_prm
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPT},
                                            {"role": "assistant", "content": "".join(s + "<extra_0>" for s in steps)}],
                                           tokenize=False) for steps in STEPS]
    with RewardClient(prm_server.grpc_url) as client:
        results = client.score((PROMPT, steps) for steps in STEPS)
    with GatewayProcess(prm_server.grpc_url) as gateway:
        status, answer = post(gateway.url + "/pooling", {"model": "prm", "input": texts, "task": "token_classify"})
        assert status == 200, answer
        for item, result in zip(answer["data"], results):
            np.testing.assert_allclose([row[1] for row in item["data"]], result.steps, rtol=1e-6)
            np.testing.assert_allclose([sum(row) for row in item["data"]], 1.0, rtol=1e-6)
        status, answer = post(gateway.url + "/get_reward", {"query": texts})
        assert status == 200 and answer["rewards"] == pytest.approx([r.score for r in results], rel=1e-6)
        status, answer = post(gateway.url + "/classify", {"input": texts[0]})
        assert status == 400 and "process reward model" in answer["error"]["message"]
        status, answer = post(gateway.url + "/pooling", {"input": texts[0], "task": "embed"})
        assert status == 400 and "token_classify" in answer["error"]["message"]


def test_step_rows_and_aggregates():
    from reward_server.pipeline.scoring import ScoreSpec, step_rows

    logits = [np.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]), np.array([[-3.0, 3.0]])]
    rows = step_rows(logits)
    assert rows.shape == (2, 7) and rows[:, 0].tolist() == [3, 1] and np.isnan(rows[1, 3:]).all()
    probabilities = [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(3.0)), 0.5]
    expected = {"min": [probabilities[1], 1 / (1 + np.exp(-6.0))], "last": [0.5, 1 / (1 + np.exp(-6.0))],
                "mean": [np.mean(probabilities), 1 / (1 + np.exp(-6.0))],
                "product": [np.prod(probabilities), 1 / (1 + np.exp(-6.0))]}
    for rule, scores in expected.items():
        score, steps, counts = ScoreSpec(aggregate=rule, mean=0.25, std=2.0).outputs(rows)
        np.testing.assert_allclose(score, (np.array(scores) - 0.25) / 2.0, rtol=1e-6)
        np.testing.assert_allclose(steps[0], probabilities, rtol=1e-6)
        assert counts.tolist() == [3, 1] and np.isnan(steps[1, 1:]).all()
    score, attributes, counts = ScoreSpec().outputs(np.array([[1.5, 2.0]]))  # outcome: unchanged, no steps
    assert score.tolist() == [1.5] and attributes.tolist() == [[1.5, 2.0]] and counts.tolist() == [0]


def test_encoder_keeps_every_step_tag_or_says_why(qwen_prm, tmp_path):
    """Token-level checks on all three inputs: a tag that merges into its neighbours, steps cut by
    truncation, and token ids or text without the tag."""
    from reward_server.pipeline.chat import ChatEncoder
    from reward_server.pipeline.conversations import ConversationError

    checkpoint, tag = qwen_prm
    encoder = ChatEncoder.from_checkpoint(checkpoint, step_tag="<extra_0>")
    assert (encoder.step_tag, encoder.step_tag_id) == ("<extra_0>", tag)
    [ok] = encoder.encode_batch([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<extra_0>"}]])
    assert ok.token_ids.count(tag) == 1
    assert encoder.check_ids([5, 6, tag]).token_ids == [5, 6, tag]
    with pytest.raises(ConversationError, match=f"no step tag '<extra_0>' \\(token id {tag}\\)"):
        encoder.check_ids([5, 6, 7])
    [missing] = encoder.encode_texts(["no tag here"])
    assert isinstance(missing, ConversationError) and "no step tag" in str(missing)
    short = ChatEncoder.from_checkpoint(checkpoint, max_length=6, truncation="truncate_left", step_tag=str(tag))
    assert short.step_tag == "<extra_0>"  # the id's text: what steps are joined with
    [cut] = short.encode_texts(["a<extra_0>b<extra_0>c d e f g h i j k"])
    assert isinstance(cut, ConversationError) and "would cut 2 of the 2 steps" in str(cut)
    # a tag that is an ordinary token can merge with the text next to it: counted, not lost
    vocab = encoder.tokenizer.get_vocab()
    word = next(w for w in sorted(vocab) if len(w) > 1 and w.isalpha() and w[0] in vocab
                and encoder.tokenizer(w, add_special_tokens=False).input_ids == [vocab[w]])
    plain = ChatEncoder.from_checkpoint(checkpoint, step_tag=word[0])
    [merged] = plain.encode_texts([f"{word}{word[0]}"])  # the tag's character inside a longer token, and alone
    assert isinstance(merged, ConversationError) and f"the 2 step tags {word[0]!r} became 1 tag tokens" in str(merged)


def test_token_classification_prm_through_the_tensorrt_llm_ensembles(tmp_path):
    """build-engine's adaptation of a TRL-style PRM (a token classifier with a bias) served through
    the TensorRT-LLM ensembles, with the contract double of the `tensorrt_llm` model: one engine
    request per step (their order: tests/test_trtllm_units.py), later steps finding earlier blocks
    cached; step scores equal a transformers forward of the classifier."""
    from bench.gpu_check import kv_cache_counters
    from reward_client import RewardClient
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.server import TritonServer
    from tests.trtllm_double import engine_dir_for, repository_with_double

    out = build_checkpoint(tmp_path / "prm", "tiny", arch="llama", seed=12)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<step>"]})
    tokenizer.save_pretrained(out)
    config = transformers.AutoConfig.from_pretrained(out)
    config.num_labels, config.architectures, config.vocab_size = 2, ["LlamaForTokenClassification"], len(tokenizer)
    torch.manual_seed(12)
    model = transformers.LlamaForTokenClassification(config).eval()
    with torch.no_grad():
        model.score.bias.copy_(torch.tensor([0.3, -0.2]))
    model.save_pretrained(out)
    tag = tokenizer.convert_tokens_to_ids("<step>")
    options = ServeOptions(engine="tensorrt_llm", engine_dir=engine_dir_for(out, tmp_path / "engine", step_tag="<step>"),
                           model_repository=repository_with_double(tmp_path / "repository"), max_length=512,
                           step_aggregate="last")
    long_steps = [" ".join(["a long and careful step"] * 3)] * 4  # steps of more than one KV block each
    with TritonServer(options) as server, RewardClient(server.grpc_url) as client:
        before = kv_cache_counters(server.metrics_url)
        results = client.score([(PROMPT, steps) for steps in STEPS + [long_steps]])
        after = kv_cache_counters(server.metrics_url)
    for result, steps in zip(results, STEPS + [long_steps]):
        messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "".join(s + "<step>" for s in steps)}]
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, [i for i, t in enumerate(ids) if t == tag]]
        expected = torch.softmax(logits.double(), -1)[:, 1].numpy()
        np.testing.assert_allclose(result.steps, expected, rtol=1e-4, atol=1e-6)
        assert result.score == pytest.approx(result.steps[-1], abs=1e-7)  # --step-aggregate last
    assert after["requests"] - before.get("requests", 0) == sum(len(s) for s in STEPS) + len(long_steps)
    assert after["reused_blocks"] - before.get("reused_blocks", 0) >= len(long_steps) - 1
