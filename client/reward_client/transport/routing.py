"""Prompt-affine routing over replicas: conversations that start alike go to the same replica.

Each conversation's *group key* is its opening: its messages up to and including the first user
message (system prompt and task), never the last one (the response being scored). All responses to
one prompt (a GRPO group, a best-of-n candidate set) share it, and so do a conversation's later
turns and a solution's later steps, so the replica that scored the start holds its keys in its
prefix cache when the continuation comes. Rendezvous hashing (highest random weight) ranks the replicas for each key:
the owner is the first healthy replica of that ranking. So all responses to one prompt (a GRPO
group, a best-of-n candidate set) are scored by one replica, which computes the shared prompt
once; adding or removing a replica moves only the keys it owned; and when the owner dies, each
key falls to its own next replica, spreading the dead replica's load over the others.

Input is cut into windows of a few requests per replica; within a window, each replica's
conversations are cut into requests of at most ``batch_size`` without splitting a run of
consecutive conversations sharing a prompt (unless the run alone exceeds ``batch_size``), so a
group also lands in one request and therefore one engine batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, Iterator, List, Sequence, Tuple, TypeVar

P = TypeVar("P")

# Token-id input carries no message structure: its group key is this many leading ids, which
# covers a prompt's distinguishing start in practice (chat header plus the first user words).
IDS_KEY_TOKENS = 128
# Templated text likewise: this many leading bytes (a chat header and the prompt's start).
TEXT_KEY_BYTES = 512


@dataclass(frozen=True)
class Keyed(Generic[P]):
    """One conversation on its way: input position, group key and wire payload."""

    index: int
    key: bytes
    payload: P


@dataclass
class RoutedChunk(Generic[P]):
    """One request's worth of conversations for one replica.

    Attributes:
        address: the replica (``host:port``).
        items: the conversations, in input order.
    """

    address: str
    items: List[Keyed[P]] = field(default_factory=list)

    @property
    def indices(self) -> List[int]:
        """Input positions of the items, in order."""
        return [item.index for item in self.items]

    @property
    def payloads(self) -> List[P]:
        """Wire payloads of the items, in order."""
        return [item.payload for item in self.items]


def _weight(address: str, key: bytes) -> int:
    digest = hashlib.blake2b(key, digest_size=8, key=address.encode()[:64]).digest()
    return int.from_bytes(digest, "big")


def ranking(key: bytes, addresses: Sequence[str]) -> List[str]:
    """Return ``addresses`` ordered by preference for ``key`` (rendezvous hashing).

    The order of ``addresses`` does not matter; ties (astronomically unlikely) break by address.
    """
    return sorted(addresses, key=lambda address: (-_weight(address, key), address))


def owner(key: bytes, addresses: Sequence[str], healthy: Callable[[str], bool]) -> str:
    """Return the first healthy replica of ``key``'s ranking (the first of all when none is).

    Raises:
        ValueError: if ``addresses`` is empty.
    """
    if not addresses:
        raise ValueError("no replica to route to")
    ranked = ranking(key, addresses)
    return next((address for address in ranked if healthy(address)), ranked[0])


def plan(items: Sequence[Keyed[P]], addresses: Sequence[str], healthy: Callable[[str], bool],
         batch_size: int) -> List[RoutedChunk[P]]:
    """Route one window of conversations: requests of at most ``batch_size`` per owner.

    Args:
        items: conversations in input order.
        addresses: the current replicas.
        healthy: whether a replica may be sent work now.
        batch_size: most conversations per request.

    Returns:
        Chunks, grouped by replica in order of first appearance, each in input order.

    Raises:
        ValueError: if ``addresses`` is empty or ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    owners: dict = {}
    per_replica: dict = {}
    for item in items:
        if item.key not in owners:
            owners[item.key] = owner(item.key, addresses, healthy)
        per_replica.setdefault(owners[item.key], []).append(item)
    chunks: List[RoutedChunk[P]] = []
    for address, routed in per_replica.items():
        for run in _cut(routed, batch_size):
            chunks.append(RoutedChunk(address, run))
    return chunks


def _cut(items: List[Keyed[P]], batch_size: int) -> Iterator[List[Keyed[P]]]:
    """Cut into lists of <= batch_size, closing a list early rather than splitting a key's run."""
    runs: List[List[Keyed[P]]] = []
    for item in items:
        if runs and runs[-1][-1].key == item.key and len(runs[-1]) < batch_size:
            runs[-1].append(item)
        else:
            runs.append([item])
    chunk: List[Keyed[P]] = []
    for run in runs:
        if chunk and len(chunk) + len(run) > batch_size:
            yield chunk
            chunk = []
        chunk.extend(run)
    if chunk:
        yield chunk


class WindowCutter(Generic[P]):
    """Cuts a stream into windows of about ``size`` items without splitting a run of consecutive
    items sharing a key, unless the window reaches ``limit``. Feed with :meth:`add`, end with
    :meth:`flush`; shared by the sync and asyncio clients.
    """

    def __init__(self, size: int, limit: int) -> None:
        """Create a cutter.

        Raises:
            ValueError: if ``size`` < 1 or ``limit`` < ``size``.
        """
        if size < 1 or limit < size:
            raise ValueError("window size must be >= 1 and limit >= size")
        self.size, self.limit = size, limit
        self._window: List[Keyed[P]] = []

    def add(self, item: Keyed[P]) -> List[Keyed[P]]:
        """Add an item; return the window it closed (empty when none closed)."""
        window = self._window
        closed: List[Keyed[P]] = []
        if len(window) >= self.size and (item.key != window[-1].key or len(window) >= self.limit):
            closed, self._window = window, []
        self._window.append(item)
        return closed

    def flush(self) -> List[Keyed[P]]:
        """Return the last, partial window (empty when none)."""
        window, self._window = self._window, []
        return window


def windows(items: Iterable[Keyed[P]], size: int, limit: int) -> Iterator[List[Keyed[P]]]:
    """Yield the windows of :class:`WindowCutter` over ``items``.

    Raises:
        ValueError: if ``size`` < 1 or ``limit`` < ``size``.
    """
    cutter: WindowCutter[P] = WindowCutter(size, limit)
    for item in items:
        window = cutter.add(item)
        if window:
            yield window
    window = cutter.flush()
    if window:
        yield window


def reroute(chunk: RoutedChunk[P], addresses: Sequence[str], healthy: Callable[[str], bool],
            batch_size: int) -> List[RoutedChunk[P]]:
    """Re-plan a chunk whose replica failed: each key goes to its next healthy replica.

    Args:
        chunk: the failed chunk (its replica should be marked down already).
        addresses: the current replicas.
        healthy: whether a replica may be sent work now.
        batch_size: most conversations per request.

    Returns:
        The chunk's items as new chunks; no item is lost or repeated.

    Raises:
        ValueError: if no replica other than the failed one exists.
    """
    others = [address for address in addresses if address != chunk.address]
    if not others:
        raise ValueError(f"no replica other than {chunk.address} to fail over to")
    return plan(chunk.items, others, healthy, batch_size)


def opening(messages: Sequence[dict]) -> Sequence[dict]:
    """A conversation's messages up to and including its first user message, the last message
    excluded (a lone message keys by itself)."""
    if len(messages) <= 1:
        return messages
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
    return messages[:min(first_user + 1, len(messages) - 1)]


def prompt_key(encoded_prompt: bytes) -> bytes:
    """Return the group key of a conversation given its encoded opening (`opening`)."""
    return hashlib.blake2b(encoded_prompt, digest_size=16).digest()


def ids_key(ids: Sequence[int]) -> bytes:
    """Return the group key of a token-id conversation: its leading ids, the last one excluded."""
    head = list(ids[:max(1, min(IDS_KEY_TOKENS, len(ids) - 1))])
    return hashlib.blake2b(repr(head).encode(), digest_size=16).digest()


def text_key(text: bytes) -> bytes:
    """Return the group key of a templated text: its leading bytes, the last one excluded."""
    return hashlib.blake2b(text[:max(1, min(TEXT_KEY_BYTES, len(text) - 1))], digest_size=16).digest()


class InputOrder:
    """Puts ``(index, value)`` pairs arriving in any order back into index order 0, 1, 2, ...

    Shared by the sync and asyncio clients; memory holds only the values that arrived early.
    """

    def __init__(self) -> None:
        """Start at index 0."""
        self._pending: dict = {}
        self._next = 0

    def add(self, batch: Iterable[Tuple[int, object]]) -> List[object]:
        """Add pairs; return the values now deliverable, in order.

        Raises:
            RuntimeError: if an index arrives twice.
        """
        for index, value in batch:
            if index < self._next or index in self._pending:
                raise RuntimeError(f"result {index} delivered twice")
            self._pending[index] = value
        ready = []
        while self._next in self._pending:
            ready.append(self._pending.pop(self._next))
            self._next += 1
        return ready

    def close(self) -> None:
        """Check that nothing is left waiting for a missing index.

        Raises:
            RuntimeError: if an index never arrived.
        """
        if self._pending:
            raise RuntimeError(f"results missing before index {min(self._pending)}")


def reorder(batches: Iterable[Sequence[Tuple[int, object]]]) -> Iterator[object]:
    """Yield the values of ``(index, value)`` pairs in index order, as soon as each is known.

    Raises:
        RuntimeError: if an index is missing or repeated when the input ends.
    """
    order = InputOrder()
    for batch in batches:
        yield from order.add(batch)
    order.close()
