"""From the ensemble's batch of sequences to single-sequence `tensorrt_llm` requests, and back.

The `tensorrtllm` backend refuses a request of batch size > 1 unless the model is decoupled
("Batch size > 1 requires the tensorrt_llm backend to be using decoupled transaction policy",
triton_backend inflight_batcher_llm/src/utils.cc), and a decoupled step would make the public
ensembles decoupled too. So the engine step of the ensembles is a small Python model that sends
one request per sequence, all at once; TensorRT-LLM's in-flight batcher then schedules them
together with every other request in flight. For a batch of one the backend also ignores
`input_lengths` and reads the whole `input_ids` row, so each sequence is sent already cut after
its pooled token (a causal model's later tokens cannot change that position's logits).

Conversations sharing a prompt (a GRPO group) are sent leader first: TensorRT-LLM 1.2 reuses KV
blocks only once a request has filled them, and requests with the same uncached prefix admitted
in the same step all compute it (TensorRT-LLM docs/source/features/kvcache.md). So one member of
each group goes first and the others follow when it is done, reusing its prompt blocks; groups
and unshared conversations still run concurrently. `prompt_first=0` sends everything at once.
Whether the group really reuses the leader's blocks is measured, not inferred: with `perf_metrics`
each request asks the backend for its KV-cache counters (`return_perf_metrics`), and `KvCacheStats`
adds up the blocks found cached (exported as reward_engine_kv_cache_*_total; bench/gpu_check.sh
compares them with the blocks a group could share).

Pure logic; the Triton calls are passed in as an async `infer` callable.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import numpy as np

from reward_server.batching import group_shared_prefixes
from reward_server.heads import pool_position
from reward_server.stages import EngineError, EngineUnavailable, RequestError, engine_sequences
from reward_server.trtllm.adapt import RewardHeadSpec

# The backend refuses a request whose requested outputs lack output_ids or sequence_length
# ("... tensor must be present in list of output tensors"), so both are asked for too.
REQUESTED_OUTPUTS = ("output_ids", "sequence_length", "generation_logits")
# With return_perf_metrics: the request's KV blocks found cached, and all it used (the backend's names).
PERF_OUTPUTS = ("kv_cache_reused_blocks", "kv_cache_alloc_total_blocks")
POOLING_HEADS = {"last_non_pad": "sequence_classification", "last": "lm_logits"}

Infer = Callable[[dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]


class EngineReplyError(RuntimeError):
    """The `tensorrt_llm` model's reply does not hold the logits a reward is read from."""


class EngineUnavailableError(RuntimeError):
    """The `tensorrt_llm` model refused the request for now (e.g. the server is shutting down)."""


# Shared prompts of at least this many tokens go leader first (the `prompt_first` parameter).
DEFAULT_PROMPT_FIRST = 32


@dataclass
class KvCacheStats:
    """KV-cache counters over every engine reply that carried them (`perf_metrics` on)."""

    requests: int = 0        # replies with counters
    reused_blocks: int = 0   # blocks found cached (another request's prompt)
    total_blocks: int = 0    # blocks the requests used

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Count one reply; a reply without the counters (perf metrics off) is skipped."""
        if all(name in outputs for name in PERF_OUTPUTS):
            self.requests += 1
            self.reused_blocks += int(np.asarray(outputs["kv_cache_reused_blocks"]).reshape(-1)[0])
            self.total_blocks += int(np.asarray(outputs["kv_cache_alloc_total_blocks"]).reshape(-1)[0])


@dataclass(frozen=True)
class FanOut:
    """How one sequence becomes a `tensorrt_llm` request and how its reward is read back."""

    reward_indices: tuple[int, ...]
    pooling: str
    pad_token_id: int | None
    prompt_first: int = DEFAULT_PROMPT_FIRST  # shortest shared prefix (tokens) sent leader first; 0: all at once
    perf_metrics: bool = False  # ask the backend for each request's KV-cache counters

    @property
    def requested_outputs(self) -> tuple[str, ...]:
        """The `tensorrt_llm` outputs every request asks for."""
        return REQUESTED_OUTPUTS + (PERF_OUTPUTS if self.perf_metrics else ())

    @classmethod
    def from_spec(cls, spec: RewardHeadSpec, prompt_first: int = DEFAULT_PROMPT_FIRST,
                  perf_metrics: bool = False) -> "FanOut":
        """From the engine directory's reward_head.json.

        Raises:
            ValueError: an unknown pooling rule.
        """
        if spec.pooling not in POOLING_HEADS:
            raise ValueError(f"unknown pooling {spec.pooling!r} in reward_head.json; expected one of "
                             f"{sorted(POOLING_HEADS)}")
        return cls(tuple(spec.reward_indices), spec.pooling, spec.pad_token_id, prompt_first, perf_metrics)

    def request(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The `tensorrt_llm` inputs for one sequence: cut after its pooled token, one output token,
        generation logits returned (batch dimension 1), and KV-cache counters with `perf_metrics`."""
        end = pool_position(ids, POOLING_HEADS[self.pooling], self.pad_token_id) + 1
        request = {"input_ids": np.asarray([ids[:end]], dtype=np.int32),
                   "input_lengths": np.array([[end]], dtype=np.int32),
                   "request_output_len": np.array([[1]], dtype=np.int32),
                   "return_generation_logits": np.array([[True]], dtype=bool)}
        if self.perf_metrics:
            request["return_perf_metrics"] = np.array([[True]], dtype=bool)
        return request

    def rewards(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The K raw rewards from one response's `generation_logits` [1, beams, steps, vocab].

        The first generation step's logits are the logits at the last input position.

        Raises:
            EngineReplyError: the response has no generation logits, or not of the expected shape.
        """
        logits = outputs.get("generation_logits")
        if logits is None:
            raise EngineReplyError("the tensorrt_llm model returned no generation_logits: is the engine built with "
                              "--gather_generation_logits?")
        logits = np.asarray(logits)
        if logits.ndim != 4 or logits.shape[0] != 1 or logits.shape[2] < 1:
            raise EngineReplyError(f"generation_logits has shape {list(logits.shape)}; expected [1, beams, steps, vocab]")
        if max(self.reward_indices) >= logits.shape[3]:
            raise EngineReplyError(f"reward index {max(self.reward_indices)} is outside the engine's "
                              f"{logits.shape[3]} logits")
        return logits[0, 0, 0, list(self.reward_indices)].astype(np.float32)


async def score_requests(fanout: FanOut, infer: Infer, requests: Sequence[tuple[np.ndarray, np.ndarray]],
                         kv_stats: KvCacheStats | None = None) -> list[dict | RequestError]:
    """Score every sequence of every request concurrently, one engine request per sequence.

    Each request is (input_ids [B, W], input_lengths [B, 1]). A failed engine call fails only
    the request it belongs to, naming the conversation: `EngineUnavailable` (retryable) when the
    engine refused it for now, else `EngineError`. Replies' KV-cache counters go to `kv_stats`.
    """
    sequences, counts = engine_sequences(requests)
    owners = [(r, c) for r, count in enumerate(counts) for c in range(count)]
    inputs = [fanout.request(seq) for seq in sequences]
    leader_of: dict[int, int] = {}
    if fanout.prompt_first > 0:
        groups, _ = group_shared_prefixes([x["input_ids"][0].tolist() for x in inputs], fanout.prompt_first)
        leader_of = {member: group.members[0] for group in groups for member in group.members[1:]}
    tasks: dict[int, asyncio.Future] = {}

    async def send(i: int):
        if i in leader_of:  # after the leader, whatever its outcome: its prompt blocks are then cached
            await asyncio.wait([tasks[leader_of[i]]])
        return await infer(inputs[i])

    for i in range(len(inputs)):
        tasks[i] = asyncio.ensure_future(send(i))
    replies = await asyncio.gather(*tasks.values(), return_exceptions=True)
    rows: list[list[np.ndarray]] = [[] for _ in requests]
    errors: dict[int, RequestError] = {}
    for (r, c), reply in zip(owners, replies):
        if r in errors:
            continue
        try:
            if isinstance(reply, BaseException):
                raise reply
            rows[r].append(fanout.rewards(reply))
            if kv_stats is not None:
                kv_stats.add(reply)
        except EngineUnavailableError as err:
            errors[r] = EngineUnavailable(f"conversation {c}: {err}")
        except Exception as err:  # noqa: BLE001 - reported on its own request only
            errors[r] = EngineError(f"conversation {c}: {err}")
    return [errors.get(r) or {"rewards": np.stack(rows[r]).astype(np.float32)} for r in range(len(requests))]
