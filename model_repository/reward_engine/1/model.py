"""Triton adapter: token ids -> raw reward outputs, via reward_server.pipeline.stages.score_requests."""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server.pipeline import settings, stages
from reward_server.pipeline.triton_io import EngineMetrics, guarded, input_array


class TritonPythonModel:
    def initialize(self, args):
        self.engine = settings.engine_from_parameters(settings.parameters_of(args))
        self.metrics = EngineMetrics(args["model_name"])

    def execute(self, requests):
        inputs = [(input_array(r, "input_ids"), input_array(r, "input_lengths")) for r in requests]
        responses = guarded(stages.score_requests, requests, self.engine, inputs)
        self.metrics.update(self.engine.stats)
        return responses
