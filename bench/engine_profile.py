"""Where the engine's time goes, and how close each part runs to the machine's kernels.

    .venv/bin/python -m bench.engine_profile [--checkpoint DIR] [--dtype float32] \
        [--layouts 8x512,1x4096] [--variants transformers,fused] [--repeats 5] [--out FILE.json]

For each engine variant (`transformers`: transformers' decoder layers; `fused`: the fused layers
of reward_server/pipeline/torch_engine/fused.py, the default; `+compile` after either: torch.compile of the layers;
`+sdpa`: torch's attention instead of the native kernel of reward_server/pipeline/torch_engine/kernels) and
each packed-row layout (N sequences of L random token ids in one row, no shared prefixes), it
times `RewardEngine.score` (median of the repeats) and profiles one more call, sorting the
operators into matrix products, attention and the rest. It also measures, alone, the kernels
those parts could reach: the matrix product (the fastest of torch.mm, F.linear and oneDNN
prepacked: `bench.baselines.matmul_peak`) and causal attention (`scaled_dot_product_attention`
on one layer's [heads, L, head_dim] per sequence). Rates count FLOPs as bench/gpu/flops.py does:
2 x non-embedding parameters per token for the products, 2 x 2 x heads x head_dim x L (L + 1) / 2
per sequence and layer for causal attention.

Run it on a quiet machine (the report records the load average); it names the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench import baselines, metrics

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "mkldnn::_linear_pointwise", "aten::matmul")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "reward_server::attention")


def cpu_flags() -> list[str]:
    """The vector-ISA flags that decide which kernels run (avx2, avx512f, avx512_bf16, amx...)."""
    from reward_server.pipeline.torch_engine.kernels import cpu_flags as all_flags

    return sorted(f for f in all_flags() if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni",
                                            "amx_bf16", "amx_tile", "avx_ne_convert"))


def parse_layout(text: str) -> tuple[int, int]:
    """"8x512" -> (8, 512)."""
    count, length = text.lower().split("x")
    return int(count), int(length)


def attention_flops(config: dict, lengths: list[int]) -> float:
    """Causal attention FLOPs of one forward over sequences of `lengths` (every layer)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return float(sum(2 * 2 * heads * head_dim * n * (n + 1) / 2 for n in lengths) * config["num_hidden_layers"])


def attention_peak(config: dict, length: int, dtype, repeats: int = 5) -> float:
    """GFLOP/s of causal SDPA alone on one layer's [1, heads, length, head_dim]."""
    import torch
    import torch.nn.functional as F

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    q, k, v = (torch.randn(1, heads, length, head_dim, dtype=dtype) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        samples.append(time.perf_counter() - start)
    one_layer = dict(config, num_hidden_layers=1)
    return attention_flops(one_layer, [length]) / metrics.median(samples) / 1e9


def profile_call(engine, ids) -> dict[str, float]:
    """Seconds per category (matmul / attention / other) of one `engine.score(ids)`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.score(ids)
    parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = ("matmul" if event.key in MATMUL_OPS else
                "attention" if any(a in event.key for a in ATTENTION_OPS) else "other")
        parts[kind] += event.self_cpu_time_total / 1e6
    return parts


def run(args: argparse.Namespace) -> dict:
    import torch

    from reward_server.supervisor.demo_checkpoint import build_checkpoint
    from reward_server.pipeline.torch_engine.engine import RewardEngine

    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path("/tmp/reward-bench-checkpoint-small")
    if not (checkpoint / "config.json").exists():
        build_checkpoint(checkpoint, "small")
    config = json.loads((checkpoint / "config.json").read_text())
    params = metrics.non_embedding_parameters(checkpoint)
    dtype = getattr(torch, args.dtype)
    layouts = [parse_layout(x) for x in args.layouts.split(",")]
    report = {"cpu_flags": cpu_flags(), "load_start": os.getloadavg()[0], "threads": args.threads,
              "dtype": args.dtype, "checkpoint": str(checkpoint), "non_embedding_parameters": params,
              "matmul_peak": baselines.matmul_peak(threads=args.threads, dtype=args.dtype),
              "attention_peak_gflops": {str(n): attention_peak(config, n, dtype) for n in sorted({L for _, L in layouts})},
              "variants": {}}
    rng = np.random.default_rng(args.seed)
    rows = {f"{n}x{L}": [rng.integers(300, config["vocab_size"] - 300, L).tolist() for _ in range(n)]
            for n, L in layouts}
    for variant in args.variants.split(","):
        base, *extras = variant.split("+")
        started = time.perf_counter()
        engine = RewardEngine.from_checkpoint(checkpoint, device="cpu", threads=args.threads, dtype=args.dtype,
                                              token_budget=max(n * L for n, L in layouts), min_shared=0,
                                              prefix_cache_mb=0,  # every repeat computes its rows
                                              fused=base == "fused", compile="compile" in extras,
                                              attention="sdpa" if "sdpa" in extras else "native")
        results = {"load_s": time.perf_counter() - started}
        for name, ids in rows.items():
            engine.score(ids)
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                engine.score(ids)
                samples.append(time.perf_counter() - start)
            seconds = metrics.median(samples)
            tokens = sum(map(len, ids))
            parts = profile_call(engine, ids)
            scale = seconds / max(sum(parts.values()), 1e-9)  # the profiler's overhead spread evenly
            matmul_s, attention_s = parts["matmul"] * scale, parts["attention"] * scale
            results[name] = {
                "tokens_per_s": tokens / seconds, "seconds": seconds,
                "share": {k: v / sum(parts.values()) for k, v in parts.items()},
                "matmul_gflops": 2 * params * tokens / matmul_s / 1e9 if matmul_s else None,
                "attention_gflops": attention_flops(config, list(map(len, ids))) / attention_s / 1e9
                if attention_s else None}
        report["variants"][variant] = results
        del engine
    report["load_end"] = os.getloadavg()[0]
    return report


def render(report: dict) -> str:
    """The report as Markdown tables."""
    peak = report["matmul_peak"]
    lines = [f"CPU flags: {' '.join(report['cpu_flags'])}; {report['threads']} threads; {report['dtype']}; load "
             f"{report['load_start']:.1f} -> {report['load_end']:.1f}",
             f"Matrix-product peak: {peak['gflops']:.0f} GFLOP/s ({peak['kernel']}; "
             + ", ".join(f"{k} {v:.0f}" for k, v in peak["kernels"].items()) + ")",
             "Causal attention alone (SDPA): " + ", ".join(f"L={k}: {v:.0f} GFLOP/s ({100 * v / peak['gflops']:.0f}% of "
                                                            f"the product peak)"
                                                            for k, v in report["attention_peak_gflops"].items()),
             "", "| variant | row | tok/s | products | attention | other | products GFLOP/s (% peak) | "
                 "attention GFLOP/s (% peak) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for variant, results in report["variants"].items():
        for row, r in results.items():
            if row == "load_s":
                continue
            share = r["share"]
            pct = lambda v: f"{v:.0f} ({100 * v / peak['gflops']:.0f}%)" if v else "-"  # noqa: E731
            lines.append(f"| {variant} | {row} | {r['tokens_per_s']:,.0f} | {100 * share['matmul']:.0f}% | "
                         f"{100 * share['attention']:.0f}% | {100 * share['other']:.0f}% | {pct(r['matmul_gflops'])} | "
                         f"{pct(r['attention_gflops'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="Hugging Face checkpoint (default: the small demo checkpoint)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--layouts", default="8x512,1x4096", help="packed rows, N x L (comma-separated)")
    parser.add_argument("--variants", default="transformers,fused",
                        help="transformers | fused, each optionally +compile and/or +sdpa (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    return publish(run(args), render, args.out)


def publish(report: dict, render, out: Path | None) -> dict:
    """Print `render(report)` and, when `out` is given, write the report there as JSON; returns it."""
    print(render(report))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
