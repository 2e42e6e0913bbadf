"""Scoring over several replicas: one gRPC client per replica, group-affine chunks, failover.

:class:`ReplicaPool` keeps a tritonclient per replica address (sync or asyncio flavour, made by
the factory it is given) over an :class:`~reward_client.transport.endpoints.EndpointSet` and a
:class:`~reward_client.transport.endpoints.ReplicaHealth`. The functions here are what both
clients share: planning the routed chunks of an input, and turning a replica's answer or error
into results numbered in the caller's input, or into a failover.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, AsyncIterable, AsyncIterator, Callable, Dict, Iterable, Iterator, List, Tuple

from tritonclient.utils import InferenceServerException

from reward_client.errors import (RewardClientError, RewardInvalidInputError, RewardServerError,
                                  RewardUnavailableError)
from reward_client.results import ScoreResult
from reward_client.transport import routing, wire
from reward_client.transport.endpoints import EndpointSet, ReplicaHealth

_LOGGER = logging.getLogger(__name__)


class ReplicaDown(Exception):
    """Internal: a replica failed at the connection level; the chunk must move to another.

    Not a :class:`RewardClientError`, so retry loops let it through at once.

    Attributes:
        error: the public error to raise if no replica is left.
    """

    def __init__(self, error: RewardClientError) -> None:
        super().__init__(str(error))
        self.error = error


class ReplicaPool:
    """Replica addresses, their health, and one client per address. Thread-safe."""

    def __init__(self, endpoints: EndpointSet, make_client: Callable[[str], Any],
                 health: ReplicaHealth | None = None) -> None:
        """Create the pool; clients are made on first use of each address.

        Args:
            endpoints: where the replicas are.
            make_client: ``address -> tritonclient client`` (grpc or grpc.aio).
            health: the health record (a fresh one by default).
        """
        self.endpoints = endpoints
        self.health = health or ReplicaHealth()
        self._make_client = make_client
        self._clients: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def addresses(self) -> List[str]:
        """Return the current replica addresses.

        Raises:
            RewardUnavailableError: if no address is known (a DNS name that never resolved).
        """
        try:
            return self.endpoints.addresses()
        except OSError as exc:
            raise RewardUnavailableError(str(exc)) from exc

    def client(self, address: str) -> Any:
        """Return the client of ``address``, made on first use."""
        with self._lock:
            if address not in self._clients:
                self._clients[address] = self._make_client(address)
            return self._clients[address]

    def clients(self) -> List[Tuple[str, Any]]:
        """Return ``(address, client)`` for every current replica, healthy ones first.

        Raises:
            RewardUnavailableError: if no address is known.
        """
        addresses = self.addresses()
        ordered = self.health.healthy(addresses) + [a for a in addresses if not self.health.is_healthy(a)]
        return [(address, self.client(address)) for address in ordered]

    def take_clients(self) -> List[Any]:
        """Forget every client and return them, for the caller to close."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        return clients


def planned_chunks(pool: ReplicaPool, keyed: Iterable[routing.Keyed], batch_size: int
                   ) -> Iterator[routing.RoutedChunk]:
    """Route ``keyed`` conversations window by window, each window on the replicas known then.

    A window holds about ``batch_size`` conversations per replica, so every replica gets work
    from each window while results stay close to input order.

    Raises:
        RewardUnavailableError: if no replica address is known.
    """
    size = batch_size * len(pool.addresses())
    for window in routing.windows(keyed, size, size + batch_size):
        yield from routing.plan(window, pool.addresses(), pool.health.is_healthy, batch_size)


async def aplanned_chunks(pool: ReplicaPool, keyed: AsyncIterable[routing.Keyed], batch_size: int
                          ) -> AsyncIterator[routing.RoutedChunk]:
    """Asyncio twin of :func:`planned_chunks` for an async iterable.

    Raises:
        RewardUnavailableError: if no replica address is known.
    """
    size = batch_size * len(pool.addresses())
    cutter: routing.WindowCutter = routing.WindowCutter(size, size + batch_size)
    async for item in keyed:
        window = cutter.add(item)
        for chunk in routing.plan(window, pool.addresses(), pool.health.is_healthy, batch_size) if window else []:
            yield chunk
    window = cutter.flush()
    for chunk in routing.plan(window, pool.addresses(), pool.health.is_healthy, batch_size) if window else []:
        yield chunk


def chunk_error(exc: InferenceServerException, chunk: routing.RoutedChunk) -> Exception:
    """Map a replica's error for ``chunk`` to what the caller sees, or to :class:`ReplicaDown`.

    An invalid conversation is named by its position in the caller's input.
    """
    error = wire.map_error(exc)
    if isinstance(error, RewardInvalidInputError) and error.index is not None \
            and 0 <= error.index < len(chunk.items):
        error = RewardInvalidInputError(error.reason, chunk.items[error.index].index)
    if wire.is_replica_failure(exc):
        return ReplicaDown(error)
    return error


def chunk_results(as_numpy: Callable[[str], Any], chunk: routing.RoutedChunk,
                  attribute_names: Callable[[int], Tuple[str, ...]]) -> List[ScoreResult]:
    """Parse a replica's response for ``chunk``, numbering results by input position.

    Raises:
        RewardServerError: if the response is malformed or its size differs from the chunk's.
    """
    results = wire.parse_results(as_numpy, 0, attribute_names)
    if len(results) != len(chunk.items):
        raise RewardServerError(f"{chunk.address} returned {len(results)} results for "
                                     f"{len(chunk.items)} conversations")
    return [dataclasses.replace(result, index=chunk.items[result.index].index) for result in results]


def failover(pool: ReplicaPool, chunk: routing.RoutedChunk, down: ReplicaDown, batch_size: int,
             failovers: int) -> List[routing.RoutedChunk]:
    """Mark ``chunk``'s replica down and re-plan the chunk on the others.

    Args:
        pool: the replicas.
        chunk: the chunk whose replica failed.
        down: the failure.
        batch_size: most conversations per request.
        failovers: how many failovers this chunk has had, this one included.

    Returns:
        The chunk's conversations as chunks for other replicas (none lost, none repeated).

    Raises:
        RewardClientError: the failure's public error, when no other healthy replica is left or
            the chunk has failed over more often than there are replicas (all of them failing).
    """
    pool.health.mark_down(chunk.address, down.error)
    addresses = pool.addresses()
    others = pool.health.healthy([address for address in addresses if address != chunk.address])
    if not others or failovers > 2 * len(addresses):
        raise down.error
    moved = routing.reroute(chunk, addresses, pool.health.is_healthy, batch_size)
    _LOGGER.info("moved %d conversations from %s to %s", len(chunk.items), chunk.address,
                 ", ".join(sorted({c.address for c in moved})))
    return moved
