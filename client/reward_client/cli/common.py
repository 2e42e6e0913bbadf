"""Options and helpers shared by the ``reward-client`` subcommands."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

from reward_client._base import DEFAULT_URL
from reward_client.conversations import Message, to_messages
from reward_client.retry import RetryPolicy
from reward_client.sync_client import RewardClient
from reward_client.tls import TlsConfig

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def connection_options() -> argparse.ArgumentParser:
    """Return a parent parser with the options every subcommand takes."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--url", default=DEFAULT_URL,
                       help="gRPC host:port (default %(default)s); several replicas: a,b or dns:///name:port")
    group.add_argument("--timeout", type=float, default=60.0,
                       help="deadline of each request attempt in seconds (default %(default)s)")
    group.add_argument("--retries", type=int, default=10,
                       help="attempts per request on overload/unavailability (default %(default)s)")
    group.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    tls = parent.add_argument_group("TLS (gRPC)")
    tls.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
    tls.add_argument("--tls-ca", help="CA certificate (PEM) that signs the server's certificate; implies --tls")
    tls.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS; implies --tls")
    tls.add_argument("--tls-key", help="key (PEM) of --tls-cert")
    return parent


def tls_config(args: argparse.Namespace) -> Optional[TlsConfig]:
    """Return the TLS settings of the parsed options, or None for plaintext.

    Raises:
        ValueError: if only one of ``--tls-cert`` and ``--tls-key`` is given, or a file does not exist.
    """
    ca, cert, key = getattr(args, "tls_ca", None), getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if not (getattr(args, "tls", False) or ca or cert or key):
        return None
    return TlsConfig(root_certificates=ca, certificate_chain=cert, private_key=key)


def scoring_options() -> argparse.ArgumentParser:
    """Return a parent parser with the batching options of ``score`` and ``eval``."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("batching")
    group.add_argument("--batch-size", type=int, default=64,
                       help="conversations per request (default %(default)s)")
    group.add_argument("--concurrency", type=int, default=4,
                       help="requests in flight (default %(default)s)")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parent


def make_client(args: argparse.Namespace) -> RewardClient:
    """Return a client configured from the parsed options.

    Raises:
        ValueError: if a batching option is out of range, or the TLS options are incomplete.
    """
    return RewardClient(args.url, batch_size=getattr(args, "batch_size", 64),
                        max_in_flight=getattr(args, "concurrency", 4), timeout_s=args.timeout,
                        retry=RetryPolicy(max_attempts=max(1, args.retries)), tls=tls_config(args))


def record_messages(record: Any, index: int) -> List[Message]:
    """Return the conversation of one JSONL record (a messages list or an object).

    Raises:
        RewardInvalidInputError: if the record holds no conversation.
    """
    return to_messages(record, index)


def output_record(record: Any, result: Dict[str, Any], key: str) -> Dict[str, Any]:
    """Return the record with ``result`` added under ``key`` (a bare list becomes ``messages``)."""
    base = dict(record) if isinstance(record, dict) else {"messages": record}
    base[key] = result
    return base


def progress_bar(total: int, initial: int, disabled: bool, unit: str = "conv") -> Any:
    """Return a tqdm bar on stderr with rate and ETA (a no-op bar when ``disabled``)."""
    from tqdm import tqdm  # local: only the CLI needs it

    return tqdm(total=total, initial=initial, unit=unit, disable=disabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def say(text: str) -> None:
    """Write one line of command output to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def warn(text: str) -> None:
    """Write one line of diagnostics to stderr."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
