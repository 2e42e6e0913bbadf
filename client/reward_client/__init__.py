"""Client SDK for the Triton reward server.

Installs and imports without torch, transformers or tritonserver: tritonclient[grpc], numpy.

    from reward_client import RewardClient
    with RewardClient("localhost:8001") as client:
        results = client.score([("What is 2+2?", "4")])
        print(results[0].score, results[0].attributes)
"""

from reward_client.async_client import AsyncRewardClient
from reward_client.errors import (RewardClientError, RewardInvalidInputError, RewardServerError,
                                  RewardTimeoutError, RewardUnavailableError)
from reward_client.results import RankedResponse, ScoreResult, bradley_terry
from reward_client.retry import RetryPolicy
from reward_client.sync_client import RewardClient
from reward_client.tls import TlsConfig

__all__ = [
    "AsyncRewardClient",
    "RankedResponse",
    "RetryPolicy",
    "RewardClient",
    "RewardClientError",
    "RewardInvalidInputError",
    "RewardServerError",
    "RewardTimeoutError",
    "RewardUnavailableError",
    "ScoreResult",
    "TlsConfig",
    "bradley_terry",
]
__version__ = "0.1.0"
