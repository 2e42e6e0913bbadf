"""Triton adapter: conversations (or token ids) -> token ids, via reward_server.stages.preprocess."""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server import settings, stages
from reward_server.triton_io import guarded, input_array


class TritonPythonModel:
    def initialize(self, args):
        self.encoder = settings.encoder_from_parameters(settings.parameters_of(args))

    def execute(self, requests):
        inputs = [stages.PreprocessInput(messages=input_array(r, "messages"),
                                         token_ids=input_array(r, "token_ids"),
                                         token_lengths=input_array(r, "token_lengths")) for r in requests]
        return guarded(stages.preprocess, requests, self.encoder, inputs)
