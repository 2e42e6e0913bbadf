"""`reward-server`: serve a reward checkpoint on Triton, build a TensorRT-LLM engine from one, or
write the demo checkpoint."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from reward_server import demo_checkpoint
from reward_server.chat import TRUNCATION_POLICIES
from reward_server.engines import ENGINES
from reward_server.heads import HEAD_TYPES
from reward_server.launcher import ServeOptions, ServerStartError, TlsOptions, TritonServer
from reward_server.trtllm.builder import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_NUM_TOKENS, DTYPES

_LOGGER = logging.getLogger("reward_server")

EXAMPLE = """\
reward server ready: {checkpoint}
  gRPC     {grpc}
  HTTP     http://{http}
  metrics  {metrics}
Score a conversation:
  curl -s http://{http}/v2/models/reward/infer -d '{{"inputs": [{{"name": "messages", "shape": [1, 1], \
"datatype": "BYTES", "data": ["[{{\\"role\\": \\"user\\", \\"content\\": \\"Hi!\\"}}, \
{{\\"role\\": \\"assistant\\", \\"content\\": \\"Hello, how can I help?\\"}}]"]}}]}}'
Ctrl-C stops the server after in-flight requests finish.
"""


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint (default: the demo checkpoint) until Ctrl-C")
    p.add_argument("--checkpoint", type=Path, help="local Hugging Face reward checkpoint directory")
    p.add_argument("--demo-size", choices=sorted(demo_checkpoint.SIZES), default="small",
                   help="demo checkpoint size when --checkpoint is not given (default: small)")
    p.add_argument("--engine", choices=sorted(ENGINES), default="torch",
                   help="torch (default; CPU fp32 or CUDA bf16) or tensorrt_llm (GPU; needs --engine-dir)")
    p.add_argument("--engine-dir", type=Path, help="tensorrt_llm: a directory written by `reward-server build-engine`")
    p.add_argument("--world-size", type=int,
                   help="tensorrt_llm: MPI ranks, one GPU each (default: the engine's tp x pp); above 1 runs mpirun")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--instances", type=int, default=1, help="engine instances (torch threads split between them)")
    p.add_argument("--max-length", type=int, help="token limit per conversation (default: min(4096, model's))")
    p.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="reject",
                   help="over-long conversations: reject (default) or truncate_left keeping the response")
    p.add_argument("--chat-template", type=Path, help="file with a Jinja chat template overriding the checkpoint's")
    p.add_argument("--head-type", choices=HEAD_TYPES, default="auto")
    p.add_argument("--reward-indices", help="lm_logits heads: vocabulary indices read as rewards, e.g. 0 or 0,1,2")
    p.add_argument("--attribute-names", help="comma-separated names of the K raw outputs")
    p.add_argument("--attribute-weights", help="comma-separated weights: score = sum(w_k * attribute_k)")
    p.add_argument("--score-mean", type=float, default=0.0, help="score = (raw - mean) / std")
    p.add_argument("--score-std", type=float, default=1.0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="torch engine: auto = bf16 on CUDA, and on CPUs with bf16 instructions for a bf16 "
                        "checkpoint; else fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch engine: compile the decoder layers at load (fused element-wise kernels; first start "
                        "pays the compile time, later starts reuse the on-disk cache)")
    p.add_argument("--threads", type=int, help="torch threads per engine instance (default: cores / instances)")
    p.add_argument("--token-budget", type=int, help="tokens per packed engine row, one forward pass (default 4096)")
    p.add_argument("--min-shared-prefix", type=int,
                   help="shortest shared token prefix computed once per group (default 32; 0 disables)")
    p.add_argument("--max-queue-size", type=int, help="engine queue limit; beyond it requests get UNAVAILABLE")
    p.add_argument("--queue-timeout-ms", type=int,
                   help="requests waiting longer than this in the engine queue get UNAVAILABLE (default: no limit)")
    p.add_argument("--max-conversation-bytes", type=int, help="byte limit of one conversation's JSON, checked "
                                                              "before parsing (default 1 MiB)")
    p.add_argument("--max-request-bytes", type=int, help="byte limit of one request's conversations (default 64 MiB)")
    p.add_argument("--exit-timeout", type=int, default=30,
                   help="seconds a stop waits for in-flight requests before ending them (default 30)")
    p.add_argument("--no-watchdog", action="store_true",
                   help="do not restart tritonserver when it or a Python-backend stub dies (docs/reliability.md)")
    p.add_argument("--tls-cert", type=Path, help="gRPC over TLS: the server's certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, help="gRPC over TLS: the server's private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="gRPC over TLS: CA certificate(s) that sign client certificates")
    p.add_argument("--tls-mutual", action="store_true", help="require a client certificate signed by --tls-ca")
    p.add_argument("--log-verbose", type=int, default=0)


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    if not (args.tls_cert or args.tls_key or args.tls_ca or args.tls_mutual):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return TlsOptions(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, mutual=args.tls_mutual)


def _options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        checkpoint=args.checkpoint, demo_size=args.demo_size, engine=args.engine, engine_dir=args.engine_dir,
        world_size=args.world_size, host=args.host,
        grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
        instances=args.instances, max_length=args.max_length, truncation=args.truncation,
        chat_template=args.chat_template.read_text() if args.chat_template else None,
        head_type=args.head_type, reward_indices=args.reward_indices, attribute_names=args.attribute_names,
        attribute_weights=args.attribute_weights, score_mean=args.score_mean, score_std=args.score_std,
        device=args.device, dtype=args.dtype, compile=args.compile, torch_threads=args.threads,
        token_budget=args.token_budget, min_shared_prefix=args.min_shared_prefix, max_queue_size=args.max_queue_size,
        queue_timeout_us=args.queue_timeout_ms * 1000 if args.queue_timeout_ms else None,
        max_conversation_bytes=args.max_conversation_bytes, max_request_bytes=args.max_request_bytes,
        exit_timeout_s=args.exit_timeout, tls=_tls(args), watchdog=not args.no_watchdog, log_to_console=True,
        log_verbose=args.log_verbose)


def serve(args: argparse.Namespace) -> int:
    """Start the server, print the endpoints, and stop gracefully on SIGINT/SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server = TritonServer(_options(args))
        server.start()
    except (ServerStartError, FileNotFoundError, ValueError, RuntimeError) as err:
        _LOGGER.error("%s", err)
        return 1
    print(EXAMPLE.format(checkpoint=server.checkpoint, grpc=server.grpc_url, http=server.http_url,
                         metrics=server.metrics_url), flush=True)
    while not stop.wait(0.5):
        code = server.exit_code()  # with the watchdog, only once it gave up restarting
        if code is not None:
            _LOGGER.error("tritonserver exited unexpectedly with code %s", code)
            server.stop()
            return code or 1
    _LOGGER.info("stopping: waiting for in-flight requests")
    code = server.stop()
    return 0 if code in (0, -signal.SIGTERM) else code


def _build_engine_parser(sub) -> None:
    p = sub.add_parser("build-engine", help="build a TensorRT-LLM engine directory from a Hugging Face reward "
                                            "checkpoint (GPU host; --dry-run anywhere)")
    p.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face reward checkpoint directory")
    p.add_argument("--output", type=Path, required=True, help="engine directory to write (serve it with --engine-dir)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--max-input-len", type=int, help="longest conversation in tokens (default: min(4096, model's))")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"sequences in flight at once (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--max-num-tokens", type=int, default=DEFAULT_MAX_NUM_TOKENS,
                   help=f"tokens per engine step; longer prompts run in chunks (default {DEFAULT_MAX_NUM_TOKENS})")
    p.add_argument("--head-type", choices=HEAD_TYPES, default="auto")
    p.add_argument("--reward-indices", help="causal-LM reward models: logits read as rewards, e.g. 0 or 0,1,2")
    p.add_argument("--calib-dataset", type=Path, help="fp8: local calibration dataset")
    p.add_argument("--force", action="store_true", help="rebuild over an existing engine")
    p.add_argument("--dry-run", action="store_true", help="check the inputs, print every step and command, run nothing")


def build_engine(args: argparse.Namespace) -> int:
    """Plan (and unless --dry-run, run) a TensorRT-LLM engine build."""
    from reward_server.trtllm.builder import BuildOptions, check_toolchain, plan_build, run_build

    options = BuildOptions(checkpoint=args.checkpoint, output=args.output, tp=args.tp, pp=args.pp, dtype=args.dtype,
                           max_input_len=args.max_input_len, max_batch_size=args.max_batch_size,
                           max_num_tokens=args.max_num_tokens, head_type=args.head_type,
                           reward_indices=args.reward_indices, calib_dataset=args.calib_dataset, force=args.force)
    try:
        plan = plan_build(options)
        print(plan.render(), flush=True)
        if args.dry_run:
            return 0
        check_toolchain()
        engine_dir = run_build(plan)
    except (FileNotFoundError, ValueError) as err:
        _LOGGER.error("%s", err)
        return 1
    except subprocess.CalledProcessError as err:
        _LOGGER.error("step failed (exit code %s): %s", err.returncode, shlex.join(err.cmd))
        return 1
    print(f"engine ready: reward-server serve --engine tensorrt_llm --engine-dir {engine_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `reward-server` command."""
    parser = argparse.ArgumentParser(prog="reward-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _build_engine_parser(sub)
    demo = sub.add_parser("demo-checkpoint", help="write a random-weight Llama reward checkpoint")
    demo_checkpoint.add_arguments(demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "build-engine":
        sys.exit(build_engine(args))
    if args.command == "demo-checkpoint":
        path = demo_checkpoint.run(args)
        print(path)
        sys.exit(0)
    sys.exit(serve(args))


if __name__ == "__main__":
    main()
