"""The GPU check (bench/gpu_check.sh): its CPU smoke run end to end, its arithmetic, its stage runner,
and its TensorRT-LLM stages against the contract double of the `tensorrt_llm` model."""

from __future__ import annotations

import json
import math
import subprocess
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from bench import gpu_check
from bench.gpu import compare, flops
from bench.gpu.report import CheckFailed, Report, StageSkipped

ROOT = Path(__file__).resolve().parents[1]
TORCH_STAGES = ("environment", "matmul", "checkpoint", "torch_parity", "torch_throughput", "build_dry_run")
TRTLLM_STAGES = ("trtllm_build", "trtllm_logits", "trtllm_throughput", "trtllm_cancel", "trtllm_gemma2",
                 "trtllm_pp")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `bash bench/gpu_check.sh OUT --smoke` run, keeping its work directory for inspection."""
    out = tmp_path_factory.mktemp("gpu-check")
    work = tmp_path_factory.mktemp("gpu-check-work")
    started = time.monotonic()
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--smoke",
                          "--work-dir", str(work), "--keep-work"], capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return Namespace(run=run, out=out, work=work, report=report, seconds=seconds)


def test_smoke_run_passes_every_stage_it_can_run_on_cpu(smoke):
    assert smoke.run.returncode == 0, smoke.run.stdout[-3000:] + smoke.run.stderr[-3000:]
    report = smoke.report
    assert report["mode"] == "smoke" and report["overall"] == "passed"
    assert list(report["stages"]) == list(TORCH_STAGES + TRTLLM_STAGES)
    for name in TORCH_STAGES:
        stage = report["stages"][name]
        assert stage["status"] == "passed", (name, stage["reason"])
        assert stage["seconds"] is not None and stage["timeout_s"] > 0
    importable = not report["machine"]["tensorrt_llm"].startswith("tensorrt_llm: not importable")
    if not importable:  # no machine of this project has it; on a CPU the GPU-only stages are skipped anyway
        for name in TRTLLM_STAGES:
            assert report["stages"][name]["status"] == "skipped"
            assert report["stages"][name]["reason"] == gpu_check.NOT_IMPORTABLE
    # About 10 s on a quiet 2-core machine; the bound only catches a run that went wrong (a big
    # shape, a stage waiting for its limit), not a busy machine.
    assert report["elapsed_s"] < 120, f"the smoke stages took {report['elapsed_s']:.0f}s"
    assert f"{smoke.out}/gpu_check.json" in smoke.run.stdout


def test_smoke_run_compares_the_engine_with_transformers(smoke):
    parity = smoke.report["stages"]["torch_parity"]["results"]
    result = parity["engine_vs_reference"]
    assert result["n"] == parity["conversations"] == 6
    # fp32 on CPU: packed attention and transformers agree to float rounding.
    assert result["max_abs"] < 1e-4 and result["max_abs_over_spread"] < 1e-4
    assert result["within_tolerance"] and result["tolerance"] == pytest.approx(1e-3 * result["spread"])
    assert result["order_agreement"] == 1.0
    assert parity["ids_equal_chat_template"] == 6
    assert len(set(parity["reference_scores"])) == 6  # distinct scores: the comparison is not vacuous


def test_smoke_run_reports_throughput_against_the_matmul_rate(smoke):
    matmul = smoke.report["stages"]["matmul"]["results"]["tflops_per_s"]
    for name in ("grpo", "no-sharing"):
        result = smoke.report["stages"]["torch_throughput"]["results"][name]
        assert result["conversations"] == 8 and result["tokens"] > 8 * 40
        assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["seconds"])
        assert result["pct_of_matmul"] == pytest.approx(100 * result["model_tflops_per_s"] / matmul)
    grpo = smoke.report["stages"]["torch_throughput"]["results"]["grpo"]
    assert grpo["tokens_computed"] < grpo["tokens"]  # shared prompts computed once
    assert smoke.report["summary"]["torch_tokens_per_s_grpo"] > 0


def test_smoke_run_checks_the_dry_run_plans(smoke):
    dry = smoke.report["stages"]["build_dry_run"]["results"]
    for tp in ("tp1", "tp2"):
        assert dry[tp]["exit_code"] == 0 and dry[tp]["gathers_generation_logits"]
    assert (smoke.out / "logs" / "build_engine_dry_run_tp2.log").read_text().count("--tp 2") >= 1


def test_smoke_checkpoint_is_sharded_and_readable_by_older_transformers(smoke):
    checkpoint = smoke.work / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["rope_theta"] == 500000.0 and config["torch_dtype"] == "float32"
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    eot = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|eot_id|>")
    assert config["pad_token_id"] == eot
    assert (checkpoint / "model.safetensors.index.json").exists()
    built = smoke.report["stages"]["checkpoint"]["results"]
    assert built["shards"] >= 2 and built["parameters"] == flops.parameters(flops.SMOKE, head_rows=1)


def test_smoke_markdown_has_a_row_per_stage(smoke):
    text = (smoke.out / "gpu_check.md").read_text()
    for name in TORCH_STAGES + TRTLLM_STAGES:
        assert f"| {name} | " in text
    assert "| gpu | " not in text and "| cuda_available | False |" in text


# Arithmetic.

def test_parameter_counts_match_the_published_llama_models():
    assert flops.parameters(flops.LLAMA31_8B) == 8_030_261_248
    assert flops.parameters(flops.LLAMA31_70B) == 70_553_706_496
    # The reward checkpoint: a one-row score head instead of the 128,256-row LM head.
    assert flops.parameters(flops.LLAMA31_8B, head_rows=1) == 8_030_261_248 - 128_255 * 4096


def test_attention_flops_count_every_causal_pair():
    shape = flops.SMOKE
    for length in (1, 2, 7):
        pairs = sum(1 for query in range(length) for key in range(query + 1))
        per_pair = 2 * 2 * shape.heads * shape.head_dim  # QK^T and AV, 2 FLOPs per multiply-add
        assert flops.attention_flops(shape, length) == shape.layers * per_pair * pairs


def test_throughput_arithmetic_by_hand():
    # SMOKE: per layer q,o 2*64*64 + k,v 2*64*32 + MLP 3*64*128 = 36,864 weights; 2 layers, 2 FLOPs each.
    assert flops.flops_per_token(flops.SMOKE) == 147_456
    # attention: 2 layers * 4 * 64 * L(L+1)/2 = 256 L(L+1): 28,160 for L=10, 107,520 for L=20.
    result = flops.throughput(flops.SMOKE, [10, 20], seconds=2.0, matmul_flops_per_s=1e12)
    assert result.model_flops == 30 * 147_456 + 28_160 + 107_520 == 4_559_360
    assert result.tokens_per_s == 15.0
    assert result.model_tflops_per_s == pytest.approx(4_559_360 / 2 / 1e12)
    assert result.pct_of_matmul == pytest.approx(100 * 4_559_360 / 2 / 1e12)
    assert math.isnan(flops.throughput(flops.SMOKE, [10], seconds=0.0, matmul_flops_per_s=1e12).tokens_per_s)
    assert flops.matmul_flops(8192) == 2 * 8192 ** 3


def test_kv_cache_sizing():
    assert flops.kv_bytes_per_token(flops.LLAMA31_8B, 2) == 131_072       # 128 KiB per token in bf16
    assert flops.kv_bytes_per_token(flops.LLAMA31_70B, 2) == 327_680      # 320 KiB
    assert flops.kv_bytes_per_token(flops.LLAMA31_70B, 1) == 163_840      # fp8 KV
    # 80 GB card, 16 GB of weights, no reserve: 0.9 * 64e9 / 131072 tokens.
    assert flops.kv_tokens(flops.LLAMA31_8B, 80e9, 1, 16e9, 2) == int(0.9 * 64e9 // 131_072)
    # tp 2 halves each GPU's share of a token.
    assert flops.kv_tokens(flops.LLAMA31_8B, 80e9, 2, 8e9, 2) == int(0.9 * 72e9 // 65_536)
    assert flops.kv_tokens(flops.LLAMA31_70B, 80e9, 1, 141e9, 2) == 0


# Comparisons.

def test_tolerance_is_a_fraction_of_the_score_spread():
    reference = np.array([[0.0], [2.0], [4.0]])
    assert compare.spread(reference) == pytest.approx(np.std([0, 2, 4]))
    assert compare.tolerance(reference, "bfloat16") == pytest.approx(0.05 * np.std([0, 2, 4]))
    close = compare.compare(reference + 0.05, reference, "bfloat16", groups=[0, 0, 0])
    assert close["within_tolerance"] and close["order_agreement"] == 1.0 and close["max_abs"] == pytest.approx(0.05)
    far = compare.compare(reference[::-1].copy(), reference, "bfloat16", groups=[0, 0, 0])
    assert not far["within_tolerance"] and far["order_agreement"] == 0.0
    assert not compare.compare(reference + 0.05, reference, "float32")["within_tolerance"]
    with pytest.raises(ValueError):
        compare.compare(reference[:2], reference, "bfloat16")


def test_position_classification():
    last, following = np.array([1.0, -2.0]), np.array([0.2, 0.5])
    assert compare.classify_position(last + 0.01, last, following, tol=0.05) == compare.LAST_PROMPT
    assert compare.classify_position(following, last, following, tol=0.05) == compare.NEXT
    assert compare.classify_position(np.array([9.0, 9.0]), last, following, tol=0.05) == compare.NEITHER
    # both within tolerance: the nearer reference wins
    assert compare.classify_position(np.array([0.03]), np.array([0.0]), np.array([0.04]), tol=0.05) == compare.NEXT


def test_order_agreement_counts_only_pairs_within_a_group():
    assert compare.order_agreement([1, 2, 9, 0], [1, 2, 0, 9], groups=[0, 0, 1, 1]) == 0.5
    assert math.isnan(compare.order_agreement([1, 2], [1, 2], groups=[0, 1]))


# The stage runner.

def test_stage_runner_records_each_outcome_and_keeps_going(tmp_path):
    report = Report(tmp_path, "smoke", ["ok", "slow", "bad", "broken", "skip", "after"], budget_s=60, settings={})
    seen = {}

    def ok(out):
        seen["while_running"] = json.loads(report.json_path.read_text())["stages"]["ok"]["status"]
        out["value"] = 1

    def slow(out):
        out["partial"] = "kept"
        time.sleep(5)

    def bad(out):
        raise CheckFailed("value out of tolerance")

    def broken(out):
        raise RuntimeError("boom")

    def skip(out):
        raise StageSkipped("no GPU")

    assert report.run("ok", ok, timeout_s=10)
    assert not report.run("slow", slow, timeout_s=0.5)
    assert not report.run("bad", bad, timeout_s=10)
    assert not report.run("broken", broken, timeout_s=10)
    assert not report.run("skip", skip, timeout_s=10)
    assert report.run("after", lambda out: None, timeout_s=10)
    data = json.loads(report.json_path.read_text())
    stages = data["stages"]
    assert seen["while_running"] == "running"
    assert [stages[n]["status"] for n in stages] == ["passed", "timeout", "failed", "failed", "skipped", "passed"]
    assert stages["slow"]["results"]["partial"] == "kept" and stages["slow"]["seconds"] < 3
    assert stages["bad"]["reason"] == "value out of tolerance"
    assert stages["broken"]["reason"] == "RuntimeError: boom" and "boom" in stages["broken"]["results"]["traceback"]
    assert report.finish() == "failed"
    assert "| slow | timeout |" in report.markdown_path.read_text()


def test_stage_runner_skips_stages_when_the_budget_is_spent(tmp_path):
    report = Report(tmp_path, "smoke", ["first", "second"], budget_s=1.2, settings={})
    assert report.run("first", lambda out: time.sleep(0.5), timeout_s=10)
    assert not report.run("second", lambda out: None, timeout_s=10, min_s=5)
    second = json.loads(report.json_path.read_text())["stages"]["second"]
    assert second["status"] == "skipped" and second["reason"].startswith("budget exhausted")
    assert report.finish() == "passed"


# The TensorRT-LLM stages, against the contract double (tests/trtllm_double) in a real tritonserver.

def test_trtllm_stages_against_the_contract_double(trtllm_server, demo_checkpoint, tmp_path, monkeypatch):
    report = Report(tmp_path / "out", "smoke", ["trtllm_logits", "trtllm_throughput"], budget_s=240, settings={})
    args = Namespace(keep_work=True, work_dir=tmp_path, seed=0)
    ctx = gpu_check.Context(args=args, run=gpu_check.SMOKE_RUN, report=report, work=tmp_path, logs=tmp_path / "logs",
                            shape=flops.SMOKE, trtllm_shape=flops.SMOKE, trtllm_version="contract double",
                            matmul_flops_per_s=1e11, trtllm_checkpoint=Path(demo_checkpoint),
                            engine_dir=tmp_path / "unused")
    # The stages normally refuse to run without a GPU and start their own server on the built engine.
    monkeypatch.setattr(gpu_check, "_require_trtllm", lambda ctx: None)
    monkeypatch.setattr(gpu_check, "start_server", lambda ctx, engine_dir, startup_timeout_s: trtllm_server)
    try:
        assert report.run("trtllm_logits", lambda out: gpu_check.stage_trtllm_logits(ctx, out), timeout_s=120), \
            report.data["stages"]["trtllm_logits"]
        assert report.run("trtllm_throughput", lambda out: gpu_check.stage_trtllm_throughput(ctx, out),
                          timeout_s=120), report.data["stages"]["trtllm_throughput"]
    finally:
        ctx.server = None  # the fixture's server is stopped by the fixture
    logits = report.results("trtllm_logits")
    direct = logits["engine_direct"]
    assert direct["positions"] == {compare.LAST_PROMPT: 6}
    assert direct["generation_logits_shapes"] == [[1, 1, 1, json.loads(
        (Path(demo_checkpoint) / "config.json").read_text())["vocab_size"]]]
    assert direct["max_abs_non_reward_logits"] == 0.0  # the adapted head's rows past K are zero
    assert direct["vs_last_prompt"]["max_abs"] < 1e-4 and not direct["vs_next_position"]["within_tolerance"]
    assert logits["served_vs_reference"]["within_tolerance"] and logits["served_num_tokens_equal"] == 6
    for name in ("grpo", "no-sharing"):
        result = report.results("trtllm_throughput")[name]
        assert result["engine_all_in_flight"]["tokens_per_s"] > 0 and result["served_reward"]["tokens_per_s"] > 0
        kv = result["kv_cache"]  # the fan-out's counters, as the double's block cache reports them
        assert kv["requests"] == 8 and kv["total_blocks"] >= 8 and kv["note"] is None
        # the warm-up filled the double's cache with the same sequences: at least what leader-first shares
        assert kv["reused_blocks"] >= kv["shareable_blocks"]


def test_shareable_blocks_by_hand():
    prompt = list(range(70))  # two whole blocks of 32
    group = [prompt + [100, 101], prompt + [102] * 40, prompt[:40] + [7], [5] * 80]
    # request of 4: the 2nd shares 70 tokens with the 1st (2 blocks); the 3rd 40 (1 block, its last
    # token in the 2nd); the 4th nothing
    assert gpu_check.shareable_blocks(group, request_size=4) == 2 + 1 + 0
    assert gpu_check.shareable_blocks(group, request_size=1) == 0  # the fan-out groups within a request
    before, after = {"requests": 2, "reused_blocks": 1, "total_blocks": 10}, {"requests": 6, "reused_blocks": 3,
                                                                             "total_blocks": 22}
    kv = gpu_check.kv_cache_reuse(before, after, group, request_size=4)
    assert (kv["requests"], kv["reused_blocks"], kv["total_blocks"], kv["reuse_of_shareable"]) == (4, 2, 12, 0.667)


def test_time_is_kept_for_the_tensorrt_llm_stages_only_when_they_will_run(tmp_path):
    report = Report(tmp_path, "gpu", ["environment"], budget_s=60, settings={})
    args = Namespace(trtllm_reserve_s=240)
    ctx = gpu_check.Context(args=args, run=gpu_check.GPU_RUN, report=report, work=tmp_path, logs=tmp_path,
                            shape=flops.LLAMA31_8B, trtllm_shape=flops.LLAMA31_8B.with_layers(8),
                            trtllm_version="1.2.1")
    assert gpu_check._trtllm_reserve(ctx, skipped=set()) == 240
    assert gpu_check._trtllm_reserve(ctx, skipped={"trtllm_build"}) == 0
    ctx.trtllm_version = None
    assert gpu_check._trtllm_reserve(ctx, skipped=set()) == 0


def test_stages_deferred_for_tensorrt_llm_run_after_it(tmp_path, monkeypatch):
    # Pretend tensorrt_llm was found and needs all the time left: the PyTorch stages after the
    # environment are deferred, then run at the end because the TensorRT-LLM ones skip.
    monkeypatch.setattr(gpu_check, "_trtllm_reserve", lambda ctx, skipped: ctx.report.remaining()
                        if ctx.report.status("environment") == "passed" else 0.0)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", "110"]) == 0
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert stages["environment"]["status"] == "passed" and "deferred" not in stages["environment"]["results"]
    for name in TORCH_STAGES[1:]:
        assert stages[name]["status"] == "passed" and stages[name]["reason"] is None, name
        assert stages[name]["results"]["deferred"] is True
