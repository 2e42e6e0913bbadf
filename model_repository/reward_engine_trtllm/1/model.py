"""Triton adapter: the ensembles' engine step on TensorRT-LLM, via reward_server.pipeline.trtllm.fanout.

Each sequence of the batch becomes one request to the `tensorrt_llm` model (BLS); the rewards
are read from its generation logits.
"""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server.pipeline import settings
from reward_server.pipeline.triton_io import (DropMetrics, EngineMetrics, bls_caller, gone_checker, guarded_async,
                                              input_array)
from reward_server.pipeline.trtllm import fanout


class TritonPythonModel:
    def initialize(self, args):
        params = settings.parameters_of(args)
        self.fanout = settings.fanout_from_parameters(params)
        engine_model = params.get(settings.TENSORRT_LLM_MODEL) or "tensorrt_llm"
        self.infer = bls_caller(engine_model, list(self.fanout.requested_outputs))
        stop = bls_caller(engine_model, [])
        self.stop = lambda request_id: stop(fanout.stop_request(), request_id)
        self.board = settings.board_from_parameters(params)
        self.drops = DropMetrics(args["model_name"])
        self.kv_stats = fanout.KvCacheStats()
        self.metrics = EngineMetrics(args["model_name"], EngineMetrics.KV_CACHE_FIELDS, prefix="kv_cache_")

    async def execute(self, requests):
        inputs = [(input_array(r, "input_ids"), input_array(r, "input_lengths")) for r in requests]
        # a request whose client went sends no more engine requests, and those in flight are stopped
        responses = await guarded_async(fanout.score_requests, requests, self.fanout, self.infer, inputs,
                                        self.kv_stats, gone_checker(requests, self.board, self.drops), self.stop)
        self.metrics.update(self.kv_stats)
        return responses
