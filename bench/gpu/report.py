"""The GPU check's report and stage runner.

Every stage runs under its own timeout and within the run's total budget; the report (JSON and
markdown) is rewritten when a stage starts and when it ends, so a run cut short by the machine's
time limit still leaves every finished stage's numbers and shows which stage was running.
A stage receives a dict it fills as it goes: what it measured before failing is kept.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

_LOGGER = logging.getLogger(__name__)

PENDING, RUNNING, PASSED, FAILED, SKIPPED, TIMEOUT, INTERRUPTED = (
    "pending", "running", "passed", "failed", "skipped", "timeout", "interrupted")
JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"


class StageSkipped(Exception):
    """A precondition of the stage is missing (no GPU, no tensorrt_llm, an earlier stage failed)."""


class CheckFailed(Exception):
    """The stage ran and a verified value is wrong (out of tolerance, wrong position, bad exit code)."""


class StageTimeout(BaseException):
    """The stage's own time limit passed (a BaseException, so `except Exception` cannot swallow it)."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived (the wrapper's total time limit): write what we have and stop."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `StageTimeout` in the main thread after `seconds` (SIGALRM; main thread only).

    A call blocked in C code is interrupted when it next returns to Python; child processes
    must be given their own timeouts as well. An alarm that was already set (e.g. by a test
    runner) is put back with its remaining time afterwards.
    """
    def expire(signum, frame):
        raise StageTimeout(f"time limit of {seconds:.0f}s reached")

    outer_delay, _ = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - started), 0.001))


def raise_on_termination() -> Callable[[], None]:
    """Turn SIGTERM and SIGINT into `Interrupted`, so cleanup and the last report write run.

    Returns:
        A function that puts the previous handlers back.
    """
    def interrupt(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(signum, handler) for signum, handler in previous.items()] and None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Report:
    """The run's results, written to OUT/gpu_check.json and OUT/gpu_check.md.

    Args:
        out_dir: directory for the two files (created).
        mode: "gpu" or "smoke".
        stages: planned stage names, in order; each starts as "pending".
        budget_s: total seconds the stages may use.
        settings: the run's options, recorded as given.
    """

    def __init__(self, out_dir: str | Path, mode: str, stages: Sequence[str], budget_s: float, settings: dict):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.budget_s = budget_s
        self._start = time.monotonic()
        self._stage_deadline: float | None = None
        self.data: dict[str, Any] = {
            "schema": 1, "mode": mode, "started": _now(), "finished": None, "elapsed_s": 0.0,
            "budget_s": budget_s, "overall": RUNNING, "machine": {}, "settings": settings,
            "stages": {name: {"status": PENDING, "seconds": None, "timeout_s": None, "reason": None,
                              "results": {}} for name in stages},
            "summary": {}}
        self.write()

    @property
    def json_path(self) -> Path:
        """Path of gpu_check.json."""
        return self.out_dir / JSON_NAME

    @property
    def markdown_path(self) -> Path:
        """Path of gpu_check.md."""
        return self.out_dir / MARKDOWN_NAME

    def remaining(self) -> float:
        """Seconds left of the total budget."""
        return self.budget_s - (time.monotonic() - self._start)

    def stage_left(self) -> float:
        """Seconds left of the running stage's limit (of the total budget outside a stage)."""
        if self._stage_deadline is None:
            return self.remaining()
        return self._stage_deadline - time.monotonic()

    def status(self, name: str) -> str:
        """Current status of a stage."""
        return self.data["stages"][name]["status"]

    def results(self, name: str) -> dict:
        """The results dict of a stage (filled while it runs)."""
        return self.data["stages"][name]["results"]

    def run(self, name: str, func: Callable[[dict], None], timeout_s: float, min_s: float = 0.0) -> bool:
        """Run one stage and record its outcome; True when it passed.

        Args:
            name: a planned stage.
            func: called with the stage's results dict, which it fills; raises `StageSkipped`,
                `CheckFailed` or any exception to end the stage otherwise.
            timeout_s: the stage's own limit; the remaining total budget caps it.
            min_s: below this much remaining budget the stage is skipped rather than started.

        Raises:
            Interrupted: re-raised after recording it, so the caller can clean up and stop.
        """
        stage = self.data["stages"][name]
        limit = min(timeout_s, self.remaining())
        if limit <= 0 or limit < min_s:
            stage.update(status=SKIPPED, reason=f"budget exhausted: {max(self.remaining(), 0):.0f}s left of "
                                                f"{self.budget_s:.0f}s, stage needs at least {min_s:.0f}s")
            self.write()
            return False
        stage.update(status=RUNNING, reason=None, timeout_s=round(limit, 1), started=_now())
        self.write()
        _LOGGER.info("stage %s: started (limit %.0fs)", name, limit)
        start = time.monotonic()
        self._stage_deadline = start + limit
        try:
            with time_limit(limit):
                func(stage["results"])
            stage["status"] = PASSED
        except StageSkipped as err:
            stage.update(status=SKIPPED, reason=str(err))
        except CheckFailed as err:
            stage.update(status=FAILED, reason=str(err))
        except StageTimeout as err:
            stage.update(status=TIMEOUT, reason=str(err))
        except Interrupted as err:
            stage.update(status=INTERRUPTED, reason=str(err))
            raise
        except Exception as err:  # noqa: BLE001 - any error ends this stage only; the next ones still run
            stage.update(status=FAILED, reason=f"{type(err).__name__}: {err}"[:2000])
            stage["results"]["traceback"] = traceback.format_exc()[-4000:]
        finally:
            self._stage_deadline = None
            stage["seconds"] = round(time.monotonic() - start, 2)
            _LOGGER.info("stage %s: %s in %.1fs%s", name, stage["status"], stage["seconds"],
                         f" ({stage['reason']})" if stage["reason"] else "")
            self.write()
        return stage["status"] == PASSED

    def skip(self, name: str, reason: str) -> None:
        """Mark a stage skipped without running it."""
        self.data["stages"][name].update(status=SKIPPED, reason=reason)
        self.write()

    def finish(self) -> str:
        """Set the overall status ("passed" when no stage failed, timed out or was interrupted) and write."""
        bad = [n for n, s in self.data["stages"].items() if s["status"] in (FAILED, TIMEOUT, INTERRUPTED, RUNNING)]
        self.data["overall"] = FAILED if bad else PASSED
        self.data["finished"] = _now()
        self.write()
        return self.data["overall"]

    def write(self) -> None:
        """Rewrite both files, each replaced in one step (a reader never sees half a file)."""
        self.data["elapsed_s"] = round(time.monotonic() - self._start, 2)
        for path, text in ((self.json_path, json.dumps(self.data, indent=2, default=_jsonable) + "\n"),
                           (self.markdown_path, render_markdown(self.data))):
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            os.replace(partial, path)


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, paths: what json cannot write by itself."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _format(value: Any, limit: int = 300) -> str:
    """One line of markdown-safe text (table cells and list items cannot hold newlines or bare pipes)."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=_jsonable)
    else:
        text = str(value)
    text = " / ".join(line.strip() for line in text.splitlines() if line.strip()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_markdown(data: dict) -> str:
    """The report as markdown: machine, one row per stage, then each stage's numbers."""
    lines = [f"# GPU check ({data['mode']})", "",
             f"Overall: **{data['overall']}**. Started {data['started']}, {data['elapsed_s']:.0f}s elapsed of a "
             f"{data['budget_s']:.0f}s budget{'' if data['finished'] else ' (still running or cut short)'}.", "",
             "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_format(value)} |" for key, value in data["machine"].items()]
    lines += ["", "## Stages", "", "| stage | status | seconds | note |", "|---|---|---:|---|"]
    for name, stage in data["stages"].items():
        note = stage["reason"] or stage["results"].get("summary", "")
        seconds = "" if stage["seconds"] is None else f"{stage['seconds']:.1f}"
        lines.append(f"| {name} | {stage['status']} | {seconds} | {_format(note)} |")
    if data["summary"]:
        lines += ["", "## Summary", ""] + [f"- {key}: {_format(value)}" for key, value in data["summary"].items()]
    for name, stage in data["stages"].items():
        results = {k: v for k, v in stage["results"].items() if k not in ("summary", "traceback")}
        if not results and "traceback" not in stage["results"]:
            continue
        lines += ["", f"## {name}", ""] + [f"- {key}: {_format(value)}" for key, value in results.items()]
        if "traceback" in stage["results"]:
            lines += ["", "```", stage["results"]["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"
