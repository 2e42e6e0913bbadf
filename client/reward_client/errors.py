"""Exceptions raised by the reward client: one class per failure a caller can act on.

    RewardClientError
    ├── RewardUnavailableError   server down, not ready, or overloaded (retries exhausted)
    ├── RewardTimeoutError       a request deadline passed
    ├── RewardInvalidInputError  a conversation was rejected; ``.index`` names it
    └── RewardServerError        any other server-side failure
"""

from __future__ import annotations

from typing import Optional


class RewardClientError(Exception):
    """Base class of every error the reward client raises."""


class RewardUnavailableError(RewardClientError):
    """The server or model is unreachable, not ready, or rejected work as overloaded."""


class RewardTimeoutError(RewardClientError):
    """A request did not complete before its deadline."""


class RewardInvalidInputError(RewardClientError, ValueError):
    """A conversation was rejected as invalid; ``index`` is its position in the caller's input.

    Attributes:
        index: 0-based position of the offending conversation in the whole input given to the
            client call (not within one request), or None when the server did not say.
        reason: the server's (or the client's) explanation.
    """

    def __init__(self, reason: str, index: Optional[int] = None) -> None:
        self.index = index
        self.reason = reason
        where = f"conversation {index}: " if index is not None else ""
        super().__init__(f"{where}{reason}")


class RewardServerError(RewardClientError):
    """The server failed for a reason other than bad input, overload or a deadline."""
