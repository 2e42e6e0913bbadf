"""The TensorRT-LLM ensembles in a real tritonserver, with the contract double of `tensorrt_llm`.

The public-contract tests (parity, bad input, batching) run on both engines in test_server.py;
here: what is particular to this path (one engine request per conversation, the same answers as
the PyTorch engine), and the launcher's refusals before anything starts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bench.gpu_check import kv_cache_counters
from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.server import TritonServer
from reward_server.supervisor.trtllm_engine import check_host, open_engine
from tests.conversations import make_conversations
from tests.test_server import score_grpc, score_ids
from tests.trtllm_double import engine_dir_for

CONVERSATIONS = make_conversations(10, seed=21)


def _inference_count(url: str, model: str) -> tuple[int, int]:
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_each_conversation_is_one_engine_request_of_batch_one(trtllm_server):
    before = _inference_count(trtllm_server.grpc_url, "tensorrt_llm")
    score_grpc(trtllm_server.grpc_url, CONVERSATIONS)
    after = _inference_count(trtllm_server.grpc_url, "tensorrt_llm")
    # 10 conversations in one public request -> 10 engine requests of one sequence each
    assert after[0] - before[0] == len(CONVERSATIONS)
    assert after[1] - before[1] >= 1


def test_same_answers_as_the_pytorch_engine(server, trtllm_server):
    torch_out, trt_out = score_grpc(server.grpc_url, CONVERSATIONS), score_grpc(trtllm_server.grpc_url, CONVERSATIONS)
    for name in ("score", "attributes"):
        np.testing.assert_allclose(trt_out[name], torch_out[name], rtol=1e-4, atol=1e-6)
    for name in ("num_tokens", "truncated"):  # the engine's input is cut; the reported length is not
        assert trt_out[name].tolist() == torch_out[name].tolist()


def test_served_model_set_and_engine_parameters(trtllm_server):
    client = grpcclient.InferenceServerClient(trtllm_server.grpc_url)
    for name in ("reward", "reward_ids", "reward_engine_trtllm", "tensorrt_llm"):
        assert client.is_model_ready(name)
    assert not client.is_model_ready("reward_engine")  # one engine per server
    config = client.get_model_config("tensorrt_llm", as_json=True)["config"]["parameters"]
    assert config["gpt_model_path"]["string_value"] == str(trtllm_server.serving.layout.engine)
    assert config["enable_chunked_context"]["string_value"] == "true"
    ensemble = client.get_model_config("reward_pipeline", as_json=True)["config"]["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in ensemble] == ["preprocessing", "reward_engine_trtllm", "postprocessing"]


def test_kv_cache_reuse_of_a_shared_prompt_is_measured(trtllm_server, demo_checkpoint):
    """The fan-out asks for each request's KV-cache counters and exports them; with the double's
    block cache (32-token blocks, reusable once the filling request finished), leader-first makes
    every follower of a group find the prompt's whole blocks cached."""
    config = json.loads((demo_checkpoint / "config.json").read_text())
    rng = np.random.default_rng(5)
    usable = [i for i in range(300, config["vocab_size"]) if i not in (config.get("pad_token_id"),
                                                                      config.get("bos_token_id"), config.get("eos_token_id"))]
    prompt = rng.choice(usable, 75).tolist()                     # fresh: nothing of it is cached yet
    responses = [[usable[k]] + rng.choice(usable, n).tolist() for k, n in enumerate((10, 40, 3, 70))]
    sequences = [prompt + r for r in responses]
    before = kv_cache_counters(trtllm_server.metrics_url)
    score_ids(trtllm_server.grpc_url, sequences)
    after = kv_cache_counters(trtllm_server.metrics_url)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    # the leader (the first) reuses nothing; each follower reuses the prompt's 2 whole blocks (64 of
    # its 75 tokens), but never the block holding its own last token
    expected = sum(min(75 // 32, (len(s) - 1) // 32) for s in sequences[1:])
    assert delta["requests"] == len(sequences)
    assert delta["reused_blocks"] == expected == 2 + 2 + 2
    assert delta["total_blocks"] == sum(-(-(len(s) + 1) // 32) for s in sequences)


def test_double_refuses_a_config_the_backend_would_not_load(demo_checkpoint, tmp_path):
    """The real backend reads tokenizer_dir (and two more) with no default: without it the model
    fails to load. The double does the same, so such a config fails here, not on the first GPU."""
    from google.protobuf import text_format

    from reward_server.supervisor.repository import model_config
    from reward_server.supervisor.tritonserver import ServerStartError
    from tests.trtllm_double import repository_with_double

    repository = repository_with_double(tmp_path / "repo")
    config = model_config(repository / "tensorrt_llm")
    del config.parameters["tokenizer_dir"]
    (repository / "tensorrt_llm" / "config.pbtxt").write_text(text_format.MessageToString(config))
    options = ServeOptions(engine="tensorrt_llm", engine_dir=engine_dir_for(demo_checkpoint, tmp_path / "e"),
                           model_repository=repository, startup_timeout_s=120)
    with pytest.raises(ServerStartError, match="Cannot find parameter with name: tokenizer_dir"):
        TritonServer(options).start()
    # the launcher refuses it up front for the real backend
    serving = open_engine(engine_dir_for(demo_checkpoint, tmp_path / "e2"))
    (tmp_path / "backends" / "tensorrtllm").mkdir(parents=True)
    with pytest.raises(ValueError, match="lacks the parameter.s. tokenizer_dir, which the tensorrtllm backend reads"):
        check_host(serving, "tensorrtllm", bundled_server=False, backend_dir=tmp_path / "backends",
                   parameters=config.parameters)


def test_max_length_defaults_to_the_engine_limit(demo_checkpoint, tmp_path):
    from reward_server.supervisor.repository import model_parameters

    serving = open_engine(engine_dir_for(demo_checkpoint, tmp_path / "e", max_input_len=300))
    params, k = model_parameters(ServeOptions(engine="tensorrt_llm"), serving.tokenizer_checkpoint, serving)
    assert params["preprocessing"]["max_length"] == "300" and k == 1
    with pytest.raises(ValueError, match="exceeds the engine's max_input_len 300"):
        model_parameters(ServeOptions(engine="tensorrt_llm", max_length=301), serving.tokenizer_checkpoint, serving)
    with pytest.raises(ValueError, match="cannot change that at serve time"):
        model_parameters(ServeOptions(engine="tensorrt_llm", reward_indices="3"), serving.tokenizer_checkpoint,
                         serving)


def test_refusals_name_what_is_missing(demo_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs --engine-dir"):
        TritonServer(ServeOptions(engine="tensorrt_llm")).start()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TritonServer(ServeOptions(engine="tensorrt_llm", engine_dir=tmp_path / "nowhere")).start()
    engine = engine_dir_for(demo_checkpoint, tmp_path / "tp2", tp=2)
    with pytest.raises(ValueError, match="--world-size 1 does not match the engine, built for tp 2 x pp 1 = 2"):
        open_engine(engine, world_size=1)
    with pytest.raises(ValueError, match="apply to --engine tensorrt_llm only"):
        TritonServer(ServeOptions(engine_dir=engine)).start()
    serving = open_engine(engine)
    with pytest.raises(FileNotFoundError, match="bundled with nvidia-pytriton, which has no tensorrtllm backend"):
        check_host(serving, "tensorrtllm", bundled_server=True)
    with pytest.raises(FileNotFoundError, match="no tensorrtllm backend in"):
        check_host(serving, "tensorrtllm", bundled_server=False, backend_dir=tmp_path)
    (tmp_path / "tensorrtllm").mkdir()
    with pytest.raises(RuntimeError, match=r"needs 2 GPU\(s\) \(tp 2 x pp 1\); nvidia-smi lists 0"):
        check_host(serving, "tensorrtllm", bundled_server=False, backend_dir=tmp_path)
    check_host(serving, "python", bundled_server=True)  # the contract double: nothing to check


def test_engine_without_generation_logits_is_refused(demo_checkpoint, tmp_path):
    engine = engine_dir_for(demo_checkpoint, tmp_path / "e")
    path = engine / "engine" / "config.json"
    config = json.loads(path.read_text())
    config["build_config"]["gather_generation_logits"] = False
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="built without --gather_generation_logits"):
        open_engine(engine)


def _descendants(pid: int) -> list[str]:
    """Command lines of every process below `pid`."""
    from reward_server.supervisor.mpi import child_pids

    found, frontier = [], [pid]
    while frontier:
        for child in child_pids(frontier.pop()):
            try:
                found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
            frontier.append(child)
    return found


def _handles_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << 14))  # SIGTERM is signal 15
    return False


def test_tensor_parallel_ranks_run_under_mpirun_and_stop_cleanly(demo_checkpoint, tmp_path):
    """World size 2 for real: mpirun in the foreground, one tritonserver per rank (rank 1 loads only
    tensorrt_llm and serves no port, and, like a leader-mode worker, never finishes loading while
    rank 0 runs, so it has no SIGTERM handler), a request in flight finishes, and the stop signals
    rank 0 alone: every rank then ends and mpirun exits 0."""
    import shutil
    import threading
    import time

    from tritonclient.utils import InferenceServerException

    from reward_server.supervisor.mpi import ranks
    from tests.trtllm_double import repository_with_double

    if not shutil.which("mpirun"):
        pytest.fail("mpirun is missing: `make setup` installs Debian's openmpi-bin (as root)")
    options = ServeOptions(engine="tensorrt_llm", engine_dir=engine_dir_for(demo_checkpoint, tmp_path / "e", tp=2),
                           model_repository=repository_with_double(tmp_path / "repo"), max_length=512)
    server = TritonServer(options).start()
    try:
        assert server.process.args[0] == "mpirun" and server.serving.world_size == 2
        rank_args = [args for args in _descendants(server.process.pid) if "--model-repository=" in args]
        assert len(rank_args) == 2
        assert sum("--load-model=tensorrt_llm" in args and "--allow-grpc=false" in args for args in rank_args) == 1
        expected = score_grpc(server.grpc_url, CONVERSATIONS)["score"]
        leader, workers = ranks(server.process.pid)
        assert leader is not None and len(workers) == 1
        assert _handles_sigterm(leader) and not _handles_sigterm(workers[0])  # the worker is still "loading"
        outcome = {}

        def in_flight():
            try:
                outcome.update(score_grpc(server.grpc_url, CONVERSATIONS * 8))
            except InferenceServerException as err:
                outcome["error"] = err

        worker = threading.Thread(target=in_flight)
        worker.start()
        time.sleep(0.5)  # the request is in flight
    finally:
        started = time.monotonic()
        code = server.stop()
    worker.join(timeout=60)
    assert time.monotonic() - started < server.options.exit_timeout_s  # the ranks stopped, not killed
    assert code == 0, server.log_tail()  # a SIGTERM to the worker would have killed it: mpirun exits non-zero
    assert not _descendants(server.process.pid)
    # Finished, or refused as retryable: Triton 2.51 refuses BLS requests once shutting down, so a
    # request whose engine step had not started gets UNAVAILABLE (the client SDK retries it).
    if "error" in outcome:
        assert outcome["error"].status() == "StatusCode.UNAVAILABLE", outcome["error"]
    else:
        np.testing.assert_allclose(outcome["score"], np.tile(expected, (8, 1)), rtol=1e-5)


def test_gpu_check_step_chain_runs_against_the_double(trtllm_server, demo_checkpoint):
    """bench/gpu_check's process-model check (a conversation's prefixes sent one after another to
    the `tensorrt_llm` model) against the contract double: logits at every cut equal transformers."""
    from bench.gpu import reference
    from bench.gpu_check import _token_ids, check_step_chain
    from reward_server.pipeline.chat import ChatEncoder

    [encoded] = ChatEncoder.from_checkpoint(demo_checkpoint).encode_batch(make_conversations(1, seed=9))
    model = reference.load(demo_checkpoint, "cpu", "float32")
    pad_id, end_id = _token_ids(demo_checkpoint)
    with grpcclient.InferenceServerClient(trtllm_server.grpc_url) as client:
        result = check_step_chain(client, model, encoded.token_ids, pad_id, end_id, "float32", every=8)
    assert result["cuts"] == list(range(8, len(encoded.token_ids) + 1, 8)) and len(result["cuts"]) >= 3
    assert result["within_tolerance"] and result["max_abs"] < 1e-4, result


def test_gemma2_through_the_engine_path_reads_its_reserved_rows(tmp_path):
    """A Gemma-2 reward model adapted for TensorRT-LLM (score rows in reserved-token embedding rows)
    and served through the TensorRT-LLM ensembles with the contract double: scores equal the
    classifier's eager forward; a conversation holding a reserved token fails alone, naming it."""
    from reward_server.supervisor.demo_checkpoint import build_checkpoint
    from tests.reference import eager_rewards
    from tests.trtllm_double import repository_with_double

    checkpoint = build_checkpoint(tmp_path / "gemma2", "tiny", arch="gemma2", num_labels=2, seed=4)
    conversations = make_conversations(6, seed=4)
    options = ServeOptions(engine="tensorrt_llm", engine_dir=engine_dir_for(checkpoint, tmp_path / "engine"),
                           model_repository=repository_with_double(tmp_path / "repository"), max_length=512)
    expected = eager_rewards(checkpoint, conversations)
    with TritonServer(options) as server:
        got = score_grpc(server.grpc_url, conversations)
        np.testing.assert_allclose(got["attributes"], expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(Exception, match="which this engine reserves to read the reward"):
            score_grpc(server.grpc_url, [[{"role": "user", "content": "Hi <unused1> there"},
                                          {"role": "assistant", "content": "Hello."}]])
        again = score_grpc(server.grpc_url, conversations[:2])
    np.testing.assert_array_equal(again["attributes"], got["attributes"][:2])


def test_a_client_deadline_stops_the_tensorrt_llm_requests(trtllm_server):
    """The fan-out learns that the client went and stops what it sent to the `tensorrt_llm` model by
    request id (the double logs each stop it gets), and sends nothing more for it."""
    from tests.test_observability import scrape, value

    client = grpcclient.InferenceServerClient(trtllm_server.grpc_url)
    before = scrape(trtllm_server)
    long = [[{"role": "user", "content": f"{i} question " + "please think about it " * 15},
             {"role": "assistant", "content": f"answer {i}"}] for i in range(256)]
    data = np.array([[json.dumps(c).encode()] for c in long], dtype=object)
    tensor = grpcclient.InferInput("messages", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("reward", [tensor], client_timeout=1.0)
    assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED", raised.value
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the double takes the stops after the requests queued before them
        after = scrape(trtllm_server)
        dropped = value(after, "reward_dropped_requests_total", model="reward_engine_trtllm", reason="cancelled") > \
            value(before, "reward_dropped_requests_total", model="reward_engine_trtllm", reason="cancelled")
        if dropped and "double: stop " in trtllm_server.log_path.read_text(errors="replace"):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the fan-out never dropped the request, or never stopped its engine requests")
    assert np.isfinite(score_grpc(trtllm_server.grpc_url, CONVERSATIONS[:2])["score"]).all()
