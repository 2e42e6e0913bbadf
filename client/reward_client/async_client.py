"""Asyncio client: :class:`AsyncRewardClient`, on tritonclient's ``grpc.aio``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import (Any, AsyncIterable, AsyncIterator, Dict, Iterable, List, Optional, Sequence,
                    Tuple, Union)

import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from reward_client._base import (DEFAULT_URL, AttributeNames, ClientSettings,
                                 checked_id_rows, encoded_conversations)
from reward_client.conversations import ConversationLike, encode, to_messages, with_response
from reward_client.errors import RewardUnavailableError
from reward_client.results import RankedResponse, ScoreResult, bradley_terry
from reward_client.retry import RetryPolicy, acall_with_retries
from reward_client.transport import wire
from reward_client.transport.pipeline import achunked, aordered_map, chunked

_LOGGER = logging.getLogger(__name__)

Prompt = Union[str, Sequence[Dict[str, str]]]


class AsyncRewardClient:
    """Score conversations with a Triton reward server over gRPC (asyncio API).

    The same behaviour as :class:`reward_client.RewardClient` (chunking, bounded in-flight
    requests, ordered results, retries, typed errors), as coroutines.

    Example::

        async with AsyncRewardClient("localhost:8001") as client:
            await client.wait_until_ready(60)
            async for result in client.iter_scores(conversations):
                ...
    """

    def __init__(self, url: str = DEFAULT_URL, *, model: str = wire.MESSAGES_MODEL,
                 ids_model: str = wire.IDS_MODEL, batch_size: int = 64, max_in_flight: int = 4,
                 timeout_s: Optional[float] = 60.0, retry: Optional[RetryPolicy] = None,
                 verbose: bool = False) -> None:
        """Create a client; see :class:`reward_client.RewardClient` for the arguments.

        Raises:
            ValueError: if ``batch_size`` or ``max_in_flight`` is < 1.
        """
        self.settings = ClientSettings(url=url, model=model, ids_model=ids_model,
                                       batch_size=batch_size, max_in_flight=max_in_flight,
                                       timeout_s=timeout_s, retry=retry or RetryPolicy())
        self._client = aioclient.InferenceServerClient(url=url, verbose=verbose)
        self._attributes = AttributeNames()
        self._sleep = asyncio.sleep

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection."""
        await self._client.close()

    async def is_ready(self) -> bool:
        """Return whether the server and the ``reward`` model are ready (never raises)."""
        try:
            return bool(await self._client.is_server_ready()
                        and await self._client.is_model_ready(self.settings.model))
        except InferenceServerException:
            return False

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
        """Return ``{"live", "ready", "model_ready"}`` flags of the server (never raises)."""
        status = {"live": False, "ready": False, "model_ready": False}
        probes = (("live", self._client.is_server_live), ("ready", self._client.is_server_ready),
                  ("model_ready", lambda: self._client.is_model_ready(self.settings.model)))
        for key, probe in probes:
            try:
                status[key] = bool(await probe())
            except InferenceServerException:
                pass
        return status

    async def attribute_names(self) -> Tuple[str, ...]:
        """Return the model's attribute names (``reward_i`` defaults when unnamed).

        Raises:
            RewardUnavailableError: if the server cannot be reached.
            RewardServerError: for other server failures.
        """
        try:
            await self._load_attribute_names()
            metadata = await self._client.get_model_metadata(self.settings.model)
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

        Raises:
            RewardInvalidInputError: a conversation was malformed or rejected; ``.index`` is
                its position in ``conversations``.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        if isinstance(conversations, AsyncIterable):
            encoded: Any = _aencoded(conversations)
        else:
            encoded = encoded_conversations(conversations)
        chunks = achunked(encoded, self.settings.batch_size)
        async for result in self._run(chunks, self.settings.model, wire.messages_inputs):
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
        chunks = chunked(checked_id_rows(token_id_lists), self.settings.batch_size)
        async for result in self._run(chunks, self.settings.ids_model, wire.ids_inputs):
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

    async def rank(self, prompt: Prompt, responses: Sequence[str]) -> List[RankedResponse]:
        """Rank responses to one prompt, best first (best-of-n); ties keep input order.

        Raises:
            RewardInvalidInputError: a response was rejected; ``.index`` is its position.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        results = await self.score([with_response(prompt, response) for response in responses])
        ranked = [RankedResponse(r.index, responses[r.index], r) for r in results]
        return sorted(ranked, key=lambda item: (-item.score, item.index))

    async def _run(self, chunks: Any, model: str, make_inputs: Any
                   ) -> AsyncIterator[ScoreResult]:
        async def request(chunk: Tuple[int, list]) -> List[ScoreResult]:
            offset, items = chunk
            inputs = make_inputs(items)
            return await acall_with_retries(lambda: self._infer(model, inputs, offset),
                                            self.settings.retry, self._sleep, self.settings.rng)

        async for results in aordered_map(request, chunks, self.settings.max_in_flight):
            for result in results:
                yield result

    async def _infer(self, model: str, inputs: list, offset: int) -> List[ScoreResult]:
        try:
            response = await self._client.infer(model, inputs, outputs=wire.requested_outputs(),
                                                client_timeout=self.settings.timeout_s)
        except InferenceServerException as exc:
            raise wire.map_error(exc, offset) from exc
        await self._load_attribute_names()
        return wire.parse_results(response.as_numpy, offset, self._attributes.names)

    async def _load_attribute_names(self) -> None:
        if self._attributes.known:
            return
        try:
            response = await self._client.get_model_config(wire.POSTPROCESSING_MODEL)
            self._attributes.set_from_config(response.config)
        except InferenceServerException as exc:
            _LOGGER.warning("cannot read attribute names from %r (%s); using reward_i names",
                            wire.POSTPROCESSING_MODEL, exc)
            self._attributes.set_unknown()


async def _aencoded(conversations: AsyncIterable[ConversationLike]) -> AsyncIterator[bytes]:
    index = 0
    async for conversation in conversations:
        yield encode(to_messages(conversation, index))
        index += 1
