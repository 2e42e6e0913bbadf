"""Graceful drain: finish every accepted request, refuse new ones, then stop tritonserver.

Triton 2.51, on SIGTERM, stops the scheduler of every model at once: a `reward` request that had
passed preprocessing then fails at the engine step with "Server is stopping, scheduler for model
has stopped accepting new inference requests" (measured), so an accepted request is lost. The
launcher therefore drains before it signals tritonserver:

0. it first keeps admitting for a moment (`DrainState.admit_arrived`): until preprocessing's queue
   has been seen empty at least `ADMIT_GRACE_S` after the signal, so that requests already sent
   when the signal came (on the wire, in the gRPC front end, in preprocessing's queue) are
   accepted and answered rather than refused;
1. it creates the `draining` flag file; the preprocessing model, which checks it at the start of
   every execution, answers every new request UNAVAILABLE ("the server is stopping"), which
   clients retry elsewhere or later;
2. it waits until every request that preprocessing accepted has left postprocessing: both models
   append one byte per request to a counter file (`accepted`, `finished`; O_APPEND writes of a
   few bytes are atomic), so in flight = size(accepted) - size(finished);
3. then SIGTERM, with nothing left in flight.

After SIGTERM, tritonserver 2.51 (src/main.cc) stops HTTP, unloads its models (~3 s: it polls once
a second, answering "Server is stopping" and NOT_FOUND "has no available versions" meanwhile), and
only then shuts its gRPC front end down; `grpc::Server::Shutdown()` cancels the calls that had
arrived but that no handler had picked up yet, and their clients get CANCELLED (measured: in 3 of 9
stops under a flood of 32 clients, 1 to 14 calls, all sent 3.0 s after tritonserver's SIGTERM,
none of them accepted). That window is inside Triton; the client SDK retries such a CANCELLED.
Accepted requests are not exposed to it: their responses were sent during the seconds of model
unloading, and `Shutdown()` waits for every call a handler holds.

A request that failed at the engine step (rejected by a full queue or its queue timeout, or an
engine error) never reaches postprocessing and stays counted. So waiting also ends once the count
has not moved for a settle time while Triton reports nothing queued at the engine and
postprocessing (from the metrics endpoint): settle = max(5 s, 3 x the engine's mean execution
time; none before the first execution finished). And it always ends at the exit timeout.

The directory is a model parameter (`drain_dir`); empty (a stock tritonserver on the checked-in
configs) disables all of it.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Callable

DRAINING, ACCEPTED, FINISHED = "draining", "accepted", "finished"
MIN_SETTLE_S = 5.0
# Long enough for a request written just before the signal to reach preprocessing's queue through
# the gRPC front end on a loaded machine; short, because every stop waits it.
ADMIT_GRACE_S = 0.25
ADMIT_TIMEOUT_S = 2.0
ADMITTING_MODEL = "preprocessing"  # where every entry point's requests are admitted
_PENDING = re.compile(r'^nv_inference_pending_request_count\{model="([^"]+)"[^}]*\} (\S+)$', re.M)
STOPPING_MESSAGE = "the server is stopping and takes no new requests; retry (another replica)"


class DrainState:
    """The flag and counters in one directory, shared by the launcher and the model stubs."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def draining(self) -> bool:
        """Whether new requests must be refused."""
        return (self.directory / DRAINING).exists()

    def _count(self, name: str, n: int) -> None:
        if n > 0:
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"." * n)
            finally:
                os.close(fd)

    def accepted(self, n: int) -> None:
        """Preprocessing passed `n` requests on to the engine."""
        self._count(ACCEPTED, n)

    def finished(self, n: int) -> None:
        """Postprocessing answered `n` requests."""
        self._count(FINISHED, n)

    def in_flight(self) -> int:
        """Requests accepted and not yet finished."""
        sizes = []
        for name in (ACCEPTED, FINISHED):
            try:
                sizes.append((self.directory / name).stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return sizes[0] - sizes[1]

    def reset(self) -> None:
        """Forget everything (a new server process: what the old one had in flight is gone)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in (DRAINING, ACCEPTED, FINISHED):
            (self.directory / name).unlink(missing_ok=True)

    def admit_arrived(self, metrics_url: str, grace_s: float = ADMIT_GRACE_S, timeout_s: float = ADMIT_TIMEOUT_S,
                      poll_s: float = 0.05) -> bool:
        """Call before `drain`: keep admitting until every request that reached the server before
        this call has been taken up by preprocessing, so that it is accepted and answered.

        Waits `grace_s` (requests still on their way through the gRPC front end), then until
        Triton's metrics show no request pending at preprocessing, then `poll_s` more (a request
        taken from the queue just before that reading passes its admission check first). Requests
        arriving meanwhile are admitted too, and answered.

        Returns:
            True once preprocessing's queue was seen empty; False at `timeout_s`, or when the
            metrics cannot be read (then after the grace only).
        """
        deadline = time.monotonic() + timeout_s
        time.sleep(grace_s)
        while True:
            pending = _pending_counts(metrics_url)
            if pending is None:
                return False
            if pending.get(ADMITTING_MODEL, 0.0) == 0:
                time.sleep(poll_s)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def drain(self, timeout_s: float, settle: Callable[[], float | None] | None = None,
              poll_s: float = 0.05) -> int:
        """Refuse new requests and wait until none is in flight, or the count stopped moving for
        `settle()` seconds (None: something is still queued), or `timeout_s` passed. Returns the
        count left (0 when drained)."""
        (self.directory / DRAINING).touch()
        deadline = time.monotonic() + timeout_s
        last, since = self.in_flight(), time.monotonic()
        while last > 0 and time.monotonic() < deadline:
            time.sleep(poll_s)
            now = self.in_flight()
            if now != last:
                last, since = now, time.monotonic()
                continue
            if settle is not None and time.monotonic() - since >= 0.5:
                needed = settle()
                if needed is not None and time.monotonic() - since >= needed:
                    break
        return max(0, last)


def read_metrics(metrics_url: str) -> str | None:
    """The text of Triton's Prometheus endpoint, or None when it cannot be read."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as reply:
            return reply.read().decode()
    except OSError:
        return None


def _pending_counts(metrics_url: str) -> dict[str, float] | None:
    """{model: requests waiting in its queue} from Triton's metrics, or None when unreadable."""
    text = read_metrics(metrics_url)
    return None if text is None else {model: float(value) for model, value in _PENDING.findall(text)}


def settle_time_from_metrics(metrics_url: str, engine_model: str) -> Callable[[], float | None]:
    """A `settle` callback for `DrainState.drain` reading Triton's Prometheus endpoint: None while a
    request waits in any queue or no execution finished yet, else max(5 s, 3 x the engine's mean
    execution time)."""
    engine = re.compile(r'^nv_inference_(exec_count|compute_infer_duration_us)\{model="%s"[^}]*\} (\S+)$'
                        % re.escape(engine_model), re.M)

    def settle() -> float | None:
        text = read_metrics(metrics_url)
        if text is None:
            return None
        if any(float(value) > 0 for _, value in _PENDING.findall(text)):
            return None
        values = {name: float(value) for name, value in engine.findall(text)}
        if not values.get("exec_count"):
            return None  # no execution finished yet: no idea how long one takes (the first is slow)
        return max(MIN_SETTLE_S, 3 * values.get("compute_infer_duration_us", 0.0) / 1e6 / values["exec_count"])

    return settle
