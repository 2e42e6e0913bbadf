"""Triton Python-backend plumbing shared by the model.py adapters.

Importable only inside Triton's Python backend stub, where `triton_python_backend_utils`
exists; everything else in the package is plain Python.
"""

from __future__ import annotations

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_server.stages import RequestError

_LOGGER = logging.getLogger(__name__)


def input_array(request, name: str) -> np.ndarray | None:
    """The named input of a request as numpy, or None when the (optional) input is absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def respond(result: dict | RequestError):
    """An InferenceResponse for a stage result: output tensors, or INVALID_ARG for that request."""
    if isinstance(result, RequestError):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG))
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in result.items()])


def guarded(stage, requests, *args):
    """Run `stage`; if it fails as a whole, answer every request with an INTERNAL error, not a crash."""
    try:
        return [respond(result) for result in stage(*args)]
    except Exception as err:  # noqa: BLE001 - the server must keep serving
        _LOGGER.exception("stage %s failed", getattr(stage, "__name__", stage))
        error = pb_utils.TritonError(f"{type(err).__name__}: {err}", pb_utils.TritonError.INTERNAL)
        return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
