"""Unit tests of the prompt-cache benchmark's pure workload logic (bench/prefix_cache.py, the
multi-turn and PRM builders of bench/workload.py): no model, no server, about 2 s."""

from __future__ import annotations

import math

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from bench import prefix_cache as pc
from bench import workload
from reward_server.supervisor.demo_checkpoint import LLAMA3_SPECIALS, LLAMA3_TEMPLATE

TAG = pc.STEP_TAG


@pytest.fixture(scope="module")
def encode():
    """A byte-level BPE with the demo tokenizer's specials (and the step tag) and the demo's Llama-3
    chat template, rendered then tokenised with special tokens kept, as ChatEncoder does; trained
    on a few lines so that it builds in milliseconds."""
    sampler = workload._TextSampler(np.random.default_rng(1))
    lines = [sampler.text(40) for _ in range(40)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=600, special_tokens=LLAMA3_SPECIALS + [TAG], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = jinja2.Environment().from_string(LLAMA3_TEMPLATE)

    def run(messages):
        text = template.render(messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=False)
        return tokenizer.encode(text, add_special_tokens=False).ids

    run.tag_id = tokenizer.token_to_id(TAG)
    return run


def _words(text: str) -> int:
    return len(text.split())


def test_multi_turn_is_deterministic_for_a_seed_and_shaped_as_asked():
    spec = workload.MultiTurnSpec(conversations=4, turns=3, seed=5)
    chats = workload.generate_multi_turn(spec)
    assert chats == workload.generate_multi_turn(spec)
    assert chats != workload.generate_multi_turn(workload.MultiTurnSpec(conversations=4, turns=3, seed=6))
    assert len(chats) == 4
    assert [chat[0]["role"] == "system" for chat in chats] == [True, False, True, False]  # exactly half
    for chat in chats:
        turns = chat[1:] if chat[0]["role"] == "system" else chat
        assert [m["role"] for m in turns] == ["user", "assistant"] * 3
        assert all(30 <= _words(m["content"]) <= 80 for m in turns if m["role"] == "user")
        assert all(60 <= _words(m["content"]) <= 150 for m in turns if m["role"] == "assistant")
    with pytest.raises(ValueError):
        workload.generate_multi_turn(workload.MultiTurnSpec(turns=0))


def test_wave_t_extends_wave_t_minus_1_by_one_turn():
    chats = workload.generate_multi_turn(workload.MultiTurnSpec(conversations=3, turns=4))
    waves = workload.multi_turn_waves(chats)
    assert len(waves) == 4 and all(len(wave) == 3 for wave in waves)
    for t in range(1, 4):
        for before, after in zip(waves[t - 1], waves[t]):
            assert after[:len(before)] == before
            assert [m["role"] for m in after[len(before):]] == ["user", "assistant"]
    assert waves[-1] == chats  # the last wave is every whole chat
    assert all(conversation[-1]["role"] == "assistant" for wave in waves for conversation in wave)
    assert len(workload.multi_turn_waves(chats, 2)) == 2
    with pytest.raises(ValueError):
        workload.multi_turn_waves(chats, 5)


def test_waves_are_token_prefixes_so_new_tokens_are_the_last_wave(encode):
    waves = workload.multi_turn_waves(workload.generate_multi_turn(workload.MultiTurnSpec(conversations=3, turns=3)))
    ids = [workload.tokenize(wave, encode) for wave in waves]
    chains = pc.chains_of_waves(ids)
    assert len(chains) == 3 and all(len(chain) == 3 for chain in chains)
    for chain in chains:
        for before, after in zip(chain, chain[1:]):
            assert len(after) > len(before) and after[:len(before)] == before
    # every wave repeats the one before, so a perfect cache computes each chat's tokens once
    assert pc.new_tokens(chains) == sum(len(chain[-1]) for chain in chains)
    assert pc.new_tokens(chains) < sum(len(s) for wave in ids for s in wave)


def test_new_token_counting():
    assert pc.common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert pc.common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert pc.common_prefix_len([], [1]) == 0
    assert pc.new_tokens([]) == 0
    assert pc.new_tokens([[[1, 2, 3]]]) == 3  # the first request counts whole
    assert pc.new_tokens([[[1, 2, 3], [1, 2, 3, 4, 5]]]) == 3 + 2
    assert pc.new_tokens([[[1, 2, 3], [1, 9, 3, 4]]]) == 3 + 3  # diverges after one token
    assert pc.new_tokens([[[1, 2, 3], [7, 8]], [[5], [5, 6]]]) == (3 + 2) + (1 + 1)  # per chain
    assert pc.chains_of_waves([[[1], [2]], [[1, 3], [2, 4]]]) == [[[1], [1, 3]], [[2], [2, 4]]]


def test_prm_problems_are_deterministic_and_calls_extend_each_other(encode):
    spec = workload.PrmSpec(problems=3, steps=5, seed=2)
    problems = workload.generate_prm(spec)
    assert problems == workload.generate_prm(spec)
    assert problems != workload.generate_prm(workload.PrmSpec(problems=3, steps=5, seed=3))
    assert len(problems) == 3 and all(len(steps) == 5 for _, steps in problems)
    assert all(10 <= _words(step) <= 40 and TAG not in step for _, steps in problems for step in steps)
    chains = []
    for prompt, steps in problems:
        calls = workload.prm_calls(prompt, steps, TAG)
        assert len(calls) == 5
        for k, call in enumerate(calls, 1):
            assert call[:-1] == prompt and call[-1]["role"] == "assistant"
            assert call[-1]["content"] == "".join(s + TAG for s in steps[:k])  # as the server's join_steps
        chain = workload.tokenize(calls, encode)
        assert [ids.count(encode.tag_id) for ids in chain] == [1, 2, 3, 4, 5]
        for before, after in zip(chain, chain[1:]):
            # all but the end of the turn (<|eot_id|>) is repeated by the next call
            assert after[:len(before) - 1] == before[:-1] and after[len(before) - 1] != before[-1]
        chains.append(chain)
    assert pc.new_tokens(chains) == sum(len(c[-1]) + len(c) - 1 for c in chains)
    with pytest.raises(ValueError):
        workload.generate_prm(workload.PrmSpec(steps=0))


def test_shareable_tokens_count_group_prefixes_once_per_extra_member():
    prompt_a, prompt_b = list(range(100, 140)), list(range(200, 250))
    ids = [prompt_a + [1], prompt_b + [2, 3], prompt_a + [4, 5], prompt_a + [6], prompt_b + [7], [9] * 60]
    assert pc.shareable_tokens(ids) == 2 * 40 + 1 * 50
    assert pc.shareable_tokens(ids, min_shared=45) == 50  # prompt_a is too short to count
    assert pc.shareable_tokens([[1] * 10, [2] * 10]) == 0


def test_shuffle_is_a_fixed_permutation_and_warm_up_shares_nothing():
    order = pc.shuffled(20, 0)
    assert order == pc.shuffled(20, 0) and sorted(order) == list(range(20)) and order != list(range(20))
    warm = pc.warm_up_rows({0, 100}, 32000)
    assert len(warm) == 8 and all(len(row) == 256 and all(0 <= i < 32000 for i in row) for row in warm)
    assert len({row[0] for row in warm} | {0, 100}) == 10  # no first token shared with the workload or each other
    tagged = pc.warm_up_rows({0}, 2049, tag_id=2048, rows=2, length=64)
    assert all(row[-1] == 2048 and row.count(2048) == 1 and row[0] != 0 for row in tagged)


def test_engine_work_reads_the_prompt_cache_counter_or_zero(monkeypatch):
    text = ('reward_engine_tokens_total{model="reward_engine"} 120\n'
            'reward_engine_shared_tokens_total{model="reward_engine"} 30\n')
    monkeypatch.setattr(pc.grpc_load.urllib.request, "urlopen",
                        lambda url, timeout: type("R", (), {"read": lambda self: text.encode()})())
    assert pc.engine_work("http://x/metrics") == {"tokens": 120.0, "shared_tokens": 30.0,
                                                  "prefix_cache_reused_tokens": 0.0}
    text += 'reward_engine_prefix_cache_reused_tokens_total{model="reward_engine"} 55\n'
    assert pc.engine_work("http://x/metrics")["prefix_cache_reused_tokens"] == 55.0
    assert pc.engine_work(None) is None
    assert pc.work_delta({"tokens": 10.0}, {"tokens": 25.0, "shared_tokens": 3.0}) == {"tokens": 15.0,
                                                                                         "shared_tokens": 3.0}


def test_markdown_reports_every_workload_and_the_goal():
    case = {"description": "d", "tokens": 1000, "new_tokens": 400, "shareable_tokens": None}
    doc = {"command": "python -m bench.prefix_cache", "started": "now", "duration_s": 1.0, "dtype": "float32",
           "repeats": 1, "vllm_version": None, "checkpoint": "c", "prm_checkpoint": "p",
           "machine": {"cpu": "cpu", "logical_cpus": 2, "flags": {"avx2": True, "amx_bf16": False}},
           "load_average": {"before": [1.0, 1.0, 1.0], "after": [2.0, 2.0, 2.0]},
           "results": {"multi-turn": {**case, "server": {"median_s": 2.0, "tok_s": 500.0, "work": {"tokens": 450.0},
                                                          "computed_over_new": 1.125}, "server_over_vllm": math.nan},
                       "prm-steps": {**case, "server": {"median_s": 2.0, "tok_s": 500.0, "work": {"tokens": 600.0},
                                                        "computed_over_new": 1.5},
                                     "vllm": {"error": "boom"}, "server_over_vllm": math.nan}},
           "notes": ["vLLM skipped on prm-steps"]}
    text = pc.markdown(doc)
    assert "| multi-turn | 1,000 | 400 | 2.00 | 500 | - | - | - |" in text
    assert "1.50 (goal <= 1.2: not met)" in text and "| prm-steps | 1,000 | 400 | 2.00 | 500 | failed |" in text
    assert "avx2 yes, amx_bf16 no" in text and "vLLM skipped on prm-steps" in text
