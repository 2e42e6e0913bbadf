"""CONTRACT DOUBLE of the `tensorrt_llm` model, for tests only (no GPU or TensorRT-LLM here).

A Python-backend model with the interface of Triton's `tensorrtllm` backend as this project uses
it (model_repository/tensorrt_llm/config.pbtxt), computed with transformers on the engine
directory's Hugging Face CausalLM checkpoint (hf/ with reward_head.json). It keeps the real
backend's rules that the engine step depends on:
- batch size 1 per request when not decoupled (the real message is reproduced);
- output_ids and sequence_length must be among the requested outputs;
- for batch size 1 the whole input_ids row is read and input_lengths is not used to cut it;
- generation_logits [1, beams=1, steps=1, vocab] (FP32) only when return_generation_logits is
  true: the logits of the first generated token, i.e. at the last input position;
- request_output_len is required (this double generates one token only).
"""

try:  # written by `reward-server serve` next to each Python-backend model
    import reward_server_paths  # noqa: F401
except ImportError:
    pass

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args):
        import torch
        import transformers

        config = json.loads(args["model_config"])
        engine = Path(config["parameters"]["gpt_model_path"]["string_value"])
        head = json.loads((engine.parent / "hf" / "reward_head.json").read_text())
        torch.set_num_threads(1)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(head["hf_checkpoint"], dtype="float32").eval()

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        if ids.shape[0] > 1:
            return _error("Batch size > 1 requires the tensorrt_llm backend to be using decoupled transaction policy")
        requested = set(request.requested_output_names())
        for name in ("output_ids", "sequence_length"):
            if name not in requested:
                return _error(f"{name} tensor must be present in list of output tensors")
        if pb_utils.get_input_tensor_by_name(request, "request_output_len") is None:
            return _error("request_output_len is required")
        flag = pb_utils.get_input_tensor_by_name(request, "return_generation_logits")
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor(ids.astype(np.int64))).logits[0, -1].float().numpy()
        token = np.int32(logits.argmax())
        outputs = [pb_utils.Tensor("output_ids", np.array([[[token]]], dtype=np.int32)),  # input excluded
                   pb_utils.Tensor("sequence_length", np.array([[1]], dtype=np.int32))]
        if flag is not None and bool(flag.as_numpy().reshape(-1)[0]) and "generation_logits" in requested:
            outputs.append(pb_utils.Tensor("generation_logits", logits.reshape(1, 1, 1, -1).astype(np.float32)))
        return pb_utils.InferenceResponse(output_tensors=outputs)
