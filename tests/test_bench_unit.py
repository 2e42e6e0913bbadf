"""Fast tests of the benchmark harness: workload generator, metrics maths, report, wire encoding."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import grpc_load, metrics, report, workload
from bench.perf_analyzer import make_input


def _prompt(conversation):
    return conversation[:-1]


# ---------------------------------------------------------------- workload generator

def test_workload_is_deterministic_for_a_seed():
    spec = workload.WorkloadSpec(prompts=4, responses_per_prompt=3, seed=7)
    assert workload.generate(spec).conversations == workload.generate(spec).conversations
    other = workload.generate(workload.WorkloadSpec(prompts=4, responses_per_prompt=3, seed=8))
    assert other.conversations != workload.generate(spec).conversations


def test_grpo_groups_share_their_prompt_and_differ_in_the_response():
    w = workload.generate(workload.WorkloadSpec(prompts=5, responses_per_prompt=4, seed=1))
    assert len(w) == 20
    assert w.group_ids == [i // 4 for i in range(20)]
    for group in range(5):
        members = w.conversations[group * 4:(group + 1) * 4]
        assert all(_prompt(c) == _prompt(members[0]) for c in members)
        assert len({c[-1]["content"] for c in members}) == 4
        assert all(c[-1]["role"] == "assistant" and c[-2]["role"] == "user" for c in members)
    assert len({json.dumps(_prompt(c)) for c in w.conversations}) == 5


def test_no_sharing_variant_gives_every_conversation_its_own_prompt():
    w = workload.generate(workload.WorkloadSpec(prompts=5, responses_per_prompt=4, shared_prompt=False, seed=1))
    assert w.spec.name == "no-sharing"
    assert len(w) == 20 and w.group_ids == list(range(20))
    assert len({c[-2]["content"] for c in w.conversations}) == 20


def test_lengths_are_log_normal_with_the_requested_median_and_clipped():
    spec = workload.WorkloadSpec(prompts=400, responses_per_prompt=2, prompt_words_median=50,
                                 prompt_words_sigma=0.6, response_words_median=100,
                                 response_words_sigma=0.5, max_words=400, seed=3)
    w = workload.generate(spec)
    prompts = np.array([len(c[-2]["content"].split()) for c in w.conversations[::2]])
    responses = np.array([len(c[-1]["content"].split()) for c in w.conversations])
    assert 0.85 * 50 < np.median(prompts) < 1.15 * 50
    assert 0.85 * 100 < np.median(responses) < 1.15 * 100
    assert 0.5 < np.log(prompts).std() < 0.7
    assert 0.42 < np.log(responses).std() < 0.58
    assert responses.max() <= 400 and prompts.min() >= spec.min_words


def test_some_prompts_have_a_system_message():
    w = workload.generate(workload.WorkloadSpec(prompts=40, responses_per_prompt=1, seed=2))
    with_system = sum(c[0]["role"] == "system" for c in w.conversations)
    assert 5 < with_system < 35


def test_generate_rejects_empty_shapes():
    with pytest.raises(ValueError):
        workload.generate(workload.WorkloadSpec(prompts=0))


def test_tokenised_groups_share_a_token_prefix(demo_checkpoint):
    w = workload.generate(workload.WorkloadSpec(prompts=2, responses_per_prompt=3, prompt_words_median=20,
                                                response_words_median=15, seed=4))
    ids = workload.tokenize(w.conversations, workload.load_encoder(demo_checkpoint))
    # The harness tokenises exactly like the template path (and so like the server).
    assert ids == workload.tokenize(w.conversations, workload.template_encoder(demo_checkpoint))
    encode = workload.template_encoder(demo_checkpoint)
    prompt_lengths = [len(encode(_prompt(w.conversations[g * 3]))) for g in range(2)]
    for group, length in enumerate(prompt_lengths):
        members = ids[group * 3:(group + 1) * 3]
        assert members[0][:length] == members[1][:length] == members[2][:length]
    # Each group's prompt is computed once instead of three times.
    assert metrics.unique_tokens(ids) <= sum(map(len, ids)) - 2 * sum(prompt_lengths)


def test_naive_baseline_padding_does_not_change_scores(demo_checkpoint):
    from bench.baselines import NaiveBaseline

    w = workload.generate(workload.WorkloadSpec(prompts=2, responses_per_prompt=3, prompt_words_median=15,
                                                response_words_median=10, seed=5))
    ids = workload.tokenize(w.conversations, workload.template_encoder(demo_checkpoint))
    naive = NaiveBaseline(demo_checkpoint, threads=1, batch_size=4)
    run = naive.run(ids)
    alone = np.concatenate([naive.run([s]).scores for s in ids])
    assert run.scores.shape == (6, 1) and len(run.latencies) == 2
    np.testing.assert_allclose(run.scores, alone, rtol=1e-4, atol=1e-5)
    lengths = [len(s) for s in ids]
    assert run.padding_ratio == pytest.approx(metrics.padding_ratio(lengths, [[0, 1, 2, 3], [4, 5]]))


# ---------------------------------------------------------------- metrics maths

def test_unique_tokens_counts_prefix_trie_nodes():
    assert metrics.unique_tokens([[1, 2, 3], [1, 2, 4], [1, 5], [6]]) == 6
    assert metrics.unique_tokens([[1, 2], [1, 2]]) == 2
    assert metrics.unique_tokens([[1, 2], [1, 2, 3]]) == 3
    assert metrics.unique_tokens([[7, 1], [8, 1]]) == 4
    assert metrics.unique_tokens([]) == 0


def test_padding_ratio_and_fixed_batches():
    assert metrics.padded_batches([5, 5, 5, 5, 5], 2) == [[0, 1], [2, 3], [4]]
    lengths = [2, 4, 3, 3]
    # batch 1 computes 2x4=8 for 6 real; batch 2 computes 6 for 6 real -> 2/14 padding.
    assert metrics.padding_ratio(lengths, [[0, 1], [2, 3]]) == pytest.approx(2 / 14)
    assert metrics.padding_ratio(lengths, [[0], [1], [2], [3]]) == 0.0
    assert metrics.padding_ratio([], []) == 0.0
    with pytest.raises(ValueError):
        metrics.padded_batches([1], 0)


def test_medians_percentiles_and_ratios():
    assert metrics.median([3.0, 1.0, 2.0]) == 2.0
    assert metrics.median([1.0, float("nan"), 3.0]) == 2.0
    assert math.isnan(metrics.median([]))
    assert metrics.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert metrics.percentile([4.0], 99) == 4.0
    assert metrics.ratio(6.0, 2.0) == 3.0
    assert math.isnan(metrics.ratio(1.0, 0.0))
    assert math.isnan(metrics.ratio(float("nan"), 2.0))
    assert metrics.flop_rate(10, 5, 2.0) == 50.0


def test_summarize_repeats_takes_medians_over_repeats():
    runs = [{"seconds": 3.0, "latencies": [1.0, 2.0], "padding_ratio": 0.3},
            {"seconds": 1.0, "latencies": [0.5, 0.5], "padding_ratio": 0.1},
            {"seconds": 2.0, "latencies": [1.0, 1.0], "padding_ratio": 0.2}]
    m = metrics.summarize_repeats("engine", "grpo", 10, 1000, 600, runs)
    assert m.seconds == 2.0 and m.repeats == [3.0, 1.0, 2.0]
    assert m.latency_p50_s == 1.0
    assert m.latency_p99_s == pytest.approx(1.0)
    assert m.padding_ratio == pytest.approx(0.2)
    assert m.tokens_per_s == 500.0 and m.conversations_per_s == 5.0


def test_measurement_rates_against_peak_and_naive():
    naive = metrics.Measurement("naive", "grpo", 10, 1000, 600, seconds=4.0, latency_p50_s=1, latency_p99_s=1)
    fast = metrics.Measurement("engine", "grpo", 10, 1000, 600, seconds=1.0, latency_p50_s=1, latency_p99_s=1)
    record = fast.to_dict(params=1_000_000, peak_flops=2.4e9, reference=naive)
    assert record["effective_gflops"] == pytest.approx(2 * 1e6 * 600 / 1.0 / 1e9)
    assert record["effective_pct_of_peak"] == pytest.approx(50.0)
    assert record["model_gflops"] == pytest.approx(2.0)
    assert record["speedup_vs_naive"] == pytest.approx(4.0)
    assert record["unique_tokens_per_s"] == 600.0


def test_non_embedding_parameters_skips_the_embedding_table(tmp_path):
    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.zeros((100, 4), np.float32),
               "model.layers.0.mlp.up_proj.weight": np.zeros((8, 4), np.float32),
               "score.weight": np.zeros((1, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    assert metrics.non_embedding_parameters(tmp_path) == 36
    with pytest.raises(FileNotFoundError):
        metrics.non_embedding_parameters(tmp_path / "missing")


# ---------------------------------------------------------------- report

def _document(server_tps: float, engine_seconds: float = 2.0) -> dict:
    def rec(system, seconds, concurrency=None, speedup=math.nan, tps=math.nan):
        return {"system": system, "workload": "grpo", "concurrency": concurrency, "seconds": seconds,
                "tokens_per_s": tps, "speedup_vs_naive": speedup, "effective_pct_of_peak": 70.0,
                "conversations_per_s": 1.0, "latency_p50_s": 0.1, "latency_p99_s": 0.2,
                "padding_ratio": 0.05, "effective_gflops": 1.0, "extra": {}}
    results = [rec("naive", 10.0, speedup=1.0, tps=100.0), rec("engine", engine_seconds, speedup=5.0, tps=500.0),
               rec("server", 2.1, 1, speedup=server_tps / 100, tps=server_tps),
               rec("server", 10.0, 2, speedup=1.0, tps=100.0)]
    return {"workloads": {"grpo": {"conversations": 1, "tokens": 1000, "unique_tokens": 800, "max_tokens": 10}},
            "results": results, "machine": {"cpu": "test"}, "matmul_peak": {"gflops": 100.0},
            "command": "x", "started": "now", "duration_s": 60.0, "checkpoint": "c",
            "non_embedding_params": 1e6, "repeats": 3, "load_average_1min": {"start": 0.1, "end": 0.2}, "request_size": 8, "notes": ["n"]}


def test_summary_picks_the_best_concurrency_and_checks_targets():
    doc = _document(server_tps=476.0)
    summary = report.summarize(doc)
    grpo = summary["workloads"]["grpo"]
    assert grpo["server_best_concurrency"] == 1
    assert grpo["server_vs_naive"] == pytest.approx(4.76)
    assert grpo["server_overhead_pct"] == pytest.approx(5.0)
    targets = {t["name"]: t for t in summary["targets"]}
    assert targets["server_vs_naive_grpo"]["met"] is True
    assert targets["server_overhead_pct_max"]["met"] is True
    assert targets["engine_effective_pct_of_peak"]["met"] is True
    assert targets["server_vs_vllm_grpo"]["met"] is None
    doc["summary"] = summary
    text = report.markdown(doc)
    assert "| grpo | server | 1 |" in text and "not measured" in text


def test_overhead_target_fails_when_the_server_is_much_slower_than_the_engine():
    targets = {t["name"]: t for t in report.summarize(_document(server_tps=476.0, engine_seconds=1.0))["targets"]}
    assert targets["server_overhead_pct_max"]["value"] == pytest.approx(110.0)
    assert targets["server_overhead_pct_max"]["met"] is False


# ---------------------------------------------------------------- wire encodings

def test_grpc_rows_and_request_split():
    conversations = [[{"role": "user", "content": "é"}, {"role": "assistant", "content": str(i)}] for i in range(5)]
    rows = grpc_load.encode_rows(conversations)
    assert rows.shape == (5, 1) and rows.dtype == object
    assert json.loads(rows[3, 0].decode("utf-8")) == conversations[3]
    assert grpc_load.split_requests(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError):
        grpc_load.split_requests(5, 257)


def test_engine_work_counters_from_metrics_text_and_deltas():
    from bench import run

    text = ("# HELP reward_engine_tokens_total Number of tokens\n"
            'reward_engine_tokens_total{model="reward_engine"} 900\n'
            'reward_engine_padded_tokens_total{model="reward_engine"} 1000\n'
            'reward_engine_tokens_total{model="reward_engine_b"} 100\n'
            'nv_inference_count{model="reward"} 5\n')
    after = grpc_load.parse_engine_counters(text)
    assert after == {"tokens": 1000.0, "padded_tokens": 1000.0}
    assert grpc_load.parse_engine_counters("nv_inference_count 1\n") is None
    work = run._counter_delta({"tokens": 200.0, "padded_tokens": 100.0}, after)
    assert work == {"tokens": 800.0, "padded_tokens": 900.0}
    assert run._padding(work) == pytest.approx(1 / 9)
    assert math.isnan(run._padding(None)) and run._counter_delta(None, after) is None


def test_perf_analyzer_input_data_has_one_step_per_conversation():
    conversations = workload.generate(workload.WorkloadSpec(prompts=2, responses_per_prompt=2)).conversations
    document = make_input.input_data(conversations)
    assert len(document["data"]) == 4
    step = document["data"][1]["messages"]
    assert step["shape"] == [1]
    assert json.loads(step["content"][0]) == conversations[1]


def test_named_workload_specs():
    from bench import workload

    large = workload.spec_for("grpo-large", prompts=3, responses=2)
    assert (large.prompts, large.responses_per_prompt, large.name) == (16, 16, "grpo-large")
    assert large.prompt_words_median * 2 >= 500 and large.response_words_median * 2 >= 800  # ~2 tokens a word
    assert workload.spec_for("grpo", prompts=3, responses=2).name == "grpo"
    assert workload.spec_for("no-sharing").shared_prompt is False
    with pytest.raises(ValueError, match="unknown workload"):
        workload.spec_for("grpo-huge")


def test_long_workload_is_groups_of_2k_to_8k_token_responses():
    from bench import workload

    spec = workload.spec_for("long", prompts=16, responses=8)
    generated = workload.generate(spec)
    assert (spec.name, len(generated), len(set(generated.group_ids))) == ("long", 8, 2)
    responses = [len(c[-1]["content"].split()) for c in generated.conversations]
    prompts = [len(c[-2]["content"].split()) for c in generated.conversations]
    assert min(responses) >= 1000 and max(responses) <= 4000  # ~2 tokens a word: 2k to 8k tokens
    assert max(prompts) < 1000  # only the responses are long


def test_matmul_peak_in_each_dtype():
    from bench import baselines

    for dtype in ("float32", "bfloat16"):
        result = baselines.matmul_peak(size=64, repeats=2, threads=1, dtype=dtype)
        assert result["dtype"] == dtype and result["gflops"] > 0
        # the peak is the fastest kernel measured (oneDNN prepacked among them where torch has it)
        assert result["gflops"] == max(result["kernels"].values()) == result["kernels"][result["kernel"]]
        assert {"torch.mm", "F.linear"} <= set(result["kernels"])


def test_small_long_demo_size_is_small_accepting_32k_tokens():
    from dataclasses import replace

    from reward_server.supervisor.demo_checkpoint import SIZES

    assert SIZES["small-long"].positions >= 16384
    assert replace(SIZES["small-long"], positions=SIZES["small"].positions) == SIZES["small"]
