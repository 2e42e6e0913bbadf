"""Pure logic, no server: validation, length policy, heads, batching plans, reward maths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reward_server.pipeline.chat import LengthPolicy
from reward_server.pipeline.conversations import ConversationError, parse_messages
from reward_server.pipeline.heads import detect_head_type, num_outputs, parse_indices, pool_position
from reward_server.pipeline.scoring import ScoreSpec, parse_floats

GOOD = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def test_parse_messages_accepts_bytes_str_and_list():
    assert parse_messages(json.dumps(GOOD).encode()) == GOOD
    assert parse_messages(json.dumps(GOOD)) == GOOD
    extra = [dict(m, name="x") for m in GOOD]
    assert parse_messages(extra) == GOOD  # unknown keys are dropped, not passed to the template


@pytest.mark.parametrize("raw, needle", [
    (b"[{", "not valid JSON"),
    (b"\xff\xfe", "not valid UTF-8"),
    (json.dumps({"role": "assistant"}), "must be a JSON array"),
    ("[]", "messages is empty"),
    (json.dumps(["hi"]), "message 0 must be an object"),
    (json.dumps([{"role": "robot", "content": "x"}]), "unknown role 'robot'"),
    (json.dumps([{"role": "user", "content": "x"}, {"role": "assistant", "content": ["a"]}]),
     "message 1 content must be a string, got list"),
    (json.dumps([{"role": "assistant", "content": "x"}, {"role": "user", "content": "x"}]),
     "last message (message 1) must be the assistant"),
])
def test_parse_messages_names_the_problem(raw, needle):
    with pytest.raises(ConversationError, match=None) as info:
        parse_messages(raw)
    assert needle in str(info.value)


def test_length_policy_reject_says_count_and_limit():
    with pytest.raises(ConversationError, match="12 tokens, over the maximum length of 10"):
        LengthPolicy(10).apply(list(range(12)), keep_head=1, response_tokens=None)
    assert LengthPolicy(10).apply(list(range(10)), 1, None).truncated is False


def test_length_policy_truncate_left_keeps_bos_and_tail():
    out = LengthPolicy(5, "truncate_left").apply(list(range(12)), keep_head=1, response_tokens=3)
    assert out.token_ids == [0, 8, 9, 10, 11] and out.truncated
    out = LengthPolicy(5, "truncate_left").apply(list(range(12)), keep_head=0, response_tokens=5)
    assert out.token_ids == [7, 8, 9, 10, 11]
    with pytest.raises(ConversationError, match="response alone is 5 tokens"):
        LengthPolicy(5, "truncate_left").apply(list(range(12)), keep_head=1, response_tokens=5)


def test_length_policy_validates_settings():
    with pytest.raises(ValueError, match="truncation must be one of"):
        LengthPolicy(10, "middle")


def test_pool_position_follows_transformers_rule():
    pad = 9
    assert pool_position([1, 2, 3, 9], "sequence_classification", pad) == 2  # trailing pad skipped
    assert pool_position([1, 9, 3, 9, 9], "sequence_classification", pad) == 2
    assert pool_position([9, 9], "sequence_classification", pad) == 0
    assert pool_position([1, 2, 3, 9], "sequence_classification", None) == 3
    assert pool_position([1, 2, 3, 9], "lm_logits", pad) == 3


def test_head_detection_and_outputs():
    assert detect_head_type(["LlamaForSequenceClassification"]) == "sequence_classification"
    assert detect_head_type(["Qwen2ForCausalLM"]) == "lm_logits"
    assert detect_head_type(["Qwen2ForCausalLM"], "sequence_classification") == "sequence_classification"
    with pytest.raises(ValueError, match="cannot detect"):
        detect_head_type(["BertModel"])
    assert parse_indices("0, 4,7") == (0, 4, 7) and parse_indices(None) == (0,)
    assert num_outputs({"id2label": {"0": "a", "1": "b", "2": "c"}}, "sequence_classification", (0,)) == 3
    assert num_outputs({}, "lm_logits", (0, 4)) == 2


def test_score_spec_weights_and_normalisation():
    attrs = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(ScoreSpec().score(attrs), [1.0, 0.0])
    spec = ScoreSpec(weights=parse_floats("0.5,1,-0.25"), mean=0.5, std=2.0)
    np.testing.assert_allclose(spec.score(attrs), [(0.5 + 2 - 0.75 - 0.5) / 2, (0 - 1 - 1 - 0.5) / 2], rtol=1e-6)
    with pytest.raises(ValueError, match="2 attribute weights given for a model with 3 outputs"):
        ScoreSpec(weights=(1.0, 2.0)).check(3)
    with pytest.raises(ValueError, match="score_std must be positive"):
        ScoreSpec(std=0)


def test_group_shared_prefixes_finds_groups_partial_overlaps_and_singles():
    from reward_server.pipeline.batching import SharedGroup, group_shared_prefixes

    prompt = list(range(100))
    seqs = [prompt + [1000 + i] * 5 for i in range(4)]      # 0-3: one prompt, four responses
    seqs.append(list(range(50)) + [7] * 60)                   # 4: shares only 50 tokens with them
    seqs += [[5] * 40, list(range(200, 240)) + [1] * 3, list(range(200, 240)) + [2] * 3]  # 5 alone; 6, 7 pair
    seqs.append(prompt[:20])                                  # 8: a prefix of the others, too short to help
    groups, singles = group_shared_prefixes(seqs, min_shared=32)
    assert groups == [SharedGroup(100, (0, 1, 2, 3)), SharedGroup(40, (6, 7))]
    assert singles == [4, 5, 8]


def test_shared_prefix_leaves_each_member_a_token_of_its_own():
    from reward_server.pipeline.batching import group_shared_prefixes

    groups, singles = group_shared_prefixes([[1] * 50, [1] * 50 + [2], [1] * 50 + [3]], min_shared=10)
    assert [g.prefix_length for g in groups] == [49] and singles == []
    assert group_shared_prefixes([[1] * 50] * 3, min_shared=10)[0][0].prefix_length == 49


def test_pack_sequences_fills_rows_without_exceeding_budget():
    from reward_server.pipeline.batching import pack_sequences

    lengths = [60, 50, 40, 30, 20, 10, 150]
    rows = pack_sequences(lengths, token_budget=100)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert rows[0] == [6]  # longer than the budget: alone
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows[1:])
    assert len(rows) == 1 + 3  # 210 tokens need at least three rows of 100; first-fit finds three
    with pytest.raises(ValueError):
        pack_sequences([1], token_budget=0)
