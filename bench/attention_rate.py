"""Causal attention alone: the engine's native kernel against torch's SDPA, in one run.

    .venv/bin/python -m bench.attention_rate [--lengths 4096,16384] [--dtypes float32,bfloat16] \
        [--shapes small,qwen3-0.6b] [--repeats 3] [--out FILE.json]

For each shape (query heads / key-value heads x head size of a model: `small` is the demo's
8/8 x 64, `qwen3-0.6b` Skywork-Reward-V2-Qwen3-0.6B's 16/8 x 128), dtype and sequence length, one
layer's causal attention over one sequence is timed with the native kernel
(reward_server/pipeline/torch_engine/kernels) and with `scaled_dot_product_attention(is_causal=True,
enable_gqa=True)` on the same tensors; the median of the repeats. The rate counts the causal
FLOPs (2 x 2 x heads x head_dim x L (L + 1) / 2), as bench/engine_profile.py does, and the
ratio is native / SDPA. It names the CPU's flags and the kernel's instruction set.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench import metrics
from bench.engine_profile import cpu_flags, publish

SHAPES = {"small": (8, 8, 64), "qwen3-0.6b": (16, 8, 128)}  # query heads, key/value heads, head size


def causal_flops(heads: int, dim: int, length: int) -> float:
    """FLOPs of one layer's causal attention over one sequence."""
    return 2.0 * 2 * heads * dim * length * (length + 1) / 2


def _median_seconds(call, repeats: int) -> float:
    call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return metrics.median(samples)


def measure(kernel, shape: tuple[int, int, int], length: int, dtype, repeats: int) -> dict:
    """GFLOP/s of the native kernel and of SDPA on one random sequence of `length` tokens."""
    import torch
    import torch.nn.functional as F

    heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(length, heads, dim, generator=generator).to(dtype)
    k = torch.randn(length, kv_heads, dim, generator=generator).to(dtype)
    v = torch.randn(length, kv_heads, dim, generator=generator).to(dtype)
    out = torch.empty_like(q)
    table = torch.tensor([[0, length, 0, -1]], dtype=torch.int64)
    scale = dim ** -0.5
    native = _median_seconds(lambda: kernel.packed_attention(q, k, v, out, table, [], [], scale), repeats)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
    sdpa = _median_seconds(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                                                  enable_gqa=True), repeats)
    flops = causal_flops(heads, dim, length)
    return {"native_gflops": flops / native / 1e9, "sdpa_gflops": flops / sdpa / 1e9, "ratio": sdpa / native,
            "native_s": native, "sdpa_s": sdpa}


def run(args: argparse.Namespace) -> dict:
    import torch

    from reward_server.pipeline.torch_engine import kernels

    torch.set_num_threads(args.threads)
    kernel = kernels.attention()
    report = {"cpu_flags": cpu_flags(), "threads": args.threads, "load_start": os.getloadavg()[0],
              "kernel": kernels.describe(kernel), "rows": []}
    for shape_name in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            for length in (int(n) for n in args.lengths.split(",")):
                row = measure(kernel, SHAPES[shape_name], length, getattr(torch, dtype_name), args.repeats)
                report["rows"].append({"shape": shape_name, "dtype": dtype_name, "length": length, **row})
                print(render_row(report["rows"][-1]), flush=True)
    report["load_end"] = os.getloadavg()[0]
    return report


def render_row(row: dict) -> str:
    return (f"| {row['shape']} | {row['dtype']} | {row['length']:,} | {row['native_gflops']:.0f} | "
            f"{row['sdpa_gflops']:.0f} | {row['ratio']:.2f} |")


def render(report: dict) -> str:
    """The report as a Markdown table."""
    lines = [f"CPU flags: {' '.join(report['cpu_flags'])}; {report['threads']} threads; kernel {report['kernel']}; "
             f"load {report['load_start']:.1f} -> {report['load_end']:.1f}", "",
             "| shape | dtype | tokens | native GFLOP/s | SDPA GFLOP/s | native / SDPA |", "|---|---|---:|---:|---:|---:|"]
    return "\n".join(lines + [render_row(row) for row in report["rows"]])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.attention_rate", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default="small,qwen3-0.6b", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    return publish(run(args), render, args.out)


if __name__ == "__main__":
    main()
