"""Conversations to token ids: validation, the checkpoint's chat template, the length policy.

This is the one place where a conversation becomes tokens. The server's preprocessing model,
the benchmarks and the tests' reference checks all call `ChatEncoder`, so a score computed
anywhere in the project starts from the same ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROLES = ("system", "user", "assistant")
TRUNCATION_POLICIES = ("reject", "truncate_left")
DEFAULT_MAX_LENGTH = 4096   # when the checkpoint does not say its context length
# The default limit follows the model's context up to this: longer contexts (Llama-3.1's 131k) are
# opted into with --max-length, since one conversation runs as one row (its activations scale with it).
MAX_DEFAULT_LENGTH = 32768
# Generous for max_length 32768 (a token is rarely over 16 bytes), and bounded for the server:
DEFAULT_MAX_CONVERSATION_BYTES = 1 << 20      # 1 MiB per conversation
DEFAULT_MAX_REQUEST_BYTES = 64 << 20          # 64 MiB per request (256 conversations of 256 KiB)


class ConversationError(ValueError):
    """One conversation is invalid; `str(err)` says what and where, without the index."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one conversation, after the length policy."""

    token_ids: list[int]
    truncated: bool


@dataclass(frozen=True)
class InputLimits:
    """Byte limits checked before any parsing or tokenisation, so that a huge payload costs
    nothing but its transfer. Sizes are of the UTF-8 JSON text as received.

    Attributes:
        max_conversation_bytes: one conversation's `messages` JSON.
        max_request_bytes: all conversations of one request together.
    """

    max_conversation_bytes: int = DEFAULT_MAX_CONVERSATION_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def __post_init__(self):
        if self.max_conversation_bytes < 1 or self.max_request_bytes < 1:
            raise ValueError("byte limits must be positive")

    def check_conversation(self, raw: bytes | str, what: str = "messages") -> None:
        """Raises ConversationError when one conversation (its `what` input) is over the limit."""
        size = len(raw)
        if size > self.max_conversation_bytes:
            raise ConversationError(f"{what} is {size} bytes, over the limit of {self.max_conversation_bytes} "
                                    "bytes per conversation")


def parse_messages(raw: bytes | str | list, step_tag: str | None = None) -> list[dict[str, str]]:
    """Parse and validate one conversation: a JSON array of {"role", "content"} messages.

    With `step_tag` (a process reward model's tag text), the response is a list of reasoning
    steps: either the last message's `"steps": ["...", ...]`, joined here with the tag after each
    step (`join_steps`), or its `content` with the tags already in place; either way it must hold
    at least one tag.

    Raises:
        ConversationError: invalid UTF-8, malformed or too deeply nested JSON, not a list, empty,
            a message that is not an object, an unknown role, non-string content, content with a
            NUL character or a lone surrogate, or a last message not from the assistant; with a
            step tag, bad steps or a response without the tag.
    """
    raw = _decoded(raw, "messages")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ConversationError(f"messages is not valid JSON: {err.msg} at line {err.lineno} "
                                    f"column {err.colno}") from None
        except RecursionError:  # "[[[[...": the decoder recurses once per level
            raise ConversationError("messages is nested too deeply: expected an array of "
                                    "{role, content} objects") from None
    if not isinstance(raw, list):
        raise ConversationError(f"messages must be a JSON array of messages, got {type(raw).__name__}")
    if not raw:
        raise ConversationError("messages is empty: at least the assistant response is needed")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ConversationError(f"message {i} must be an object with role and content, "
                                    f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ConversationError(f"message {i} has unknown role {_short(role)}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if step_tag is not None and i == len(raw) - 1 and "steps" in message:
            if content is not None:
                raise ConversationError(f"message {i} has both steps and content: send one of them")
            content = join_steps(message["steps"], step_tag, f"message {i} steps")
        if not isinstance(content, str):
            raise ConversationError(f"message {i} content must be a string, got {type(content).__name__}")
        _check_text(content, f"message {i} content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ConversationError(f"the last message (message {len(messages) - 1}) must be the assistant "
                                f"response being scored, got role {messages[-1]['role']!r}")
    tagged = next((i for i, m in enumerate(messages[:-1]) if step_tag is not None and step_tag in m["content"]), None)
    if tagged is not None:
        raise ConversationError(f"message {tagged} holds the step tag {step_tag!r}: only the response (the last "
                                "message) is made of tagged steps")
    if step_tag is not None and step_tag not in messages[-1]["content"]:
        raise ConversationError(f"the response (message {len(messages) - 1}) has no step tag {step_tag!r}: "
                                "send its steps as \"steps\": [...] or end each step with the tag")
    return messages


def join_steps(steps: Any, tag: str, what: str = "steps") -> str:
    """A process reward model's response text: every step followed by the step tag (Qwen2.5-Math-PRM:
    "step 1<extra_0>step 2<extra_0>"). Steps are taken as given, whitespace included.

    Raises:
        ConversationError: not a non-empty list of non-empty strings, or a step containing the tag.
    """
    if not isinstance(steps, list) or not steps:
        raise ConversationError(f"{what} must be a non-empty array of strings")
    for j, step in enumerate(steps):
        if not isinstance(step, str) or not step:
            raise ConversationError(f"{what}[{j}] must be a non-empty string, got {_short(step)}")
        _check_text(step, f"{what}[{j}]")
        if tag in step:
            raise ConversationError(f"{what}[{j}] contains the step tag {tag!r}: it would count as two steps")
    return "".join(step + tag for step in steps)


def check_text(raw: bytes | str) -> str:
    """Decode and validate one pre-templated text (the `text` entry point).

    Raises:
        ConversationError: invalid UTF-8, empty, a NUL character or a lone surrogate.
    """
    raw = _decoded(raw, "text")
    if not isinstance(raw, str):
        raise ConversationError(f"text must be a string, got {type(raw).__name__}")
    if not raw:
        raise ConversationError("text is empty")
    _check_text(raw, "text")
    return raw


def _decoded(raw: Any, what: str) -> Any:
    """`raw` decoded from UTF-8 when it is bytes (as Triton hands BYTES inputs over); else as given."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConversationError(f"{what} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return raw


def _short(value: Any, limit: int = 40) -> str:
    """repr() of a caller's value, cut so that an error message never echoes a huge payload."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def _check_text(text: str, what: str) -> None:
    # JSON escapes can smuggle in what UTF-8 bytes cannot: \u0000 and lone surrogates (\ud800);
    # the tokenizer cannot encode the latter (it would fail the whole batch).
    if "\0" in text:
        raise ConversationError(f"{what} contains a NUL character (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConversationError(f"{what} contains a lone surrogate ({text[err.start]!r} at character "
                                f"{err.start}), which is not Unicode text") from None


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
            max_length: token limit; defaults to the model's max_position_embeddings (or its
                sliding window when every layer has one: `sliding_window`), at most 32,768 (4,096
                when the config does not say).
            truncation: "reject" or "truncate_left".
            chat_template: Jinja template overriding the checkpoint's.
            step_tag: a process reward model's step tag, a token or its id (`heads.resolve_step_tag`):
                every conversation must then hold tagged steps in its response (`parse_messages`).
        """
        from transformers import AutoTokenizer

        from reward_server.heads import resolve_step_tag

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
            return ConversationError(f"the chat template rejected this conversation: {_short(str(err), 200)}")

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


def sliding_window(config: dict) -> int | None:
    """The attention window every layer of a model applies (Mistral's `sliding_window`; Qwen2/3's
    only with `use_sliding_window`), from its config.json contents, or None.

    The packed engine applies no window, so it scores exactly only conversations within it.
    """
    text = config.get("text_config", config)
    window = text.get("sliding_window")
    if window is None or text.get("use_sliding_window") is False:
        return None
    return int(window)


def _max_positions(checkpoint: str | Path) -> int | None:
    """The longest conversation the model scores as trained: its positions, at most its window."""
    config_path = Path(checkpoint) / "config.json"
    if not config_path.exists():
        return None
    config = json.loads(config_path.read_text())
    positions = config.get("text_config", config).get("max_position_embeddings")
    window = sliding_window(config)
    return window if window is not None and (positions is None or window < positions) else positions
