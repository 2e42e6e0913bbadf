"""The public entry points `reward`, `reward_ids` and `reward_text`: Python models in front of the
ensembles `*_pipeline`, so that a client's cancellation reaches the work.

Triton 2.51 marks a request cancelled when its gRPC call is cancelled or its deadline passes, but
only a request sent to a model directly, never the composing requests of an ensemble (measured,
../shared/DESIGN.md). An entry point is called directly, so it sees the cancellation; it forwards
each request to its pipeline (BLS) with a `deadlines.Ticket` (key, arrival, deadline from Triton's
`timeout` parameter) that every step reads, and watches the request while the pipeline works:

- the client went (cancelled call, expired gRPC deadline) or the deadline passed: the entry writes
  the key on the `CancelBoard`, answers at once (CANCELLED) and counts it; the steps drop the work
  (preprocessing skips it, the engine leaves it out of its next packed row, postprocessing skips it);
- otherwise the pipeline's answer (outputs, or its error without Triton's "in ensemble" prefix)
  goes back unchanged.

Before forwarding, the entry point refuses (UNAVAILABLE, "the server is overloaded") a request that
the engine could not start within its queue limit, counting the work it already sent in and has
not had back (`admission.FrontDoor`): refused there, a request costs no parsing or tokenising.

`execute` starts one task per request on the stub's event loop and returns None; each request is
answered through its response sender, so one slow request never holds the others.
Importable only inside Triton's Python backend stub.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time

import triton_python_backend_utils as pb_utils

from reward_server.pipeline import deadlines, settings
from reward_server.pipeline.admission import EngineLoad, FrontDoor
from reward_server.pipeline.triton_io import DropMetrics, prefer_threads

_LOGGER = logging.getLogger(__name__)
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
# How often a waiting request is checked: often enough to drop work within a packed row's time,
# rarely enough that checking hundreds of waiting requests costs little (one IPC message each).
POLL_S = 0.05
POLL_PER_REQUEST_S = 0.002
# A request over the limit is looked at again, every SECOND_LOOK_POLL_S, for up to SECOND_LOOK_S before it
# is refused: a place that frees meanwhile takes it, and a client that sends again at once after a refusal
# (plain tritonclient loops do) costs one refusal a second instead of hundreds.
SECOND_LOOK_S = 1.0
SECOND_LOOK_POLL_S = 0.1


class EntryModel:
    """The Triton model of an entry point (its model.py imports this as `TritonPythonModel`)."""

    def initialize(self, args):
        prefer_threads()  # the requests' tasks run on the stub's event-loop thread
        params = settings.parameters_of(args)
        config = json.loads(args["model_config"])
        self.pipeline = params.get(settings.PIPELINE_MODEL) or f"{args['model_name']}_pipeline"
        self.outputs = [output["name"] for output in config.get("output", [])]
        self.board = settings.board_from_parameters(params)
        self.load_dir = settings.run_dir(params)
        self.door = FrontDoor()
        self.drops = DropMetrics(args["model_name"])
        self._keys = itertools.count()
        self._prefix = f"{os.getpid():x}-{time.time_ns():x}-"
        self._waiting = 0

    async def execute(self, requests):
        loop = asyncio.get_running_loop()
        for request in requests:
            loop.create_task(self._forward(request, request.get_response_sender()))
        return None

    async def _forward(self, request, sender) -> None:
        ticket = deadlines.Ticket.issue(f"{self._prefix}{next(self._keys):x}", request.timeout())
        nbytes, tokens = _size(request)
        tokens = self.door.estimate(nbytes, tokens)
        refusal = await self._admit(tokens)
        if refusal is not None:
            self.drops.drop(deadlines.OVERLOADED, 1, tokens or 0)
            sender.send(_error(f"{deadlines.OVERLOADED_PREFIX}: {refusal}; retry later (with backoff) or on another "
                               "replica", pb_utils.TritonError.UNAVAILABLE),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        self.door.enter(ticket.key, tokens)
        try:
            await self._forward_admitted(request, sender, ticket, nbytes)
        finally:
            self.door.leave(ticket.key)

    async def _admit(self, tokens: int | None) -> str | None:
        """None to go on, else why the pipeline cannot take the request; over the limit, it is looked
        at again for `SECOND_LOOK_S` (a request ahead may just have been found gone)."""
        if self.load_dir is None:
            return None
        waited = 0.0
        while True:
            refusal = self.door.refusal(tokens, EngineLoad.read(self.load_dir))
            if refusal is None or waited >= SECOND_LOOK_S:
                return refusal
            await asyncio.sleep(SECOND_LOOK_POLL_S)
            waited += SECOND_LOOK_POLL_S

    async def _forward_admitted(self, request, sender, ticket, nbytes: int) -> None:
        try:
            inner = pb_utils.InferenceRequest(model_name=self.pipeline, requested_output_names=self.outputs,
                                              inputs=request.inputs(), request_id=request.request_id(),
                                              parameters=ticket.parameters())
            future = asyncio.ensure_future(inner.async_exec())
        except Exception as exc:  # noqa: BLE001 - answer, never leave a request unanswered
            _LOGGER.exception("could not forward a request to %s", self.pipeline)
            sender.send(_error(f"could not forward the request: {exc}", pb_utils.TritonError.INTERNAL),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        self._waiting += 1
        try:
            reason = await self._watch(request, future, ticket)
        finally:
            self._waiting -= 1
        if reason is None:
            try:
                reply = future.result()
                self.door.leave(ticket.key, nbytes, _scored_tokens(reply))
                response = _relay(reply)
            except Exception as exc:  # noqa: BLE001 - e.g. the server began stopping: clients retry
                response = _error(f"the reward pipeline is unavailable: {exc}", pb_utils.TritonError.UNAVAILABLE)
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        # Nobody waits: mark it for the steps, answer now, then let the pipeline's answer go.
        if self.board is not None:
            self.board.cancel(ticket.key)
        self.door.leave(ticket.key)  # the steps drop it: it no longer holds the door
        self.drops.drop(reason)
        sender.send(_error(deadlines.drop_message(reason, ticket), pb_utils.TritonError.CANCELLED),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        try:
            await future
        except Exception:  # noqa: BLE001 - nobody reads it
            pass
        if self.board is not None:
            self.board.clear(ticket.key)

    async def _watch(self, request, future, ticket) -> str | None:
        """Wait for the pipeline; the reason the request must be dropped if it must, else None."""
        while True:
            await asyncio.wait([future], timeout=max(POLL_S, POLL_PER_REQUEST_S * self._waiting))
            if future.done():
                return None
            if request.is_cancelled():
                return deadlines.CANCELLED
            remaining = ticket.remaining()
            if remaining is not None and remaining <= 0:
                return deadlines.EXPIRED


def _error(message: str, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _relay(response):
    """The pipeline's response as the entry point's: its outputs, or its error without the
    "in ensemble '...', " prefix that would name an internal model, with the code the step gave it
    (`deadlines.error_code_of`)."""
    if response.has_error():
        message = _ENSEMBLE_PREFIX.sub("", response.error().message())
        return _error(message, getattr(pb_utils.TritonError, deadlines.error_code_of(message)))
    return pb_utils.InferenceResponse(output_tensors=response.output_tensors())


def _size(request) -> tuple[int, int | None]:
    """(bytes of text, tokens when the request carries token ids) of a request's inputs."""
    nbytes, tokens = 0, None
    for tensor in request.inputs():
        if tensor.name() in ("messages", "text"):
            nbytes += sum(len(v) for v in tensor.as_numpy().reshape(-1) if isinstance(v, (bytes, str)))
        elif tensor.name() == "input_ids":
            tokens = int(tensor.as_numpy().size)
    return nbytes, tokens


def _scored_tokens(response) -> int | None:
    """The tokens the pipeline scored for a request (its `num_tokens`), or None for an error."""
    if response.has_error():
        return None
    tensor = pb_utils.get_output_tensor_by_name(response, "num_tokens")
    return None if tensor is None else int(tensor.as_numpy().sum())
