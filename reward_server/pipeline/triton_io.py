"""Triton Python-backend plumbing shared by the model.py adapters.

Importable only inside Triton's Python backend stub, where `triton_python_backend_utils`
exists; everything else in the package is plain Python.
"""

from __future__ import annotations

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_server.pipeline.stages import EngineError, EngineUnavailable, RequestDropped, RequestError

_LOGGER = logging.getLogger(__name__)


def input_array(request, name: str) -> np.ndarray | None:
    """The named input of a request as numpy, or None when the (optional) input is absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def respond(result: dict | RequestError):
    """An InferenceResponse for a stage result: output tensors, or an error for that request alone
    (INTERNAL for an `EngineError`, UNAVAILABLE for `EngineUnavailable`, CANCELLED for `RequestDropped`,
    else INVALID_ARG)."""
    if isinstance(result, RequestError):
        code = (pb_utils.TritonError.INTERNAL if isinstance(result, EngineError) else
                pb_utils.TritonError.UNAVAILABLE if isinstance(result, EngineUnavailable) else
                pb_utils.TritonError.CANCELLED if isinstance(result, RequestDropped) else
                pb_utils.TritonError.INVALID_ARG)
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(result), code))
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in result.items()])


def refuse_if_draining(drain, requests) -> list | None:
    """Count `requests` as accepted, then, if the server is draining (reward_server.pipeline.drain), the
    UNAVAILABLE responses refusing them; else None. Counting first closes the race with the
    launcher, which sets the flag and then reads the counters."""
    if drain is None:
        return None
    drain.accepted(len(requests))
    if not drain.draining():
        return None
    drain.finished(len(requests))
    from reward_server.pipeline.drain import STOPPING_MESSAGE

    return [respond(EngineUnavailable(STOPPING_MESSAGE)) for _ in requests]


def count_finished(drain, responses, failed_only: bool = False) -> None:
    """Count answered requests (all, or those answered with an error) as finished for the drain."""
    if drain is not None:
        drain.finished(sum(1 for r in responses if r.has_error()) if failed_only else len(responses))


def _internal_error(stage, requests):
    # The traceback goes to the server log; the client gets no internal detail (paths, shm names).
    _LOGGER.exception("stage %s failed", getattr(stage, "__name__", stage))
    error = pb_utils.TritonError(f"internal error in {getattr(stage, '__name__', 'a stage')}; the server log has "
                                 "the details", pb_utils.TritonError.INTERNAL)
    return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]


def guarded(stage, requests, *args, observe=None):
    """Run `stage`; if it fails as a whole, answer every request with an INTERNAL error, not a crash.

    `observe(requests, results)`, when given, sees the stage's results first (metrics, logging);
    its failures are logged and never fail requests.
    """
    try:
        results = stage(*args)
    except Exception:  # noqa: BLE001 - the server must keep serving
        return _internal_error(stage, requests)
    if observe is not None:
        try:
            observe(requests, results)
        except Exception:  # noqa: BLE001
            _LOGGER.exception("observing the results of %s failed", getattr(stage, "__name__", stage))
    return [respond(result) for result in results]


def request_id(request) -> str:
    """The id the client set on its request (Triton's `id` field; ensembles pass it to each step), or ""."""
    try:
        return request.request_id() or ""
    except Exception:  # noqa: BLE001
        return ""


def log_info(message: str) -> None:
    """One line in tritonserver's log at INFO (the stub's own logging is not configured)."""
    pb_utils.Logger.log_info(message)


async def guarded_async(stage, requests, *args):
    """`guarded` for a coroutine stage (the TensorRT-LLM fan-out awaits its engine requests)."""
    try:
        return [respond(result) for result in await stage(*args)]
    except Exception:  # noqa: BLE001 - the server must keep serving
        return _internal_error(stage, requests)


def bls_caller(model_name: str, outputs: list[str]):
    """An async function sending one request (a dict of numpy inputs, and its request id) to
    `model_name` in this server through Python-backend BLS and returning its `outputs` that came
    back, as numpy.

    Raises (from the returned function):
        EngineUnavailableError: the called model is unavailable (the server is shutting down).
        RuntimeError: the called model answered with another error.
    """
    from reward_server.pipeline.trtllm.fanout import EngineUnavailableError

    async def infer(inputs: dict[str, np.ndarray], request_id: str = "") -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(model_name=model_name, requested_output_names=outputs,
                                            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
                                            request_id=request_id)
        response = await request.async_exec()
        if response.has_error():
            error = response.error()
            # Triton refuses new BLS requests once SIGTERM starts its shutdown ("Server not ready")
            if error.code() == pb_utils.TritonError.UNAVAILABLE or "not ready" in error.message():
                raise EngineUnavailableError(error.message())
            raise RuntimeError(error.message())
        arrays = {}
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                continue
            if tensor.is_cpu():
                arrays[name] = tensor.as_numpy()
            else:  # a backend may answer in GPU memory; only the K reward logits are needed on the host
                from torch.utils.dlpack import from_dlpack

                arrays[name] = from_dlpack(tensor.to_dlpack()).float().cpu().numpy()
        return arrays

    return infer


class EngineMetrics:
    """Counters of the engine's work on Triton's Prometheus endpoint (port 8002).

    reward_engine_<prefix><field>_total for each counter of `fields`: by default the PyTorch engine's
    `EngineStats` (sequences, tokens computed, tokens saved by shared prefixes, padded tokens, so
    padding ratio = 1 - tokens / padded); `KV_CACHE_FIELDS` for the TensorRT-LLM fan-out's
    `KvCacheStats` with prefix "kv_cache_" (blocks reused / used: prompt reuse = reused / total);
    `PREFIX_CACHE_FIELDS` for the torch engine's `PrefixCacheStats` with prefix "prefix_cache_", and
    its `PREFIX_CACHE_GAUGES` (bytes held) as the gauge reward_engine_prefix_cache_bytes.
    reward_engine_<prefix><name> for each gauge of `gauges`: set to the stats' value at each update.
    """

    FIELDS = {"sequences": "conversations scored", "tokens": "tokens run through the model",
              "shared_tokens": "tokens not computed thanks to shared prefixes",
              "padded_tokens": "tokens computed including padding"}
    PREFIX_CACHE_FIELDS = {"hits": "sequences that continued keys held by the prefix cache",
                           "misses": "sequences that found no prefix in the prefix cache",
                           "reused_tokens": "tokens not computed thanks to the prefix cache",
                           "evictions": "prefix cache entries dropped to stay within its bound"}
    KV_CACHE_FIELDS = {"requests": "TensorRT-LLM requests that returned KV-cache counters",
                       "reused_blocks": "KV-cache blocks found cached (shared prompts)",
                       "total_blocks": "KV-cache blocks used"}
    PREFIX_CACHE_GAUGES = {"bytes": "Bytes held by the prefix cache"}

    def __init__(self, model_name: str, fields: dict[str, str] | None = None, prefix: str = "",
                 gauges: dict[str, str] | None = None):
        self._families, self._counters = [], {}  # a family must outlive its metrics
        for field, what in (fields or self.FIELDS).items():
            family = pb_utils.MetricFamily(name=f"reward_engine_{prefix}{field}_total", description=f"Number of {what}",
                                           kind=pb_utils.MetricFamily.COUNTER)
            self._families.append(family)
            self._counters[field] = family.Metric(labels={"model": model_name})
        self._seen = dict.fromkeys(self._counters, 0)
        self._gauges = {}
        for field, what in (gauges or {}).items():
            family = pb_utils.MetricFamily(name=f"reward_engine_{prefix}{field}", description=what,
                                           kind=pb_utils.MetricFamily.GAUGE)
            self._families.append(family)
            self._gauges[field] = family.Metric(labels={"model": model_name})

    def update(self, stats) -> None:
        """Add what `stats` counted since the last update; a metrics failure never fails requests."""
        try:
            for field, counter in self._counters.items():
                value = getattr(stats, field)
                counter.increment(value - self._seen[field])
                self._seen[field] = value
            for field, gauge in self._gauges.items():
                gauge.set(getattr(stats, field))
        except Exception:  # noqa: BLE001
            _LOGGER.exception("could not update engine metrics")


def ticket_of(request):
    """The `deadlines.Ticket` an entry point gave the request (None when a stage is called directly)."""
    from reward_server.pipeline.deadlines import Ticket

    try:
        return Ticket.from_parameters(request.parameters())
    except Exception:  # noqa: BLE001 - a request without readable parameters has no ticket
        return None


def answer_later(request, on_error=None):
    """A function answering `request` once, from any thread, through its response sender (a default-mode
    model that returns None from `execute`); `on_error()` is called when the answer is an error.

    The request itself must not be touched after its final response (Triton releases it then), so
    the sender is taken now and the request is never referenced again.
    """
    sender = request.get_response_sender()

    def respond_once(result: dict | RequestError) -> None:
        sender.send(respond(result), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if on_error is not None and isinstance(result, RequestError):
            on_error()

    return respond_once


class DropMetrics:
    """Requests and tokens a model dropped because nobody waits for them, or refused under overload:

        reward_dropped_requests_total{model,reason}   reason: cancelled | expired | overloaded
        reward_dropped_tokens_total{model,reason}     their tokens (those of a request dropped mid-wave included)
    """

    def __init__(self, model_name: str):
        from reward_server.pipeline.deadlines import DROP_REASONS

        self._families = [
            pb_utils.MetricFamily(name="reward_dropped_requests_total", kind=pb_utils.MetricFamily.COUNTER,
                                  description="Requests dropped (client gone, deadline passed) or refused (overload)"),
            pb_utils.MetricFamily(name="reward_dropped_tokens_total", kind=pb_utils.MetricFamily.COUNTER,
                                  description="Tokens of the requests dropped or refused")]
        self._requests = {r: self._families[0].Metric(labels={"model": model_name, "reason": r}) for r in DROP_REASONS}
        self._tokens = {r: self._families[1].Metric(labels={"model": model_name, "reason": r}) for r in DROP_REASONS}

    def drop(self, reason: str, requests: int = 1, tokens: int = 0) -> None:
        """Count `requests` dropped for `reason`; a metrics failure never fails requests."""
        try:
            self._requests[reason].increment(requests)
            if tokens:
                self._tokens[reason].increment(tokens)
        except Exception:  # noqa: BLE001
            _LOGGER.exception("could not count dropped requests")


def split_dropped(requests, board, drops: DropMetrics | None = None) -> tuple[list[int], list]:
    """(indices of the requests to work on, responses for all: None where work goes on, else the
    CANCELLED answer of a request nobody waits for). A step calls it before its work."""
    gone = gone_checker(requests, board, drops)
    keep, responses = [], [None] * len(requests)
    for i in range(len(requests)):
        answer = gone(i)
        if answer is None:
            keep.append(i)
        else:
            responses[i] = respond(answer)
    return keep, responses


def merge_responses(responses: list, keep: list[int], computed: list) -> list:
    """`responses` of `split_dropped` with the computed responses of the kept requests filled in."""
    for i, response in zip(keep, computed):
        responses[i] = response
    return responses


def gone_checker(requests, board, drops: DropMetrics | None = None):
    """For a batch of requests: a function of a request's index giving its CANCELLED answer once its
    client went or its deadline passed (counted in `drops`, once), else None."""
    from reward_server.pipeline import deadlines
    from reward_server.pipeline.stages import RequestDropped

    tickets = [ticket_of(request) for request in requests]

    def gone(r: int):
        reason = deadlines.drop_reason(tickets[r], board)
        if reason is None:
            return None
        if drops is not None:
            drops.drop(reason)
        return RequestDropped(deadlines.drop_message(reason, tickets[r]))

    return gone


class KernelInfo:
    """What the engine computes attention with, as one line in the log and one gauge set to 1 (users
    debugging speed look there):

        reward_engine_kernel_info{model,attention,isa,origin}   attention: native | sdpa; isa: the native
                                                                kernels' build (avx512_bf16, avx512, avx2)
                                                                or none; origin: prebuilt | development build
    """

    def __init__(self, model_name: str, labels: dict[str, str], description: str):
        log_info(f"{model_name}: attention: {description}")  # once, in tritonserver's log
        self._family = pb_utils.MetricFamily(name="reward_engine_kernel_info",
                                             description="The engine's attention kernel and instruction set (value 1)",
                                             kind=pb_utils.MetricFamily.GAUGE)
        self._metric = self._family.Metric(labels={"model": model_name, **labels})  # a family must outlive it
        self._metric.set(1)


class QueueMetrics:
    """Where the engine's time goes, per request, now that its queue is its own (Triton's
    `nv_inference_queue_duration_us` no longer sees the wait):

        reward_engine_queue_duration_us_total{model}     from arrival at the server to its wave's start
        reward_engine_compute_duration_us_total{model}   its wave's computing time
        reward_engine_queued_requests{model}             gauges: requests admitted and waiting now
        reward_engine_queued_tokens{model}               (not the running wave), and their tokens

    The counters mean what Triton's counters of those names without `reward_engine_` mean, so the
    autoscaling rule adds them up with the TensorRT-LLM model's (deploy/k8s/base/prometheusrule.yaml).
    """

    def __init__(self, model_name: str):
        self._families = [pb_utils.MetricFamily(name=f"reward_engine_{what}_duration_us_total",
                                                description=f"Cumulative {what} microseconds of the engine's requests",
                                                kind=pb_utils.MetricFamily.COUNTER) for what in ("queue", "compute")]
        self._families += [pb_utils.MetricFamily(name=f"reward_engine_queued_{what}",
                                                 description=f"{what.capitalize()} admitted to the engine's queue and "
                                                             "waiting now", kind=pb_utils.MetricFamily.GAUGE)
                           for what in ("requests", "tokens")]
        (self._queue, self._compute, self._queued_requests,
         self._queued_tokens) = (family.Metric(labels={"model": model_name}) for family in self._families)
        self._last_queued = None  # a gauge is set only when it changes: each set is a message to Triton

    def wave(self, jobs, start: float, seconds: float) -> None:
        """Count a wave of `jobs` that started at `start` (epoch seconds) and took `seconds`."""
        try:
            self._queue.increment(sum(max(0.0, start - job.arrival) for job in jobs) * 1e6)
            self._compute.increment(len(jobs) * seconds * 1e6)
        except Exception:  # noqa: BLE001
            _LOGGER.exception("could not update queue metrics")

    def queued(self, requests: int, tokens: int) -> None:
        """Set the queue gauges (`EngineScheduler`'s `on_queue`)."""
        if (requests, tokens) == self._last_queued:
            return
        self._last_queued = (requests, tokens)
        self._queued_requests.set(requests)
        self._queued_tokens.set(tokens)


# The entry points' tasks run on the stub's event-loop thread, which waits for the GIL while the
# stub's main thread holds it between messages; Python hands it over only every switch interval (5 ms
# by default): measured as ~3 ms of added latency per request. (Not for the engine's stub: there the
# shorter interval slowed a small wave's Python-heavy compute from 19 to 26 ms.)
STUB_SWITCH_INTERVAL_S = 0.0005


def prefer_threads() -> None:
    """Let a stub's other threads take the GIL sooner (call once, in `initialize`)."""
    import sys

    sys.setswitchinterval(STUB_SWITCH_INTERVAL_S)
