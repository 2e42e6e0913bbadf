"""RLHF-shaped scoring workloads: K prompts x n sampled responses, chat formatted.

A GRPO-style trainer scores groups of responses that share one prompt; best-of-n sampling
looks the same. `generate` builds such a workload deterministically from a seed:

- `shared_prompt=True` (the "grpo" workload): K prompts, each followed by n different
  assistant responses, the n conversations of a group adjacent in arrival order;
- `shared_prompt=False` (the "no-sharing" workload): K x n conversations, each with its own
  prompt drawn from the same length distribution, so no two conversations share more than the
  chat template's first tokens.

Prompt and response lengths are log-normal in words. The text is pseudo-words built from the
syllables the demo tokenizer was trained on (about 2 tokens per word with
punctuation); the defaults give about 45-55k tokens for K=16, n=8 on the `small`
demo checkpoint (see `bench/README.md`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

_LOGGER = logging.getLogger(__name__)

Message = dict[str, str]
Conversation = list[Message]

try:
    # The demo tokenizer was trained on words built from these syllables, so text made of
    # them tokenises at a realistic ~2 tokens per word (arbitrary syllables give ~7).
    from reward_server.supervisor.demo_checkpoint import _SYLLABLES as _DEMO_SYLLABLES
except ImportError:  # pragma: no cover - the project package is always there in this repo
    _DEMO_SYLLABLES = ["ka", "ri", "to", "mel", "sa", "un", "pe", "lo", "vi", "dra"]
_PUNCTUATION = [".", ".", ".", "?", "!", ":", ";"]
_SYSTEM_PROMPTS = [
    "You are a helpful, honest and harmless assistant.",
    "You are a careful math tutor. Show your reasoning step by step.",
    "Answer concisely and cite your assumptions.",
    "You are a coding assistant. Prefer short, correct programs.",
]


@dataclass(frozen=True)
class WorkloadSpec:
    """Shape of a workload.

    Attributes:
        prompts: K, the number of distinct prompts (groups).
        responses_per_prompt: n, responses sampled per prompt.
        shared_prompt: True for GRPO groups; False gives every conversation its own prompt.
        prompt_words_median: median prompt length in words (log-normal).
        prompt_words_sigma: log-space standard deviation of the prompt length.
        response_words_median: median response length in words (log-normal).
        response_words_sigma: log-space standard deviation of the response length.
        min_words: lower clip of both lengths.
        min_response_words: lower clip of the response length (at least min_words).
        max_words: upper clip of both lengths (keeps conversations under the model's context).
        system_prompt_probability: chance that a prompt starts with a system message.
        seed: seed of everything random here.
    """

    prompts: int = 16
    responses_per_prompt: int = 8
    shared_prompt: bool = True
    prompt_words_median: float = 50.0
    prompt_words_sigma: float = 0.6
    response_words_median: float = 105.0
    response_words_sigma: float = 0.6
    min_words: int = 3
    min_response_words: int = 3
    max_words: int = 1200
    system_prompt_probability: float = 0.5
    seed: int = 0

    @property
    def name(self) -> str:
        """Short workload name used in reports: "grpo", "grpo-large", "long" or "no-sharing"."""
        if not self.shared_prompt:
            return "no-sharing"
        if self.response_words_median >= LONG_RESPONSE_WORDS:
            return "long"
        return "grpo-large" if self.prompt_words_median >= LARGE_PROMPT_WORDS else "grpo"


# About 2 tokens per word: prompts of ~500 tokens and responses of ~800, as long-form RL workloads.
LARGE_PROMPT_WORDS, LARGE_RESPONSE_WORDS = 250.0, 400.0
# Reasoning traces: responses of 2k to 8k tokens (median ~4k) after a ~200-token prompt.
LONG_RESPONSE_WORDS = 2000.0
WORKLOAD_NAMES = ("grpo", "no-sharing", "grpo-large", "long")


def spec_for(name: str, prompts: int = 16, responses: int = 8, seed: int = 0) -> WorkloadSpec:
    """The spec of a named workload; "grpo-large" is always 16 prompts x 16 responses; "long" is
    2 prompts x 4 responses of 2k-8k tokens (about 35k tokens: it needs a checkpoint accepting
    8k-token conversations, e.g. the `small-long` demo size).

    Raises:
        ValueError: an unknown name.
    """
    if name == "grpo-large":
        return WorkloadSpec(prompts=16, responses_per_prompt=16, prompt_words_median=LARGE_PROMPT_WORDS,
                            response_words_median=LARGE_RESPONSE_WORDS, seed=seed)
    if name == "long":
        return WorkloadSpec(prompts=2, responses_per_prompt=4, prompt_words_median=100.0,
                            response_words_median=LONG_RESPONSE_WORDS, response_words_sigma=0.4,
                            min_response_words=1000, max_words=4000, seed=seed)
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    return WorkloadSpec(prompts=prompts, responses_per_prompt=responses, shared_prompt=(name == "grpo"), seed=seed)


@dataclass
class Workload:
    """Generated conversations in arrival order.

    Attributes:
        spec: the spec that generated them.
        conversations: one message list per conversation; the last message is the assistant
            response to score.
        group_ids: the prompt index of each conversation (all distinct without sharing).
    """

    spec: WorkloadSpec
    conversations: list[Conversation]
    group_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.conversations)


class _TextSampler:
    """Pseudo-text with a Zipf-like word distribution, driven by one numpy generator."""

    def __init__(self, rng: np.random.Generator, vocabulary: int = 4000):
        self._rng = rng
        words = []
        for _ in range(vocabulary):
            syllables = rng.integers(1, 4, endpoint=True)
            words.append("".join(_DEMO_SYLLABLES[i]
                                 for i in rng.integers(len(_DEMO_SYLLABLES), size=syllables)))
        self._words = np.array(words, dtype=object)
        weights = 1.0 / np.arange(1, vocabulary + 1)
        self._p = weights / weights.sum()

    def text(self, n_words: int) -> str:
        """Return `n_words` words in sentences of 5 to 20 words."""
        words = self._rng.choice(self._words, size=n_words, p=self._p)
        sentences, start = [], 0
        while start < n_words:
            end = min(n_words, start + int(self._rng.integers(5, 21)))
            sentence = " ".join(words[start:end])
            sentences.append(sentence[:1].upper() + sentence[1:]
                             + _PUNCTUATION[self._rng.integers(len(_PUNCTUATION))])
            start = end
        return " ".join(sentences)


def _lognormal_words(rng: np.random.Generator, median: float, sigma: float, size: int,
                     lo: int, hi: int) -> np.ndarray:
    """Integer word counts from a log-normal with the given median, clipped to [lo, hi]."""
    raw = rng.lognormal(mean=np.log(median), sigma=sigma, size=size)
    return np.clip(np.rint(raw), lo, hi).astype(int)


def generate(spec: WorkloadSpec = WorkloadSpec()) -> Workload:
    """Generate the conversations of `spec`, deterministically for its seed.

    Args:
        spec: workload shape.

    Returns:
        A `Workload` with K x n conversations in arrival order (group members adjacent).

    Raises:
        ValueError: for non-positive K or n.
    """
    if spec.prompts <= 0 or spec.responses_per_prompt <= 0:
        raise ValueError(f"prompts and responses_per_prompt must be positive, got {spec}")
    rng = np.random.default_rng(spec.seed)
    sampler = _TextSampler(rng)
    total = spec.prompts * spec.responses_per_prompt
    n_prompts = spec.prompts if spec.shared_prompt else total
    prompt_words = _lognormal_words(rng, spec.prompt_words_median, spec.prompt_words_sigma,
                                    n_prompts, spec.min_words, spec.max_words)
    response_words = _lognormal_words(rng, spec.response_words_median, spec.response_words_sigma,
                                      total, max(spec.min_words, spec.min_response_words), spec.max_words)
    prompts: list[Conversation] = []
    for words in prompt_words:
        messages: Conversation = []
        if rng.random() < spec.system_prompt_probability:
            messages.append({"role": "system",
                             "content": _SYSTEM_PROMPTS[rng.integers(len(_SYSTEM_PROMPTS))]})
        messages.append({"role": "user", "content": sampler.text(int(words))})
        prompts.append(messages)

    conversations, group_ids = [], []
    for index, words in enumerate(response_words):
        group = index // spec.responses_per_prompt if spec.shared_prompt else index
        response = {"role": "assistant", "content": sampler.text(int(words))}
        conversations.append([dict(m) for m in prompts[group]] + [response])
        group_ids.append(group)
    _LOGGER.info("generated %s workload: %d conversations, %d prompts, seed %d",
                 spec.name, total, n_prompts, spec.seed)
    return Workload(spec=spec, conversations=conversations, group_ids=group_ids)


def load_encoder(checkpoint: str | Path):
    """Return a callable `messages -> list[int]` tokenising exactly as the server does.

    Uses the project's `reward_server.pipeline.chat.ChatEncoder` when it exists, else the checkpoint
    tokenizer's chat template (`apply_chat_template(messages, tokenize=True)`).
    """
    try:
        from reward_server.pipeline.chat import ChatEncoder
    except ImportError:
        ChatEncoder = None
    if ChatEncoder is not None:
        encoder = ChatEncoder.from_checkpoint(str(checkpoint))
        return encoder.encode
    _LOGGER.warning("reward_server.pipeline.chat.ChatEncoder not available; tokenising with the "
                    "checkpoint's chat template directly")
    return template_encoder(checkpoint)


def template_encoder(checkpoint: str | Path):
    """Return a `messages -> list[int]` callable using the tokenizer's own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))

    def encode(messages: Conversation) -> list[int]:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if hasattr(ids, "keys"):  # some transformers versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    return encode


def tokenize(conversations: Sequence[Conversation], encode) -> list[list[int]]:
    """Token ids of every conversation, in order, using `encode` (see `load_encoder`)."""
    return [list(encode(messages)) for messages in conversations]


# --- prompt-cache workloads (issue 28): conversations that grow across requests -----------------------


@dataclass(frozen=True)
class MultiTurnSpec:
    """Shape of the `multi-turn` workload: chats that grow a turn at a time.

    Attributes:
        conversations: number of chats.
        turns: user/assistant turns per chat.
        user_words: inclusive (low, high) of a user message's length in words (uniform).
        assistant_words: inclusive (low, high) of an assistant message's length in words.
        system_every: every `system_every`-th chat (index 0, 2, ... for 2) starts with a system
            message, so exactly half have one with the default.
        seed: seed of everything random here (the same word generator as `generate`'s).
    """

    conversations: int = 8
    turns: int = 8
    user_words: tuple[int, int] = (30, 80)
    assistant_words: tuple[int, int] = (60, 150)
    system_every: int = 2
    seed: int = 0


def generate_multi_turn(spec: MultiTurnSpec = MultiTurnSpec()) -> list[Conversation]:
    """Every chat of `spec` with all its turns (system?, user, assistant, user, assistant, ...),
    deterministically for its seed.

    Raises:
        ValueError: for non-positive conversations or turns.
    """
    if spec.conversations <= 0 or spec.turns <= 0:
        raise ValueError(f"conversations and turns must be positive, got {spec}")
    rng = np.random.default_rng(spec.seed)
    sampler = _TextSampler(rng)
    chats: list[Conversation] = []
    for index in range(spec.conversations):
        messages: Conversation = []
        if spec.system_every and index % spec.system_every == 0:
            messages.append({"role": "system", "content": _SYSTEM_PROMPTS[rng.integers(len(_SYSTEM_PROMPTS))]})
        for _ in range(spec.turns):
            for role, (low, high) in (("user", spec.user_words), ("assistant", spec.assistant_words)):
                words = int(rng.integers(low, high, endpoint=True))
                messages.append({"role": role, "content": sampler.text(words)})
        chats.append(messages)
    return chats


def multi_turn_waves(chats: Sequence[Conversation], turns: int | None = None) -> list[list[Conversation]]:
    """Wave t (t = 1..turns): every chat up to and including turn t's assistant message.

    Wave t's conversation c is wave t-1's conversation c plus one user and one assistant message,
    so a prompt cache holding wave t-1 has all but the last turn of wave t.
    """
    def cut(messages: Conversation, turn: int) -> Conversation:
        head = 1 if messages and messages[0]["role"] == "system" else 0
        return [dict(m) for m in messages[: head + 2 * turn]]

    most = min((sum(m["role"] == "assistant" for m in chat) for chat in chats), default=0)
    turns = most if turns is None else turns
    if not 0 < turns <= most:
        raise ValueError(f"turns must be in 1..{most}, got {turns}")
    return [[cut(chat, turn) for chat in chats] for turn in range(1, turns + 1)]


@dataclass(frozen=True)
class PrmSpec:
    """Shape of the `prm-steps` workload: a process reward model scoring a solution as it grows.

    Attributes:
        problems: number of problems, one solution each.
        steps: reasoning steps per solution.
        problem_words: inclusive (low, high) of the problem statement's length in words (uniform).
        step_words: inclusive (low, high) of one step's length in words.
        seed: seed of everything random here (the same word generator as `generate`'s).
    """

    problems: int = 8
    steps: int = 12
    problem_words: tuple[int, int] = (30, 80)
    step_words: tuple[int, int] = (10, 40)
    seed: int = 0


def generate_prm(spec: PrmSpec = PrmSpec()) -> list[tuple[Conversation, list[str]]]:
    """(prompt messages, solution steps) per problem, deterministically for the seed.

    Raises:
        ValueError: for non-positive problems or steps.
    """
    if spec.problems <= 0 or spec.steps <= 0:
        raise ValueError(f"problems and steps must be positive, got {spec}")
    rng = np.random.default_rng(spec.seed)
    sampler = _TextSampler(rng)
    out = []
    for _ in range(spec.problems):
        prompt = [{"role": "user", "content": sampler.text(int(rng.integers(*spec.problem_words, endpoint=True)))}]
        steps = [sampler.text(int(rng.integers(*spec.step_words, endpoint=True))) for _ in range(spec.steps)]
        out.append((prompt, steps))
    return out


def prm_calls(prompt: Conversation, steps: Sequence[str], step_tag: str) -> list[Conversation]:
    """Call k (k = 1..len(steps)): the prompt and the first k steps, each followed by `step_tag`
    (the layout the server's `join_steps` gives), as the assistant message."""
    return [[dict(m) for m in prompt] + [{"role": "assistant", "content": "".join(s + step_tag for s in steps[:k])}]
            for k in range(1, len(steps) + 1)]
