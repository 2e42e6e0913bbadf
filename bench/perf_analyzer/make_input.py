"""Write perf_analyzer `--input-data` JSON for the `reward` ensemble.

    python -m bench.perf_analyzer.make_input --out bench/results/pa_grpo.json [--no-sharing]

Each data step is one conversation: the BYTES input `messages` with shape [1] (the batch
dimension is added by perf_analyzer's `-b`), holding the JSON message list. Conversations
come from `bench.workload` in arrival order, so with `-b n` and n responses per prompt, a
request carries one GRPO group when perf_analyzer takes consecutive steps.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from bench import workload

_LOGGER = logging.getLogger(__name__)

INPUT_NAME = "messages"


def input_data(conversations: Sequence[list[dict]]) -> dict:
    """The perf_analyzer JSON document: {"data": [{"messages": {"content": [...], "shape": [1]}}, ...]}."""
    steps = [{INPUT_NAME: {"content": [json.dumps(messages, ensure_ascii=False)], "shape": [1]}}
             for messages in conversations]
    return {"data": steps}


def write_input(path: str | Path, spec: workload.WorkloadSpec) -> Path:
    """Generate the workload of `spec` and write its perf_analyzer input file to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = input_data(workload.generate(spec).conversations)
    path.write_text(json.dumps(document, ensure_ascii=False))
    _LOGGER.info("wrote %d data steps to %s", len(document["data"]), path)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_analyzer.make_input", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--no-sharing", action="store_true", help="every conversation its own prompt")
    parser.add_argument("--prompt-words", type=float, default=workload.WorkloadSpec.prompt_words_median)
    parser.add_argument("--response-words", type=float, default=workload.WorkloadSpec.response_words_median)
    parser.add_argument("--max-words", type=int, default=workload.WorkloadSpec.max_words)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = workload.WorkloadSpec(prompts=args.prompts, responses_per_prompt=args.responses,
                                 shared_prompt=not args.no_sharing, prompt_words_median=args.prompt_words,
                                 response_words_median=args.response_words, max_words=args.max_words,
                                 seed=args.seed)
    return write_input(args.out, spec)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
