"""Triton adapter: conversations (or templated text, or token ids) -> token ids, via
reward_server.pipeline.stages.preprocess."""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server.pipeline import settings, stages
from reward_server.pipeline.metrics import RewardMetrics
from reward_server.pipeline.triton_io import (DropMetrics, count_finished, guarded, input_array, merge_responses,
                                              refuse_if_draining, split_dropped)


class TritonPythonModel:
    def initialize(self, args):
        params = settings.parameters_of(args)
        self.encoder = settings.encoder_from_parameters(params)
        self.limits = settings.limits_from_parameters(params)
        self.drain = settings.drain_from_parameters(params)
        self.metrics = RewardMetrics(args["model_name"], scores=False)
        self.board = settings.board_from_parameters(params)
        self.drops = DropMetrics(args["model_name"])

    def execute(self, requests):
        refused = refuse_if_draining(self.drain, requests)
        if refused is not None:
            self.metrics.reject("stopping", len(requests))
            return refused
        keep, responses = split_dropped(requests, self.board, self.drops)  # nobody waits: not tokenised
        kept = [requests[i] for i in keep]
        inputs = [stages.PreprocessInput(messages=input_array(r, "messages"),
                                         token_ids=input_array(r, "token_ids"),
                                         token_lengths=input_array(r, "token_lengths"),
                                         text=input_array(r, "text")) for r in kept]
        responses = merge_responses(responses, keep, guarded(stages.preprocess, kept, self.encoder, inputs, self.limits,
                                                             observe=self.metrics.after_preprocessing) if kept else [])
        count_finished(self.drain, responses, failed_only=True)  # the others finish in postprocessing
        return responses
