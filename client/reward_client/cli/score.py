"""``reward-client score IN.jsonl -o OUT.jsonl``: score a file of conversations, resumably."""

from __future__ import annotations

import argparse
import json
import logging
from collections import deque
from typing import Any, Deque, Iterator, List, Optional, Tuple

from reward_client.cli.common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE,
                                      make_client, output_record, progress_bar, record_messages,
                                      say, warn)
from reward_client.cli.resumable import ResumableJsonlWriter
from reward_client.errors import RewardClientError, RewardInvalidInputError

_LOGGER = logging.getLogger(__name__)


def add_parser(subparsers: Any, parents: List[argparse.ArgumentParser]) -> None:
    """Register the ``score`` subcommand."""
    parser = subparsers.add_parser(
        "score", parents=parents, help="score a JSONL file of conversations",
        description="Score each line of IN (a messages list, {messages: [...]} or "
                    "{prompt, response}) and write it to OUT with the result added. "
                    "Re-running after an interruption resumes where it stopped.")
    parser.add_argument("input", help="input JSONL file")
    parser.add_argument("-o", "--output", required=True, help="output JSONL file")
    parser.add_argument("--result-key", default="reward",
                        help="field that receives the result (default %(default)s)")
    parser.add_argument("--max-lines", type=int, default=None,
                        help="score at most this many new lines in this run, then stop "
                             "(the rest is done by a later run)")
    parser.set_defaults(handler=run)


def _records(path: str, skip: int) -> Iterator[Tuple[int, Any]]:
    """Yield ``(line_number, record)`` for non-blank lines after the first ``skip`` records."""
    seen = 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            seen += 1
            if seen <= skip:
                continue
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                raise RewardInvalidInputError(f"line {number}: not JSON ({exc})") from exc


def _count_records(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def run(args: argparse.Namespace) -> int:
    """Run ``score``; return the exit status."""
    try:
        total = _count_records(args.input)
    except OSError as exc:
        warn(f"error: {exc}")
        return EXIT_USAGE
    writer = ResumableJsonlWriter(args.output)
    try:
        done = writer.open()
    except OSError as exc:
        warn(f"error: {exc}")
        return EXIT_USAGE
    mismatch = _resume_mismatch(args, writer.last_record, done, total)
    if mismatch:
        writer.close()
        warn(f"error: {mismatch}; use another output path or delete {writer.partial_path}")
        return EXIT_USAGE
    if done:
        _LOGGER.info("resuming after %d records", done)
    limit = total - done if args.max_lines is None else min(args.max_lines, total - done)
    pending: Deque[Tuple[int, Any]] = deque()

    def conversations() -> Iterator[Any]:
        for position, (number, record) in enumerate(_records(args.input, done)):
            if position >= limit:
                return
            pending.append((number, record))
            yield record_messages(record, position)

    bar = progress_bar(total, done, args.no_progress)
    buffer: List[str] = []
    status = EXIT_OK
    consumed = 0
    try:
        with make_client(args) as client:
            for result in client.iter_scores(conversations()):
                _, record = pending.popleft()
                consumed += 1
                buffer.append(json.dumps(output_record(record, result.to_dict(), args.result_key),
                                         ensure_ascii=False))
                if len(buffer) >= client.settings.batch_size:
                    writer.append(buffer)
                    bar.update(len(buffer))
                    buffer = []
    except RewardInvalidInputError as exc:
        status = EXIT_FAILED
        line = _line_of(exc.index, pending, consumed)
        warn(f"error: {args.input}{line}: {exc.reason}")
    except RewardClientError as exc:
        status = EXIT_FAILED
        warn(f"error: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    finally:
        writer.append(buffer)
        bar.update(len(buffer))
        bar.close()
        if status == EXIT_OK and writer.written == total:
            writer.finish()
        else:
            writer.close()
    if status == EXIT_OK:
        say(f"{writer.written}/{total} records scored -> "
            f"{args.output if writer.written == total else writer.partial_path}")
    elif writer.written < total:
        warn(f"stopped after {writer.written}/{total} records; re-run the same command to resume")
    return status


def _resume_mismatch(args: argparse.Namespace, last: Optional[dict], done: int,
                     total: int) -> str:
    """Return why the existing output cannot continue this input ("" when it can).

    The last record kept must be input record ``done`` with the result added: resuming on
    top of the output of another (or an edited) input would silently misalign.
    """
    if done > total:
        return f"{args.output} already holds {done} records but {args.input} has {total}"
    if not done or last is None:
        return ""
    _, record = next(_records(args.input, done - 1))
    expected = output_record(record, None, args.result_key)
    saved = dict(last)
    saved[args.result_key] = None
    if saved != expected:
        return f"{args.output} record {done} does not match {args.input} record {done}"
    return ""


def _line_of(index: Optional[int], pending: Deque[Tuple[int, Any]], consumed: int) -> str:
    """Return ``:LINE`` of run-relative record ``index``, or "" when unknown.

    ``pending`` holds the records sent but not yet written, oldest first; results arrive in
    input order, so record ``index`` sits at ``index - consumed`` in it.
    """
    if index is None or not 0 <= index - consumed < len(pending):
        return ""
    return f":{pending[index - consumed][0]}"
