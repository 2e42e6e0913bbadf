"""Blocking client: :class:`RewardClient`."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from reward_client._base import (DEFAULT_URL, AttributeNames, ClientSettings,
                                 checked_id_rows, encoded_conversations)
from reward_client.conversations import ConversationLike, with_response
from reward_client.errors import RewardUnavailableError
from reward_client.results import RankedResponse, ScoreResult, bradley_terry
from reward_client.retry import RetryPolicy, call_with_retries
from reward_client.transport import wire
from reward_client.transport.pipeline import chunked, ordered_map

_LOGGER = logging.getLogger(__name__)

Prompt = Union[str, Sequence[Dict[str, str]]]


class RewardClient:
    """Score conversations with a Triton reward server over gRPC (blocking API).

    Large inputs are split into requests of ``batch_size`` conversations, sent with at most
    ``max_in_flight`` outstanding, and returned in input order. Overload errors are retried
    with exponential backoff and jitter; invalid input raises at once, naming the conversation.

    Example::

        with RewardClient("localhost:8001") as client:
            client.wait_until_ready(60)
            results = client.score([("What is 2+2?", "4"), ("What is 2+2?", "5")])
    """

    def __init__(self, url: str = DEFAULT_URL, *, model: str = wire.MESSAGES_MODEL,
                 ids_model: str = wire.IDS_MODEL, batch_size: int = 64, max_in_flight: int = 4,
                 timeout_s: Optional[float] = 60.0, retry: Optional[RetryPolicy] = None,
                 verbose: bool = False) -> None:
        """Create a client; the connection is made lazily by the first call.

        Args:
            url: gRPC ``host:port``.
            model: name of the messages ensemble.
            ids_model: name of the token-id ensemble.
            batch_size: conversations per request.
            max_in_flight: requests outstanding at once.
            timeout_s: deadline of each request attempt (None: none).
            retry: retry policy for overload/unavailability (default :class:`RetryPolicy`).
            verbose: log every gRPC call (tritonclient's verbose mode).

        Raises:
            ValueError: if ``batch_size`` or ``max_in_flight`` is < 1.
        """
        self.settings = ClientSettings(url=url, model=model, ids_model=ids_model,
                                       batch_size=batch_size, max_in_flight=max_in_flight,
                                       timeout_s=timeout_s, retry=retry or RetryPolicy())
        self._client = grpcclient.InferenceServerClient(url=url, verbose=verbose)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._attributes = AttributeNames()
        self._sleep = time.sleep

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the worker threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._client.close()

    # -- health ------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Return whether the server and the ``reward`` model are ready (never raises)."""
        try:
            return bool(self._client.is_server_ready()
                        and self._client.is_model_ready(self.settings.model))
        except InferenceServerException:
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
            self._sleep(poll_s)

    def health(self) -> Dict[str, bool]:
        """Return ``{"live", "ready", "model_ready"}`` flags of the server (never raises)."""
        status = {"live": False, "ready": False, "model_ready": False}
        for key, probe in (("live", self._client.is_server_live),
                           ("ready", self._client.is_server_ready),
                           ("model_ready", lambda: self._client.is_model_ready(self.settings.model))):
            try:
                status[key] = bool(probe())
            except InferenceServerException:
                pass
        return status

    def models(self) -> List[Dict[str, Any]]:
        """Return each model's name, version, state and, when ready, inputs and outputs.

        Uses the repository index when the server allows it, otherwise the reward
        repository's known models (the index API is often restricted to admins).

        Raises:
            RewardUnavailableError: if the server cannot be reached.
            RewardServerError: for other server failures.
        """
        try:
            index = self._client.get_model_repository_index(as_json=True).get("models", [])
        except InferenceServerException as exc:
            _LOGGER.info("repository index unavailable (%s); listing known models", exc)
            index = [{"name": name} for name in wire.KNOWN_MODELS]
        try:
            for entry in index:
                if "state" not in entry:
                    entry["state"] = ("READY" if self._client.is_model_ready(entry["name"])
                                      else "UNAVAILABLE")
                if entry["state"] == "READY":
                    meta = self._client.get_model_metadata(entry["name"], as_json=True)
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
        try:
            self._load_attribute_names()
            metadata = self._client.get_model_metadata(self.settings.model)
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

        Raises:
            RewardInvalidInputError: a conversation was malformed or rejected; ``.index`` is
                its position in ``conversations``.
            RewardUnavailableError: the server stayed unavailable/overloaded through all retries.
            RewardTimeoutError: a request passed its deadline.
            RewardServerError: any other server failure.
        """
        chunks = chunked(encoded_conversations(conversations), self.settings.batch_size)
        yield from self._run(chunks, self.settings.model, wire.messages_inputs)

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
        chunks = chunked(checked_id_rows(token_id_lists), self.settings.batch_size)
        yield from self._run(chunks, self.settings.ids_model, wire.ids_inputs)

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

    def rank(self, prompt: Prompt, responses: Sequence[str]) -> List[RankedResponse]:
        """Rank responses to one prompt, best first (best-of-n); ties keep input order.

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

    def _run(self, chunks: Iterable[Tuple[int, list]], model: str, make_inputs: Any
             ) -> Iterator[ScoreResult]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.settings.max_in_flight,
                                                thread_name_prefix="reward-client")

        def request(chunk: Tuple[int, list]) -> List[ScoreResult]:
            offset, items = chunk
            inputs = make_inputs(items)
            return call_with_retries(lambda: self._infer(model, inputs, offset),
                                     self.settings.retry, self._sleep, self.settings.rng)

        for results in ordered_map(request, chunks, self.settings.max_in_flight, self._executor):
            yield from results

    def _infer(self, model: str, inputs: list, offset: int) -> List[ScoreResult]:
        try:
            response = self._client.infer(model, inputs, outputs=wire.requested_outputs(),
                                          client_timeout=self.settings.timeout_s)
        except InferenceServerException as exc:
            raise wire.map_error(exc, offset) from exc
        self._load_attribute_names()
        return wire.parse_results(response.as_numpy, offset, self._attributes.names)

    def _load_attribute_names(self) -> None:
        if self._attributes.known:
            return
        try:
            config = self._client.get_model_config(wire.POSTPROCESSING_MODEL).config
            self._attributes.set_from_config(config)
        except InferenceServerException as exc:
            _LOGGER.warning("cannot read attribute names from %r (%s); using reward_i names",
                            wire.POSTPROCESSING_MODEL, exc)
            self._attributes.set_unknown()
