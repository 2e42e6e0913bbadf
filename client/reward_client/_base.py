"""Settings and pure helpers shared by :class:`RewardClient` and :class:`AsyncRewardClient`."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from reward_client.conversations import ConversationLike, encode, to_messages
from reward_client.errors import RewardInvalidInputError
from reward_client.retry import Attempts, RetryBudget, RetryPolicy
from reward_client.transport import routing, wire

_LOGGER = logging.getLogger(__name__)

DEFAULT_URL = "localhost:8001"


@dataclass
class ClientSettings:
    """Everything a client needs besides its connection.

    Attributes:
        url: gRPC ``host:port`` of the server; with several replicas, their targets joined by commas.
        model: the messages ensemble (``reward``).
        ids_model: the token-id ensemble (``reward_ids``).
        text_model: the templated-text ensemble (``reward_text``).
        batch_size: conversations per request (the server accepts up to its max_batch_size).
        max_in_flight: requests outstanding at once when scoring many conversations.
        timeout_s: deadline of each request attempt in seconds (None: no deadline).
        deadline_s: the most one request may take in seconds, retries and backoff included
            (None: only ``timeout_s`` bounds each attempt). Each attempt is sent with
            ``min(timeout_s, what is left of deadline_s)``, as its gRPC deadline and as Triton's
            ``timeout`` parameter, so that the server drops the work once nobody waits for it.
        retry: policy for retryable failures (overload, server unavailable).
        rng: source of retry jitter (tests inject a seeded one).
    """

    url: str = DEFAULT_URL
    model: str = wire.MESSAGES_MODEL
    ids_model: str = wire.IDS_MODEL
    text_model: str = wire.TEXT_MODEL
    batch_size: int = 64
    max_in_flight: int = 4
    timeout_s: Optional[float] = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rng: Optional[random.Random] = None
    deadline_s: Optional[float] = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError("deadline_s must be > 0 (or None)")

    def attempts(self, budget: RetryBudget, clock: Callable[[], float] = time.monotonic) -> Attempts:
        """Return the attempts of one request starting now, under these settings and ``budget``."""
        return Attempts(self.retry, budget=budget, timeout_s=self.timeout_s, deadline_s=self.deadline_s,
                        clock=clock, rng=self.rng)


class AttributeNames:
    """The model's attribute names, read once from the ``postprocessing`` model config."""

    def __init__(self) -> None:
        self._parameter: Optional[str] = None
        self._lock = threading.Lock()

    @property
    def known(self) -> bool:
        """Whether the parameter has been read already."""
        return self._parameter is not None

    def set_from_config(self, config: Any) -> None:
        """Record the parameter from a ``ModelConfig`` protobuf (empty when absent)."""
        parameter = config.parameters.get(wire.ATTRIBUTE_NAMES_PARAMETER)
        with self._lock:
            self._parameter = parameter.string_value if parameter is not None else ""

    def set_unknown(self) -> None:
        """Fall back to the default names ``reward_i`` (the config could not be read)."""
        with self._lock:
            self._parameter = ""

    def names(self, count: int) -> Tuple[str, ...]:
        """Return ``count`` names (defaults when unknown or mismatched)."""
        return wire.parse_attribute_names(self._parameter or "", count)


def encoded_conversations(conversations: Iterable[ConversationLike]) -> Iterator[bytes]:
    """Normalise and JSON-encode conversations lazily.

    Raises:
        RewardInvalidInputError: naming the first malformed conversation by its input index.
    """
    for index, conversation in enumerate(conversations):
        yield encode(to_messages(conversation, index))


def keyed_conversations(conversations: Iterable[ConversationLike]) -> Iterator[routing.Keyed]:
    """Normalise and encode conversations lazily, each with its group key (its prompt).

    Raises:
        RewardInvalidInputError: naming the first malformed conversation by its input index.
    """
    for index, conversation in enumerate(conversations):
        yield keyed_conversation(conversation, index)


def keyed_conversation(conversation: ConversationLike, index: int) -> routing.Keyed:
    """Normalise and encode one conversation, keyed by its opening (`routing.opening`).

    Raises:
        RewardInvalidInputError: if the conversation is malformed.
    """
    messages = to_messages(conversation, index)
    return routing.Keyed(index, routing.prompt_key(encode(routing.opening(messages))), encode(messages))


def keyed_id_rows(token_id_lists: Iterable[Sequence[int]]) -> Iterator[routing.Keyed]:
    """Check token id lists lazily, each with its group key (its leading ids).

    Raises:
        RewardInvalidInputError: naming the first empty or non-integer list by its input index.
    """
    for index, ids in enumerate(checked_id_rows(token_id_lists)):
        yield routing.Keyed(index, routing.ids_key(ids), ids)


def checked_id_rows(token_id_lists: Iterable[Sequence[int]]) -> Iterator[List[int]]:
    """Yield token id lists as int lists, rejecting empty ones.

    Raises:
        RewardInvalidInputError: naming the first empty or non-integer list by its input index.
    """
    for index, row in enumerate(token_id_lists):
        try:
            ids = [int(token) for token in row]
        except (TypeError, ValueError) as exc:
            raise RewardInvalidInputError(f"token ids must be integers ({exc})", index) from exc
        if not ids:
            raise RewardInvalidInputError("empty token id list", index)
        yield ids


def encoded_texts(texts: Iterable[str]) -> Iterator[bytes]:
    """Check templated texts lazily and encode them as UTF-8.

    Raises:
        RewardInvalidInputError: naming the first text that is not a non-empty string by its index.
    """
    for index, text in enumerate(texts):
        yield encoded_text(text, index)


def encoded_text(text: str, index: int) -> bytes:
    """One templated text as UTF-8 bytes.

    Raises:
        RewardInvalidInputError: if it is not a non-empty string, or is not Unicode text.
    """
    if not isinstance(text, str):
        raise RewardInvalidInputError(f"text must be a string, got {type(text).__name__}", index)
    if not text:
        raise RewardInvalidInputError("empty text", index)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RewardInvalidInputError(f"text is not Unicode text ({exc.reason})", index) from exc


def keyed_texts(texts: Iterable[str]) -> Iterator[routing.Keyed]:
    """Check and encode templated texts lazily, each with its group key (its leading bytes).

    Raises:
        RewardInvalidInputError: naming the first text that is not a non-empty string by its index.
    """
    for index, text in enumerate(encoded_texts(texts)):
        yield routing.Keyed(index, routing.text_key(text), text)
