"""The decoder layers' matrix products as serving calls them: a new row count with nearly every
packed row. For each product of a layer's shape, the product the engine picks on this CPU
(`fused.product`: bf16 on AMX tiles, else oneDNN prepacked) against oneDNN prepacked, timed with one
row count repeated and with a new row count each call, and whether a row keeps its bits whatever the
row count (one row among 1 to 4,096 rows, against the same row among 4,096).

    python -m bench.products [--checkpoint DIR] [--dtype bfloat16] [--rows 1000-1600] [--calls 30]

The default shape is the `small` demo's (hidden 512, MLP 1408). Figures go to BENCHMARKS.md with the
machine's CPU flags (printed first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.engine_profile import cpu_flags

SMALL = {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 8,
         "head_dim": 64}
# a row's bits are checked among this many rows against among MAX_ROWS
CHECK_ROWS = (1, 7, 10, 20, 33, 64, 100, 333, 1000, 2633, 3000)
MAX_ROWS = 4096


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of each product of a fused decoder layer: q/k/v, o, gate/up, down."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    dim = config.get("head_dim") or hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * dim, hidden), "o": (hidden, heads * dim),
            "gate_up": (2 * inner, hidden), "down": (hidden, inner)}


def measure(name: str, shape: tuple[int, int], dtype, native, low: int, high: int, calls: int) -> dict:
    import torch

    from reward_server.pipeline.torch_engine.fused import PackedLinear, product

    n, k = shape
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    x = torch.randn(MAX_ROWS, k, generator=generator).to(dtype)
    products = {"engine": product(weight, native=native), "oneDNN prepacked": PackedLinear(weight)}
    counts = torch.randint(low, high + 1, (calls,), generator=generator).tolist()
    out = {"shape": [n, k], "engine_product": type(products["engine"]).__name__}
    for label, linear in products.items():
        among_all = linear(x)
        out[f"{label}: rows differing by row count"] = [
            rows for rows in CHECK_ROWS if not torch.equal(linear(x[:rows]), among_all[:rows])]
        for mode, sizes in (("one row count", [counts[0]] * calls), ("new row count each call", counts)):
            linear(x[:sizes[0]])
            start = time.perf_counter()
            for rows in sizes:
                linear(x[:rows])
            seconds = time.perf_counter() - start
            out[f"{label}: {mode} GFLOP/s"] = round(2 * n * k * sum(sizes) / seconds / 1e9)
            out[f"{label}: {mode} ms/call"] = round(seconds / calls * 1e3, 2)
        counts = [c + 1 for c in counts]  # row counts oneDNN has not seen yet for the next product
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.products", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="take the layer shape from its config.json")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rows", default="1000-1600", help="row counts drawn from this range (a packed row's)")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    import torch

    from reward_server.pipeline.torch_engine import kernels

    config = json.loads((args.checkpoint / "config.json").read_text()) if args.checkpoint else SMALL
    config = config.get("text_config", config)
    low, high = (int(v) for v in args.rows.split("-"))
    try:
        native = kernels.attention()
    except kernels.KernelUnavailable:
        native = None
    report = {"cpu_flags": cpu_flags(), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "products": {name: measure(name, shape, getattr(torch, args.dtype), native, low, high, args.calls)
                           for name, shape in layer_shapes(config).items()}}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
