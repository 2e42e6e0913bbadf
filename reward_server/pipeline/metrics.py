"""Reward metrics on Triton's Prometheus endpoint (port 8002), beside Triton's own `nv_*` metrics.

    reward_conversations_scored_total{model}       conversations answered with a score
    reward_tokens_scored_total{model}              their tokens (after truncation)
    reward_truncated_conversations_total{model}    conversations shortened by truncate_left
    reward_requests_rejected_total{model,reason}   requests refused, by reason (REJECTION_REASONS)
    reward_score_bucket{model,le} / _count / _sum  the score distribution (SCORE_BUCKETS)
    reward_engine_shared_tokens_total{model}       prompt tokens reused (the engine's, triton_io.EngineMetrics)
    reward_engine_kv_cache_reused_blocks_total{model}  TensorRT-LLM KV blocks found cached (the fan-out's),
    reward_engine_kv_cache_total_blocks_total{model}   and all it used (return_perf_metrics)

Triton 2.51's Python backend has only COUNTER and GAUGE metric kinds (its `MetricFamily` has no
HISTOGRAM), so the score histogram is written the way Prometheus lays one out: a cumulative
counter per upper bound `le` (with `+Inf`), a `_count` counter and a `_sum` gauge (a sum of
scores can go down). `histogram_quantile()` works on it unchanged.

The functions here are plain Python; `RewardMetrics` needs the stub's `triton_python_backend_utils`.
"""

from __future__ import annotations

import bisect
import logging
from typing import Sequence

import numpy as np

_LOGGER = logging.getLogger(__name__)

SCORE_BUCKETS = (-8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
# (substring of the rejection message, reason label); the first match wins, else "invalid_messages".
_REASON_MARKERS = (
    ("the server is stopping", "stopping"),
    ("bytes, over the limit", "too_large"), ("bytes together, over the limit", "too_large"),
    ("not valid UTF-8", "invalid_utf8"),
    ("not valid JSON", "invalid_json"), ("nested too deeply", "invalid_json"),
    ("tokens, over the maximum length", "too_long"), ("the response alone is", "too_long"),
    ("chat template rejected", "template"),
    ("input_ids", "invalid_ids"), ("input_lengths", "invalid_ids"),
)
REJECTION_REASONS = ("stopping", "too_large", "invalid_utf8", "invalid_json", "too_long", "template", "invalid_ids",
                     "invalid_messages")


def rejection_reason(message: str) -> str:
    """The `reason` label of a rejected request, from its error message."""
    return next((reason for marker, reason in _REASON_MARKERS if marker in message), "invalid_messages")


def bucket_counts(scores: np.ndarray) -> list[int]:
    """Scores per bucket, not cumulative: index i counts scores <= SCORE_BUCKETS[i] (and above the
    previous bound); the last index counts those above every bound."""
    counts = [0] * (len(SCORE_BUCKETS) + 1)
    for value in np.asarray(scores, dtype=np.float64).reshape(-1):
        counts[len(SCORE_BUCKETS) if np.isnan(value) else bisect.bisect_left(SCORE_BUCKETS, value)] += 1
    return counts


class RewardMetrics:
    """The reward metrics of one Triton model: rejections in preprocessing (`scores=False`), what
    was scored in postprocessing (`scores=True`)."""

    def __init__(self, model_name: str, scores: bool):
        import triton_python_backend_utils as pb_utils

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        labels = {"model": model_name}
        self._families = []  # a family must outlive its metrics

        def family(name, description, kind=counter):
            self._families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self._families[-1]

        if not scores:
            rejected = family("reward_requests_rejected_total", "Requests rejected, by reason")
            self.rejected = {reason: rejected.Metric(labels={**labels, "reason": reason})
                             for reason in REJECTION_REASONS}
            return
        self.conversations = family("reward_conversations_scored_total", "Conversations scored").Metric(labels=labels)
        self.tokens = family("reward_tokens_scored_total", "Tokens of the conversations scored").Metric(labels=labels)
        self.truncated = family("reward_truncated_conversations_total",
                                "Conversations truncated to fit the maximum length").Metric(labels=labels)
        buckets = family("reward_score_bucket", "Scores at or below le (cumulative histogram buckets)")
        bounds = [*(f"{b:g}" for b in SCORE_BUCKETS), "+Inf"]
        self.buckets = [buckets.Metric(labels={**labels, "le": le}) for le in bounds]
        self.count = family("reward_score_count", "Scores observed").Metric(labels=labels)
        self.sum = family("reward_score_sum", "Sum of the scores observed", gauge).Metric(labels=labels)

    def after_preprocessing(self, requests: Sequence, results: Sequence) -> None:
        """`guarded`'s observer in preprocessing: count and log every rejected request (with its id)."""
        from reward_server.pipeline.triton_io import log_info, request_id

        self.observe_rejections(results)
        for request, result in zip(requests, results):
            if isinstance(result, str):
                log_info(f"request {request_id(request) or '-'}: rejected ({rejection_reason(result)}): {result}")

    def after_postprocessing(self, requests: Sequence, results: Sequence) -> None:
        """`guarded`'s observer in postprocessing: count what was scored; log each request whose client
        set an id (anonymous requests are not logged one by one: a busy server answers thousands)."""
        from reward_server.pipeline.triton_io import log_info, request_id

        self.observe_scores(results)
        for request, result in zip(requests, results):
            rid = request_id(request)
            if rid and not isinstance(result, str):
                scores = np.asarray(result["score"]).reshape(-1)
                log_info(f"request {rid}: scored {len(scores)} conversations, "
                         f"{int(np.asarray(result['num_tokens']).sum())} tokens, "
                         f"{int(np.asarray(result['truncated']).sum())} truncated")

    def reject(self, reason: str, n: int = 1) -> None:
        """Count `n` requests rejected for `reason`."""
        self.rejected.get(reason, self.rejected["invalid_messages"]).increment(n)

    def observe_rejections(self, results: Sequence) -> None:
        """Count the rejected requests among a stage's results (error strings)."""
        for result in results:
            if isinstance(result, str):
                self.reject(rejection_reason(result))

    def observe_scores(self, results: Sequence) -> None:
        """Count what postprocessing answered: conversations, tokens, truncations, the histogram."""
        for result in results:
            if isinstance(result, str):
                continue
            scores = np.asarray(result["score"]).reshape(-1)
            self.conversations.increment(len(scores))
            self.tokens.increment(int(np.asarray(result["num_tokens"]).sum()))
            self.truncated.increment(int(np.asarray(result["truncated"]).sum()))
            running = 0
            for metric, n in zip(self.buckets, bucket_counts(scores)):
                running += n
                if running:
                    metric.increment(running)
            self.count.increment(len(scores))
            finite = scores[np.isfinite(scores)]
            if len(finite):
                self.sum.increment(float(finite.sum()))
