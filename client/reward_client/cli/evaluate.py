"""``reward-client eval PAIRS.jsonl``: preference accuracy and RewardBench section scores."""

from __future__ import annotations

import argparse
import json
from typing import Any, List

from reward_client.cli.common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, make_client,
                                      progress_bar, say, warn)
from reward_client.errors import RewardClientError, RewardInvalidInputError
from reward_client.evaluation import EvalReport, evaluate_pairs, read_pairs
from reward_client.evaluation.pairs import interleaved_conversations
from reward_client.evaluation.rewardbench import SECTIONS


def add_parser(subparsers: Any, parents: List[argparse.ArgumentParser]) -> None:
    """Register the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval", parents=parents, help="preference accuracy on chosen/rejected pairs",
        description="Score RewardBench-format pairs (prompt, chosen, rejected, optional subset "
                    "and id); report accuracy per subset and, for RewardBench subsets, the "
                    "Chat / Chat Hard / Safety / Reasoning section scores and Overall.")
    parser.add_argument("pairs", help="pairs JSONL file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--scores-output", default=None,
                        help="also write per-pair scores to this JSONL file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``eval``; return the exit status."""
    try:
        with open(args.pairs, encoding="utf-8") as handle:
            pairs = list(read_pairs(handle))
    except (OSError, ValueError) as exc:
        warn(f"error: {args.pairs}: {exc}")
        return EXIT_USAGE
    bar = progress_bar(2 * len(pairs), 0, args.no_progress or args.json)
    scores: List[float] = []
    try:
        with make_client(args) as client:
            for result in client.iter_scores(interleaved_conversations(pairs)):
                scores.append(result.score)
                bar.update(1)
    except RewardInvalidInputError as exc:
        where = f"pair {exc.index // 2} ({'chosen' if exc.index % 2 == 0 else 'rejected'})" \
            if exc.index is not None else "a pair"
        warn(f"error: {args.pairs}: {where}: {exc.reason}")
        return EXIT_FAILED
    except RewardClientError as exc:
        warn(f"error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        bar.close()
    chosen, rejected = scores[0::2], scores[1::2]
    report = evaluate_pairs(pairs, chosen, rejected)
    if args.scores_output:
        with open(args.scores_output, "w", encoding="utf-8") as handle:
            for pair, c, r in zip(pairs, chosen, rejected):
                handle.write(json.dumps({"id": pair.id, "subset": pair.subset, "chosen_score": c,
                                         "rejected_score": r, "correct": c > r}) + "\n")
    say(json.dumps(report.to_dict(), sort_keys=True) if args.json else format_report(report))
    return EXIT_OK


def format_report(report: EvalReport) -> str:
    """Return the report as a plain-text table (accuracies in percent)."""
    width = max([len("subset")] + [len(name) for name in report.subsets]) + 2
    lines = [f"{'subset':<{width}}{'correct':>8}{'total':>8}{'accuracy':>10}"]
    for name, row in report.subsets.items():
        lines.append(f"{name:<{width}}{row['correct']:>8}{row['total']:>8}"
                     f"{100 * row['accuracy']:>10.2f}")
    lines.append(f"{'all pairs':<{width}}{'':>8}{report.num_pairs:>8}"
                 f"{100 * report.accuracy:>10.2f}")
    if report.sections:
        lines.append("")
        lines.append(f"{'RewardBench section':<{width}}{'score':>26}")
        for section in SECTIONS:
            if section in report.sections:
                lines.append(f"{section:<{width}}{report.sections[section]:>26.2f}")
        if report.overall is not None:
            lines.append(f"{'Overall':<{width}}{report.overall:>26.2f}")
    return "\n".join(lines)
