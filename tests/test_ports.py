"""Free ports: never the same one twice in a process, never one in use (reward_server/supervisor/ports.py)."""

from __future__ import annotations

import socket
import threading

import pytest

from reward_server.supervisor import ports
from reward_server.supervisor.ports import free_port, free_ports


def test_many_calls_never_repeat_a_port_and_each_is_free():
    chosen = [free_port() for _ in range(200)] + [p for _ in range(20) for p in free_ports(5)]
    assert len(set(chosen)) == len(chosen) == 300
    candidates = ports._candidate_range()
    if candidates:  # below the ephemeral range, where neither bind(0) nor outgoing connections land
        assert all(p in candidates for p in chosen)
    for port in chosen[-10:]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if the port was not free


def test_concurrent_callers_never_share_a_port():
    results: list[list[int]] = []
    barrier = threading.Barrier(8)

    def take():
        barrier.wait()
        results.append([p for _ in range(10) for p in free_ports(3)])

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [p for result in results for p in result]
    assert len(flat) == 8 * 10 * 3 and len(set(flat)) == len(flat)


def _bindable_run(length: int) -> int:
    """The first port of `length` consecutive ports, all free now and never handed out."""
    for start in range(ports._candidate_range().start or 20000, 65000, 97):
        run = range(start, start + length)
        if any(p in ports._handed_out for p in run):
            continue
        socks = [ports._bind("127.0.0.1", p) for p in run]
        for sock in socks:
            if sock is not None:
                sock.close()
        if all(socks):
            return start
    pytest.skip("no run of free ports found")


def test_a_port_in_use_or_handed_out_is_never_chosen_again(monkeypatch):
    start = _bindable_run(3)
    monkeypatch.setattr(ports, "_candidate_range", lambda: range(start, start + 3))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", start + 1))
        listener.listen()
        assert sorted(free_ports(2)) == [start, start + 2]  # the port in use is skipped
        with pytest.raises(OSError, match="only 0 of 1"):
            free_port()  # the other two were handed out already: never again
