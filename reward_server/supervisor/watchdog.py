"""Watchdog: restart tritonserver when it, or one of its Python-backend stubs, dies.

Triton 2.51 does not restart a Python-backend stub that died (an out-of-memory kill, a crash in
native code): every request to that model then fails with "Stub process ... is not healthy" while
`/v2/health/ready` and `/v2/health/live` keep answering 200 (issue 10). The launcher started
tritonserver with `--model-control-mode=none`, so the simple, complete recovery is a new
tritonserver process: same command, same ports, same rendered repository.

The watchdog holds a pidfd (Linux 5.3+) for tritonserver and for every stub it started, and
sleeps in poll() on them: a death wakes it at once, without polling /proc. It then kills the
whole process group (so readiness turns false at once: nothing listens on the ports any more,
and requests in flight fail as UNAVAILABLE, which clients retry), removes the dead server's
shared-memory regions, and starts tritonserver again. A restart that fails is retried with
exponential backoff; after `max_failures` failed restarts in a row the watchdog gives up and
says so (`gave_up`), so a supervisor above (systemd, Kubernetes) takes over.

The servers the watchdog starts are children of its thread, and get SIGTERM when that thread
ends (PR_SET_PDEATHSIG, so that a launcher that dies never leaves one behind). So the thread must
not end while a server it started runs: on a deliberate stop it would send that server a second
SIGTERM right after the launcher's own, and tritonserver 2.51 can deadlock on a second SIGTERM (its
handler locks `signal_exit_mu_`, which the main thread holds for a moment after the first one woke
it; the process then never exits). `stop()` ends the watching and restarting, and the thread stays
until `release()`, which the launcher calls once the server is reaped.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from reward_server.supervisor.tritonserver import ServerStartError

_LOGGER = logging.getLogger(__name__)

STUB_BINARY = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    """A Python-backend stub process: its pid and the model it runs."""

    pid: int
    model: str


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    """PIDs of every living descendant of `root` (children, grandchildren under mpirun, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def python_stubs(root: int) -> list[Stub]:
    """The Python-backend stubs below process `root`, with the model each one runs (the stub's
    command line holds `<repository>/<model>/<version>/model.py`)."""
    stubs = []
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                args = [a.decode(errors="replace") for a in cmdline.read().split(b"\0") if a]
        except OSError:
            continue
        if args and Path(args[0]).name == STUB_BINARY:
            model = next((Path(a).parent.parent.name for a in args[1:] if a.endswith("model.py")), "?")
            stubs.append(Stub(pid, model))
    return stubs


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None


class Watchdog:
    """Watches a started `TritonServer` and restarts it when it or one of its stubs dies.

    Attributes:
        restarts: completed restarts.
        last_recovery_s: seconds from the death being seen to the new server being ready, for the
            last restart (None before the first).
        gave_up: set when `max_failures` restarts in a row failed; the server is then down.
    """

    def __init__(self, server, max_failures: int = 5, max_backoff_s: float = 30.0):
        self.server = server
        self.max_failures = max_failures
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self.last_recovery_s: float | None = None
        self.gave_up = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Event()     # the thread no longer watches nor restarts
        self._release = threading.Event()  # the thread may end (see the module's docstring)
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> "Watchdog":
        """Start watching in a daemon thread. It also starts the replacement servers, so their
        lifetime is tied to it (PR_SET_PDEATHSIG): it runs until `release()`."""
        self._thread = threading.Thread(target=self._run, name="tritonserver-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching and restarting (before the server is stopped on purpose); returns once the
        thread has done so, leaving `server.process` as it is. The thread itself stays until
        `release()`: a server it started must not get SIGTERM from its end."""
        self._stopping.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._idle.wait()

    def release(self) -> None:
        """Let the thread end; call once the server it may have started has exited (reaped)."""
        self.stop()
        self._release.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _watched(self) -> dict[int, str]:
        """{pidfd: what dies if it fires} for the server process and every stub under it."""
        fds = {}
        process = self.server.process
        fd = _pidfd(process.pid)
        if fd is not None:
            fds[fd] = "tritonserver"
        for stub in python_stubs(process.pid):
            fd = _pidfd(stub.pid)
            if fd is not None:
                fds[fd] = f"the Python-backend stub of model {stub.model!r} (pid {stub.pid})"
        _LOGGER.info("watchdog: watching tritonserver (pid %d) and %d Python-backend stubs", process.pid,
                     len(fds) - 1)
        return fds

    def _wait_for_death(self, fds: dict[int, str]) -> str | None:
        """Block until a watched process dies (its description) or `stop()` (None)."""
        poller = select.poll()
        for fd in [*fds, self._wake_r]:
            poller.register(fd, select.POLLIN)
        while True:
            events = poller.poll()
            if self._stopping.is_set() or self.server.stopping:
                return None
            dead = [fds[fd] for fd, _ in events if fd in fds]
            if dead:
                return dead[0]
            if self.server.process.poll() is not None:  # belt and braces; pidfd already covers it
                return "tritonserver"

    def _run(self) -> None:
        fds = {}
        try:
            fds = self._watched()
            while not self._stopping.is_set():
                what = self._wait_for_death(fds)
                if what is None:
                    return
                seen = time.monotonic()
                for fd in fds:
                    os.close(fd)
                fds = {}
                if not self._recover(what):
                    return
                self.last_recovery_s = time.monotonic() - seen
                self.restarts += 1
                _LOGGER.warning("watchdog: service restored in %.1fs (restart %d)", self.last_recovery_s,
                                self.restarts)
                fds = self._watched()
        finally:
            for fd in fds:
                os.close(fd)
            self._idle.set()
            self._release.wait()  # until the server this thread may have started is gone

    def _recover(self, what: str) -> bool:
        """Restart the server until it is ready (True), the watchdog stops or gives up (False)."""
        code = self.server.process.poll()
        status = f"exited with code {code}" if code is not None and what == "tritonserver" else "died"
        _LOGGER.error("watchdog: %s %s; restarting tritonserver", what, status)
        backoff = 1.0
        for attempt in range(1, self.max_failures + 1):
            if self._stopping.is_set() or self.server.stopping:
                return False
            try:
                self.server.restart()
                return True
            except (ServerStartError, OSError) as err:
                if self._stopping.is_set() or self.server.stopping:
                    return False
                _LOGGER.error("watchdog: restart %d/%d failed: %s", attempt, self.max_failures, err)
            if self._stopping.wait(backoff):
                return False
            backoff = min(self.max_backoff_s, backoff * 2)
        _LOGGER.critical("watchdog: giving up after %d failed restarts", self.max_failures)
        self.gave_up.set()
        return False
