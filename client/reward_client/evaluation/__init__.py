"""Preference evaluation: pair accuracy and RewardBench section scores."""

from reward_client.evaluation.pairs import EvalReport, PreferencePair, evaluate_pairs, read_pairs
from reward_client.evaluation.rewardbench import (EXAMPLE_COUNTS, SECTIONS, overall_score,
                                                  section_scores)

__all__ = ["EXAMPLE_COUNTS", "EvalReport", "PreferencePair", "SECTIONS", "evaluate_pairs",
           "overall_score", "read_pairs", "section_scores"]
