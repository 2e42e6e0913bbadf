"""A reward function for TRL's trainers (GRPO, RLOO, online DPO) that scores with the reward server.

TRL calls reward functions in-process as ``f(prompts, completions, **kwargs) -> list[float]``;
there is no wire protocol to meet, so the drop-in is this callable around the client SDK::

    from reward_client.trl import RewardServerFunction
    trainer = GRPOTrainer(model=..., reward_funcs=[RewardServerFunction("rm-host:8001")], ...)

Both of TRL's dataset formats are understood: *standard* (``prompts`` and ``completions`` are
strings: the prompt becomes one user message, the completion the assistant response) and
*conversational* (lists of messages: the completion's messages follow the prompt's). The server
applies its chat template, so scores equal the SDK's and the gateway's.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Union

from reward_client.conversations import Message, prompt_messages
from reward_client.sync_client import RewardClient

Turns = Union[str, Sequence[Mapping[str, Any]]]


def trl_conversation(prompt: Turns, completion: Turns) -> List[Message]:
    """The conversation TRL's (prompt, completion) stands for, the completion's turns last.

    Raises:
        TypeError: if either is neither a string nor a list of messages.
    """
    if isinstance(completion, str):
        return prompt_messages(prompt) + [{"role": "assistant", "content": completion}]
    return prompt_messages(prompt) + prompt_messages(completion)


class RewardServerFunction:
    """A TRL reward function backed by a reward server (one gRPC call per batch of completions).

    Args:
        url: the server's gRPC ``host:port`` (several replicas: comma-separated).
        client: an existing :class:`RewardClient` to use instead of making one.
        name: the name TRL logs the reward under (``rewards/<name>``).
        **client_options: passed to :class:`RewardClient` (batch_size, timeout_s, tls, ...).
    """

    def __init__(self, url: str = "localhost:8001", *, client: Optional[RewardClient] = None,
                 name: str = "reward_server", **client_options: Any) -> None:
        self.client = client or RewardClient(url, **client_options)
        self.__name__ = name  # TRL names each reward function's log entry after its __name__

    def __call__(self, prompts: Sequence[Turns], completions: Sequence[Turns], **kwargs: Any) -> List[float]:
        """One reward per completion, in order.

        Raises:
            ValueError: if prompts and completions differ in length.
            reward_client.RewardClientError: what the client raises (bad input, server unavailable).
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        conversations = [trl_conversation(p, c) for p, c in zip(prompts, completions)]
        return [result.score for result in self.client.score(conversations)]

    def close(self) -> None:
        """Close the client's connection."""
        self.client.close()
