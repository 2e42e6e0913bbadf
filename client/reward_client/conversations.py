"""Turn the conversation shapes callers hold into the wire form the server expects.

A conversation is accepted as:

- a list of OpenAI-style messages ``[{"role": ..., "content": ...}, ...]`` whose last message is
  the assistant response being scored;
- a ``(prompt, response)`` pair, where ``prompt`` is a user string or a list of earlier messages;
- a mapping with ``"messages"``, or with ``"prompt"`` and ``"response"`` (the JSONL line forms).

For a process reward model a response may be its list of reasoning steps instead of one string
(``(prompt, ["step 1", "step 2"])``, or a last message ``{"role": "assistant", "steps": [...]}``):
the server joins them with the model's step tag and scores each step.

Only the shape is checked here; what the server accepts (roles, turn order, length) is decided
by the server, which names the offending conversation in its error.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from reward_client.errors import RewardInvalidInputError

Message = Dict[str, Any]
Response = Union[str, Sequence[str]]  # one text, or a process reward model's steps
ConversationLike = Union[Sequence[Mapping[str, Any]], Tuple[Any, Response], Mapping[str, Any]]


def prompt_messages(prompt: Union[str, Sequence[Mapping[str, Any]]]) -> List[Message]:
    """Return ``prompt`` as a list of messages (a string becomes one user message).

    Raises:
        TypeError: if ``prompt`` is neither a string nor a list of messages.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)):
        return [dict(message) for message in prompt]
    raise TypeError(f"prompt must be a string or a list of messages, not {type(prompt).__name__}")


def with_response(prompt: Union[str, Sequence[Mapping[str, Any]]], response: Response) -> List[Message]:
    """Return the conversation ``prompt`` followed by the assistant ``response`` (a text, or a list
    of steps for a process reward model).

    Raises:
        TypeError: if ``prompt`` is neither a string nor a list of messages.
    """
    if isinstance(response, str):
        return prompt_messages(prompt) + [{"role": "assistant", "content": response}]
    return prompt_messages(prompt) + [{"role": "assistant", "steps": list(response)}]


def _is_response(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(step, str) for step in value))


def to_messages(conversation: ConversationLike, index: int) -> List[Message]:
    """Normalise one conversation to a list of ``{"role", "content"}`` messages.

    Args:
        conversation: any of the accepted shapes (see the module docstring).
        index: its position in the caller's input, named in the error.

    Raises:
        RewardInvalidInputError: if the shape is not one of the accepted ones.
    """
    try:
        if isinstance(conversation, Mapping):
            if "messages" in conversation:
                messages = prompt_messages(conversation["messages"])
            elif "prompt" in conversation and "response" in conversation:
                messages = with_response(conversation["prompt"], conversation["response"])
            else:
                raise TypeError("a mapping needs 'messages', or 'prompt' and 'response'")
        elif isinstance(conversation, tuple) and len(conversation) == 2 and _is_response(conversation[1]):
            messages = with_response(conversation[0], conversation[1])
        elif isinstance(conversation, (list, tuple)):
            messages = prompt_messages(list(conversation))
        else:
            raise TypeError(f"unsupported conversation type {type(conversation).__name__}")
    except (TypeError, ValueError) as exc:
        raise RewardInvalidInputError(str(exc), index) from exc
    _check_messages(messages, index)
    return messages


def _check_messages(messages: List[Message], index: int) -> None:
    if not messages:
        raise RewardInvalidInputError("empty conversation", index)
    for message in messages:
        if not isinstance(message.get("role"), str) or not (isinstance(message.get("content"), str) or (
                message is messages[-1] and "content" not in message and isinstance(message.get("steps"), list))):
            raise RewardInvalidInputError(
                "every message needs string 'role' and 'content' fields (the response may have 'steps', "
                "a list of strings, instead)", index)


def encode(messages: List[Message]) -> bytes:
    """Return the UTF-8 JSON bytes of one conversation, as one element of the ``messages`` input."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
