"""perf_analyzer drives the real `reward` ensemble over gRPC, so that integration cannot silently break."""

from __future__ import annotations

import pytest

from bench import workload
from bench.perf_analyzer import make_input
from bench.perf_analyzer import run as perf

REQUESTS_PER_LEVEL = 12
BATCH = 4


def _perf_analyzer_or_skip():
    try:
        binary = perf.find_binary()
    except perf.PerfAnalyzerError as err:
        pytest.skip(str(err))
    missing = perf.missing_libraries(binary)
    if missing:
        pytest.skip(f"perf_analyzer cannot load {', '.join(missing)} ({perf.setup_hint(missing)})")
    return binary


def _reward_stats(url: str) -> tuple[int, int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("reward", as_json=True)["model_stats"][0]["inference_stats"]
    finally:
        client.close()
    return int(stats.get("success", {}).get("count", 0)), int(stats.get("fail", {}).get("count", 0))


def test_perf_analyzer_completes_requests_without_errors(server, tmp_path):
    _perf_analyzer_or_skip()
    # Short conversations: the test server rejects inputs over 256 tokens.
    spec = workload.WorkloadSpec(prompts=3, responses_per_prompt=BATCH, prompt_words_median=20,
                                 response_words_median=25, max_words=45, seed=11)
    data = make_input.write_input(tmp_path / "input.json", spec)
    success_before, fail_before = _reward_stats(server.grpc_url)

    result = perf.run(server.grpc_url, data, concurrency=[1, 2], batch_size=BATCH,
                      request_count=REQUESTS_PER_LEVEL, timeout_s=240)

    assert [row["Concurrency"] for row in result.rows] == ["1", "2"]
    assert all(float(row["Inferences/Second"]) > 0 for row in result.rows)
    assert all(float(row["p99 latency"]) > 0 for row in result.rows)
    success_after, fail_after = _reward_stats(server.grpc_url)
    assert fail_after == fail_before
    assert success_after - success_before >= 2 * REQUESTS_PER_LEVEL
    csv_path = result.write_csv(tmp_path / "perf.csv")
    assert csv_path.read_text().splitlines()[0].startswith("Batch Size,Concurrency,Inferences/Second")


def test_missing_cuda_runtime_is_reported_by_name(tmp_path):
    binary = _perf_analyzer_or_skip()
    # Without the wheel's lib folder on LD_LIBRARY_PATH the loader cannot find libcudart.
    missing = perf.missing_libraries(binary, env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(tmp_path)})
    if perf.cuda_runtime_lib_dir() is None or not missing:
        pytest.skip("libcudart.so.12 is installed system-wide here")
    assert "libcudart.so.12" in missing
    assert "nvidia-cuda-runtime-cu12" in perf.setup_hint(missing)
