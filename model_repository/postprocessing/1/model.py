"""Triton adapter: raw reward outputs -> the public outputs, via reward_server.pipeline.stages.postprocess."""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server.pipeline import settings, stages
from reward_server.pipeline.metrics import RewardMetrics
from reward_server.pipeline.triton_io import count_finished, guarded, input_array


class TritonPythonModel:
    def initialize(self, args):
        params = settings.parameters_of(args)
        self.spec = settings.score_spec_from_parameters(params)
        self.drain = settings.drain_from_parameters(params)
        self.metrics = RewardMetrics(args["model_name"], scores=True)

    def execute(self, requests):
        inputs = [(input_array(r, "rewards"), input_array(r, "input_lengths"), input_array(r, "truncated"))
                  for r in requests]
        responses = guarded(stages.postprocess, requests, self.spec, inputs, observe=self.metrics.after_postprocessing)
        count_finished(self.drain, responses)
        return responses
