"""Triton adapter: the ensembles' engine step on TensorRT-LLM, via reward_server.pipeline.trtllm.fanout.

Each sequence of the batch becomes one request to the `tensorrt_llm` model (BLS); the rewards
are read from its generation logits.
"""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server.pipeline import settings
from reward_server.pipeline.triton_io import EngineMetrics, bls_caller, guarded_async, input_array
from reward_server.pipeline.trtllm import fanout


class TritonPythonModel:
    def initialize(self, args):
        params = settings.parameters_of(args)
        self.fanout = settings.fanout_from_parameters(params)
        self.infer = bls_caller(params.get(settings.TENSORRT_LLM_MODEL) or "tensorrt_llm",
                                list(self.fanout.requested_outputs))
        self.kv_stats = fanout.KvCacheStats()
        self.metrics = EngineMetrics(args["model_name"], EngineMetrics.KV_CACHE_FIELDS, prefix="kv_cache_")

    async def execute(self, requests):
        inputs = [(input_array(r, "input_ids"), input_array(r, "input_lengths")) for r in requests]
        responses = await guarded_async(fanout.score_requests, requests, self.fanout, self.infer, inputs,
                                        self.kv_stats)
        self.metrics.update(self.kv_stats)
        return responses
