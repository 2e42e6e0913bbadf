"""Chosen/rejected preference pairs: reading them and scoring accuracy per subset."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from reward_client.conversations import with_response
from reward_client.evaluation.rewardbench import (is_rewardbench_subset, overall_score,
                                                  section_scores)

ALL_SUBSET = "all"


@dataclass(frozen=True)
class PreferencePair:
    """One RewardBench-format pair: ``prompt`` (string or earlier messages), two responses."""

    prompt: Union[str, List[Dict[str, str]]]
    chosen: str
    rejected: str
    subset: Optional[str] = None
    id: Optional[Any] = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "PreferencePair":
        """Build a pair from a JSON record with prompt/chosen/rejected and optional subset/id.

        Raises:
            ValueError: if a required field is missing or of the wrong type.
        """
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise ValueError(f"missing field {key!r}")
        if not isinstance(record["chosen"], str) or not isinstance(record["rejected"], str):
            raise ValueError("'chosen' and 'rejected' must be strings")
        if not isinstance(record["prompt"], (str, list)):
            raise ValueError("'prompt' must be a string or a list of messages")
        return cls(record["prompt"], record["chosen"], record["rejected"],
                   record.get("subset"), record.get("id"))

    def conversations(self) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
        """Return the (chosen, rejected) conversations to score."""
        return with_response(self.prompt, self.chosen), with_response(self.prompt, self.rejected)


def read_pairs(lines: Iterable[str]) -> Iterator[PreferencePair]:
    """Parse JSONL lines into pairs, skipping blank lines.

    Raises:
        ValueError: naming the 1-based line number of a malformed line.
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield PreferencePair.from_record(json.loads(line))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"line {number}: {exc}") from exc


def interleaved_conversations(pairs: Sequence[PreferencePair]) -> Iterator[List[Dict[str, str]]]:
    """Yield chosen_0, rejected_0, chosen_1, rejected_1, ... for one scoring pass."""
    for pair in pairs:
        chosen, rejected = pair.conversations()
        yield chosen
        yield rejected


@dataclass
class EvalReport:
    """Accuracy of a reward model on preference pairs.

    Attributes:
        accuracy: fraction of all pairs with chosen scored strictly above rejected.
        num_pairs: pairs evaluated.
        subsets: ``{subset: {"accuracy", "correct", "total"}}`` per subset present.
        sections: RewardBench section scores (0-100), for sections whose subsets are present.
        overall: RewardBench Overall (mean of the four sections), when all four are present.
        mean_margin: mean of (score_chosen - score_rejected).
    """

    accuracy: float
    num_pairs: int
    subsets: Dict[str, Dict[str, float]] = field(default_factory=dict)
    sections: Dict[str, float] = field(default_factory=dict)
    overall: Optional[float] = None
    mean_margin: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return {"accuracy": self.accuracy, "num_pairs": self.num_pairs, "subsets": self.subsets,
                "sections": self.sections, "overall": self.overall,
                "mean_margin": self.mean_margin}


def evaluate_pairs(pairs: Sequence[PreferencePair],
                   chosen_scores: Sequence[float],
                   rejected_scores: Sequence[float]) -> EvalReport:
    """Compute accuracy per subset and, for RewardBench subsets, the section scores.

    A pair is correct when its chosen score is strictly greater than its rejected score (a tie
    is wrong, as in RewardBench). Pairs without a subset are counted under ``"all"``.

    Raises:
        ValueError: if the score lists do not match the pairs.
    """
    if not len(pairs) == len(chosen_scores) == len(rejected_scores):
        raise ValueError("one chosen and one rejected score per pair is required")
    counts: Dict[str, List[int]] = {}
    for pair, chosen, rejected in zip(pairs, chosen_scores, rejected_scores):
        tally = counts.setdefault(pair.subset or ALL_SUBSET, [0, 0])
        tally[0] += int(chosen > rejected)
        tally[1] += 1
    subsets = {name: {"accuracy": correct / total, "correct": correct, "total": total}
               for name, (correct, total) in sorted(counts.items())}
    accuracy_by_subset = {name: row["accuracy"] for name, row in subsets.items()
                          if is_rewardbench_subset(name)}
    sections = section_scores(accuracy_by_subset)
    correct_total = sum(c for c, _ in counts.values())
    margins = [c - r for c, r in zip(chosen_scores, rejected_scores)]
    return EvalReport(
        accuracy=correct_total / len(pairs) if pairs else 0.0,
        num_pairs=len(pairs), subsets=subsets, sections=sections,
        overall=overall_score(sections),
        mean_margin=sum(margins) / len(margins) if margins else 0.0)
