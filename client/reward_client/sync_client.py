"""Blocking client: :class:`RewardClient`."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from reward_client._base import (DEFAULT_URL, AttributeNames, ClientSettings, checked_id_rows,
                                 encoded_conversations, encoded_texts, keyed_conversations, keyed_id_rows,
                                 keyed_texts)
from reward_client.conversations import ConversationLike, Response, with_response
from reward_client.errors import RewardUnavailableError
from reward_client.results import RankedResponse, ScoreResult, bradley_terry
from reward_client.retry import Attempts, RetryBudget, RetryPolicy, call_with_retries
from reward_client.tls import TlsConfig, client_kwargs
from reward_client.transport import routing, wire
from reward_client.transport.endpoints import EndpointSet, is_scale_out, parse_targets
from reward_client.transport.inflight import CallScope, CallScopes
from reward_client.transport.pipeline import chunked, ordered_map
from reward_client.transport.replicas import (ReplicaDown, ReplicaPool, chunk_error, chunk_results, failover,
                                              planned_chunks)

_LOGGER = logging.getLogger(__name__)

Prompt = Union[str, Sequence[Dict[str, str]]]


class RewardClient:
    """Score conversations with a Triton reward server over gRPC (blocking API).

    Large inputs are split into requests of ``batch_size`` conversations, sent with at most
    ``max_in_flight`` outstanding, and returned in input order. Overload errors are retried
    with exponential backoff and jitter, within the client's retry budget; invalid input raises at
    once, naming the conversation. Every attempt carries its deadline to the server, and a call
    that is abandoned (iteration stopped, an error, :meth:`close`) cancels its requests in flight.

    Given several replicas (a list, ``"a:8001,b:8001"``, or ``"dns:///headless-service:8001"``),
    conversations sharing a prompt go to the same replica (rendezvous hashing on the prompt), at
    most ``max_in_flight`` requests per replica; a replica that fails is avoided and its requests
    move to the next replica of each prompt's ranking, every result still delivered once, in
    input order (see :mod:`reward_client.transport.routing`).

    Example::

        with RewardClient("localhost:8001") as client:
            client.wait_until_ready(60)
            results = client.score([("What is 2+2?", "4"), ("What is 2+2?", "5")])
    """

    def __init__(self, url: Union[str, Sequence[str]] = DEFAULT_URL, *, model: str = wire.MESSAGES_MODEL,
                 ids_model: str = wire.IDS_MODEL, text_model: str = wire.TEXT_MODEL, batch_size: int = 64, max_in_flight: int = 4,
                 timeout_s: Optional[float] = 60.0, retry: Optional[RetryPolicy] = None,
                 verbose: bool = False, refresh_s: float = 30.0, tls: Optional[TlsConfig] = None,
                 deadline_s: Optional[float] = None) -> None:
        """Create a client; the connection is made lazily by the first call.

        Args:
            url: gRPC ``host:port``; or several replicas: a list, a comma-separated string, or
                ``dns:///name:port`` (every address of the name, e.g. a headless Service).
            model: name of the messages ensemble.
            ids_model: name of the token-id ensemble.
            text_model: name of the templated-text ensemble.
            batch_size: conversations per request.
            max_in_flight: requests outstanding at once.
            timeout_s: deadline of each request attempt (None: none).
            retry: retry policy for overload/unavailability (default :class:`RetryPolicy`); its
                retry budget is shared by all of this client's requests.
            verbose: log every gRPC call (tritonclient's verbose mode).
            refresh_s: with ``dns:///`` targets, how often the name is resolved again.
            tls: gRPC over TLS (and mutual TLS with a client certificate); None: plaintext.
            deadline_s: the most one request may take, retries and backoff included (None: only
                ``timeout_s`` bounds each attempt); each attempt gets ``min(timeout_s, what is left)``.

        Raises:
            ValueError: if ``batch_size`` or ``max_in_flight`` is < 1, ``deadline_s`` is <= 0,
                or an endpoint is not ``host:port``.
        """
        targets = parse_targets(url)
        self.settings = ClientSettings(url=",".join(targets), model=model, ids_model=ids_model, text_model=text_model,
                                       batch_size=batch_size, max_in_flight=max_in_flight,
                                       timeout_s=timeout_s, retry=retry or RetryPolicy(), deadline_s=deadline_s)
        self._pool: Optional[ReplicaPool] = None
        if is_scale_out(targets):
            self._pool = ReplicaPool(EndpointSet(targets, refresh_s),
                                     lambda address: grpcclient.InferenceServerClient(
                                         url=address, verbose=verbose, **client_kwargs(tls)))
            self._client = None
        else:
            self._client = grpcclient.InferenceServerClient(url=targets[0], verbose=verbose, **client_kwargs(tls))
        self._executor: Optional[ThreadPoolExecutor] = None
        self._executor_size = 0
        self._attributes = AttributeNames()
        self._budget = RetryBudget(self.settings.retry)
        self._calls = CallScopes()
        # Test hooks: None waits for real (backoffs wake when their call is abandoned).
        self._sleep: Optional[Callable[[float], None]] = None
        self._clock: Callable[[], float] = time.monotonic

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the requests in flight, stop the worker threads and close the connection.

        A scoring call still running in another thread then raises ``RewardClientError``
        ("cancelled: the client was closed").
        """
        self._calls.cancel_all("the client was closed")
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._client is not None:
            self._client.close()
        if self._pool is not None:
            for client in self._pool.take_clients():
                client.close()

    # -- health ------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Return whether the server and the ``reward`` model are ready (never raises).

        With several replicas: whether at least one is.
        """
        return any(self._ready(client) for _, client in self._controls())

    def _ready(self, client: Any) -> bool:
        try:
            return bool(client.is_server_ready() and client.is_model_ready(self.settings.model))
        except (InferenceServerException, RewardUnavailableError):
            return False

    def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        """Block until the server and the ``reward`` model are ready.

        Raises:
            RewardUnavailableError: if they are not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() >= deadline:
                raise RewardUnavailableError(
                    f"{self.settings.url}: model {self.settings.model!r} not ready "
                    f"after {timeout_s:.1f}s")
            (self._sleep or time.sleep)(poll_s)

    def health(self) -> Dict[str, bool]:
        """Return ``{"live", "ready", "model_ready"}`` flags of the server (never raises).

        With several replicas, each flag is true when it is for at least one replica.
        """
        status = {"live": False, "ready": False, "model_ready": False}
        for replica in self.replica_health().values():
            for key, value in replica.items():
                status[key] = status[key] or value
        return status

    def replica_health(self) -> Dict[str, Dict[str, bool]]:
        """Return the :meth:`health` flags of each replica, by address (never raises)."""
        try:
            controls = self._controls()
        except RewardUnavailableError:
            return {}
        report = {}
        for address, client in controls:
            status = {"live": False, "ready": False, "model_ready": False}
            for key, probe in (("live", client.is_server_live), ("ready", client.is_server_ready),
                               ("model_ready", lambda c=client: c.is_model_ready(self.settings.model))):
                try:
                    status[key] = bool(probe())
                except InferenceServerException:
                    pass
            report[address] = status
        return report

    def _controls(self) -> List[Tuple[str, Any]]:
        """``(address, client)`` for health and metadata calls: the one server, or every replica."""
        if self._pool is None:
            return [(self.settings.url, self._client)]
        return self._pool.clients()

    def _control(self) -> Any:
        """The client that answers metadata calls: the one server, or the first ready replica."""
        if self._pool is None:
            return self._client
        controls = self._pool.clients()
        return next((client for _, client in controls if self._ready(client)), controls[0][1])

    def models(self) -> List[Dict[str, Any]]:
        """Return each model's name, version, state and, when ready, inputs and outputs.

        Uses the repository index when the server allows it, otherwise the reward
        repository's known models (the index API is often restricted to admins).

        Raises:
            RewardUnavailableError: if the server cannot be reached.
            RewardServerError: for other server failures.
        """
        client = self._control()
        try:
            index = client.get_model_repository_index(as_json=True).get("models", [])
        except InferenceServerException as exc:
            _LOGGER.info("repository index unavailable (%s); listing known models", exc)
            index = [{"name": name} for name in wire.KNOWN_MODELS]
        try:
            for entry in index:
                if "state" not in entry:
                    entry["state"] = ("READY" if client.is_model_ready(entry["name"])
                                      else "UNAVAILABLE")
                if entry["state"] == "READY":
                    meta = client.get_model_metadata(entry["name"], as_json=True)
                    entry["version"] = entry.get("version") or ",".join(meta.get("versions", []))
                    entry["inputs"] = meta.get("inputs", [])
                    entry["outputs"] = meta.get("outputs", [])
        except InferenceServerException as exc:
            raise wire.map_error(exc) from exc
        return index

    def attribute_names(self) -> Tuple[str, ...]:
        """Return the model's attribute names (``reward_i`` defaults when unnamed).

        Raises:
            RewardUnavailableError: if the server cannot be reached.
            RewardServerError: for other server failures.
        """
        client = self._control()
        try:
            self._load_attribute_names(client)
            metadata = client.get_model_metadata(self.settings.model)
        except InferenceServerException as exc:
            raise wire.map_error(exc) from exc
        return self._attributes.names(wire.attribute_count(metadata))

    # -- scoring -----------------------------------------------------------------------------

    def score(self, conversations: Iterable[ConversationLike]) -> List[ScoreResult]:
        """Score conversations; results are in input order.

        Args:
            conversations: message lists, ``(prompt, response)`` pairs or mappings
                (see :mod:`reward_client.conversations`).

        Raises:
            RewardInvalidInputError: a conversation was malformed or rejected; ``.index`` is
                its position in ``conversations``.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        return list(self.iter_scores(conversations))

    def iter_scores(self, conversations: Iterable[ConversationLike]) -> Iterator[ScoreResult]:
        """Stream results for a (possibly huge) iterable of conversations, in input order.

        Stopping early (``close()`` the iterator, or drop it) cancels the requests in flight.

        Raises:
            RewardInvalidInputError: a conversation was malformed or rejected; ``.index`` is
                its position in ``conversations``.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        yield from self._stream(lambda: keyed_conversations(conversations),
                                lambda: encoded_conversations(conversations), self.settings.model,
                                wire.messages_inputs)

    def score_ids(self, token_id_lists: Iterable[Sequence[int]]) -> List[ScoreResult]:
        """Score already-tokenised conversations through the ``reward_ids`` ensemble.

        Raises:
            RewardInvalidInputError: a list was empty or rejected; ``.index`` names it.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        return list(self.iter_score_ids(token_id_lists))

    def iter_score_ids(self, token_id_lists: Iterable[Sequence[int]]) -> Iterator[ScoreResult]:
        """Stream :meth:`score_ids` results in input order.

        Raises:
            RewardInvalidInputError: a list was empty or rejected; ``.index`` names it.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        yield from self._stream(lambda: keyed_id_rows(token_id_lists), lambda: checked_id_rows(token_id_lists),
                                self.settings.ids_model, wire.ids_inputs)

    def score_texts(self, texts: Iterable[str]) -> List[ScoreResult]:
        """Score already-templated texts through the ``reward_text`` ensemble.

        For conversations that arrive as one string in the reward model's chat format (as
        OpenRLHF and verl send them): the server tokenises each text as given, keeping special
        tokens written in it and ensuring exactly one leading BOS; no chat template is applied.

        Raises:
            RewardInvalidInputError: a text was empty, not a string, or rejected; ``.index`` names it.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        return list(self.iter_score_texts(texts))

    def iter_score_texts(self, texts: Iterable[str]) -> Iterator[ScoreResult]:
        """Stream :meth:`score_texts` results in input order.

        Raises:
            RewardInvalidInputError: a text was empty, not a string, or rejected; ``.index`` names it.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        yield from self._stream(lambda: keyed_texts(texts), lambda: encoded_texts(texts), self.settings.text_model,
                                wire.text_inputs)

    def preference(self, prompt: Prompt, response_a: str, response_b: str) -> float:
        """Return P(``response_a`` preferred over ``response_b``) = sigmoid(r_a - r_b).

        Raises:
            RewardInvalidInputError: a conversation was rejected (index 0 = a, 1 = b).
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: the request passed its deadline.
            RewardServerError: any other server failure.
        """
        a, b = self.score([with_response(prompt, response_a), with_response(prompt, response_b)])
        return bradley_terry(a.score, b.score)

    def rank(self, prompt: Prompt, responses: Sequence[Response]) -> List[RankedResponse]:
        """Rank responses to one prompt, best first (best-of-n); ties keep input order.

        With a process reward model a response may be its list of steps; responses are ranked by
        their score, the aggregate of their step scores (each result's ``steps``).

        Raises:
            RewardInvalidInputError: a response was rejected; ``.index`` is its position.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        results = self.score(with_response(prompt, response) for response in responses)
        ranked = [RankedResponse(r.index, responses[r.index], r) for r in results]
        return sorted(ranked, key=lambda item: (-item.score, item.index))

    # -- internals ---------------------------------------------------------------------------

    def _workers(self, count: int) -> ThreadPoolExecutor:
        # Grown when more replicas appear; never shrunk (idle threads cost nothing).
        if self._executor is None or self._executor_size < count:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(count, thread_name_prefix="reward-client")
            self._executor_size = count
        return self._executor

    def _stream(self, keyed: Any, plain: Any, model: str, make_inputs: Any) -> Iterator[ScoreResult]:
        """Score one input stream: routed by group key over replicas (``keyed()``), or cut into
        chunks for the one server (``plain()``); only the one used is made."""
        if self._pool is not None:
            yield from self._run_routed(keyed(), model, make_inputs)
            return
        yield from self._run(chunked(plain(), self.settings.batch_size), model, make_inputs)

    def _retried(self, scope: CallScope, call: Callable[[Optional[float]], Any],
                 attempts: Optional[Attempts] = None) -> Any:
        """Run one request's attempts (``call(limit_s)``) under the settings, budget and deadline."""
        return call_with_retries(call, attempts or self.settings.attempts(self._budget, self._clock),
                                 self._sleep or scope.pause)

    def _run(self, chunks: Iterable[Tuple[int, list]], model: str, make_inputs: Any
             ) -> Iterator[ScoreResult]:
        executor = self._workers(self.settings.max_in_flight)
        # Leaving this block for any reason (done, an error, the caller stopped iterating)
        # cancels whatever requests are still in flight.
        with self._calls.open() as scope:
            def request(chunk: Tuple[int, list]) -> List[ScoreResult]:
                offset, items = chunk
                inputs = make_inputs(items)
                return self._retried(scope, lambda limit: self._infer(scope, model, inputs, offset, limit))

            with closing(ordered_map(request, chunks, self.settings.max_in_flight, executor)) as batches:
                for results in batches:
                    yield from results

    def _infer(self, scope: CallScope, model: str, inputs: list, offset: int, limit_s: Optional[float]
               ) -> List[ScoreResult]:
        try:
            response = scope.infer(self._client, model, inputs, limit_s)
        except InferenceServerException as exc:
            raise wire.map_error(exc, offset) from exc
        self._load_attribute_names(self._client)
        return wire.parse_results(response.as_numpy, offset, self._attributes.names)

    def _run_routed(self, keyed: Iterable[routing.Keyed], model: str, make_inputs: Any
                    ) -> Iterator[ScoreResult]:
        pool = self._pool
        in_flight = self.settings.max_in_flight * len(pool.addresses())
        executor = self._workers(in_flight)

        with self._calls.open() as scope:
            def request(chunk: routing.RoutedChunk) -> List[Tuple[int, ScoreResult]]:
                results = self._score_chunk(scope, chunk, model, make_inputs)
                return [(result.index, result) for result in results]

            chunks = planned_chunks(pool, keyed, self.settings.batch_size)
            with closing(ordered_map(request, chunks, in_flight, executor)) as batches:
                yield from routing.reorder(batches)

    def _score_chunk(self, scope: CallScope, chunk: routing.RoutedChunk, model: str, make_inputs: Any
                     ) -> List[ScoreResult]:
        """Score one routed chunk, moving it (or its parts) to other replicas while replicas fail.

        The parts keep the chunk's deadline: moving is not a new request.
        """
        pending, done, failovers = [chunk], [], 0
        attempts = self.settings.attempts(self._budget, self._clock)
        while pending:
            current = pending.pop(0)
            try:
                done.extend(self._retried(
                    scope, lambda limit, part=current: self._infer_routed(scope, part, model, make_inputs, limit),
                    attempts))
            except ReplicaDown as down:
                failovers += 1
                pending.extend(failover(self._pool, current, down, self.settings.batch_size, failovers))
        return done

    def _infer_routed(self, scope: CallScope, chunk: routing.RoutedChunk, model: str, make_inputs: Any,
                      limit_s: Optional[float]) -> List[ScoreResult]:
        client = self._pool.client(chunk.address)
        try:
            response = scope.infer(client, model, make_inputs(chunk.payloads), limit_s)
        except InferenceServerException as exc:
            raise chunk_error(exc, chunk) from exc
        self._pool.health.mark_up(chunk.address)
        self._load_attribute_names(client)
        return chunk_results(response.as_numpy, chunk, self._attributes.names)

    def _load_attribute_names(self, client: Any) -> None:
        if self._attributes.known:
            return
        try:
            config = client.get_model_config(wire.POSTPROCESSING_MODEL).config
            self._attributes.set_from_config(config)
        except InferenceServerException as exc:
            _LOGGER.warning("cannot read attribute names from %r (%s); using reward_i names",
                            wire.POSTPROCESSING_MODEL, exc)
            self._attributes.set_unknown()
