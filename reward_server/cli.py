"""`reward-server`: serve a reward checkpoint on Triton, put the HTTP gateway in front of a server,
build a TensorRT-LLM engine from one, or write the demo checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from reward_server.builder.build import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_NUM_TOKENS, DTYPES
from reward_server.builder.calibration import HELP as CALIB_HELP
from reward_server.pipeline.chat import TRUNCATION_POLICIES
from reward_server.pipeline.heads import DEFAULT_STEP_TAG, HEAD_TYPES
from reward_server.pipeline.scoring import AGGREGATES, DEFAULT_AGGREGATE
from reward_server.supervisor import demo_checkpoint
from reward_server.supervisor.engines import ENGINES
from reward_server.supervisor.options import ServeOptions, TlsOptions
from reward_server.supervisor.server import TritonServer
from reward_server.supervisor.tritonserver import ServerStartError

_LOGGER = logging.getLogger("reward_server")

EXAMPLE = """\
reward server ready: {checkpoint}
  gRPC     {grpc}
  HTTP     http://{http}
  metrics  {metrics}
Score a conversation:
  curl -s http://{http}/v2/models/reward/infer -d '{{"inputs": [{{"name": "messages", "shape": [1, 1], \
"datatype": "BYTES", "data": ["[{{\\"role\\": \\"user\\", \\"content\\": \\"Hi!\\"}}, \
{{\\"role\\": \\"assistant\\", {response}}}]"]}}]}}'
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
    p.add_argument("--max-length", type=int, help="token limit per conversation (default: the model's context, at most 32768)")
    p.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="reject",
                   help="over-long conversations: reject (default) or truncate_left keeping the response")
    p.add_argument("--chat-template", type=Path, help="file with a Jinja chat template overriding the checkpoint's")
    p.add_argument("--head-type", choices=HEAD_TYPES, default="auto")
    p.add_argument("--reward-indices", help="lm_logits heads: vocabulary indices read as rewards, e.g. 0 or 0,1,2")
    _step_arguments(p)
    p.add_argument("--step-aggregate", choices=AGGREGATES, default=DEFAULT_AGGREGATE,
                   help="process reward models: the score from the step scores (default %(default)s)")
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
    p.add_argument("--attention", choices=["auto", "native", "sdpa"], default="auto",
                   help="torch engine: native = this project's CPU kernel (batch-invariant, skips masked blocks; "
                        "built for this CPU by make setup), sdpa = torch's; auto = native where it runs (CPU), "
                        "else sdpa")
    p.add_argument("--threads", type=int, help="torch threads per engine instance (default: cores / instances)")
    p.add_argument("--token-budget", type=int, help="tokens per packed engine row, one forward pass (default 4096)")
    p.add_argument("--min-shared-prefix", type=int,
                   help="shortest shared token prefix computed once per group (default 32; 0 disables)")
    p.add_argument("--prefix-cache-mb", type=float,
                   help="torch engine: memory for keys and values of sequences scored before, reused by later "
                        "requests that continue them (default: 10%% of the memory available at start, at most "
                        "2048; 0 turns it off)")
    p.add_argument("--max-queue-seconds", type=float,
                   help="torch engine: admit requests while the queued work takes at most this long at the measured "
                        "rate; beyond it they get UNAVAILABLE, which clients retry (default 2)")
    p.add_argument("--max-queue-size", type=int, help="engine queue limit in requests; beyond it requests get "
                                                      "UNAVAILABLE (default: only --max-queue-seconds)")
    p.add_argument("--queue-timeout-ms", type=int,
                   help="requests waiting longer than this in the engine queue get UNAVAILABLE (torch engine "
                        "default: five times --max-queue-seconds; 0: no limit)")
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
    p.add_argument("--gateway-port", type=int,
                   help="also start the HTTP gateway (OpenRLHF, vLLM, SGLang, NIM, TEI protocols) on this port")
    p.add_argument("--log-verbose", type=int, default=0)


def _gateway_parser(sub) -> None:
    from reward_server.gateway.options import DEFAULT_PORT, GatewayOptions

    d = GatewayOptions()
    p = sub.add_parser("gateway", help="serve the HTTP protocols trainers use (OpenRLHF /get_reward, vLLM /classify "
                                       "and /pooling, SGLang /v1/embeddings, NIM /v1/chat/completions, TEI /predict) "
                                       "in front of a reward server")
    p.add_argument("--url", default=d.url, help=f"the reward server's gRPC host:port (default {d.url}); several "
                                                "replicas: comma-separated, or dns:///name:port")
    p.add_argument("--host", default=d.host, help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest request body; larger ones get 413 (default 64 MiB)")
    p.add_argument("--max-inputs", type=int, default=d.max_items,
                   help=f"most conversations in one HTTP request (default {d.max_items})")
    p.add_argument("--batch-delay-ms", type=float, default=d.batch_delay_ms,
                   help=f"how long a request waits for concurrent ones to share a gRPC request (default "
                        f"{d.batch_delay_ms})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="conversations per gRPC request")
    p.add_argument("--timeout", type=float, default=d.timeout_s,
                   help="seconds an HTTP request may take, its gRPC requests and retries included (a caller's "
                        "X-Request-Timeout can only shorten it)")
    p.add_argument("--model-name", default=d.model_name, help="model name in answers when a request names none")
    p.add_argument("--tls-ca", help="the server speaks gRPC over TLS: its CA certificate (PEM)")
    p.add_argument("--tls-cert", help="mutual TLS: the gateway's client certificate (PEM)")
    p.add_argument("--tls-key", help="mutual TLS: the gateway's client key (PEM)")
    # The key comes from the environment, never the command line (visible in `ps`).
    p.set_defaults(api_key=os.environ.get("REWARD_GATEWAY_API_KEY") or None)


def gateway(args: argparse.Namespace) -> int:
    """Serve the HTTP gateway until SIGINT/SIGTERM."""
    from reward_client.cli.common import tls_config

    from reward_server.gateway.app import run
    from reward_server.gateway.options import GatewayOptions

    tls = tls_config(args)  # the client CLI's reading of --tls-ca/--tls-cert/--tls-key
    return run(GatewayOptions(url=args.url, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
                              max_items=args.max_inputs, batch_delay_ms=args.batch_delay_ms,
                              batch_size=args.batch_size, timeout_s=args.timeout, api_key=args.api_key,
                              model_name=args.model_name, tls=tls))


def _gateway_command(args: argparse.Namespace, server: TritonServer) -> list[str]:
    command = [sys.executable, "-m", "reward_server.cli", "gateway", "--url", server.grpc_url,
               "--host", args.host, "--port", str(args.gateway_port)]
    if args.tls_cert:  # the gateway checks the server's certificate with the CA that signed it
        command += ["--tls-ca", str(args.tls_ca or args.tls_cert)]
    return command


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
        head_type=args.head_type, reward_indices=args.reward_indices, step_tag=args.step_tag,
        step_labels=args.step_labels, step_aggregate=args.step_aggregate, attribute_names=args.attribute_names,
        attribute_weights=args.attribute_weights, score_mean=args.score_mean, score_std=args.score_std,
        device=args.device, dtype=args.dtype, compile=args.compile, attention=args.attention,
        torch_threads=args.threads,
        token_budget=args.token_budget, min_shared_prefix=args.min_shared_prefix,
        prefix_cache_mb=args.prefix_cache_mb, max_queue_size=args.max_queue_size,
        queue_timeout_us=args.queue_timeout_ms * 1000 if args.queue_timeout_ms is not None else None,
        max_queue_seconds=args.max_queue_seconds,
        max_conversation_bytes=args.max_conversation_bytes, max_request_bytes=args.max_request_bytes,
        exit_timeout_s=args.exit_timeout, tls=_tls(args), watchdog=not args.no_watchdog, log_to_console=True,
        log_verbose=args.log_verbose)


def serve(args: argparse.Namespace) -> int:
    """Start the server, print the endpoints, and stop gracefully on SIGINT/SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.gateway_port is not None and args.tls_mutual:
        _LOGGER.error("--gateway-port with --tls-mutual: start `reward-server gateway` on its own, with its client "
                      "certificate (--tls-cert, --tls-key)")
        return 1
    try:
        server = TritonServer(_options(args))
        server.start()
    except (ServerStartError, FileNotFoundError, ValueError, RuntimeError) as err:
        # The reason is the message's first line; the server log's tail, if any, goes first, so that
        # the reason is the last thing the user reads.
        reason, _, log_tail = str(err).partition("\n")
        if log_tail.strip():
            print(log_tail, file=sys.stderr, flush=True)
        _LOGGER.error("cannot serve: %s", reason)
        return 1
    response = (r'\"steps\": [\"Hello.\", \" How can I help?\"]' if server.process_model
                else r'\"content\": \"Hello, how can I help?\"')
    print(EXAMPLE.format(checkpoint=server.checkpoint, grpc=server.grpc_url, http=server.http_url,
                         metrics=server.metrics_url, response=response), flush=True)
    gateway_process = None
    if args.gateway_port is not None:
        gateway_process = subprocess.Popen(_gateway_command(args, server))
        print(f"  gateway  http://{args.host}:{args.gateway_port}  (page at /, see docs/gateway.md)", flush=True)
    while not stop.wait(0.5):
        code = server.exit_code()  # with the watchdog, only once it gave up restarting
        if code is not None:
            _LOGGER.error("tritonserver exited unexpectedly with code %s", code)
            _stop_gateway(gateway_process)
            server.stop()
            return code or 1
        if gateway_process is not None and gateway_process.poll() is not None:
            _LOGGER.error("the gateway exited with code %s; starting it again", gateway_process.returncode)
            gateway_process = subprocess.Popen(_gateway_command(args, server))
    _LOGGER.info("stopping: waiting for in-flight requests")
    _stop_gateway(gateway_process)  # first, so that what it accepted still reaches the server
    code = server.stop()
    return 0 if code in (0, -signal.SIGTERM) else code


def _stop_gateway(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()  # uvicorn finishes the requests in flight first
    try:
        process.wait(timeout=35)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-tag", help="process reward models: the step tag, a token or its id "
                   f"(default for *ForProcessRewardModel: {DEFAULT_STEP_TAG})")
    p.add_argument("--step-labels", help="process reward models on a causal LM: label token ids POSITIVE,NEGATIVE")


def _build_engine_parser(sub) -> None:
    p = sub.add_parser("build-engine", help="build a TensorRT-LLM engine directory from a Hugging Face reward "
                                            "checkpoint (GPU host; --dry-run anywhere)")
    p.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face reward checkpoint directory")
    p.add_argument("--output", type=Path, required=True, help="engine directory to write (serve it with --engine-dir)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default 1; above 1 refused until a "
                                                     "GPU run verifies it: use --tp)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--max-input-len", type=int, help="longest conversation in tokens (default: min(4096, model's))")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"sequences in flight at once (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--max-num-tokens", type=int, default=DEFAULT_MAX_NUM_TOKENS,
                   help=f"tokens per engine step; longer prompts run in chunks (default {DEFAULT_MAX_NUM_TOKENS})")
    p.add_argument("--head-type", choices=HEAD_TYPES, default="auto")
    p.add_argument("--reward-indices", help="causal-LM reward models: logits read as rewards, e.g. 0 or 0,1,2")
    _step_arguments(p)
    p.add_argument("--calib-dataset", type=Path, help="fp8: calibration data, checked before the build: " + CALIB_HELP)
    p.add_argument("--force", action="store_true", help="rebuild over an existing engine")
    p.add_argument("--dry-run", action="store_true", help="check the inputs, print every step and command, run nothing")


def build_engine(args: argparse.Namespace) -> int:
    """Plan (and unless --dry-run, run) a TensorRT-LLM engine build."""
    from reward_server.builder.build import BuildOptions, check_toolchain, plan_build, run_build

    options = BuildOptions(checkpoint=args.checkpoint, output=args.output, tp=args.tp, pp=args.pp, dtype=args.dtype,
                           max_input_len=args.max_input_len, max_batch_size=args.max_batch_size,
                           max_num_tokens=args.max_num_tokens, head_type=args.head_type,
                           reward_indices=args.reward_indices, step_tag=args.step_tag, step_labels=args.step_labels,
                           calib_dataset=args.calib_dataset, force=args.force)
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
        reason = getattr(err, "reason", None)
        _LOGGER.error("step failed (exit code %s)%s; command: %s", err.returncode, f": {reason}" if reason else "",
                      shlex.join(err.cmd))
        return 1
    print(f"engine ready: reward-server serve --engine tensorrt_llm --engine-dir {engine_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `reward-server` command."""
    parser = argparse.ArgumentParser(prog="reward-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _gateway_parser(sub)
    _build_engine_parser(sub)
    demo = sub.add_parser("demo-checkpoint",
                          help="write a random-weight reward checkpoint (Llama by default; --arch for the other families)")
    demo_checkpoint.add_arguments(demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "build-engine":
        sys.exit(build_engine(args))
    if args.command == "gateway":
        sys.exit(gateway(args))
    if args.command == "demo-checkpoint":
        path = demo_checkpoint.run(args)
        print(path)
        sys.exit(0)
    sys.exit(serve(args))


if __name__ == "__main__":
    main()
