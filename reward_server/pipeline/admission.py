"""Admission at the front door: refuse before tokenising what the engine could not start in time.

The engine's queue (`scheduler.EngineScheduler`) bounds the work it holds, but a request reaches it
only after preprocessing has parsed and tokenised it; past capacity, with many clients sending
again at once, that work was spent on requests the engine then refused, and the time requests
spent queued at preprocessing was invisible to the engine's estimate. So each entry point
(`entry.EntryModel`) also counts the work it has sent into its pipeline and not had back, in
estimated tokens (bytes times the tokens-per-byte it learns from the answers' `num_tokens`), and
refuses a new request when that work would take longer than the engine's `max_queue_s` at the
engine's measured rate. The engine publishes both in a small file (`EngineLoad`) beside the
cancel board.

Plain Python, unit-tested without Triton.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOAD_FILE = "engine_load.json"
RATIO_SMOOTHING = 0.2  # weight of the newest answer in the tokens-per-byte estimate
STALE_S = 30.0         # a report older than this is not trusted (the engine restarted, or is stuck)


@dataclass(frozen=True)
class EngineLoad:
    """What the engine publishes for the entry points: its measured rate (tokens/s; None before the
    first row) and its queue limit in seconds, stamped with the time it was written."""

    tokens_per_s: float | None
    max_queue_s: float
    written: float = 0.0

    def publish(self, directory: str | Path) -> None:
        """Write the report atomically (a reader never sees half of it)."""
        path = Path(directory) / LOAD_FILE
        temporary = path.with_name(f".{LOAD_FILE}.{os.getpid()}")
        temporary.write_text(json.dumps({**asdict(self), "written": time.time()}))
        os.replace(temporary, path)

    @classmethod
    def read(cls, directory: str | Path, now: float | None = None) -> "EngineLoad | None":
        """The engine's latest report, or None (none yet, unreadable, or stale)."""
        try:
            data = json.loads((Path(directory) / LOAD_FILE).read_text())
            load = cls(data.get("tokens_per_s"), float(data["max_queue_s"]), float(data.get("written", 0.0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if (time.time() if now is None else now) - load.written > STALE_S:
            return None
        return load


class FrontDoor:
    """An entry point's account of the work it has sent into its pipeline and not yet had back."""

    def __init__(self):
        self.in_flight: dict[str, int] = {}
        self.tokens_per_byte: float | None = None

    def estimate(self, nbytes: int, tokens: int | None = None) -> int | None:
        """A request's tokens: `tokens` when known (token ids), else from its bytes once the ratio
        is learnt, else None."""
        if tokens is not None:
            return tokens
        return None if self.tokens_per_byte is None else int(nbytes * self.tokens_per_byte)

    def refusal(self, tokens: int | None, load: EngineLoad | None) -> str | None:
        """Why a request of `tokens` must be refused now, or None. Nothing is refused before there is a
        rate and an estimate, nor while fewer than two requests are out (one computes, one waits)."""
        if load is None or load.tokens_per_s is None or tokens is None or len(self.in_flight) < 2:
            return None
        ahead = sum(self.in_flight.values())
        wait_s = ahead / load.tokens_per_s
        if wait_s <= load.max_queue_s:
            return None
        return (f"{len(self.in_flight)} requests of about {ahead} tokens are in the pipeline ahead, about "
                f"{wait_s:.1f} s of work at {load.tokens_per_s:.0f} tokens/s, over the limit of {load.max_queue_s:g} s")

    def enter(self, key: str, tokens: int | None) -> None:
        """Count a request sent into the pipeline (an unknown size counts as nothing)."""
        self.in_flight[key] = tokens or 0

    def leave(self, key: str, nbytes: int = 0, tokens: int | None = None) -> None:
        """Forget a request; when it was scored from `nbytes` of text into `tokens`, learn the ratio."""
        self.in_flight.pop(key, None)
        if nbytes > 0 and tokens:
            ratio = tokens / nbytes
            self.tokens_per_byte = ratio if self.tokens_per_byte is None else (
                RATIO_SMOOTHING * ratio + (1 - RATIO_SMOOTHING) * self.tokens_per_byte)


class LoadPublisher:
    """The engine's side: publishes `EngineLoad` into `directory` when the rate changes, at most every
    `every_s` seconds (called at row boundaries; a write costs a file replace)."""

    def __init__(self, directory: str | Path, max_queue_s: float, every_s: float = 0.5):
        self.directory, self.max_queue_s, self.every_s = Path(directory), max_queue_s, every_s
        self._last = 0.0
        self(None, force=True)

    def __call__(self, tokens_per_s: float | None, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            try:
                EngineLoad(tokens_per_s, self.max_queue_s).publish(self.directory)
            except OSError:
                pass  # entry points then admit on the engine's own limit alone
