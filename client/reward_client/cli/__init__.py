"""The ``reward-client`` command line: ``score``, ``eval``, ``health``, ``models``."""

from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from reward_client.cli import evaluate, info, score
from reward_client.cli.common import EXIT_USAGE, connection_options, scoring_options


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``reward-client``."""
    parser = argparse.ArgumentParser(prog="reward-client",
                                     description="Client for the Triton reward server.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    connection, batching = connection_options(), scoring_options()
    score.add_parser(subparsers, [connection, batching])
    evaluate.add_parser(subparsers, [connection, batching])
    info.add_parsers(subparsers, [connection])
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``reward-client``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ValueError as exc:  # out-of-range options
        logging.getLogger("reward_client").error("%s", exc)
        return EXIT_USAGE
