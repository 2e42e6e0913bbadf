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


class EngineMetrics:
    """Counters of the engine's work on Triton's Prometheus endpoint (port 8002).

    reward_engine_<field>_total for each `EngineStats` counter: sequences, tokens computed,
    tokens saved by shared prefixes, padded tokens (so padding ratio = 1 - tokens / padded).
    """

    FIELDS = {"sequences": "conversations scored", "tokens": "tokens run through the model",
              "shared_tokens": "tokens not computed thanks to shared prefixes",
              "padded_tokens": "tokens computed including padding"}

    def __init__(self, model_name: str):
        self._families, self._counters = [], {}  # a family must outlive its metrics
        for field, what in self.FIELDS.items():
            family = pb_utils.MetricFamily(name=f"reward_engine_{field}_total", description=f"Number of {what}",
                                           kind=pb_utils.MetricFamily.COUNTER)
            self._families.append(family)
            self._counters[field] = family.Metric(labels={"model": model_name})
        self._seen = dict.fromkeys(self.FIELDS, 0)

    def update(self, stats) -> None:
        """Add what `stats` counted since the last update; a metrics failure never fails requests."""
        try:
            for field, counter in self._counters.items():
                value = getattr(stats, field)
                counter.increment(value - self._seen[field])
                self._seen[field] = value
        except Exception:  # noqa: BLE001
            _LOGGER.exception("could not update engine metrics")
