"""Adapting reward checkpoints for TensorRT-LLM: the adapted causal LM must score like the classifier."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from reward_server.builder import adapt
from reward_server.builder.adapt import INDEX_FILE, adapt_checkpoint
from reward_server.pipeline.chat import ChatEncoder
from reward_server.pipeline.heads import pool_position
from reward_server.pipeline.trtllm.layout import METADATA_FILE, RewardHeadSpec
from reward_server.supervisor.demo_checkpoint import build_checkpoint
from tests.conversations import make_conversations

LABELS = ["helpfulness", "correctness", "verbosity"]


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory):
    """Builds (once per module) a tiny seq-cls checkpoint. Llama pads with <|eot_id|>, which ends its
    template; the Qwen2 config says tie_word_embeddings true, as Qwen2 seq-cls releases often do (the
    classifier has no lm_head, so it does not matter there, but a tied adapted lm_head would be wrong)."""
    built = {}

    def build(arch, k):
        if (arch, k) not in built:
            path = build_checkpoint(tmp_path_factory.mktemp(f"{arch}{k}"), "tiny", arch=arch, num_labels=k,
                                    pad_token="<|eot_id|>" if arch == "llama" else None, seed=k)
            if arch == "qwen2":
                config = json.loads((path / "config.json").read_text())
                (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
            built[arch, k] = path
        return built[arch, k]

    return build


def _token_ids(checkpoint, n=8):
    encoder = ChatEncoder.from_checkpoint(checkpoint)
    return [e.token_ids for e in encoder.encode_batch(make_conversations(n, seed=5))]


def _tensors(directory):
    """name -> tensor over every safetensors file of a directory."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            out.update((name, reader.get_tensor(name)) for name in reader.keys())
    return out


@torch.no_grad()
def _assert_same_rewards(source, adapted, spec, ids):
    """Adapted logits[0:K] at the pooled position (input cut after it) == the classifier's outputs.

    Returns the pooled positions."""
    classifier = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32).eval()
    causal = AutoModelForCausalLM.from_pretrained(adapted, dtype=torch.float32).eval()
    k = len(spec.reward_indices)
    positions = []
    for row in ids:
        position = pool_position(row, "sequence_classification", spec.pad_token_id)
        expected = classifier(torch.tensor([row])).logits[0]
        got = causal(torch.tensor([row[: position + 1]])).logits[0, -1, spec.reward_indices]
        assert expected.shape == (k,)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        positions.append(position)
    return positions


@pytest.mark.parametrize("arch,k", [("llama", 1), ("llama", 3), ("qwen2", 1), ("qwen2", 3)])
def test_adapted_checkpoint_scores_like_the_classifier(seq_cls, tmp_path, arch, k):
    source = seq_cls(arch, k)
    out = tmp_path / "adapted"
    spec = adapt_checkpoint(source, out)

    ids = _token_ids(source)
    assert _token_ids(out) == ids  # tokenizer and chat template were copied
    positions = _assert_same_rewards(source, out, spec, ids)
    if arch == "llama":
        # pad == <|eot_id|> ends the template: the score is read one token early, and reading the
        # final token instead would give other numbers.
        assert all(p == len(row) - 2 for p, row in zip(positions, ids))
        causal = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            final = causal(torch.tensor([ids[0]])).logits[0, -1, :k]
            pooled = causal(torch.tensor([ids[0][: positions[0] + 1]])).logits[0, -1, :k]
        assert not torch.allclose(final, pooled, atol=1e-3)
    else:
        assert positions == [len(row) - 1 for row in ids]

    weights, original = _tensors(out), _tensors(source)
    assert set(weights) == set(original) - {"score.weight"} | {"lm_head.weight"}
    assert all(weights[name].dtype == original[name].dtype for name in original if name != "score.weight")
    lm_head = weights["lm_head.weight"]
    assert lm_head.shape == (spec.vocab_size, original["score.weight"].shape[1])
    assert torch.equal(lm_head[:k], original["score.weight"])
    assert not lm_head[k:].any()

    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    prefix = "Llama" if arch == "llama" else "Qwen2"
    assert config["architectures"] == [f"{prefix}ForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert not {"num_labels", "id2label", "label2id", "problem_type"} & set(config)
    assert config["pad_token_id"] == source_config["pad_token_id"] == spec.pad_token_id
    # transformers 4.x spellings for TensorRT-LLM 1.2's converter, next to 5.x's own keys
    assert config["rope_theta"] == source_config["rope_parameters"]["rope_theta"]
    assert config["torch_dtype"] == source_config["dtype"] and config["rope_parameters"] == source_config["rope_parameters"]
    assert not (out / INDEX_FILE).exists()

    assert spec == RewardHeadSpec(str(source.resolve()), str(out.resolve()), f"{prefix}ForSequenceClassification",
                                  f"{prefix}ForCausalLM", "sequence_classification", list(range(k)),
                                  [f"reward_{i}" for i in range(k)], "last_non_pad", source_config["pad_token_id"],
                                  source_config["vocab_size"])
    assert RewardHeadSpec.read(out) == spec
    assert json.loads((out / METADATA_FILE).read_text())["pooling"] == "last_non_pad"


def test_sharded_checkpoint_is_streamed_one_shard_at_a_time(seq_cls, tmp_path, monkeypatch):
    source = seq_cls("llama", 3)
    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32)
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, sharded / path.name)
    source_map = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    source_shards = set(source_map.values())
    assert len(source_shards) >= 3 and "score.weight" in source_map

    real_safe_open, opened, state = adapt.safe_open, [], {"open": 0, "peak": 0}

    @contextlib.contextmanager
    def counting_safe_open(path, *args, **kwargs):
        with real_safe_open(path, *args, **kwargs) as reader:
            opened.append(path.rsplit("/", 1)[-1])
            state["open"] += 1
            state["peak"] = max(state["peak"], state["open"])
            try:
                yield reader
            finally:
                state["open"] -= 1

    monkeypatch.setattr(adapt, "safe_open", counting_safe_open)
    out = tmp_path / "adapted"
    spec = adapt_checkpoint(sharded, out)
    monkeypatch.undo()
    assert state["peak"] == 1 and sorted(opened) == sorted(source_shards)

    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(source_map) - {"score.weight"} | {"lm_head.weight"}
    assert index["weight_map"]["lm_head.weight"] == source_map["score.weight"]
    total = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), framework="pt") as reader:
            assert set(reader.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
            total += sum(reader.get_tensor(name).nbytes for name in reader.keys())
    assert index["metadata"]["total_size"] == total
    assert spec.attribute_names == LABELS
    _assert_same_rewards(sharded, out, spec, _token_ids(sharded, n=4))


def test_causal_lm_passes_through(tmp_path):
    source = build_checkpoint(tmp_path / "causal", "tiny", arch="qwen2", head="lm_logits", seed=1)
    out = tmp_path / "out"
    spec = adapt_checkpoint(source, out, reward_indices="0,3,5")
    assert [p.name for p in out.iterdir()] == [METADATA_FILE]
    assert spec.hf_checkpoint == spec.source_checkpoint == str(source.resolve())
    assert (spec.head_type, spec.pooling, spec.reward_indices) == ("lm_logits", "last", [0, 3, 5])
    assert spec.architecture == spec.source_architecture == "Qwen2ForCausalLM"
    assert spec.attribute_names == ["reward_0", "reward_1", "reward_2"]
    assert RewardHeadSpec.read(out) == spec

    vocab = spec.vocab_size
    with pytest.raises(ValueError, match=rf"reward index {vocab} is outside the vocabulary of {vocab} tokens"):
        adapt_checkpoint(source, tmp_path / "bad", reward_indices=[0, vocab])
    with pytest.raises(ValueError, match="needs a \\*ForSequenceClassification checkpoint"):
        adapt_checkpoint(source, tmp_path / "bad", head_type="sequence_classification")


def _fake_checkpoint(directory, architecture, tensors):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": [architecture], "vocab_size": 16,
                                                       "num_labels": 1}))
    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("architecture,tensors,found", [
    ("BertForSequenceClassification",
     {"bert.embeddings.word_embeddings.weight": (16, 4), "classifier.weight": (1, 4)}, "bert.embeddings"),
    ("LlamaForSequenceClassification", {"model.embed_tokens.weight": (16, 4), "score.weight": (1, 4),
                                        "pooler.dense.weight": (4, 4)}, "pooler.dense"),
])
def test_unsupported_heads_are_refused(tmp_path, architecture, tensors, found):
    source = _fake_checkpoint(tmp_path / "src", architecture, tensors)
    with pytest.raises(ValueError, match=rf"{architecture} is not supported.*{found}"):
        adapt_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_refused(tmp_path):
    source = _fake_checkpoint(tmp_path / "src", "GPT2LMHeadModel", {"transformer.wte.weight": (16, 4)})
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        adapt_checkpoint(source, tmp_path / "out")


def test_missing_or_invalid_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=f"{METADATA_FILE} is missing"):
        RewardHeadSpec.read(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{METADATA_FILE} is not a valid reward head description"):
        RewardHeadSpec.read(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"vocab_size": 16}))
    with pytest.raises(ValueError, match=f"{METADATA_FILE} is not a valid"):
        RewardHeadSpec.read(tmp_path)


def test_interrupted_run_leaves_no_metadata(seq_cls, tmp_path, monkeypatch):
    source, out = seq_cls("qwen2", 1), tmp_path / "adapted"
    adapt_checkpoint(source, out)
    assert RewardHeadSpec.read(out).hf_checkpoint == str(out.resolve())

    def failing_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapt, "_write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        adapt_checkpoint(source, out)
    with pytest.raises(ValueError, match="is missing"):
        RewardHeadSpec.read(out)


def _token_classifier(directory, seed=4):
    """A TRL-style PRM: LlamaForTokenClassification, two labels, a `score` head with a bias."""
    import transformers

    out = build_checkpoint(directory, "tiny", arch="llama", seed=seed)
    config = transformers.AutoConfig.from_pretrained(out)
    config.num_labels, config.architectures = 2, ["LlamaForTokenClassification"]
    torch.manual_seed(seed)
    model = transformers.LlamaForTokenClassification(config).eval()
    with torch.no_grad():
        model.score.bias.copy_(torch.tensor([0.7, -0.4]))
    model.save_pretrained(out)
    return out, model


@torch.no_grad()
def test_token_classification_prm_becomes_a_causal_lm_plus_bias(tmp_path):
    """Logits rows 0, 1 of the adapted causal LM plus the recorded bias are the classifier's two
    labels at every position, so a request cut after a step tag reads that tag's logits."""
    source, model = _token_classifier(tmp_path / "prm")
    spec = adapt_checkpoint(source, tmp_path / "out", step_tag=7)
    assert (spec.head_type, spec.architecture, spec.pooling) == ("process", "LlamaForCausalLM", "last")
    assert spec.step_tag_id == 7 and spec.reward_indices == [0, 1]
    assert spec.bias == pytest.approx([0.7, -0.4])
    assert RewardHeadSpec.read(tmp_path / "out") == spec
    assert "score.bias" not in _tensors(tmp_path / "out")
    causal = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 7, 11, 12, 7, 13, 7]])
    expected = model(ids).logits[0]
    for end in (3, 6, 8):  # after each tag
        got = causal(ids[:, :end]).logits[0, -1, :2] + torch.tensor(spec.bias)
        torch.testing.assert_close(got, expected[end - 1], rtol=1e-5, atol=1e-5)


def test_process_heads_on_the_engine_path(tmp_path):
    """A Math-Shepherd-style causal LM is read at its labels, negative first; Qwen2.5-Math-PRM's
    two-layer head is refused with the reason; a causal LM without labels says what it needs."""
    source = build_checkpoint(tmp_path / "causal", "tiny", head="lm_logits")
    spec = adapt_checkpoint(source, tmp_path / "out", head_type="process", step_tag="7", step_labels="41,42")
    assert spec.reward_indices == [42, 41] and spec.attribute_names == ["negative", "positive"]
    assert spec.step_tag_id == 7 and spec.hf_checkpoint == str(source.resolve()) and spec.bias is None
    with pytest.raises(ValueError, match="two label token ids"):
        adapt_checkpoint(source, tmp_path / "out2", head_type="process", step_tag="7")
    with pytest.raises(ValueError, match="not one token"):
        adapt_checkpoint(source, tmp_path / "out3", head_type="process", step_tag="<no such tag>", step_labels="1,2")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForProcessRewardModel"]}))
    with pytest.raises(ValueError, match="two-layer head .* torch engine"):
        adapt_checkpoint(source, tmp_path / "out4")


def test_gemma2_score_rows_ride_in_reserved_embedding_rows(tmp_path):
    """TensorRT-LLM ties Gemma's LM head to its embedding table, so the score rows are written into
    the embedding rows of reserved tokens (<unusedN>): the adapted (tied) causal LM's logits at those
    ids are the classifier's scores, with no final-logit softcapping (the scores here are made large
    enough that capping would change them), and every other row is untouched."""
    from safetensors.torch import save_file

    source = build_checkpoint(tmp_path / "gemma2", "tiny", arch="gemma2", num_labels=2, seed=3)
    assert json.loads((source / "config.json").read_text())["final_logit_softcapping"] == 30.0
    tensors = _tensors(source)
    tensors["score.weight"] = tensors["score.weight"] * 400  # rewards far beyond the cap's linear range
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "adapted"
    spec = adapt_checkpoint(source, out)
    reserved = AutoTokenizer.from_pretrained(source).convert_tokens_to_ids(["<unused0>", "<unused1>"])
    assert spec.reward_indices == reserved and spec.rows_in_embedding
    config = json.loads((out / "config.json").read_text())
    assert config["final_logit_softcapping"] is None and config["tie_word_embeddings"] is True
    assert config["architectures"] == ["Gemma2ForCausalLM"]
    weights = _tensors(out)
    assert set(weights) == set(tensors) - {"score.weight"}
    embeddings, original = weights["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"]
    assert torch.equal(embeddings[reserved], tensors["score.weight"])
    others = [i for i in range(original.shape[0]) if i not in reserved]
    assert torch.equal(embeddings[others], original[others])
    ids = _token_ids(source, n=4)
    _assert_same_rewards(source, out, spec, ids)
    classifier = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        assert classifier(torch.tensor([ids[0]])).logits.abs().max() > 30  # capping would have squashed these


def test_a_tied_family_needs_reserved_tokens(tmp_path):
    source = build_checkpoint(tmp_path / "gemma2", "tiny", arch="gemma2", num_labels=9, seed=3)
    with pytest.raises(ValueError, match=r"9 score rows need 9 reserved tokens \(<unusedN>\).*it has 8"):
        adapt_checkpoint(source, tmp_path / "adapted")
