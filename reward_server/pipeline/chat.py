"""Conversations to token ids: the checkpoint's chat template, the length policy, the step tags kept.

This is the one place where a conversation becomes tokens. The server's preprocessing model,
the benchmarks and the tests' reference checks all call `ChatEncoder`, so a score computed
anywhere in the project starts from the same ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from reward_server.pipeline.conversations import ConversationError, check_text, shorten

TRUNCATION_POLICIES = ("reject", "truncate_left")
DEFAULT_MAX_LENGTH = 4096   # when the checkpoint does not say its context length
# The default limit follows the model's context up to this: longer contexts (Llama-3.1's 131k) are
# opted into with --max-length, since one conversation runs as one row (its activations scale with it).
MAX_DEFAULT_LENGTH = 32768


@dataclass(frozen=True)
class Encoded:
    """Token ids of one conversation, after the length policy."""

    token_ids: list[int]
    truncated: bool


@dataclass(frozen=True)
class LengthPolicy:
    """What to do with a conversation longer than `max_length` tokens.

    "reject" fails it with the token count and the limit; "truncate_left" drops the oldest
    tokens (keeping a leading BOS) as long as the whole response still fits.
    """

    max_length: int = DEFAULT_MAX_LENGTH
    truncation: str = "reject"

    def __post_init__(self):
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {self.truncation!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")

    def apply(self, ids: list[int], keep_head: int, response_tokens: int | None) -> Encoded:
        """Fit `ids` to the limit.

        Args:
            ids: the conversation's token ids.
            keep_head: leading tokens that truncation must keep (1 for a BOS, else 0).
            response_tokens: tokens at the end that must survive truncation (None: unknown,
                only the length limit applies).

        Raises:
            ConversationError: the conversation is too long and cannot be truncated.
        """
        if len(ids) <= self.max_length:
            return Encoded(ids, False)
        if self.truncation == "reject":
            raise ConversationError(f"conversation is {len(ids)} tokens, over the maximum length of "
                                    f"{self.max_length} (truncation policy: reject)")
        tail = self.max_length - keep_head
        if response_tokens is not None and response_tokens > tail:
            raise ConversationError(f"the response alone is {response_tokens} tokens; with the maximum length "
                                    f"of {self.max_length} it cannot be kept whole by truncate_left")
        return Encoded(ids[:keep_head] + ids[len(ids) - tail:], True)


class ChatEncoder:
    """Turns conversations into token ids with a checkpoint's tokenizer and chat template.

    The template is rendered with `add_generation_prompt=False` (the response is part of the
    conversation) and tokenised without the tokenizer's own special tokens; a BOS is then
    ensured exactly once when the tokenizer would normally add one.
    """

    def __init__(self, tokenizer: Any, policy: LengthPolicy, chat_template: str | None = None,
                 step_tag_id: int | None = None):
        self.tokenizer = tokenizer
        self.policy = policy
        if chat_template:
            tokenizer.chat_template = chat_template
        if not tokenizer.chat_template:
            raise ValueError("the checkpoint's tokenizer has no chat template; pass one with chat_template")
        self.vocab_size = len(tokenizer)
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("x", add_special_tokens=True).input_ids[:1] == [bos]
        self._bos = bos if adds_bos else None
        # A process reward model's step tag: its token id, and the text that tokenises to it.
        self.step_tag_id = step_tag_id
        self.step_tag = None if step_tag_id is None else tokenizer.decode([step_tag_id])

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, max_length: int | None = None,
                        truncation: str = "reject", chat_template: str | None = None,
                        step_tag: str | int | None = None) -> "ChatEncoder":
        """Load the tokenizer of a local Hugging Face checkpoint.

        Args:
            checkpoint: checkpoint directory.
            max_length: token limit; defaults to the model's max_position_embeddings, at most
                32,768 (4,096 when the config does not say).
            truncation: "reject" or "truncate_left".
            chat_template: Jinja template overriding the checkpoint's.
            step_tag: a process reward model's step tag, a token or its id (`heads.resolve_step_tag`):
                every conversation must then hold tagged steps in its response (`parse_messages`).
        """
        from transformers import AutoTokenizer

        from reward_server.pipeline.heads import resolve_step_tag

        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        if max_length is None:
            max_length = min(MAX_DEFAULT_LENGTH, _max_positions(checkpoint) or DEFAULT_MAX_LENGTH)
        tag_id = None if step_tag in (None, "") else resolve_step_tag(tokenizer, "", step_tag)
        return cls(tokenizer, LengthPolicy(max_length, truncation), chat_template, tag_id)

    def _render(self, conversations: Sequence[list[dict]], generation_prompt: bool = False) -> list[list[int]]:
        texts = self.tokenizer.apply_chat_template(list(conversations), tokenize=False,
                                                   add_generation_prompt=generation_prompt)
        return self._tokenize(texts)

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of finished texts: special tokens written in the text are kept as such, none
        is added, and a BOS is ensured exactly once when the tokenizer normally adds one."""
        batch = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if self._bos is None:
            return batch
        out = []
        for ids in batch:
            start = 0
            while start < len(ids) and ids[start] == self._bos:
                start += 1
            out.append([self._bos] + ids[start:])
        return out

    def _render_one(self, messages: list[dict]) -> list[int] | ConversationError:
        try:
            return self._render([messages])[0]
        except Exception as err:  # noqa: BLE001 - Jinja's TemplateError and whatever a template raises
            return ConversationError(f"the chat template rejected this conversation: {shorten(str(err), 200)}")

    def encode(self, messages: list[dict]) -> list[int]:
        """Token ids of one validated conversation, before the length policy."""
        return self._render([messages])[0]

    def encode_batch(self, conversations: Sequence[list[dict]]) -> list[Encoded | ConversationError]:
        """Encode many validated conversations in one tokenizer call, applying the length policy.

        Returns one `Encoded` or `ConversationError` per conversation, in order.
        """
        if not conversations:
            return []
        try:
            rendered = self._render(conversations)
        except Exception:  # noqa: BLE001 - a template that raises (e.g. roles must alternate)
            rendered = [self._render_one(messages) for messages in conversations]
        results: list[Encoded | ConversationError] = []
        for messages, ids in zip(conversations, rendered):
            if isinstance(ids, ConversationError):
                results.append(ids)
                continue
            try:
                results.append(self._steps_kept(self._fit(messages, ids), messages[-1]["content"]))
            except ConversationError as err:
                results.append(err)
        return results

    def encode_texts(self, texts: Sequence[str]) -> list[Encoded | ConversationError]:
        """Encode already-templated texts in one tokenizer call, applying the length policy.

        For trainers that send the conversation as one string in a chat format (OpenRLHF's
        policy-templated queries, verl's reward-templated inputs): no chat template is applied,
        special tokens written in the text (`<|eot_id|>`, ...) stay special tokens, and the text
        gets exactly one leading BOS when the tokenizer uses one, whether or not it already held
        it. truncate_left keeps only the leading BOS and the last `max_length - 1` tokens: the
        response boundary is unknown in a plain text.

        Returns one `Encoded` or `ConversationError` per text, in order.
        """
        checked: list[str | ConversationError] = []
        for text in texts:
            try:
                checked.append(check_text(text))
            except ConversationError as err:
                checked.append(err)
        valid = [t for t in checked if not isinstance(t, ConversationError)]
        ids = iter(self._tokenize(valid) if valid else [])
        results: list[Encoded | ConversationError] = []
        for text in checked:
            if isinstance(text, ConversationError):
                results.append(text)
                continue
            try:
                results.append(self._steps_kept(self.policy.apply(next(ids), int(self._bos is not None), None), text))
            except ConversationError as err:
                results.append(err)
        return results

    def _fit(self, messages: list[dict], ids: list[int]) -> Encoded:
        response_tokens = None
        if len(ids) > self.policy.max_length and self.policy.truncation == "truncate_left":
            # Only over-long conversations pay for rendering the prompt alone.
            prompt = self._render([messages[:-1]], generation_prompt=True)[0] if len(messages) > 1 else []
            response_tokens = len(ids) - len(prompt)
        return self.policy.apply(ids, int(self._bos is not None), response_tokens)

    def check_ids(self, ids: Sequence[int]) -> Encoded:
        """Validate pre-tokenised ids (vocabulary range) and apply the length policy.

        Raises:
            ConversationError: empty, an id outside the vocabulary, or too long.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise ConversationError("input_ids is empty")
        bad = [i for i in ids if i < 0 or i >= self.vocab_size]
        if bad:
            raise ConversationError(f"input_ids holds {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        return self._steps_kept(self.policy.apply(ids, int(self._bos is not None and ids[0] == self._bos), None),
                                ids=ids)

    def _steps_kept(self, encoded: Encoded, text: str | None = None, ids: Sequence[int] | None = None) -> Encoded:
        """`encoded` if it holds every step tag of the response `text` (or of the given `ids`) as the
        tag token; no-op for an outcome model.

        Raises:
            ConversationError: no tag at all, a tag that tokenised into other tokens, or tags that
                the length policy cut off.
        """
        if self.step_tag_id is None:
            return encoded
        expected = text.count(self.step_tag) if text is not None else list(ids).count(self.step_tag_id)
        found = encoded.token_ids.count(self.step_tag_id)
        if expected == 0:
            raise ConversationError(f"there is no step tag {self.step_tag!r} (token id {self.step_tag_id}): a process "
                                    "reward model scores tagged steps")
        if found < expected and encoded.truncated:
            raise ConversationError(f"truncate_left to the maximum length of {self.policy.max_length} tokens would cut "
                                    f"{expected - found} of the {expected} steps")
        if found != expected:
            raise ConversationError(f"the {expected} step tags {self.step_tag!r} became {found} tag tokens (id "
                                    f"{self.step_tag_id}): a tag merged with the text next to it")
        return encoded


def _max_positions(checkpoint: str | Path) -> int | None:
    """The longest conversation the model scores as trained: its positions."""
    config_path = Path(checkpoint) / "config.json"
    if not config_path.exists():
        return None
    config = json.loads(config_path.read_text())
    return config.get("text_config", config).get("max_position_embeddings")
