"""What a client sends, checked before anything is tokenised: byte limits, the messages of one
conversation (roles, text, a process reward model's steps), pre-templated text. Each error names
the field and the limit, so the conversation it belongs to fails alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
# Generous for max_length 32768 (a token is rarely over 16 bytes), and bounded for the server:
DEFAULT_MAX_CONVERSATION_BYTES = 1 << 20      # 1 MiB per conversation
DEFAULT_MAX_REQUEST_BYTES = 64 << 20          # 64 MiB per request (256 conversations of 256 KiB)


class ConversationError(ValueError):
    """One conversation is invalid; `str(err)` says what and where, without the index."""


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
            raise ConversationError(f"message {i} has unknown role {shorten(role)}; expected one of {', '.join(ROLES)}")
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
            raise ConversationError(f"{what}[{j}] must be a non-empty string, got {shorten(step)}")
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


def shorten(value: Any, limit: int = 40) -> str:
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
