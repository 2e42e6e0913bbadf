"""Liveness probe that really scores: ``python -m reward_server.probe --url 127.0.0.1:8001``.

Triton keeps answering ``/v2/health/live`` and ``/v2/health/ready`` with 200 when a Python
backend stub has died, while every inference fails (issue 10). A Kubernetes liveness probe on
those endpoints would therefore never restart such a pod. This probe sends one tiny
conversation through the ``reward`` ensemble over gRPC, with a deadline, and succeeds only when
a finite score comes back, so a broken engine turns into a container restart.

A request rejected because the server's queue is full counts as alive: the scheduler answered,
and a loaded server must not be killed for being busy (readiness and the autoscaler deal with
load). Exit status 0 means alive, 1 means not; one line on stdout says why.

A process reward model's server rejects a response without step tags: the probe then sends the
same response as one step. Against a TLS server, `--tls-ca` (and, for mutual TLS, `--tls-cert`
and `--tls-key`) make the probe speak TLS.

Imports only tritonclient and numpy (no torch), so a probe costs well under a second of CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

MODEL = "reward"
# Short enough to cost a few dozen tokens, valid for any chat template (user then assistant).
PROBE_CONVERSATION = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
# The same for a process reward model (the server joins the steps with its step tag).
PROBE_STEPS = [{"role": "user", "content": "ping"}, {"role": "assistant", "steps": ["pong"]}]
# Messages with which Triton rejects work because its queue is full: the server is alive.
_BUSY_MARKERS = ("exceeds maximum queue size",)


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe.

    Attributes:
        alive: whether the server scored (or was merely too busy to queue the request).
        reason: one line for the probe log: the score and latency, or what failed.
    """

    alive: bool
    reason: str


def probe(url: str, timeout_s: float = 5.0, model: str = MODEL, tls: Optional[dict] = None) -> ProbeResult:
    """Score one tiny conversation through ``model`` at ``url`` and judge the server by it.

    Args:
        url: gRPC ``host:port`` of the server.
        timeout_s: deadline of the request (and of connecting) in seconds.
        model: the messages ensemble to score through.
        tls: tritonclient's TLS arguments (``ssl``, ``root_certificates``, ``private_key``,
            ``certificate_chain``), or None for plaintext.

    Returns:
        A :class:`ProbeResult`; never raises for a server failure.
    """
    import tritonclient.grpc as grpcclient  # deferred: `--help` stays instant
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    client = grpcclient.InferenceServerClient(url, **(tls or {}))

    def send(conversation: list) -> object:
        data = np.array([[json.dumps(conversation).encode()]], dtype=np.object_)
        messages = grpcclient.InferInput("messages", list(data.shape), "BYTES")
        messages.set_data_from_numpy(data)
        return client.infer(model, [messages], outputs=[grpcclient.InferRequestedOutput("score")],
                            client_timeout=max(0.1, timeout_s - (time.monotonic() - started)))

    try:
        try:
            response = send(PROBE_CONVERSATION)
        except InferenceServerException as exc:
            if "step tag" not in str(exc.message() or exc):
                raise
            response = send(PROBE_STEPS)  # a process reward model
    except InferenceServerException as exc:
        message = " ".join(str(exc.message() or exc).split())
        if any(marker in message.lower() for marker in _BUSY_MARKERS):
            return ProbeResult(True, f"busy (queue full) at {url}: {message}")
        return ProbeResult(False, f"{url}: {exc.status() or 'error'}: {message}")
    finally:
        client.close()
    score = _first_score(response.as_numpy("score"))
    elapsed = time.monotonic() - started
    if score is None or not math.isfinite(score):
        return ProbeResult(False, f"{url}: {model} returned no finite score ({score}) in {elapsed:.2f}s")
    return ProbeResult(True, f"{url}: score {score:.4f} in {elapsed:.2f}s")


def _first_score(array: Optional[np.ndarray]) -> Optional[float]:
    if array is None or array.size == 0:
        return None
    return float(array.reshape(-1)[0])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one probe; return the exit status (0 alive, 1 not).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when the server scored a conversation (or is only busy), 1 otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m reward_server.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port (default 127.0.0.1:8001)")
    parser.add_argument("--timeout", type=float, default=5.0, help="request deadline in seconds (default 5)")
    parser.add_argument("--model", default=MODEL, help="ensemble to score through (default reward)")
    parser.add_argument("--tls-ca", help="TLS: the CA certificate (PEM) that signed the server's certificate")
    parser.add_argument("--tls-cert", help="mutual TLS: this probe's client certificate (PEM)")
    parser.add_argument("--tls-key", help="mutual TLS: the client certificate's key (PEM)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = {"ssl": True, "root_certificates": args.tls_ca, "private_key": args.tls_key,
               "certificate_chain": args.tls_cert}
    result = probe(args.url, args.timeout, args.model, tls)
    # The probe's output is what kubelet records in the pod's events: one line, on stdout.
    sys.stdout.write(("ok " if result.alive else "FAIL ") + result.reason + "\n")
    return 0 if result.alive else 1


if __name__ == "__main__":
    sys.exit(main())
