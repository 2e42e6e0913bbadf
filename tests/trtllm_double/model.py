"""CONTRACT DOUBLE of the `tensorrt_llm` model, for tests only (no GPU or TensorRT-LLM here).

A Python-backend model with the interface of Triton's `tensorrtllm` backend as this project uses
it (model_repository/tensorrt_llm/config.pbtxt), computed with transformers on the engine
directory's Hugging Face CausalLM checkpoint (hf/ with reward_head.json). It keeps the real
backend's rules that the engine step and the launcher depend on:
- it refuses to load a config without a parameter the backend reads with no guard
  (reward_server.supervisor.trtllm_engine.UNGUARDED_PARAMETERS), with the backend's message;
- batch size 1 per request when not decoupled (the real message is reproduced);
- output_ids and sequence_length must be among the requested outputs;
- for batch size 1 the whole input_ids row is read and input_lengths is not used to cut it;
- generation_logits [1, beams=1, steps=1, vocab] (FP32) only when return_generation_logits is
  true: the logits of the first generated token, i.e. at the last input position;
- request_output_len is required (this double generates one token only);
- with return_perf_metrics, KV-cache counters from a block cache like TensorRT-LLM 1.2's: whole
  blocks of TOKENS_PER_BLOCK tokens, reusable once the request that filled them has finished
  (requests executed together all compute their common prefix), the block holding the last
  prompt token always recomputed;
- a request with `stop` true stops the request of the same request id (an empty answer; without an
  id the backend's error): one still waiting is answered with an error instead of computed
  (`handleStopRequest` cancels its executor request); stops are counted in the log
  ("double: stop <id>");
- under mpirun, ranks above 0 behave like leader-mode workers: they never finish loading while
  the leader runs (so their tritonserver has no signal handler yet: SIGTERM kills it), and end
  with exit code 0 once the leader has stopped.
"""

try:  # written by `reward-server serve` next to each Python-backend model
    import reward_server_paths  # noqa: F401
except ImportError:
    pass

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_server.builder.build import TOKENS_PER_BLOCK
from reward_server.supervisor.mpi import ranks
from reward_server.supervisor.trtllm_engine import missing_parameters


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def _rank() -> int:
    return int(os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK") or 0)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _handles_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _wait_for_leader_to_stop(server: int) -> None:
    """Block as a leader-mode worker does in ModelInstanceState's constructor, until the leader is
    gone (the real worker is released by MPI when the leader's executor shuts down)."""
    leader = None
    while leader is None and _alive(_parent(server)):
        leader = ranks(_parent(server))[0]  # the rank-0 tritonserver beside this one, under mpirun
        time.sleep(0.2)
    while leader is not None and _alive(leader):
        time.sleep(0.2)


def _exit_cleanly(server: int) -> None:
    """The real worker then calls exit(0) in its tritonserver; a stub cannot, so it asks its server
    to stop once that server handles SIGTERM (its load has then finished), which exits 0."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(server) and not _handles_sigterm(server):
        time.sleep(0.1)
    if _alive(server):
        os.kill(server, signal.SIGTERM)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        for name in missing_parameters(parameters):
            raise pb_utils.TritonModelException(f"Cannot find parameter with name: {name}")
        if _rank() > 0:
            server = os.getppid()
            _wait_for_leader_to_stop(server)
            threading.Thread(target=_exit_cleanly, args=(server,), daemon=True).start()
            self.model = None
            return
        import torch
        import transformers

        engine = Path(parameters["gpt_model_path"]["string_value"])
        head = json.loads((engine.parent / "hf" / "reward_head.json").read_text())
        torch.set_num_threads(1)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(head["hf_checkpoint"], dtype="float32").eval()
        self.cached_blocks = set()  # token prefixes ending on a block boundary, of finished requests
        self.stopped = set()  # request ids a stop request named

    def execute(self, requests):
        if self.model is None:
            return [_error("this rank serves no requests") for _ in requests]
        responses, filled = [], []
        for request in requests:
            responses.append(self._one(request, filled))
        self.cached_blocks.update(filled)  # reusable only by requests executed after these finished
        return responses

    def _one(self, request, filled):
        if self._flag(request, "stop"):
            if not request.request_id():
                return _error("Trying to stop a request but request ID is not provided")
            self.stopped.add(request.request_id())
            pb_utils.Logger.log_info(f"double: stop {request.request_id()}")
            return pb_utils.InferenceResponse(output_tensors=[])
        if request.request_id() and request.request_id() in self.stopped:
            return _error(f"Request {request.request_id()} was cancelled")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        if ids.shape[0] > 1:
            return _error("Batch size > 1 requires the tensorrt_llm backend to be using decoupled transaction policy")
        requested = set(request.requested_output_names())
        for name in ("output_ids", "sequence_length"):
            if name not in requested:
                return _error(f"{name} tensor must be present in list of output tensors")
        if pb_utils.get_input_tensor_by_name(request, "request_output_len") is None:
            return _error("request_output_len is required")
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor(ids.astype(np.int64))).logits[0, -1].float().numpy()
        token = np.int32(logits.argmax())
        outputs = [pb_utils.Tensor("output_ids", np.array([[[token]]], dtype=np.int32)),  # input excluded
                   pb_utils.Tensor("sequence_length", np.array([[1]], dtype=np.int32))]
        if self._flag(request, "return_generation_logits") and "generation_logits" in requested:
            outputs.append(pb_utils.Tensor("generation_logits", logits.reshape(1, 1, 1, -1).astype(np.float32)))
        prefixes = [tuple(ids[0, :end].tolist()) for end in range(TOKENS_PER_BLOCK, ids.shape[1] + 1, TOKENS_PER_BLOCK)]
        filled.extend(prefixes)
        if self._flag(request, "return_perf_metrics"):
            reusable = (ids.shape[1] - 1) // TOKENS_PER_BLOCK
            reused = next((i for i, prefix in enumerate(prefixes[:reusable]) if prefix not in self.cached_blocks),
                          reusable)
            total = -(-(ids.shape[1] + 1) // TOKENS_PER_BLOCK)  # the prompt and the generated token
            for name, value in (("kv_cache_reused_blocks", reused), ("kv_cache_alloc_new_blocks", total - reused),
                                ("kv_cache_alloc_total_blocks", total)):
                if name in requested:
                    outputs.append(pb_utils.Tensor(name, np.array([[value]], dtype=np.int32)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    @staticmethod
    def _flag(request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return tensor is not None and bool(tensor.as_numpy().reshape(-1)[0])
