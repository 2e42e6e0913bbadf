"""The server's cost over the in-process engine, measured interleaved.

`bench.run` measures the engine, then the server, minutes apart; on a shared VM the machine itself
drifts by +-10% in that time. This alternates one in-process engine pass (the whole workload in one
`score` call) with one server pass (closed-loop gRPC clients, requests of `--request-size`
conversations), so each pair sees the same machine, and reports each pair's ratio and the median.

    python -m bench.server_overhead --checkpoint var/bench/small-checkpoint --dtype bfloat16 --pairs 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench import grpc_load, workload


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--workload", default="grpo", choices=workload.WORKLOAD_NAMES)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--request-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from reward_server.pipeline.torch_engine.engine import RewardEngine
    from reward_server.supervisor.options import ServeOptions
    from reward_server.supervisor.server import TritonServer

    conversations = workload.generate(workload.spec_for(args.workload)).conversations
    ids = workload.tokenize(conversations, workload.load_encoder(args.checkpoint))
    tokens = sum(map(len, ids))
    # the prefix cache off on both sides: each pass computes the whole workload, as the first one did
    engine = RewardEngine.from_checkpoint(args.checkpoint, device="cpu", threads=args.threads, dtype=args.dtype,
                                          prefix_cache_mb=0)
    engine.score(ids[:16])
    ratios = []
    options = ServeOptions(checkpoint=args.checkpoint, dtype=args.dtype, max_queue_seconds=300, prefix_cache_mb=0)
    with TritonServer(options) as server:
        grpc_load.run_load(server.grpc_url, conversations, args.concurrency, args.request_size)  # warm up
        for _ in range(args.pairs):
            start = time.perf_counter()
            engine.score(ids)
            alone = time.perf_counter() - start
            served = grpc_load.run_load(server.grpc_url, conversations, args.concurrency, args.request_size).seconds
            ratios.append(alone / served)
            print(f"engine {tokens / alone:,.0f} tok/s  server {tokens / served:,.0f} tok/s  "
                  f"server / engine {alone / served:.3f}", flush=True)
    median = statistics.median(ratios)
    print(f"median server / engine over {args.pairs} pairs: {median:.3f}")
    return median


if __name__ == "__main__":
    main()
