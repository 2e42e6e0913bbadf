"""``reward-client health`` and ``reward-client models``: one line each."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

from reward_client.cli.common import EXIT_FAILED, EXIT_OK, make_client, say, warn
from reward_client.errors import RewardClientError


def add_parsers(subparsers: Any, parents: List[argparse.ArgumentParser]) -> None:
    """Register the ``health`` and ``models`` subcommands."""
    health = subparsers.add_parser("health", parents=parents,
                                   help="server and model readiness (exit 1 when not ready)")
    health.add_argument("--json", action="store_true", help="print JSON")
    health.set_defaults(handler=run_health)
    models = subparsers.add_parser("models", parents=parents,
                                   help="models in the repository, one line each")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(handler=run_models)


def run_health(args: argparse.Namespace) -> int:
    """Run ``health``; return 0 when the server and the reward model are ready."""
    with make_client(args) as client:
        status = client.health()
    ok = all(status.values())
    if args.json:
        say(json.dumps({"url": args.url, "ok": ok, **status}, sort_keys=True))
    else:
        flags = " ".join(f"{key}={'yes' if value else 'no'}" for key, value in status.items())
        say(f"{'OK' if ok else 'NOT READY'} {args.url} {flags}")
    return EXIT_OK if ok else EXIT_FAILED


def _tensor(spec: Dict[str, Any]) -> str:
    return f"{spec.get('name')}:{spec.get('datatype')}[{','.join(spec.get('shape', []))}]"


def run_models(args: argparse.Namespace) -> int:
    """Run ``models``; print one line per model (name, version, state, inputs -> outputs)."""
    try:
        with make_client(args) as client:
            models = client.models()
    except RewardClientError as exc:
        warn(f"error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    for model in models:
        if args.json:
            say(json.dumps(model, sort_keys=True))
            continue
        line = f"{model.get('name')} v{model.get('version', '-')} {model.get('state', '?')}"
        if "inputs" in model:
            line += (f" in=[{' '.join(_tensor(t) for t in model['inputs'])}]"
                     f" out=[{' '.join(_tensor(t) for t in model['outputs'])}]")
        elif model.get("reason"):
            line += f" ({model['reason']})"
        say(line)
    return EXIT_OK
