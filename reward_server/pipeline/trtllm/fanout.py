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

A process reward model needs the logits at every step tag, not only at the last token, and the
backend returns the logits of the last input position only (context logits would be prompt length
x vocabulary floats). So each conversation is sent once per step, cut right after that step's tag,
the steps one after another: each request finds the blocks of the one before it cached, and
computes little more than its own step (only whole blocks are reused).

A request nobody waits for any more (its client went, its deadline passed: `gone`) sends no further
engine request, and those it has in flight are stopped: the backend cancels the executor request
whose Triton request id a request with the boolean input `stop` names (triton_backend
inflight_batcher_llm `handleStopRequest`), so the GPU does not compute abandoned work either.

Pure logic; the Triton calls are passed in as async `infer` and `stop` callables.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import numpy as np

from reward_server.pipeline.batching import group_shared_prefixes
from reward_server.pipeline.heads import pool_position, tag_positions
from reward_server.pipeline.scoring import step_rows
from reward_server.pipeline.stages import EngineError, EngineUnavailable, RequestError, engine_sequences
from reward_server.pipeline.trtllm.layout import RewardHeadSpec

# The backend refuses a request whose requested outputs lack output_ids or sequence_length
# ("... tensor must be present in list of output tensors"), so both are asked for too.
REQUESTED_OUTPUTS = ("output_ids", "sequence_length", "generation_logits")
# With return_perf_metrics: the request's KV blocks found cached, and all it used (the backend's names).
PERF_OUTPUTS = ("kv_cache_reused_blocks", "kv_cache_alloc_total_blocks")
POOLING_HEADS = {"last_non_pad": "sequence_classification", "last": "lm_logits"}

# infer(inputs, request_id) -> outputs; stop(request_id) stops the engine request of that id
Infer = Callable[[dict[str, np.ndarray], str], Awaitable[dict[str, np.ndarray]]]
Stop = Callable[[str], Awaitable[None]]
WATCH_S = 0.05  # how often a fan-out looks for requests whose clients went


def stop_request() -> dict[str, np.ndarray]:
    """The inputs of a request that stops another (named by its request id): `stop` true, and the
    required inputs, which the backend does not read for it."""
    return {"input_ids": np.zeros((1, 1), dtype=np.int32), "input_lengths": np.ones((1, 1), dtype=np.int32),
            "request_output_len": np.ones((1, 1), dtype=np.int32), "stop": np.array([[True]], dtype=bool)}


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
    bias: tuple[float, ...] = ()  # added to the logits read (a classifier head's bias)
    step_tag_id: int | None = None  # a process reward model: logits read at every step tag
    reserved: frozenset[int] = frozenset()  # token ids no input may hold (their rows are the score rows)

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
        return cls(tuple(spec.reward_indices), spec.pooling, spec.pad_token_id, prompt_first, perf_metrics,
                   tuple(spec.bias or ()), spec.step_tag_id,
                   frozenset(spec.reward_indices) if spec.rows_in_embedding else frozenset())

    def cuts(self, ids: Sequence[int]) -> list[int]:
        """Where a sequence's requests end: after its pooled token, or after each step tag.

        Raises:
            ValueError: a process model's sequence without a step tag, or one holding a reserved token.
        """
        if self.reserved and not self.reserved.isdisjoint(ids):
            token = next(i for i in ids if i in self.reserved)
            raise ValueError(f"holds token id {token}, which this engine reserves to read the reward (a score row "
                             "of the model is that token's embedding row)")
        if self.step_tag_id is None:
            return [pool_position(ids, POOLING_HEADS[self.pooling], self.pad_token_id) + 1]
        tags = tag_positions(ids, self.step_tag_id)
        if not tags:
            raise ValueError(f"no step tag (token id {self.step_tag_id})")
        return [tag + 1 for tag in tags]

    def request(self, ids: Sequence[int], end: int | None = None) -> dict[str, np.ndarray]:
        """The `tensorrt_llm` inputs for one sequence: cut after `end` tokens (default: after its
        pooled token), one output token, generation logits returned (batch dimension 1), and
        KV-cache counters with `perf_metrics`."""
        end = self.cuts(ids)[-1] if end is None else end
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
        rewards = logits[0, 0, 0, list(self.reward_indices)].astype(np.float32)
        return rewards + np.asarray(self.bias, dtype=np.float32) if self.bias else rewards


async def score_requests(fanout: FanOut, infer: Infer, requests: Sequence[tuple[np.ndarray, np.ndarray]],
                         kv_stats: KvCacheStats | None = None,
                         gone: Callable[[int], RequestError | None] | None = None,
                         stop: Stop | None = None) -> list[dict | RequestError]:
    """Score every sequence of every request concurrently: one engine request per sequence, or per
    step of a process model's sequence (the steps in order; `reward_server.pipeline.scoring.step_rows`).

    Each request is (input_ids [B, W], input_lengths [B, 1]). A failed engine call fails only
    the request it belongs to, naming the conversation: `EngineUnavailable` (retryable) when the
    engine refused it for now, else `EngineError`. Replies' KV-cache counters go to `kv_stats`.
    `gone(r)`, when given, is the answer of request r once nobody waits for it (else None): from
    then on it sends nothing, and its engine requests in flight are stopped through `stop`.
    """
    sequences, counts = engine_sequences(requests)
    owners = [(r, c) for r, count in enumerate(counts) for c in range(count)]
    errors: dict[int, RequestError] = {}
    inputs, sent_for, first_of = [], [], {}  # engine requests, their sequence, each sequence's first one
    for s, ((r, c), seq) in enumerate(zip(owners, sequences)):
        try:
            cuts = fanout.cuts(seq)
        except ValueError as err:  # preprocessing lets no such sequence through; kept from the engine anyway
            errors.setdefault(r, EngineError(f"conversation {c}: {err}"))
            continue
        first_of[s] = len(inputs)
        inputs.extend(fanout.request(seq, end) for end in cuts)
        sent_for.extend([s] * len(cuts))
    after = {i: i - 1 for i in range(1, len(inputs)) if sent_for[i] == sent_for[i - 1]}  # a sequence's steps in turn
    if fanout.prompt_first > 0:
        firsts = list(first_of.values())
        groups, _ = group_shared_prefixes([inputs[i]["input_ids"][0].tolist() for i in firsts], fanout.prompt_first)
        after.update({firsts[m]: firsts[g.members[0]] for g in groups for m in g.members[1:]})
    tasks: dict[int, asyncio.Future] = {}
    prefix = uuid.uuid4().hex[:16]
    request_ids = [f"{prefix}-{i}" for i in range(len(inputs))]
    dropped: dict[int, RequestError] = {}
    started: set[int] = set()

    def check(r: int) -> bool:
        if r not in dropped and gone is not None:
            answer = gone(r)
            if answer is not None:
                dropped[r] = answer
        return r in dropped

    async def send(i: int):
        if i in after:  # whatever the outcome of the one before: its blocks are then cached
            await asyncio.wait([tasks[after[i]]])
        if check(owners[sent_for[i]][0]):
            return None  # nobody waits: never sent
        started.add(i)
        return await infer(inputs[i], request_ids[i])

    async def watch():
        stopped: set[int] = set()
        while not all(task.done() for task in tasks.values()):
            await asyncio.sleep(WATCH_S)
            for i in sorted(started - stopped):
                if not tasks[i].done() and check(owners[sent_for[i]][0]):
                    stopped.add(i)
                    if stop is not None:
                        try:
                            await stop(request_ids[i])
                        except Exception:  # noqa: BLE001 - the reply is ignored anyway
                            pass

    for i in range(len(inputs)):
        tasks[i] = asyncio.ensure_future(send(i))
    watcher = asyncio.ensure_future(watch()) if gone is not None and inputs else None
    replies = await asyncio.gather(*tasks.values(), return_exceptions=True)
    if watcher is not None:
        await watcher
    for r in range(len(requests)):
        check(r)
    errors.update(dropped)
    read: dict[int, list[np.ndarray]] = {s: [] for s in first_of}
    for s, reply in zip(sent_for, replies):
        r, c = owners[s]
        if r in errors:
            continue
        try:
            if isinstance(reply, BaseException):
                raise reply
            read[s].append(fanout.rewards(reply))
            if kv_stats is not None:
                kv_stats.add(reply)
        except EngineUnavailableError as err:
            errors[r] = EngineUnavailable(f"conversation {c}: {err}")
        except Exception as err:  # noqa: BLE001 - reported on its own request only
            errors[r] = EngineError(f"conversation {c}: {err}")
    rows: list[list[np.ndarray]] = [[] for _ in requests]  # per request, each sequence's [steps, K]
    for s, (r, _) in enumerate(owners):
        if r not in errors:
            rows[r].append(np.stack(read[s]).astype(np.float32))
    if fanout.step_tag_id is not None:
        return [errors.get(r) or {"rewards": step_rows(rows[r])} for r in range(len(requests))]
    return [errors.get(r) or {"rewards": np.concatenate(rows[r])} for r in range(len(requests))]
