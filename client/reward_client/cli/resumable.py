"""A JSONL output file that survives interruption: never corrupt, nothing lost, nothing doubled.

Work in progress goes to ``OUT.partial``; only complete lines are appended, each batch with one
``write`` and a flush. When the run completes, the partial file is fsynced and atomically renamed
to ``OUT``, so ``OUT`` itself only ever holds a finished result. On restart the partial file (or a
finished ``OUT``, when the input has grown since) is scanned: the complete, valid JSON lines are
kept and counted, anything after them (a line cut short by a crash) is truncated away, and the
caller resumes after that many input records.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import IO, List, Optional, Tuple

_LOGGER = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def count_valid_lines(path: str, repair: bool = True) -> int:
    """Return how many leading lines of ``path`` are complete JSON objects.

    Args:
        path: a JSONL file.
        repair: truncate the file after the last such line (a cut-short line, or anything
            after the first invalid one, is dropped so it can be rewritten).

    Raises:
        OSError: if the file cannot be read or truncated.
    """
    return scan_valid_lines(path, repair)[0]


def scan_valid_lines(path: str, repair: bool = True) -> Tuple[int, Optional[dict]]:
    """Like :func:`count_valid_lines`, also returning the last valid record (or None).

    Raises:
        OSError: if the file cannot be read or truncated.
    """
    count = 0
    good_end = 0
    last: Optional[dict] = None
    with open(path, "rb") as handle:
        for line in handle:
            record = _json_object(line) if line.endswith(b"\n") else None
            if record is None:
                break
            count += 1
            good_end += len(line)
            last = record
        size = handle.seek(0, os.SEEK_END)
    if repair and size != good_end:
        _LOGGER.warning("%s: dropping %d bytes after %d complete lines", path,
                        size - good_end, count)
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return count, last


def _json_object(line: bytes) -> Optional[dict]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class ResumableJsonlWriter:
    """Append-only JSONL writer for ``path`` that can resume after any interruption.

    Usage::

        writer = ResumableJsonlWriter("out.jsonl")
        done = writer.open()          # records already written by earlier runs
        writer.append(['{"a": 1}'])   # complete JSON lines, without newlines
        writer.finish()               # all records written: publish out.jsonl atomically
    """

    def __init__(self, path: str, fsync_interval_s: float = 5.0) -> None:
        self.path = path
        self.partial_path = path + PARTIAL_SUFFIX
        self.written = 0
        self.last_record: Optional[dict] = None
        self._fsync_interval_s = fsync_interval_s
        self._last_fsync = time.monotonic()
        self._handle: Optional[IO[str]] = None

    def open(self) -> int:
        """Open for appending and return how many records earlier runs completed.

        ``last_record`` is then the last of those records (None when there are none).

        Raises:
            OSError: if the files cannot be read, moved or opened.
        """
        if not os.path.exists(self.partial_path) and os.path.exists(self.path):
            os.replace(self.path, self.partial_path)  # resume on top of a finished run
        done = 0
        if os.path.exists(self.partial_path):
            done, self.last_record = scan_valid_lines(self.partial_path)
        self._handle = open(self.partial_path, "a", encoding="utf-8", newline="\n")
        self.written = done
        return done

    def append(self, lines: List[str]) -> None:
        """Append complete lines (JSON text without trailing newline) and flush them.

        Raises:
            OSError: if writing fails.
            RuntimeError: if the writer is not open.
        """
        if self._handle is None:
            raise RuntimeError("writer is not open")
        if not lines:
            return
        self._handle.write("".join(line + "\n" for line in lines))
        self._handle.flush()
        self.written += len(lines)
        if time.monotonic() - self._last_fsync >= self._fsync_interval_s:
            os.fsync(self._handle.fileno())
            self._last_fsync = time.monotonic()

    def close(self) -> None:
        """Flush and close, leaving the partial file for a later resume."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def finish(self) -> None:
        """Close and atomically publish the partial file as ``path``.

        Raises:
            OSError: if the rename fails.
        """
        self.close()
        os.replace(self.partial_path, self.path)
