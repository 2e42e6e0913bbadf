"""Where the replicas are and which of them are healthy.

A client is given one endpoint (``host:port``, the classic single-server client), several
(a list or a comma-separated string), or a DNS name written ``dns:///name:port`` whose every
address is a replica: a Kubernetes headless Service resolves to the IPs of its ready pods. DNS
names are re-resolved every ``refresh_s`` seconds, so replicas added by the autoscaler are used
and removed ones are dropped.

A replica that fails at the connection level is marked down for a cool-down that doubles with
each consecutive failure (1 s, 2 s, ... capped at 30 s); when it passes, the replica is tried
again, and its first success clears the record.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

_LOGGER = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"
Resolver = Callable[[str, int], List[str]]


def parse_targets(url: Union[str, Sequence[str]]) -> List[str]:
    """Split the client's ``url`` argument into targets.

    Args:
        url: ``host:port``, ``dns:///name:port``, a comma-separated string of those, or a list.

    Returns:
        The targets, stripped, in the given order, duplicates removed.

    Raises:
        ValueError: if no target is given or one lacks a port.
    """
    items = url.split(",") if isinstance(url, str) else list(url)
    targets: List[str] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        _split_host_port(item[len(DNS_SCHEME):] if item.startswith(DNS_SCHEME) else item)
        if item not in targets:
            targets.append(item)
    if not targets:
        raise ValueError("no server endpoint given")
    return targets


def is_scale_out(targets: Sequence[str]) -> bool:
    """Return whether ``targets`` describe several replicas (or a DNS name that may)."""
    return len(targets) > 1 or any(t.startswith(DNS_SCHEME) for t in targets)


def _split_host_port(target: str) -> Tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {target!r} is not host:port")
    return host.strip("[]"), int(port)


def resolve_all(host: str, port: int) -> List[str]:
    """Return every ``address:port`` that ``host`` resolves to (IPv6 in brackets), in order.

    Raises:
        OSError: if the name does not resolve.
    """
    addresses: List[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
        if address not in addresses:
            addresses.append(address)
    return addresses


class EndpointSet:
    """The current replica addresses of a list of targets, DNS names resolved and refreshed.

    Thread-safe. Resolution failures keep the last known addresses of that name.
    """

    def __init__(self, targets: Sequence[str], refresh_s: float = 30.0,
                 resolver: Resolver = resolve_all, clock: Callable[[], float] = time.monotonic) -> None:
        """Create the set; nothing is resolved until :meth:`addresses` is first called.

        Args:
            targets: from :func:`parse_targets`.
            refresh_s: how long resolved DNS names are trusted.
            resolver: ``(host, port) -> ["addr:port", ...]`` (tests inject one).
            clock: monotonic clock (tests inject one).
        """
        self.targets = list(targets)
        self.refresh_s = refresh_s
        self._resolver = resolver
        self._clock = clock
        self._resolved: Dict[str, List[str]] = {}
        self._resolved_at: Optional[float] = None
        self._lock = threading.Lock()

    def addresses(self) -> List[str]:
        """Return the replica addresses now, re-resolving DNS names when stale.

        Raises:
            OSError: if a DNS name never resolved and no address is known at all.
        """
        with self._lock:
            now = self._clock()
            if self._resolved_at is None or now - self._resolved_at >= self.refresh_s:
                self._refresh()
                self._resolved_at = now
            result: List[str] = []
            for target in self.targets:
                for address in self._resolved.get(target, []):
                    if address not in result:
                        result.append(address)
        if not result:
            raise OSError(f"no replica address for {', '.join(self.targets)}")
        return result

    def _refresh(self) -> None:
        for target in self.targets:
            if not target.startswith(DNS_SCHEME):
                self._resolved[target] = [target]
                continue
            host, port = _split_host_port(target[len(DNS_SCHEME):])
            try:
                addresses = self._resolver(host, port)
            except OSError as exc:
                _LOGGER.warning("cannot resolve %s (%s); keeping %d known addresses", target, exc,
                                len(self._resolved.get(target, [])))
                continue
            if addresses != self._resolved.get(target):
                _LOGGER.info("%s resolves to %d replicas: %s", target, len(addresses), ", ".join(addresses))
            self._resolved[target] = addresses


@dataclass
class _Down:
    until: float
    failures: int


class ReplicaHealth:
    """Which replicas are down, with a doubling cool-down before each is tried again. Thread-safe."""

    def __init__(self, initial_cooldown_s: float = 1.0, max_cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Create an empty record (every replica healthy).

        Args:
            initial_cooldown_s: how long a replica is avoided after its first failure.
            max_cooldown_s: the longest cool-down after repeated failures.
            clock: monotonic clock (tests inject one).
        """
        self.initial_cooldown_s = initial_cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._down: Dict[str, _Down] = {}
        self._lock = threading.Lock()

    def mark_down(self, address: str, reason: object = "") -> None:
        """Record a connection-level failure of ``address``."""
        with self._lock:
            failures = self._down[address].failures + 1 if address in self._down else 1
            cooldown = min(self.max_cooldown_s, self.initial_cooldown_s * 2 ** (failures - 1))
            self._down[address] = _Down(self._clock() + cooldown, failures)
        _LOGGER.warning("replica %s is down (failure %d, retried in %.1fs): %s", address, failures, cooldown, reason)

    def mark_up(self, address: str) -> None:
        """Record a success of ``address``: it is healthy again."""
        with self._lock:
            if self._down.pop(address, None) is not None:
                _LOGGER.info("replica %s is back", address)

    def is_healthy(self, address: str) -> bool:
        """Return whether ``address`` may be sent work now (never failed, or its cool-down passed)."""
        with self._lock:
            down = self._down.get(address)
            return down is None or self._clock() >= down.until

    def healthy(self, addresses: Sequence[str]) -> List[str]:
        """Return the subset of ``addresses`` that may be sent work now, in order."""
        return [address for address in addresses if self.is_healthy(address)]
