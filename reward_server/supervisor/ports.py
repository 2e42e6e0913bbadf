"""Free TCP ports for servers started by this process (tests, benchmarks, `serve --grpc-port 0`).

Binding port 0, reading the number and closing the socket (the usual idiom) can hand out the same
port twice: once closed, the port is free again, and the next call may get it back. Two servers
then race for one port (seen: tritonserver refused to start, "cannot listen to GRPC requests and
metrics requests at the same address and port"). Here:

- every socket of one `free_ports` call stays bound until all its ports are chosen, so they differ;
- the process remembers every port it handed out and never hands one out again;
- ports are drawn at random below the kernel's ephemeral range (ip_local_port_range), so that
  neither `bind(0)` elsewhere nor the source port of an outgoing connection (every client in a test
  run makes many) takes a port between the moment it is chosen and the moment its server binds it.

Another process choosing at the same moment can still draw the same port (1 in ~20,000 per port);
a port already in use is never chosen, since each candidate is bound first.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000            # above the well-known and registered ports services commonly use (8000-8002 included)
_MIN_CANDIDATES = 1000     # fewer ports than this below the ephemeral range: let the kernel choose
_MAX_DRAWS = 500

_lock = threading.Lock()
_handed_out: set[int] = set()
_random = random.Random()  # seeded from the OS: two processes draw different sequences


def _candidate_range() -> range:
    """The ports to draw from: [10000, start of the ephemeral range), or empty to use bind(0)."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return range(_LOWEST, low) if low - _LOWEST >= _MIN_CANDIDATES else range(0)


def _bind(host: str, port: int) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports, each free on `host` when chosen and never handed out before by this
    process (thread-safe).

    Args:
        n: how many ports.
        host: the address the servers will listen on ("0.0.0.0" and "::" check every address).

    Raises:
        OSError: `n` free ports could not be found.
    """
    candidates = _candidate_range()
    held: list[socket.socket] = []
    chosen: list[int] = []
    with _lock:
        try:
            for _ in range(_MAX_DRAWS + n):
                if len(chosen) == n:
                    break
                port = _random.choice(candidates) if candidates else 0
                if port in _handed_out or port in chosen:
                    continue
                sock = _bind(host, port)
                if sock is None:
                    continue
                held.append(sock)  # held, so that bind(0) cannot return it again within this call
                port = sock.getsockname()[1]
                if port not in _handed_out and port not in chosen:
                    chosen.append(port)
        finally:
            for sock in held:
                sock.close()
        if len(chosen) < n:
            raise OSError(f"found only {len(chosen)} of {n} free ports on {host}")
        _handed_out.update(chosen)
    return chosen


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port, as `free_ports(1, host)`.

    Raises:
        OSError: no free port could be found.
    """
    return free_ports(1, host)[0]
