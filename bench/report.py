"""Turn a results document (see `bench.run`) into a summary, a markdown table and a plot."""

from __future__ import annotations

import logging
import math
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

# Targets of issue 4, measured with the small demo checkpoint on the 2-core machine.
TARGETS = {
    "server_vs_naive_grpo": 3.0,
    "server_vs_naive_no-sharing": 1.8,
    "server_vs_vllm_grpo": 2.0,
    "engine_effective_pct_of_peak": 65.0,
    "server_overhead_pct_max": 10.0,
}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def _pick(results: list[dict], system: str, workload: str) -> list[dict]:
    return [r for r in results if r["system"] == system and r["workload"] == workload]


def summarize(document: dict) -> dict:
    """Headline numbers per workload and the issue's targets, met or not.

    Returns:
        {"workloads": {name: {...}}, "targets": [{"name", "value", "target", "met"}]}.
        The server's figure is its best concurrency; its overhead compares that pass's wall
        time with the in-process engine's on the same workload.
    """
    results = document["results"]
    per_workload, targets = {}, []
    for name in document["workloads"]:
        naive = next(iter(_pick(results, "naive", name)), None)
        engine = next(iter(_pick(results, "engine", name)), None)
        vllm = next(iter(_pick(results, "vllm", name)), None)
        servers = _pick(results, "server", name)
        best = max(servers, key=lambda r: r["tokens_per_s"], default=None)
        entry = {
            "naive_tokens_per_s": naive["tokens_per_s"] if naive else None,
            "engine_tokens_per_s": engine["tokens_per_s"] if engine else None,
            "engine_vs_naive": engine["speedup_vs_naive"] if engine else None,
            "engine_effective_pct_of_peak": engine["effective_pct_of_peak"] if engine else None,
            "server_best_tokens_per_s": best["tokens_per_s"] if best else None,
            "server_best_concurrency": best["concurrency"] if best else None,
            "server_vs_naive": best["speedup_vs_naive"] if best else None,
            "vllm_tokens_per_s": vllm["tokens_per_s"] if vllm else None,
            "server_vs_vllm": (best["tokens_per_s"] / vllm["tokens_per_s"]) if best and vllm else None,
            "server_overhead_pct": (100.0 * (best["seconds"] / engine["seconds"] - 1.0))
            if best and engine else None,
        }
        per_workload[name] = entry
        if f"server_vs_naive_{name}" in TARGETS:
            targets.append(_target(f"server_vs_naive_{name}", entry["server_vs_naive"],
                                   TARGETS[f"server_vs_naive_{name}"]))
        if name == "grpo":
            targets.append(_target("server_vs_vllm_grpo", entry["server_vs_vllm"], TARGETS["server_vs_vllm_grpo"]))
            targets.append(_target("engine_effective_pct_of_peak", entry["engine_effective_pct_of_peak"],
                                   TARGETS["engine_effective_pct_of_peak"]))
            targets.append(_target("server_overhead_pct_max", entry["server_overhead_pct"],
                                   TARGETS["server_overhead_pct_max"], higher_is_better=False))
    return {"workloads": per_workload, "targets": targets}


def _target(name: str, value, target: float, higher_is_better: bool = True) -> dict:
    met = None
    if _finite(value):
        met = value >= target if higher_is_better else value <= target
    return {"name": name, "value": value, "target": target, "met": met,
            "direction": ">=" if higher_is_better else "<="}


def _fmt(value, digits: int = 1, suffix: str = "") -> str:
    if not _finite(value):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def markdown(document: dict) -> str:
    """A self-contained markdown report: machine, workloads, the table, targets, notes."""
    machine = document["machine"]
    peak = document["matmul_peak"].get("gflops")
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('logical_cpus', '?')} logical CPUs, "
        f"{machine.get('memory_gib', '?')} GiB, AVX-512: {machine.get('avx512')}; torch "
        f"{machine.get('torch')}, transformers {machine.get('transformers')}.",
        f"Command: `{document['command']}` (started {document['started']}, "
        f"{document['duration_s'] / 60:.1f} min).",
        f"Checkpoint: `{document['checkpoint']}`, {document['non_embedding_params'] / 1e6:.1f}M "
        f"non-embedding parameters. dtype {document.get('dtype', 'float32')}"
        f"{', decoder layers compiled' if document.get('compile') else ''}; "
        f"{document['matmul_peak'].get('dtype', 'float32')} matmul peak (2048^3, median, fastest kernel: "
        f"{document['matmul_peak'].get('kernel', 'torch.mm')}): {_fmt(peak)} GFLOP/s"
        + (" (" + ", ".join(f"{k} {_fmt(v)}" for k, v in document["matmul_peak"].get("kernels", {}).items()) + ")."
           if document["matmul_peak"].get("kernels") else "."),
        f"Every figure is the median of {document['repeats']} repeats. 1-minute load average at start "
        f"{document['load_average_1min']['start']:.2f}, at end {document['load_average_1min']['end']:.2f} "
        f"(above the core count means other work competed for the CPUs).",
        "",
        "| workload | conversations | tokens | unique tokens (prefix trie) | longest |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, w in document["workloads"].items():
        lines.append(f"| {name} | {w['conversations']} | {w['tokens']:,} | {w['unique_tokens']:,} | {w['max_tokens']} |")
    lines += [
        "",
        "| workload | system | clients | conv/s | tok/s | p50 s | p99 s | tokens run | padding | eff. GFLOP/s "
        "| eff. % peak | x naive |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in document["results"]:
        work = (r.get("extra") or {}).get("engine_work") or {}
        run_share = 100.0 * work["tokens"] / r["tokens"] if work.get("tokens") and r.get("tokens") else None
        lines.append(
            f"| {r['workload']} | {r['system']} | {r['concurrency'] or '-'} | {_fmt(r['conversations_per_s'], 2)} "
            f"| {_fmt(r['tokens_per_s'], 0)} | {_fmt(r['latency_p50_s'], 2)} | {_fmt(r['latency_p99_s'], 2)} "
            f"| {_fmt(run_share, 0, '%')} "
            f"| {_fmt(100 * r['padding_ratio'] if _finite(r['padding_ratio']) else None, 1, '%')} "
            f"| {_fmt(r['effective_gflops'])} | {_fmt(r['effective_pct_of_peak'], 1, '%')} "
            f"| {_fmt(r['speedup_vs_naive'], 2, 'x')} |")
    lines += ["", "tokens run: real (non-padding) tokens the model computed, as a share of all tokens; below "
              "100% means shared prompts were computed once (from the engine's counters: in-process "
              "stats, or the server's metrics endpoint).", "", "Latency is per unit of work: naive = one batch of 16; engine and vLLM = the whole "
              "workload in one call; server = one request of "
              f"{document['request_size']} conversations (round trip).", "",
              "## Targets (issue 4)", "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in document["summary"]["targets"]:
        met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
        lines.append(f"| {t['name']} | {_fmt(t['value'], 2)} | {t['direction']} {t['target']} | {met} |")
    agreement = [(r["workload"], r["system"], r["concurrency"], r["extra"].get("max_rel_diff_vs_naive"))
                 for r in document["results"] if "max_rel_diff_vs_naive" in r.get("extra", {})]
    if agreement:
        lines += ["", "Score agreement with the naive baseline (max relative difference of the first output):", ""]
        lines += [f"- {w} {s}{f' c={c}' if c else ''}: {d:.2e}" for w, s, c, d in agreement]
    if document["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in document["notes"]]
    return "\n".join(lines) + "\n"


def plot(document: dict, path: Path) -> bool:
    """Throughput and p99 latency against client concurrency, one line per workload.

    The naive baseline and the in-process engine are drawn as horizontal reference lines.
    Returns False (and logs why) when matplotlib is missing or there are no server results.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _LOGGER.warning("matplotlib not installed (pip install -r bench/requirements.txt): no plot")
        return False
    results = document["results"]
    if not any(r["system"] == "server" for r in results):
        _LOGGER.warning("no server results: no plot")
        return False
    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"grpo": "tab:blue", "no-sharing": "tab:orange"}
    for name in document["workloads"]:
        color = colors.get(name)
        servers = sorted(_pick(results, "server", name), key=lambda r: r["concurrency"])
        if servers:
            xs = [r["concurrency"] for r in servers]
            ax_tput.plot(xs, [r["tokens_per_s"] for r in servers], "o-", color=color, label=f"server, {name}")
            ax_lat.plot(xs, [r["latency_p99_s"] for r in servers], "o-", color=color, label=f"server, {name}")
        for system, style in (("naive", ":"), ("engine", "--"), ("vllm", "-.")):
            for r in _pick(results, system, name):
                ax_tput.axhline(r["tokens_per_s"], linestyle=style, color=color, alpha=0.7,
                                label=f"{system} in-process, {name}")
    ax_tput.set(xlabel="client concurrency (requests in flight)", ylabel="tokens/s",
                title="Throughput", xscale="log", ylim=(0, None))
    ax_lat.set(xlabel="client concurrency (requests in flight)",
               ylabel=f"p99 latency per request of {document['request_size']} (s)",
               title="p99 request latency", xscale="log", ylim=(0, None))
    for ax in (ax_tput, ax_lat):
        ax.set_xticks(sorted({r["concurrency"] for r in results if r["concurrency"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    ax_tput.legend(fontsize=7, loc="best")
    ax_lat.legend(fontsize=7, loc="best")
    machine = document["machine"]
    fig.suptitle(f"{machine.get('cpu', '?')} ({machine.get('logical_cpus', '?')} CPUs), "
                 f"{document['non_embedding_params'] / 1e6:.3g}M-parameter reward model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
