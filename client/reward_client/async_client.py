"""Asyncio client: :class:`AsyncRewardClient`, on tritonclient's ``grpc.aio``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import (Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Dict, Iterable, List, Optional,
                    Sequence, Tuple, Union)

import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from reward_client._base import (DEFAULT_URL, AttributeNames, ClientSettings, checked_id_rows,
                                 encoded_conversations, encoded_texts, keyed_conversation, keyed_conversations,
                                 keyed_id_rows, keyed_texts)
from reward_client.conversations import ConversationLike, Response, encode, to_messages, with_response
from reward_client.errors import RewardUnavailableError
from reward_client.results import RankedResponse, ScoreResult, bradley_terry
from reward_client.retry import Attempts, RetryBudget, RetryPolicy, acall_with_retries
from reward_client.tls import TlsConfig, client_kwargs
from reward_client.transport import routing, wire
from reward_client.transport.endpoints import EndpointSet, is_scale_out, parse_targets
from reward_client.transport.pipeline import _as_async, achunked, aclosing, aordered_map, chunked
from reward_client.transport.replicas import (ReplicaDown, ReplicaPool, aplanned_chunks, chunk_error,
                                              chunk_results, failover)

_LOGGER = logging.getLogger(__name__)

Prompt = Union[str, Sequence[Dict[str, str]]]


class AsyncRewardClient:
    """Score conversations with a Triton reward server over gRPC (asyncio API).

    The same behaviour as :class:`reward_client.RewardClient` (chunking, bounded in-flight
    requests, ordered results, retries within a retry budget, deadlines sent with every attempt,
    typed errors, scale-out over several replicas), as coroutines. Cancelling the task, or closing
    an ``iter_*`` generator early, cancels the requests in flight. Resolving a ``dns:///`` target
    blocks briefly, once per ``refresh_s``.

    Example::

        async with AsyncRewardClient("localhost:8001") as client:
            await client.wait_until_ready(60)
            async for result in client.iter_scores(conversations):
                ...
    """

    def __init__(self, url: Union[str, Sequence[str]] = DEFAULT_URL, *, model: str = wire.MESSAGES_MODEL,
                 ids_model: str = wire.IDS_MODEL, text_model: str = wire.TEXT_MODEL, batch_size: int = 64, max_in_flight: int = 4,
                 timeout_s: Optional[float] = 60.0, retry: Optional[RetryPolicy] = None,
                 verbose: bool = False, refresh_s: float = 30.0, tls: Optional[TlsConfig] = None,
                 deadline_s: Optional[float] = None) -> None:
        """Create a client; see :class:`reward_client.RewardClient` for the arguments.

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
                                     lambda address: aioclient.InferenceServerClient(
                                         url=address, verbose=verbose, **client_kwargs(tls)))
            self._client = None
        else:
            self._client = aioclient.InferenceServerClient(url=targets[0], verbose=verbose, **client_kwargs(tls))
        self._attributes = AttributeNames()
        self._budget = RetryBudget(self.settings.retry)
        # Test hooks.
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._clock: Callable[[], float] = time.monotonic

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (every replica's); gRPC cancels the calls still in flight."""
        if self._client is not None:
            await self._client.close()
        if self._pool is not None:
            for client in self._pool.take_clients():
                await client.close()

    async def is_ready(self) -> bool:
        """Return whether the server and the ``reward`` model are ready (never raises).

        With several replicas: whether at least one is.
        """
        try:
            controls = self._controls()
        except RewardUnavailableError:
            return False
        for _, client in controls:
            if await self._ready(client):
                return True
        return False

    async def _ready(self, client: Any) -> bool:
        try:
            return bool(await client.is_server_ready() and await client.is_model_ready(self.settings.model))
        except InferenceServerException:
            return False

    def _controls(self) -> List[Tuple[str, Any]]:
        """``(address, client)`` for health and metadata calls: the one server, or every replica."""
        if self._pool is None:
            return [(self.settings.url, self._client)]
        return self._pool.clients()

    async def _control(self) -> Any:
        """The client that answers metadata calls: the one server, or the first ready replica."""
        controls = self._controls()
        for _, client in controls:
            if self._pool is None or await self._ready(client):
                return client
        return controls[0][1]

    async def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        """Wait until the server and the ``reward`` model are ready.

        Raises:
            RewardUnavailableError: if they are not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not await self.is_ready():
            if time.monotonic() >= deadline:
                raise RewardUnavailableError(
                    f"{self.settings.url}: model {self.settings.model!r} not ready "
                    f"after {timeout_s:.1f}s")
            await self._sleep(poll_s)

    async def health(self) -> Dict[str, bool]:
        """Return ``{"live", "ready", "model_ready"}`` flags of the server (never raises).

        With several replicas, each flag is true when it is for at least one replica.
        """
        status = {"live": False, "ready": False, "model_ready": False}
        for replica in (await self.replica_health()).values():
            for key, value in replica.items():
                status[key] = status[key] or value
        return status

    async def replica_health(self) -> Dict[str, Dict[str, bool]]:
        """Return the :meth:`health` flags of each replica, by address (never raises)."""
        try:
            controls = self._controls()
        except RewardUnavailableError:
            return {}
        report = {}
        for address, client in controls:
            status = {"live": False, "ready": False, "model_ready": False}
            probes = (("live", client.is_server_live), ("ready", client.is_server_ready),
                      ("model_ready", lambda c=client: c.is_model_ready(self.settings.model)))
            for key, probe in probes:
                try:
                    status[key] = bool(await probe())
                except InferenceServerException:
                    pass
            report[address] = status
        return report

    async def attribute_names(self) -> Tuple[str, ...]:
        """Return the model's attribute names (``reward_i`` defaults when unnamed).

        Raises:
            RewardUnavailableError: if the server cannot be reached.
            RewardServerError: for other server failures.
        """
        client = await self._control()
        try:
            await self._load_attribute_names(client)
            metadata = await client.get_model_metadata(self.settings.model)
        except InferenceServerException as exc:
            raise wire.map_error(exc) from exc
        return self._attributes.names(wire.attribute_count(metadata))

    async def score(self, conversations: Union[Iterable[ConversationLike],
                                               AsyncIterable[ConversationLike]]
                    ) -> List[ScoreResult]:
        """Score conversations; results are in input order.

        Raises:
            RewardInvalidInputError: a conversation was malformed or rejected; ``.index`` is
                its position in ``conversations``.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        return [result async for result in self.iter_scores(conversations)]

    async def iter_scores(self, conversations: Union[Iterable[ConversationLike],
                                                     AsyncIterable[ConversationLike]]
                          ) -> AsyncIterator[ScoreResult]:
        """Stream results for a (possibly huge, possibly async) iterable, in input order.

        Stopping early (``await generator.aclose()``) or cancelling the task cancels the requests
        in flight.

        Raises:
            RewardInvalidInputError: a conversation was malformed or rejected; ``.index`` is
                its position in ``conversations``.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        if self._pool is not None:
            keyed = (_akeyed(conversations) if isinstance(conversations, AsyncIterable)
                     else _as_async(keyed_conversations(conversations)))
            results = self._run_routed(keyed, self.settings.model, wire.messages_inputs)
        else:
            if isinstance(conversations, AsyncIterable):
                encoded: Any = _aencoded(conversations)
            else:
                encoded = encoded_conversations(conversations)
            results = self._run(achunked(encoded, self.settings.batch_size), self.settings.model,
                                wire.messages_inputs)
        async with aclosing(results):
            async for result in results:
                yield result

    async def score_ids(self, token_id_lists: Iterable[Sequence[int]]) -> List[ScoreResult]:
        """Score already-tokenised conversations through the ``reward_ids`` ensemble.

        Raises:
            RewardInvalidInputError: a list was empty or rejected; ``.index`` names it.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        return [result async for result in self.iter_score_ids(token_id_lists)]

    async def iter_score_ids(self, token_id_lists: Iterable[Sequence[int]]
                             ) -> AsyncIterator[ScoreResult]:
        """Stream :meth:`score_ids` results in input order.

        Raises:
            RewardInvalidInputError: a list was empty or rejected; ``.index`` names it.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        results = self._stream(lambda: keyed_id_rows(token_id_lists), lambda: checked_id_rows(token_id_lists),
                               self.settings.ids_model, wire.ids_inputs)
        async with aclosing(results):
            async for result in results:
                yield result

    async def score_texts(self, texts: Iterable[str]) -> List[ScoreResult]:
        """Score already-templated texts through the ``reward_text`` ensemble (see
        :meth:`reward_client.RewardClient.score_texts`).

        Raises:
            RewardInvalidInputError: a text was empty, not a string, or rejected; ``.index`` names it.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        return [result async for result in self.iter_score_texts(texts)]

    async def iter_score_texts(self, texts: Iterable[str]) -> AsyncIterator[ScoreResult]:
        """Stream :meth:`score_texts` results in input order.

        Raises:
            RewardInvalidInputError: a text was empty, not a string, or rejected; ``.index`` names it.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        results = self._stream(lambda: keyed_texts(texts), lambda: encoded_texts(texts), self.settings.text_model,
                               wire.text_inputs)
        async with aclosing(results):
            async for result in results:
                yield result

    async def preference(self, prompt: Prompt, response_a: str, response_b: str) -> float:
        """Return P(``response_a`` preferred over ``response_b``) = sigmoid(r_a - r_b).

        Raises:
            RewardInvalidInputError: a conversation was rejected (index 0 = a, 1 = b).
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: the request passed its deadline.
            RewardServerError: any other server failure.
        """
        a, b = await self.score([with_response(prompt, response_a),
                                 with_response(prompt, response_b)])
        return bradley_terry(a.score, b.score)

    async def rank(self, prompt: Prompt, responses: Sequence[Response]) -> List[RankedResponse]:
        """Rank responses to one prompt, best first (best-of-n); ties keep input order.

        With a process reward model a response may be its list of steps; responses are ranked by
        their score, the aggregate of their step scores (each result's ``steps``).

        Raises:
            RewardInvalidInputError: a response was rejected; ``.index`` is its position.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        results = await self.score([with_response(prompt, response) for response in responses])
        ranked = [RankedResponse(r.index, responses[r.index], r) for r in results]
        return sorted(ranked, key=lambda item: (-item.score, item.index))

    async def _stream(self, keyed: Any, plain: Any, model: str, make_inputs: Any) -> AsyncIterator[ScoreResult]:
        """Score one (synchronous) input stream: routed over replicas (``keyed()``), or cut into
        chunks for the one server (``plain()``); only the one used is made."""
        if self._pool is not None:
            results = self._run_routed(_as_async(keyed()), model, make_inputs)
        else:
            results = self._run(chunked(plain(), self.settings.batch_size), model, make_inputs)
        async with aclosing(results):
            async for result in results:
                yield result

    def _retried(self, call: Callable[[Optional[float]], Awaitable[Any]], attempts: Optional[Attempts] = None
                 ) -> Awaitable[Any]:
        """Run one request's attempts (``call(limit_s)``) under the settings, budget and deadline."""
        return acall_with_retries(call, attempts or self.settings.attempts(self._budget, self._clock), self._sleep)

    async def _run(self, chunks: Any, model: str, make_inputs: Any
                   ) -> AsyncIterator[ScoreResult]:
        async def request(chunk: Tuple[int, list]) -> List[ScoreResult]:
            offset, items = chunk
            inputs = make_inputs(items)
            return await self._retried(lambda limit: self._infer(model, inputs, offset, limit))

        batches = aordered_map(request, chunks, self.settings.max_in_flight)
        async with aclosing(batches):
            async for results in batches:
                for result in results:
                    yield result

    async def _infer(self, model: str, inputs: list, offset: int, limit_s: Optional[float]) -> List[ScoreResult]:
        try:
            response = await self._client.infer(model, inputs, **wire.attempt_deadline(limit_s))
        except InferenceServerException as exc:
            raise wire.map_error(exc, offset) from exc
        await self._load_attribute_names(self._client)
        return wire.parse_results(response.as_numpy, offset, self._attributes.names)

    async def _run_routed(self, keyed: Any, model: str, make_inputs: Any) -> AsyncIterator[ScoreResult]:
        in_flight = self.settings.max_in_flight * len(self._pool.addresses())

        async def request(chunk: routing.RoutedChunk) -> List[Tuple[int, ScoreResult]]:
            results = await self._score_chunk(chunk, model, make_inputs)
            return [(result.index, result) for result in results]

        order = routing.InputOrder()
        chunks = aplanned_chunks(self._pool, keyed, self.settings.batch_size)
        batches = aordered_map(request, chunks, in_flight)
        async with aclosing(batches):
            async for batch in batches:
                for result in order.add(batch):
                    yield result
        order.close()

    async def _score_chunk(self, chunk: routing.RoutedChunk, model: str, make_inputs: Any
                           ) -> List[ScoreResult]:
        """Score one routed chunk, moving it (or its parts) to other replicas while replicas fail.

        The parts keep the chunk's deadline: moving is not a new request.
        """
        pending, done, failovers = [chunk], [], 0
        attempts = self.settings.attempts(self._budget, self._clock)
        while pending:
            current = pending.pop(0)
            try:
                attempt = lambda limit, part=current: self._infer_routed(part, model, make_inputs, limit)  # noqa: E731
                done.extend(await self._retried(attempt, attempts))
            except ReplicaDown as down:
                failovers += 1
                pending.extend(failover(self._pool, current, down, self.settings.batch_size, failovers))
        return done

    async def _infer_routed(self, chunk: routing.RoutedChunk, model: str, make_inputs: Any,
                            limit_s: Optional[float]) -> List[ScoreResult]:
        client = self._pool.client(chunk.address)
        try:
            response = await client.infer(model, make_inputs(chunk.payloads), **wire.attempt_deadline(limit_s))
        except InferenceServerException as exc:
            raise chunk_error(exc, chunk) from exc
        self._pool.health.mark_up(chunk.address)
        await self._load_attribute_names(client)
        return chunk_results(response.as_numpy, chunk, self._attributes.names)

    async def _load_attribute_names(self, client: Any) -> None:
        if self._attributes.known:
            return
        try:
            response = await client.get_model_config(wire.POSTPROCESSING_MODEL)
            self._attributes.set_from_config(response.config)
        except InferenceServerException as exc:
            _LOGGER.warning("cannot read attribute names from %r (%s); using reward_i names",
                            wire.POSTPROCESSING_MODEL, exc)
            self._attributes.set_unknown()


async def _akeyed(conversations: AsyncIterable[ConversationLike]) -> AsyncIterator[routing.Keyed]:
    index = 0
    async for conversation in conversations:
        yield keyed_conversation(conversation, index)
        index += 1


async def _aencoded(conversations: AsyncIterable[ConversationLike]) -> AsyncIterator[bytes]:
    index = 0
    async for conversation in conversations:
        yield encode(to_messages(conversation, index))
        index += 1
