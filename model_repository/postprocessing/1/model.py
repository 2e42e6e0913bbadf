"""Triton adapter: raw reward outputs -> the public outputs, via reward_server.pipeline.stages.postprocess."""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server.pipeline import settings, stages
from reward_server.pipeline.metrics import RewardMetrics
from reward_server.pipeline.triton_io import (DropMetrics, count_finished, guarded, input_array, merge_responses,
                                              split_dropped)


class TritonPythonModel:
    def initialize(self, args):
        params = settings.parameters_of(args)
        self.spec = settings.score_spec_from_parameters(params)
        self.drain = settings.drain_from_parameters(params)
        self.metrics = RewardMetrics(args["model_name"], scores=True)
        self.board = settings.board_from_parameters(params)
        self.drops = DropMetrics(args["model_name"])

    def execute(self, requests):
        keep, responses = split_dropped(requests, self.board, self.drops)  # nobody waits: not counted as scored
        kept = [requests[i] for i in keep]
        inputs = [(input_array(r, "rewards"), input_array(r, "input_lengths"), input_array(r, "truncated"))
                  for r in kept]
        responses = merge_responses(responses, keep, guarded(stages.postprocess, kept, self.spec, inputs,
                                                             observe=self.metrics.after_postprocessing) if kept else [])
        count_finished(self.drain, responses)
        return responses
