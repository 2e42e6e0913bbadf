"""Requests to the `tensorrt_llm` Triton model itself, as the project's ensemble sends them:
one sequence per request, cut after its pooled token, one output token, generation logits on.

Inputs (Triton batch dim first): input_ids INT32 [1, L], input_lengths INT32 [1, 1],
request_output_len INT32 [1, 1] = 1, return_generation_logits BOOL [1, 1] = True, end_id and
pad_id INT32 [1, 1]. Outputs read: output_ids, sequence_length, generation_logits FP32
[1, beams, steps, vocab].
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

MODEL = "tensorrt_llm"
OUTPUTS = ("output_ids", "sequence_length", "generation_logits")


@dataclass
class EngineReply:
    """What the engine returned for one request."""

    generation_logits: np.ndarray   # as returned, normally [1, 1, 1, vocab]
    output_ids: np.ndarray
    sequence_length: np.ndarray

    def first_logits(self) -> np.ndarray:
        """Logits of the first (only) generated step, [vocab].

        Raises:
            ValueError: the tensor is not [1, 1, >=1, vocab] (e.g. no step at all).
        """
        logits = self.generation_logits
        if logits.ndim != 4 or logits.shape[:2] != (1, 1) or logits.shape[2] < 1:
            raise ValueError(f"generation_logits has shape {tuple(logits.shape)}, expected [1, 1, 1, vocab]")
        return logits[0, 0, 0]

    def generated_token(self) -> int:
        """The one token the engine generated (the last of output_ids)."""
        return int(self.output_ids.reshape(-1)[-1])


def inputs(ids: Sequence[int], end_id: int, pad_id: int) -> list[Any]:
    """The request tensors for one sequence."""
    import tritonclient.grpc as grpcclient

    def tensor(name: str, array: np.ndarray, datatype: str):
        item = grpcclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        return item

    one = lambda value: np.array([[value]], dtype=np.int32)  # noqa: E731
    return [tensor("input_ids", np.array([list(ids)], dtype=np.int32), "INT32"),
            tensor("input_lengths", one(len(ids)), "INT32"),
            tensor("request_output_len", one(1), "INT32"),
            tensor("end_id", one(end_id), "INT32"),
            tensor("pad_id", one(pad_id), "INT32"),
            tensor("return_generation_logits", np.array([[True]], dtype=bool), "BOOL")]


def _reply(result: Any) -> EngineReply:
    return EngineReply(result.as_numpy("generation_logits"), result.as_numpy("output_ids"),
                       result.as_numpy("sequence_length"))


def infer(client: Any, ids: Sequence[int], end_id: int, pad_id: int, timeout_s: float = 60.0) -> EngineReply:
    """One request; raises tritonclient's InferenceServerException on a server error."""
    import tritonclient.grpc as grpcclient

    result = client.infer(MODEL, inputs(ids, end_id, pad_id),
                          outputs=[grpcclient.InferRequestedOutput(name) for name in OUTPUTS],
                          client_timeout=timeout_s)
    return _reply(result)


def infer_all(client: Any, sequences: Sequence[Sequence[int]], end_id: int, pad_id: int,
              timeout_s: float = 600.0) -> tuple[float, list[EngineReply]]:
    """Send every sequence at once (the in-flight batcher schedules them) and wait for all.

    Returns:
        (seconds from the first send to the last reply, replies in input order).

    Raises:
        RuntimeError: a request failed or not every reply arrived in time.
    """
    import tritonclient.grpc as grpcclient

    replies: list[EngineReply | None] = [None] * len(sequences)
    errors: list[str] = []
    done = threading.Semaphore(0)
    requests = [inputs(ids, end_id, pad_id) for ids in sequences]  # built before the clock starts
    outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]

    def callback(index: int, result: Any, error: Any) -> None:
        if error is not None:
            errors.append(f"request {index}: {error}")
        else:
            replies[index] = _reply(result)
        done.release()

    start = time.perf_counter()
    for index, request in enumerate(requests):
        client.async_infer(MODEL, request, lambda result, error, i=index: callback(i, result, error),
                           outputs=outputs, client_timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    for _ in requests:
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"not every reply arrived within {timeout_s:.0f}s")
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(requests)} requests failed; first: {errors[0]}")
    return seconds, [reply for reply in replies if reply is not None]
